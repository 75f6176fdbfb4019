"""``reward eval``: evaluate reward models through the RUNNING service, over HTTP.

Evaluation calls the service with our client (:class:`client.AsyncRewardClient`), never the model
in-process, so what it measures is exactly what a PPO trainer gets from the same service.

Two modes::

    # preference data: accuracy, length, calibration, reward distribution; side by side
    reward eval --url http://127.0.0.1:8000 --data ../shared/data/alpacaeval/dev.jsonl.gz --report out/
    reward eval --model rm-a --model rm-b --data hh=../shared/data/hh-harmless/dev.jsonl.gz --report out/
    reward eval --url http://a:8000 --url http://b:8000 --data d.jsonl --report out/

    # best-of-N of a policy (samples generated in-process with transformers), scored by the service
    reward eval best-of-n --policy path/to/causal-lm --data prompts.jsonl --n 16 \\
        --model proxy --gold-model gold --report out/
    # an ensemble proxy read by several rules, from the same samples
    reward eval best-of-n ... --proxy-rules member:0,mean,min,mean_minus_var --uncertainty-penalty 1
    # the same samples scored again (a retrained proxy, another gold): nothing is sampled
    reward eval best-of-n --samples out/samples.jsonl --model proxy2 --gold-model gold --report out2/

An ensemble (its model card has ``ensemble``) is scored with each member's reward and the
members' spread from the same requests, and the report gains an Uncertainty section
(``uncertainty.py``): does the spread pick out the pairs it gets wrong, accuracy per quantile of
it, and, with ``--ood [NAME=]PATH[::MAX_ROWS]`` (repeatable), its spread on other inputs against
the dev sets'. ``--aggregate`` / ``--uncertainty-penalty`` evaluate it under a rule.

``--data [NAME=]PATH[::MAX_ROWS][:objective=NAME]`` is repeatable and takes every format
``trainer/data.py`` reads; without ``NAME=`` a dataset is named after its folder and file stem
(``alpacaeval/dev``). ``:objective=`` says which objective it measures (else its folder's default,
or its categories': ``datasets.py``); a model with several heads is judged by each of them too.
Each unique (prompt, response) is scored once (``/v1/score``), even when it appears in several
pairs or datasets; chunks go concurrently (``--chunk-size``, ``--concurrency``). Progress is a
rich bar on stderr; the Markdown report goes to stdout, and with ``--report DIR`` also to
``DIR/report.md`` beside ``DIR/report.json`` and the PNG plots.

Exit status: 0 done; 1 the service could not be used (unreachable after retries, unknown model,
refused request); 2 bad input (unreadable data, a dataset with no usable pairs, bad flags).

The flags map one to one onto :class:`.config.EvalConfig`, which the run functions take
(``reward loop`` builds one directly). The metrics are defined in ``metrics.py``, the JSON report in ``report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from reward_core.ensemble import AGGREGATES, EnsembleError, check_aggregate

from ..data import DataError
from .best_of_n import run_best_of_n
from .config import EvalConfig
from .datasets import ItemPool, build_preference_report, load_datasets, load_item_sets
from .report import EXIT_INPUT, EXIT_SERVICE, fail, finish_report
from .scoring import EnsembleFlagError, make_targets, score_through_service, service_error_message


_FIELDS = {f.name: f for f in dataclasses.fields(EvalConfig)}


def _flag(parser: Any, flag: str, dest: str, *, suppress: bool = False, **kwargs: Any) -> None:
    """``flag`` onto the EvalConfig field ``dest``, with the field's default (argparse.SUPPRESS
    when ``suppress``) and help."""
    f = _FIELDS[dest]
    default = argparse.SUPPRESS if suppress else f.default
    parser.add_argument(flag, dest=dest, default=default, help=f.metadata["help"], **kwargs)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _comma_list(text: str) -> list[str]:
    """``a,b,c`` as a list, blanks dropped; run_best_of_n says which names are not rules."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _penalty(text: str) -> float:
    try:
        value = float(text)
        check_aggregate("mean_minus_var", value)
    except (ValueError, EnsembleError) as exc:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}") from exc
    return value


def _add_service_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Flags shared by both modes. On the best-of-n subparser they default to SUPPRESS so values
    given before ``best-of-n`` are not overwritten by the subparser's defaults."""
    _flag(parser, "--url", "urls", suppress=suppress, action="append", metavar="URL")
    _flag(parser, "--model", "models", suppress=suppress, action="append", metavar="NAME")
    _flag(parser, "--report", "report", suppress=suppress, metavar="DIR")
    _flag(parser, "--seed", "seed", suppress=suppress, type=int)
    _flag(parser, "--normalize", "normalize", suppress=suppress, action="store_true")
    _flag(parser, "--no-plots", "plots", suppress=suppress, action="store_false")
    _flag(parser, "--chunk-size", "chunk_size", suppress=suppress, type=_positive_int)
    _flag(parser, "--concurrency", "concurrency", suppress=suppress, type=_positive_int)
    _flag(parser, "--timeout", "timeout", suppress=suppress, type=float)
    _flag(parser, "--max-retries", "max_retries", suppress=suppress, type=int)
    _flag(parser, "--backoff", "backoff", suppress=suppress, type=float)
    _flag(parser, "--api-key", "api_key", suppress=suppress)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    # allow_abbrev=False: with abbreviations the eval parser would claim best-of-n's flags
    # (`--n` looks like an abbreviation of --normalize / --no-plots).
    parser = subparsers.add_parser(
        "eval", allow_abbrev=False, help="evaluate served reward models: accuracy, length, calibration, side by side, best-of-N",
        description=(
            "Evaluate reward models through the running service (HTTP, our client). Default mode: preference "
            "accuracy (Wilson 95% CI, per category), length-controlled accuracy and reward/length correlation, "
            "calibration (ECE, Brier, reliability diagram), reward distributions; several --url/--model compare side "
            "by side (paired bootstrap); an ensemble also gets its uncertainty judged (AUROC for its wrong pairs, "
            "accuracy per quantile, --ood inputs). `reward eval best-of-n -h`: the best-of-N curve of a policy."
        ),
    )
    _add_service_flags(parser, suppress=False)
    _flag(parser, "--data", "data", action="append", metavar="[NAME=]PATH[::MAX_ROWS][:objective=NAME]")
    _flag(parser, "--bootstrap", "bootstrap", type=_positive_int)
    _flag(parser, "--max-bad-fraction", "max_bad_fraction", type=float)
    _flag(parser, "--aggregate", "aggregate", choices=AGGREGATES)
    _flag(parser, "--uncertainty-penalty", "uncertainty_penalty", type=_penalty, metavar="LAMBDA")
    _flag(parser, "--ood", "ood", action="append", metavar="[NAME=]PATH[::MAX_ROWS]")
    _flag(parser, "--uncertainty-bins", "uncertainty_bins", type=_positive_int)
    parser.set_defaults(func=run_eval, eval_mode="preference")

    modes = parser.add_subparsers(dest="eval_mode", metavar="MODE")
    bon = modes.add_parser(
        "best-of-n", allow_abbrev=False, help="best-of-N curve of a policy scored by the service (proxy and gold)",
        description=(
            "For each prompt, sample N responses from a causal LM (in-process, transformers generate) and score them "
            "with the service; report the exact expected best-of-n reward for n = 1, 2, 4, ..., N with the analytic "
            "KL log n - (n-1)/n, and with --gold-model/--gold-url the gold reward of the proxy's pick. An ensemble proxy "
            "is scored under several rules from the same samples with --proxy-rules."
        ),
    )
    _add_service_flags(bon, suppress=True)
    _flag(bon, "--policy", "policy", metavar="DIR")
    source = bon.add_mutually_exclusive_group(required=True)
    _flag(source, "--prompts", "prompts", metavar="FILE")
    _flag(source, "--data", "bon_data", metavar="PATH")
    _flag(source, "--samples", "samples", metavar="SAMPLES_JSONL")
    _flag(bon, "--max-prompts", "max_prompts", type=_positive_int)
    _flag(bon, "--n", "n_samples", type=_positive_int)
    _flag(bon, "--temperature", "temperature", type=float)
    _flag(bon, "--top-p", "top_p", type=float)
    _flag(bon, "--top-k", "top_k", type=int)
    _flag(bon, "--max-new-tokens", "max_new_tokens", type=_positive_int)
    _flag(bon, "--max-prompt-length", "max_prompt_length", type=_positive_int)
    _flag(bon, "--batch-size", "batch_size", type=_positive_int)
    _flag(bon, "--device", "device")
    _flag(bon, "--dtype", "dtype", choices=("float32", "bfloat16", "float16"))
    _flag(bon, "--trust-remote-code", "trust_remote_code", action="store_true")
    _flag(bon, "--gold-model", "gold_model", metavar="NAME")
    _flag(bon, "--gold-url", "gold_url", metavar="URL")
    _flag(bon, "--proxy-rules", "proxy_rules", type=_comma_list, metavar="RULE[,RULE...]")
    # the preference mode's dest (an ensemble's λ): suppressed so a λ given before ``best-of-n`` is kept;
    # a float here, checked by run_best_of_n with the rules (exit 2 naming the fix)
    _flag(bon, "--uncertainty-penalty", "uncertainty_penalty", suppress=True, type=float, metavar="LAMBDA")
    bon.set_defaults(func=run_eval, eval_mode="best-of-n")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    config = EvalConfig.from_namespace(args)
    if config.eval_mode == "best-of-n":
        return run_best_of_n(config)
    return run_preference_eval(config)


def run_preference_eval(config: EvalConfig) -> int:
    from client import RewardServiceError

    if not config.data:
        return fail("give preference data with --data [NAME=]PATH (or use `reward eval best-of-n`)", EXIT_INPUT)
    try:
        targets = make_targets(config.urls or [], config.models or [])
    except ValueError as exc:
        return fail(str(exc), EXIT_INPUT)
    pool = ItemPool()
    try:
        datasets = load_datasets(config.data, pool, config.max_bad_fraction)
    except DataError as exc:
        return fail(f"{exc}; nothing to evaluate", EXIT_INPUT)
    try:
        item_sets = load_item_sets(config.ood or [], pool, config.max_bad_fraction)
    except DataError as exc:
        return fail(str(exc), EXIT_INPUT)
    for d in datasets:
        print(f"reward eval: {d.name}: {len(d.records)} records, {d.n_pairs} pairs", file=sys.stderr)
    for i in item_sets:
        print(f"reward eval: {i.name} (--ood): {i.items.size} responses", file=sys.stderr)
    print(f"reward eval: {len(pool)} unique responses to score with {len(targets)} model(s)", file=sys.stderr)

    try:
        scores, timing, heads, ensembles = score_through_service(config, targets, pool, resolve=True)
    except EnsembleFlagError as exc:
        return fail(str(exc), EXIT_INPUT)
    except RewardServiceError as exc:
        return fail(service_error_message(exc), EXIT_SERVICE)

    report_config = config.preference_report_config(datasets)
    report = build_preference_report(datasets, scores, [t.describe() for t in targets], report_config, timing, heads,
                                     ensembles, item_sets, config.uncertainty_bins)
    return finish_report(report, config, scores=scores, datasets=datasets)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reward", description="Evaluate served reward models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
