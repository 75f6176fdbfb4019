"""Training an ensemble: what a user of `reward train-rm --ensemble K` does, then what the model
directory must give them. Members share the frozen part of the backbone, each learns from its own
bootstrap sample with a head seeded apart, and the directory serves K members' rewards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id, reward_columns
from reward_core.loading import load_sequence_classifier, open_model_dir
from test_train_objectives import write_objective_sets
from trainer.reward import _Dist, _Trainer, train_reward_model
from trainer.reward_config import RewardTrainingConfig, TrainingConfigError


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return write_objective_sets(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return tiny_models.build_tiny_bert(tmp_path_factory.mktemp("base") / "bert")


def config_for(base, sets, out, **overrides) -> RewardTrainingConfig:
    values = dict(
        base_model=str(base), output_dir=str(out), max_length=48, per_device_batch_size=16, learning_rate=3e-3,
        warmup_ratio=0.0, eval_steps=0, save_steps=0, logging_steps=5, progress=False, reward_stats_samples=100,
        num_threads=2, num_epochs=3, train_mode="top", top_layers=1, ensemble=3,
        data=[str(paths["train"]) for paths in sets.values()],
        eval_data=[f"{name}={paths['dev']}" for name, paths in sets.items()],
    )
    values.update(overrides)
    return RewardTrainingConfig(**values)


def member_columns(model_dir: Path, sets) -> tuple[np.ndarray, np.ndarray]:
    """(columns [items, 1+K] of every dev item, chosen first then rejected per pair; wins [pairs, 1+K])."""
    files = open_model_dir(model_dir)
    model = load_sequence_classifier(model_dir, files.spec).eval()
    rows = [json.loads(line) for paths in sets.values() for line in paths["dev"].read_text().splitlines()]
    convs = [([{"role": "user", "content": r["prompt"]}], resp) for r in rows for resp in (r["chosen"], r["rejected"])]
    batch = pad_batch(encode_conversations(convs, files.tokenizer, files.spec), pad_token_id(files.tokenizer))
    with torch.no_grad():
        cols = reward_columns(model, "encoder", *(torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids))).numpy()
    return cols, cols[0::2] > cols[1::2]


@pytest.mark.parametrize("top_layers,cache", [(1, True), (0, True), (1, False)])
def test_each_member_learns_and_the_members_differ(tiny_base, sets, tmp_path, top_layers, cache):
    out = tmp_path / "rm"
    result = train_reward_model(config_for(tiny_base, sets, out, top_layers=top_layers, cache_frozen=cache))
    assert result.finished
    spec = open_model_dir(out).spec
    assert spec.ensemble.members == 3 and spec.ensemble.top_layers == top_layers and spec.extra_columns == 3
    assert (out / "reward_members.safetensors").is_file()
    cols, wins = member_columns(out, sets)
    assert cols.shape[1] == 4
    np.testing.assert_allclose(cols[:, 0], cols[:, 1:].mean(-1), atol=1e-5)
    # the mean and every member learned the rules (members of heads alone, over a frozen random tiny backbone, less so)
    assert wins.mean(axis=0).min() >= (0.85 if top_layers else 0.75), wins.mean(axis=0)
    correlation = np.corrcoef(cols[:, 1:].T)
    assert correlation[np.triu_indices(3, 1)].max() < 0.9999  # the members are not copies of each other
    dev = json.loads((out / "reward_model.json").read_text())["dev_results"]
    assert set(dev) == set(sets)
    for name, result in dev.items():  # the trainer measures how diverse the members are
        diversity = result["ensemble"]
        assert len(diversity["member_accuracy"]) == 3
        assert 0.5 <= diversity["pairwise_agreement"] <= 1.0 and -1.0 <= diversity["reward_correlation"] <= 1.0


def test_each_member_learns_from_its_own_bootstrap_sample(tiny_base, sets, tmp_path):
    trainer = _Trainer(config_for(tiny_base, sets, tmp_path / "rm"), _Dist.from_env())
    trainer.setup()
    weights = trainer.member_weights
    assert weights.shape == (len(trainer.train_records), 3)
    assert not np.array_equal(weights[:, 0], weights[:, 1])
    assert 0.55 < float((weights > 0).mean()) < 0.72  # a bootstrap sample holds about 63% of the records
    # a record member 0 never draws moves member 0 not at all
    record = int(np.flatnonzero((weights[:, 0] == 0) & (weights[:, 1] > 0))[0])
    module = trainer._wrap_module()
    batch = trainer.build_batch([record])
    loss, _ = trainer.compute_loss(module(batch["chunks"], batch["order"]), batch)
    loss.backward()
    members = trainer.model.reward_members.members
    assert members[0].classifier.weight.grad is None or torch.count_nonzero(members[0].classifier.weight.grad) == 0
    assert members[1].classifier.weight.grad.abs().sum() > 0
    # the shared backbone never trains
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if not n.startswith("reward_members."))


def test_ensemble_setups_that_cannot_work_are_refused_with_the_fix(tiny_base, sets, tmp_path):
    with pytest.raises(TrainingConfigError, match="--train-mode top"):
        train_reward_model(config_for(tiny_base, sets, tmp_path / "a", train_mode="full"))
    named = config_for(tiny_base, sets, tmp_path / "b")
    named.data = [f"{paths['train']}:objective={name}" for name, paths in sets.items()]
    with pytest.raises(TrainingConfigError, match="objectives do not go together"):
        train_reward_model(named)
    llama = tiny_models.build_tiny_llama(tmp_path / "llama")
    with pytest.raises(TrainingConfigError, match="BERT-family"):
        train_reward_model(config_for(llama, sets, tmp_path / "c"))
