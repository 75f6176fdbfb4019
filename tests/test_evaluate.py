"""`reward eval` (trainer/evaluate/): the metric math on hand-computed fixtures, and the whole
command against the real service on loopback with a tiny reward model trained in the test on a
planted preference (responses with "banana" win), side by side, best-of-N with a toy policy,
and the failure modes (unreachable service, no usable pairs)."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.data import PreferenceRecord
from trainer.evaluate.cli import main as eval_main
from trainer.evaluate.datasets import EvalDataset, ItemPool
from trainer.evaluate.metrics import (
    accuracy_with_ties,
    agreement_rate,
    analytic_bon_kl,
    best_of_n_curve,
    best_of_n_weights,
    brier_score,
    calibration_pairs,
    default_bon_ns,
    distribution_summary,
    expected_best_of_n,
    expected_calibration_error,
    length_controlled_accuracy,
    longer_wins_accuracy,
    paired_bootstrap_diff,
    pair_outcomes,
    pearson,
    reliability_bins,
    spearman,
    wilson_interval,
)
from trainer.evaluate.scoring import make_targets

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- hand-computed fixture
# 10 pairs: rewards of the chosen and rejected answers and their lengths (characters).
CHOSEN = [2.0, 1.0, 0.5, 0.3, 1.0, -1.0, 0.0, 2.0, 1.5, 0.2]
REJECTED = [1.0, 0.0, 0.5, 0.8, -1.0, 0.0, 0.0, 1.0, 1.0, 0.4]
#   outcome: 1    1    .5   0    1    0    .5   1    1    0    -> 6 / 10, two ties
LEN_CHOSEN = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
LEN_REJECTED = [20, 10, 30, 50, 40, 70, 60, 70, 80, 110]
#   chosen is:  S   L   =   S   L   S   L   L   L   S


def test_accuracy_counts_ties_as_half_and_reports_them():
    assert pair_outcomes(CHOSEN, REJECTED).tolist() == [1, 1, 0.5, 0, 1, 0, 0.5, 1, 1, 0]
    accuracy, ties = accuracy_with_ties(CHOSEN, REJECTED)
    assert accuracy == pytest.approx(0.6) and ties == 2
    assert math.isnan(accuracy_with_ties([], [])[0])


def test_wilson_interval_matches_the_textbook_value():
    # 6 of 10, 95%: the Wilson score interval is (0.3127, 0.8318)
    low, high = wilson_interval(6, 10)
    assert (low, high) == (pytest.approx(0.31267, abs=1e-4), pytest.approx(0.83182, abs=1e-4))
    # by the formula, with z = 1.959964
    z, p, n = 1.959964, 0.6, 10
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert low == pytest.approx(center - half, abs=1e-6) and high == pytest.approx(center + half, abs=1e-6)
    # never outside [0, 1], even at the edges, and it narrows with n
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 20)[1] > 0 and wilson_interval(20, 20)[0] < 1
    assert np.diff(wilson_interval(60, 100)) < np.diff(wilson_interval(6, 10))


def test_length_controlled_accuracy_and_the_longer_wins_baseline():
    result = length_controlled_accuracy(CHOSEN, REJECTED, LEN_CHOSEN, LEN_REJECTED)
    # chosen shorter: pairs 0, 3, 5, 9 -> outcomes 1, 0, 0, 0
    assert result["shorter_chosen"] == {"accuracy": pytest.approx(0.25), "n_pairs": 4, "n_ties": 0}
    # chosen longer: pairs 1, 4, 6, 7, 8 -> outcomes 1, 1, 0.5, 1, 1
    assert result["longer_chosen"] == {"accuracy": pytest.approx(0.9), "n_pairs": 5, "n_ties": 1}
    assert result["equal_length_pairs"] == 1
    assert result["length_controlled_accuracy"] == pytest.approx((0.25 + 0.9) / 2)
    # longer wins in 5 pairs, loses in 4, one equal-length pair counts half
    assert longer_wins_accuracy(LEN_CHOSEN, LEN_REJECTED) == (pytest.approx(0.55), 1)
    # no pair with a shorter chosen answer: the mean is undefined, not the other group's value
    only_longer = length_controlled_accuracy([1.0], [0.0], [5], [3])
    assert math.isnan(only_longer["length_controlled_accuracy"]) and only_longer["longer_chosen"]["accuracy"] == 1.0


def test_correlations():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 10, 100, 1000], [1, 2, 3, 4]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(pearson([1.5, 1.5, 3], [1, 2, 3]))  # average ranks
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_ece_and_brier_by_hand():
    probs, labels = [0.05, 0.15, 0.95, 1.0], [0, 1, 1, 1]
    bins = reliability_bins(probs, labels)
    assert [b["n"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]  # p = 1.0 lands in the last bin
    assert bins[9]["mean_p"] == pytest.approx(0.975) and bins[9]["frac_a_better"] == 1.0
    assert expected_calibration_error(probs, labels) == pytest.approx(0.25 * 0.05 + 0.25 * 0.85 + 0.5 * 0.025)
    assert brier_score(probs, labels) == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0) / 4)


def test_an_overconfident_scorer_has_a_high_ece_and_a_calibrated_one_a_low_one():
    rng = np.random.default_rng(0)
    # over-confident: a margin of 8 (p = 0.9997) on every pair, but right on only 6 of 10
    right = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    chosen = np.where(right, 8.0, 0.0)
    rejected = np.where(right, 0.0, 8.0)
    probs, labels = calibration_pairs(chosen, rejected, rng)
    assert 0 < labels.sum() < 10  # both orders occur, so labels are 0 and 1
    over = expected_calibration_error(probs, labels)
    assert over > 0.3 and over == pytest.approx(0.9997 - 0.6, abs=1e-3)
    assert brier_score(probs, labels) == pytest.approx(0.4 * 0.9997**2 + 0.6 * 0.0003**2, abs=1e-3)
    # calibrated: the chosen answer really wins with probability sigmoid(margin) (Bradley-Terry)
    margin = rng.uniform(-3, 3, 20000)
    chosen_wins = rng.random(margin.size) < 1 / (1 + np.exp(-margin))
    r_chosen = np.where(chosen_wins, margin, -margin) / 2  # the true winner is "chosen"
    probs, labels = calibration_pairs(r_chosen, -r_chosen, rng)
    assert expected_calibration_error(probs, labels) < 0.03
    # the same scorer made over-confident by scaling its rewards is badly calibrated
    probs, labels = calibration_pairs(10 * r_chosen, -10 * r_chosen, rng)
    assert expected_calibration_error(probs, labels) > 0.15


def test_paired_bootstrap_and_agreement():
    a = np.array([1, 0, 1, 1, 0.5, 0, 1, 1, 0, 1] * 30, dtype=float)
    same = paired_bootstrap_diff(a, a, n_boot=500, seed=1)
    assert (same["diff"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    all_better = paired_bootstrap_diff(np.zeros(50), np.ones(50), n_boot=200)
    assert (all_better["diff"], all_better["low"], all_better["high"]) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(3)
    b = np.where(rng.random(a.size) < 0.2, 1 - a, a)
    result = paired_bootstrap_diff(a, b, n_boot=4000, seed=7)
    assert result == paired_bootstrap_diff(a, b, n_boot=4000, seed=7)  # seeded
    assert result["diff"] == pytest.approx(b.mean() - a.mean())
    assert result["low"] < result["diff"] < result["high"]
    d = b - a  # the percentile interval is close to the normal one for a mean of 300 pairs
    assert result["high"] - result["low"] == pytest.approx(2 * 1.96 * d.std() / math.sqrt(d.size), rel=0.15)

    # winners: + + - 0 + vs + - - 0 - : same in pairs 0, 2, 3
    assert agreement_rate([1.0, 2.0, -1.0, 0.0, 0.5], [3.0, -1.0, -2.0, 0.0, -0.1]) == pytest.approx(3 / 5)


def test_distribution_summary():
    s = distribution_summary([1, 2, 3, 4, 5])
    assert (s["n"], s["mean"], s["median"], s["min"], s["max"]) == (5, 3.0, 3.0, 1.0, 5.0)
    assert s["std"] == pytest.approx(math.sqrt(2)) and (s["q25"], s["q75"]) == (2.0, 4.0)
    assert (s["q05"], s["q95"]) == (pytest.approx(1.2), pytest.approx(4.8))


# --------------------------------------------------------------------------- best-of-N math


def test_analytic_kl():
    assert analytic_bon_kl(1) == 0.0
    assert analytic_bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert analytic_bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert default_bon_ns(16) == [1, 2, 4, 8, 16] and default_bon_ns(12) == [1, 2, 4, 8, 12]


def test_best_of_n_estimator_equals_brute_force_over_all_subsets():
    rng = np.random.default_rng(0)
    N = 7
    proxy, gold = rng.normal(size=N), rng.normal(size=N)
    for n in range(1, N + 1):
        subsets = list(itertools.combinations(range(N), n))
        want_proxy = np.mean([max(proxy[list(s)]) for s in subsets])
        want_gold = np.mean([gold[max(s, key=lambda i: proxy[i])] for s in subsets])
        assert expected_best_of_n(proxy, n) == pytest.approx(want_proxy, abs=1e-12)
        assert expected_best_of_n(proxy, n, gold) == pytest.approx(want_gold, abs=1e-12)
        assert best_of_n_weights(N, n).sum() == pytest.approx(1.0)
    assert expected_best_of_n(proxy, 1) == pytest.approx(proxy.mean())
    assert expected_best_of_n(proxy, N) == pytest.approx(proxy.max())
    # proxy ties: the pick among tied samples is uniformly random -> their gold scores average
    assert expected_best_of_n([1.0, 1.0, 0.0], 2, [3.0, 5.0, 0.0]) == pytest.approx((4 + 3 + 5) / 3)
    # large N: the binomial weights stay exact (no overflow)
    assert best_of_n_weights(512, 256).sum() == pytest.approx(1.0)


def test_best_of_n_curve_is_non_decreasing_and_averages_prompts():
    rng = np.random.default_rng(1)
    proxy, gold = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    curve = best_of_n_curve(proxy, gold)
    assert curve["n"] == [1, 2, 4, 8, 16]
    assert curve["kl"] == [analytic_bon_kl(n) for n in curve["n"]]
    assert all(b >= a for a, b in zip(curve["proxy"], curve["proxy"][1:]))
    assert curve["proxy"][0] == pytest.approx(proxy.mean()) and curve["proxy"][-1] == pytest.approx(proxy.max(axis=1).mean())
    assert curve["gold"][0] == pytest.approx(gold.mean())
    assert curve["gold"][-1] == pytest.approx(np.mean([gold[p, proxy[p].argmax()] for p in range(5)]))
    assert best_of_n_curve(proxy)["gold"] is None


# --------------------------------------------------------------------------- data and flags


def test_kway_records_give_all_implied_pairs_and_responses_are_scored_once():
    prompt = [{"role": "user", "content": "pick a fruit"}]
    records = [
        PreferenceRecord(prompt, ["banana", "cherry", "plum"], [0, 1, 2], category="3-way"),
        PreferenceRecord(prompt, ["banana", "plum"], [0, 1], category="pair"),  # same prompt, same responses
        PreferenceRecord([{"role": "user", "content": "other"}], ["banana", "x"], [1, 0]),
    ]
    pool = ItemPool()
    d = EvalDataset(name="t", path="t.jsonl", records=records, load={})
    d.build(pool)
    assert d.n_pairs == 3 + 1 + 1
    assert len(pool) == 3 + 2  # the second record's responses are already in the pool
    assert d.categories == ["(none)", "3-way", "pair"]
    chosen = [pool.items[i]["response"] for i in d.chosen]
    assert chosen == ["banana", "banana", "cherry", "banana", "x"]


def test_url_and_model_combinations():
    assert [(t.url, t.model) for t in make_targets(["u"], ["a", "b"])] == [("u", "a"), ("u", "b")]
    assert [(t.url, t.model) for t in make_targets(["u", "v"], [])] == [("u", None), ("v", None)]
    assert [(t.url, t.model) for t in make_targets(["u", "v"], ["a", "b"])] == [("u", "a"), ("v", "b")]
    with pytest.raises(ValueError, match="2 --url and 3 --model"):
        make_targets(["u", "v"], ["a", "b", "c"])


def test_a_dataset_without_usable_pairs_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "same", "rejected": "same"}\n{"nothing": 1}\n')
    assert eval_main(["eval", "--url", "http://127.0.0.1:9", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "no usable rows" in err and "nothing to evaluate" in err
    assert eval_main(["eval"]) == 2
    assert "--data" in capsys.readouterr().err


# --------------------------------------------------------------------------- against the real service

WORDS = "the a good nice small big red green blue fresh sweet sour ripe tasty yellow bright soft hard round".split()
FRUITS = ["grape", "lemon", "mango", "peach", "plum", "pear"]


def _sentence(rng: random.Random, fruit: str) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
    words.insert(rng.randrange(len(words) + 1), fruit)
    return " ".join(words)


def write_fixture(path: Path, n: int, seed: int) -> Path:
    """Planted preference: a response with "banana" is always best. Pairs (TRL standard format) in
    two categories and 3-way rankings; lengths are random, so length says nothing."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"which snack should I pick for day {i}?"
            if i % 4 == 0:
                responses = [_sentence(rng, rng.choice(FRUITS)), _sentence(rng, "banana"), _sentence(rng, rng.choice(FRUITS))]
                row = {"prompt": prompt, "responses": responses, "ranking": [1, 0, 2], "category": "ranked"}
            else:
                row = {"prompt": prompt, "chosen": _sentence(rng, "banana"), "rejected": _sentence(rng, rng.choice(FRUITS)),
                       "category": "morning" if i % 2 else "evening"}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny BERT trained on the planted preference with the project's trainer, and an untrained one."""
    import tiny_models
    from trainer.reward import train_reward_model
    from trainer.reward_config import RewardTrainingConfig

    root = tmp_path_factory.mktemp("eval-models")
    bert = tiny_models.build_tiny_bert(root / "bert")
    train = write_fixture(root / "train.jsonl", 128, 0)
    config = RewardTrainingConfig(
        base_model=str(bert), data=[str(train)], output_dir=str(root / "rm"), max_length=48, per_device_batch_size=16,
        learning_rate=3e-3, warmup_ratio=0.0, num_epochs=3, eval_steps=0, save_steps=0, progress=False,
        reward_stats_samples=100, num_threads=1,  # 1 thread: 2 threads on a busy 2-core machine are ~10x slower
    )
    result = train_reward_model(config)
    assert result.finished
    return {"rm": root / "rm", "bert": bert, "dev": write_fixture(root / "dev.jsonl", 40, 1)}


@pytest.fixture(scope="module")
def server(planted, tmp_path_factory):
    from server import running_server

    args = [f"--model=rm={planted['rm']}", f"--model=bert={planted['bert']}", "--max-wait-ms", "2", "--torch-threads", "1"]
    with running_server(args, tmp_path_factory.mktemp("eval-logs") / "server.log") as s:
        yield s


def reward_eval(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # the policy's torch threads
    return subprocess.run(
        [sys.executable, "-m", "reward_cli", "eval", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
    )


def served_scores(url: str, model: str, items: list[dict]) -> list[float]:
    from client import RewardClient

    with RewardClient(url) as client:
        return client.score(items, model=model).scores


def by_hand(path: Path, url: str, model: str) -> dict:
    """Accuracy overall and per category, from the service's scores, with plain loops."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pairs = []  # (category, prompt, better, worse)
    for row in rows:
        if "responses" in row:
            r = row["ranking"]
            pairs += [(row["category"], row["prompt"], row["responses"][r[i]], row["responses"][r[j]])
                      for i in range(len(r)) for j in range(i + 1, len(r))]
        else:
            pairs.append((row["category"], row["prompt"], row["chosen"], row["rejected"]))
    items = [{"prompt": p, "response": x} for _, p, b, w in pairs for x in (b, w)]
    scores = served_scores(url, model, items)
    out: dict = {"pairs": [], "total": [0.0, 0, 0], "per_category": {}}
    for k, (category, _, better, worse) in enumerate(pairs):
        sb, sw = scores[2 * k], scores[2 * k + 1]
        right = 1.0 if sb > sw else 0.5 if sb == sw else 0.0
        out["pairs"].append((sb - sw, right))
        for bucket in (out["total"], out["per_category"].setdefault(category, [0.0, 0, 0])):
            bucket[0] += right
            bucket[1] += 1
            bucket[2] += right == 0.5
    return out


def test_reward_eval_report_matches_the_service_scores(server, planted, tmp_path):
    report_dir = tmp_path / "report"
    done = reward_eval("--url", server.url, "--model", "rm", "--model", "bert", "--data", f"snacks={planted['dev']}",
                       "--report", str(report_dir), "--bootstrap", "500")
    assert done.returncode == 0, done.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert report["schema_version"] == 1 and report["kind"] == "preference"
    assert [m["label"] for m in report["models"]] == ["rm", "bert"]
    assert report["models"][0]["served_model"].startswith("rm@")
    d = report["datasets"]["snacks"]
    assert d["n_records"] == 40 and d["n_pairs"] == 10 * 3 + 30
    assert d["categories"] == ["evening", "morning", "ranked"]

    hand = {model: by_hand(planted["dev"], server.url, model) for model in ("rm", "bert")}
    for model in ("rm", "bert"):
        m, h = d["models"][model], hand[model]
        assert m["n_pairs"] == h["total"][1] and m["n_ties"] == h["total"][2]
        assert m["accuracy"] == pytest.approx(h["total"][0] / h["total"][1])
        assert (m["ci_low"], m["ci_high"]) == pytest.approx(wilson_interval(h["total"][0], h["total"][1]))
        for category, (right, n, ties) in h["per_category"].items():
            assert m["per_category"][category]["accuracy"] == pytest.approx(right / n), (model, category)
            assert m["per_category"][category]["n_pairs"] == n and m["per_category"][category]["n_ties"] == ties
        assert sum(b["n"] for b in m["calibration"]["bins"]) == d["n_pairs"]
        assert 0 <= m["calibration"]["ece"] <= 1 and 0 < m["calibration"]["label_mean"] < 1
        assert m["reward_distribution"]["all"]["n"] == d["n_unique_responses"]
        assert set(m["reward_distribution"]["per_category"]) == set(d["categories"])
        lc = m["length"]
        assert lc["shorter_chosen"]["n_pairs"] + lc["longer_chosen"]["n_pairs"] + lc["equal_length_pairs"] == d["n_pairs"]
    # the planted preference is learned; length is not what it learned
    assert d["models"]["rm"]["accuracy"] > 0.85
    assert d["models"]["rm"]["length"]["length_controlled_accuracy"] > 0.8
    assert 0.25 < d["longer_wins"]["accuracy"] < 0.75

    # side by side: the same pairs, the difference and the agreement from the same scores
    (comparison,) = d["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["n_pairs"]) == ("rm", "bert", d["n_pairs"])
    assert comparison["accuracy_a"] == d["models"]["rm"]["accuracy"] and comparison["accuracy_b"] == d["models"]["bert"]["accuracy"]
    assert comparison["diff"] == pytest.approx(comparison["accuracy_b"] - comparison["accuracy_a"])
    assert comparison["diff_ci_low"] <= comparison["diff"] <= comparison["diff_ci_high"]
    same = [np.sign(a[0]) == np.sign(b[0]) for a, b in zip(hand["rm"]["pairs"], hand["bert"]["pairs"])]
    assert comparison["agreement"] == pytest.approx(np.mean(same))

    markdown = (report_dir / "report.md").read_text()
    assert markdown == done.stdout
    for category in d["categories"]:
        assert f"| {category} |" in markdown
    assert "Side by side" in markdown and "rm" in markdown and "bert" in markdown

    import matplotlib.image

    plots = report["plots"]["snacks"]
    assert set(plots) == {"reliability", "reward_vs_length"}
    for name in plots.values():
        path = report_dir / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_two_urls_side_by_side_and_the_same_model_agrees_with_itself(server, planted, tmp_path, capsys):
    # Two URLs that reach the same service: labels are made unique, the models agree everywhere.
    code = eval_main(["eval", "--url", server.url, "--url", server.url + "/", "--data", str(planted["dev"]),
                      "--report", str(tmp_path), "--no-plots", "--bootstrap", "200"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert len(set(labels)) == 2 and all(label.startswith("rm") for label in labels)  # rm is the default model
    (name,) = report["datasets"]
    assert name == f"{planted['dev'].parent.name}/dev"  # named after its folder and file stem
    (comparison,) = report["datasets"][name]["comparisons"]
    assert comparison["agreement"] == 1.0 and comparison["diff"] == 0.0
    assert (comparison["diff_ci_low"], comparison["diff_ci_high"]) == (0.0, 0.0)
    assert report["plots"] == {}


def toy_policy(out: Path, n_positions: int) -> Path:
    """A random-init 2-layer GPT-2 causal LM with a context of ``n_positions`` tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import tiny_models

    torch.manual_seed(0)
    tokenizer = tiny_models.bpe_tokenizer(None, with_pad=False)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=n_positions,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_best_of_n_with_a_toy_policy(server, planted, tmp_path):
    policy = toy_policy(tmp_path / "policy", n_positions=128)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        "which snack should I pick?", {"prompt": "name a fruit"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "banana or plum?"}]},
    ]) + "\n")

    report_dir = tmp_path / "bon"
    done = reward_eval("best-of-n", "--url", server.url, "--model", "bert", "--gold-model", "rm", "--policy", str(policy),
                       "--prompts", str(prompts), "--n", "8", "--max-new-tokens", "8", "--seed", "3",
                       "--report", str(report_dir))
    assert done.returncode == 0, done.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert report["kind"] == "best_of_n"
    bon = report["best_of_n"]
    assert (bon["n_prompts"], bon["n_samples"], bon["proxy"], bon["gold"]) == (3, 8, "bert", "rm")
    assert (bon["generation"]["max_prompt_length"], bon["generation"]["prompts_truncated"]) == (None, 0)  # all fit in 128
    curve = bon["curve"]
    assert [r["n"] for r in curve] == [1, 2, 4, 8]
    assert [r["kl"] for r in curve] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75, math.log(8) - 7 / 8])
    proxy = [r["proxy_reward"] for r in curve]
    assert all(b >= a for a, b in zip(proxy, proxy[1:])) and proxy[-1] > proxy[0]
    assert all(r["gold_reward"] is not None for r in curve)

    # the curve is the estimator applied to the samples' scores, and those are the service's scores
    samples = [json.loads(line) for line in (report_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8
    proxy_scores = np.array([s["proxy_score"] for s in samples]).reshape(3, 8)
    gold_scores = np.array([s["gold_score"] for s in samples]).reshape(3, 8)
    expected = best_of_n_curve(proxy_scores, gold_scores)
    assert proxy == pytest.approx(expected["proxy"]) and [r["gold_reward"] for r in curve] == pytest.approx(expected["gold"])
    items = [{"prompt": s["prompt"], "response": s["response"]} for s in samples[:5]]
    assert served_scores(server.url, "rm", items) == pytest.approx([s["gold_score"] for s in samples[:5]], abs=1e-5)
    assert "| 8 |" in (report_dir / "report.md").read_text()
    assert (report_dir / "best-of-n.png").read_bytes()[:8] == PNG_MAGIC

    # seeded: sampling again with the same seed gives the same responses
    from trainer.evaluate.best_of_n import generate_samples, read_prompt_file

    again = generate_samples(policy, read_prompt_file(prompts), 8, max_new_tokens=8, seed=3)
    assert [text for row in again for text in row] == [s["response"] for s in samples]

    # the same samples judged again by other models (proxy and gold swapped): nothing is sampled
    rescored_dir = tmp_path / "bon-again"
    done = reward_eval("best-of-n", "--url", server.url, "--model", "rm", "--gold-model", "bert",
                       "--samples", str(report_dir / "samples.jsonl"), "--max-prompts", "2", "--report", str(rescored_dir))
    assert done.returncode == 0, done.stderr
    rescored = json.loads((rescored_dir / "report.json").read_text())["best_of_n"]
    assert (rescored["n_prompts"], rescored["n_samples"], rescored["policy"], rescored["generation"]) == (2, 8, None, None)
    assert rescored["samples_source"] == str(report_dir / "samples.jsonl")
    again = [json.loads(line) for line in (rescored_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["prompt"], s["response"]) for s in again] == [(s["prompt"], s["response"]) for s in samples[:16]]
    assert [s["proxy_score"] for s in again] == pytest.approx([s["gold_score"] for s in samples[:16]], abs=1e-5)
    assert [r["proxy_reward"] for r in rescored["curve"]] == pytest.approx(best_of_n_curve(gold_scores[:2])["proxy"], abs=1e-5)
    assert "scored again (nothing sampled)" in (rescored_dir / "report.md").read_text()
    # --samples replaces the policy: both at once is refused before anything is scored
    both = reward_eval("best-of-n", "--url", server.url, "--model", "rm", "--policy", str(policy),
                       "--samples", str(report_dir / "samples.jsonl"))
    assert both.returncode == 2 and "leave out --policy" in both.stderr
    neither = reward_eval("best-of-n", "--url", server.url, "--model", "rm", "--prompts", str(prompts))
    assert neither.returncode == 2 and "--policy DIR" in neither.stderr and "--samples" in neither.stderr


def test_samples_file_to_score_again_must_have_the_same_samples_per_prompt(tmp_path):
    from trainer.data import DataError
    from trainer.evaluate.best_of_n import read_samples_file

    def write(rows):
        path = tmp_path / "samples.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def row(p, s, response="ok"):
        return {"prompt_index": p, "sample_index": s, "prompt": f"question {p}", "response": response, "proxy_score": 1.0}

    prompts, responses = read_samples_file(write([row(1, 1, "b"), row(0, 0, "x"), row(1, 0, "a"), row(0, 1, "y")]))
    assert prompts == [[{"role": "user", "content": "question 0"}], [{"role": "user", "content": "question 1"}]]
    assert responses == [["x", "y"], ["a", "b"]]  # by prompt, then sample index, whatever the file's order
    for rows, says in (
        ([row(0, 0), row(0, 1), row(1, 0)], "different numbers of samples"),
        ([row(0, 0), row(0, 2)], "sample_index must run 0 .. 1"),
        ([row(0, 0), row(0, 0)], "has sample 0 twice"),
        ([row(0, 0), {"prompt_index": 0, "sample_index": 1, "prompt": "q"}], "line 2"),
        ([], "no samples"),
    ):
        with pytest.raises(DataError, match=says):
            read_samples_file(write(rows))


def test_best_of_n_keeps_the_end_of_a_prompt_longer_than_the_policy_context(tmp_path):
    from trainer.evaluate.best_of_n import generate_samples
    from trainer.sft import SFTConfigError

    policy = toy_policy(tmp_path / "policy", n_positions=64)
    long_prompt = [{"role": "user", "content": "tell me about bananas " * 100}]  # far past 64 tokens
    short_prompt = [{"role": "user", "content": "name a fruit"}]

    truncated: list[int] = []
    samples = generate_samples(policy, [short_prompt, long_prompt], 2, max_new_tokens=8, truncated_prompts=truncated)
    assert [len(row) for row in samples] == [2, 2]
    assert truncated == [1]  # only the long one was cut, to 64 - 8 tokens

    # a prompt limit the context cannot hold is capped to it (60 + 8 > 64)
    truncated.clear()
    generate_samples(policy, [long_prompt], 1, max_new_tokens=8, max_prompt_length=60, truncated_prompts=truncated)
    assert truncated == [0]

    # new tokens that leave no room for a prompt are refused before sampling, saying which flag to change
    with pytest.raises(SFTConfigError, match="--max-new-tokens 64 leaves no room for a prompt"):
        generate_samples(policy, [short_prompt], 1, max_new_tokens=64)


def test_an_unreachable_service_fails_with_a_clear_message(planted):
    from server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    done = reward_eval("--url", url, "--data", str(planted["dev"]), "--max-retries", "1", "--backoff", "0.01", timeout=60)
    assert done.returncode == 1
    assert "cannot reach the reward service" in done.stderr and url in done.stderr and "reward serve" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unknown_model_is_named_with_what_is_served(server, planted, capsys):
    code = eval_main(["eval", "--url", server.url, "--model", "nope", "--data", str(planted["dev"]), "--no-plots"])
    assert code == 1
    err = capsys.readouterr().err
    assert "'nope' is not served" in err and "rm, bert" in err


def test_report_plots_are_saved_as_palette_pngs_that_look_like_the_figure(tmp_path):
    # Reports are committed and travel to lent GPU machines under a size limit: a plot is written
    # with 256 palette colours, which a line plot does not need more of.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from trainer.evaluate.report import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for k in range(4):
        ax.errorbar(range(10), [math.sin(x / 3 + k) for x in range(10)], yerr=0.1, marker="o", label=f"rule {k}")
    ax.legend()
    save_figure(fig, tmp_path / "palette.png", dpi=100)
    fig.savefig(tmp_path / "rgba.png", dpi=100)
    plt.close(fig)

    palette, rgba = Image.open(tmp_path / "palette.png"), Image.open(tmp_path / "rgba.png")
    assert palette.mode == "P" and palette.size == rgba.size
    assert (tmp_path / "palette.png").stat().st_size < (tmp_path / "rgba.png").stat().st_size / 2
    difference = np.abs(np.asarray(palette.convert("RGB"), dtype=float) - np.asarray(rgba.convert("RGB"), dtype=float))
    assert difference.mean() < 1.0  # of 255: the same picture
