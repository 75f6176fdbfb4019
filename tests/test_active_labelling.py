"""Labelling where the RM is unsure (issue 20): `reward queue-uncertain` against a real `reward
serve --store`, as an operator runs it after a PPO rollout.

The planted case: a tiny three-member ensemble whose members share every weight but their heads,
and whose heads are solved for so that, on the pool's responses, the members agree exactly on
some rows and split on others by margins of known size. The disagreement of every row is then
known by construction, checked against a direct forward of the saved directory, and the command
must queue exactly the rows built to be the most disputed; the tasks are then read back from the
labelling queue over HTTP."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny_models
from client import RewardClient
from reward_core.ensemble import members_state
from reward_core.formatting import encode_items
from reward_core.forward import reward_columns
from reward_core.loading import load_sequence_classifier, open_model_dir
from server import REPO_ROOT, running_server
from trainer.active_labelling import disagreements, pick_uncertain, rank_by_disagreement
from trainer.data import DataError, load_candidates

# Members' heads are w + c_m * u: where u is orthogonal to a pair's feature difference every
# member gives it the same margin (they agree); where w is, the margins are +s, -s, +s (two
# members against one).
SIGNS = (1.0, -1.0, 1.0)
K_MEMBERS = len(SIGNS)

# Rows the members agree on: (prompt, responses, w-margins of responses 1.. over response 0).
AGREED = [
    ("Name a yellow fruit.", ["A banana.", "A plum."], [-1.0]),
    ("What is the capital of France?", ["Paris.", "Berlin, I think."], [-1.5]),
    ("Say hi.", ["Hi! How can I help?", "Go away."], [-0.8]),
    ("How many legs has a spider?", ["Eight.", "Six.", "Ten, roughly."], [-1.2, -2.0]),
    ("Is the sea salty?", ["Yes, it is.", "No."], [-1.0]),
    ("Tell me a joke.", ["Knock knock.", "No."], [-0.7]),
]
# Rows the members split on two to one: (prompt, chosen, rejected, s), written as a preference
# file (chosen first); the larger s, the larger the members' spread of the margin.
DISPUTED = [
    ("Which is heavier, a kilo of feathers or of iron?", "They weigh the same.", "The iron.", 2.0),
    ("Should I water a cactus daily?", "No, rarely.", "Yes, every day.", 1.5),
    ("What colour is the sky on a clear day?", "Blue.", "Green.", 1.0),
    ("Is 7 a prime number?", "Yes.", "No, it is even.", 0.5),
]
# A row all members order the same way, by margins t + c_m * s that differ widely: the largest
# margin spread of the pool, and no doubt about the order.
WIDE = ("Spell 'cat'.", ["C-A-T.", "K-A-T."], 4.0, 3.0)
PICKS = 3  # the three most disputed rows: DISPUTED[:3]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def pool_rows() -> list[tuple[list[dict], list[str]]]:
    """Every pool row as (prompt messages, responses), in the order the pool files hold them."""
    rows = [(user(p), r) for p, r, _ in AGREED] + [(user(WIDE[0]), WIDE[1])]
    return rows + [(user(p), [c, r]) for p, c, r, _ in DISPUTED]


def write_pool(root: Path) -> list[Path]:
    """The agreed and wide rows as candidates (no judgement); the disputed ones as a preference file."""
    candidates = root / "rollouts.jsonl"
    with open(candidates, "w") as f:
        for prompt, responses, _ in AGREED:
            f.write(json.dumps({"prompt": prompt, "responses": responses, "category": "ppo"}) + "\n")
        f.write(json.dumps({"prompt": user(WIDE[0]), "responses": WIDE[1]}) + "\n")
    preferences = root / "preferences.jsonl"
    with open(preferences, "w") as f:
        for prompt, chosen, rejected, _ in DISPUTED:
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return [candidates, preferences]


def features(model, files, rows) -> list[torch.Tensor]:
    """Per row, the input of member 0's head for each response ([K, hidden]), one unpadded item
    at a time, as the service renders and encodes them."""
    captured: list[torch.Tensor] = []
    hook = model.reward_members.members[0].classifier.register_forward_hook(lambda m, i, o: captured.append(i[0][0]))
    out = []
    try:
        with torch.inference_mode():
            for prompt, responses in rows:
                row = []
                for e in encode_items([{"prompt": prompt, "response": r} for r in responses], files.tokenizer, files.spec):
                    ids = torch.tensor([e.input_ids])
                    types = torch.tensor([e.token_type_ids]) if e.token_type_ids is not None else None
                    reward_columns(model, files.spec.architecture, ids, torch.ones_like(ids), types)
                    row.append(captured.pop())
                out.append(torch.stack(row).double())
    finally:
        hook.remove()
    return out


def solve_head(feats: list[torch.Tensor], targets: list[list[float]]) -> torch.Tensor:
    """The least-norm head v with v . (h_i - h_0) = target_i for every row's responses 1.."""
    differences = torch.cat([f[1:] - f[:1] for f in feats])
    wanted = torch.tensor([t for row in targets for t in row], dtype=torch.float64)
    v = torch.linalg.lstsq(differences, wanted[:, None], driver="gelsd").solution[:, 0]
    assert torch.allclose(differences @ v, wanted, atol=1e-6)  # as many constraints as the hidden size allows
    return v


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    path = tiny_models.build_tiny_ensemble_bert(tmp_path_factory.mktemp("models") / "planted", members=K_MEMBERS)
    files = open_model_dir(path)
    model = load_sequence_classifier(path, files.spec).eval()
    members = model.reward_members.members
    with torch.no_grad():  # the members share everything but their heads
        for member in members[1:]:
            member.layers.load_state_dict(members[0].layers.state_dict())
            member.pooler.load_state_dict(members[0].pooler.state_dict())
    feats = features(model, files, pool_rows())
    n_agreed = len(AGREED)
    w = solve_head(feats, [m for _, _, m in AGREED] + [[-WIDE[2]]] + [[0.0]] * len(DISPUTED))
    u = solve_head(feats, [[0.0] * len(m) for _, _, m in AGREED] + [[-WIDE[3]]] + [[-s] for *_, s in DISPUTED])
    assert len(feats) == n_agreed + 1 + len(DISPUTED)
    with torch.no_grad():
        for member, sign in zip(members, SIGNS):
            member.classifier.weight.copy_((w + sign * u)[None].to(member.classifier.weight.dtype))
            member.classifier.bias.zero_()
    save_file(members_state(model), str(path / "reward_members.safetensors"))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_bert(tmp_path_factory.mktemp("models") / "single")


@pytest.fixture(scope="module")
def server(planted, single, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    one = tiny_models.build_tiny_ensemble_bert(root / "one", members=1)
    args = [f"--model=ens={planted}", f"--model=single={single}", f"--model=one={one}",
            "--store", f"sqlite:///{root}/comparisons.db"]
    with running_server(args, root / "server.log") as s:
        yield s


def queue_uncertain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reward_cli", "queue-uncertain", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def planted_disagreement() -> list[dict[str, float]]:
    """Every row's disagreement as built: agreed rows 0; the members' margins +s, -s, +s on a
    disputed row (agreement 2/3, so 1 - |2 * 2/3 - 1| = 2/3 by order, std(s, -s, s) by margin);
    on the wide row t + c * s, all positive."""
    spread = float(np.std(SIGNS))
    rows = [{"order": 0.0, "margin_std": 0.0} for _ in AGREED]
    rows.append({"order": 0.0, "margin_std": WIDE[3] * spread})
    return rows + [{"order": 2 / 3, "margin_std": s * spread} for *_, s in DISPUTED]


# --------------------------------------------------------------------------- the measures


def test_the_measures_by_hand():
    # one pair, members' margins 1, 0, -1: agreement (1 + 0.5 + 0) / 3 = 0.5, an even split
    split = disagreements(np.array([[1.0, 2.0, 3.0], [0.0, 2.0, 4.0]]))
    assert split["order"] == pytest.approx(1.0) and split["margin_std"] == pytest.approx(np.std([1, 0, -1]))
    # three responses, four members: pair (0,1) 3 of 4 (order 0.5), (0,2) 2 of 4 (order 1), (1,2) a tie of 4
    # (agreement 1/8, order 1/4)
    members = np.array([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
    rows = disagreements(members)
    assert rows["order"] == pytest.approx((0.5 + 1 + 0.25) / 3)
    margins = [members[0] - members[1], members[0] - members[2], members[1] - members[2]]
    assert rows["margin_std"] == pytest.approx(np.mean([np.std(m) for m in margins]))
    # order ties go to the larger margin spread, then to the earlier row
    scores = [{"order": 0.5, "margin_std": 1.0}, {"order": 0.5, "margin_std": 2.0}, {"order": 0.9, "margin_std": 0.1},
              {"order": 0.5, "margin_std": 2.0}]
    assert rank_by_disagreement(scores, "order") == [2, 1, 3, 0]
    assert rank_by_disagreement(scores, "margin_std") == [1, 3, 0, 2]
    assert pick_uncertain(scores, 2) == [2, 1]


def test_a_pool_reads_candidates_and_preference_rows_and_counts_bad_ones(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "Say hi.", "responses": ["Hi!", "Hello!", "Hey."]}),
        json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5", "category": "math"}),
        json.dumps({"prompt": "Say hi.", "responses": ["Hi!"]}),
        json.dumps({"responses": ["a", "b"]}),
    ]) + "\n")
    rows, report = load_candidates(path, max_bad_fraction=None)
    assert [(r.responses, r.ranking, r.category) for r in rows] == [
        (["Hi!", "Hello!", "Hey."], None, None), (["4", "5"], [0, 1], "math")]
    assert rows[1].as_record().best == "4" and rows[0].prompt == user("Say hi.")
    assert report.malformed == 2 and report.formats == {"candidates": 1, "trl_standard": 1}
    assert [line for line, _ in report.problems] == [3, 4]
    assert "need at least 2 responses" in report.problems[0][1] and "'prompt'" in report.problems[1][1]
    with pytest.raises(DataError, match="too many malformed rows"):
        load_candidates(path)


# --------------------------------------------------------------------------- the command


def test_the_planted_disagreement_is_what_a_direct_forward_gives(planted):
    files = open_model_dir(planted)
    model = load_sequence_classifier(planted, files.spec).eval()
    measured = []
    with torch.inference_mode():
        for prompt, responses in pool_rows():
            rewards = []
            for e in encode_items([{"prompt": prompt, "response": r} for r in responses], files.tokenizer, files.spec):
                ids = torch.tensor([e.input_ids])
                types = torch.tensor([e.token_type_ids]) if e.token_type_ids is not None else None
                rewards.append(reward_columns(model, files.spec.architecture, ids, torch.ones_like(ids), types)[0, 1:].double().numpy())
            measured.append(disagreements(np.stack(rewards)))
    for got, want in zip(measured, planted_disagreement()):
        assert got["order"] == pytest.approx(want["order"], abs=1e-9)
        assert got["margin_std"] == pytest.approx(want["margin_std"], abs=1e-4)


def test_the_most_disputed_rows_are_queued_and_the_labelling_queue_serves_them(server, planted, tmp_path):
    pool = write_pool(tmp_path)
    out = tmp_path / "picks.jsonl"
    run = queue_uncertain("--url", server.url, "--model", "ens", "--pool", str(pool[0]), "--pool", str(pool[1]),
                          "--picks", str(PICKS), "--out", str(out), "--source", "ppo step 7")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    picks = read_jsonl(out)

    disputed = [(user(p), [c, r]) for p, c, r, _ in DISPUTED[:PICKS]]
    assert [(p["prompt"], p["responses"]) for p in picks] == disputed  # the most disputed first
    assert [p["ranking"] for p in picks] == [[0, 1]] * PICKS  # a preference file's judgement is kept beside
    want = planted_disagreement()[len(AGREED) + 1:]
    for pick, planted_row in zip(picks, want):
        assert pick["disagreement"]["order"] == pytest.approx(planted_row["order"], abs=1e-9)
        assert pick["disagreement"]["margin_std"] == pytest.approx(planted_row["margin_std"], abs=1e-4)
    assert summary["picker"] == "order" and summary["queued"] == PICKS and summary["pool"]["rows"] == len(pool_rows())
    assert summary["disagreement"]["picks"]["order"] == pytest.approx(2 / 3)
    assert summary["task_ids"] == [p["task_id"] for p in picks]

    with RewardClient(server.url) as client:  # each labeller is given the next task, in queue order
        tasks = []
        while (task := client.next_label_task(f"labeller-{len(tasks)}", lease_s=3600).task) is not None:
            tasks.append(task)
            # the labeller ranks the preference file's chosen response (pool index 0) first
            shown = [pick["shown_order"] for pick in picks if pick["task_id"] == task.id][0]
            client.submit_comparison(prompt=task.prompt, responses=task.responses, task_id=task.id,
                                     labeller=f"labeller-{len(tasks) - 1}", ranking=[shown.index(0), shown.index(1)])
        stored = client.export_comparisons()
    assert [t.id for t in tasks] == summary["task_ids"]
    for task, pick in zip(tasks, picks):
        assert [m.model_dump() for m in task.prompt] == pick["prompt"]
        assert task.responses == [pick["responses"][i] for i in pick["shown_order"]]
        assert task.source == "ppo step 7 (order 0.667)"
    assert sorted(tuple(p["shown_order"]) for p in picks) != [(0, 1)] * PICKS  # the better one is not always shown first
    # what `reward train-rm --from-store` trains on: the disputed rows, judged
    assert [(row["prompt"], row["responses"][row["ranking"][0]]) for row in stored] == [(p, r[0]) for p, r in disputed]


def test_margin_std_puts_the_widest_spread_first_and_a_dry_run_queues_nothing(server, tmp_path):
    pool = write_pool(tmp_path)
    out = tmp_path / "picks.jsonl"
    with RewardClient(server.url) as client:
        waiting = client.next_label_task("dry-run-checker", lease_s=1).waiting
    run = queue_uncertain("--url", server.url, "--model", "ens", "--pool", str(pool[0]), "--pool", str(pool[1]),
                          "--picks", "2", "--disagreement", "margin_std", "--dry-run", "--out", str(out))
    assert run.returncode == 0, run.stderr
    picks = read_jsonl(out)
    # the members agree on the wide row's order, but their margins differ most there
    assert [p["responses"] for p in picks] == [WIDE[1], [DISPUTED[0][1], DISPUTED[0][2]]]
    assert picks[0]["disagreement"]["order"] == 0.0 and "task_id" not in picks[0]
    assert json.loads(run.stdout)["queued"] == 0
    with RewardClient(server.url) as client:
        assert client.next_label_task("dry-run-checker", lease_s=1).waiting == waiting


def test_random_picks_are_seeded_and_need_no_ensemble(server, tmp_path):
    pool = write_pool(tmp_path)
    runs = {}
    for seed in ("1", "1", "2"):
        out = tmp_path / f"random-{len(runs)}.jsonl"
        run = queue_uncertain("--url", server.url, "--model", "single", "--pool", str(pool[0]), "--pool", str(pool[1]),
                              "--picks", "4", "--random", "--seed", seed, "--dry-run", "--out", str(out))
        assert run.returncode == 0, run.stderr
        runs[len(runs)] = [(p["source"], p["line"]) for p in read_jsonl(out)]
        assert "disagreement" not in json.loads(run.stdout)
    assert runs[0] == runs[1] != runs[2]
    assert all(len(set(picks)) == 4 for picks in runs.values())
    rows = [(str(pool[0]), line) for line in range(1, len(AGREED) + 2)] + [(str(pool[1]), line) for line in range(1, len(DISPUTED) + 1)]
    assert runs[0] == [rows[i] for i in random.Random(1).sample(range(len(rows)), 4)]


@pytest.mark.parametrize("args, says", [
    (["--model", "single"], "not an ensemble"),
    (["--model", "one"], "an ensemble of one member"),
    (["--model", "ens", "--dry-run"], "give --out"),
    (["--model", "nope"], "not served"),
])
def test_what_cannot_work_is_refused_saying_what_to_do(server, tmp_path, args, says):
    pool = write_pool(tmp_path)
    run = queue_uncertain("--url", server.url, "--pool", str(pool[0]), *args)
    assert run.returncode != 0 and says in run.stderr, run.stderr
    if "ensemble" in says:
        assert "--ensemble K" in run.stderr and "--random" in run.stderr


# --------------------------------------------------------------------------- the experiment


@pytest.mark.slow
@pytest.mark.timeout(900)  # five tiny trainings and two servers, each a process of its own
def test_the_experiment_runs_end_to_end_on_a_tiny_model(tmp_path):
    from test_train_rm import write_task

    base = tiny_models.build_tiny_bert(tmp_path / "base")
    train = write_task(tmp_path / "train.jsonl", 96, seed=0)
    dev = {"fruit": write_task(tmp_path / "dev.jsonl", 40, seed=1), "more": write_task(tmp_path / "more.jsonl", 24, seed=2)}
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "scripts/active_labelling_experiment.py", "--out-dir", str(out), "--data", str(train),
         *[a for name, path in dev.items() for a in ("--dev-data", f"{name}={path}")],
         "--seed-size", "24", "--pool-size", "48", "--picks", "8", "--seeds", "2", "--ensemble", "3",
         "--base-model", str(base), "--max-length", "48", "--num-epochs", "1", "--batch-size", "8",
         "--learning-rate", "3e-3", "--bootstrap", "200", "--", "--num-threads", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=880, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result == json.loads((out / "result.json").read_text())
    assert run.stderr.strip().splitlines()[-1] == result["summary"] == (out / "summary.txt").read_text().strip()
    assert result["summary"].startswith("all (")

    # the seed set and the pool are other rows; each picker's rows come from the pool with their own labels
    seed_rows, pool_rows = read_jsonl(out / "data" / "seed.jsonl"), read_jsonl(out / "data" / "pool.jsonl")
    assert len(seed_rows) == 24 and len(pool_rows) == 48
    assert not {json.dumps(r["prompt"]) for r in seed_rows} & {json.dumps(r["prompt"]) for r in pool_rows}
    picked = {name: read_jsonl(out / "data" / f"{name}.jsonl") for name in ("uncertain-0", "uncertain-1", "random-0", "random-1")}
    assert all(len(rows) == 8 and all(r in pool_rows for r in rows) for rows in picked.values())
    assert picked["uncertain-0"] == picked["uncertain-1"] and picked["random-0"] != picked["random-1"]
    # the top eight by disagreement are at least as disputed, on average, as any other eight
    stats = result["picks"]
    assert stats["uncertain"]["order"] >= max(stats["pool"]["order"], *(r["order"] for r in stats["random"]))

    for name in ("seed", "uncertain-0", "uncertain-1", "random-0", "random-1"):
        assert json.loads((out / "models" / name / "reward_model.json").read_text())["ensemble"]["members"] == 3
    assert set(result["dev"]) == {"fruit", "more", "all"}
    pairs = {name: sum(3 if "ranking" in r else 1 for r in read_jsonl(path)) for name, path in dev.items()}  # 3-way: 3 pairs
    pairs["all"] = sum(pairs.values())
    for name, section in result["dev"].items():
        assert section["n_pairs"] == pairs[name]
        for picker in ("uncertain", "random", "uncertain_minus_random"):
            block = section[picker]
            assert len(block["per_seed"]) == 2 and block["ci95"][0] <= block["mean"] <= block["ci95"][1]
            assert block["mean"] == pytest.approx(np.mean(block["per_seed"]))
        assert section["uncertain_minus_random"]["mean"] == pytest.approx(section["uncertain"]["mean"] - section["random"]["mean"])
