"""Training a reward model with one head per objective: what a user of `reward train-rm` does
(`--data PATH:objective=NAME`), then what the model directory must give them.

Each pair trains its own objective's head (Bradley-Terry); the gate learns from every pair; the
lower blocks' output can be computed once (`--cache-frozen`) without changing the model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id, reward_columns
from reward_core.loading import load_sequence_classifier, open_model_dir
from reward_core.objectives import Objectives
from trainer.reward import _Dist, _Trainer, train_reward_model
from trainer.reward_config import RewardTrainingConfig, TrainingConfigError

WORDS = "the a good nice small big fresh sweet sour ripe tasty bright soft hard round".split()
# objective -> (prompt, word of the better answer, word of the worse one)
RULES = {
    "helpfulness": ("which snack should I pick", "banana", "grape"),
    "truthfulness": ("what colour is the sky", "blue", "red"),
    "harmlessness": ("how do I hurt someone", "sorry", "knife"),
}


def _sentence(rng: random.Random, word: str) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
    words.insert(rng.randrange(len(words) + 1), word)
    return " ".join(words)


def write_objective_sets(root: Path, n_train: int = 96, n_dev: int = 32) -> dict[str, dict[str, Path]]:
    """Per objective a train and a dev file; the better answer holds its objective's word."""
    rng = random.Random(0)
    files: dict[str, dict[str, Path]] = {}
    for objective, (question, good, bad) in RULES.items():
        for split, n in (("train", n_train), ("dev", n_dev)):
            path = root / f"{objective}-{split}.jsonl"
            with open(path, "w") as f:
                for i in range(n):
                    if split == "train" and i % 5 == 0:  # K-way rankings train too
                        row = {"prompt": f"{question} {i}?", "responses": [_sentence(rng, bad), _sentence(rng, good), _sentence(rng, bad)],
                               "ranking": [1, 0, 2]}
                    else:
                        row = {"prompt": f"{question} {i}?", "chosen": _sentence(rng, good), "rejected": _sentence(rng, bad)}
                    f.write(json.dumps(row) + "\n")
            files.setdefault(objective, {})[split] = path
    return files


@pytest.fixture(scope="module")
def objective_sets(tmp_path_factory):
    return write_objective_sets(tmp_path_factory.mktemp("objectives"))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return tiny_models.build_tiny_bert(tmp_path_factory.mktemp("base") / "bert")


def config_for(base, sets, out, **overrides) -> RewardTrainingConfig:
    values = dict(
        base_model=str(base), output_dir=str(out), max_length=48, per_device_batch_size=16, learning_rate=3e-3,
        warmup_ratio=0.0, eval_steps=0, save_steps=0, logging_steps=5, progress=False, reward_stats_samples=100,
        num_threads=2, num_epochs=3, train_mode="top", top_layers=1,
        data=[f"{paths['train']}:objective={name}" for name, paths in sets.items()],
    )
    values.update(overrides)
    return RewardTrainingConfig(**values)


def head_accuracies(model_dir: Path, sets) -> dict[str, dict[str, float]]:
    """Per dev file: the accuracy of each column (reward, then each head), from a direct forward."""
    files = open_model_dir(model_dir)
    model = load_sequence_classifier(model_dir, files.spec).eval()
    names = ("reward",) + files.spec.objective_names
    out = {}
    for objective, paths in sets.items():
        rows = [json.loads(line) for line in paths["dev"].read_text().splitlines()]
        convs = [([{"role": "user", "content": r["prompt"]}], resp) for r in rows for resp in (r["chosen"], r["rejected"])]
        batch = pad_batch(encode_conversations(convs, files.tokenizer, files.spec), pad_token_id(files.tokenizer))
        with torch.no_grad():
            cols = reward_columns(model, files.spec.architecture, *(torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids))).numpy()
        wins = cols[0::2] > cols[1::2]
        out[objective] = {name: float(wins[:, k].mean()) for k, name in enumerate(names)}
    return out


def test_each_head_learns_its_objective_and_the_gate_combines_them(tiny_base, objective_sets, tmp_path):
    out = tmp_path / "rm"
    result = train_reward_model(config_for(tiny_base, objective_sets, out, cache_frozen=True))
    assert result.finished
    spec = open_model_dir(out).spec
    assert spec.objectives.names == ("helpfulness", "truthfulness", "harmlessness")
    assert spec.objectives.combine == "gate"
    assert (out / "reward_gate.safetensors").is_file()
    accuracy = head_accuracies(out, objective_sets)
    for objective in RULES:
        assert accuracy[objective][objective] >= 0.9, accuracy  # its own head
        assert accuracy[objective]["reward"] >= 0.9, accuracy  # the combination, through the gate


def test_bf16_autocast_on_cpu_trains_on_the_frozen_cache_too(tiny_base, objective_sets, tmp_path):
    """--bf16 true with --cache-frozen on a CPU (fast where it has AMX): the cached float16 rows go
    into a bf16 step, and each head still learns its objective."""
    out = tmp_path / "rm"
    assert train_reward_model(config_for(tiny_base, objective_sets, out, cache_frozen=True, bf16="true")).finished
    accuracy = head_accuracies(out, objective_sets)
    for objective in RULES:
        assert accuracy[objective][objective] >= 0.9, accuracy


def dev_gate_weights(model_dir: Path, sets, answers) -> tuple[Objectives, dict[str, torch.Tensor]]:
    """The model's objectives, and per dev file the gate's weights [items, objectives] for each
    row's answers, in row order (``answers(row)`` names them)."""
    from reward_core.forward import reward_heads
    from reward_core.objectives import gate_weights

    files = open_model_dir(model_dir)
    model = load_sequence_classifier(model_dir, files.spec).eval()
    out = {}
    for objective, paths in sets.items():
        rows = [json.loads(line) for line in paths["dev"].read_text().splitlines()]
        convs = [([{"role": "user", "content": r["prompt"]}], resp) for r in rows for resp in answers(r)]
        batch = pad_batch(encode_conversations(convs, files.tokenizer, files.spec), pad_token_id(files.tokenizer))
        with torch.no_grad():
            _, features = reward_heads(model, files.spec.architecture, *(torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids)))
            out[objective] = gate_weights(model.reward_gate, features)
    return files.spec.objectives, out


def gate_weight_on_own_objective(model_dir: Path, sets) -> dict[str, float]:
    """Per dev file: the mean weight the gate gives the file's own objective."""
    names, weights = dev_gate_weights(model_dir, sets, lambda r: [r["chosen"]])
    return {objective: float(w[:, names.index(objective)].mean()) for objective, w in weights.items()}


def test_gate_routing_teaches_the_gate_each_prompts_objective(tiny_base, objective_sets, tmp_path):
    """--gate-routing-weight: the gate learns from each pair's source which objective its prompt is
    about; the combined reward alone routes a prompt anywhere a head happens to get its pairs right."""
    plain = tmp_path / "plain"
    routed = tmp_path / "routed"
    train_reward_model(config_for(tiny_base, objective_sets, plain, cache_frozen=True))
    train_reward_model(config_for(tiny_base, objective_sets, routed, cache_frozen=True, gate_routing_weight=1.0))
    before, after = gate_weight_on_own_objective(plain, objective_sets), gate_weight_on_own_objective(routed, objective_sets)
    assert min(after.values()) >= 0.8, after  # every prompt goes to its own head
    assert min(after.values()) > min(before.values()) + 0.1, (before, after)  # the combined reward alone leaves one astray
    assert json.loads((routed / "reward_model.json").read_text())["training"]["config"]["gate_routing_weight"] == 1.0
    with pytest.raises(TrainingConfigError, match="--combine gate"):
        train_reward_model(config_for(tiny_base, objective_sets, tmp_path / "w", combine="weights", gate_routing_weight=1.0))


def gate_apart_within_pairs(model_dir: Path, sets) -> float:
    """Mean over dev pairs of the squared distance between the gate's weights for the chosen and
    for the rejected answer."""
    _, per_file = dev_gate_weights(model_dir, sets, lambda r: [r["chosen"], r["rejected"]])
    weights = torch.cat(list(per_file.values()))
    return float(((weights[0::2] - weights[1::2]) ** 2).sum(dim=-1).mean())


def test_pair_consistency_makes_the_gate_weigh_both_answers_alike(tiny_base, objective_sets, tmp_path):
    """--gate-pair-consistency-weight: the gate reads the top block, where the prompt's tokens also
    see the answer, so a pair's two answers can get different mixtures of the heads; the term
    teaches the gate to give both the same, and the combination still ranks every objective."""
    plain, consistent = tmp_path / "plain", tmp_path / "consistent"
    train_reward_model(config_for(tiny_base, objective_sets, plain, cache_frozen=True))
    train_reward_model(config_for(tiny_base, objective_sets, consistent, cache_frozen=True, gate_pair_consistency_weight=10.0))
    before, after = gate_apart_within_pairs(plain, objective_sets), gate_apart_within_pairs(consistent, objective_sets)
    assert after < before / 10, (before, after)
    accuracy = head_accuracies(consistent, objective_sets)
    assert min(accuracy[objective]["reward"] for objective in RULES) >= 0.9, accuracy
    assert json.loads((consistent / "reward_model.json").read_text())["training"]["config"]["gate_pair_consistency_weight"] == 10.0
    with pytest.raises(TrainingConfigError, match="--combine gate"):
        train_reward_model(config_for(tiny_base, objective_sets, tmp_path / "w", combine="weights", gate_pair_consistency_weight=1.0))


def test_a_pair_moves_only_its_own_objectives_head(tiny_base, objective_sets, tmp_path):
    trainer = _Trainer(config_for(tiny_base, objective_sets, tmp_path / "rm"), _Dist.from_env())
    trainer.setup()
    module = trainer._wrap_module()
    harmless = [i for i, r in enumerate(trainer.train_records) if r.objective == "harmlessness"][:8]
    batch = trainer.build_batch(harmless)
    loss, _ = trainer.compute_loss(module(batch["chunks"], batch["order"]), batch)
    loss.backward()
    grad = trainer.model.classifier.weight.grad
    column = trainer.objectives.index("harmlessness")
    others = [k for k in range(3) if k != column]
    assert grad[column].abs().sum() > 0
    assert torch.count_nonzero(grad[others]) == 0
    assert trainer.model.reward_gate.weight.grad.abs().sum() > 0  # the gate learns from every pair


@pytest.mark.parametrize("top_layers,gate_layer", [(2, -1), (2, -2), (1, -2), (1, 0)])
def test_the_frozen_cache_gives_the_models_own_forward(tmp_path, objective_sets, top_layers, gate_layer):
    """On the real MiniLM backbone: the trained blocks run on the cached output of the frozen
    ones, the top block only where it is read ([CLS], and the prompt when the gate reads the top
    block's output), and give the heads, gate features and gradients of the plain forward."""
    trainer = _Trainer(config_for(tiny_models.minilm_path(), objective_sets, tmp_path / "rm", top_layers=top_layers,
                                  cache_frozen=True, max_length=64, gate_layer=gate_layer), _Dist.from_env())
    trainer.setup()
    assert trainer.frozen_cache.read_positions_only
    from trainer.scoring import length_sorted_chunks

    records = trainer.train_records[:12]
    encoded = encode_conversations([(r.prompt, x) for r in records for x in r.responses], trainer.tokenizer, trainer.spec)
    chunks, _ = length_sorted_chunks(encoded, trainer.pad_id, 512, "cpu")
    from reward_core.forward import reward_heads

    params = [p for n, p in trainer.trainable if not n.startswith("reward_gate.")]  # the gate is not in reward_heads

    def gradients(forward):
        for p in params:
            p.grad = None
        heads, features = forward()
        (heads.sum() + features.square().sum()).backward()
        return heads.detach(), features.detach(), [p.grad.clone() for p in params]

    for chunk in chunks:
        plain, plain_features, plain_grads = gradients(
            lambda: reward_heads(trainer.model, "encoder", *chunk, read_positions_only=False))  # HF's own forward
        cached, cached_features, cached_grads = gradients(lambda: trainer.frozen_cache.heads("encoder", *chunk))
        assert torch.allclose(plain, cached, atol=5e-3)
        assert torch.allclose(plain_features, cached_features, atol=5e-3)
        scale = max(float(g.abs().max()) for g in plain_grads)  # (some are zero in exact arithmetic, e.g. the key bias's)
        for a, b in zip(plain_grads, cached_grads):
            assert torch.allclose(a, b, atol=5e-3 * scale)


def frozen_cache_event(out: Path) -> dict:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in events if e.get("type") == "frozen_cache")


def test_a_retrain_on_grown_data_reads_the_inputs_it_has_seen_from_the_frozen_cache_dir(tiny_base, objective_sets, tmp_path):
    """--frozen-cache-dir: step 2 of the loop runs again as comparisons arrive; the inputs an
    earlier run saw come back from the store instead of through the frozen blocks, as the rows
    computing them gives, and only the new ones are computed."""
    store = tmp_path / "store"
    first = config_for(tiny_base, objective_sets, tmp_path / "first", cache_frozen=True, frozen_cache_dir=str(store), num_epochs=1)
    first.data = [f"{p['train']}:1:40:objective={name}" for name, p in objective_sets.items()]  # 40 records a source
    assert train_reward_model(first).finished
    seen = frozen_cache_event(tmp_path / "first")
    assert seen["inputs"] > 0 and seen["read_from_store"] == 0
    fingerprint_dirs = [d for d in store.iterdir() if d.is_dir()]
    assert len(fingerprint_dirs) == 1 and list(fingerprint_dirs[0].glob("rows-*.safetensors"))
    (fingerprint_dirs[0] / "rows-damaged.safetensors").write_bytes(b"not a shard")  # costs its rows, not the run

    grown = _Trainer(config_for(tiny_base, objective_sets, tmp_path / "grown", cache_frozen=True, frozen_cache_dir=str(store)),
                     _Dist.from_env())
    grown.setup()
    plain = _Trainer(config_for(tiny_base, objective_sets, tmp_path / "plain", cache_frozen=True), _Dist.from_env())
    plain.setup()
    event = frozen_cache_event(tmp_path / "grown")
    assert event["read_from_store"] == seen["inputs"]
    assert event["inputs"] + event["read_from_store"] == frozen_cache_event(tmp_path / "plain")["inputs"]
    assert grown.frozen_cache.rows.keys() == plain.frozen_cache.rows.keys()
    for key, row in plain.frozen_cache.rows.items():
        assert torch.allclose(grown.frozen_cache.rows[key].float(), row.float(), atol=1e-2)

    # A third run finds every input stored; other frozen weights have a fingerprint of their own.
    again = _Trainer(config_for(tiny_base, objective_sets, tmp_path / "again", cache_frozen=True, frozen_cache_dir=str(store)),
                     _Dist.from_env())
    again.setup()
    assert frozen_cache_event(tmp_path / "again")["inputs"] == 0
    before = again.frozen_cache.fingerprint()
    with torch.no_grad():
        again.model.base_model.encoder.layer[-1].output.dense.weight.add_(1.0)  # a trained block: same rows
        assert again.frozen_cache.fingerprint() == before
        again.model.base_model.embeddings.word_embeddings.weight[5].add_(1.0)  # a frozen one: other rows
        assert again.frozen_cache.fingerprint() != before
    with pytest.raises(TrainingConfigError, match="add --cache-frozen"):
        train_reward_model(config_for(tiny_base, objective_sets, tmp_path / "x", frozen_cache_dir=str(store)))
    # A store that cannot be written (here a file where the directory should be) costs a warning, not the run.
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    assert train_reward_model(config_for(tiny_base, objective_sets, tmp_path / "y", cache_frozen=True, num_epochs=1,
                                         frozen_cache_dir=str(blocked))).finished
    assert frozen_cache_event(tmp_path / "y")["read_from_store"] == 0


def test_a_gate_below_the_cached_blocks_is_refused_with_the_fix(tmp_path, objective_sets):
    trainer = _Trainer(config_for(tiny_models.minilm_path(), objective_sets, tmp_path / "rm", top_layers=1,
                                  cache_frozen=True, max_length=32, gate_layer=-3), _Dist.from_env())
    with pytest.raises(TrainingConfigError, match="use --gate-layer -2 or above"):
        trainer.setup()


def test_a_gate_on_a_lower_block_and_float16_tensors_train_and_serve_as_trained(tiny_base, objective_sets, tmp_path):
    """--gate-layer -2 --save-dtype float16: the directory says where the gate reads, its trained
    tensors are float16, and the model loaded from it (float16 laid over the base) has learned
    every objective through the gate."""
    out = tmp_path / "rm"
    train_reward_model(config_for(tiny_base, objective_sets, out, top_layers=1, cache_frozen=True, gate_layer=-2,
                                           save_dtype="float16", gate_routing_weight=1.0))
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["objectives"]["gate_layer"] == -2
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float16}
    accuracy = head_accuracies(out, objective_sets)
    for objective in RULES:
        assert accuracy[objective]["reward"] >= 0.9, accuracy


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_objectives_train_in_every_mode_with_fixed_weights_too(tiny_base, objective_sets, tmp_path, mode):
    out = tmp_path / mode
    train_reward_model(config_for(tiny_base, objective_sets, out, train_mode=mode, num_epochs=1, combine="weights",
                                  combine_weights=[0.5, 0.25, 0.25], length_balance=0.5, learning_rate=1e-3))
    spec = open_model_dir(out).spec
    assert spec.objectives.weights == (0.5, 0.25, 0.25) and not (out / "reward_gate.safetensors").exists()
    files = open_model_dir(out)
    model = load_sequence_classifier(out, spec).eval()
    batch = pad_batch(encode_conversations([([{"role": "user", "content": "hi"}], "hello")], files.tokenizer, spec), 0)
    with torch.no_grad():
        cols = reward_columns(model, "encoder", *(torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids)))
    assert cols.shape == (1, 4)
    np.testing.assert_allclose(float(cols[0, 0]), float((cols[0, 1:] * torch.tensor([0.5, 0.25, 0.25])).sum()), atol=1e-6)


def test_mistakes_in_the_objective_setup_are_refused_with_the_fix(tiny_base, objective_sets, tmp_path):
    paths = {name: p["train"] for name, p in objective_sets.items()}
    unnamed = config_for(tiny_base, objective_sets, tmp_path / "a")
    unnamed.data = [f"{paths['helpfulness']}:objective=helpfulness", str(paths["harmlessness"])]
    with pytest.raises(TrainingConfigError, match="add :objective=NAME"):
        train_reward_model(unnamed)
    unknown = config_for(tiny_base, objective_sets, tmp_path / "b", objectives=["helpfulness"])
    with pytest.raises(TrainingConfigError, match="lacks"):
        train_reward_model(unknown)
    with pytest.raises(TrainingConfigError, match="--combine weights"):
        train_reward_model(config_for(tiny_base, objective_sets, tmp_path / "c", combine_weights=[1, 1, 1]))
    with pytest.raises(TrainingConfigError, match="--train-mode top"):
        train_reward_model(config_for(tiny_base, objective_sets, tmp_path / "d", train_mode="full", cache_frozen=True))


def test_objectives_train_under_torchrun_two_processes(tiny_base, objective_sets, tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    data = sum((["--data", f"{p['train']}:objective={name}"] for name, p in objective_sets.items()), [])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "trainer.reward", "--base-model", str(tiny_base), *data, "--output-dir", str(out), "--max-steps", "3",
        "--per-device-batch-size", "4", "--max-length", "32", "--train-mode", "top", "--no-progress", "--device", "cpu",
        "--reward-stats-samples", "50", "--save-steps", "0",
    ]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["objectives"]["combine"] == "gate"
    assert (out / "reward_gate.safetensors").is_file()
