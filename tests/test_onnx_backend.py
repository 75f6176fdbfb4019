"""`reward export-onnx` and `reward serve --backend onnx`: tiny random-init models exported
(a BERT cross-encoder with normalisation statistics and a short max_length, a Llama decoder
scored at its last token, and the pretrained MiniLM with int8 weights), served over HTTP, and their
rewards compared with the torch backend's on the same items."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from client import RewardClient
from server import REPO_ROOT, running_server
from reward_core.forward import pad_batch
from reward_core.formatting import encode_items
from service.registry import load_model
from service.settings import ServiceSettings
from trainer.export import FP32_TOLERANCE, ExportError, export_onnx

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "What is the capital of France?", "response": "I think it is Lyon, but I am not sure at all."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "response": "Hi!"},
    {"prompt": "Write a poem about the sea " * 3, "response": "The sea is wide and deep and blue, " * 4},
    {"messages": [
        {"role": "user", "content": "Write a poem about the sea"},
        {"role": "assistant", "content": "The sea is wide."},
        {"role": "user", "content": "Longer please"},
        {"role": "assistant", "content": "The sea is wide and deep and blue, and it is calling me and you."},
    ]},
]
# Three exports (torch.export tracing, ~40 s each on 2 idle cores) share the module's fixtures.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MAX_LENGTH = 40  # short enough that the long item above is truncated: the export must keep it
MEAN, STD = 0.25, 2.0


@pytest.fixture(scope="module")
def sources(model_dirs, tmp_path_factory):
    """The tiny BERT with a reward_model.json (max_length, normalisation), and the tiny Llama."""
    bert = tmp_path_factory.mktemp("sources") / "bert"
    shutil.copytree(model_dirs["bert"], bert)
    (bert / "reward_model.json").write_text(json.dumps(
        {"architecture": "encoder", "max_length": MAX_LENGTH, "reward_mean": MEAN, "reward_std": STD, "version": "v1"}
    ))
    return {"bert": bert, "llama": model_dirs["llama"], "minilm": model_dirs["minilm"]}


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    summaries = {
        "bert-onnx": export_onnx(sources["bert"], root / "bert-onnx"),
        "llama-onnx": export_onnx(sources["llama"], root / "llama-onnx"),
    }
    # The int8 export through the command line, as a user runs it; of the pretrained MiniLM
    # (seeded head), whose rewards vary with the text, unlike a random tiny model's.
    done = subprocess.run(
        [sys.executable, "-m", "reward_cli", "export-onnx", "--model", str(sources["minilm"]),
         "--out", str(root / "minilm-int8"), "--int8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summaries["minilm-int8"] = json.loads(done.stdout)
    return {name: root / name for name in summaries}, summaries


@pytest.fixture(scope="module")
def onnx_server(exports, tmp_path_factory):
    dirs, _ = exports
    args = ["--backend", "onnx", *(f"--model={name}={path}" for name, path in dirs.items()), "--max-wait-ms", "5"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as server:
        yield server


def torch_rewards(model_dir, items) -> list[float]:
    """The torch backend on the same items, in one padded batch (as the batcher would run them)."""
    model = load_model("reference", model_dir, ServiceSettings(models=[str(model_dir)]))
    encoded = encode_items(items, model.tokenizer, model.spec)
    return model.backend.score_batch(pad_batch(encoded, model.pad_token_id)).tolist()


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fp32_export_scores_match_torch_over_http(onnx_server, sources, exports, name):
    _, summaries = exports
    assert summaries[f"{name}-onnx"]["max_abs_difference_vs_torch"] <= FP32_TOLERANCE
    # BERT-family encoders get onnxruntime's fused attention graph; other models torch.export's.
    expected_exporter = {"bert": "torchscript+ort-bert-fusion", "llama": "torch.export"}[name]
    assert summaries[f"{name}-onnx"]["exporter"] == expected_exporter
    with RewardClient(onnx_server.url) as client:
        response = client.score(ITEMS, model=f"{name}-onnx")
        card = next(c for c in client.models().data if c.name == f"{name}-onnx")
    assert card.backend == "onnx" and card.dtype == "float32"
    assert response.scores == pytest.approx(torch_rewards(sources[name], ITEMS), abs=FP32_TOLERANCE)


def test_export_keeps_formatting_truncation_and_normalisation(onnx_server, sources):
    with RewardClient(onnx_server.url) as client:
        raw = client.score(ITEMS, model="bert-onnx")
        normalized = client.score(ITEMS, model="bert-onnx", normalize=True)
    assert raw.model == "bert-onnx@v1+onnx"
    assert raw.usage.truncated == 1  # the source's max_length (40), not the tokenizer's 512
    assert normalized.scores == pytest.approx([(s - MEAN) / STD for s in raw.scores], abs=1e-6)


def test_int8_export_loads_and_scores(onnx_server, sources, exports):
    dirs, summaries = exports
    assert summaries["minilm-int8"]["quantization"] == "dynamic-int8"
    # int8 matrices: the file is well under the float weights' size (embeddings stay float).
    assert summaries["minilm-int8"]["onnx_bytes"] < 0.75 * summaries["minilm-int8"]["torch_weight_bytes"]
    with RewardClient(onnx_server.url) as client:
        int8 = client.score(ITEMS, model="minilm-int8")
        card = next(c for c in client.models().data if c.name == "minilm-int8")
    assert int8.model.endswith("+onnx-int8") and card.dtype == "int8" and card.backend == "onnx"
    # Dynamic int8 takes activation scales from its whole input, so the backend scores each
    # item alone: an item's reward is the same in any batch, and the service gives exactly that.
    settings = ServiceSettings(models=["x"], backend="onnx")
    model = load_model("int8", dirs["minilm-int8"], settings)
    encoded = encode_items(ITEMS, model.tokenizer, model.spec)
    in_process = [float(model.backend.score_batch(pad_batch([e], model.pad_token_id))[0]) for e in encoded]
    one_batch = model.backend.score_batch(pad_batch(encoded, model.pad_token_id))
    assert one_batch.tolist() == pytest.approx(in_process, abs=1e-5)
    reversed_batch = model.backend.score_batch(pad_batch(encoded[::-1], model.pad_token_id))
    assert reversed_batch.tolist()[::-1] == pytest.approx(in_process, abs=1e-5)
    assert int8.scores == pytest.approx(in_process, abs=1e-4)
    float_rewards = torch_rewards(sources["minilm"], ITEMS)
    assert int8.scores != pytest.approx(float_rewards, abs=1e-6)  # really a different graph
    spread = max(float_rewards) - min(float_rewards)
    assert max(abs(a - b) for a, b in zip(int8.scores, float_rewards)) < 0.25 * spread


def test_export_refuses_a_non_empty_output_directory(sources, tmp_path):
    (tmp_path / "something").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_onnx(sources["bert"], tmp_path)
    assert (tmp_path / "something").read_text() == "keep me"


def test_backend_mismatch_is_refused_with_the_fix(sources, exports, tmp_path):
    """`--backend onnx` on a torch directory and the torch backend on an export both stop the
    server at start-up with a message saying what to run instead."""
    dirs, _ = exports
    for args, expected in (
        (["--backend", "onnx", f"--model={sources['bert']}"], "reward export-onnx"),
        ([f"--model={dirs['bert-onnx']}"], "--backend onnx"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "reward_cli", "serve", "--port", "1", *args],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 1 and expected in done.stderr, done.stderr[-2000:]
