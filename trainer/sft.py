"""Supervised fine-tuning of a causal LM on demonstrations: ``reward sft`` and :func:`train_sft`.

The first stage of RLHF: the policy that PPO (``trainer/ppo.py``) starts from and the frozen
reference it is kept close to.

* Demonstrations: the best-ranked (chosen) response of each preference record, read with
  :func:`trainer.data.load_preferences` (every format it reads; ``PATH[:WEIGHT][:MAX_ROWS]``).
* Rendering: :func:`reward_core.formatting.render_policy_example`, i.e. the tokenizer's chat
  template when it has one, else the HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant:"`` +
  ``" {response}{eos}"``. The prompt text is exactly what PPO and ``reward eval best-of-n``
  generate from (:func:`reward_core.formatting.render_policy_prompt`), and the response part ends with the
  end-of-turn / EOS token, so the policy learns to stop.
* Loss: token-level cross entropy on response tokens only (prompt and padding positions are
  masked), averaged over the response tokens of the batch.
* Model: any Hugging Face causal-LM directory; a directory holding only ``config.json`` and a
  tokenizer (or ``--init-from-config``) gives a random-init model of that config, since nothing
  pretrained can be downloaded here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from reward_core.forward import pad_token_id

from .config_flags import add_config_subcommand, config_from_namespace, flag_help
from .data import DataError, load_preferences
from .utils import disable_dropout, progress_bar, resolve_device

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
IGNORE = -100


class SFTConfigError(ValueError):
    """A configuration, model or tokenizer that cannot be used, with what to do about it."""


@dataclass
class SFTConfig:
    """Everything an SFT run needs; each field is one ``reward sft`` flag."""

    model: str = field(default="", metadata=flag_help(
        "Causal-LM directory to start from (weights + tokenizer), or a directory with only config.json "
        "and a tokenizer for a random-init model."))
    init_from_config: bool = field(default=False, metadata=flag_help(
        "Random-init the model from the directory's config.json even if it has weights."))
    data: list[str] = field(default_factory=list, metadata=flag_help(
        "Preference data as PATH[:WEIGHT][:MAX_ROWS] (repeatable); the best-ranked response of each "
        "record is the demonstration.", metavar="PATH[:W][:N]"))
    output_dir: str = field(default="runs/sft", metadata=flag_help("Where the fine-tuned model directory goes."))
    max_length: int = field(default=512, metadata=flag_help(
        "Tokens per prompt + response (capped to the model's context); longer ones lose prompt tokens from the start, "
        "then response tokens from the end."))
    num_epochs: float = field(default=1.0, metadata=flag_help("Passes over the demonstrations."))
    max_steps: int | None = field(default=None, metadata=flag_help("Optimizer steps (overrides --num-epochs)."))
    batch_size: int = field(default=8, metadata=flag_help("Demonstrations per optimizer step."))
    learning_rate: float = field(default=1e-5, metadata=flag_help("AdamW learning rate (constant)."))
    weight_decay: float = field(default=0.0, metadata=flag_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=flag_help("Gradient clipping (0: off)."))
    disable_dropout: bool = field(default=True, metadata=flag_help("Turn dropout off while training."))
    logging_steps: int = field(default=10, metadata=flag_help("Log the loss every N steps."))
    seed: int = field(default=42, metadata=flag_help("Seed for initialisation and data order."))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N."))
    dtype: str = field(default="float32", metadata=flag_help(
        "Weights dtype: float32 or bfloat16 (bfloat16 for a 0.5B+ model on GPU).", choices=("float32", "bfloat16")))
    num_threads: int | None = field(default=None, metadata=flag_help("torch CPU threads (default: torch's choice)."))
    progress: bool = field(default=True, metadata=flag_help("Show a progress bar."))

    def validate(self) -> None:
        if not self.model:
            raise SFTConfigError("give the model to start from with --model DIR")
        if not self.data:
            raise SFTConfigError("give demonstrations with --data PATH[:WEIGHT][:MAX_ROWS]")
        for name in ("batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise SFTConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise SFTConfigError("max_length must be >= 2")
        if self.max_steps is None and self.num_epochs <= 0:
            raise SFTConfigError("num_epochs must be > 0")


@dataclass
class SFTResult:
    output_dir: Path
    steps: int
    losses: list[float]  # per optimizer step
    n_demonstrations: int


# --------------------------------------------------------------------------- model and tokenizer


def load_causal_lm(path: str | Path, *, init_from_config: bool = False, dtype: str = "float32"):
    """(model, tokenizer) from a directory: its weights, or a random init of its config.json when
    it has no weights (or ``init_from_config``). SFTConfigError when the tokenizer and the model's
    vocabulary do not match."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SFTConfigError(f"{path} is not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise SFTConfigError(f"{path}: cannot load a tokenizer: {exc}") from exc
    torch_dtype = getattr(torch, dtype)
    if init_from_config or not any((path / name).is_file() for name in WEIGHT_FILES):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    check_vocab(model, tokenizer, path)
    return model, tokenizer


def check_vocab(model: Any, tokenizer: Any, where: Any) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise SFTConfigError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
            "the tokenizer does not belong to this model"
        )


def fit_to_context(model_config: Any, wanted: int | None, flag: str, reserved: int = 0, reserved_flag: str = "") -> int:
    """Tokens of input the model can take: ``wanted`` (None: as many as fit), capped so that with
    ``reserved`` tokens still to generate the sequence fits the model's position table (past it,
    learned position embeddings fail with an index error deep inside the forward pass). The cap
    is logged; SFTConfigError when nothing fits or the config names no context and none is given."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context is None:
        if wanted is None:
            raise SFTConfigError(f"the model's config names no context length (max_position_embeddings); pass {flag}")
        return wanted
    room = context - reserved
    if room < 1:
        raise SFTConfigError(f"{reserved_flag} {reserved} leaves no room for a prompt in the model's context of "
                             f"{context} tokens; lower {reserved_flag}")
    if wanted is not None and wanted > room:
        log.info("%s %d capped to %d: the model's context is %d tokens%s", flag, wanted, room, context,
                 f" and {reserved} are kept for {reserved_flag}" if reserved else "")
    return room if wanted is None else min(wanted, room)


# --------------------------------------------------------------------------- examples and loss


def render_demonstration(messages: Sequence[dict], response: str, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one demonstration; labels are IGNORE on prompt tokens."""
    from reward_core.formatting import render_policy_example

    # A chat template writes its own special tokens; the HH fallback relies on the tokenizer's BOS.
    prompt_text, response_text, with_specials = render_policy_example(messages, response, tokenizer)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=with_specials)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if len(response_ids) >= max_length:
        prompt_ids, response_ids = prompt_ids[-1:], response_ids[: max_length - 1]
    elif len(prompt_ids) + len(response_ids) > max_length:
        prompt_ids = prompt_ids[len(prompt_ids) + len(response_ids) - max_length:]  # oldest prompt tokens first
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + list(response_ids)


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) tensors."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def response_only_loss(logits, labels):
    """Mean cross entropy of predicting each response token from the tokens before it.

    Position t's logits predict token t+1; only targets that are response tokens count."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    logits = logits[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    mask = (targets.reshape(-1) != IGNORE).float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- training


def train_sft(config: SFTConfig) -> SFTResult:
    import torch

    config.validate()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    records = load_preferences(config.data, seed=config.seed).records
    if not records:
        raise DataError(f"no demonstrations in {', '.join(config.data)}")
    model, tokenizer = load_causal_lm(config.model, init_from_config=config.init_from_config, dtype=config.dtype)
    max_length = fit_to_context(model.config, config.max_length, "--max-length")
    device = resolve_device(config.device, error=SFTConfigError)
    model.to(device)
    if config.disable_dropout:
        disable_dropout(model)
    model.train()
    examples = [render_demonstration(r.prompt, r.best, tokenizer, max_length) for r in records]
    pad_id = pad_token_id(tokenizer)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.num_epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(output_dir / "metrics.jsonl", "w")
    order_rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    progress = progress_bar(config.progress)
    with progress, metrics:
        task = progress.add_task("sft", total=total_steps)
        for step in range(1, total_steps + 1):
            if len(order) < config.batch_size:
                epoch_order = list(range(len(examples)))
                order_rng.shuffle(epoch_order)
                order += epoch_order
            batch, order = order[: config.batch_size], order[config.batch_size:]
            input_ids, attention_mask, labels = (t.to(device) for t in collate([examples[i] for i in batch], pad_id))
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = response_only_loss(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if step % config.logging_steps == 0 or step == total_steps:
                window = losses[-config.logging_steps:]
                entry = {"step": step, "loss": sum(window) / len(window), "elapsed_s": time.perf_counter() - started}
                metrics.write(json.dumps(entry) + "\n")
                metrics.flush()
            progress.update(task, completed=step, description=f"sft loss {loss.item():.3f}")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "sft_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return SFTResult(output_dir=output_dir, steps=total_steps, losses=losses, n_demonstrations=len(examples))


# --------------------------------------------------------------------------- CLI


def add_sft_parser(subparsers) -> argparse.ArgumentParser:
    return add_config_subcommand(
        subparsers, "sft", SFTConfig, run_sft,
        help="fine-tune a causal LM on demonstrations (the chosen answers of preference data)",
        description="Supervised fine-tuning on demonstrations, loss on response tokens only; the starting policy for `reward ppo`.",
    )


def run_sft(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train_sft(config_from_namespace(SFTConfig, args))
    except (DataError, SFTConfigError) as exc:
        print(f"reward sft: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps, "n_demonstrations": result.n_demonstrations,
                      "first_loss": result.losses[0], "last_loss": result.losses[-1]}, indent=2))
    return 0
