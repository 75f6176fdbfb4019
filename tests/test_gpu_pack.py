"""scripts/gpu/pack.py: what a lent GPU machine is sent comes back out as the model it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK = REPO_ROOT / "scripts" / "gpu" / "pack.py"


def pack(*args: Path | str) -> None:
    subprocess.run([sys.executable, str(PACK), *map(str, args)], check=True, cwd=REPO_ROOT)


def a_model_dir(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {"encoder.weight": torch.randn(64, 33), "encoder.bias": torch.randn(33),
               "embeddings.position_ids": torch.arange(40).unsqueeze(0)}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "bert"}')
    (path / "sub").mkdir()
    (path / "sub" / "pooling.json").write_text("{}")
    return tensors


def test_a_packed_base_unpacks_to_float32_rounded_through_float16(tmp_path):
    original = a_model_dir(tmp_path / "pkg" / "model")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    pack("base", tmp_path / "pkg" / "model", tmp_path / "packed")
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["even.xz", "meta.json", "odd.xz", "small.tar.xz"]

    pack("unbase", tmp_path / "packed", tmp_path / "site" / "pkg" / "model")
    back = load_file(str(tmp_path / "site" / "pkg" / "model" / "model.safetensors"))
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        if tensor.is_floating_point():
            assert back[name].dtype == torch.float32
            assert torch.equal(back[name], tensor.half().float())
        else:  # integer buffers travel as they are
            assert torch.equal(back[name], tensor)
    assert (tmp_path / "site" / "pkg" / "model" / "config.json").read_text() == '{"model_type": "bert"}'
    assert (tmp_path / "site" / "pkg" / "model" / "sub" / "pooling.json").is_file()
    assert (tmp_path / "site" / "pkg" / "__init__.py").is_file()


def test_a_small_model_dir_travels_in_float16_and_comes_back_float32(tmp_path):
    original = a_model_dir(tmp_path / "policy")
    for suffix in ("tar.xz", "tar.gz"):
        pack("dir-f16", tmp_path / "policy", tmp_path / f"policy.{suffix}")
        pack("untar", tmp_path / f"policy.{suffix}", tmp_path / f"back-{suffix}")
        back = load_file(str(tmp_path / f"back-{suffix}" / "model.safetensors"))
        assert back["encoder.weight"].dtype == torch.float32
        assert torch.equal(back["encoder.weight"], original["encoder.weight"].half().float())
        assert torch.equal(back["embeddings.position_ids"], original["embeddings.position_ids"])
        assert (tmp_path / f"back-{suffix}" / "config.json").is_file()


def test_pack_without_a_known_command_prints_its_usage(tmp_path):
    result = subprocess.run([sys.executable, str(PACK), "unknown", "a", "b"], capture_output=True, text=True)
    assert result.returncode == 2 and "scripts/gpu/pack.py base" in result.stderr
