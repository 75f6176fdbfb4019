"""Loading a reward-model directory: the HF sequence classifier it describes, whatever its
shape (a full checkpoint, a partial state dict over a base model, a LoRA adapter, a bare
backbone with OpenRLHF's value head), and its tokenizer and spec.

Shared by serving and training, so a directory means the same model to both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .model_dir import ModelDirError, RewardModelSpec, load_spec, load_tokenizer, resolve_base_model
from .ensemble import ENSEMBLE_FILE, EnsembleError, attach_ensemble, load_members_state
from .objectives import GATE_FILE, GATE_PREFIX, ObjectivesError, attach_objectives

log = logging.getLogger(__name__)


def _check_weights(model_dir: Path, allow_pickle: bool) -> None:
    if any(model_dir.glob("*.safetensors")) or (model_dir / "adapter_model.safetensors").exists():
        return
    pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
    if pickles and not allow_pickle:
        raise ModelDirError(
            f"{model_dir} holds only pickle weights ({', '.join(sorted(pickles))}), which can run "
            "arbitrary code when loaded; convert them to safetensors or pass --allow-pickle if you trust them"
        )
    if not pickles:
        raise ModelDirError(f"{model_dir} has no weights (*.safetensors)")


def load_sequence_classifier(
    model_dir: Path, spec: RewardModelSpec, *, dtype: Any = None, trust_remote_code: bool = False,
    allow_pickle: bool = False, attn_implementation: str | None = None,
):
    """Build the HF model of a reward-model directory (with its base model when it has one).

    Shared by serving and training so a directory means the same model to both.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    _check_weights(model_dir, allow_pickle)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if not spec.value_head_prefix and not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        # A bare backbone (e.g. sentence-transformers' MiniLM): give it a one-output head.
        log.warning("%s has no sequence-classification head; its reward head is untrained", model_dir)
        config.num_labels = 1
    if spec.value_head_prefix:
        config.num_labels = 1  # a bare backbone's config has no head; the value head has one output
    expected = len(spec.objectives.names) if spec.objectives is not None else 1
    if config.num_labels != expected:
        if spec.objectives is not None:
            raise ModelDirError(
                f"{model_dir} has {config.num_labels} outputs but reward_model.json names {expected} objectives "
                f"({', '.join(spec.objectives.names)}): one output per objective"
            )
        raise ModelDirError(
            f"{model_dir} has {config.num_labels} outputs; a reward model has one (num_labels=1), or one per "
            'objective named in reward_model.json ("objectives")'
        )
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if spec.value_head_prefix:
        if spec.objectives is not None:
            raise ModelDirError(f"{model_dir}: value_head_prefix (one value head) and objectives (several heads) do not go together")
        return _load_value_head_checkpoint(model_dir, spec, config, dtype=dtype, trust_remote_code=trust_remote_code)
    _refuse_unnamed_value_head(model_dir)
    kwargs: dict[str, Any] = dict(config=config, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle)
    if attn_implementation is not None:
        if _supports_attention(config, attn_implementation, trust_remote_code):
            kwargs["attn_implementation"] = attn_implementation
        else:
            log.warning("%s: %s attention is not available for %s; using its default", model_dir,
                        attn_implementation, getattr(config, "model_type", "this model"))
    if dtype is not None:
        kwargs["dtype"] = dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised head" warnings are handled below
    is_adapter = (model_dir / "adapter_config.json").is_file()
    if is_adapter and dtype is not None:
        import torch

        # A LoRA adapter is merged in float32, then cast: merging in half precision loses bits.
        kwargs["dtype"] = torch.float32
    try:
        if is_adapter:
            model = _load_adapter(model_dir, spec, kwargs)
            if dtype is not None:
                model = model.to(dtype)
        elif spec.base_model:
            base_path = resolve_base_model(spec.base_model, model_dir, trust_remote_code=trust_remote_code)
            # A head with one output per objective does not fit the base's head (when it has one):
            # its weights come from this directory, and must be there.
            model, info = AutoModelForSequenceClassification.from_pretrained(
                base_path, output_loading_info=True, ignore_mismatched_sizes=spec.objectives is not None, **kwargs
            )
            mismatched = [key for key, *_ in info.get("mismatched_keys") or []]
            _lay_partial_weights(model, model_dir, list(info["missing_keys"]) + mismatched)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
    except OSError as exc:
        raise ModelDirError(f"cannot load model from {model_dir}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if spec.objectives is not None:
        _attach_objectives(model, model_dir, spec)
    if spec.ensemble is not None:
        _attach_ensemble(model, model_dir, spec)
    return model


def _attach_ensemble(model: Any, model_dir: Path, spec: RewardModelSpec) -> None:
    """K members over the model's lower blocks, their tensors from ENSEMBLE_FILE."""
    from safetensors.torch import load_file

    path = model_dir / ENSEMBLE_FILE
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: reward_model.json describes an ensemble, but {ENSEMBLE_FILE} (its members) is missing")
    try:
        attach_ensemble(model, spec.ensemble)
        load_members_state(model, load_file(path))
    except EnsembleError as exc:
        raise ModelDirError(f"{model_dir}: {exc}") from exc
    except RuntimeError as exc:
        raise ModelDirError(f"{path} does not fit {spec.ensemble.members} members of {spec.ensemble.top_layers} top blocks: {exc}") from exc


def _attach_objectives(model: Any, model_dir: Path, spec: RewardModelSpec) -> None:
    """One head per objective (the classifier's outputs, already loaded) and, for the gate rule,
    the gate's tensors from GATE_FILE."""
    from safetensors.torch import load_file

    try:
        attach_objectives(model, spec.objectives)
    except ObjectivesError as exc:
        raise ModelDirError(f"{model_dir}: {exc}") from exc
    if not spec.objectives.gated:
        return
    path = model_dir / GATE_FILE
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: objectives combine by a gate, but {GATE_FILE} (its weights) is missing")
    gate = getattr(model, GATE_PREFIX)
    state = {k.removeprefix(GATE_PREFIX + "."): v for k, v in load_file(path).items()}
    try:
        gate.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelDirError(f"{path} does not fit the model's gate: {exc}") from exc
    gate.to(next(model.parameters()).dtype)


def _supports_attention(config: Any, implementation: str, trust_remote_code: bool) -> bool:
    from transformers import AutoModelForSequenceClassification

    try:
        model_class = AutoModelForSequenceClassification._model_mapping[type(config)]
    except KeyError:  # remote code or an unusual mapping: keep what the model chooses
        return False
    return bool(getattr(model_class, f"_supports_{implementation}", False))


def _load_adapter(model_dir: Path, spec: RewardModelSpec, kwargs: dict[str, Any]):
    """A PEFT (LoRA) adapter directory: base model (``base_model`` of reward_model.json) with the
    directory's config, the adapter (and its ``modules_to_save``, e.g. the head) on top, merged."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    if not spec.base_model:
        raise ModelDirError(
            f"{model_dir} holds a LoRA adapter (adapter_config.json) but reward_model.json names no "
            "base_model to apply it to"
        )
    base_path = resolve_base_model(spec.base_model, model_dir, trust_remote_code=bool(kwargs.get("trust_remote_code")))
    model, info = AutoModelForSequenceClassification.from_pretrained(
        base_path, output_loading_info=True, ignore_mismatched_sizes=spec.objectives is not None, **kwargs
    )
    try:
        adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{model_dir / 'adapter_config.json'} is not valid JSON ({exc})") from exc
    saved = [m for m in adapter_config.get("modules_to_save") or []]
    mismatched = [key for key, *_ in info.get("mismatched_keys") or []]
    untrained = [
        k for k in list(info["missing_keys"]) + mismatched
        if not any(k == m or k.startswith(m + ".") or ("." + m + ".") in ("." + k) for m in saved)
    ]
    if untrained:
        raise ModelDirError(
            f"{model_dir}: {untrained[:5]} are in neither the base model nor the adapter's modules_to_save"
        )
    try:
        model = PeftModel.from_pretrained(model, model_dir)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelDirError(f"cannot apply the LoRA adapter in {model_dir} to {base_path}: {exc}") from exc
    return model.merge_and_unload()


def _lay_partial_weights(model: Any, model_dir: Path, missing_from_base: list[str]) -> None:
    """Load the directory's partial state dict (trained layers + head) over the base weights."""
    state = _weights(model_dir)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ModelDirError(
            f"{model_dir} has weights the base model does not: {result.unexpected_keys[:5]}; "
            "is base_model in reward_model.json right?"
        )
    untrained = sorted(set(missing_from_base) - set(state))
    if untrained:
        raise ModelDirError(
            f"{model_dir}: {untrained[:5]} are in neither the base model nor the directory"
        )


def hf_weight_files(model_dir: Path) -> list[Path]:
    """The directory's safetensors files that hold the HF model's tensors: every one but a gate's
    and an ensemble's members' (not part of the HF model; see _attach_objectives/_attach_ensemble)."""
    return [path for path in sorted(Path(model_dir).glob("*.safetensors")) if path.name not in (GATE_FILE, ENSEMBLE_FILE)]


def _weights(model_dir: Path) -> dict[str, Any]:
    """Every tensor of the HF model's safetensors files in the directory, by name."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for path in hf_weight_files(model_dir):
        state.update(load_file(path))
    return state


def _refuse_unnamed_value_head(model_dir: Path) -> None:
    """A checkpoint with OpenRLHF's ``value_head`` but no option naming it would otherwise load
    with a fresh random head and serve noise; say what to add instead."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            if "value_head.weight" in weights.keys():
                raise ModelDirError(
                    f"{model_dir} holds a value head named 'value_head' (an OpenRLHF reward model); add "
                    '"value_head_prefix": "value_head" to its reward_model.json so it is read as the reward head'
                )


def _load_value_head_checkpoint(model_dir: Path, spec: RewardModelSpec, config: Any, *, dtype: Any, trust_remote_code: bool):
    """A decoder saved as a bare backbone plus a one-output linear head under another name, as
    OpenRLHF saves reward models (``AutoModel`` weights, ``model.``-prefixed or not, and
    ``value_head.weight``): built as the HF sequence classifier of its config, the head renamed
    to ``score``. Every tensor must find its place, so a wrong prefix fails loudly."""
    from transformers import AutoModelForSequenceClassification

    if spec.architecture != "decoder":
        raise ModelDirError(
            f"{model_dir}: value_head_prefix is for decoders scored at their last token; this model is an {spec.architecture}"
        )
    model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    head = getattr(model, "score", None)
    if head is None or head.out_features != 1:
        raise ModelDirError(f"{model_dir}: {type(model).__name__} has no one-output `score` head to load the value head into")
    prefix, base = spec.value_head_prefix, model.base_model_prefix
    renamed: dict[str, Any] = {}
    for key, tensor in _weights(model_dir).items():
        if key.startswith(prefix + "."):
            renamed["score" + key[len(prefix):]] = tensor
        elif key.startswith(base + "."):
            renamed[key] = tensor
        else:  # saved from the bare AutoModel: no base prefix
            renamed[f"{base}.{key}"] = tensor
    if "score.weight" not in renamed:
        raise ModelDirError(f"{model_dir} has no tensor named {prefix}.weight; is value_head_prefix right?")
    result = model.load_state_dict(renamed, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelDirError(
            f"{model_dir} does not match its config as a {type(model).__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(dtype) if dtype is not None else model


@dataclass(frozen=True)
class ModelFiles:
    """What a reward-model directory says about itself, before any weights are read."""

    path: Path
    config: Any
    tokenizer: Any
    spec: RewardModelSpec
    label: str  # the head's one class name (config.id2label[0]), as vLLM reports it


def open_model_dir(
    path: str | Path, *, trust_remote_code: bool = False, max_length: int | None = None, name: str | None = None,
) -> ModelFiles:
    """Config, tokenizer and spec of a model directory, or ModelDirError saying what is wrong.

    ``max_length`` overrides the spec's (a serving or export setting); ``name`` prefixes errors.
    """
    from transformers import AutoConfig

    path = Path(path)
    where = f"model {name!r}: " if name else ""
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # e.g. ENAMETOOLONG: a component over 255 bytes or a path over 4096
        raise ModelDirError(f"{where}cannot use the path {str(path)[:200]!r}...: {exc.strerror}") from exc
    if not is_dir:
        raise ModelDirError(f"{where}{path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{where}{path} has no config.json (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{where}cannot read {path / 'config.json'}: {exc}") from exc
    raw_base = None
    meta = path / "reward_model.json"
    if meta.is_file():
        try:
            raw_base = json.loads(meta.read_text()).get("base_model")
        except (json.JSONDecodeError, AttributeError):
            raw_base = None  # load_spec reports the broken file properly
    tokenizer = load_tokenizer(path, trust_remote_code, raw_base)
    spec = load_spec(path, config, tokenizer)
    if max_length is not None:
        spec = replace(spec, max_length=max_length)
    id2label = getattr(config, "id2label", None) or {}
    label = str(id2label.get(0, id2label.get("0", "LABEL_0")))
    return ModelFiles(path=path, config=config, tokenizer=tokenizer, spec=spec, label=label)
