"""Ensembles against over-optimisation (issue 20): `reward eval best-of-n --proxy-rules`, `reward
ppo --reward-aggregate` and `scripts/overoptimisation.py`, against the real service on loopback
serving a tiny three-member ensemble (the proxy) and a tiny single model (the gold).

Each rule's numbers are checked against its formula applied here, in numpy, to the members'
rewards the service returns, and against the service itself asked for that rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rlhf_fixtures
import tiny_models
from client import RewardClient
from reward_core.ensemble import RewardRule, parse_reward_rule
from server import REPO_ROOT, running_server
from trainer.evaluate.metrics import best_of_n_curve, expected_best_of_n
from trainer.ppo import PPOConfig, PPOTrainer, RewardScorer

torch.set_num_threads(1)

K = 3
# The ensemble's own served default, so a request that names no rule is told apart from one that does.
SERVED_RULE, SERVED_PENALTY = "mean_minus_var", 0.5
PENALTY = 2.0  # the lambda the tests ask for
ALL_RULES = ["member:0", "mean", "min", "mean_minus_var"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def by_formula(members: np.ndarray, rule: str, penalty: float) -> np.ndarray:
    """Each rule written out on its own (not through reward_core), on members [..., K]."""
    if rule.startswith("member:"):
        return members[..., int(rule.split(":")[1])]
    if rule == "mean":
        return members.mean(axis=-1)
    if rule == "min":
        return members.min(axis=-1)
    assert rule == "mean_minus_var"
    return members.mean(axis=-1) - penalty * ((members - members.mean(axis=-1, keepdims=True)) ** 2).mean(axis=-1)


def varied_single_model(out: Path) -> Path:
    """A tiny single BERT whose weights are shaken so its rewards differ from item to item (a
    fresh one scores every text nearly alike, which would leave the gold curves flat)."""
    from transformers import AutoModelForSequenceClassification

    path = tiny_models.build_tiny_bert(out, seed=1)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("overopt")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": rlhf_fixtures.snack_prompt(i)}) + "\n" for i in range(8)))
    return {
        "root": root,
        "proxy": tiny_models.build_tiny_ensemble_bert(root / "proxy", members=K, aggregate=SERVED_RULE,
                                                      uncertainty_penalty=SERVED_PENALTY),
        "gold": varied_single_model(root / "gold"),
        "policy": rlhf_fixtures.build_tiny_gpt2_lm(root / "policy"),
        "prompts": prompts,
    }


@pytest.fixture(scope="module")
def server(world):
    args = [f"--model=proxy={world['proxy']}", f"--model=gold={world['gold']}", "--max-wait-ms", "2", "--torch-threads", "1"]
    with running_server(args, world["root"] / "server.log") as s:
        yield s


def served_members(url: str, items: list[dict]) -> np.ndarray:
    with RewardClient(url) as client:
        return np.asarray(client.score(items, model="proxy", return_members=True).members)


def served_rule(url: str, items: list[dict], rule: str, penalty: float | None = None) -> np.ndarray:
    with RewardClient(url) as client:
        return np.asarray(client.score(items, model="proxy", aggregate=rule, uncertainty_penalty=penalty).scores)


def reward_eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "reward_cli", "eval", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


# --------------------------------------------------------------------------- the rules themselves


def test_rules_parse_and_unknown_ones_are_refused():
    assert parse_reward_rule("min") == RewardRule(aggregate="min")
    assert parse_reward_rule(" member:2 ") == RewardRule(member=2) and str(RewardRule(member=2)) == "member:2"
    for bad in ("median", "member:", "member:-1", "member:x", "MIN", ""):
        with pytest.raises(ValueError, match="unknown reward rule"):
            parse_reward_rule(bad)
    with pytest.raises(ValueError, match="names member 3, but the ensemble has 3"):
        RewardRule(member=3).check_members(3)


# --------------------------------------------------------------------------- best-of-n under several rules


def test_best_of_n_under_every_rule_matches_each_formula_on_the_members(world, server, tmp_path):
    report_dir = tmp_path / "bon"
    done = reward_eval("best-of-n", "--url", server.url, "--model", "proxy", "--gold-model", "gold",
                       "--policy", str(world["policy"]), "--prompts", str(world["prompts"]), "--max-prompts", "3",
                       "--n", "8", "--max-new-tokens", "6", "--seed", "5", "--proxy-rules", ",".join(ALL_RULES),
                       "--uncertainty-penalty", str(PENALTY), "--report", str(report_dir))
    assert done.returncode == 0, done.stderr
    bon = json.loads((report_dir / "report.json").read_text())["best_of_n"]
    assert bon["proxy_rules"] == ALL_RULES and bon["members"] == K and bon["uncertainty_penalty"] == PENALTY
    assert list(bon["by_rule"]) == ALL_RULES

    samples = [json.loads(line) for line in (report_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8
    members = np.array([s["proxy_members"] for s in samples]).reshape(3, 8, K)
    gold = np.array([s["gold_score"] for s in samples]).reshape(3, 8)
    # the members in the samples file are the service's
    items = [{"prompt": s["prompt"], "response": s["response"]} for s in samples]
    assert np.allclose(served_members(server.url, items), members.reshape(-1, K), atol=1e-6)
    for rule in ALL_RULES:
        expected = best_of_n_curve(by_formula(members, rule, PENALTY), gold)
        curve = bon["by_rule"][rule]
        assert [r["n"] for r in curve] == [1, 2, 4, 8]
        assert [r["proxy_reward"] for r in curve] == pytest.approx(expected["proxy"], abs=1e-9), rule
        assert [r["gold_reward"] for r in curve] == pytest.approx(expected["gold"], abs=1e-9), rule
        assert [r["proxy_reward_sem"] for r in curve] == pytest.approx(expected["proxy_sem"], abs=1e-9), rule
        spread = best_of_n_curve(by_formula(members, rule, PENALTY), members.std(axis=-1))["gold"]
        assert [r["ensemble_std"] for r in curve] == pytest.approx(spread, abs=1e-9), rule
        # against the first rule (one member), prompt by prompt: the mean difference and its standard error
        if rule != ALL_RULES[0]:
            for i, n in enumerate([1, 2, 4, 8]):
                mine = [expected_best_of_n(by_formula(members, rule, PENALTY)[p], n, gold[p]) for p in range(3)]
                first = [expected_best_of_n(members[p, :, 0], n, gold[p]) for p in range(3)]
                difference = np.array(mine) - np.array(first)
                assert curve[i]["gold_minus_first"] == pytest.approx(difference.mean(), abs=1e-9), (rule, n)
                assert curve[i]["gold_minus_first_sem"] == pytest.approx(difference.std(ddof=1) / np.sqrt(3), abs=1e-9)
        else:
            assert "gold_minus_first" not in curve[0]
        # against the rule's own gold peak, prompt by prompt: how far the gold fell after it
        per_n = np.array([[expected_best_of_n(by_formula(members, rule, PENALTY)[p], n, gold[p]) for p in range(3)]
                          for n in [1, 2, 4, 8]])
        fall = per_n - per_n[int(np.argmax(per_n.mean(axis=1)))]
        assert [r["gold_minus_peak"] for r in curve] == pytest.approx(fall.mean(axis=1), abs=1e-9), rule
        assert [r["gold_minus_peak_sem"] for r in curve] == pytest.approx(fall.std(axis=1, ddof=1) / np.sqrt(3), abs=1e-9)
    # the service, asked for each of its rules, agrees with the formula on the members
    for rule in ("mean", "min", "mean_minus_var"):
        penalty = PENALTY if rule == "mean_minus_var" else None
        assert np.allclose(served_rule(server.url, items, rule, penalty), by_formula(members.reshape(-1, K), rule, PENALTY),
                           atol=1e-5), rule
    # the rules pick differently: the members disagree
    assert not np.allclose(by_formula(members, "min", 0), by_formula(members, "member:0", 0))
    # n = 1 is every sample's gold mean whatever the rule; the curve without rules is the served default's
    assert {round(bon["by_rule"][rule][0]["gold_reward"], 9) for rule in ALL_RULES} == {round(float(gold.mean()), 9)}
    default = best_of_n_curve(by_formula(members, SERVED_RULE, SERVED_PENALTY), gold)
    assert [r["proxy_reward"] for r in bon["curve"]] == pytest.approx(default["proxy"], abs=1e-5)
    check = bon["by_rule_check"]
    assert check["served_rule"] == SERVED_RULE and check["ok"] and check["max_abs_diff"] < 1e-5

    markdown = (report_dir / "report.md").read_text()
    assert "The proxy under each rule" in markdown and "| n | KL (nats) | member:0 | mean | min | mean_minus_var |" in markdown
    assert (report_dir / "best-of-n-rules.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("flags, message", [
    (["--proxy-rules", "mean,median"], "unknown reward rule 'median'"),
    (["--proxy-rules", "min,member:3"], "names member 3, but the ensemble has 3 (member:0 to member:2)"),
    (["--proxy-rules", "min", "--uncertainty-penalty", "1"], "which --proxy-rules (min) does not name"),
    (["--uncertainty-penalty", "1"], "give --proxy-rules with mean_minus_var"),
    (["--proxy-rules", "mean_minus_var", "--uncertainty-penalty", "-1"], "uncertainty_penalty must be a finite number >= 0"),
    (["--proxy-rules", "mean", "--normalize"], "--normalize is not for --proxy-rules"),
    (["--model", "gold", "--proxy-rules", "mean"], "--proxy-rules needs an ensemble proxy; gold@"),
])
def test_bad_proxy_rules_are_refused_before_any_sampling(world, server, tmp_path, capsys, flags, message):
    from trainer.evaluate.cli import main as eval_main

    model = [] if "--model" in flags else ["--model", "proxy"]
    code = eval_main(["eval", "best-of-n", "--url", server.url, *model, "--policy", str(world["policy"]),
                      "--prompts", str(world["prompts"]), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "sampling" not in err and "Traceback" not in err


def test_the_preference_modes_flags_given_before_best_of_n(world, server, capsys):
    """`reward eval --aggregate R best-of-n` is refused (the proxy's curve is its served rule's; the
    rules are --proxy-rules), and a λ given before `best-of-n` reaches the rules' check (the two
    modes share the flag's dest; the subparser does not reset it)."""
    from trainer.evaluate.cli import main as eval_main

    common = ["--url", server.url, "--model", "proxy", "--policy", str(world["policy"]), "--prompts", str(world["prompts"])]
    code = eval_main(["eval", "--aggregate", "min", "best-of-n", *common, "--proxy-rules", "min"])
    err = capsys.readouterr().err
    assert code == 2 and "--aggregate is for the preference mode" in err and "sampling" not in err, err
    code = eval_main(["eval", "--uncertainty-penalty", "1", "best-of-n", *common, "--proxy-rules", "min"])
    err = capsys.readouterr().err
    assert code == 2 and "which --proxy-rules (min) does not name" in err and "sampling" not in err, err


# --------------------------------------------------------------------------- PPO under a rule


def test_the_scorer_asks_the_service_for_the_rule_and_reads_a_member_from_the_members(server):
    items = [{"prompt": rlhf_fixtures.snack_prompt(i), "response": fruit}
             for i, fruit in enumerate(["banana", "plum", "a ripe grape", "lemon"])]
    members = served_members(server.url, items)
    for rule, penalty in (("min", None), ("mean_minus_var", PENALTY), ("member:1", None), (None, None)):
        scorer = RewardScorer(server.url, "proxy", {}, rule=parse_reward_rule(rule) if rule else None,
                              uncertainty_penalty=penalty, gold_model="gold")
        try:
            scorer.check(max_retries=1)
            scored = scorer.submit(items).result()
            logged = scorer.describe_rule()
        finally:
            scorer.close()
        want = by_formula(members, rule or SERVED_RULE, penalty or SERVED_PENALTY)
        assert np.allclose(scored.rewards, want, atol=1e-5), rule
        assert np.allclose(scored.ensemble_std, members.std(axis=-1), atol=1e-5)
        assert np.allclose(scored.ensemble_mean, members.mean(axis=-1), atol=1e-5)
        with RewardClient(server.url) as client:
            assert np.allclose(scored.gold, client.score(items, model="gold").scores, atol=1e-6)
        assert logged == {"reward_rule": rule or SERVED_RULE,
                          "reward_uncertainty_penalty": PENALTY if rule == "mean_minus_var" else
                          SERVED_PENALTY if rule is None else None}
    # a single model: no rule, no spread
    scorer = RewardScorer(server.url, "gold", {})
    try:
        scorer.check(max_retries=1)
        scored = scorer.submit(items).result()
        assert scored.ensemble_std is None and scorer.describe_rule()["reward_rule"] == "single model"
    finally:
        scorer.close()


def test_ppo_with_reward_aggregate_min_sends_it_and_logs_rule_spread_and_gold(world, server, tmp_path, monkeypatch):
    from client import AsyncRewardClient

    sent: list[dict] = []
    score = AsyncRewardClient.score

    async def recording(self, items, model=None, *args, **kwargs):
        sent.append({"model": model, **kwargs})
        return await score(self, items, model, *args, **kwargs)

    monkeypatch.setattr(AsyncRewardClient, "score", recording)
    config = PPOConfig(policy=str(world["policy"]), prompts=str(world["prompts"]), output_dir=str(tmp_path),
                       reward_url=server.url, reward_model="proxy", reward_aggregate="min", gold_reward_model="gold",
                       total_steps=2, rollout_batch_size=8, minibatch_size=8, ppo_epochs=1, max_new_tokens=6,
                       reward_shift_batches=1, num_threads=1, progress=False, save_steps=0, seed=3)
    trainer = PPOTrainer(config)
    rollout = trainer.generate_rollout(1)
    scored = trainer.scorer.submit(rollout.items()).result()
    members = served_members(server.url, rollout.items())
    assert np.allclose(scored.rewards, members.min(axis=-1), atol=1e-5)
    assert not np.allclose(scored.rewards, members.mean(axis=-1), atol=1e-3)
    result = trainer.run()
    assert result.finished

    proxy_requests = [s for s in sent if s["model"] == "proxy"]
    assert proxy_requests and all(s["aggregate"] == "min" and s["return_uncertainty"] for s in proxy_requests)
    assert all(not s.get("aggregate") for s in sent if s["model"] == "gold")
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert h["reward_rule"] == "min" and h["reward_uncertainty_penalty"] is None
        assert h["ensemble_std"] > 0 and isinstance(h["ensemble_mean"], float) and isinstance(h["gold_score"], float)
    assert json.loads((tmp_path / "ppo_config.json").read_text())["reward_aggregate"] == "min"


@pytest.mark.parametrize("flags, message", [
    (["--reward-model", "proxy", "--reward-aggregate", "median"], "unknown reward rule 'median'"),
    (["--reward-model", "proxy", "--reward-aggregate", "member:7"], "names member 7, but the ensemble has 3"),
    (["--reward-model", "gold", "--reward-aggregate", "min"], "--reward-aggregate min: gold@"),
    (["--reward-model", "proxy", "--reward-aggregate", "min", "--reward-uncertainty-penalty", "1"],
     "give it with --reward-aggregate mean_minus_var"),
    (["--reward-model", "proxy", "--reward-aggregate", "mean_minus_var", "--reward-uncertainty-penalty", "nan"],
     "uncertainty_penalty must be a finite number >= 0"),
    (["--reward-model", "proxy", "--gold-reward-url", "http://127.0.0.1:1"], "give the model too"),
])
def test_bad_ppo_rules_exit_2_before_any_training(world, server, tmp_path, capsys, flags, message):
    from reward_cli import main

    code = main(["ppo", "--num-threads", "1", "--no-progress", "--policy", str(world["policy"]), "--prompts",
                 str(world["prompts"]), "--output-dir", str(tmp_path / "out"), "--reward-url", server.url, *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- the experiment, tiny


def script_module(name: str):
    """scripts/NAME.py, imported (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_finds_the_gold_peak_and_calls_a_fall_only_beyond_twice_the_error():
    script = script_module("overoptimisation")
    # two seeds, windows of 2 steps: gold peaks in the second window, then falls while the proxy rises
    logs = {
        "1": [{"step": i + 1, "kl": i, "score": i, "gold_score": g, "ensemble_std": 0.1 * i} for i, g in enumerate([0, 0, 2, 2, 1, 1])],
        "2": [{"step": i + 1, "kl": i, "score": i, "gold_score": g, "ensemble_std": 0.1 * i} for i, g in enumerate([0, 0, 2, 2, 0, 0])],
    }
    curve = script.across_seeds({seed: script.ppo_windows(rows, 2) for seed, rows in logs.items()})
    assert [p["steps"] for p in curve] == [[1, 2], [3, 4], [5, 6]]
    assert [p["gold_score"] for p in curve] == [0, 2, 0.5] and curve[2]["gold_score_sem"] == pytest.approx(0.5)
    assert [p["kl"] for p in curve] == [0.5, 2.5, 4.5]
    summary = script.peak_and_end(curve, "gold_score", "score", "kl")
    assert (summary["gold_peak"], summary["kl_at_gold_peak"], summary["gold_drop_from_peak"]) == (2, 2.5, 1.5)
    assert summary["gold_fell_while_proxy_rose"]  # 1.5 > 2 x 0.5
    curve[2]["gold_score_sem"] = 1.0
    assert not script.peak_and_end(curve, "gold_score", "score", "kl")["gold_fell_while_proxy_rose"]
    # one seed: no error over seeds to judge the fall by, so the report gives the fall and no verdict
    alone = script.peak_and_end(script.across_seeds({"1": script.ppo_windows(logs["1"], 2)}), "gold_score", "score", "kl")
    assert alone["gold_fell_while_proxy_rose"] is None and alone["gold_drop_from_peak"] == 1
    assert script.fell_verdict(alone) == "n/a, one seed (fell 1.000 from its peak)"
    # best-of-N's points share their prompts: the fall's own paired error decides when the curve carries it
    bon = [{"kl": 0.0, "gold_reward": 0.0, "proxy_reward": 0.0, "gold_reward_sem": 0.5, "gold_minus_peak_sem": 0.0},
           {"kl": 1.0, "gold_reward": 1.0, "proxy_reward": 1.0, "gold_reward_sem": 0.5, "gold_minus_peak_sem": 0.0},
           {"kl": 2.0, "gold_reward": 0.8, "proxy_reward": 2.0, "gold_reward_sem": 0.5, "gold_minus_peak_sem": 0.05}]
    paired = script.peak_and_end(bon, "gold_reward", "proxy_reward", "kl")
    assert paired["gold_fell_while_proxy_rose"] and paired["gold_drop_paired"]  # 0.2 > 2 x 0.05, though 0.2 < 2 x 0.5
    assert paired["gold_drop_from_peak"] == pytest.approx(0.2) and paired["gold_drop_from_peak_sem"] == 0.05
    del bon[2]["gold_minus_peak_sem"]
    assert not script.peak_and_end(bon, "gold_reward", "proxy_reward", "kl")["gold_fell_while_proxy_rose"]


def test_ppo_rules_are_compared_with_the_first_at_matched_kl_paired_by_seed():
    matched_kl = script_module("overoptimisation").matched_kl

    def windows(slope, kls):
        return [{"kl": kl, "gold_score": slope * kl, "score": 0.0, "ensemble_std": 0.0} for kl in kls]

    runs = {
        "member:0": {"1": windows(0.10, [0, 4, 8, 12]), "2": windows(0.10, [0, 6, 12]), "3": windows(0.10, [0, 9])},
        # KL out of order within a run: read in KL order; gold 0.02 a nat above the single member in seed 1, 0.04 in seed 2
        "mean": {"1": windows(0.12, [0, 10, 5, 20]), "2": windows(0.14, [0, 7, 14])},
    }
    rows = matched_kl(runs, "member:0", 5.0)
    assert list(rows) == ["mean"]
    # seed 3 has no run of `mean`, so it pairs nothing; both pairs reach KL 12 at most, so KL 15 is out
    assert [r["kl"] for r in rows["mean"]] == [5.0, 10.0]
    five = rows["mean"][0]
    assert five["seeds"] == 2 and five["gold_minus_reference"] == pytest.approx((0.02 * 5 + 0.04 * 5) / 2)
    assert five["sem"] == pytest.approx(0.05)  # differences 0.1 and 0.2
    half = 12.706 * 0.05  # t(0.975, 1 degree of freedom)
    assert five["ci95"] == pytest.approx([0.15 - half, 0.15 + half], abs=1e-3)


def test_the_gold_labels_pairs_of_each_prompts_samples_and_noise_flips_its_share():
    pairs_of = script_module("gold_labelled_proxy").gold_labelled_pairs
    prompt = [{"role": "user", "content": "Hi"}]
    samples = []
    for p in range(400):  # four samples a prompt, gold scores planted: the odd sample is better
        samples += [{"prompt_index": p, "sample_index": s, "prompt": prompt, "response": f"answer {p}.{s}",
                     "gold_score": float(s % 2) + 0.01 * s} for s in (3, 1, 0, 2)]  # rows out of order
    samples += [{"prompt_index": 400, "sample_index": s, "prompt": prompt, "response": "same", "gold_score": float(s)}
                for s in range(2)]  # one pair of equal texts: no label to give
    samples += [{"prompt_index": 401, "sample_index": s, "prompt": prompt, "response": text, "gold_score": float(s)}
                for s, text in enumerate(["", "Hello"])]  # an empty answer: not for a labeller
    pairs, counts = pairs_of(samples, 0.0, seed=0)
    assert counts == {"pairs": 800, "flipped": 0, "skipped_ties": 1, "skipped_empty": 1, "prompts": 402}
    # disjoint pairs 0 v 1 and 2 v 3; the gold's better one chosen
    assert [(p["chosen"], p["rejected"]) for p in pairs[:2]] == [("answer 0.1", "answer 0.0"), ("answer 0.3", "answer 0.2")]
    assert all(p["chosen"].endswith((".1", ".3")) and not p["flipped"] for p in pairs)
    noisy, counts = pairs_of(samples, 0.25, seed=0)
    assert 0.20 < counts["flipped"] / counts["pairs"] < 0.30
    assert all(p["chosen"].endswith((".0", ".2")) == p["flipped"] for p in noisy)
    assert noisy == pairs_of(samples, 0.25, seed=0)[0]  # the seed fixes which labels flip
    with pytest.raises(ValueError, match="0.5"):
        pairs_of(samples, 0.5, seed=0)


@pytest.mark.slow  # four PPO runs and a best-of-N run, each a process of its own
def test_the_overoptimisation_script_runs_end_to_end_at_a_tiny_size(world, tmp_path):
    report = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "SFT": str(world["policy"]),
           "PROMPTS": str(world["prompts"]), "HELD_OUT": str(world["prompts"]), "REPORT_DIR": str(report),
           "SEEDS": "1", "BON_N": "4", "BON_PROMPTS": "2", "PPO_STEPS": "2", "ROLLOUT": "8", "MAX_NEW_TOKENS": "6",
           "WINDOW": "1", "THREADS": "1", "DEVICE": "cpu", "PARALLEL": "2"}
    done = subprocess.run([sys.executable, "scripts/overoptimisation.py", str(world["proxy"]), str(world["gold"]),
                           str(tmp_path / "runs")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((report / "summary.json").read_text())
    assert summary["rules"] == ALL_RULES and summary["members"] == K and summary["seeds"] == ["1"]
    assert list(summary["best_of_n"]["curves"]) == ALL_RULES and summary["best_of_n"]["by_rule_check"]["ok"]
    for rule in ALL_RULES:
        curve = summary["ppo"]["curves"][rule]
        assert len(curve) == 2 and all(p["gold_score"] is not None and p["ensemble_std"] > 0 for p in curve), rule
        log = [json.loads(line) for line in (report / "ppo" / rule.replace(":", "-") / "seed1" / "metrics.jsonl").read_text().splitlines()]
        assert {h["reward_rule"] for h in log} == {rule}
    assert (report / "overoptimisation.png").read_bytes()[:8] == PNG_MAGIC
    assert (report / "best-of-n" / "report.json").is_file()
    for name in ("best_of_n.csv", "ppo_curves.csv"):
        assert len((report / name).read_text().splitlines()) > 1
    readme = (report / "README.md").read_text()
    assert "## Best-of-N" in readme and "## PPO" in readme and "| member:0 |" in readme
    # each rule against the first, paired: best-of-N by prompt, PPO by seed at matched KL
    assert all("gold_minus_first" in summary["best_of_n"]["curves"][rule][-1] for rule in ALL_RULES[1:])
    assert summary["ppo"]["reference_rule"] == "member:0" and set(summary["ppo"]["matched_kl"]) == set(ALL_RULES[1:])

    # the report again from what the run left (as from logs brought back from a GPU machine): nothing is run
    again = tmp_path / "again"
    redone = subprocess.run([sys.executable, "scripts/overoptimisation.py", "/nonexistent/proxy", "/nonexistent/gold",
                             str(tmp_path / "runs")], cwd=REPO_ROOT, env={**env, "REPORT_ONLY": "1", "REPORT_DIR": str(again)},
                            capture_output=True, text=True, timeout=300)
    assert redone.returncode == 0, redone.stdout[-3000:] + redone.stderr[-3000:]
    assert json.loads((again / "summary.json").read_text()) == summary
    assert (again / "README.md").read_text() == readme

    # with no PPO seeds the report is best-of-N's alone, and says so (a CPU-only run)
    bon_only = tmp_path / "bon-only"
    redone = subprocess.run([sys.executable, "scripts/overoptimisation.py", "/nonexistent/proxy", "/nonexistent/gold",
                             str(tmp_path / "runs")], cwd=REPO_ROOT,
                            env={**env, "REPORT_ONLY": "1", "REPORT_DIR": str(bon_only), "SEEDS": ""},
                            capture_output=True, text=True, timeout=300)
    assert redone.returncode == 0, redone.stdout[-3000:] + redone.stderr[-3000:]
    alone = (bon_only / "README.md").read_text()
    assert "no PPO: SEEDS was empty" in alone and "Not run: SEEDS was empty" in alone and "| member:0 |" in alone
    assert "PPO_STEPS" not in alone and "PPO run(s) at a time" not in alone
    assert json.loads((bon_only / "summary.json").read_text())["best_of_n"] == summary["best_of_n"]
    assert (bon_only / "overoptimisation.png").read_bytes()[:8] == PNG_MAGIC


def test_a_time_budget_stops_the_ppo_runs_still_going_and_names_them(tmp_path, monkeypatch):
    """On a GPU the runs share the device PARALLEL at a time; DEADLINE_S stops what is still
    running (and what never started), so a fixed time budget still yields a report."""
    script = script_module("overoptimisation")
    started = []

    def slow_run(url, policy, prompts, rule, seed, run_dir, device):
        started.append((rule, seed))
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    monkeypatch.setattr(script, "ppo_command", slow_run)
    monkeypatch.setenv("PARALLEL", "2")
    monkeypatch.setenv("DEADLINE_S", "2")
    cut = script.run_all_ppo("http://unused", tmp_path, tmp_path, ["mean", "min"], ["1", "2"], tmp_path, "cpu")
    assert started == [("mean", "1"), ("mean", "2")]  # two at a time, in order
    assert cut == {"mean/1": "stopped at DEADLINE_S", "mean/2": "stopped at DEADLINE_S",
                   "min/1": "not started before DEADLINE_S", "min/2": "not started before DEADLINE_S"}
