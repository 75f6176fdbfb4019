"""The ONNX Runtime backend: a reward-model directory exported by ``reward export-onnx``
(trainer/export.py), scored on CPU by onnxruntime.

Same contract as ``TorchBackend``: padded token arrays in, one float32 reward per row out. The
graph is ``reward_forward`` itself (traced at export), so it reads the same position (``[CLS]``
for encoders, the last attended token for decoders) as the torch backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Batch
from .model_dir import ModelDirError, RewardModelSpec

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# The block export-onnx writes into reward_model.json (spec.extra["onnx"]).
ONNX_META_KEY = "onnx"


def is_onnx_export(model_dir: Path) -> bool:
    return (Path(model_dir) / ONNX_FILE).is_file()


class OnnxBackend:
    name = "onnx"

    def __init__(self, model_dir: str | Path, spec: RewardModelSpec, *, device: str = "cpu", dtype: str = "float32",
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
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
        log.info("onnx backend: %s (%s), %d intra-op threads", path, self.dtype, options.intra_op_num_threads)

    def score_batch(self, batch: Batch) -> np.ndarray:
        feeds: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self.input_names:
            types = batch.token_type_ids
            feeds["token_type_ids"] = types if types is not None else np.zeros_like(batch.input_ids)
        if not self.score_rows_alone:
            return self._run(feeds)
        rewards = np.empty(batch.input_ids.shape[0], dtype=np.float32)
        for row, length in enumerate(batch.attention_mask.sum(axis=1)):
            # right-padded: the row's own tokens come first
            rewards[row] = self._run({name: array[row:row + 1, : int(length)] for name, array in feeds.items()})[0]
        return rewards

    def _run(self, feeds: dict[str, Any]) -> np.ndarray:
        (rewards,) = self.session.run(["reward"], feeds)
        return rewards.astype(np.float32, copy=False)
