"""``reward export-onnx``: a reward-model directory as an ONNX graph that ``reward serve
--backend onnx`` serves with the same formatting.

The model is loaded by the core's loader (``reward_core.loading``, through ``TorchBackend``: base
model, partial weights, adapters, value heads all resolved as when serving) and the traced function is
``reward_core.forward.reward_forward``, so the graph computes the reward the torch backend computes,
including last-token pooling for decoders. Batch and sequence axes are dynamic. ``--int8``
quantises the weights of the matrix multiplications to int8 with onnxruntime's dynamic
quantisation (activations are quantised per batch at run time), which is what makes CPU
inference faster; its accuracy change must be measured on the dev sets (README: Performance).

A model with several objectives (``reward_core.objectives``) is traced through
``reward_columns``: its graph has a second output, ``objectives`` [batch, H] (each head's reward
in the order of ``objectives.names``), beside ``reward`` [batch] (the combined reward), from the
one backbone pass. An ensemble's graph likewise has ``members`` [batch, K] beside ``reward`` (their
mean). A single-head model's graph has only ``reward``, as before.

The output directory holds ``model.onnx``, the tokenizer, ``config.json`` and a
``reward_model.json`` with the source's formatting, ``max_length`` and normalisation
statistics, a version of its own (``<source version>+onnx`` or ``+onnx-int8``) and an ``onnx``
block saying how it was made. Before returning, the export scores sample items with both
torch and onnxruntime and refuses an fp32 graph whose rewards (every head's, for several) differ
by more than 1e-3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-3
# Items of different shapes for the tracing example and the torch-vs-onnx check (export-warm's
# check scores them too).
SAMPLE_CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
    ([{"role": "user", "content": "Write a short poem about the sea."}],
     "The sea is wide and deep and blue, and it is calling me and you, over sand and stone and shell."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "Hi!"),
    ([{"role": "user", "content": "Explain why the sky is blue in two sentences."}],
     "Sunlight scatters off air molecules, and blue light scatters most because its wavelength is short. "
     "So wherever we look away from the sun, scattered blue light reaches our eyes."),
]


def add_export_onnx_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-onnx", help="export a reward-model directory to ONNX (optionally int8) for --backend onnx",
        description=__doc__.split("\n\n")[0].replace("``", "'"),
    )
    parser.add_argument("--model", required=True, type=Path, help="reward-model directory to export")
    parser.add_argument("--out", required=True, type=Path, help="directory to write (must be empty or absent)")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the weights (faster on CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code shipped in the directory")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickle (.bin) weights")
    parser.set_defaults(func=run_export_onnx)


def run_export_onnx(args: argparse.Namespace) -> int:
    from reward_core.model_dir import ModelDirError

    # The exporter's libraries log each graph pass at INFO; only their warnings are worth showing.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        # torch's exporter prints its progress on stdout; stdout is kept for the summary JSON.
        with contextlib.redirect_stdout(sys.stderr):
            summary = export_onnx(
                args.model, args.out, int8=args.int8, overwrite=args.overwrite,
                trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
            )
    except (ModelDirError, ExportError) as exc:
        print(f"reward export-onnx: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


class ExportError(RuntimeError):
    """The export cannot be written, or its graph does not compute what torch computes."""


def output_names(model: Any) -> list[str]:
    """The graph's outputs: ``reward`` [batch] always; beside it ``objectives`` [batch, H] (each
    head's reward, in the order of the model's objectives) for a multi-objective model, or
    ``members`` [batch, K] (each member's reward; ``reward`` is their mean) for an ensemble."""
    from reward_core.ensemble import ensemble_of
    from reward_core.model_dir import ONNX_MEMBERS_OUTPUT, ONNX_OBJECTIVES_OUTPUT, ONNX_REWARD_OUTPUT
    from reward_core.objectives import objectives_of

    if objectives_of(model) is not None:
        return [ONNX_REWARD_OUTPUT, ONNX_OBJECTIVES_OUTPUT]
    if ensemble_of(model) is not None:
        return [ONNX_REWARD_OUTPUT, ONNX_MEMBERS_OUTPUT]
    return [ONNX_REWARD_OUTPUT]


def _graph_outputs(model: Any, architecture: str, input_ids, attention_mask, token_type_ids, **kwargs):
    """What the exported graph returns: the reward (as ``reward_forward``), and for a
    multi-objective model or an ensemble each head's or member's reward too, from the one pass
    of ``reward_columns``."""
    from reward_core.forward import reward_columns, reward_forward

    kwargs["read_positions_only"] = False  # the top block in full: the graph onnxruntime's BERT fusion matches
    if len(output_names(model)) == 1:
        return reward_forward(model, architecture, input_ids, attention_mask, token_type_ids, **kwargs)
    columns = reward_columns(model, architecture, input_ids, attention_mask, token_type_ids, **kwargs)
    return columns[:, 0], columns[:, 1:]


def _reward_graph(model: Any, architecture: str):
    import torch

    class RewardGraph(torch.nn.Module):
        """``reward_forward`` (``reward_columns`` for several heads) as a module, the function
        torch.export traces."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            # Position ids always from the mask: no data-dependent branch in the graph, and the
            # same rewards for right-padded rows (the batcher's) as for left-padded ones.
            return _graph_outputs(
                self.model, architecture, input_ids, attention_mask, token_type_ids, positions_from_mask=True
            )

    return RewardGraph().eval()


# Encoders whose graphs onnxruntime's transformer optimizer fuses (model_type "bert": its
# attention, embedding and layer-norm patterns).
FUSABLE_ENCODERS = {"bert", "roberta", "xlm-roberta", "electra"}


def _export_fused_encoder(model: Any, example: tuple, names: list[str], path: Path, big: bool) -> dict[str, int]:
    """BERT-family encoders: the TorchScript exporter on eager attention, then onnxruntime's
    BERT fusions (one Attention op per layer, SkipLayerNormalization, BiasGelu,
    EmbedLayerNormalization). On the default RM with 2 AVX2 cores this graph ran 1.6x the
    torch.export graph in fp32 and its int8 version 1.7x, because torch.export's decomposed
    attention matches none of the fusion patterns. Returns the fused operator counts; raises
    when the export fails or fuses no attention (the caller then falls back to torch.export)."""
    import torch
    from onnxruntime.transformers import optimizer

    # Eager attention traces to the MatMul/Softmax pattern the fusion recognises (SDPA traces
    # to an opaque op); the served torch model is not affected (this copy is the export's own).
    model.config._attn_implementation = "eager"
    for module in model.modules():
        if getattr(module, "config", None) is not None:
            module.config._attn_implementation = "eager"

    class EncoderRewardGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            return _graph_outputs(self.model, "encoder", input_ids, attention_mask, token_type_ids)

    outputs = output_names(model)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    if len(outputs) > 1:  # a single-head graph stays exactly as it was
        axes.update({n: {0: "batch"} for n in outputs})
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            EncoderRewardGraph().eval(), example, str(path), input_names=names, output_names=outputs,
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )
    config = model.config
    optimized = optimizer.optimize_model(
        str(path), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size,
        opt_level=0,  # the fusions only; onnxruntime applies its own graph optimisations at load
    )
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    # an ensemble's member blocks attend from [CLS] alone, which no fusion pattern matches: only the shared blocks fuse
    ensemble = getattr(model, "reward_ensemble", None)
    expected = config.num_hidden_layers - (ensemble.top_layers if ensemble is not None else 0)
    if fused.get("Attention", 0) < expected:
        raise RuntimeError(f"onnxruntime fused attention in {fused.get('Attention', 0)} of {expected} layers")
    optimized.save_model_to_file(str(path), use_external_data_format=big)
    return fused


def export_onnx(
    model_dir: str | Path, out_dir: str | Path, *, int8: bool = False, overwrite: bool = False,
    trust_remote_code: bool = False, allow_pickle: bool = False,
) -> dict[str, Any]:
    """Write the ONNX export of ``model_dir`` to ``out_dir``; returns a summary (sizes, check)."""
    import numpy as np
    import onnxruntime
    import torch

    from reward_core.backends import OnnxBackend, TorchBackend
    from reward_core.formatting import encode_conversations
    from reward_core.forward import pad_batch, pad_token_id
    from reward_core.loading import open_model_dir
    from reward_core.model_dir import ONNX_FILE, ONNX_META_KEY

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")
        if out_dir.resolve() == model_dir.resolve():
            raise ExportError("--out must not be the --model directory")
        shutil.rmtree(out_dir)
    started = time.perf_counter()
    files = open_model_dir(model_dir, trust_remote_code=trust_remote_code, name="export")
    spec, tokenizer, pad_id = files.spec, files.tokenizer, pad_token_id(files.tokenizer)
    torch_backend = TorchBackend(model_dir, spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model = torch_backend.model
    encoded = encode_conversations(SAMPLE_CONVERSATIONS, tokenizer, spec)
    batch = pad_batch(encoded, pad_id)
    with_types = spec.architecture == "encoder" and batch.token_type_ids is not None
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    example = tuple(torch.from_numpy(getattr(batch, n)) for n in names)
    rows, tokens = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {n: {0: rows, 1: tokens} for n in names}

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILE
    traced_path = out_dir / "model.fp32.onnx" if int8 else onnx_path
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    big = weight_bytes > 1_800_000_000  # protobuf's 2 GB limit: weights go to an external file
    exporter, fused = None, None
    if spec.architecture == "encoder" and getattr(model.config, "model_type", None) in FUSABLE_ENCODERS:
        try:
            fused = _export_fused_encoder(model, example, names, traced_path, big)
            exporter = "torchscript+ort-bert-fusion"
        except Exception as exc:  # noqa: BLE001  (any failure falls back to the generic exporter)
            log.warning("fused encoder export failed (%s: %s); using torch.export", type(exc).__name__, exc)
            for leftover in out_dir.glob("model*.onnx*"):
                leftover.unlink()
    if exporter is None:
        graph = _reward_graph(model, spec.architecture)
        try:
            with torch.inference_mode(False), torch.no_grad():
                program = torch.onnx.export(
                    graph, example, input_names=names, output_names=output_names(model), dynamo=True,
                    dynamic_shapes=dynamic, optimize=True,
                )
            program.save(str(traced_path), external_data=big)
        except Exception as exc:  # torch.export raises many kinds; the message says which construct failed
            shutil.rmtree(out_dir, ignore_errors=True)
            raise ExportError(f"torch.onnx.export failed on {model_dir}: {type(exc).__name__}: {exc}") from exc
        exporter = "torch.export"
    if int8:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Signed int8 weights with one scale per output channel, for the matrix multiplications
        # and the fused attention's QKV projection: on the default RM (alpacaeval/dev items)
        # per-tensor scales moved rewards by 0.31 on average (0.15 per channel), and quantising
        # the embedding tables (Gather) as well cost accuracy for little speed, since a lookup is
        # not where the time goes. The fused graph has contrib ops that ONNX shape inference
        # cannot type, hence the default tensor type.
        quantize_dynamic(traced_path, onnx_path, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                         use_external_data_format=big,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        traced_path.unlink()
        for leftover in out_dir.glob("model.fp32.onnx*"):
            leftover.unlink()

    tokenizer.save_pretrained(out_dir)
    model.config.save_pretrained(out_dir)
    extra = dict(spec.extra)
    if int8:
        extra.pop("dev_results", None)  # measured on the float weights; int8's are measured anew
    extra[ONNX_META_KEY] = {
        "file": ONNX_FILE,
        "quantization": "dynamic-int8" if int8 else None,
        "inputs": names,
        "source": str(model_dir.resolve()),
        "source_version": spec.version,
        "exporter": exporter,
        "fused_operators": fused,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    exported_spec = replace(
        spec, base_model=None, value_head_prefix=None,
        version=f"{spec.version}+onnx{'-int8' if int8 else ''}", extra=extra,
    )
    exported_spec.save(out_dir)

    # The check: the same padded batches through torch and through the exported graph.
    # For a multi-objective model both are [batch, 1 + H], so every head is checked, not only
    # the combined reward.
    backend = OnnxBackend(out_dir, exported_spec)
    differences = []
    for part in (batch, pad_batch(encoded[:1], pad_id), pad_batch(encoded[1:3], pad_id)):
        expected = torch_backend.score_batch(part)
        got = backend.score_batch(part)
        if got.shape != expected.shape:
            raise ExportError(
                f"the exported graph gives rewards of shape {got.shape} where torch gives {expected.shape}; "
                f"the export in {out_dir} is not usable"
            )
        differences.append(np.abs(expected - got).reshape(len(expected), -1).max(axis=0))
    per_column = np.max(differences, axis=0)
    max_difference = float(per_column.max())
    summary = {
        "model": str(model_dir), "out": str(out_dir), "architecture": spec.architecture,
        "quantization": "dynamic-int8" if int8 else None, "version": exported_spec.version, "exporter": exporter,
        "onnx_bytes": onnx_path.stat().st_size, "torch_weight_bytes": weight_bytes,
        "max_abs_difference_vs_torch": max_difference, "seconds": round(time.perf_counter() - started, 1),
    }
    if spec.objectives is not None:
        summary["objectives"] = spec.objectives.to_json()
        # column 0 the combined reward, then each head
        summary["max_abs_difference_per_column"] = dict(
            zip(["reward", *spec.objectives.names], (float(d) for d in per_column))
        )
    if spec.ensemble is not None:
        summary["ensemble"] = spec.ensemble.to_json()
        # column 0 the members' mean, then each member
        summary["max_abs_difference_per_column"] = dict(
            zip(["reward", *(f"member_{m}" for m in range(spec.member_count))], (float(d) for d in per_column))
        )
    if not int8 and max_difference > FP32_TOLERANCE:
        raise ExportError(
            f"the exported graph's rewards differ from torch's by {max_difference:.2e} (> {FP32_TOLERANCE}); "
            f"the export in {out_dir} is not usable. Please report the model type ({getattr(model.config, 'model_type', '?')})"
        )
    log.info("exported %s to %s: %s", model_dir, out_dir, summary)
    return summary
