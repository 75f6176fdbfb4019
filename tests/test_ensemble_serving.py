"""Ensembles, served (issue 20, protocol 1.2): `reward serve` with a tiny three-member ensemble
and a single model, called over HTTP with our client, OpenRLHF's and vLLM's bodies, TRL's and
verl's reward functions and `reward score`, as users call them.

The reference is a direct forward of the same directory in this process, one item at a time:
``reward_core.forward.reward_columns`` gives the members' mean, then each member's reward; every
rule is then its formula applied to those members here, in numpy."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import typing

import httpx
import numpy as np
import pytest
import torch

import tiny_models
from client import AsyncRewardClient, RewardClient, RewardServiceError
from client.protocol import API_REVISION, AggregateRule
from reward_core.ensemble import AGGREGATES
from reward_core.formatting import encode_items, encode_texts
from reward_core.forward import reward_columns
from reward_core.loading import load_sequence_classifier, open_model_dir
from server import REPO_ROOT, running_server

K = 3
# The directory's own served default: mean - 0.5 * var; its normalisation statistics (of the mean).
SPEC_RULE, SPEC_PENALTY = "mean_minus_var", 0.5
REWARD_MEAN, REWARD_STD = 0.1, 2.0
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
    {"prompt": "Tell me a joke.", "a": "Knock knock.", "b": "No."},
]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    path = tiny_models.build_tiny_ensemble_bert(
        tmp_path_factory.mktemp("models") / "ensemble", members=K, aggregate=SPEC_RULE, uncertainty_penalty=SPEC_PENALTY
    )
    meta = json.loads((path / "reward_model.json").read_text())
    meta.update(reward_mean=REWARD_MEAN, reward_std=REWARD_STD)
    (path / "reward_model.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    return tiny_models.build_tiny_bert(tmp_path_factory.mktemp("models") / "single")


@pytest.fixture(scope="module")
def server(ensemble_dir, single_dir, tmp_path_factory):
    args = [f"--model=ens={ensemble_dir}", f"--model=single={single_dir}", "--max-wait-ms", "5"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def direct(ensemble_dir):
    """Each member's reward, [items, K], from a direct forward of the directory, one unpadded
    item at a time; for items or for already-rendered texts."""
    files = open_model_dir(ensemble_dir)
    model = load_sequence_classifier(ensemble_dir, files.spec).eval()

    def members(encoded) -> np.ndarray:
        rows = []
        with torch.inference_mode():
            for e in encoded:
                ids = torch.tensor([e.input_ids])
                types = torch.tensor([e.token_type_ids]) if e.token_type_ids is not None else None
                columns = reward_columns(model, files.spec.architecture, ids, torch.ones_like(ids), types)[0]
                rows.append(columns[1:].tolist())  # column 0 is their mean
        return np.array(rows, dtype=np.float64)

    return {
        "items": lambda items: members(encode_items(items, files.tokenizer, files.spec)),
        "texts": lambda texts, prompts: members(encode_texts(texts, files.tokenizer, files.spec, prompt_prefixes=prompts)),
    }


def by_formula(members: np.ndarray, rule: str, penalty: float = SPEC_PENALTY) -> list[float]:
    """The rules as issue 20 states them, written out here rather than taken from the code under test."""
    if rule == "mean":
        return list(members.mean(axis=1))
    if rule == "min":
        return list(members.min(axis=1))
    mean = members.mean(axis=1)
    return list(mean - penalty * ((members - mean[:, None]) ** 2).mean(axis=1))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def pair_items(pairs) -> list[dict]:
    return [{"prompt": p["prompt"], "response": r} for p in pairs for r in (p["a"], p["b"])]


def test_the_protocol_and_the_core_know_the_same_rules():
    assert typing.get_args(AggregateRule) == AGGREGATES


def test_each_rule_aggregates_the_members_by_its_formula(client, direct):
    members = direct["items"](ITEMS)
    assert members.std(axis=1).min() > 1e-3  # the members disagree, so the rules differ

    served = client.score(ITEMS, model="ens")
    assert served.scores == pytest.approx(by_formula(members, SPEC_RULE, SPEC_PENALTY), abs=TOLERANCE)
    assert served.ensemble_mean is None and served.ensemble_std is None and served.members is None
    for rule in AGGREGATES:
        answer = client.score(ITEMS, model="ens", aggregate=rule)
        assert answer.scores == pytest.approx(by_formula(members, rule, SPEC_PENALTY), abs=TOLERANCE), rule
    heavier = client.score(ITEMS, model="ens", aggregate="mean_minus_var", uncertainty_penalty=3.0)
    assert heavier.scores == pytest.approx(by_formula(members, "mean_minus_var", 3.0), abs=TOLERANCE)
    # the penalty alone, with mean_minus_var the served default
    assert client.score(ITEMS, model="ens", uncertainty_penalty=3.0).scores == pytest.approx(heavier.scores)
    assert client.score(ITEMS, model="ens", aggregate="mean_minus_var", uncertainty_penalty=0).scores == pytest.approx(
        members.mean(axis=1), abs=TOLERANCE
    )


def test_uncertainty_and_members_come_when_asked_in_item_order_across_chunks(server, direct):
    items = ITEMS * 3
    members = direct["items"](items)
    with RewardClient(server.url, chunk_size=5) as small_chunks:
        answer = small_chunks.score(items, model="ens", aggregate="min", return_uncertainty=True, return_members=True)

    assert answer.scores == pytest.approx(list(members.min(axis=1)), abs=TOLERANCE)
    assert answer.ensemble_mean == pytest.approx(list(members.mean(axis=1)), abs=TOLERANCE)
    assert answer.ensemble_std == pytest.approx(list(members.std(axis=1)), abs=TOLERANCE)  # population std
    assert len(answer.members) == len(items) and all(len(row) == K for row in answer.members)
    np.testing.assert_allclose(np.array(answer.members), members, atol=TOLERANCE)


async def test_the_async_client_asks_for_the_same(server, direct):
    members = direct["items"](ITEMS)
    async with AsyncRewardClient(server.url, chunk_size=3) as rm:
        answer = await rm.score(ITEMS, model="ens", aggregate="mean", return_uncertainty=True)
        compared = await rm.compare(PAIRS, model="ens", return_uncertainty=True)
    assert answer.scores == pytest.approx(answer.ensemble_mean, abs=TOLERANCE)
    assert answer.ensemble_std == pytest.approx(list(members.std(axis=1)), abs=TOLERANCE)
    assert all(r.member_agreement is not None for r in compared.results)


def test_compare_by_the_aggregated_rewards_with_member_agreement(client, direct):
    members = direct["items"](pair_items(PAIRS))

    plain = client.compare(PAIRS, model="ens")
    by_min = client.compare(PAIRS, model="ens", aggregate="min", return_uncertainty=True, return_members=True)

    served = by_formula(members, SPEC_RULE)
    worst = by_formula(members, "min")
    for i, (p, r) in enumerate(zip(plain.results, by_min.results)):
        a, b = members[2 * i], members[2 * i + 1]
        assert (p.reward_a, p.reward_b) == pytest.approx((served[2 * i], served[2 * i + 1]), abs=TOLERANCE)
        assert p.p_a_better == pytest.approx(sigmoid(served[2 * i] - served[2 * i + 1]), abs=TOLERANCE)
        assert p.member_agreement is None and p.members_a is None and p.ensemble_std_a is None
        assert (r.reward_a, r.reward_b) == pytest.approx((worst[2 * i], worst[2 * i + 1]), abs=TOLERANCE)
        assert r.p_a_better == pytest.approx(sigmoid(worst[2 * i] - worst[2 * i + 1]), abs=TOLERANCE)
        assert r.member_agreement == pytest.approx(float(np.mean(a > b)))  # no ties among random floats
        assert (r.ensemble_mean_a, r.ensemble_std_a) == pytest.approx((a.mean(), a.std()), abs=TOLERANCE)
        assert (r.ensemble_mean_b, r.ensemble_std_b) == pytest.approx((b.mean(), b.std()), abs=TOLERANCE)
        assert r.members_a == pytest.approx(list(a), abs=TOLERANCE) and r.members_b == pytest.approx(list(b), abs=TOLERANCE)


def test_openrlhf_gets_the_aggregate_and_logs_the_members_spread(server, direct):
    prompts = ["What is the capital of France?", "How do I make a bomb?"]
    texts = [prompts[0] + " Paris.", prompts[1] + " I cannot help with that."]
    members = direct["texts"](texts, prompts)

    body = {"query": texts, "prompts": prompts, "labels": ["", ""], "model": "ens"}
    answer = httpx.post(f"{server.url}/get_reward", json=body).json()
    by_min = httpx.post(f"{server.url}/get_reward", json={**body, "aggregate": "min"}).json()
    heavier = httpx.post(f"{server.url}/get_reward", json={**body, "uncertainty_penalty": 2.0}).json()

    assert answer["rewards"] == answer["scores"] == pytest.approx(by_formula(members, SPEC_RULE), abs=TOLERANCE)
    assert set(answer["extra_logs"]) == {"reward_model_tokens", "reward_model_truncated", "reward_mean", "reward_std"}
    assert answer["extra_logs"]["reward_mean"] == pytest.approx(list(members.mean(axis=1)), abs=TOLERANCE)
    assert answer["extra_logs"]["reward_std"] == pytest.approx(list(members.std(axis=1)), abs=TOLERANCE)
    assert by_min["rewards"] == pytest.approx(by_formula(members, "min"), abs=TOLERANCE)
    assert heavier["rewards"] == pytest.approx(by_formula(members, "mean_minus_var", 2.0), abs=TOLERANCE)
    with RewardClient(server.url) as rm:
        assert rm.score_texts(texts, prompts, model="ens", aggregate="min") == pytest.approx(by_min["rewards"])


def test_routes_that_cannot_choose_a_rule_serve_the_default(server):
    text = "What is the capital of France? Paris."
    expected = httpx.post(f"{server.url}/get_reward", json={"query": [text], "model": "ens"}).json()["rewards"][0]
    mean = httpx.post(f"{server.url}/get_reward", json={"query": [text], "model": "ens", "aggregate": "mean"}).json()

    classified = httpx.post(f"{server.url}/classify", json={"model": "ens", "input": text, "use_activation": False}).json()
    pooled = httpx.post(f"{server.url}/pooling", json={"model": "ens", "input": text}).json()

    assert mean["rewards"][0] != pytest.approx(expected, abs=1e-4)  # the default is not the mean here
    assert classified["data"][0]["probs"] == pytest.approx([expected], abs=TOLERANCE)
    assert classified["data"][0]["num_classes"] == 1
    assert pooled["data"][0]["data"] == pytest.approx([expected], abs=TOLERANCE)
    slime = httpx.post(f"{server.url}/slime_reward", json={"prompt": "Say hi", "response": "Hi!", "model": "ens"})
    v1 = httpx.post(f"{server.url}/v1/score", json={"model": "ens", "items": [{"prompt": "Say hi", "response": "Hi!"}]})
    assert slime.json() == pytest.approx(v1.json()["scores"][0], abs=TOLERANCE)


def test_the_model_card_shows_the_members_and_the_served_rule(client):
    cards = {c.name: c for c in client.models().data}

    ensemble = cards["ens"].ensemble
    assert (ensemble.members, ensemble.top_layers, ensemble.aggregate, ensemble.uncertainty_penalty) == (
        K, 1, SPEC_RULE, SPEC_PENALTY,
    )
    assert cards["ens"].objectives is None and cards["single"].ensemble is None


def test_normalize_is_of_the_members_mean(server, direct):
    members = direct["items"](ITEMS[:2])
    url = f"{server.url}/v1/score"

    refused = httpx.post(url, json={"model": "ens", "items": ITEMS[:2], "normalize": True})
    also = httpx.post(url, json={"model": "ens", "items": ITEMS[:2], "normalize": True, "aggregate": "min"})
    normalized = httpx.post(url, json={"model": "ens", "items": ITEMS[:2], "normalize": True, "aggregate": "mean"})

    for answer, rule in ((refused, SPEC_RULE), (also, "min")):
        assert answer.status_code == 422 and answer.json()["error"]["type"] == "normalize_with_aggregate"
        message = answer.json()["error"]["message"]
        assert repr(rule) in message and 'aggregate="mean"' in message
    assert "served default" in refused.json()["error"]["message"]
    assert normalized.status_code == 200
    expected = (members.mean(axis=1) - REWARD_MEAN) / REWARD_STD
    assert normalized.json()["scores"] == pytest.approx(list(expected), abs=TOLERANCE)


def refusal(answer: httpx.Response) -> tuple[int, str, str]:
    error = answer.json()["error"]
    return answer.status_code, error["type"], error["message"]


@pytest.mark.parametrize("fields", [
    {"aggregate": "min"}, {"uncertainty_penalty": 1.0}, {"return_uncertainty": True}, {"return_members": True},
])
def test_ensemble_fields_for_a_single_model_are_refused_saying_to_leave_them_out(server, fields):
    score = httpx.post(f"{server.url}/v1/score", json={"model": "single", "items": ITEMS[:1], **fields})
    compare = httpx.post(f"{server.url}/v1/compare", json={"model": "single", "pairs": PAIRS[:1], **fields})
    for answer in (score, compare):
        status, kind, message = refusal(answer)
        assert (status, kind) == (422, "not_an_ensemble")
        assert next(iter(fields)) in message and "leave it out" in message and "GET /v1/models" in message
    if "aggregate" in fields or "uncertainty_penalty" in fields:  # /get_reward takes these two
        status, kind, _ = refusal(httpx.post(f"{server.url}/get_reward", json={"query": ["hi"], "model": "single", **fields}))
        assert (status, kind) == (422, "not_an_ensemble")


@pytest.mark.parametrize("fields, says", [
    ({"aggregate": "max"}, "'mean', 'min' or 'mean_minus_var'"),
    ({"aggregate": "Mean"}, "'mean', 'min' or 'mean_minus_var'"),
    ({"uncertainty_penalty": -0.5}, "greater than or equal to 0"),
    ({"uncertainty_penalty": "1"}, "valid number"),
    ({"uncertainty_penalty": True}, "valid number"),
])
def test_an_unknown_rule_or_a_bad_penalty_is_refused_naming_what_is_allowed(server, fields, says):
    for path, body in (("/v1/score", {"items": ITEMS[:1]}), ("/v1/compare", {"pairs": PAIRS[:1]}), ("/get_reward", {"query": ["hi"]})):
        status, kind, message = refusal(httpx.post(f"{server.url}{path}", json={"model": "ens", **body, **fields}))
        assert (status, kind) == (422, "validation_error"), path
        assert next(iter(fields)) in message and says in message, message


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_penalty_that_is_not_finite_is_refused(server, number):
    # Python's JSON reader takes NaN and Infinity: they must not reach the aggregation.
    raw = '{"model": "ens", "items": [{"prompt": "p", "response": "r"}], "aggregate": "mean_minus_var", "uncertainty_penalty": %s}'
    answer = httpx.post(f"{server.url}/v1/score", content=raw % number, headers={"content-type": "application/json"})
    status, kind, message = refusal(answer)
    assert (status, kind) == (422, "validation_error") and "uncertainty_penalty" in message and "finite" in message


def test_a_penalty_without_mean_minus_var_is_refused(client):
    with pytest.raises(RewardServiceError) as refused:
        client.score(ITEMS[:1], model="ens", aggregate="min", uncertainty_penalty=1.0)
    assert refused.value.status == 422 and refused.value.type == "penalty_without_mean_minus_var"
    assert "'min'" in refused.value.message and 'aggregate="mean_minus_var"' in refused.value.message


def test_an_objective_for_an_ensemble_says_it_is_an_ensemble(client):
    for ask in ({"objective": "truthfulness"}, {"return_objectives": True}):
        with pytest.raises(RewardServiceError) as refused:
            client.score(ITEMS[:1], model="ens", **ask)
        assert refused.value.status == 422 and refused.value.type == "no_objectives"
        assert f"ensemble of {K} members" in refused.value.message and "aggregate" in refused.value.message


def test_a_single_models_answers_read_as_before(server):
    # the wire bodies of a 1.0 client: no new field in the request, none in the answers
    score = httpx.post(f"{server.url}/v1/score", json={"model": "single", "items": ITEMS[:1]}).json()
    compare = httpx.post(f"{server.url}/v1/compare", json={"model": "single", "pairs": PAIRS[:1]}).json()
    rewarded = httpx.post(f"{server.url}/get_reward", json={"query": ["hi there"], "model": "single"}).json()
    card = next(c for c in httpx.get(f"{server.url}/v1/models").json()["data"] if c["name"] == "single")
    assert set(score) == {"model", "scores", "usage"}
    assert set(compare["results"][0]) == {"reward_a", "reward_b", "p_a_better"}
    assert set(rewarded["extra_logs"]) == {"reward_model_tokens", "reward_model_truncated"}
    assert "ensemble" not in card and "objectives" not in card
    assert httpx.get(f"{server.url}/openapi.json").json()["info"]["version"] == API_REVISION


def test_trl_and_verl_reward_functions_pass_the_rule(server, client, direct):
    from client import verl
    from client.integrations import trl_reward_func

    members = direct["items"](ITEMS[:3])
    reward_func = trl_reward_func(server.url, model="ens", aggregate="min")
    rewards = reward_func(prompts=[i["prompt"] for i in ITEMS[:3]], completions=[i["response"] for i in ITEMS[:3]],
                          completion_ids=[[1]] * 3, trainer_state=None)
    reward_func.client.close()
    assert reward_func.__name__ == "reward_min"  # what TRL logs it under
    assert rewards == pytest.approx(by_formula(members, "min"), abs=TOLERANCE)

    kwargs = {"reward_url": server.url, "reward_model": "ens", "reward_aggregate": "mean_minus_var",
              "reward_uncertainty_penalty": "2", "reward_return_uncertainty": True}
    scored = verl.compute_score_batch(
        solution_strs=[i["response"] for i in ITEMS[:3]], extra_infos=[{"prompt": i["prompt"]} for i in ITEMS[:3]], **kwargs
    )
    one = verl.compute_score(solution_str=ITEMS[0]["response"], extra_info={"prompt": ITEMS[0]["prompt"]},
                             reward_url=server.url, reward_model="ens", reward_aggregate="min")
    assert [s["score"] for s in scored] == pytest.approx(by_formula(members, "mean_minus_var", 2.0), abs=TOLERANCE)
    assert [s["reward_std"] for s in scored] == pytest.approx(list(members.std(axis=1)), abs=TOLERANCE)
    assert [s["reward_mean"] for s in scored] == pytest.approx(list(members.mean(axis=1)), abs=TOLERANCE)
    assert one == pytest.approx(float(members[0].min()), abs=TOLERANCE)


def test_reward_score_writes_the_rule_and_the_members(server, direct, tmp_path, capsys):
    from client.cli import main

    members = direct["items"](ITEMS)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, **item}) + "\n" for i, item in enumerate(ITEMS)))

    code = main(["score", "--url", server.url, "--model", "ens", "--aggregate", "mean_minus_var",
                 "--uncertainty-penalty", "1.5", "--uncertainty", "--members", str(source)])

    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == list(range(len(ITEMS)))
    assert [line["score"] for line in lines] == pytest.approx(by_formula(members, "mean_minus_var", 1.5), abs=TOLERANCE)
    assert [line["ensemble_std"] for line in lines] == pytest.approx(list(members.std(axis=1)), abs=TOLERANCE)
    np.testing.assert_allclose(np.array([line["members"] for line in lines]), members, atol=TOLERANCE)
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["score", "--url", server.url, "--aggregate", "max", str(source)])
    assert "mean_minus_var" in capsys.readouterr().err


def test_the_served_default_is_overridden_by_serve_settings_and_the_cache_keeps_every_member(ensemble_dir, tmp_path, direct):
    members = direct["items"](ITEMS)
    args = [f"--model=ens={ensemble_dir}", "--ensemble-aggregate", "min", "--score-cache-size", "100", "--max-wait-ms", "1"]
    env = {"REWARD_UNCERTAINTY_PENALTY": "2.5"}  # the env var form of --uncertainty-penalty
    with running_server(args, tmp_path / "server.log", env=env) as s, RewardClient(s.url) as rm:
        card = rm.models().data[0].ensemble
        by_default = rm.score(ITEMS)  # fills the cache
        by_penalty = rm.score(ITEMS, aggregate="mean_minus_var")  # every item a hit: another rule on the same rows
        spread = rm.score(ITEMS, aggregate="mean", return_uncertainty=True)
        metrics = httpx.get(f"{s.url}/metrics").text
    assert (card.aggregate, card.uncertainty_penalty) == ("min", 2.5)
    assert by_default.scores == pytest.approx(by_formula(members, "min"), abs=TOLERANCE)
    assert by_penalty.scores == pytest.approx(by_formula(members, "mean_minus_var", 2.5), abs=TOLERANCE)
    assert spread.ensemble_std == pytest.approx(list(members.std(axis=1)), abs=TOLERANCE)
    hits = [line for line in metrics.splitlines() if line.startswith("reward_score_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) == 2 * len(ITEMS)


@pytest.mark.parametrize("flags, says", [
    (["--ensemble-aggregate", "max"], "'mean', 'min' or 'mean_minus_var'"),
    (["--uncertainty-penalty", "-1"], "greater than or equal to 0"),
    (["--uncertainty-penalty", "nan"], "finite number"),
])
def test_a_bad_served_default_stops_the_start_saying_why(flags, says):
    done = subprocess.run([sys.executable, "-m", "reward_cli", "serve", *flags], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "invalid settings" in done.stderr and flags[0][2:].replace("-", "_") in done.stderr and says in done.stderr
