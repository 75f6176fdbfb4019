"""`reward export-onnx` of a model with one reward head per objective: the graph carries every
head (``objectives`` [batch, H] beside ``reward`` [batch]) and ``OnnxBackend`` returns
[batch, 1 + H] as ``TorchBackend`` does, in float32 and int8; a single-head export is as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import tiny_models
from reward_core.backends import OnnxBackend, TorchBackend
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id
from reward_core.loading import open_model_dir
from reward_core.model_dir import ModelDirError
from trainer.export import export_onnx

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
    ([{"role": "user", "content": "What is the capital of France?"}], "I do not know, maybe Berlin or Lyon or Nice."),
    ([{"role": "user", "content": "How do I make a bomb?"}], "I cannot help with that."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "Hi!"),
    ([{"role": "user", "content": "Tell me a joke about the sea. " * 3}],
     "Why did the chicken cross the road? To get to the other side, where the sea is. " * 2),
]
FP32_COLUMNS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny 3-head BERT (gate, and fixed weights) and the tiny single-head BERT, each
    exported in float32 and int8 (the fused-encoder path, a few seconds each)."""
    root = tmp_path_factory.mktemp("objectives-onnx")
    sources = {
        "gate": tiny_models.build_tiny_objectives_bert(root / "gate", combine="gate"),
        "weights": tiny_models.build_tiny_objectives_bert(root / "weights", combine="weights"),
        "single": tiny_models.build_tiny_bert(root / "single"),
        # a gate reading the block below the top one (objectives.gate_layer -2)
        "gatelow": tiny_models.build_tiny_objectives_bert(root / "gatelow", combine="gate", gate_layer=-2),
        # a gate on the token embeddings (objectives.gate_layer 0)
        "gateemb": tiny_models.build_tiny_objectives_bert(root / "gateemb", combine="gate", gate_layer=0),
        # a gate served sharper than trained (objectives.gate_temperature 0.5)
        "gatesharp": tiny_models.build_tiny_objectives_bert(root / "gatesharp", gate_layer=-2, gate_temperature=0.5),
    }
    dirs, summaries = {}, {}
    for name, source in sources.items():
        for int8 in (False, True) if name not in ("gatelow", "gateemb", "gatesharp") else (False,):
            key = f"{name}-{'int8' if int8 else 'fp32'}"
            dirs[key] = root / key
            summaries[key] = export_onnx(source, dirs[key], int8=int8)
    return sources, dirs, summaries


def batches(files):
    """The items in one padded batch and in two other plans (rows alone, a middle pair)."""
    encoded = encode_conversations(CONVERSATIONS, files.tokenizer, files.spec)
    pad = pad_token_id(files.tokenizer)
    return encoded, pad, [pad_batch(encoded, pad), pad_batch(encoded[1:3], pad), pad_batch(encoded[4:], pad)]


def backends(sources, dirs, key):
    source = sources[key.split("-")[0]]
    exported = open_model_dir(dirs[key])
    return TorchBackend(source, open_model_dir(source).spec), OnnxBackend(dirs[key], exported.spec), exported


@pytest.mark.parametrize("variant", ["gate", "gatelow", "gateemb", "gatesharp", "weights"])
def test_fp32_export_gives_every_column_torch_gives(exports, variant):
    sources, dirs, summaries = exports
    key = f"{variant}-fp32"
    torch_backend, onnx_backend, exported = backends(sources, dirs, key)
    # the export keeps the objectives, and its own check covered every column
    assert exported.spec.objectives == open_model_dir(sources[variant]).spec.objectives
    summary = summaries[key]
    assert summary["objectives"]["combine"] == ("weights" if variant == "weights" else "gate")
    assert list(summary["max_abs_difference_per_column"]) == ["reward", *tiny_models.OBJECTIVES]
    assert summary["max_abs_difference_vs_torch"] <= FP32_COLUMNS_TOLERANCE
    # the graph: reward [batch] and objectives [batch, 3]
    session = ort.InferenceSession(str(dirs[key] / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(outputs) == ["reward", "objectives"]
    assert len(outputs["reward"]) == 1 and len(outputs["objectives"]) == 2 and outputs["objectives"][1] == 3
    _, _, plans = batches(exported)
    for batch in plans:
        expected, got = torch_backend.score_batch(batch), onnx_backend.score_batch(batch)
        assert got.shape == expected.shape == (len(batch.input_ids), 1 + 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=FP32_COLUMNS_TOLERANCE, rtol=0)
    # the heads are really different columns, not one head copied
    columns = onnx_backend.score_batch(plans[0])
    assert np.ptp(columns[:, 1:], axis=1).min() > 1e-3


@pytest.mark.parametrize("combine", ["gate", "weights"])
def test_int8_export_carries_every_head_and_scores_rows_alone(exports, combine):
    sources, dirs, summaries = exports
    key = f"{combine}-int8"
    torch_backend, onnx_backend, exported = backends(sources, dirs, key)
    assert onnx_backend.dtype == "int8" and onnx_backend.score_rows_alone
    assert exported.spec.objectives.names == tiny_models.OBJECTIVES
    assert list(summaries[key]["max_abs_difference_per_column"]) == ["reward", *tiny_models.OBJECTIVES]
    encoded, pad, plans = batches(exported)
    alone = np.stack([onnx_backend.score_batch(pad_batch([e], pad))[0] for e in encoded])
    assert alone.shape == (len(encoded), 1 + 3) and alone.dtype == np.float32
    # each item's columns are the same in any batch (rows are run alone, unpadded)
    np.testing.assert_allclose(onnx_backend.score_batch(plans[0]), alone, atol=1e-6)
    np.testing.assert_allclose(onnx_backend.score_batch(pad_batch(encoded[::-1], pad))[::-1], alone, atol=1e-6)
    # close to the float model's columns, and the reward still combines the int8 heads by its rule
    expected = torch_backend.score_batch(plans[0])
    spread = np.ptp(expected, axis=0).max()
    assert np.abs(alone - expected).max() < 0.05 * max(spread, 1.0)
    heads = alone[:, 1:]
    if combine == "weights":
        np.testing.assert_allclose(alone[:, 0], heads @ np.array([0.5, 0.3, 0.2]), atol=1e-5)
    else:  # a softmax gate: a convex combination of the heads
        assert np.all(alone[:, 0] >= heads.min(axis=1) - 1e-5) and np.all(alone[:, 0] <= heads.max(axis=1) + 1e-5)
    empty = onnx_backend.score_batch(pad_batch(encoded[:1], pad))[:0]
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_single_head_export_is_as_before(exports, precision):
    sources, dirs, summaries = exports
    key = f"single-{precision}"
    assert "objectives" not in summaries[key] and "max_abs_difference_per_column" not in summaries[key]
    assert "objectives" not in json.loads((dirs[key] / "reward_model.json").read_text())
    session = ort.InferenceSession(str(dirs[key] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["reward"]
    torch_backend, onnx_backend, exported = backends(sources, dirs, key)
    _, _, plans = batches(exported)
    got, expected = onnx_backend.score_batch(plans[0]), torch_backend.score_batch(plans[0])
    assert got.shape == expected.shape == (len(CONVERSATIONS),)
    np.testing.assert_allclose(got, expected, atol=1e-3 if precision == "fp32" else 0.05)


def test_an_export_and_its_reward_model_json_must_agree_on_the_heads(exports, tmp_path):
    _, dirs, _ = exports
    # heads in the graph, none in the json: the service could not name the columns
    dropped = tmp_path / "dropped"
    shutil.copytree(dirs["gate-fp32"], dropped)
    meta = json.loads((dropped / "reward_model.json").read_text())
    del meta["objectives"]
    (dropped / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="names no objectives"):
        OnnxBackend(dropped, open_model_dir(dropped).spec)
    # objectives in the json, a single-head graph: exported before heads were carried
    added = tmp_path / "added"
    shutil.copytree(dirs["single-fp32"], added)
    meta = json.loads((added / "reward_model.json").read_text())
    meta["objectives"] = {"names": ["helpfulness"], "combine": "weights"}
    (added / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="re-export"):
        OnnxBackend(added, open_model_dir(added).spec)
    # a different number of heads
    fewer = tmp_path / "fewer"
    shutil.copytree(dirs["weights-fp32"], fewer)
    meta = json.loads((fewer / "reward_model.json").read_text())
    meta["objectives"] = {"names": ["helpfulness", "harmlessness"], "combine": "weights"}
    (fewer / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="outputs 3 objective rewards"):
        OnnxBackend(fewer, open_model_dir(fewer).spec)


def test_the_service_serves_every_head_of_an_onnx_export(exports, tmp_path):
    """`reward serve --backend onnx` of a 3-head export: return_objectives and a named head come
    back as the torch backend computes them."""
    from client import RewardClient
    from server import running_server

    sources, dirs, _ = exports
    files = open_model_dir(sources["gate"])
    encoded = encode_conversations(CONVERSATIONS, files.tokenizer, files.spec)
    expected = TorchBackend(sources["gate"], files.spec).score_batch(pad_batch(encoded, pad_token_id(files.tokenizer)))
    items = [{"prompt": messages, "response": response} for messages, response in CONVERSATIONS]
    with running_server(["--model", f"rm={dirs['gate-fp32']}", "--backend", "onnx"], tmp_path / "server.log") as server:
        with RewardClient(server.url) as client:
            scored = client.score(items, return_objectives=True)
            truthful = client.score(items, objective="truthfulness")
    np.testing.assert_allclose(scored.scores, expected[:, 0], atol=FP32_COLUMNS_TOLERANCE)
    for k, name in enumerate(tiny_models.OBJECTIVES):
        np.testing.assert_allclose(scored.objectives[name], expected[:, 1 + k], atol=FP32_COLUMNS_TOLERANCE)
    np.testing.assert_allclose(truthful.scores, expected[:, 2], atol=FP32_COLUMNS_TOLERANCE)
