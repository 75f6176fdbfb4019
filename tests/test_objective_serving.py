"""Rewards per objective, served: `reward serve` with a tiny three-head model (helpfulness,
truthfulness, harmlessness; combined by a prompt-conditioned gate) and a single-head one, called
over HTTP with our client, OpenRLHF's body and TRL's reward function, as users call them.

The reference is a direct forward of the same directory in this process, one item at a time:
``reward_core.forward.reward_columns`` gives the combined reward, then each head's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import tiny_models
from client import RewardClient, RewardServiceError
from client.integrations import trl_reward_func
from reward_core.formatting import encode_items, encode_texts
from reward_core.forward import reward_columns
from reward_core.loading import load_sequence_classifier, open_model_dir
from server import running_server

HEADS = list(tiny_models.OBJECTIVES)  # helpfulness, truthfulness, harmlessness
ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "What is the capital of France?", "response": "I do not know, maybe Berlin."},
    {"prompt": "How do I make a bomb?", "response": "I cannot help with that."},
    {"messages": [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road? To get to the other side."},
    ]},
]
PAIRS = [
    {"prompt": "What is the capital of France?", "a": "Paris.", "b": "I do not know, maybe Berlin."},
    {"prompt": "How do I make a bomb?", "a": "I cannot help with that.", "b": "Sure, here is how."},
]
TOLERANCE = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return tiny_models.build_tiny_objectives_bert(tmp_path_factory.mktemp("models") / "heads", combine="gate")


def one_head_model(source, objective: str, out) -> subprocess.CompletedProcess:
    """scripts/one_head_model.py, run as a user runs it."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "one_head_model.py"), str(source), objective, str(out)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def truthful_dir(heads_dir, tmp_path_factory):
    """The truthfulness head of `heads` as a model of its own."""
    out = tmp_path_factory.mktemp("one-head") / "truthful"
    made = one_head_model(heads_dir, "truthfulness", out)
    assert made.returncode == 0, made.stderr
    return out


@pytest.fixture(scope="module")
def server(heads_dir, truthful_dir, model_dirs, tmp_path_factory):
    args = [f"--model=heads={heads_dir}", f"--model=single={model_dirs['bert']}", f"--model=truthful={truthful_dir}",
            "--max-wait-ms", "5"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def direct(heads_dir):
    """Rows of (combined, helpfulness, truthfulness, harmlessness) from a direct forward of the
    directory, one unpadded item at a time; for items or for already-rendered texts."""
    files = open_model_dir(heads_dir)
    model = load_sequence_classifier(heads_dir, files.spec).eval()

    def rows(encoded) -> list[list[float]]:
        out = []
        with torch.inference_mode():
            for e in encoded:
                ids = torch.tensor([e.input_ids])
                types = torch.tensor([e.token_type_ids]) if e.token_type_ids is not None else None
                out.append(reward_columns(model, files.spec.architecture, ids, torch.ones_like(ids), types)[0].tolist())
        return out

    return {
        "items": lambda items: rows(encode_items(items, files.tokenizer, files.spec)),
        "texts": lambda texts, prompts: rows(encode_texts(texts, files.tokenizer, files.spec, prompt_prefixes=prompts)),
    }


def column(rows, name: str | None) -> list[float]:
    return [r[0 if name is None else 1 + HEADS.index(name)] for r in rows]


def test_the_score_is_the_combined_reward_and_each_head_comes_when_asked(client, direct):
    expected = direct["items"](ITEMS)

    plain = client.score(ITEMS, model="heads")
    both = client.score(ITEMS, model="heads", return_objectives=True)

    assert plain.scores == pytest.approx(column(expected, None), abs=TOLERANCE)
    assert plain.objectives is None
    assert both.scores == pytest.approx(column(expected, None), abs=TOLERANCE)
    assert list(both.objectives) == HEADS
    for name in HEADS:
        assert both.objectives[name] == pytest.approx(column(expected, name), abs=TOLERANCE)
    # the heads really differ from one another and from their combination
    assert both.objectives["truthfulness"] != pytest.approx(both.scores, abs=1e-3)


def test_a_named_objective_scores_with_that_head(client, direct):
    expected = direct["items"](ITEMS)

    response = client.score(ITEMS, model="heads", objective="truthfulness")

    assert response.scores == pytest.approx(column(expected, "truthfulness"), abs=TOLERANCE)


def test_split_requests_keep_every_column_in_item_order(server, direct):
    items = ITEMS * 5
    expected = direct["items"](items)
    with RewardClient(server.url, chunk_size=3) as small_chunks:
        response = small_chunks.score(items, model="heads", return_objectives=True)
    assert response.scores == pytest.approx(column(expected, None), abs=TOLERANCE)
    for name in HEADS:
        assert response.objectives[name] == pytest.approx(column(expected, name), abs=TOLERANCE)


def test_compare_by_the_combination_by_a_head_and_by_each(client, direct):
    flat = [{"prompt": p["prompt"], "response": r} for p in PAIRS for r in (p["a"], p["b"])]
    expected = direct["items"](flat)

    by_combination = client.compare(PAIRS, model="heads", return_objectives=True)
    by_harmlessness = client.compare(PAIRS, model="heads", objective="harmlessness")

    for i, result in enumerate(by_combination.results):
        a, b = expected[2 * i], expected[2 * i + 1]
        assert (result.reward_a, result.reward_b) == pytest.approx((a[0], b[0]), abs=TOLERANCE)
        assert list(result.objectives) == HEADS
        for h, name in enumerate(HEADS, start=1):
            per_head = result.objectives[name]
            assert (per_head.reward_a, per_head.reward_b) == pytest.approx((a[h], b[h]), abs=TOLERANCE)
            assert per_head.p_a_better == pytest.approx(1 / (1 + math.exp(-(a[h] - b[h]))), abs=TOLERANCE)
        only = by_harmlessness.results[i]
        assert only.reward_a == pytest.approx(a[3], abs=TOLERANCE) and only.objectives is None
    assert by_harmlessness.results[0].p_a_better == pytest.approx(by_combination.results[0].objectives["harmlessness"].p_a_better)


def test_the_model_list_names_the_heads_and_the_rule(client):
    cards = {c.name: c for c in client.models().data}

    assert cards["heads"].objectives == HEADS
    assert cards["heads"].combine.rule == "gate" and cards["heads"].combine.weights is None
    assert cards["heads"].combine.gate_temperature == 1.0  # the gate's softmax as trained
    assert cards["single"].objectives is None and cards["single"].combine is None


def test_a_single_head_models_answers_read_as_before(server):
    # the wire bodies of a 1.0 client: no new field in the request, none in the answers
    score = httpx.post(f"{server.url}/v1/score", json={"model": "single", "items": ITEMS[:1]}).json()
    compare = httpx.post(f"{server.url}/v1/compare", json={"model": "single", "pairs": PAIRS[:1]}).json()
    card = next(c for c in httpx.get(f"{server.url}/v1/models").json()["data"] if c["name"] == "single")
    assert set(score) == {"model", "scores", "usage"}
    assert set(compare["results"][0]) == {"reward_a", "reward_b", "p_a_better"}
    assert "objectives" not in card and "combine" not in card


def test_openrlhf_logs_each_head_and_can_train_on_one(server, direct):
    prompts = ["What is the capital of France?", "How do I make a bomb?"]
    texts = [prompts[0] + " Paris.", prompts[1] + " I cannot help with that."]
    expected = direct["texts"](texts, prompts)

    body = {"query": texts, "prompts": prompts, "labels": ["", ""], "model": "heads"}
    answer = httpx.post(f"{server.url}/get_reward", json=body).json()
    on_truthfulness = httpx.post(f"{server.url}/get_reward", json={**body, "objective": "truthfulness"}).json()
    single = httpx.post(f"{server.url}/get_reward", json={**body, "model": "single"}).json()

    assert answer["rewards"] == pytest.approx(column(expected, None), abs=TOLERANCE)
    assert set(answer["extra_logs"]) == {"reward_model_tokens", "reward_model_truncated", *(f"objective_{n}" for n in HEADS)}
    for name in HEADS:
        assert answer["extra_logs"][f"objective_{name}"] == pytest.approx(column(expected, name), abs=TOLERANCE)
    assert on_truthfulness["rewards"] == on_truthfulness["scores"] == pytest.approx(column(expected, "truthfulness"), abs=TOLERANCE)
    assert set(single["extra_logs"]) == {"reward_model_tokens", "reward_model_truncated"}


def test_vllm_routes_serve_the_combined_reward_as_their_one_class(client, server):
    text = "What is the capital of France? Paris."
    expected = httpx.post(f"{server.url}/get_reward", json={"query": [text], "model": "heads"}).json()["rewards"][0]

    classified = httpx.post(f"{server.url}/classify", json={"model": "heads", "input": text, "use_activation": False}).json()
    pooled = httpx.post(f"{server.url}/pooling", json={"model": "heads", "input": text}).json()

    assert classified["data"][0]["num_classes"] == 1
    assert classified["data"][0]["probs"] == pytest.approx([expected], abs=TOLERANCE)
    assert classified["data"][0]["label"] is None  # the first head's label would name a head, not the combination
    assert pooled["data"][0]["data"] == pytest.approx([expected], abs=TOLERANCE)


def test_an_unknown_objective_is_refused_naming_the_heads(client, server):
    with pytest.raises(RewardServiceError) as refused:
        client.score(ITEMS, model="heads", objective="honesty")
    assert refused.value.status == 422 and refused.value.type == "unknown_objective"
    assert all(name in refused.value.message for name in HEADS)

    answer = httpx.post(f"{server.url}/get_reward", json={"query": ["hi there"], "model": "heads", "objective": "honesty"})
    assert answer.status_code == 422 and "truthfulness" in answer.json()["error"]["message"]
    with pytest.raises(RewardServiceError, match="helpfulness, truthfulness, harmlessness"):
        client.compare(PAIRS, model="heads", objective="Truthfulness")


def test_asking_a_single_head_model_for_objectives_says_it_has_one_head(client):
    for ask in ({"objective": "truthfulness"}, {"return_objectives": True}):
        with pytest.raises(RewardServiceError) as refused:
            client.score(ITEMS, model="single", **ask)
        assert refused.value.status == 422 and refused.value.type == "no_objectives"
        assert "one reward head" in refused.value.message


def test_normalize_applies_to_the_combined_reward_not_to_a_head(server):
    answer = httpx.post(
        f"{server.url}/v1/score", json={"model": "heads", "items": ITEMS[:1], "objective": "truthfulness", "normalize": True}
    )
    assert answer.status_code == 422
    assert answer.json()["error"]["type"] == "normalize_with_objective"
    assert "combined reward" in answer.json()["error"]["message"]


def test_a_trl_reward_function_can_train_on_one_objective(server, client):
    reward_func = trl_reward_func(server.url, model="heads", objective="harmlessness")
    prompts = [i["prompt"] for i in ITEMS[:3]]
    completions = [i["response"] for i in ITEMS[:3]]

    rewards = reward_func(prompts=prompts, completions=completions, completion_ids=[[1]] * 3, trainer_state=None)

    assert reward_func.__name__ == "reward_harmlessness"  # what TRL logs it under
    assert rewards == pytest.approx(client.score(ITEMS[:3], model="heads", return_objectives=True).objectives["harmlessness"])
    reward_func.client.close()


def test_the_score_cache_keeps_heads_and_combination_apart(heads_dir, tmp_path, direct):
    expected = direct["items"](ITEMS)
    args = [f"--model=heads={heads_dir}", "--score-cache-size", "100", "--max-wait-ms", "1"]
    with running_server(args, tmp_path / "server.log") as s, RewardClient(s.url) as c:
        first = c.score(ITEMS, objective="truthfulness")  # fills the cache
        combined = c.score(ITEMS)  # every item a hit: the combination must not be read as truthfulness
        again = c.score(ITEMS, objective="truthfulness", return_objectives=True)
        metrics = httpx.get(f"{s.url}/metrics").text
    assert first.scores == pytest.approx(column(expected, "truthfulness"), abs=TOLERANCE)
    assert combined.scores == pytest.approx(column(expected, None), abs=TOLERANCE)
    assert again.scores == first.scores
    assert again.objectives["helpfulness"] == pytest.approx(column(expected, "helpfulness"), abs=TOLERANCE)
    hits = [line for line in metrics.splitlines() if line.startswith("reward_score_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) == 2 * len(ITEMS)


def test_reward_score_writes_each_heads_reward(server, client, tmp_path):
    import json
    import subprocess
    import sys

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, **item}) + "\n" for i, item in enumerate(ITEMS)))
    done = subprocess.run(
        [sys.executable, "-m", "reward_cli", "score", "--url", server.url, "--model", "heads", "--objective", "helpfulness",
         "--objectives", str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    expected = client.score(ITEMS, model="heads", return_objectives=True).objectives
    assert [line["id"] for line in lines] == list(range(len(ITEMS)))
    assert [line["score"] for line in lines] == pytest.approx(expected["helpfulness"])
    assert [line["objectives"]["harmlessness"] for line in lines] == pytest.approx(expected["harmlessness"])


def test_a_backend_without_a_column_per_head_is_refused_when_the_model_loads(heads_dir):
    """A backend that answers the reward alone for a directory naming three objectives fails at
    load (warm-up), saying so, instead of failing the first request that asks for a head."""
    from reward_core.backends import served_rewards
    from reward_core.model_dir import ModelDirError
    from service.registry import load_model
    from service.settings import ServiceSettings

    model = load_model("heads", heads_dir, ServiceSettings(models=[f"heads={heads_dir}"]))
    full = model.backend.score_batch
    model.backend.score_batch = lambda batch: served_rewards(full(batch))  # the reward only
    with pytest.raises(ModelDirError, match="returns 1 reward column"):
        model.warm_up()


def test_one_head_made_into_a_model_scores_as_that_head_asked_for_by_name(client, truthful_dir, heads_dir):
    # a caller that cannot name a head per request (a gold RM, a PPO trainer) serves the head as its own model
    by_name = client.score(ITEMS, model="heads", objective="truthfulness").scores
    assert client.score(ITEMS, model="truthful").scores == pytest.approx(by_name, abs=TOLERANCE)
    card = {c.name: c for c in client.models().data}["truthful"]
    assert card.objectives == HEADS and card.combine.rule == "weights"
    assert card.combine.weights == [0.0, 1.0, 0.0]  # in the order of `objectives`
    assert not (truthful_dir / "reward_gate.safetensors").exists()
    spec = json.loads((truthful_dir / "reward_model.json").read_text())
    assert spec["one_head_of"] == {"source": str(heads_dir), "objective": "truthfulness"}
    # the source's reward statistics describe its combination, so the copy has none to normalize with
    with pytest.raises(RewardServiceError) as refused:
        client.score(ITEMS[:1], model="truthful", normalize=True)
    assert refused.value.status == 400 and refused.value.type == "normalize_unavailable"


def test_one_head_model_refuses_an_objective_the_source_lacks(heads_dir, tmp_path):
    made = one_head_model(heads_dir, "kindness", tmp_path / "out")
    assert made.returncode != 0 and "no objective 'kindness'" in made.stderr and "helpfulness" in made.stderr
    assert not (tmp_path / "out").exists()


def test_compare_recipes_averages_each_recipes_seeds_and_compares_them_pair_by_pair(server, client, tmp_path):
    """scripts/compare_recipes.py, as a recipe change for the default is decided: two recipes,
    each served as one model per seed; per set and category, each model's accuracy, each recipe's
    mean over its seeds, their difference with a paired interval, and the seed-to-seed spread."""
    rows = [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I do not know, maybe Berlin.", "category": "truthful"},
        {"prompt": "Who wrote Hamlet?", "chosen": "William Shakespeare wrote Hamlet.", "rejected": "Charles Dickens wrote Hamlet.",
         "category": "truthful"},
        {"prompt": "How do I make a bomb?", "chosen": "I cannot help with that.", "rejected": "Sure, here is how.", "category": "harmless"},
        {"prompt": "How do I pick a lock?", "chosen": "I would rather not help with that.", "rejected": "Insert a tension wrench.",
         "category": "harmless"},
        {"prompt": "Tell me a joke.", "chosen": "Why did the chicken cross the road? To get to the other side.", "rejected": "No.",
         "category": "helpful"},
    ]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "compare.json"
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "compare_recipes.py"), "--url", server.url, "--data", f"toy={data}",
         "--recipe", "first=heads,single", "--recipe", "second=truthful,heads", "--bootstrap", "200", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())["sets"]["toy"]

    def outcomes(model: str) -> list[float]:
        items = [{"prompt": r["prompt"], "response": r[side]} for r in rows for side in ("chosen", "rejected")]
        s = client.score(items, model=model).scores
        return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(s[0::2], s[1::2])]

    seen = {m: outcomes(m) for m in ("heads", "single", "truthful")}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert result["n_pairs"] == 5
    for model, o in seen.items():
        assert result["accuracy"][model] == pytest.approx(mean(o))
    first = mean([(a + b) / 2 for a, b in zip(seen["heads"], seen["single"])])
    second = mean([(a + b) / 2 for a, b in zip(seen["truthful"], seen["heads"])])
    assert result["recipe_mean"] == pytest.approx({"first": first, "second": second})
    difference = result["difference"]
    assert difference["of"] == "second - first" and difference["diff"] == pytest.approx(second - first)
    assert difference["low"] <= difference["diff"] <= difference["high"]
    assert result["seed_to_seed"]["first"]["diff"] == pytest.approx(mean(seen["single"]) - mean(seen["heads"]))
    assert set(result["per_category"]) == {"truthful", "harmless", "helpful"}
    assert result["per_category"]["truthful"]["accuracy"]["truthful"] == pytest.approx(mean(seen["truthful"][:2]))
    # each recipe's seeds read as an ensemble of runs: the mean of their standardised rewards, and
    # how well their disagreement picks out the pairs that mean gets wrong
    items = [{"prompt": r["prompt"], "response": r[side]} for r in rows for side in ("chosen", "rejected")]
    pool_items = {m: np.asarray(client.score(items, model=m).scores) for m in ("heads", "single")}
    runs = result["seeds_as_ensemble"]["first"]
    assert runs["members"] == ["heads", "single"] and set(result["seeds_as_ensemble"]) == {"first", "second"}
    assert set(runs["pair_error_auroc"]) == {"member_diff_std", "mean_item_std", "member_disagreement",
                                             "spread_over_margin", "small_margin"}
    # standardised over the pool here equals over these items: the toy set is the whole pool
    z = np.stack([(v - v.mean()) / v.std() for v in pool_items.values()], axis=1).mean(axis=1)
    assert runs["accuracy"] == pytest.approx(mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(z[0::2], z[1::2])]))


def test_our_ppo_trainer_can_optimise_one_head_and_refuses_a_head_the_model_lacks(server, direct):
    # `reward ppo --reward-objective truthfulness`: every rollout is scored by that head alone, and
    # the log says so; a head the model lacks, or a single-head model, is refused before training.
    from trainer.ppo import PPOConfig, PPOConfigError, RewardScorer

    expected = direct["items"](ITEMS)
    scorer = RewardScorer(server.url, "heads", {}, objective="truthfulness")
    try:
        assert scorer.check(max_retries=1).startswith("heads@")
        scored = scorer.submit(ITEMS).result()
        assert scored.rewards == pytest.approx(column(expected, "truthfulness"), abs=TOLERANCE)
        assert scorer.describe_rule() == {"reward_rule": "objective:truthfulness", "reward_uncertainty_penalty": None}
    finally:
        scorer.close()

    for model, objective, says in (("heads", "kindness", "has the objectives helpfulness, truthfulness, harmlessness"),
                                   ("single", "truthfulness", "has one reward head")):
        scorer = RewardScorer(server.url, model, {}, objective=objective)
        try:
            with pytest.raises(PPOConfigError, match=says):
                scorer.check(max_retries=1)
        finally:
            scorer.close()
    with pytest.raises(PPOConfigError, match="give one of them"):
        PPOConfig(policy="p", prompts="q", reward_objective="helpfulness", reward_aggregate="min").validate()
