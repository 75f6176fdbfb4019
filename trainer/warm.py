"""``reward export-warm``: an ensemble's members, or separate runs of one recipe, averaged weight
by weight into one ordinary reward model (WARM).

Ramé et al. 2024 ("WARM: On the Benefits of Weight Averaged Reward Models") average reward models
fine-tuned from one shared initialisation: the weight average keeps much of what an ensemble gains
(robustness to distribution shift and to noisy labels) and costs one model at inference. The
members of ``reward train-rm --ensemble K`` fit that recipe: they start from the same pretrained
top blocks and differ by their heads' seeds and their bootstrap samples.

The output is a model directory with no ``ensemble`` block. The averaged top blocks, pooler and
head sit at the HF model's own names (``bert.encoder.layer.<N-T+j>.…``, ``bert.pooler.…``,
``classifier.…``): a top-mode partial state dict over the source's ``base_model`` (with any other
tensor the source lays over its base), or a full checkpoint when the source is one. ``reward
serve``, ``reward export-onnx`` and everything else load it as the single model it is.

Its ``reward_model.json`` keeps the source's formatting and ``max_length``, takes the version
``<source version>+warm`` and a ``warm`` block that says where it came from (the source, its
version, the members averaged). It has no ``reward_mean``/``reward_std`` and no ``dev_results``:
the source's describe the members' mean reward, not the averaged weights' (they are kept in the
``warm`` block, as ``source_dev_results`` and within ``source_training``); ``reward eval`` measures
the WARM model itself.

Several ``--model`` directories (``export_warm_runs``): single models trained by one recipe from
one base, e.g. at other seeds, which is WARM's own setting. Every tensor of their safetensors
files is averaged (the gate's too); what differs between them beyond the values of those tensors
is refused. ``--stats-data`` measures the averaged model's reward statistics for ``normalize``.
``--gate-temperature`` sets the averaged model's ``objectives.gate_temperature`` (its gate's
softmax temperature, reward_core.objectives) before those statistics are measured.

Before it returns, the export loads the written directory as the service does and scores sample
items: averaging one member must give that member's reward (its column of the ensemble), or the
export is refused; for several members the summary reports how far the WARM reward is from the
members' mean reward on those items.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The reward of one member averaged alone against the same member inside its ensemble: the same
# weights, computed by the HF model's forward instead of the members' own block code.
SINGLE_MEMBER_TOLERANCE = 1e-4


class WarmExportError(RuntimeError):
    """The source cannot be averaged, or the averaged directory does not compute what it should."""


def parse_members(text: str) -> list[int]:
    """``--members 0,2,4``: member indices, in the order given."""
    try:
        members = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give member indices separated by commas, such as 0,2,4, not {text!r}") from None
    return members


def add_export_warm_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-warm", help="average an ensemble's members, or several training runs, into one single reward model (WARM)",
        description=__doc__.split("\n\n")[0].replace("``", "'"),
    )
    parser.add_argument("--model", required=True, type=Path, action="append",
                        help="ensemble model directory (reward_model.json with an \"ensemble\" block); or, given two or "
                             "more times, single models trained by the same recipe from the same base (e.g. other seeds), "
                             "whose trained tensors are averaged")
    parser.add_argument("--out", required=True, type=Path, help="directory to write (must be empty or absent)")
    parser.add_argument("--members", type=parse_members, default=None, metavar="M,M,...",
                        help="average only these members, by index from 0 (default: all)")
    parser.add_argument("--stats-data", action="append", default=None, metavar="PATH[:WEIGHT][:MAX_ROWS]",
                        help="with several --model: preference data whose responses the averaged model scores for its "
                             "reward_mean/reward_std (what the service's normalize uses); repeat for a mix, as train-rm's "
                             "--data (default: none, and normalize is refused for the averaged model)")
    parser.add_argument("--stats-samples", type=int, default=2000, help="responses scored for --stats-data")
    parser.add_argument("--gate-temperature", type=float, default=None, metavar="T",
                        help="with several --model whose heads combine by a gate: serve the averaged model's gate at "
                             "softmax temperature T (objectives.gate_temperature; below 1 sharper; default: as the runs)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code shipped in the directory")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickle (.bin) weights")
    parser.set_defaults(func=run_export_warm)


def run_export_warm(args: argparse.Namespace) -> int:
    from reward_core.model_dir import ModelDirError

    from .data import DataError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        if len(args.model) > 1:
            if args.members is not None:
                raise WarmExportError("--members picks members of one ensemble; with several --model every model is averaged")
            summary = export_warm_runs(
                args.model, args.out, stats_data=args.stats_data or (), stats_samples=args.stats_samples,
                gate_temperature=args.gate_temperature,
                overwrite=args.overwrite, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
            )
        else:
            if args.stats_data:
                raise WarmExportError("--stats-data is for averaging several --model runs; an ensemble's WARM model is "
                                      "measured by reward eval")
            if args.gate_temperature is not None:
                raise WarmExportError("--gate-temperature is for averaging several --model runs whose heads combine by a "
                                      "gate; for one model, set objectives.gate_temperature in its reward_model.json")
            summary = export_warm(
                args.model[0], args.out, members=args.members, overwrite=args.overwrite,
                trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
            )
    except (ModelDirError, WarmExportError, DataError) as exc:
        print(f"reward export-warm: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def _base_model_ref(ref: str | None, model_dir: Path, out_dir: Path) -> str | None:
    """The source's ``base_model`` as the output directory must write it: a relative path is
    relative to the model directory, so it is rewritten to reach the same base from ``out_dir``."""
    if ref is None or ref.startswith("pypi:") or Path(ref).is_absolute():
        return ref
    return os.path.relpath((model_dir / ref).resolve(), out_dir.resolve())


def _check_sources_and_out(sources: Sequence[Path], out_dir: Path, overwrite: bool) -> None:
    """What both exports refuse before reading any weights: an ONNX source, and an ``--out`` that
    is a source or holds files it may not replace."""
    from reward_core.model_dir import is_onnx_export

    for source in sources:
        if is_onnx_export(source):
            raise WarmExportError(
                f"{source} is an ONNX export, whose weights cannot be averaged here; average the torch directory "
                "it was exported from, then export the WARM model with reward export-onnx"
            )
    if out_dir.resolve() in {source.resolve() for source in sources}:
        raise WarmExportError("--out must not be one of the --model directories")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise WarmExportError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")


def _tensor_names(paths: Sequence[Path]) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in paths:
        with safe_open(path, framework="pt") as weights:
            names.update(weights.keys())
    return names


def export_warm(
    model_dir: str | Path, out_dir: str | Path, *, members: Sequence[int] | None = None, overwrite: bool = False,
    trust_remote_code: bool = False, allow_pickle: bool = False,
) -> dict[str, Any]:
    """Write the WARM model of the ensemble in ``model_dir`` (its ``members``, all by default) to
    ``out_dir``; returns a summary."""
    import numpy as np
    from safetensors.torch import save_file

    from reward_core.backends import TorchBackend
    from reward_core.ensemble import EnsembleError, averaged_members_state, member_parts, without_members
    from reward_core.formatting import encode_conversations
    from reward_core.forward import pad_batch, pad_token_id
    from reward_core.loading import hf_weight_files, open_model_dir

    from .export import SAMPLE_CONVERSATIONS
    from .utils import replace_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    files = open_model_dir(model_dir, trust_remote_code=trust_remote_code, name="export-warm")
    spec = files.spec
    _check_sources_and_out([model_dir], out_dir, overwrite)
    if spec.ensemble is None:
        raise WarmExportError(
            f"{model_dir} is not an ensemble (its reward_model.json has no \"ensemble\" block): WARM averages the "
            "members of a model trained with reward train-rm --ensemble K; a single model is already one model"
        )

    source = TorchBackend(model_dir, spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model = source.model
    chosen = list(range(spec.ensemble.members)) if members is None else list(members)
    try:
        averaged = averaged_members_state(model, chosen)
    except EnsembleError as exc:
        raise WarmExportError(f"{model_dir}: {exc}") from exc
    # The source's rewards on the sample items before its weights change: [items, 1 + K].
    batch = pad_batch(encode_conversations(SAMPLE_CONVERSATIONS, files.tokenizer, spec), pad_token_id(files.tokenizer))
    columns = source.score_batch(batch)

    partial = spec.base_model is not None and not (model_dir / "adapter_config.json").is_file()
    version = f"{spec.version}+warm" + ("" if members is None else "-members-" + "-".join(map(str, chosen)))
    extra = {k: v for k, v in spec.extra.items() if k not in ("training", "dev_results")}
    extra["warm"] = {
        "method": "WARM (Ramé et al. 2024): the members' top blocks, pooler and head averaged parameter by parameter",
        "source": str(model_dir.resolve()),
        "source_version": spec.version,
        "source_ensemble": spec.ensemble.to_json(),
        "members_averaged": chosen,
        "modules_averaged": sorted(member_parts(model).values()),
        "source_training": spec.extra.get("training"),
        "source_dev_results": spec.extra.get("dev_results"),
    }
    warm_spec = replace(
        spec, ensemble=None, reward_mean=None, reward_std=None,
        base_model=_base_model_ref(spec.base_model, model_dir, out_dir) if partial else None,
        version=version, extra=extra,
    )

    with without_members(model):
        laid = model.load_state_dict(averaged, strict=False)
        if laid.unexpected_keys:  # the names come from the model's own modules, so this is a bug
            raise WarmExportError(f"averaged tensors the model does not have: {laid.unexpected_keys[:5]}")
        state = model.state_dict()
        if partial:
            # The source's own tensors over its base, the averaged ones in place of the members'
            # (in top mode the HF model's untrained head; the frozen top blocks are the base's).
            kept = _tensor_names(hf_weight_files(model_dir)) | set(averaged)
            state = {k: v for k, v in state.items() if k in kept}
        with replace_dir(out_dir) as tmp:
            try:
                if partial:
                    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()},
                              str(tmp / "model.safetensors"), metadata={"format": "pt"})
                    model.config.save_pretrained(tmp)
                else:
                    model.save_pretrained(tmp)
                files.tokenizer.save_pretrained(tmp)
                warm_spec.save(tmp)
                written = open_model_dir(tmp, trust_remote_code=trust_remote_code, name="export-warm")
                warm = TorchBackend(tmp, written.spec, trust_remote_code=trust_remote_code).score_batch(batch)
                members_mean = columns[:, [1 + m for m in chosen]].mean(axis=-1)
                difference = float(np.abs(warm - members_mean).max())
                if len(chosen) == 1 and difference > SINGLE_MEMBER_TOLERANCE:
                    raise WarmExportError(
                        f"member {chosen[0]} written alone gives rewards {difference:.2e} away from its own in the "
                        f"ensemble (> {SINGLE_MEMBER_TOLERANCE}); the export is not usable. Please report the model type "
                        f"({getattr(model.config, 'model_type', '?')})"
                    )
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    summary = {
        "model": str(model_dir), "out": str(out_dir), "version": version, "members_averaged": chosen,
        "source_members": spec.ensemble.members, "top_layers": spec.ensemble.top_layers,
        "layout": f"top-mode partial state dict over {warm_spec.base_model}" if partial else "full checkpoint",
        "modules_averaged": extra["warm"]["modules_averaged"],
        # How far averaging the weights lands from averaging the rewards, on the sample items.
        "max_abs_difference_to_members_mean_reward": difference,
    }
    log.info("exported the WARM model of %s to %s: %s", model_dir, out_dir, summary)
    return summary


# What makes two model directories the same model to a caller: runs averaged must agree on these.
SAME_MODEL_FIELDS = ("architecture", "max_length", "use_chat_template", "read_reward_at", "value_head_prefix", "objectives")


def _averaged_file(paths: Sequence[Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors of one safetensors file name across the runs, averaged in float32 and stored in
    the first run's dtype; integer tensors (position ids and other buffers) must be equal. Also
    returns the file's metadata (the first run's)."""
    import torch
    from safetensors import safe_open

    handles = [safe_open(path, framework="pt") for path in paths]
    names = sorted(handles[0].keys())
    for path, handle in zip(paths[1:], handles[1:]):
        if sorted(handle.keys()) != names:
            differ = sorted(set(names) ^ set(handle.keys()))
            raise WarmExportError(
                f"{path} holds other tensors than {paths[0]} (e.g. {differ[:3]}): only runs of one recipe (the same "
                "train mode, top layers and heads) can be averaged"
            )
    averaged: dict[str, Any] = {}
    for name in names:
        tensors = [handle.get_tensor(name) for handle in handles]
        first = tensors[0]
        for path, tensor in zip(paths[1:], tensors[1:]):
            if tensor.shape != first.shape:
                raise WarmExportError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, {paths[0]} has "
                                      f"{tuple(first.shape)}; these runs are not one architecture")
        if first.is_floating_point():
            averaged[name] = torch.stack([t.float() for t in tensors]).mean(0).to(first.dtype).contiguous()
        elif all(torch.equal(first, t) for t in tensors[1:]):
            averaged[name] = first.contiguous()
        else:
            raise WarmExportError(f"integer tensor {name} differs between the runs and cannot be averaged")
    return averaged, handles[0].metadata() or {}


def export_warm_runs(
    model_dirs: Sequence[str | Path], out_dir: str | Path, *, stats_data: Sequence[str] = (), stats_samples: int = 2000,
    gate_temperature: float | None = None, overwrite: bool = False, trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Write the WARM model of several single reward models trained by one recipe from one base
    (seeds, data orders, bootstrap samples): every tensor their safetensors files hold, averaged.
    ``gate_temperature`` sets the averaged model's gate temperature. With ``stats_data`` the
    averaged model's reward statistics are measured; returns a summary."""
    import numpy as np
    from safetensors.torch import save_file

    from reward_core.backends import TorchBackend
    from reward_core.formatting import encode_conversations
    from reward_core.forward import pad_batch, pad_token_id
    from reward_core.loading import open_model_dir
    from reward_core.model_dir import resolve_base_model

    from .export import SAMPLE_CONVERSATIONS
    from .scoring import sample_conversations, score_conversations
    from .utils import replace_dir

    dirs = [Path(d) for d in model_dirs]
    out_dir = Path(out_dir)
    if len(dirs) < 2:
        raise WarmExportError("averaging runs needs two or more --model directories")
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise WarmExportError("a --model directory is given more than once; each run counts once in the average")
    _check_sources_and_out(dirs, out_dir, overwrite)
    if stats_samples < 1:
        raise WarmExportError("--stats-samples must be at least 1")
    from .data import load_preferences, parse_data_spec

    for text in stats_data:  # before any run is loaded: a typo should not cost the averaging first
        if not Path(parse_data_spec(text).path).is_file():
            raise WarmExportError(f"--stats-data {text!r}: no such file")

    opened = []
    for d in dirs:
        files = open_model_dir(d, trust_remote_code=trust_remote_code, name="export-warm")
        if files.spec.ensemble is not None:
            raise WarmExportError(f"{d} is an ensemble: average its members with reward export-warm --model {d} alone, "
                                  "then average that with the other runs")
        if (d / "adapter_config.json").is_file():
            raise WarmExportError(f"{d} is a LoRA adapter; averaging adapters' factors is not averaging their weights: "
                                  "merge each run into its base first")
        opened.append(files)
    def base_of(spec: Any, model_dir: Path) -> Path | None:  # where the run's base is, however it was named
        if spec.base_model is None:
            return None
        return resolve_base_model(spec.base_model, model_dir, trust_remote_code=trust_remote_code).resolve()

    first = opened[0].spec
    for d, files in zip(dirs[1:], opened[1:]):
        for name in SAME_MODEL_FIELDS:
            if getattr(files.spec, name) != getattr(first, name):
                raise WarmExportError(
                    f"{d} differs from {dirs[0]} in {name} ({getattr(files.spec, name)!r} against "
                    f"{getattr(first, name)!r}): only runs of one recipe can be averaged"
                )
        if base_of(files.spec, d) != base_of(first, dirs[0]):
            raise WarmExportError(
                f"{d} is laid over base {files.spec.base_model!r}, {dirs[0]} over {first.base_model!r}: WARM averages "
                "fine-tunes of one initialisation"
            )
    weight_files = [sorted(p.name for p in d.glob("*.safetensors")) for d in dirs]
    if not weight_files[0]:
        raise WarmExportError(f"{dirs[0]} has no safetensors weights (pickle .bin checkpoints are not averaged; "
                              "re-save them with safetensors)")
    for d, names in zip(dirs[1:], weight_files[1:]):
        if names != weight_files[0]:
            raise WarmExportError(f"{d} has weight files {names}, {dirs[0]} has {weight_files[0]}: these runs are "
                                  "not one recipe")

    # Averaged (and checked tensor by tensor) before any run is loaded, so a mismatch is named as such.
    averaged_files = {name: _averaged_file([d / name for d in dirs]) for name in weight_files[0]}
    batch = pad_batch(encode_conversations(SAMPLE_CONVERSATIONS, opened[0].tokenizer, first),
                      pad_token_id(opened[0].tokenizer))
    # Each run's rewards on the sample items ([items] or [items, 1 + heads]), for the summary.
    runs_mean = np.mean([
        TorchBackend(d, files.spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle).score_batch(batch)
        for d, files in zip(dirs, opened)
    ], axis=0)

    sources = []
    for d, files in zip(dirs, opened):
        training = files.spec.extra.get("training") or {}
        sources.append({
            "path": str(d), "version": files.spec.version,  # as given: no machine-specific prefix
            "seed": (training.get("config") or {}).get("seed"), "dev_results": files.spec.extra.get("dev_results"),
            "training": files.spec.extra.get("training"),  # each run's config, data report and time: the provenance
        })
    extra = {k: v for k, v in first.extra.items() if k not in ("training", "dev_results")}
    extra["warm"] = {
        "method": "WARM (Ramé et al. 2024): runs of one recipe from one base, averaged parameter by parameter",
        "sources": sources, "files_averaged": weight_files[0],
    }
    version = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"+warm-of-{len(dirs)}"
    objectives = first.objectives
    if gate_temperature is not None:
        from reward_core.objectives import ObjectivesError

        if objectives is None or not objectives.gated:
            raise WarmExportError(f"--gate-temperature: {dirs[0]}'s heads do not combine by a gate")
        try:
            objectives = replace(objectives, gate_temperature=gate_temperature)
        except ObjectivesError as exc:
            raise WarmExportError(f"--gate-temperature: {exc}") from None
    warm_spec = replace(first, reward_mean=None, reward_std=None, ensemble=None, objectives=objectives,
                        base_model=_base_model_ref(first.base_model, dirs[0], out_dir), version=version, extra=extra)
    tensors = 0
    with replace_dir(out_dir) as tmp:
        try:
            for name, (averaged, metadata) in averaged_files.items():
                tensors += len(averaged)
                save_file(averaged, str(tmp / name), metadata=metadata or {"format": "pt"})
            shutil.copy2(dirs[0] / "config.json", tmp / "config.json")
            opened[0].tokenizer.save_pretrained(tmp)
            warm_spec.save(tmp)
            written = open_model_dir(tmp, trust_remote_code=trust_remote_code, name="export-warm")
            backend = TorchBackend(tmp, written.spec, trust_remote_code=trust_remote_code)
            difference = float(np.abs(backend.score_batch(batch) - runs_mean).max())
            stats = None
            if stats_data:
                records = load_preferences(list(stats_data), seed=0).records
                conversations = sample_conversations(records, stats_samples, seed=0)
                rewards = score_conversations(backend.model, written.tokenizer, written.spec, conversations)
                stats = {"n_responses": int(len(rewards)), "mean": float(rewards.mean()), "std": float(rewards.std()),
                         "data": list(stats_data)}
                extra["warm"]["reward_stats"] = stats
                replace(warm_spec, reward_mean=stats["mean"], reward_std=stats["std"], extra=extra).save(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    summary = {
        "models": [str(d) for d in dirs], "out": str(out_dir), "version": version,
        "files_averaged": weight_files[0], "tensors_averaged": tensors,
        "layout": f"partial state dict over {warm_spec.base_model}" if warm_spec.base_model else "full checkpoint",
        # How far averaging the weights lands from averaging the runs' rewards, on the sample items.
        "max_abs_difference_to_runs_mean_reward": difference,
        "reward_stats": stats,
    }
    log.info("exported the WARM model of %d runs to %s: %s", len(dirs), out_dir, summary)
    return summary
