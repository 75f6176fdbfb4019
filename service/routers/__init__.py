"""The HTTP routes, one router per concern. Each route is a module-level function that takes
what it needs from ``request.app.state`` (the registry, the inference path, settings, metrics,
the comparison store) and only validates and shapes: scoring goes through ``service/inference.py``.

- ``scoring``: /v1/score, /v1/compare
- ``compat``: /get_reward (OpenRLHF), /classify and /pooling (vLLM, as verl calls them)
- ``models``: /v1/models and the hot reload
- ``comparisons``: the comparison store, the labelling queue and the /label page
- ``health``: /healthz, /readyz, /metrics

Every path served is declared, with its scope and limits, in ``service/routes.py``.
"""
