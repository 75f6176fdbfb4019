"""``EvalConfig``: everything a ``reward eval`` run takes, one field per flag of the parser in
``cli.py`` (its ``dest``, default and help), as TRL keeps a trainer's config beside it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from .metrics import CALIBRATION_BINS, CONFIDENCE


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class EvalConfig:
    """Everything a ``reward eval`` run takes; each field is one flag (its ``dest``) of the parser in
    ``cli.py``, with the flag's default and help. ``eval_mode`` is the mode (``best-of-n`` or not)."""

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
        "preference data in any format trainer/data.py reads (repeatable); default name <folder>/<stem>; "
        ":objective=NAME: the objective it measures (default: by folder, or by category)"))
    bootstrap: int = field(default=2000, metadata=_help("paired bootstrap resamples (default 2000)"))
    max_bad_fraction: float = field(default=0.01, metadata=_help(
        "abort when more than this fraction of a file's rows are malformed (default 0.01)"))
    # an ensemble (its model card has `ensemble`): the rule, the uncertainty report's inputs
    aggregate: str | None = field(default=None, metadata=_help(
        "an ensemble: aggregate its members' rewards by this rule instead of the served default "
        "(mean, min, mean_minus_var); refused for a model that is not an ensemble"))
    uncertainty_penalty: float | None = field(default=None, metadata=_help(
        "an ensemble aggregated by mean_minus_var: the λ of mean - λ·var (default: the served one); in best-of-n, "
        "the λ of mean_minus_var in --proxy-rules (default: the proxy's served one)"))
    ood: list[str] | None = field(default=None, metadata=_help(
        "responses unlike the dev sets, to compare an ensemble's spread on them with the dev sets' (repeatable): "
        "preference data (each response), or JSONL of {prompt, response}, {messages} or reward ppo's metrics.jsonl "
        "(its samples); default name <folder>/<stem>"))
    uncertainty_bins: int = field(default=5, metadata=_help(
        "an ensemble: quantile bins of pair uncertainty for accuracy per bin (default 5)"))
    eval_mode: str = "preference"
    # best-of-n mode
    policy: str | None = field(default=None, metadata=_help("Hugging Face causal-LM directory"))
    prompts: str | None = field(default=None, metadata=_help(
        'prompts: .txt (one per line) or JSONL (a string, {"prompt": str | messages} or {"messages"})'))
    bon_data: str | None = field(default=None, metadata=_help("preference data file: its distinct prompts"))
    samples: str | None = field(default=None, metadata=_help(
        "an earlier best-of-n run's samples.jsonl: score its samples again (e.g. with a retrained proxy or another "
        "gold) instead of sampling; N is the file's, and --policy and the sampling flags are not used"))
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
    proxy_rules: list[str] | None = field(default=None, metadata=_help(
        "the proxy is an ensemble: a best-of-n curve for each of these rules from the same samples, comma-separated: "
        "mean, min, mean_minus_var, member:M (member M alone); scored once with each member's reward, each rule "
        "derived from the members with the service's formula"))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "EvalConfig":
        """The parsed flags (any attribute that is not a field, e.g. ``func``, is ignored). A None is
        the field's default: argparse leaves ``eval_mode`` None when no mode is named."""
        values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})

    def preference_report_config(self, datasets: Sequence[Any]) -> dict[str, Any]:
        """The report's ``config``: what shapes a preference report's numbers (``datasets``: the
        :class:`.datasets.EvalDataset` evaluated)."""
        return {
            "seed": self.seed, "bootstrap": self.bootstrap, "ci_method": "wilson", "confidence": CONFIDENCE,
            "calibration_bins": CALIBRATION_BINS, "normalize": self.normalize, "chunk_size": self.chunk_size,
            "concurrency": self.concurrency,
            "datasets": [{"name": d.name, "path": d.path} for d in datasets],
            # only when given: a report without them keeps the keys it always had
            **{key: value for key, value in (("aggregate", self.aggregate), ("uncertainty_penalty", self.uncertainty_penalty),
                                             ("ood", self.ood)) if value is not None},
        }
