"""The comparison loop end to end, as docs/comparison-loop.md walks through it: labellers'
comparisons are in the store of a running service; `reward loop` retrains on them, evaluates the
new version against the served one on a dev set through the eval harness, and deploys it (hot
reload) only when it is not worse. Also `reward export-comparisons` and `train-rm --from-store`'s
refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client import RewardClient
from server import REPO_ROOT, running_server
from reward_core.store import ComparisonStore
from test_train_rm import fast_config, write_task
from trainer.data import DataError, load_file
from trainer.reward import train_reward_model

TOKEN = "loop-reload-token-0123456789"


def comparisons_from(path: Path) -> list[dict]:
    """The planted-preference task's rows as what a labeller sends: rankings and pairwise choices."""
    bodies = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "ranking" in row:
            bodies.append({"prompt": row["prompt"], "responses": row["responses"], "ranking": row["ranking"], "category": row["category"]})
        else:  # chosen first or second, as it would be shown
            flip = len(bodies) % 2
            responses = [row["rejected"], row["chosen"]] if flip else [row["chosen"], row["rejected"]]
            bodies.append({"prompt": row["prompt"], "responses": responses, "choice": flip, "category": row["category"]})
    return bodies


def reward_loop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reward_cli", "loop", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


@pytest.mark.slow
@pytest.mark.timeout(900)  # two trainings and two candidate servers: ~1 min on 2 quiet cores, far more on busy ones
def test_reward_loop_retrains_on_the_store_and_deploys_only_a_model_that_is_not_worse(model_dirs, tmp_path):
    versions = tmp_path / "versions"
    shutil.copytree(model_dirs["bert"], versions / "v0")  # the random-init model being served
    (versions / "current").symlink_to("v0")
    store = f"sqlite:///{tmp_path}/comparisons.db"
    dev = write_task(tmp_path / "dev.jsonl", 60, seed=1)
    banana = [{"prompt": "which snack should I pick?", "response": "a ripe banana"},
              {"prompt": "which snack should I pick?", "response": "a ripe plum"}]
    args = ["--model", f"rm={versions / 'current'}", "--store", store]
    with running_server(args, tmp_path / "server.log", env={"REWARD_RELOAD_TOKEN": TOKEN}) as server, \
            RewardClient(server.url, max_concurrency=8) as client:
        # One after the other: the store's order is the training data's order, so comparisons
        # sent from a thread pool made the trained model (and its dev accuracy, near the bar
        # below) depend on thread scheduling.
        for body in comparisons_from(write_task(tmp_path / "labelled.jsonl", 160, seed=0)):
            client.submit_comparison(**body, labeller="ann")
        served_before = client.models().data[0]
        training = ["--base-model", str(model_dirs["bert"]), "--max-length", "32", "--per-device-batch-size", "16",
                    "--warmup-ratio", "0", "--eval-steps", "0", "--save-steps", "0", "--reward-stats-samples", "200",
                    "--num-threads", "2", "--seed", "0"]
        loop = ["--from-store", store, "--url", server.url, "--model", "rm", "--versions-dir", str(versions),
                "--dev-data", f"dev={dev}", "--reload-token", TOKEN, "--threshold", "0.02"]

        first = reward_loop(*loop, *training, "--num-epochs", "3", "--learning-rate", "5e-3")
        served_after = client.models().data[0]
        scores = client.score(banana, model="rm").scores
        # A second round whose training does nothing (learning rate 0) must not replace the better model.
        second = reward_loop(*loop, *training, "--max-steps", "1", "--learning-rate", "0")
        served_finally = client.models().data[0]

    assert first.returncode == 0, first.stderr[-3000:]
    decision = json.loads(first.stdout)
    assert decision["deployed"] is True and decision["comparisons"] == 160
    assert decision["candidate_mean_accuracy"] > 0.85 and decision["served_mean_accuracy"] < 0.75
    new = versions / decision["version"]
    assert (new / "comparisons.jsonl").is_file() and (new / "eval" / "report.json").is_file()
    assert served_after.version != served_before.version and served_after.path == str(new.resolve())
    assert (versions / "current").resolve() == new.resolve()
    assert scores[0] > scores[1]  # the served model now prefers the banana
    assert len(load_file(new / "comparisons.jsonl").records) == 160

    assert second.returncode == 0, second.stderr[-3000:]
    kept = json.loads(second.stdout)
    assert kept["deployed"] is False and "kept the served model" in kept["why"]
    assert served_finally.version == served_after.version and (versions / "current").resolve() == new.resolve()
    history = [json.loads(line) for line in (versions / "history.jsonl").read_text().splitlines()]
    assert [h["deployed"] for h in history] == [True, False]


def test_export_comparisons_writes_the_rankings_the_trainer_reads(tmp_path):
    store = ComparisonStore(f"sqlite:///{tmp_path}/c.db")
    from reward_core.store import NewComparison

    store.add_comparison(NewComparison(prompt="2+2?", responses=["5", "4"], ranking=[1, 0], kind="pairwise", labeller="ann", category="math"))
    store.add_comparison(NewComparison(prompt="hi", responses=["a", "b", "c"], ranking=[2, 1, 0], kind="ranking", labeller="bob"))
    out = tmp_path / "export.jsonl"

    done = subprocess.run([sys.executable, "-m", "reward_cli", "export-comparisons", "--store", f"sqlite:///{tmp_path}/c.db",
                           "--out", str(out), "--labeller", "ann"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    missing = subprocess.run([sys.executable, "-m", "reward_cli", "export-comparisons", "--store", f"sqlite:///{tmp_path}/nope.db",
                              "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0 and json.loads(done.stdout) == {"rows": 1, "out": str(out)}
    (record,) = load_file(out).records
    assert record.best == "4" and record.category == "math"
    assert missing.returncode == 2 and "there is no SQLite store" in missing.stderr


def test_train_rm_from_an_empty_or_missing_store_says_so(model_dirs, tmp_path):
    ComparisonStore(f"sqlite:///{tmp_path}/empty.db").close()

    def from_store_only(store: str, out: str):
        config = fast_config(model_dirs["bert"], tmp_path / "unused.jsonl", tmp_path / out, from_store=store)
        config.data = []  # the store is the only data
        return config

    with pytest.raises(DataError, match="holds no comparisons yet; collect some first"):
        train_reward_model(from_store_only(f"sqlite:///{tmp_path}/empty.db", "a"))
    with pytest.raises(DataError, match="there is no SQLite store"):
        train_reward_model(from_store_only(f"sqlite:///{tmp_path}/missing.db", "b"))
