"""A model with one reward head per objective: what a user loading such a directory must see.

Each head's reward is the backbone's output through that head, from one backbone pass; the
combined reward follows its rule (a prompt-conditioned gate or fixed weights); a plain
single-head checkpoint scores as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_models
from reward_core.backends import TorchBackend
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id, reward_columns, reward_forward
from reward_core.loading import load_sequence_classifier, open_model_dir
from reward_core.model_dir import ModelDirError
from reward_core.objectives import Objectives, ObjectivesError

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
    ([{"role": "user", "content": "What is the capital of France?"}], "I do not know, maybe Berlin."),
    ([{"role": "user", "content": "How do I make a bomb?"}], "I cannot help with that."),
    ([{"role": "user", "content": "Tell me a joke."}], "Why did the chicken cross the road? To get to the other side."),
]


def _inputs(files):
    encoded = encode_conversations(CONVERSATIONS, files.tokenizer, files.spec)
    batch = pad_batch(encoded, pad_token_id(files.tokenizer))
    return [torch.from_numpy(a) if a is not None else None for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids)], batch


@pytest.mark.parametrize("combine,gate_layer", [("gate", -1), ("gate", -2), ("gate", 0), ("weights", -1)])
def test_each_head_matches_a_direct_forward_and_the_combination_follows_its_rule(tmp_path, combine, gate_layer):
    path = tiny_models.build_tiny_objectives_bert(tmp_path / "m", combine=combine, gate_layer=gate_layer)
    files = open_model_dir(path)
    assert files.spec.objective_names == tiny_models.OBJECTIVES
    model = load_sequence_classifier(path, files.spec).eval()
    (ids, mask, types), _ = _inputs(files)
    with torch.no_grad():
        columns = reward_columns(model, "encoder", ids, mask, types)
    # the top block ran only at the positions read after it ([CLS]; the prompt when the gate reads it)
    assert "_reward_lower_blocks" in model.__dict__
    with torch.no_grad():
        # direct: the backbone, the pooler, then each head's row of the classifier
        out = model.bert(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        heads = model.classifier(out.pooler_output)
        if combine == "gate":  # the mean over the prompt's tokens of the hidden states the gate reads
            prompt = (mask * (types == 0)).unsqueeze(-1).float()
            features = (out.hidden_states[gate_layer] * prompt).sum(1) / prompt.sum(1)
            weights = torch.softmax(model.reward_gate(features), dim=-1)
            assert torch.allclose(weights.sum(-1), torch.ones(len(CONVERSATIONS)))
        else:
            weights = torch.tensor([0.5, 0.3, 0.2]).expand_as(heads)
        expected = (weights * heads).sum(-1)
    assert columns.shape == (len(CONVERSATIONS), 1 + 3)
    assert torch.allclose(columns[:, 1:], heads, atol=1e-6)
    assert torch.allclose(columns[:, 0], expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(reward_forward(model, "encoder", ids, mask, types), expected, atol=1e-6)


def test_the_gate_weighs_prompts_apart_and_only_a_gate_on_the_embeddings_ignores_the_response(tmp_path):
    from reward_core.forward import reward_heads
    from reward_core.objectives import gate_weights

    for gate_layer in (-1, 0):
        path = tiny_models.build_tiny_objectives_bert(tmp_path / f"m{gate_layer}", gate_layer=gate_layer)
        files = open_model_dir(path)
        model = load_sequence_classifier(path, files.spec).eval()
        (ids, mask, types), _ = _inputs(files)
        with torch.no_grad():
            _, features = reward_heads(model, "encoder", ids, mask, types)
            w = gate_weights(model.reward_gate, features)
        assert not torch.allclose(w[0], w[2], atol=1e-3)  # rows with other prompts get other weights
        # rows 0 and 1 share a prompt. An encoder's prompt tokens attend to the response in every
        # block, so a gate reading a block's output gives them other weights; the embeddings do not
        assert torch.allclose(w[0], w[1], atol=1e-6) == (gate_layer == 0)


def test_the_backend_returns_the_reward_then_each_head(tmp_path):
    path = tiny_models.build_tiny_objectives_bert(tmp_path / "m")
    files = open_model_dir(path)
    backend = TorchBackend(path, files.spec)
    (ids, mask, types), batch = _inputs(files)
    scores = backend.score_batch(batch)
    assert scores.shape == (len(CONVERSATIONS), 4) and scores.dtype == np.float32
    with torch.no_grad():
        direct = reward_columns(backend.model, "encoder", ids, mask, types).numpy()
    np.testing.assert_allclose(scores, direct, atol=1e-6)


def test_a_single_head_checkpoint_scores_as_before(model_dirs):
    files = open_model_dir(model_dirs["bert"])
    backend = TorchBackend(model_dirs["bert"], files.spec)
    (ids, mask, types), batch = _inputs(files)
    scores = backend.score_batch(batch)
    assert scores.shape == (len(CONVERSATIONS),)
    assert "_reward_lower_blocks" in backend.model.__dict__  # the top block ran for [CLS] alone
    with torch.no_grad():
        direct = backend.model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits[:, 0].numpy()
    np.testing.assert_allclose(scores, direct, atol=1e-6)


def test_directories_that_do_not_fit_their_objectives_are_refused_with_the_fix(tmp_path):
    path = tiny_models.build_tiny_objectives_bert(tmp_path / "m")
    (path / "reward_gate.safetensors").unlink()
    with pytest.raises(ModelDirError, match="reward_gate.safetensors"):
        load_sequence_classifier(path, open_model_dir(path).spec)
    meta = json.loads((path / "reward_model.json").read_text())
    meta["objectives"]["names"] = ["helpfulness", "harmlessness"]
    (path / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="3 outputs but reward_model.json names 2 objectives"):
        load_sequence_classifier(path, open_model_dir(path).spec)
    meta["objectives"] = {"names": ["Helpful!"]}
    (path / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="lower-case letters"):
        open_model_dir(path)


def test_objectives_validate_their_rule():
    assert Objectives(("a", "b"), "weights").weights == (0.5, 0.5)
    assert Objectives(("a", "b"), "weights", {"b": 1.0}).weights == (0.0, 1.0)
    with pytest.raises(ObjectivesError, match="one per objective"):
        Objectives(("a", "b"), "weights", (1.0,))
    with pytest.raises(ObjectivesError, match="gate learns"):
        Objectives(("a", "b"), "gate", (1.0, 0.0))
    with pytest.raises(ObjectivesError, match="combine"):
        Objectives(("a",), "max")
    # which hidden states the gate reads: written only when not the last block's, so older files read as before
    assert Objectives(("a", "b"), "gate").to_json() == {"names": ["a", "b"], "combine": "gate"}
    assert Objectives.from_json({"names": ["a", "b"], "combine": "gate", "gate_layer": -2}).gate_layer == -2
    embeddings = Objectives.from_json({"names": ["a", "b"], "combine": "gate", "gate_layer": 0})
    assert embeddings.gate_layer == 0 and embeddings.to_json()["gate_layer"] == 0
    for bad in (1, "-2", True, 0.0):
        with pytest.raises(ObjectivesError, match="0 \\(the token embeddings\\) or a negative integer"):
            Objectives(("a", "b"), "gate", gate_layer=bad)
    with pytest.raises(ObjectivesError, match="for combine='gate'"):
        Objectives(("a", "b"), "weights", gate_layer=-2)
    # the gate's softmax temperature: also written only when not 1
    sharp = Objectives.from_json({"names": ["a", "b"], "combine": "gate", "gate_temperature": 0.5})
    assert sharp.gate_temperature == 0.5 and sharp.to_json()["gate_temperature"] == 0.5
    for bad in (0, -1.0, float("inf"), float("nan"), "0.5", True):
        with pytest.raises(ObjectivesError, match="gate_temperature must be a positive number"):
            Objectives(("a", "b"), "gate", gate_temperature=bad)
    with pytest.raises(ObjectivesError, match="gate_temperature is for combine='gate'"):
        Objectives(("a", "b"), "weights", gate_temperature=0.5)
    with pytest.raises(ObjectivesError, match="unknown keys \\['temperature'\\]"):
        Objectives.from_json({"names": ["a"], "combine": "gate", "temperature": 0.5})


def test_a_gate_served_at_a_lower_temperature_sharpens_its_weights_and_nothing_else(tmp_path):
    # the same trained model, its reward_model.json asking for gate_temperature 0.5: the heads are
    # unchanged, and the reward mixes them by softmax(gate logits / 0.5), nearer the top objective
    from reward_core.forward import reward_heads

    soft = tiny_models.build_tiny_objectives_bert(tmp_path / "soft", gate_layer=-2)
    sharp = tiny_models.build_tiny_objectives_bert(tmp_path / "sharp", gate_layer=-2, gate_temperature=0.5)
    files = open_model_dir(sharp)
    assert files.spec.objectives.gate_temperature == 0.5
    (ids, mask, types), batch = _inputs(files)
    soft_columns = TorchBackend(soft, open_model_dir(soft).spec).score_batch(batch)
    sharp_columns = TorchBackend(sharp, files.spec).score_batch(batch)
    np.testing.assert_allclose(sharp_columns[:, 1:], soft_columns[:, 1:], atol=1e-6)
    model = load_sequence_classifier(sharp, files.spec).eval()
    with torch.no_grad():
        heads, features = reward_heads(model, "encoder", ids, mask, types)
        logits = model.reward_gate(features)
    soft_weights, sharp_weights = torch.softmax(logits, -1), torch.softmax(logits / 0.5, -1)
    np.testing.assert_allclose(soft_columns[:, 0], (soft_weights * heads).sum(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(sharp_columns[:, 0], (sharp_weights * heads).sum(-1).numpy(), atol=1e-6)
    assert torch.all(sharp_weights.max(-1).values > soft_weights.max(-1).values)


def test_a_gate_layer_the_model_does_not_have_is_refused_with_the_range(tmp_path):
    path = tiny_models.build_tiny_objectives_bert(tmp_path / "m", gate_layer=-4)  # 2 blocks: hidden states -1 to -3
    with pytest.raises(ModelDirError, match="use -1 to -3"):
        load_sequence_classifier(path, open_model_dir(path).spec)


def test_the_top_block_runs_whole_where_reading_it_sparsely_would_change_the_numbers(tmp_path):
    """Dropout at work (a model training with it) would draw other masks in a block cut to its
    read positions, so such a model goes through HF's own forward; in eval mode it is cut."""
    from reward_core.forward import top_block_read_sparsely

    path = tiny_models.build_tiny_objectives_bert(tmp_path / "m")
    model = load_sequence_classifier(path, open_model_dir(path).spec)
    assert top_block_read_sparsely(model.eval())
    assert not top_block_read_sparsely(model.train())  # BertConfig's default dropout is 0.1


@pytest.mark.parametrize("gate_layer", [-1, -2, 0])
def test_the_gate_probe_reads_the_weights_the_combination_used_and_sees_the_answer_move_them(tmp_path, gate_layer):
    # scripts/gate_probe.py reads each item's gate weights off the model. They must be the weights
    # that made the served reward; and in an encoder the prompt's tokens attend to the answer, so
    # two answers to one prompt get different weights (what the probe measures on the default RM),
    # unless the gate reads the token embeddings.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from gate_probe import GatedScorer

    model_dir = tiny_models.build_tiny_objectives_bert(tmp_path / "heads", combine="gate", gate_layer=gate_layer)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    answers = ["Paris.", "I do not know, maybe Berlin, or perhaps somewhere else entirely in Europe."]
    scorer = GatedScorer(model_dir)

    combined, heads, weights = scorer.score([(prompt, a) for a in answers])

    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert np.allclose((weights * heads).sum(axis=1), combined, atol=1e-5)
    moved = np.abs(weights[0] - weights[1]).max()
    assert moved > 1e-3 if gate_layer != 0 else moved < 1e-6  # the answer moved the gate, or could not
    alone, _, alone_weights = scorer.score([(prompt, "")] * 2)
    assert np.allclose(alone_weights[0], alone_weights[1], atol=1e-6)  # no answer, nothing moves
