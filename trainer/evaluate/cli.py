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

``--data [NAME=]PATH[::MAX_ROWS]`` is repeatable and takes every format ``trainer/data.py`` reads;
without ``NAME=`` a dataset is named after its folder and file stem (``alpacaeval/dev``).
Each unique (prompt, response) is scored once (``/v1/score``), even when it appears in several
pairs or datasets; chunks go concurrently (``--chunk-size``, ``--concurrency``). Progress is a
rich bar on stderr; the Markdown report goes to stdout, and with ``--report DIR`` also to
``DIR/report.md`` beside ``DIR/report.json`` and the PNG plots.

Exit status: 0 done; 1 the service could not be used (unreachable after retries, unknown model,
refused request); 2 bad input (unreadable data, a dataset with no usable pairs, bad flags).

The flags map one to one onto :class:`EvalConfig`, which the run functions take (``reward loop``
builds one directly). The metrics are defined in ``metrics.py``, the JSON report in ``report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data import DataError
from .datasets import EvalDataset, ItemPool, build_preference_report, load_datasets
from .metrics import CALIBRATION_BINS, CONFIDENCE
from .report import render_markdown, write_plots, write_report
from .scoring import make_targets, score_through_service, service_error_message

EXIT_SERVICE = 1
EXIT_INPUT = 2


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class EvalConfig:
    """Everything a ``reward eval`` run takes; each field is one flag (its ``dest``) of the parser
    below, with the flag's default and help. ``eval_mode`` is the mode (``best-of-n`` or not)."""

    # the service and the report (both modes)
    urls: list[str] | None = field(default=None, metadata=_help(
        "reward service URL; repeatable for side by side (default: env REWARD_URL or http://127.0.0.1:8000)"))
    models: list[str] | None = field(default=None, metadata=_help(
        "served model name; repeatable for side by side on one service (default: the service's default)"))
    report: str | None = field(default=None, metadata=_help("write report.json, report.md and PNG plots here"))
    seed: int = field(default=0, metadata=_help("seed for calibration order, bootstrap and sampling (default 0)"))
    normalize: bool = field(default=False, metadata=_help("score with the model's reward mean/std normalisation"))
    plots: bool = field(default=True, metadata=_help("skip the PNG plots"))
    # 32 x 4 = 128 items in flight: enough for full batches, and on a slow CPU service (a few
    # items/s) still well inside its request deadline; 64 x 8 was not (504s under load).
    chunk_size: int = field(default=32, metadata=_help("items per request (default 32)"))
    concurrency: int = field(default=4, metadata=_help("requests in flight (default 4)"))
    timeout: float = field(default=120.0, metadata=_help("seconds per request (default 120)"))
    max_retries: int = field(default=5, metadata=_help("retries on connection errors, 429 and 503 (default 5)"))
    backoff: float = field(default=0.5, metadata=_help("base of the exponential backoff in seconds (default 0.5)"))
    api_key: str | None = field(default=None, metadata=_help("sent as 'Authorization: Bearer KEY' (env REWARD_API_KEY)"))
    # preference mode
    data: list[str] | None = field(default=None, metadata=_help(
        "preference data in any format trainer/data.py reads (repeatable); default name <folder>/<stem>"))
    bootstrap: int = field(default=2000, metadata=_help("paired bootstrap resamples (default 2000)"))
    max_bad_fraction: float = field(default=0.01, metadata=_help(
        "abort when more than this fraction of a file's rows are malformed (default 0.01)"))
    eval_mode: str = "preference"
    # best-of-n mode
    policy: str | None = field(default=None, metadata=_help("Hugging Face causal-LM directory"))
    prompts: str | None = field(default=None, metadata=_help(
        'prompts: .txt (one per line) or JSONL (a string, {"prompt": str | messages} or {"messages"})'))
    bon_data: str | None = field(default=None, metadata=_help("preference data file: its distinct prompts"))
    max_prompts: int | None = field(default=None, metadata=_help("use the first N prompts"))
    n_samples: int = field(default=16, metadata=_help("samples per prompt, N (default 16)"))
    temperature: float = field(default=1.0, metadata=_help("sampling temperature (default 1.0)"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling (default 1.0: off)"))
    top_k: int = field(default=0, metadata=_help("top-k sampling (default 0: off)"))
    max_new_tokens: int = field(default=128, metadata=_help("tokens per sample (default 128)"))
    max_prompt_length: int | None = field(default=None, metadata=_help(
        "prompt tokens kept, the most recent ones (default: the policy's context minus --max-new-tokens)"))
    batch_size: int = field(default=16, metadata=_help("sequences per generate call (default 16)"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N (default auto)"))
    dtype: str = field(default="float32", metadata=_help("policy dtype"))
    trust_remote_code: bool = field(default=False, metadata=_help("run model code from the policy directory"))
    gold_model: str | None = field(default=None, metadata=_help(
        "gold reward model served by the proxy's service (or --gold-url's)"))
    gold_url: str | None = field(default=None, metadata=_help(
        "service of the gold reward model (its default model unless --gold-model)"))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "EvalConfig":
        """The parsed flags (any attribute that is not a field, e.g. ``func``, is ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def preference_report_config(self, datasets: Sequence[EvalDataset]) -> dict[str, Any]:
        """The report's ``config``: what shapes a preference report's numbers."""
        return {
            "seed": self.seed, "bootstrap": self.bootstrap, "ci_method": "wilson", "confidence": CONFIDENCE,
            "calibration_bins": CALIBRATION_BINS, "normalize": self.normalize, "chunk_size": self.chunk_size,
            "concurrency": self.concurrency,
            "datasets": [{"name": d.name, "path": d.path} for d in datasets],
        }


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
            "by side (paired bootstrap). `reward eval best-of-n -h`: the best-of-N curve of a policy."
        ),
    )
    _add_service_flags(parser, suppress=False)
    _flag(parser, "--data", "data", action="append", metavar="[NAME=]PATH[::MAX_ROWS]")
    _flag(parser, "--bootstrap", "bootstrap", type=_positive_int)
    _flag(parser, "--max-bad-fraction", "max_bad_fraction", type=float)
    parser.set_defaults(func=run_eval, eval_mode="preference")

    modes = parser.add_subparsers(dest="eval_mode", metavar="MODE")
    bon = modes.add_parser(
        "best-of-n", allow_abbrev=False, help="best-of-N curve of a policy scored by the service (proxy and gold)",
        description=(
            "For each prompt, sample N responses from a causal LM (in-process, transformers generate) and score them "
            "with the service; report the exact expected best-of-n reward for n = 1, 2, 4, ..., N with the analytic "
            "KL log n - (n-1)/n, and with --gold-model/--gold-url the gold reward of the proxy's pick."
        ),
    )
    _add_service_flags(bon, suppress=True)
    _flag(bon, "--policy", "policy", required=True, metavar="DIR")
    source = bon.add_mutually_exclusive_group(required=True)
    _flag(source, "--prompts", "prompts", metavar="FILE")
    _flag(source, "--data", "bon_data", metavar="PATH")
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
    bon.set_defaults(func=run_eval, eval_mode="best-of-n")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    config = EvalConfig.from_namespace(args)
    if config.eval_mode == "best-of-n":
        from .best_of_n import run_best_of_n  # here, not at the top: best_of_n imports this module

        return run_best_of_n(config)
    return run_preference_eval(config)


def fail(message: str, code: int) -> int:
    print(f"reward eval: {message}", file=sys.stderr)
    return code


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
    for d in datasets:
        print(f"reward eval: {d.name}: {len(d.records)} records, {d.n_pairs} pairs", file=sys.stderr)
    print(f"reward eval: {len(pool)} unique responses to score with {len(targets)} model(s)", file=sys.stderr)

    try:
        scores, timing = score_through_service(config, targets, pool, resolve=True)
    except RewardServiceError as exc:
        return fail(service_error_message(exc), EXIT_SERVICE)

    report_config = config.preference_report_config(datasets)
    report = build_preference_report(datasets, scores, [t.describe() for t in targets], report_config, timing)
    return finish_report(report, config, scores=scores, datasets=datasets)


def finish_report(report: dict[str, Any], config: EvalConfig, **plot_data: Any) -> int:
    """Write plots, report.json and report.md under --report (when given); print the Markdown."""
    if config.report:
        out = Path(config.report)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return fail(f"cannot create the report folder {out}: {exc}", EXIT_INPUT)
        if config.plots:
            report["plots"] = write_plots(report, out, **plot_data)
        markdown = write_report(report, out)
    else:
        markdown = render_markdown(report)
    sys.stdout.write(markdown)
    sys.stdout.flush()
    if config.report:
        print(f"reward eval: report written to {Path(config.report) / 'report.json'} and report.md", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reward", description="Evaluate served reward models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
