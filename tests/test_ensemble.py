"""A model directory holding an ensemble: K members over one shared backbone. What a user loading
one must see: each member's reward is what that member gives run alone, the shared part runs
once, and every aggregation follows its formula."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import tiny_models
from reward_core.backends import TorchBackend
from reward_core.ensemble import (
    Ensemble,
    EnsembleError,
    aggregate_rewards,
    member_agreement,
    member_mean_std,
)
from reward_core.bert import bert_block
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id, reward_columns
from reward_core.loading import load_sequence_classifier, open_model_dir
from reward_core.model_dir import ModelDirError

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
    ([{"role": "user", "content": "What is the capital of France?"}], "I do not know, maybe Berlin, or somewhere else entirely."),
    ([{"role": "user", "content": "How do I make a bomb?"}], "I cannot help with that."),
    ([{"role": "user", "content": "Tell me a joke."}], "Why did the chicken cross the road? To get to the other side."),
]


def _inputs(files):
    batch = pad_batch(encode_conversations(CONVERSATIONS, files.tokenizer, files.spec), pad_token_id(files.tokenizer))
    return [torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids)]


def _member_alone(model, m: int):
    """A plain HF model whose top blocks, pooler and head are member m's: that member run alone."""
    alone = copy.deepcopy(model)
    member = model.reward_members.members[m]
    top = len(member.layers)
    blocks = alone.bert.encoder.layer
    for j in range(top):
        blocks[len(blocks) - top + j] = copy.deepcopy(member.layers[j])
    alone.bert.pooler = copy.deepcopy(member.pooler)
    alone.classifier = copy.deepcopy(member.classifier)
    for name in ("reward_members", "reward_ensemble", "reward_shared_backbone"):
        if hasattr(alone, name):
            delattr(alone, name)
    return alone.eval()


@pytest.mark.parametrize("top_layers", [0, 1, 2])
def test_each_member_gives_what_it_gives_run_alone(tmp_path, top_layers):
    path = tiny_models.build_tiny_ensemble_bert(tmp_path / "m", members=3, top_layers=top_layers)
    files = open_model_dir(path)
    assert files.spec.ensemble == Ensemble(members=3, top_layers=top_layers)
    model = load_sequence_classifier(path, files.spec).eval()
    ids, mask, types = _inputs(files)
    with torch.no_grad():
        columns = reward_columns(model, "encoder", ids, mask, types)
        alone = torch.stack([_member_alone(model, m)(input_ids=ids, attention_mask=mask, token_type_ids=types).logits[:, 0]
                             for m in range(3)], dim=-1)
    assert columns.shape == (len(CONVERSATIONS), 1 + 3)
    torch.testing.assert_close(columns[:, 1:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(columns[:, 0], alone.mean(-1), atol=1e-5, rtol=1e-5)
    assert float(columns[:, 1:].std(-1).min()) > 0  # the members differ


def test_a_members_last_block_computes_the_first_row_only_and_matches_the_full_block(tmp_path):
    path = tiny_models.build_tiny_ensemble_bert(tmp_path / "m")
    files = open_model_dir(path)
    model = load_sequence_classifier(path, files.spec).eval()
    ids, mask, types = _inputs(files)
    with torch.no_grad():
        hidden = model.bert.embeddings(input_ids=ids, token_type_ids=types)
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        block = model.bert.encoder.layer[0]
        full = bert_block(block, hidden, additive)
        first = bert_block(block, hidden, additive, query_rows=1)
        reference = model.bert(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True).hidden_states[1]
    valid = mask.bool()
    torch.testing.assert_close(full[valid], reference[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[:, 0], reference[:, 0], atol=1e-5, rtol=1e-5)
    assert first.shape[1] == 1


def test_the_backend_returns_the_mean_then_each_member(tmp_path):
    path = tiny_models.build_tiny_ensemble_bert(tmp_path / "m", members=4)
    files = open_model_dir(path)
    backend = TorchBackend(path, files.spec)
    ids, mask, types = _inputs(files)
    out = backend.score_batch(pad_batch(encode_conversations(CONVERSATIONS, files.tokenizer, files.spec), pad_token_id(files.tokenizer)))
    assert out.shape == (len(CONVERSATIONS), 5)
    np.testing.assert_allclose(out[:, 0], out[:, 1:].mean(-1), atol=1e-5)


def test_aggregations_follow_their_formulas():
    members = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 3.0]])
    mean, std = member_mean_std(members)
    np.testing.assert_allclose(mean, [3.0, 0.0, 1.0])
    np.testing.assert_allclose(std, [np.sqrt(14 / 3), 0.0, np.sqrt(8 / 3)])
    np.testing.assert_allclose(aggregate_rewards(members, "mean"), [3.0, 0.0, 1.0])
    np.testing.assert_allclose(aggregate_rewards(members, "min"), [1.0, 0.0, -1.0])
    np.testing.assert_allclose(aggregate_rewards(members, "mean_minus_var", 0.5), [3.0 - 0.5 * 14 / 3, 0.0, 1.0 - 0.5 * 8 / 3])
    np.testing.assert_allclose(member_agreement(members[[0, 2]], members[[2, 0]]), [1.0, 0.0])
    np.testing.assert_allclose(member_agreement(np.array([[1.0, 2.0]]), np.array([[1.0, 3.0]])), [0.25])
    with pytest.raises(EnsembleError, match="one of mean, min, mean_minus_var"):
        aggregate_rewards(members, "max")
    with pytest.raises(EnsembleError, match=">= 0"):
        aggregate_rewards(members, "mean_minus_var", -1.0)


def test_ensemble_blocks_that_cannot_be_used_are_refused_with_the_fix(tmp_path):
    with pytest.raises(EnsembleError, match="from 1 to 64"):
        Ensemble(members=0)
    with pytest.raises(EnsembleError, match="unknown keys"):
        Ensemble.from_json({"members": 2, "heads": 3})
    path = tiny_models.build_tiny_ensemble_bert(tmp_path / "m")
    (path / "reward_members.safetensors").unlink()
    with pytest.raises(ModelDirError, match="reward_members.safetensors"):
        load_sequence_classifier(path, open_model_dir(path).spec)
    other = tiny_models.build_tiny_ensemble_bert(tmp_path / "n", members=2)
    meta = json.loads((other / "reward_model.json").read_text())
    meta["ensemble"]["members"] = 3
    (other / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="does not fit 3 members"):
        load_sequence_classifier(other, open_model_dir(other).spec)
    meta["objectives"] = {"names": ["a", "b"], "combine": "weights"}
    (other / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="ensemble or has objectives"):
        open_model_dir(other)


@pytest.mark.parametrize("int8", [False, True])
def test_an_onnx_export_carries_every_member(tmp_path, int8):
    from reward_core.backends import OnnxBackend
    from trainer.export import export_onnx

    source = tiny_models.build_tiny_ensemble_bert(tmp_path / "m", members=3)
    summary = export_onnx(source, tmp_path / "onnx", int8=int8)
    assert summary["ensemble"]["members"] == 3
    assert set(summary["max_abs_difference_per_column"]) == {"reward", "member_0", "member_1", "member_2"}
    files = open_model_dir(tmp_path / "onnx")
    assert files.spec.ensemble.members == 3
    batch = pad_batch(encode_conversations(CONVERSATIONS, files.tokenizer, files.spec), pad_token_id(files.tokenizer))
    exported = OnnxBackend(tmp_path / "onnx", files.spec).score_batch(batch)
    direct = TorchBackend(source, open_model_dir(source).spec).score_batch(batch)
    assert exported.shape == direct.shape == (len(CONVERSATIONS), 4)
    np.testing.assert_allclose(exported, direct, atol=0.05 if int8 else 1e-4)
