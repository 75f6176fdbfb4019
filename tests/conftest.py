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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`), test files with slow tests go first, the longest declared
    timeout first, so the longest files are not the last ones left running on one worker while the
    other sits idle (`make test` passes --no-loadscope-reorder, so the files go out in this order).
    Tests keep their order within a file; a run in one process keeps the plain order."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return

    def declared_cost(item) -> float:
        if item.get_closest_marker("slow") is None:
            return 0.0
        timeout = item.get_closest_marker("timeout")
        return float(timeout.args[0]) if timeout and timeout.args else 300.0

    cost: dict[str, float] = {}
    for item in items:
        cost[item.path] = max(cost.get(item.path, 0.0), declared_cost(item))
    items.sort(key=lambda item: -cost[item.path])  # stable: file order, then test order, kept
