"""``reward export-warm``: an ensemble's members averaged, weight by weight, into one ordinary
reward model (WARM).

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
        "export-warm", help="average an ensemble's members into one single reward model (WARM)",
        description=__doc__.split("\n\n")[0].replace("``", "'"),
    )
    parser.add_argument("--model", required=True, type=Path, help="ensemble model directory (reward_model.json with an \"ensemble\" block)")
    parser.add_argument("--out", required=True, type=Path, help="directory to write (must be empty or absent)")
    parser.add_argument("--members", type=parse_members, default=None, metavar="M,M,...",
                        help="average only these members, by index from 0 (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code shipped in the directory")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickle (.bin) weights")
    parser.set_defaults(func=run_export_warm)


def run_export_warm(args: argparse.Namespace) -> int:
    from reward_core.model_dir import ModelDirError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        summary = export_warm(
            args.model, args.out, members=args.members, overwrite=args.overwrite,
            trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        )
    except (ModelDirError, WarmExportError) as exc:
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
    from reward_core.model_dir import is_onnx_export

    from .export import SAMPLE_CONVERSATIONS
    from .utils import replace_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    files = open_model_dir(model_dir, trust_remote_code=trust_remote_code, name="export-warm")
    spec = files.spec
    if is_onnx_export(model_dir):
        raise WarmExportError(
            f"{model_dir} is an ONNX export, whose weights cannot be averaged here; average the torch directory "
            "it was exported from, then export the WARM model with reward export-onnx"
        )
    if spec.ensemble is None:
        raise WarmExportError(
            f"{model_dir} is not an ensemble (its reward_model.json has no \"ensemble\" block): WARM averages the "
            "members of a model trained with reward train-rm --ensemble K; a single model is already one model"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise WarmExportError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")
    if out_dir.resolve() == model_dir.resolve():
        raise WarmExportError("--out must not be the --model directory")

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
