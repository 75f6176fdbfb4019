"""Model backends: padded token arrays in, one reward per row out.

A backend knows only tensors. Requests, batching and formatting live in other layers.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .model_dir import ModelDirError, RewardModelSpec

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Batch:
    """Right-padded inputs of one forward pass."""

    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, seq]
    token_type_ids: np.ndarray | None  # int64 [batch, seq] for encoders with segments


class Backend(Protocol):
    name: str
    device: str
    dtype: str

    def score_batch(self, batch: Batch) -> np.ndarray:
        """float32 [batch] rewards."""
        ...


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


class TorchBackend:
    """Any HF ``AutoModelForSequenceClassification`` with one output, in ``torch.inference_mode``.

    Decoders are scored at the last attended token of each (right-padded) row, by running the
    base model and the ``score`` head ourselves, so a missing or odd pad token cannot shift the
    position being read.
    """

    name = "torch"

    def __init__(
        self,
        model_dir: str | Path,
        spec: RewardModelSpec,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        compile: bool = False,
    ) -> None:
        import torch

        self.torch = torch
        self.model_dir = Path(model_dir)
        self.spec = spec
        self.device = device
        if dtype not in DTYPES:
            raise ModelDirError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.dtype = dtype
        self.on_cuda = device.startswith("cuda")
        if self.on_cuda and not torch.cuda.is_available():
            raise ModelDirError("--device cuda was asked for but torch sees no CUDA device")
        model = load_sequence_classifier(
            self.model_dir, spec, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle, attn_implementation="sdpa" if self.on_cuda else None,
        )
        self._prepare(model, compile)

    @classmethod
    def from_module(cls, model: Any, spec: RewardModelSpec, *, device: str = "cpu", compile: bool = False) -> "TorchBackend":
        """A backend around a model already built (the GPU benchmark's random-init models)."""
        import torch

        backend = cls.__new__(cls)
        backend.torch, backend.model_dir, backend.spec, backend.device = torch, Path("."), spec, device
        backend.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        backend.on_cuda = device.startswith("cuda")
        backend._prepare(model, compile)
        return backend

    def _prepare(self, model: Any, compile: bool) -> None:
        torch = self.torch
        self.model = model.to(self.device)
        self.model.eval()
        self._forward = reward_forward
        if compile:
            if not self.on_cuda:
                raise ModelDirError("--compile is for --device cuda (on CPU it costs minutes of compiling for little gain)")
            # dynamic=True: one graph for every (rows, tokens) shape instead of one per shape;
            # the sequence length is rounded up to a multiple of 64 below so the few shapes that
            # still specialise recur. Position ids from the mask always: no data-dependent
            # branch to break the graph.
            self._forward = torch.compile(functools.partial(reward_forward, positions_from_mask=True), dynamic=True)

    def _to_device(self, array: np.ndarray):
        tensor = self.torch.from_numpy(array)
        if self.on_cuda:
            # Pinned host memory lets the copy run asynchronously (non_blocking has no effect on
            # pageable memory); the reward's .cpu() below is the one synchronisation point.
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def score_batch(self, batch: Batch) -> np.ndarray:
        torch = self.torch
        if self.on_cuda:
            batch = pad_columns(batch, multiple=64 if self._forward is not reward_forward else 8)
        with torch.inference_mode():
            input_ids = self._to_device(batch.input_ids)
            attention_mask = self._to_device(batch.attention_mask)
            token_type_ids = None
            if batch.token_type_ids is not None:
                token_type_ids = self._to_device(batch.token_type_ids)
            rewards = self._forward(self.model, self.spec.architecture, input_ids, attention_mask, token_type_ids)
            return rewards.float().cpu().numpy()


def pad_columns(batch: Batch, multiple: int) -> Batch:
    """Right-pad the sequence axis to a multiple of ``multiple`` (masked out, so rewards do not
    change): tensor cores want multiples of 8, and a compiled graph sees fewer distinct shapes."""
    seq = batch.input_ids.shape[1]
    extra = -seq % multiple
    if extra == 0:
        return batch

    def widen(array: np.ndarray | None, fill: int) -> np.ndarray | None:
        if array is None:
            return None
        return np.pad(array, ((0, 0), (0, extra)), constant_values=fill)

    # Pad id 0 is as good as any: the mask hides these columns and pooling reads the last 1 of the mask.
    return Batch(widen(batch.input_ids, 0), widen(batch.attention_mask, 0), widen(batch.token_type_ids, 0))


def reward_forward(
    model: Any, architecture: str, input_ids: Any, attention_mask: Any, token_type_ids: Any = None,
    *, positions_from_mask: bool | None = None,
):
    """One reward per right-padded row: THE forward of a reward model, shared by the service
    (``TorchBackend.score_batch``) and the trainer, so both read the same position.

    Encoders: ``model(...).logits[:, 0]`` (the head on [CLS]). Decoders with a ``score`` head: the
    base model's hidden state at the last attended token through ``score``; other decoders fall
    back to the model's own pooling.

    The position read is the last 1 of ``attention_mask``, never derived from pad ids, so a pad
    token equal to EOS (or none at all) cannot move it. Rows may also be left-padded (as
    OpenRLHF and TRL pad): position ids then count attended tokens only, so a row's reward
    does not depend on which side it was padded.

    ``positions_from_mask=True`` always derives position ids from the mask (for right-padded rows
    they equal the default ones), so a traced graph (the ONNX export) has no data-dependent
    branch; ``None`` decides per batch, skipping the cumsum when no row is left-padded.
    """
    head = getattr(model, "score", None) if architecture == "decoder" else None
    if head is not None:
        import torch

        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if positions_from_mask or (positions_from_mask is None and not bool(attention_mask[:, 0].all())):
            kwargs["position_ids"] = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = model.base_model(**kwargs).last_hidden_state
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * attention_mask.long()).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return head(pooled)[:, 0]
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return model(**kwargs).logits[:, 0]


def load_sequence_classifier(
    model_dir: Path, spec: RewardModelSpec, *, dtype: Any = None, trust_remote_code: bool = False,
    allow_pickle: bool = False, attn_implementation: str | None = None,
):
    """Build the HF model of a reward-model directory (with its base model when it has one).

    Shared by serving and training so a directory means the same model to both.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from .model_dir import resolve_base_model

    model_dir = Path(model_dir)
    _check_weights(model_dir, allow_pickle)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if not spec.value_head_prefix and not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        # A bare backbone (e.g. sentence-transformers' MiniLM): give it a one-output head.
        log.warning("%s has no sequence-classification head; its reward head is untrained", model_dir)
        config.num_labels = 1
    if spec.value_head_prefix:
        config.num_labels = 1  # a bare backbone's config has no head; the value head has one output
    if config.num_labels != 1:
        raise ModelDirError(
            f"{model_dir} has {config.num_labels} outputs; a reward model has one (num_labels=1)"
        )
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if spec.value_head_prefix:
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
            base_path = resolve_base_model(spec.base_model, model_dir)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                base_path, output_loading_info=True, **kwargs
            )
            _lay_partial_weights(model, model_dir, info["missing_keys"])
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
    except OSError as exc:
        raise ModelDirError(f"cannot load model from {model_dir}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


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

    from .model_dir import resolve_base_model

    if not spec.base_model:
        raise ModelDirError(
            f"{model_dir} holds a LoRA adapter (adapter_config.json) but reward_model.json names no "
            "base_model to apply it to"
        )
    base_path = resolve_base_model(spec.base_model, model_dir)
    model, info = AutoModelForSequenceClassification.from_pretrained(base_path, output_loading_info=True, **kwargs)
    try:
        adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{model_dir / 'adapter_config.json'} is not valid JSON ({exc})") from exc
    saved = [m for m in adapter_config.get("modules_to_save") or []]
    untrained = [
        k for k in info["missing_keys"]
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
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(path))
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


def _weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
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
