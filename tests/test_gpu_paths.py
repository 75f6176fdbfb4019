"""The GPU path (`--device cuda --dtype bfloat16`, `--compile`) and what stands in for it
without CUDA: the GPU tests are skipped cleanly on a machine without it, and the refusals a
user meets there are clear."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from client import RewardClient
from server import REPO_ROOT, running_server
from reward_core.backends import TorchBackend
from reward_core.forward import pad_columns
from reward_core.forward import pad_batch
from reward_core.formatting import encode_items
from reward_core.model_dir import ModelDirError
from service.registry import load_model
from service.settings import ServiceSettings

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
without_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the refusals a machine without CUDA gives")

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "Write a poem about the sea", "response": "The sea is wide and deep and blue, and calls to me and you."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "response": "Hi!"},
]


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_padding_columns_for_the_gpu_leaves_rewards_unchanged(model_dirs, name):
    """The CUDA backend widens batches to a multiple of 8 (64 when compiled); masked columns
    must not move any reward, for encoders ([CLS]) and decoders (last attended token)."""
    model = load_model(name, model_dirs[name], ServiceSettings(models=[str(model_dirs[name])]))
    batch = pad_batch(encode_items(ITEMS, model.tokenizer, model.spec), model.pad_token_id)
    widened = pad_columns(batch, 64)
    assert widened.input_ids.shape[1] % 64 == 0 and widened.input_ids.shape[1] > batch.input_ids.shape[1]
    np.testing.assert_allclose(model.backend.score_batch(widened), model.backend.score_batch(batch), atol=1e-5)


def test_compile_is_refused_off_cuda(model_dirs):
    with pytest.raises(ModelDirError, match="--device cuda"):
        TorchBackend(model_dirs["bert"], load_model("b", model_dirs["bert"], ServiceSettings()).spec, compile=True)


@without_cuda
def test_cuda_device_without_cuda_stops_the_server_with_the_reason(model_dirs):
    done = subprocess.run(
        [sys.executable, "-m", "reward_cli", "serve", "--port", "1", f"--model={model_dirs['bert']}",
         "--device", "cuda", "--dtype", "bfloat16"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1 and "sees no CUDA device" in done.stderr, done.stderr[-2000:]


@without_cuda
def test_gpu_benchmark_refuses_without_cuda():
    done = subprocess.run([sys.executable, "bench/bench_gpu.py"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr, done.stderr[-2000:]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("extra", [[], ["--compile"]], ids=["eager", "compiled"])
def test_bfloat16_on_cuda_matches_float32_on_cpu(model_dirs, tmp_path, extra):
    args = [f"--model=llama={model_dirs['llama']}", f"--model=bert={model_dirs['bert']}",
            "--device", "cuda", "--dtype", "bfloat16", *extra]
    with running_server(args, tmp_path / "server.log") as server, RewardClient(server.url) as client:
        for name in ("llama", "bert"):
            got = client.score(ITEMS, model=name)
            card = next(c for c in client.models().data if c.name == name)
            assert card.device == "cuda" and card.dtype == "bfloat16"
            model = load_model(name, model_dirs[name], ServiceSettings())
            expected = model.backend.score_batch(pad_batch(encode_items(ITEMS, model.tokenizer, model.spec), model.pad_token_id))
            # bfloat16 keeps 8 bits of mantissa: rewards agree to about 1% of their scale.
            scale = float(np.abs(expected).max()) + 1e-3
            np.testing.assert_allclose(got.scores, expected, atol=0.05 * scale)
