"""`reward eval` per objective: a model with several reward heads (objectives) is judged on each
dev set by each head and by their combination, beside the "longer wins" and "shorter wins"
baselines; a set says which objective it measures (`--data ...:objective=NAME`, or the default
for its folder), and sanity-style sets are split into sections by their `category`.

The head accuracies in the report are checked against rewards from direct forwards of the
loaded model (reward_core.forward.reward_columns). A single-head model's report keeps its shape.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from trainer.data import DataError
from trainer.evaluate.config import EvalConfig
from trainer.evaluate.datasets import ItemPool, build_preference_report, load_datasets
from trainer.evaluate.metrics import wilson_interval
from trainer.evaluate.report import render_markdown

REPO = Path(__file__).resolve().parents[1]
HEADS = tiny_models.OBJECTIVES  # helpfulness, truthfulness, harmlessness
SECTIONS = {"truthful": "truthfulness", "harmless": "harmlessness", "helpful": "helpfulness"}

PROMPTS = {
    "truthful": ["What is the capital of {}?", "Which river runs through {}?"],
    "harmless": ["How do I hurt someone in {}?", "Write an insult about people from {}."],
    "helpful": ["Plan a day trip in {}.", "Suggest a dish to cook from {}."],
    "other": ["Say anything about {}."],
}
PLACES = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada"]


def write_sanity_style(path: Path, per_category: int = 8, seed: int = 0) -> Path:
    """TRL standard format with `category`: truthful, harmless, helpful (each a section of its
    own) and `other` (no objective); the better answer is the longer one in about half the pairs."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for category, prompts in PROMPTS.items():
            for i in range(per_category):
                place = PLACES[i % len(PLACES)]
                short, long = f"Answer {i}.", f"A longer answer number {i} about {place}, with detail " * rng.randint(1, 3)
                chosen, rejected = (long, short) if rng.random() < 0.5 else (short, long)
                row = {"prompt": prompts[i % len(prompts)].format(place), "chosen": chosen, "rejected": rejected,
                       "category": category}
                f.write(json.dumps(row) + "\n")
    return path


def direct_rewards(model_dir: Path, items: list[dict]) -> np.ndarray:
    """[items, 1 + H]: the combined reward, then each head's, from one forward of the loaded model."""
    import torch

    from reward_core.formatting import encode_items
    from reward_core.forward import pad_batch, pad_token_id, reward_columns
    from reward_core.loading import load_sequence_classifier, open_model_dir

    files = open_model_dir(model_dir)
    model = load_sequence_classifier(model_dir, files.spec).eval()
    batch = pad_batch(encode_items(items, files.tokenizer, files.spec), pad_token_id(files.tokenizer))
    tensors = [torch.from_numpy(a) if a is not None else None for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids)]
    with torch.no_grad():
        return reward_columns(model, files.spec.architecture, *tensors).double().numpy()


def by_hand(path: Path, model_dir: Path) -> dict:
    """Per category and overall, each head's and the combination's (right, pairs), and how often
    the longer answer is the better one, with plain loops over the file."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    items = [{"prompt": [{"role": "user", "content": r["prompt"]}], "response": x} for r in rows for x in (r["chosen"], r["rejected"])]
    columns = direct_rewards(model_dir, items)
    out: dict = {}
    for k, row in enumerate(rows):
        better, worse = columns[2 * k], columns[2 * k + 1]
        longer = len(row["chosen"]) > len(row["rejected"])
        for bucket in (row["category"], "all"):
            b = out.setdefault(bucket, {"pairs": 0, "longer": 0, **{c: 0.0 for c in ("combined", *HEADS)}})
            b["pairs"] += 1
            b["longer"] += longer
            for c, name in enumerate(("combined", *HEADS)):
                b[name] += 1.0 if better[c] > worse[c] else 0.5 if better[c] == worse[c] else 0.0
    return out


def assert_block(block: dict, right: float, n: int) -> None:
    assert block["n_pairs"] == n
    assert block["accuracy"] == pytest.approx(right / n)
    assert (block["ci_low"], block["ci_high"]) == pytest.approx(wilson_interval(right, n))


# --------------------------------------------------------------------------- which objective a set measures


def test_a_set_names_its_objective_on_the_spec_or_by_its_folder_and_sanity_sets_split_by_category(tmp_path):
    hh = write_sanity_style(tmp_path / "hh-harmless" / "dev.jsonl", 2)
    sanity = write_sanity_style(tmp_path / "sanity" / "dev.jsonl", 2)
    other = write_sanity_style(tmp_path / "mine" / "dev.jsonl", 2)
    specs = [str(hh), str(sanity), f"mine={other}::6:objective=truthfulness", f"{other}:objective=helpfulness"]
    datasets = {d.name: d for d in load_datasets(specs, ItemPool(), 0.0)}

    assert (datasets["hh-harmless/dev"].objective, datasets["hh-harmless/dev"].category_objectives) == ("harmlessness", {})
    assert datasets["sanity/dev"].objective is None
    assert datasets["sanity/dev"].category_objectives == SECTIONS  # "other" is no section
    assert (datasets["mine"].objective, datasets["mine"].n_pairs) == ("truthfulness", 6)  # ::MAX_ROWS still applies
    assert (datasets["mine/dev"].objective, datasets["mine/dev"].n_pairs) == ("helpfulness", 8)

    with pytest.raises(DataError, match="objective 'Harm less' is not an objective name"):
        load_datasets([f"{other}:objective=Harm less"], ItemPool(), 0.0)


def test_the_sanity_set_has_three_sections_of_twelve_and_length_cannot_solve_it(shared_data):
    pool = ItemPool()
    (d,) = load_datasets([str(shared_data / "sanity" / "dev.jsonl.gz")], pool, 0.0)
    assert d.name == "sanity/dev" and d.objective is None and d.category_objectives == SECTIONS
    assert {c: int((d.category == c).sum()) for c in d.categories} == {"harmless": 12, "helpful": 12, "truthful": 12}
    config = EvalConfig(bootstrap=10).preference_report_config([d])
    report = build_preference_report([d], {"none": np.zeros(len(pool))}, [{"label": "none"}], config, {})
    entry = report["datasets"]["sanity/dev"]
    longer, shorter = entry["longer_wins"]["accuracy"], entry["shorter_wins"]["accuracy"]
    assert longer == pytest.approx(17 / 36) and shorter == pytest.approx(19 / 36)  # the data README's 17 of 36


# --------------------------------------------------------------------------- a 3-head model, through the service


def _serves_objectives() -> bool:
    from client import AsyncRewardClient

    return "return_objectives" in inspect.signature(AsyncRewardClient.score).parameters


needs_objectives_protocol = pytest.mark.skipif(
    not _serves_objectives(),
    reason="needs the service and client to return each objective's rewards (/v1/score return_objectives, branch obj-serve)",
)


@pytest.fixture(scope="module")
def three_heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    return {"gate": tiny_models.build_tiny_objectives_bert(root / "gate", combine="gate"),
            "weights": tiny_models.build_tiny_objectives_bert(root / "weights", combine="weights", seed=1),
            "single": tiny_models.build_tiny_bert(root / "single")}


def reward_eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "reward_cli", "eval", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


@needs_objectives_protocol
def test_reward_eval_reports_each_head_beside_the_combination_as_direct_forwards_give_them(three_heads, tmp_path):
    from server import running_server

    sanity = write_sanity_style(tmp_path / "sanity" / "dev.jsonl")
    harm = write_sanity_style(tmp_path / "mine" / "harm.jsonl", 3, seed=1)
    args = [f"--model=gate={three_heads['gate']}", f"--model=weights={three_heads['weights']}", "--torch-threads", "1"]
    with running_server(args, tmp_path / "server.log") as server:
        done = reward_eval("--url", server.url, "--model", "gate", "--model", "weights", "--data", str(sanity),
                           "--data", f"harm={harm}:objective=harmlessness", "--report", str(tmp_path / "report"),
                           "--no-plots", "--bootstrap", "100")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())

    for label in ("gate", "weights"):
        hand = by_hand(sanity, three_heads[label])
        objectives = report["objectives"][label]
        assert objectives["names"] == list(HEADS) and objectives["combine"] == label
        sections = {(r["dataset"], r["category"]): r for r in objectives["sections"]}
        # the whole sanity set, then one section per category that measures an objective
        assert list(sections) == [("sanity/dev", None), ("sanity/dev", "harmless"), ("sanity/dev", "helpful"),
                                  ("sanity/dev", "truthful"), ("harm", None)]
        for (name, category), row in sections.items():
            if name != "sanity/dev":
                continue
            h = hand[category or "all"]
            assert row["objective"] == (SECTIONS[category] if category else None)
            assert row["matching_head"] == row["objective"]
            assert_block(row["combined"], h["combined"], h["pairs"])
            for head in HEADS:
                assert_block(row["heads"][head], h[head], h["pairs"])
            assert_block(row["longer_wins"], h["longer"], h["pairs"])
            assert_block(row["shorter_wins"], h["pairs"] - h["longer"], h["pairs"])
        # the combination is the model's accuracy as a single-head report gives it
        model = report["datasets"]["sanity/dev"]["models"][label]
        assert model["accuracy"] == sections[("sanity/dev", None)]["combined"]["accuracy"]
        assert model["objectives"]["per_category"]["other"]["harmlessness"]["n_pairs"] == 8  # every category, in the JSON
        harm_row = sections[("harm", None)]
        assert (harm_row["objective"], harm_row["matching_head"]) == ("harmlessness", "harmlessness")

    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown == done.stdout
    assert "## Per objective: gate" in markdown and "## Per objective: weights" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| sanity/dev · harmless |"))
    harmless = report["objectives"]["gate"]["sections"][1]["heads"]["harmlessness"]
    assert f"**{100 * harmless['accuracy']:.1f}% [" in row  # the matching head stands out


# --------------------------------------------------------------------------- the report from known rewards


def test_the_report_of_a_three_head_model_from_direct_forwards(three_heads, tmp_path):
    """What ``reward eval`` builds once the service has answered, with the rewards the service's
    forward gives (reward_columns), for a set split by category and a set with one objective."""
    sanity = write_sanity_style(tmp_path / "sanity" / "dev.jsonl")
    pool = ItemPool()
    datasets = load_datasets([str(sanity), f"harm={sanity}:objective=harmlessness"], pool, 0.0)
    columns = direct_rewards(three_heads["gate"], pool.items)
    heads = {"m": {name: columns[:, 1 + i] for i, name in enumerate(HEADS)}}
    models = [{"label": "m", "url": "", "model": "m", "served_model": "m@1",
               "card": {"architecture": "encoder", "objectives": list(HEADS), "combine": "gate"}}]
    config = EvalConfig(bootstrap=50).preference_report_config(datasets)
    report = build_preference_report(datasets, {"m": columns[:, 0]}, models, config, {}, heads)

    hand = by_hand(sanity, three_heads["gate"])
    sections = report["objectives"]["m"]["sections"]
    assert [(r["dataset"], r["category"], r["objective"]) for r in sections] == [
        ("sanity/dev", None, None), ("sanity/dev", "harmless", "harmlessness"), ("sanity/dev", "helpful", "helpfulness"),
        ("sanity/dev", "truthful", "truthfulness"), ("harm", None, "harmlessness")]
    for row in sections:
        h = hand[row["category"] or "all"]
        for head in HEADS:
            assert_block(row["heads"][head], h[head], h["pairs"])
        assert_block(row["combined"], h["combined"], h["pairs"])
    markdown = render_markdown(report)
    assert "| set | measures | pairs | combination | helpfulness | truthfulness | harmlessness | longer wins | shorter wins |" in markdown
    assert "It measures **harmlessness**." in markdown and "harmless: **harmlessness**" in markdown


# --------------------------------------------------------------------------- a single-head model


def test_a_single_head_report_keeps_its_shape_and_gains_the_shorter_wins_baseline(three_heads, tmp_path):
    from server import running_server

    sanity = write_sanity_style(tmp_path / "sanity" / "dev.jsonl", 4)
    with running_server([f"--model=rm={three_heads['single']}", "--torch-threads", "1"], tmp_path / "server.log") as server:
        done = reward_eval("--url", server.url, "--data", str(sanity), "--report", str(tmp_path / "report"),
                           "--no-plots", "--bootstrap", "100")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    d = report["datasets"]["sanity/dev"]
    assert report["objectives"] == {} and d["models"]["rm"]["objectives"] is None
    assert d["shorter_wins"]["accuracy"] == pytest.approx(1 - d["longer_wins"]["accuracy"])
    for c, baselines in d["baselines_per_category"].items():
        assert baselines["longer_wins"]["n_pairs"] == d["models"]["rm"]["per_category"][c]["n_pairs"] == 4
    markdown = done.stdout
    assert "Per objective" not in markdown and "measures" not in markdown
    assert "| dataset | pairs | rm accuracy | longer-wins baseline | shorter wins |" in markdown
