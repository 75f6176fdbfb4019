"""Make what a lent GPU machine needs fit its 64 MiB transfer, and undo it there.

    python scripts/gpu/pack.py base BASE_MODEL_DIR OUT_DIR     # MiniLM: float16, byte planes, xz
    python scripts/gpu/pack.py unbase PACKED_DIR BASE_MODEL_DIR  # back to float32 safetensors
    python scripts/gpu/pack.py dir-f16 MODEL_DIR OUT.tar.xz      # a small model dir, float16 tensors
    python scripts/gpu/pack.py untar OUT.tar.xz DIR              # and back (float32 again)
    python scripts/gpu/pack.py unxz FILE.xz FILE

The base model is 87 MB in float32. In float16 its tensors are 45 MB, and splitting the file's
bytes into even and odd planes lets xz compress the planes that hold sign and exponent: 39 MB in
all. Float16 rounding moves a weight by at most about 1e-3; every model on the machine runs on the
same rounded base. Only xz/tarfile from the standard library are used there (no xz binary needed).
"""

from __future__ import annotations

import json
import lzma
import sys
import tarfile
import tempfile
from pathlib import Path

WEIGHTS = "model.safetensors"


def pack_base(src: Path, out: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save

    tensors = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in load_file(str(src / WEIGHTS)).items()}
    data = save(tensors)
    out.mkdir(parents=True, exist_ok=True)
    (out / "even.xz").write_bytes(lzma.compress(data[0::2], preset=9))
    (out / "odd.xz").write_bytes(lzma.compress(data[1::2], preset=9))
    (out / "meta.json").write_text(json.dumps({"length": len(data)}))
    with tarfile.open(out / "small.tar.xz", "w:xz") as tar:  # config, tokenizer, the package's __init__
        for f in sorted(src.rglob("*")):
            if f.is_file() and f.name != WEIGHTS:
                tar.add(f, arcname=str(f.relative_to(src)))
        if (src.parent / "__init__.py").is_file():
            tar.add(src.parent / "__init__.py", arcname="../__init__.py")


def unpack_base(src: Path, out: Path) -> None:
    from safetensors.torch import load

    length = json.loads((src / "meta.json").read_text())["length"]
    data = bytearray(length)
    data[0::2] = lzma.decompress((src / "even.xz").read_bytes())
    data[1::2] = lzma.decompress((src / "odd.xz").read_bytes())
    out.mkdir(parents=True, exist_ok=True)
    save_f32(load(bytes(data)), out / WEIGHTS)
    with tarfile.open(src / "small.tar.xz") as tar:
        for member in tar.getmembers():
            target = (out / member.name).resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())


def save_f32(tensors: dict, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: (v.float() if v.dtype == torch.float16 else v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def dir_f16(src: Path, out: Path) -> None:
    """The top-level files of a model directory, safetensors in float16, in one tar (gz or xz by suffix)."""
    import torch
    from safetensors.torch import load_file, save_file

    with tarfile.open(out, "w:gz" if out.suffix == ".gz" else "w:xz") as tar, tempfile.TemporaryDirectory() as tmp:
        for f in sorted(src.iterdir()):
            if f.suffix == ".safetensors":
                half = Path(tmp) / f.name
                save_file({k: (v.half() if v.dtype == torch.float32 else v) for k, v in load_file(str(f)).items()},
                          str(half), metadata={"format": "pt"})
                tar.add(half, arcname=f.name)
            elif f.is_file():
                tar.add(f, arcname=f.name)


def untar_f32(src: Path, out: Path) -> None:
    from safetensors.torch import load_file

    with tarfile.open(src) as tar:
        tar.extractall(out, filter="data")
    for f in out.glob("*.safetensors"):
        save_f32(load_file(str(f)), f)


def main(argv: list[str]) -> int:
    commands = {"base": pack_base, "unbase": unpack_base, "dir-f16": dir_f16, "untar": untar_f32,
                "unxz": lambda a, b: b.write_bytes(lzma.decompress(a.read_bytes()))}
    if len(argv) != 3 or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    commands[argv[0]](Path(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
