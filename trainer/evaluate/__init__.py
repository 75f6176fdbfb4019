"""``reward eval``: evaluate served reward models through the running service, over HTTP.

- ``metrics``: the metric math (pure numpy): Wilson intervals, accuracy with ties, length control,
  calibration, paired bootstrap, correlations, AUROC and accuracy per quantile, the exact best-of-n
  expectation.
- ``datasets``: preference datasets as pairs over a pool of unique items; the preference report.
- ``scoring``: the served models to score with (``Target``) and scoring through the client.
- ``uncertainty``: an ensemble's uncertainty against its errors and on ``--ood`` inputs (the
  report's ``uncertainty`` block).
- ``best_of_n``: prompt files, sampling from a policy, ``reward eval best-of-n``.
- ``report``: the JSON report's schema and writing, its Markdown and PNG plots, exit statuses.
- ``config``: ``EvalConfig``, one field per ``reward eval`` flag, what the run functions take.
- ``cli``: the ``reward eval`` parser (flags onto ``EvalConfig``) and the run functions.

Import from the modules; this package re-exports nothing.
"""
