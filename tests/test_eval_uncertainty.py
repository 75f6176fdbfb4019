"""`reward eval` for an ensemble (issue 20, "Does the uncertainty mean something?"): the AUROC of
its members' disagreement for the pairs its reward gets wrong, accuracy per quantile of that
disagreement, and its spread on inputs unlike the dev sets (`--ood`), in report.json and report.md.

The reference is each member's reward of every item from the same service, through our client
(``return_members``), and every number computed here with plain loops: the AUROC by counting
(wrong, right) pairs, the bins by sorting. Both the eval and the reference send one item per
request, so each item is one unpadded forward and both see the same floats. The AUROC helper
is also checked on planted cases whose AUROC is known, and a report built from planted members.
A model that is not an ensemble gets the report it always had.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from client import RewardClient
from trainer.data import DataError, MalformedRowError, PreferenceRecord, load_items, parse_item_row
from trainer.evaluate.config import EvalConfig
from trainer.evaluate.datasets import EvalDataset, ItemPool, ItemSet, build_preference_report, load_item_sets
from trainer.evaluate.metrics import accuracy_by_quantile, auroc, auroc_interval
from trainer.evaluate.report import render_markdown
from trainer.evaluate.uncertainty import EnsembleScores

REPO = Path(__file__).resolve().parents[1]
K = 3
BINS = 4

TOPICS = ["tea", "rain", "maps", "bread", "chess", "rivers", "bees", "trains", "paper", "salt", "wolves", "glass"]


# --------------------------------------------------------------------------- AUROC, planted


def by_counting(scores, positive) -> float:
    """AUROC as its definition: over every (positive, negative) pair, 1 when the positive scores
    higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_is_one_for_a_perfect_score_zero_reversed_and_one_half_when_all_tie():
    positive = [False, False, False, True, True]
    assert auroc([0.1, 0.2, 0.3, 0.8, 0.9], positive) == 1.0
    assert auroc([0.9, 0.8, 0.7, 0.2, 0.1], positive) == 0.0
    assert auroc([0.5] * 5, positive) == 0.5
    # positives 0.5 and 0.2 against 0.1, 0.5, 0.3: 0.5 wins twice and ties once, 0.2 wins once
    assert auroc([0.1, 0.5, 0.3, 0.5, 0.2], positive) == pytest.approx(3.5 / 6)
    assert np.isnan(auroc([1.0, 2.0], [True, True])) and np.isnan(auroc([], []))


def test_auroc_matches_counting_and_the_textbook_rank_formula_with_ties_and_counts():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    positive = rng.random(300) < 0.3
    # the textbook rank formula, with average ranks for ties
    values, inverse = np.unique(scores, return_inverse=True)
    counts = np.bincount(inverse)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2
    n_pos, n_neg = positive.sum(), (~positive).sum()
    textbook = (mid_rank[inverse][positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert auroc(scores, positive) == pytest.approx(by_counting(scores, positive)) == pytest.approx(textbook)
    # a resample's counts give the AUROC of the data with each item repeated that often
    weights = rng.integers(0, 3, (4, 300))
    for row, got in zip(weights, auroc(scores, positive, weights)):
        repeated = np.repeat(np.arange(300), row)
        assert got == pytest.approx(by_counting(scores[repeated], positive[repeated]))


def test_the_auroc_interval_is_seeded_holds_the_estimate_and_is_one_for_a_perfect_score():
    rng = np.random.default_rng(0)
    positive = rng.random(80) < 0.4
    scores = positive + rng.normal(0, 0.8, 80)
    block = auroc_interval(scores, positive, n_boot=500, seed=[1, 2])
    assert block == auroc_interval(scores, positive, n_boot=500, seed=[1, 2])
    assert block["ci_low"] < block["auroc"] < block["ci_high"]
    assert (block["n_positive"], block["n_negative"]) == (positive.sum(), (~positive).sum())
    perfect = auroc_interval(positive.astype(float), positive, n_boot=200)
    assert (perfect["auroc"], perfect["ci_low"], perfect["ci_high"]) == (1.0, 1.0, 1.0)
    lonely = auroc_interval([1.0, 2.0], [True, True], n_boot=10)
    assert np.isnan(lonely["auroc"]) and np.isnan(lonely["ci_low"])


def test_accuracy_per_quantile_bins_sorts_by_uncertainty_and_cuts_equal_bins():
    uncertainty = [0.5, 0.1, 0.4, 0.2, 0.3, 0.6, 0.7]
    chosen = [0, 1, 0, 1, 1, 0, 0]  # right on the three least uncertain pairs only
    rejected = [1, 0, 1, 0, 0, 1, 1]
    bins = accuracy_by_quantile(uncertainty, chosen, rejected, 3)
    assert [b["n_pairs"] for b in bins] == [3, 2, 2]
    assert [(b["uncertainty_low"], b["uncertainty_high"]) for b in bins] == [(0.1, 0.3), (0.4, 0.5), (0.6, 0.7)]
    assert [b["accuracy"] for b in bins] == [1.0, 0.0, 0.0]
    assert len(accuracy_by_quantile([0.1, 0.2], [1, 1], [0, 0], 5)) == 2  # never an empty bin


def test_a_report_from_planted_members_has_the_auroc_and_bins_they_were_planted_with():
    """Members that agree on the pairs the mean gets right and split on those it gets wrong:
    every pair uncertainty picks out the wrong pairs (AUROC 1) and the last bin holds them."""
    pool, records = ItemPool(), []
    for i, topic in enumerate(TOPICS):
        records.append(PreferenceRecord([{"role": "user", "content": f"About {topic}?"}], [f"good {i}", f"bad {i}"], [0, 1]))
    dataset = EvalDataset(name="planted", path="planted.jsonl", records=records, load={"malformed": 0})
    dataset.build(pool)
    members = np.zeros((len(pool), K))
    for k, (c, r) in enumerate(zip(dataset.chosen, dataset.rejected)):
        if k < 9:  # right, and every member agrees by the same margin
            members[c], members[r] = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
        else:  # wrong on the mean; one member dissents
            members[c], members[r] = [2.0, -3.0, -3.0], [0.0, 0.0, 0.0]
    ensemble = EnsembleScores(members, members.std(axis=1), "mean", None)
    config = EvalConfig(bootstrap=50).preference_report_config([dataset])
    models = [{"label": "ens", "url": "", "model": "ens", "served_model": "ens@1", "card": {"architecture": "encoder"}}]
    report = build_preference_report([dataset], {"ens": members.mean(axis=1)}, models, config, {}, None,
                                     {"ens": ensemble}, uncertainty_bins=4)
    section = report["uncertainty"]["ens"]["datasets"]["planted"]
    assert (section["n_pairs"], section["n_wrong"], section["n_ties"]) == (12, 3, 0)
    for name in ("member_diff_std", "mean_item_std", "member_disagreement", "spread_over_margin"):
        assert section["pair_error_auroc"][name]["auroc"] == 1.0, name
        assert (section["pair_error_auroc"][name]["n_positive"], section["pair_error_auroc"][name]["n_negative"]) == (3, 9)
    # the wrong pairs here have the larger margins (4/3 against 1): the reward alone cannot find them
    assert section["pair_error_auroc"]["small_margin"]["auroc"] == 0.0
    assert [b["accuracy"] for b in section["bins"]] == [1.0, 1.0, 1.0, 0.0]
    assert report["uncertainty"]["ens"]["overall"]["pair_error_auroc"] == section["pair_error_auroc"]
    markdown = render_markdown(report)
    assert "## Uncertainty: ens" in markdown and "| planted | 12 | 3 |" in markdown


# --------------------------------------------------------------------------- responses to score alone


def test_items_are_read_from_rollouts_prompt_response_rows_messages_and_preference_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"step": 1, "samples": [{"prompt": "hi", "response": "Hello!"}, {"prompt": "bye", "response": ""}]},  # reward ppo
        {"prompt": [{"role": "user", "content": "2+2?"}], "response": "4", "proxy_score": 0.3},  # best-of-n samples.jsonl
        {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Plum."}]},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},  # a preference row: both responses
        {"what": "nothing"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = load_items(path, max_bad_fraction=0.5)
    assert [(i.prompt[-1]["content"], i.response) for i in result.items] == [
        ("hi", "Hello!"), ("bye", ""), ("2+2?", "4"), ("Name a fruit.", "Plum."), ("Say hi.", "Hi!"), ("Say hi.", "No.")]
    assert (result.report.rows_read, result.report.rows_loaded, result.report.malformed) == (5, 4, 1)
    assert "{'prompt', 'response'}" in result.report.problems[0][1]
    with pytest.raises(DataError, match="too many malformed rows"):
        load_items(path)
    assert len(load_items(path, max_rows=2, max_bad_fraction=0.5).items) == 3
    with pytest.raises(MalformedRowError, match="end with the assistant's answer"):
        parse_item_row({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]})
    with pytest.raises(MalformedRowError, match="needs its 'prompt'"):
        parse_item_row({"response": "x"})


def test_the_chinese_sharegpt_pairs_are_ood_items_each_response_once(shared_data):
    pool = ItemPool()
    (zh,) = load_item_sets([str(shared_data / "sharegpt" / "dpo_zh_demo.json") + "::10"], pool, 0.0)
    assert zh.name == "sharegpt/dpo_zh_demo" and zh.load["rows_loaded"] == 10 and zh.items.size == 20
    assert any("\u4e00" <= ch <= "\u9fff" for ch in pool.items[zh.items[0]]["response"])
    with pytest.raises(DataError, match="two --ood sets are named"):
        load_item_sets([f"x={shared_data / 'sanity' / 'dev.jsonl.gz'}", f"x={shared_data / 'sanity' / 'dev.jsonl.gz'}"],
                       ItemPool(), 0.0)


# --------------------------------------------------------------------------- a tiny ensemble, served


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """TRL standard pairs on small topics; chosen and rejected differ in wording and length."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            good = f"{topic.title()} is interesting: here are {rng.randint(2, 9)} facts about {topic}."
            bad = rng.choice([f"No idea about {topic}.", f"{topic}? whatever", f"I refuse to talk about {topic} {i}."])
            f.write(json.dumps({"prompt": f"Tell me about {topic} ({i}).", "chosen": good, "rejected": bad}) + "\n")
    return path


def write_rollouts(path: Path, steps: int) -> Path:
    """What `reward ppo` writes to metrics.jsonl: per step, a few rollouts under `samples`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for step in range(steps):
            samples = [{"prompt": f"q{step}-{k} zzz", "response": f"Oome downing {step} a suer {k} {'!' * k}"} for k in range(3)]
            f.write(json.dumps({"step": step + 1, "score": -1.0, "samples": samples}) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncertainty-models")
    return {"ens": tiny_models.build_tiny_ensemble_bert(root / "ens", members=K),
            "single": tiny_models.build_tiny_bert(root / "single")}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    from server import running_server

    args = [f"--model=ens={models['ens']}", f"--model=single={models['single']}", "--max-wait-ms", "1", "--torch-threads", "1"]
    with running_server(args, tmp_path_factory.mktemp("uncertainty-logs") / "server.log") as s:
        yield s


def reward_eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "reward_cli", "eval", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def one_at_a_time(url: str):
    return RewardClient(url, chunk_size=1, max_concurrency=1)


def served_members(url: str, items: list[dict]) -> np.ndarray:
    """[items, K]: each member's reward, one item per request."""
    with one_at_a_time(url) as client:
        return np.asarray(client.score(items, model="ens", return_members=True).members, dtype=np.float64)


def pairs_of(path: Path) -> list[tuple[dict, dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [({"prompt": r["prompt"], "response": r["chosen"]}, {"prompt": r["prompt"], "response": r["rejected"]}) for r in rows]


def by_hand(url: str, path: Path, reward=lambda m: m.mean(axis=1)) -> dict:
    """The uncertainty section of one set of pairs, with loops over the members' rewards."""
    pairs = pairs_of(path)
    members = served_members(url, [x for pair in pairs for x in pair])
    chosen, rejected = members[0::2], members[1::2]
    r_chosen, r_rejected = reward(chosen), reward(rejected)
    right = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(r_chosen, r_rejected)]
    scores = {"member_diff_std": [], "mean_item_std": [], "member_disagreement": [], "spread_over_margin": [],
              "small_margin": []}
    for c, r, served_c, served_r in zip(chosen, rejected, r_chosen, r_rejected):
        diff = c - r
        spread = float(np.sqrt(np.mean((diff - diff.mean()) ** 2)))
        scores["member_diff_std"].append(spread)
        scores["spread_over_margin"].append(0.0 if spread == 0 else spread / abs(diff.mean()) if diff.mean() != 0 else math.inf)
        scores["small_margin"].append(-abs(served_c - served_r))
        scores["mean_item_std"].append((float(c.std()) + float(r.std())) / 2)
        agreement = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(c, r)) / K
        scores["member_disagreement"].append(1 - abs(2 * agreement - 1))
    decided = [k for k, x in enumerate(right) if x != 0.5]
    wrong = [right[k] == 0.0 for k in decided]
    aurocs = {name: by_counting([s[k] for k in decided], wrong) for name, s in scores.items()}
    order = sorted(range(len(pairs)), key=lambda k: scores["member_diff_std"][k])
    bins, start = [], 0
    for b in range(BINS):
        size = len(pairs) // BINS + (1 if b < len(pairs) % BINS else 0)
        members_of_bin = order[start : start + size]
        bins.append((size, sum(right[k] for k in members_of_bin) / size))
        start += size
    stds = {json.dumps(item, sort_keys=True): float(m.std()) for item, m in zip([x for p in pairs for x in p], members)}
    return {"n_pairs": len(pairs), "n_wrong": right.count(0.0), "accuracy": sum(right) / len(right), "auroc": aurocs,
            "bins": bins, "item_std": stds}


def test_an_ensemble_report_has_uncertainty_numbers_that_match_the_members_rewards(server, tmp_path):
    dev = write_pairs(tmp_path / "topics" / "dev.jsonl", 36, 0)
    other = write_pairs(tmp_path / "other.jsonl", 12, 1)
    rollouts = write_rollouts(tmp_path / "ppo" / "metrics.jsonl", 6)
    done = reward_eval("--url", server.url, "--model", "ens", "--data", str(dev), "--data", f"other={other}",
                       "--ood", str(rollouts), "--report", str(tmp_path / "report"), "--no-plots", "--bootstrap", "300",
                       "--uncertainty-bins", str(BINS), "--chunk-size", "1", "--concurrency", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    u = report["uncertainty"]["ens"]
    assert (u["members"], u["aggregate"], u["uncertainty_penalty"], u["n_bins"], u["bootstrap"]) == (K, "mean", None, BINS, 300)
    assert list(u["datasets"]) == ["topics/dev", "other"]

    hand = {name: by_hand(server.url, path) for name, path in (("topics/dev", dev), ("other", other))}
    for name, h in hand.items():
        section = u["datasets"][name]
        assert (section["n_pairs"], section["n_wrong"], section["n_ties"]) == (h["n_pairs"], h["n_wrong"], 0)
        assert 0 < h["n_wrong"] < h["n_pairs"], "a random ensemble gets some pairs right and some wrong"
        assert section["accuracy"]["accuracy"] == pytest.approx(h["accuracy"])
        assert section["accuracy"]["accuracy"] == report["datasets"][name]["models"]["ens"]["accuracy"]
        for score, value in h["auroc"].items():
            block = section["pair_error_auroc"][score]
            assert block["auroc"] == pytest.approx(value), (name, score)
            assert block["ci_low"] <= block["auroc"] <= block["ci_high"]
            assert (block["n_positive"], block["n_negative"]) == (h["n_wrong"], h["n_pairs"] - h["n_wrong"])
        assert [(b["n_pairs"], b["accuracy"]) for b in section["bins"]] == [(n, pytest.approx(a)) for n, a in h["bins"]]
        assert section["item_std"]["mean"] == pytest.approx(np.mean(list(h["item_std"].values())))

    # every set's pairs pooled
    pooled_items = {**hand["topics/dev"]["item_std"], **hand["other"]["item_std"]}
    assert u["overall"]["n_pairs"] == 48 and u["overall"]["item_std"]["n"] == len(pooled_items)

    # the rollouts against the dev sets' responses
    ood = u["ood"]["ppo/metrics"]
    rollout_items = [s for line in rollouts.read_text().splitlines() for s in json.loads(line)["samples"]]
    rollout_std = served_members(server.url, rollout_items).std(axis=1)
    assert (ood["n_items"], ood["n_shared_with_dev"], ood["load"]["rows_loaded"]) == (18, 0, 6)
    assert ood["item_std"]["mean"] == pytest.approx(rollout_std.mean())
    assert ood["item_std"]["median"] == pytest.approx(np.median(rollout_std))
    dev_std = list(pooled_items.values())
    expected = by_counting(list(rollout_std) + dev_std, [True] * 18 + [False] * len(dev_std))
    assert ood["auroc"]["auroc"] == pytest.approx(expected)
    assert (ood["auroc"]["n_positive"], ood["auroc"]["n_negative"]) == (18, len(dev_std))
    assert report["config"]["ood"] == [str(rollouts)]

    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown == done.stdout
    for heading in ("## Uncertainty: ens", "### Accuracy per quantile of pair uncertainty: ens", "### Out of distribution: ens"):
        assert heading in markdown
    assert "| all sets | 48 |" in markdown and "| ppo/metrics | 18 |" in markdown


def test_an_ensemble_is_evaluated_under_the_rule_asked_for(server, tmp_path):
    dev = write_pairs(tmp_path / "dev.jsonl", 20, 2)
    done = reward_eval("--url", server.url, "--model", "ens", "--data", f"d={dev}", "--aggregate", "mean_minus_var",
                       "--uncertainty-penalty", "3", "--report", str(tmp_path / "report"), "--no-plots", "--bootstrap", "50",
                       "--chunk-size", "1", "--concurrency", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    u = report["uncertainty"]["ens"]
    assert (u["aggregate"], u["uncertainty_penalty"]) == ("mean_minus_var", 3.0)
    assert (report["config"]["aggregate"], report["config"]["uncertainty_penalty"]) == ("mean_minus_var", 3.0)
    hand = by_hand(server.url, dev, reward=lambda m: m.mean(axis=1) - 3.0 * m.var(axis=1))
    assert report["datasets"]["d"]["models"]["ens"]["accuracy"] == pytest.approx(hand["accuracy"])
    assert u["datasets"]["d"]["pair_error_auroc"]["member_diff_std"]["auroc"] == pytest.approx(hand["auroc"]["member_diff_std"])
    assert "aggregates them by **mean_minus_var (λ = 3)**" in done.stdout


def test_the_chinese_sharegpt_pairs_through_the_service_have_the_members_spread(server, shared_data, tmp_path):
    dev = write_pairs(tmp_path / "dev.jsonl", 12, 3)
    zh = shared_data / "sharegpt" / "dpo_zh_demo.json"
    done = reward_eval("--url", server.url, "--model", "ens", "--data", f"d={dev}", "--ood", f"zh={zh}::8",
                       "--report", str(tmp_path / "report"), "--no-plots", "--bootstrap", "50",
                       "--chunk-size", "1", "--concurrency", "1")
    assert done.returncode == 0, done.stderr
    ood = json.loads((tmp_path / "report" / "report.json").read_text())["uncertainty"]["ens"]["ood"]["zh"]
    pool = ItemPool()
    (zh_set,) = load_item_sets([f"zh={zh}::8"], pool, 0.0)
    std = served_members(server.url, [pool.items[i] for i in np.unique(zh_set.items)]).std(axis=1)
    assert ood["n_items"] == std.size == 16
    assert ood["item_std"]["mean"] == pytest.approx(std.mean()) and ood["item_std"]["max"] == pytest.approx(std.max())


# --------------------------------------------------------------------------- a single model, and flags that cannot apply


def test_a_single_model_report_has_no_uncertainty_and_ensemble_flags_are_refused_naming_the_fix(server, tmp_path):
    dev = write_pairs(tmp_path / "dev.jsonl", 8, 4)
    done = reward_eval("--url", server.url, "--model", "single", "--data", f"d={dev}", "--report", str(tmp_path / "report"),
                       "--no-plots", "--bootstrap", "50")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "uncertainty" not in report and "Uncertainty" not in done.stdout
    assert not {"aggregate", "uncertainty_penalty", "ood"} & set(report["config"])

    refused = reward_eval("--url", server.url, "--model", "single", "--data", f"d={dev}", "--aggregate", "min")
    assert refused.returncode == 2
    assert "is not an ensemble" in refused.stderr and "leave them out" in refused.stderr
    refused = reward_eval("--url", server.url, "--model", "single", "--data", f"d={dev}", "--ood", str(dev))
    assert refused.returncode == 2 and "leave --ood out, or evaluate an ensemble" in refused.stderr
    # the tiny ensemble serves "mean": a λ would be ignored
    refused = reward_eval("--url", server.url, "--model", "ens", "--data", f"d={dev}", "--uncertainty-penalty", "1")
    assert refused.returncode == 2 and "add --aggregate mean_minus_var" in refused.stderr
    refused = reward_eval("--url", server.url, "--model", "ens", "--data", f"d={dev}", "--uncertainty-penalty", "-1")
    assert refused.returncode == 2 and "must be a finite number >= 0" in refused.stderr
    refused = reward_eval("--url", server.url, "--model", "ens", "--data", f"d={dev}", "--ood", f"gone={tmp_path / 'none.jsonl'}")
    assert refused.returncode == 2 and "--ood gone: data file not found" in refused.stderr


def test_the_ood_set_of_an_eval_keeps_its_items_in_file_order(tmp_path):
    rollouts = write_rollouts(tmp_path / "metrics.jsonl", 2)
    pool = ItemPool()
    pool.add([{"role": "user", "content": "before"}], "x")
    (rollout_set,) = load_item_sets([f"r={rollouts}"], pool, 0.0)
    assert isinstance(rollout_set, ItemSet) and rollout_set.items.tolist() == list(range(1, 7))
    assert pool.items[rollout_set.items[0]] == {"prompt": [{"role": "user", "content": "q0-0 zzz"}], "response": "Oome downing 0 a suer 0 "}
