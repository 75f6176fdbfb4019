"""Model backends: padded token arrays in, one reward per row out.

A backend knows only tensors: requests, batching and formatting live in other layers. The
service's batcher runs them, and the trainer's ONNX export checks its graph against them.

- ``TorchBackend``: any HF sequence classifier with one output (loaded by
  :mod:`reward_core.loading`), through :func:`reward_core.forward.reward_forward`.
- ``OnnxBackend``: a directory exported by ``reward export-onnx``, on CPU through onnxruntime
  (its graph's ``reward`` output, and ``objectives`` beside it for a multi-objective model).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .forward import Batch, pad_columns, reward_columns
from .loading import load_sequence_classifier
from .model_dir import (
    ONNX_FILE, ONNX_MEMBERS_OUTPUT, ONNX_META_KEY, ONNX_OBJECTIVES_OUTPUT, ONNX_REWARD_OUTPUT, ModelDirError,
    RewardModelSpec,
)

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


class Backend(Protocol):
    name: str
    device: str
    dtype: str

    def score_batch(self, batch: Batch) -> np.ndarray:
        """float32 rewards: [batch] for a single-head model; [batch, 1 + H] for a model with H
        objectives (column 0 the combined reward, then each head in ``spec.objectives`` order);
        [batch, 1 + K] for an ensemble of K members (column 0 their mean, then each member's)."""
        ...


def served_rewards(scores: np.ndarray) -> np.ndarray:
    """The reward a caller gets, [batch], from a backend's answer: the answer itself for a
    single-head model, its column 0 (the combination, or an ensemble's mean) otherwise."""
    scores = np.asarray(scores)
    return scores if scores.ndim == 1 else scores[:, 0]


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
        self._forward = reward_columns
        if compile:
            if not self.on_cuda:
                raise ModelDirError("--compile is for --device cuda (on CPU it costs minutes of compiling for little gain)")
            # dynamic=True: one graph for every (rows, tokens) shape instead of one per shape;
            # the sequence length is rounded up to a multiple of 64 below so the few shapes that
            # still specialise recur. Position ids from the mask always: no data-dependent
            # branch to break the graph.
            self._forward = torch.compile(functools.partial(reward_columns, positions_from_mask=True), dynamic=True)

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
            batch = pad_columns(batch, multiple=64 if self._forward is not reward_columns else 8)
        with torch.inference_mode():
            input_ids = self._to_device(batch.input_ids)
            attention_mask = self._to_device(batch.attention_mask)
            token_type_ids = None
            if batch.token_type_ids is not None:
                token_type_ids = self._to_device(batch.token_type_ids)
            columns = self._forward(self.model, self.spec.architecture, input_ids, attention_mask, token_type_ids)
            columns = columns.float().cpu().numpy()
            # [batch] for one head; [batch, 1 + H] (reward, then each objective's or member's) otherwise
            return columns if self.spec.extra_columns else columns[:, 0]


class OnnxBackend:
    name = "onnx"

    def __init__(self, model_dir: str | Path, spec: RewardModelSpec, *, device: str = "cpu", dtype: str = "float32",
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self.spec = spec
        path = self.model_dir / ONNX_FILE
        if not path.is_file():
            raise ModelDirError(
                f"{self.model_dir} has no {ONNX_FILE}; --backend onnx serves a directory made by "
                f"`reward export-onnx --model {self.model_dir} --out DIR`"
            )
        if device != "cpu":
            raise ModelDirError(
                f"the ONNX backend runs on CPU (onnxruntime's CPU package); --device {device} is for "
                "--backend torch"
            )
        meta = spec.extra.get(ONNX_META_KEY) or {}
        quantization = meta.get("quantization")
        # The precision lives in the exported file, not in a flag: refuse a contradicting one.
        if dtype != "float32":
            raise ModelDirError(
                f"--dtype {dtype} does not apply to an ONNX export (its precision is fixed at export: "
                f"{quantization or 'float32'}); leave --dtype at float32"
            )
        self.device = "cpu"
        self.dtype = "int8" if quantization else "float32"
        # Dynamic int8 picks each activation's quantisation scale from the whole input tensor, so
        # in a padded batch a row's reward would depend on its neighbours and on the padding (on
        # the default RM: 0.11 mean, 0.44 max between two batch plans of the same items; the int8
        # accuracy on TruthfulQA dev moved between 72.0% and 76.6% from batching alone). Such an
        # export runs each row alone, unpadded: one item, one score, whatever it is batched with.
        # On 2 CPU cores this is no slower than padded batches (39.5 vs 38.6 items/s in one run,
        # bench/results/backends-cpu.json).
        self.score_rows_alone = quantization is not None
        options = ort.SessionOptions()
        # One forward at a time (the batcher runs one per model) spread over every core; a
        # second inter-op pool would only compete with it.
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would otherwise spin between forwards and take the cores the
        # tokenizer pool and the event loop need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelDirError(f"cannot load {path} with onnxruntime: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = {"input_ids", "attention_mask"} - set(self.input_names)
        if missing:
            raise ModelDirError(f"{path} lacks the inputs {sorted(missing)}; re-export it with `reward export-onnx`")
        self.output_names = self._outputs(path, spec)
        log.info("onnx backend: %s (%s), %d intra-op threads", path, self.dtype, options.intra_op_num_threads)

    def _outputs(self, path: Path, spec: RewardModelSpec) -> list[str]:
        """The graph outputs to read: ``reward``, and ``objectives`` (one per head) or ``members``
        (one per ensemble member) when the spec has them (the export writes both; they must agree
        on the width)."""
        outputs = {o.name: o for o in self.session.get_outputs()}
        if ONNX_REWARD_OUTPUT not in outputs:
            raise ModelDirError(f"{path} has no output {ONNX_REWARD_OUTPUT!r}; re-export it with `reward export-onnx`")
        if spec.objectives is not None:
            wanted, what = ONNX_OBJECTIVES_OUTPUT, f"objectives ({', '.join(spec.objectives.names)})"
        elif spec.ensemble is not None:
            wanted, what = ONNX_MEMBERS_OUTPUT, f"ensemble of {spec.member_count} members"
        else:
            wanted, what = None, ""
        for name, block in ((ONNX_OBJECTIVES_OUTPUT, "objectives"), (ONNX_MEMBERS_OUTPUT, "ensemble")):
            if name in outputs and name != wanted:
                raise ModelDirError(
                    f"{path} outputs {name!r} but its reward_model.json names no {block}; restore its {block!r} block or re-export it"
                )
        if wanted is None:
            return [ONNX_REWARD_OUTPUT]
        extra = outputs.get(wanted)
        if extra is None:
            raise ModelDirError(
                f"{path} has no {wanted!r} output for the {what} its reward_model.json names; it was exported "
                "without them: re-export it with `reward export-onnx`"
            )
        width = extra.shape[-1] if len(extra.shape) == 2 else None
        if isinstance(width, int) and width != spec.extra_columns:
            label = "objective" if wanted == ONNX_OBJECTIVES_OUTPUT else "member"
            raise ModelDirError(f"{path} outputs {width} {label} rewards but reward_model.json names {spec.extra_columns}: {what}")
        return [ONNX_REWARD_OUTPUT, wanted]

    def score_batch(self, batch: Batch) -> np.ndarray:
        """[batch] for a single-head export; [batch, 1 + H] (the reward, then each objective's or
        member's) otherwise, as ``TorchBackend.score_batch``."""
        feeds: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self.input_names:
            types = batch.token_type_ids
            feeds["token_type_ids"] = types if types is not None else np.zeros_like(batch.input_ids)
        if not self.score_rows_alone:
            return self._run(feeds)
        rows = [
            # right-padded: the row's own tokens come first
            self._run({name: array[row:row + 1, : int(length)] for name, array in feeds.items()})[0]
            for row, length in enumerate(batch.attention_mask.sum(axis=1))
        ]
        if not rows:
            width = () if len(self.output_names) == 1 else (1 + self.spec.extra_columns,)
            return np.empty((0, *width), dtype=np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    def _run(self, feeds: dict[str, Any]) -> np.ndarray:
        outputs = self.session.run(self.output_names, feeds)
        if len(outputs) == 1:
            return outputs[0].astype(np.float32, copy=False)
        rewards, heads = outputs
        return np.concatenate([rewards[:, None], heads], axis=1).astype(np.float32, copy=False)
