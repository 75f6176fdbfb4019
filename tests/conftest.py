from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Before anything imports torch (its OpenMP runtime reads this once, when it loads), here and in
# every process the tests start (servers, CLIs, torchrun): OpenMP threads that wait sleep instead
# of spinning. Spinning threads are what make a 2-thread torch op on a busy 2-core machine (other
# tests, other workers, a server beside its client) take 10x as long as on 1 thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import tiny_models  # noqa: E402

SHARED_DATA = TESTS.parents[1] / "shared" / "data"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-init BERT / Llama (chat template) / GPT-2 (no template, no pad token) and the
    real MiniLM backbone with a seeded head, each saved as a model directory."""
    root = tmp_path_factory.mktemp("models")
    return {
        "bert": tiny_models.build_tiny_bert(root / "bert"),
        "llama": tiny_models.build_tiny_llama(root / "llama"),
        "gpt2": tiny_models.build_tiny_gpt2(root / "gpt2"),
        "minilm": tiny_models.build_minilm_rm(root / "minilm"),
    }


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the preference data at {SHARED_DATA} (../shared/data from the repo root)")
    return SHARED_DATA
