"""Reward-model training: ``reward train-rm`` and :func:`train_reward_model`.

A Bradley-Terry / InstructGPT K-way ranking trainer in plain PyTorch whose output directory the
service loads unchanged (``reward serve --model rm=OUTPUT_DIR``). The pieces, TRL-style:

* Config: :class:`trainer.reward_config.RewardTrainingConfig`; every field is a ``reward train-rm``
  flag of the same name (``--per-device-batch-size`` for ``per_device_batch_size``...).
* Model surgery (which weights a train mode trains): :mod:`trainer.surgery`. Train modes: ``full``
  (every weight), ``top`` (top N transformer blocks + head, + pooler / final norm; saved as a
  partial state dict over ``base_model``), ``lora`` (PEFT LoRA adapter, the head (+ pooler)
  trained fully via ``modules_to_save``).
* Model input: :func:`reward_core.formatting.encode_conversations` + :func:`reward_core.forward.pad_batch`,
  and rewards come from :func:`reward_core.forward.reward_forward`: the very code the service scores
  with, so there is no train/serve skew (:mod:`trainer.scoring`).
* Loss (``trainer/losses.py``, :meth:`_Trainer.compute_loss`): one forward per response (all
  responses of all records of a micro-batch in one forward); every record's K(K-1)/2 (better,
  worse) pairs get the Bradley-Terry loss ``-log sigmoid(r_better - r_worse - margin)`` (or the
  soft-label loss with ``p_first``), averaged per record, then over records (InstructGPT);
  optional reward centring.
* The trainer (this module, :class:`_Trainer`): set-up (:meth:`_Trainer.setup`), one optimizer
  step (:meth:`_Trainer.train_step`), evaluation and best-model tracking
  (:meth:`_Trainer.evaluate`, :meth:`_Trainer.eval_and_keep_best`), checkpoints
  (:meth:`_Trainer.save_checkpoint`) and the final directory (:meth:`_Trainer.finish`).
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
from typing import Any, Iterator, Sequence

from reward_core.ensemble import ENSEMBLE_FILE, Ensemble, EnsembleError, attach_ensemble, members_state
from reward_core.forward import pad_token_id
from reward_core.objectives import (
    GATE_FILE, GATE_PREFIX, ObjectivesError, attach_objectives, combine_heads, gate_state, without_gate,
)

from .config_flags import add_config_subcommand
from .data import DataError, DataSpec, PreferenceRecord, load_preferences, parse_data_spec
from .reward_config import DEFAULT_BASE_MODEL, RewardTrainingConfig, TrainingConfigError, config_from_args
from .reward_data import file_report, length_balance_weights, parse_eval_spec
from .scoring import ensemble_diversity, evaluate_pairs, length_sorted_chunks, sample_conversations, score_conversations, score_encoded
from .surgery import apply_train_mode, make_reward_module, set_objective_heads, under
from .utils import disable_dropout, progress_bar, replace_dir, resolve_device

log = logging.getLogger(__name__)

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
    "chat_template.jinja", "tokenizer.model", "generation_config.json", ENSEMBLE_FILE,
)


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


# --------------------------------------------------------------------------- CLI


def add_train_rm_parser(subparsers) -> argparse.ArgumentParser:
    """``reward train-rm``: one flag per :class:`RewardTrainingConfig` field."""
    return add_config_subcommand(
        subparsers, "train-rm", RewardTrainingConfig, run_train_rm,
        help="train a reward model on preference data",
        description=(
            "Train a reward model (Bradley-Terry / K-way rankings) whose output directory "
            "`reward serve --model NAME=OUTPUT_DIR` loads. Runs under torchrun for several processes."
        ),
    )


def run_train_rm(args: argparse.Namespace) -> int:
    from reward_core.model_dir import ModelDirError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        result = train_reward_model(config)
    except (DataError, TrainingConfigError, ModelDirError) as exc:
        print(f"reward train-rm: {exc}", file=sys.stderr)
        return 2
    if _Dist.from_env().main and result.finished:
        print(json.dumps({
            "output_dir": str(result.output_dir), "global_step": result.global_step, "best_step": result.best_step,
            "dev_results": {k: {"accuracy": v["accuracy"], "n_pairs": v["n_pairs"]} for k, v in result.dev_results.items()},
            "reward_mean": result.reward_mean, "reward_std": result.reward_std, "output_bytes": result.output_bytes,
        }, indent=2))
    return 0


# --------------------------------------------------------------------------- DDP set-up


@dataclass
class _Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> _Dist:
        world = os.environ.get("WORLD_SIZE", "1")
        return cls(
            rank=int(os.environ.get("RANK", "0")), world=int(world),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")), local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        )

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


@contextlib.contextmanager
def _process_group(device: str, dist: _Dist) -> Iterator[None]:
    """Under torchrun, the default process group for the run (nccl on CUDA, gloo on CPU), unless
    the caller already made one."""
    import torch
    import torch.distributed as td

    if not dist.enabled or td.is_initialized():
        yield
        return
    on_cuda = resolve_device(device, dist.local_rank, error=TrainingConfigError).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(dist.local_rank)
    td.init_process_group(backend="nccl" if on_cuda else "gloo", timeout=timedelta(hours=2))
    try:
        yield
    finally:
        td.destroy_process_group()


def train_reward_model(config: RewardTrainingConfig) -> TrainResult:
    """Train a reward model as configured and write its directory; see the module docstring."""
    config.validate()
    dist = _Dist.from_env()
    with _process_group(config.device, dist):
        return _Trainer(config, dist).run()


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


# --------------------------------------------------------------------------- the trainer


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

    # ---- set-up

    def setup(self) -> tuple[int, int | None]:
        """Device, output directory, data, model, step budget, optimizer and schedule, then the
        checkpoint to resume from if any. Returns (the step to start at, the step resumed from)."""
        import torch

        c = self.config
        self.device = resolve_device(c.device, self.dist.local_rank, error=TrainingConfigError)
        if self.device.type == "cpu":
            threads = c.num_threads or max(1, (os.cpu_count() or 1) // max(1, self.dist.local_world))
            torch.set_num_threads(threads)
        self.use_bf16 = c.bf16 == "true" or (
            c.bf16 == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self._check_metric_for_best()
        resume_path = self._prepare_output_dir()
        random.seed(c.seed)
        self._load_data(resuming=resume_path is not None)
        self._build_model()
        self.model.to(self.device)
        self.model.train()
        self._encode_eval_sets()
        self._fill_frozen_cache()
        self._plan_steps()
        self._build_optimizer()
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_eval: dict[str, Any] = {}
        step, resumed_from = 0, None
        if resume_path is not None:
            step = resumed_from = self.load_checkpoint(resume_path)
            self.say(f"[bold]resumed[/bold] from {resume_path} at step {step}")
            self.log_event({"type": "resume", "step": step, "path": str(resume_path)})
        else:
            torch.manual_seed(c.seed + self.dist.rank)
        self.log_event({
            "type": "start", "step": step, "total_steps": self.total_steps, "world_size": self.dist.world,
            "train_records": len(self.train_records), "micro_batches_per_epoch": self.micro_per_epoch,
            "bf16": self.use_bf16, "device": str(self.device), "params": self.param_counts,
        })
        return step, resumed_from

    def _check_metric_for_best(self) -> None:
        c = self.config
        if c.eval_data and c.metric_for_best not in ("mean_accuracy", "eval_loss"):
            names = [parse_eval_spec(t).name for t in c.eval_data]
            if c.metric_for_best not in names:
                raise TrainingConfigError(
                    f"metric_for_best={c.metric_for_best!r}: use mean_accuracy, eval_loss or an eval set name ({', '.join(names)})"
                )

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
        self.data_report: dict[str, Any] = {"train": file_report(train.report), "eval": {}}
        self.eval_sets: list[tuple[str, list[PreferenceRecord]]] = []
        for text in c.eval_data:
            spec = parse_eval_spec(text)
            if any(name == spec.name for name, _ in self.eval_sets):
                raise TrainingConfigError(f"eval set name {spec.name!r} is given twice; use NAME=PATH")
            result = load_preferences([spec], seed=c.seed, max_bad_fraction=c.max_bad_fraction)
            self.eval_sets.append((spec.name, result.records))
            self.data_report["eval"][spec.name] = file_report(result.report)[0]
        self.objectives = self._resolve_objectives(specs)
        self.pair_weights, balance = length_balance_weights(self.train_records, c.length_balance)
        self.use_weights = c.length_balance > 0
        self.member_weights = self._member_weights()
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

    def _member_weights(self):
        """--ensemble: [records, K] how often each member sees each record (float32): an online
        bootstrap, Poisson(1) per record and member from the member's own seed, or all ones.
        None without an ensemble."""
        import numpy as np

        c = self.config
        if not c.ensemble:
            return None
        if self.objectives is not None:
            raise TrainingConfigError("--ensemble and objectives do not go together yet: train one or the other")
        n = len(self.train_records)
        if c.ensemble_sample == "all":
            return np.ones((n, c.ensemble), dtype=np.float32)
        columns = [np.random.default_rng([c.seed, 7919, m]).poisson(1.0, size=n) for m in range(c.ensemble)]
        weights = np.stack(columns, axis=1).astype(np.float32)
        self.say(f"[bold]ensemble[/bold]: {c.ensemble} members, each on its own bootstrap sample "
                 f"(a member sees {float((weights > 0).mean()):.1%} of the records)")
        return weights

    def _resolve_objectives(self, specs: list[DataSpec]):
        """The model's objectives (None: one head): --objectives, else those the --data files name."""
        from reward_core.objectives import DEFAULT_OBJECTIVES, Objectives

        c = self.config
        named = [s.objective for s in specs if s.objective is not None]
        if not named and not c.objectives:
            return None
        names = list(c.objectives or [])
        if not names:
            names = [n for n in DEFAULT_OBJECTIVES if n in named] + [n for n in dict.fromkeys(named) if n not in DEFAULT_OBJECTIVES]
        unnamed = [s.name for s in specs if s.objective is None]
        if unnamed:
            raise TrainingConfigError(
                f"with objectives ({', '.join(names)}) every --data file names the head it trains; add "
                f":objective=NAME to {', '.join(unnamed[:3])}"
            )
        unknown = sorted({n for n in named if n not in names})
        if unknown:
            raise TrainingConfigError(f"--data names objectives {unknown} that --objectives ({', '.join(names)}) lacks")
        try:
            weights = tuple(c.combine_weights) if c.combine_weights is not None else None
            objectives = Objectives(names=tuple(names), combine=c.combine, weights=weights, gate_layer=c.gate_layer)
        except ObjectivesError as exc:
            raise TrainingConfigError(str(exc)) from exc
        counts = {n: sum(1 for r in self.train_records if r.objective == n) for n in names}
        empty = [n for n, k in counts.items() if k == 0]
        if empty:
            raise TrainingConfigError(f"objectives {empty} have no training data; name them in a --data file or drop them")
        self.say("[bold]objectives[/bold]: " + ", ".join(f"{n} ({k} records)" for n, k in counts.items())
                 + f"; combined by {objectives.combine}")
        return objectives

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

        from reward_core.loading import load_sequence_classifier, open_model_dir
        from reward_core.formatting import ENCODER_CHAT_TEMPLATE
        from reward_core.model_dir import RewardModelSpec

        c = self.config
        base_path, base_ref = resolve_base(c.base_model)
        self.base_path, self.base_ref = base_path, base_ref
        base_files = open_model_dir(base_path)
        tokenizer, base_spec = base_files.tokenizer, base_files.spec
        if c.train_mode in ("top", "lora") and (base_spec.base_model or (base_path / "adapter_config.json").is_file()):
            raise TrainingConfigError(
                f"train_mode={c.train_mode} saves weights relative to base_model, but {base_path} is itself "
                "partial (it has a base_model or a LoRA adapter); train from its base or use --train-mode full"
            )
        torch.manual_seed(c.seed)
        model = load_sequence_classifier(base_path, base_spec, dtype=torch.float32)
        model.config.num_labels = 1
        model.config.architectures = [type(model).__name__]
        if self.objectives is not None:
            if self.objectives.gated and base_spec.architecture != "encoder":
                raise TrainingConfigError(
                    "--combine gate reads the prompt apart from the response, which an encoder's text pair marks; "
                    "for a decoder use --combine weights"
                )
            set_objective_heads(model, len(self.objectives.names))
        if c.disable_dropout:
            disable_dropout(model)
        max_length = c.max_length or base_spec.max_length
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_length > limit:
            raise TrainingConfigError(f"max_length={max_length} exceeds the model's {limit} positions")
        use_chat_template = base_spec.use_chat_template
        if base_spec.architecture == "encoder" and not getattr(tokenizer, "chat_template", None):
            # An encoder reads (prompt, response) pairs; it trains on them as it always did
            # (multi-turn prompts as "User: ..." lines, so use_chat_template is off) and ships
            # ChatML so callers that format with the RM's template (verl) can; the service
            # parses that markup back into the pair.
            tokenizer.chat_template = ENCODER_CHAT_TEMPLATE
            use_chat_template = False
        self.ensemble = Ensemble(
            members=c.ensemble, top_layers=c.top_layers, aggregate=c.ensemble_aggregate,
            uncertainty_penalty=c.ensemble_uncertainty_penalty,
        ) if c.ensemble else None
        self.spec = RewardModelSpec(
            architecture=base_spec.architecture, max_length=max_length, use_chat_template=use_chat_template,
            read_reward_at=base_spec.read_reward_at, base_model=base_ref if c.train_mode in ("top", "lora") else None,
            objectives=self.objectives, ensemble=self.ensemble,
        )
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        # the HF model (LoRA layers injected in place), PEFT's wrapper (lora), the saved modules (top)
        self.model, self.peft_model, self.saved_prefixes = apply_train_mode(model, c, self.spec.architecture, base_ref)
        if self.objectives is not None:
            try:
                attach_objectives(self.model, self.objectives)  # after the train mode: the gate always trains
            except ObjectivesError as exc:  # e.g. a --gate-layer the base model has no block for
                raise TrainingConfigError(str(exc)) from exc
        if self.ensemble is not None:
            self._attach_members()
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        n_train = sum(p.numel() for _, p in self.trainable)
        n_total = sum(p.numel() for p in self.model.parameters())
        self.param_counts = {"trainable": n_train, "total": n_total}
        self.say(
            f"[bold]model[/bold]: {type(self.model).__name__} from {base_ref} ({self.spec.architecture}, max_length "
            f"{max_length}), train_mode={c.train_mode}: {n_train:,} of {n_total:,} parameters trainable"
        )

    def _attach_members(self) -> None:
        """--ensemble: K members, each a copy of the base's top blocks and pooler with a head from
        its own seed; they alone train. The HF model's own head is saved (untrained) so the
        directory loads over its base like any top-mode model."""
        import torch

        from .surgery import head_module_names

        for p in self.model.parameters():
            p.requires_grad_(False)
        self.saved_prefixes = head_module_names(self.model)  # before the members join the model's children
        try:
            attach_ensemble(self.model, self.ensemble)
        except EnsembleError as exc:
            raise TrainingConfigError(f"--ensemble: {exc}") from exc
        std = getattr(self.model.config, "initializer_range", 0.02)
        for m, member in enumerate(self.model.reward_members.members):
            generator = torch.Generator().manual_seed(self.config.seed * 1_000 + m)
            with torch.no_grad():
                member.classifier.weight.copy_(torch.randn(member.classifier.weight.shape, generator=generator) * std)
                member.classifier.bias.zero_()
            for p in member.parameters():
                p.requires_grad_(True)

    def _fill_frozen_cache(self) -> None:
        """--cache-frozen: the frozen blocks' output for every distinct training input, computed
        once here, or read back from --frozen-cache-dir where an earlier run stored it."""
        self.frozen_cache = None
        c = self.config
        if not c.cache_frozen:
            return
        from reward_core.formatting import encode_conversations

        from .frozen_cache import FrozenPrefixCache

        if self.dist.enabled:
            raise TrainingConfigError("--cache-frozen runs in one process; leave it off under torchrun")
        if self.spec.architecture != "encoder":
            raise TrainingConfigError("--cache-frozen is for encoders (BERT's family); leave it off for a decoder")
        cache = FrozenPrefixCache(self.model, c.top_layers, store=c.frozen_cache_dir)
        started = time.time()
        seen: set[tuple[Any, str]] = set()
        conversations = []
        for r in self.train_records:
            prompt_key = json.dumps(r.prompt, sort_keys=True)
            for resp in r.responses:
                if (prompt_key, resp) not in seen:
                    seen.add((prompt_key, resp))
                    conversations.append((r.prompt, resp))
        encoded = encode_conversations(conversations, self.tokenizer, self.spec)
        with progress_bar(c.progress, console=self._console()) as bar:
            task = bar.add_task("frozen blocks, once per input", total=len(encoded))
            n = cache.fill(encoded, self.pad_id, c.forward_chunk_tokens, self.device, progress=lambda k: bar.advance(task, k))
        chunks, _ = length_sorted_chunks(encoded[:8], self.pad_id, c.forward_chunk_tokens, self.device)
        diff = cache.check(self.spec.architecture, chunks[0])
        seconds = time.time() - started
        stored = f", {cache.read_from_store} read from {cache.store}" if cache.store is not None else ""
        self.say(f"[bold]frozen cache[/bold]: {n} distinct inputs through {cache.split} frozen blocks{stored} in {seconds:.0f} s "
                 f"(cached vs plain forward: max difference {diff:.2g})")
        self.log_event({"type": "frozen_cache", "inputs": n, "read_from_store": cache.read_from_store,
                        "frozen_blocks": cache.split, "seconds": seconds, "check_max_diff": diff})
        self.frozen_cache = cache

    def _encode_eval_sets(self) -> None:
        from reward_core.formatting import encode_conversations

        self._eval_encoded = {}
        if self.dist.main:
            for name, records in self.eval_sets:
                convs = [(r.prompt, resp) for r in records for resp in r.responses]
                self._eval_encoded[name] = encode_conversations(convs, self.tokenizer, self.spec)

    def _plan_steps(self) -> None:
        """Micro-batches per epoch (of this rank's shard) and the optimizer steps of the run."""
        c = self.config
        per_rank = math.ceil(len(self.train_records) / self.dist.world)
        self.micro_per_epoch = max(1, math.ceil(per_rank / c.per_device_batch_size))
        self.total_steps = c.max_steps or max(1, math.ceil(c.num_epochs * self.micro_per_epoch / c.gradient_accumulation_steps))
        self._shard_cache: tuple[int, list[int]] = (-1, [])

    def _build_optimizer(self) -> None:
        """AdamW (no weight decay on biases and norms) and the warm-up + decay schedule."""
        import torch
        from transformers import get_scheduler

        c = self.config
        is_gate = lambda name: under(name, [GATE_PREFIX])  # noqa: E731
        decay = [p for n, p in self.trainable if p.ndim >= 2 and not is_gate(n)]
        no_decay = [p for n, p in self.trainable if p.ndim < 2 and not is_gate(n)]
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        gate = [p for n, p in self.trainable if is_gate(n)]
        if gate:
            groups.append({"params": gate, "weight_decay": 0.0, "lr": c.learning_rate * c.gate_learning_rate_multiplier})
        self.optimizer = torch.optim.AdamW(groups, lr=c.learning_rate)
        warmup = math.ceil(c.warmup_ratio * self.total_steps)
        name = "constant_with_warmup" if c.lr_scheduler == "constant" else c.lr_scheduler
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)

    def _wrap_module(self):
        """The module the step runs: the reward forward as an nn.Module, in DDP under torchrun."""
        module = make_reward_module(self.model, self.spec.architecture, self.frozen_cache)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.ddp_find_unused_parameters,
            )
        return module

    # ---- output format

    def save_model_dir(self, target: Path, extra: dict[str, Any], reward_stats: tuple[float, float] | None = None) -> None:
        """Write the service-loadable directory atomically: tmp dir, then rename over ``target``."""
        from dataclasses import replace

        import torch
        from safetensors.torch import save_file

        with replace_dir(target) as tmp:
            mode = self.config.train_mode
            gate = gate_state(self.model)
            if gate:
                save_file({k: v.to("cpu", copy=True) for k, v in gate.items()}, str(tmp / GATE_FILE), metadata={"format": "pt"})
            members = members_state(self.model)
            if members:
                save_file({k: v.to("cpu", copy=True) for k, v in members.items()}, str(tmp / ENSEMBLE_FILE), metadata={"format": "pt"})
            if mode == "full":
                with without_gate(self.model):
                    self.model.save_pretrained(tmp)
            elif mode == "top":
                dtype = getattr(torch, self.config.save_dtype)
                state = {
                    k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype, copy=True).contiguous()
                    for k, v in self.model.state_dict().items() if under(k, self.saved_prefixes)
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
        """``checkpoints/last``: trainable weights, optimizer, scheduler, every rank's RNG and the
        step, written atomically by rank 0."""
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

        last = self.out / CHECKPOINTS / LAST
        with replace_dir(last) as tmp:
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
        conversations, better, worse, group, margin, p, weight, objective = [], [], [], [], [], [], [], []
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
                if self.objectives is not None:
                    objective.append(self.objectives.index(r.objective))
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
            "objective": as_t(objective, torch.long) if self.objectives is not None else None,
            # [pairs, K]: how much each member weighs each pair (its bootstrap count of the record)
            "member_weight": as_t(self.member_weights[np.asarray(indices)][np.asarray(group)], torch.float32)
            if self.member_weights is not None else None,
        }
    # ---- training step

    def compute_loss(self, outputs, batch):
        """(loss, pair deltas of the reward) of a micro-batch: per-record mean of the pair losses,
        averaged over records (weighted by length balancing when on), plus reward centring when
        asked for.

        With objectives, each pair's loss is on its objective's head only, and for a gate a second
        term trains the gate on every pair through the combined reward of the heads held fixed
        (detached), so a head moves only on its own data; with --gate-routing-weight the gate is
        also taught each pair's objective (cross-entropy), and with --gate-pair-consistency-weight to
        weigh a pair's two answers alike."""
        import torch

        from .losses import center_rewards_penalty, grouped_mean, pair_deltas, pair_losses

        c = self.config
        heads, features = outputs
        heads = heads.float()
        if self.ensemble is not None:
            # each member on its own bootstrap sample; members are independent, so their losses add
            loss = heads.new_zeros(())
            for m in range(heads.shape[1]):
                member_delta = pair_deltas(heads[:, m], batch["better"], batch["worse"])
                weight = batch["member_weight"][:, m]
                if batch["weight"] is not None:
                    weight = weight * batch["weight"]
                loss = loss + grouped_mean(pair_losses(member_delta, batch["margin"], batch["p"]), batch["group"], batch["n_groups"], weight)
            delta = pair_deltas(heads.mean(dim=-1), batch["better"], batch["worse"])
        elif self.objectives is None:
            rewards = heads[:, 0]
            delta = pair_deltas(rewards, batch["better"], batch["worse"])
            losses = pair_losses(delta, batch["margin"], batch["p"])
            loss = grouped_mean(losses, batch["group"], batch["n_groups"], batch["weight"])
        else:
            # each pair on its own objective's head
            column = batch["objective"]
            head_delta = heads[batch["better"], column] - heads[batch["worse"], column]
            losses = pair_losses(head_delta, batch["margin"], batch["p"])
            loss = grouped_mean(losses, batch["group"], batch["n_groups"], batch["weight"])
            if self.objectives.gated:
                # the gate learns from every pair through the heads held fixed
                gate = getattr(self.model, GATE_PREFIX)
                rewards = combine_heads(heads.detach(), self.objectives, gate, features)[:, 0]
                delta = pair_deltas(rewards, batch["better"], batch["worse"])
                gate_losses = pair_losses(delta, batch["margin"], batch["p"])
                if c.gate_routing_weight or c.gate_pair_consistency_weight:
                    log_weights = torch.log_softmax(gate(features).float(), dim=-1)
                if c.gate_routing_weight:
                    # supervised routing: the source of a pair names the objective its prompt is about;
                    # both items of the pair carry the prompt, so both rows count
                    routing = -(log_weights[batch["better"], column] + log_weights[batch["worse"], column]) / 2
                    gate_losses = gate_losses + c.gate_routing_weight * routing
                if c.gate_pair_consistency_weight:
                    # one prompt, one mixture: what differs between a pair's two weightings is the answer
                    # steering the gate, which lets a pair be judged by two heads on different scales
                    weights = log_weights.exp()
                    apart = (weights[batch["better"]] - weights[batch["worse"]]).pow(2).sum(dim=-1)
                    gate_losses = gate_losses + c.gate_pair_consistency_weight * apart
                loss = loss + grouped_mean(gate_losses, batch["group"], batch["n_groups"], batch["weight"])
            else:
                rewards = combine_heads(heads, self.objectives)[:, 0]
                delta = pair_deltas(rewards, batch["better"], batch["worse"])
        if c.center_rewards_coefficient:
            loss = loss + c.center_rewards_coefficient * center_rewards_penalty(heads if self.objectives else rewards)
        return loss, delta

    def train_step(self, module, step: int) -> float:
        """Optimizer step ``step + 1``: gradient_accumulation_steps micro-batches (DDP syncs the
        gradients on the last one only), clipping, optimizer and schedule. Adds the micro-batches'
        loss, accuracy and pair counts to the logging window; returns the gradient norm."""
        import torch

        from .losses import pair_accuracy

        c = self.config
        accum = c.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        for a in range(accum):
            batch = self.build_batch(self.micro_batch(step * accum + a))
            sync = module.no_sync() if self.dist.enabled and a < accum - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    outputs = module(batch["chunks"], batch["order"])
                loss, delta = self.compute_loss(outputs, batch)
                (loss / accum).backward()
            self.window += torch.tensor([
                float(loss.detach()), float(pair_accuracy(delta.detach()).sum()), delta.numel(), 1.0,
            ], dtype=torch.float64)
        params = [p for _, p in self.trainable]
        if c.max_grad_norm and c.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def _autocast(self):
        import torch

        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reset_window(self) -> None:
        import torch

        self.window = torch.zeros(4, dtype=torch.float64)  # loss sum, accuracy sum, pairs, micro-batches
        self.window_started = time.time()

    def log_train(self, step: int, grad_norm: float) -> None:
        """Every logging_steps (and at the last step): the window's loss and accuracy over all
        ranks, to metrics.jsonl and the progress bar."""
        c = self.config
        if not (step % c.logging_steps == 0 or step == self.total_steps):
            self._update_progress(step, None)
            return
        stats = self.window.clone()
        if self.dist.enabled:
            import torch.distributed as td

            td.all_reduce(stats)
        entry = {
            "type": "train", "step": step,
            "epoch": round(step * c.gradient_accumulation_steps / self.micro_per_epoch, 4),
            "loss": float(stats[0] / max(1.0, stats[3])),
            "accuracy": float(stats[1] / max(1.0, stats[2])),
            "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "pairs": int(stats[2]), "seconds": round(time.time() - self.window_started, 3),
        }
        self.history.append(entry)
        self.log_event(entry)
        self._update_progress(step, entry)
        self._reset_window()

    # ---- evaluation

    def evaluate(self, step: int) -> dict[str, dict[str, Any]]:
        """Rank 0 scores every eval set; returns {name: metrics}."""
        results: dict[str, dict[str, Any]] = {}
        if not self.dist.main:
            return results
        for name, records in self.eval_sets:
            encoded = self._eval_encoded[name]
            columns = score_encoded(
                self.model, self.spec, encoded, self.pad_id, self.config.per_device_eval_batch_size, self.device, columns=True,
            )
            per_record, at = [], 0
            for r in records:
                per_record.append(columns[at:at + len(r.responses)])
                at += len(r.responses)
            results[name] = evaluate_pairs(records, [c[:, 0] for c in per_record])
            for k, objective in enumerate(self.spec.objective_names):  # each head on this set, for learning curves
                results[name].setdefault("heads", {})[objective] = evaluate_pairs(records, [c[:, 1 + k] for c in per_record])["accuracy"]
            if self.ensemble is not None:
                results[name]["ensemble"] = ensemble_diversity(records, per_record)
            self.log_event({"type": "eval", "step": step, "eval_set": name, **results[name]})
        if results:
            lines = [f"[bold]eval @ step {step}[/bold]"]
            for name, r in results.items():
                heads = "".join(f", {k} {v:.4f}" for k, v in r.get("heads", {}).items())
                lines.append(
                    f"  {name:<28} accuracy {r['accuracy']:.4f}  (longer-wins {r['longer_wins_accuracy']:.4f}, "
                    f"loss {r['loss']:.4f}, {r['n_pairs']} pairs{heads})"
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
    def eval_and_keep_best(self, step: int) -> None:
        """Evaluate; when metric_for_best improves, keep the weights (checkpoints/best-weights)
        and a loadable copy of the model (best/)."""
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

    # ---- main

    def run(self) -> TrainResult:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
        try:
            return self._run()
        finally:
            hf_logging.enable_progress_bar()

    def _run(self) -> TrainResult:
        c = self.config
        started = time.time()
        step, resumed_from = self.setup()
        module = self._wrap_module()
        self.history: list[dict[str, Any]] = []
        self._reset_window()
        stopped = False
        last_eval_step = None
        self._start_progress(step)
        try:
            while step < self.total_steps:
                grad_norm = self.train_step(module, step)
                step += 1
                self.log_train(step, grad_norm)
                if self.eval_sets and ((c.eval_steps and step % c.eval_steps == 0) or step == self.total_steps):
                    self.eval_and_keep_best(step)
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
            train_history=self.history, resumed_from_step=resumed_from,
        )
        if stopped:
            self.say(f"stopped after step {step} (stop_after_steps)")
            return result
        if self.eval_sets and last_eval_step != step:
            self.eval_and_keep_best(step)
        if c.keep_checkpoints:
            self.save_checkpoint(step)
        if self.dist.main:
            self.finish(step, result, started)
        self.barrier()
        return result

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

    # ---- the final directory

    def finish(self, step: int, result: TrainResult, started: float) -> None:
        """Rank 0: restore the best weights, measure the reward statistics, install the model
        files in output_dir (reward_model.json last) and fill in ``result``."""
        c = self.config
        self._restore_best(step)
        final_step = self.best_step if (self.eval_sets and self.best_step is not None) else step
        n_responses, mean, std = self._reward_stats()
        extra = self._extra(final_step, self.best_eval)
        extra["training"]["reward_stats"] = {"n_responses": n_responses, "mean": mean, "std": std}
        extra["training"]["finished_at_step"] = step
        extra["training"]["seconds"] = round(time.time() - started, 1)
        self._install_model_files(extra, (mean, std))
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

    def _restore_best(self, step: int) -> None:
        best_path = self.out / CHECKPOINTS / BEST_WEIGHTS
        if self.eval_sets and self.best_step is not None and self.best_step != step and best_path.is_file():
            self.say(f"restoring the best checkpoint (step {self.best_step}, {self.config.metric_for_best} = {self.best_metric:.4f})")
            self._load_trainable_state(best_path)

    def _reward_stats(self) -> tuple[int, float, float]:
        """(responses scored, mean, std) of the final model's rewards on a seeded sample of
        training responses: the service's ``normalize`` statistics."""
        c = self.config
        convs = sample_conversations(self.train_records, c.reward_stats_samples, c.seed)
        rewards = score_conversations(self.model, self.tokenizer, self.spec, convs,
                                      batch_size=c.per_device_eval_batch_size, device=self.device)
        return int(len(rewards)), float(rewards.mean()), float(rewards.std())

    def _install_model_files(self, extra: dict[str, Any], reward_stats: tuple[float, float]) -> None:
        """The model files into output_dir, reward_model.json (the "finished" mark) last."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "reward_model.json").unlink(missing_ok=True)
        staging = self.out / ".final"
        self.save_model_dir(staging, extra, reward_stats=reward_stats)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "reward_model.json"):
            os.replace(item, self.out / item.name)
        staging.rmdir()

    # ---- progress bar

    def _start_progress(self, step: int) -> None:
        if not (self.dist.main and self.config.progress):
            return
        self.progress = progress_bar(console=self._console(), stats=True, keep=True)
        self.progress.start()
        self._task = self.progress.add_task("[bold]train-rm", total=self.total_steps, completed=step, stats="")

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
