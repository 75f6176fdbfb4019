"""WARM: an ensemble's members averaged weight by weight into one ordinary model (`reward
export-warm`). What its user must get: the members' mean tensors at the model's own names, a
directory that loads and scores as a single model, exactly one member's rewards when one member
is averaged, where it came from in its reward_model.json, and a clear refusal of what cannot be
averaged. The same for several runs of one recipe (other seeds) averaged into one model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import reward_cli
import tiny_models
from reward_core.backends import TorchBackend
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id
from reward_core.loading import open_model_dir
from service.registry import load_model
from service.settings import ServiceSettings
from test_ensemble import CONVERSATIONS
from test_train_ensemble import config_for
from test_train_objectives import write_objective_sets
from trainer.export import SAMPLE_CONVERSATIONS, export_onnx
from trainer.reward import train_reward_model
from trainer.warm import WarmExportError, export_warm, export_warm_runs


def _batch(files):
    return pad_batch(encode_conversations(CONVERSATIONS, files.tokenizer, files.spec), pad_token_id(files.tokenizer))


def _scores(model_dir: Path, batch) -> np.ndarray:
    return TorchBackend(model_dir, open_model_dir(model_dir).spec).score_batch(batch)


def test_the_exported_tensors_are_the_mean_of_the_members(tmp_path):
    source = tiny_models.build_tiny_ensemble_bert(tmp_path / "ens", members=3, top_layers=2)
    export_warm(source, tmp_path / "warm")
    members = load_file(source / "reward_members.safetensors")
    shared = load_file(source / "model.safetensors")
    warm = load_file(tmp_path / "warm" / "model.safetensors")
    places = {"layers.0": "bert.encoder.layer.1", "layers.1": "bert.encoder.layer.2",
              "pooler": "bert.pooler", "classifier": "classifier"}
    compared = 0
    for place, own in places.items():
        names = sorted({k.split(f".{place}.", 1)[1] for k in members if f".{place}." in k})
        assert names
        for name in names:
            mean = torch.stack([members[f"reward_members.members.{m}.{place}.{name}"] for m in range(3)]).mean(0)
            torch.testing.assert_close(warm[f"{own}.{name}"], mean, rtol=1e-6, atol=1e-7)
            compared += 1
    assert compared == 2 * 16 + 2 + 2  # two BERT blocks' tensors, the pooler's and the head's
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        assert torch.equal(warm[name], shared[name])  # the shared part is the source's, untouched


def test_a_warm_model_loads_and_scores_as_a_single_model_and_says_where_it_came_from(tmp_path):
    source = tiny_models.build_tiny_ensemble_bert(tmp_path / "ens", members=4)
    summary = export_warm(source, tmp_path / "warm")
    files = open_model_dir(tmp_path / "warm")
    assert files.spec.ensemble is None and files.spec.extra_columns == 0
    assert not (tmp_path / "warm" / "reward_members.safetensors").exists()
    rewards = _scores(tmp_path / "warm", _batch(files))
    assert rewards.shape == (len(CONVERSATIONS),) and np.isfinite(rewards).all()
    source_version = open_model_dir(source).spec.version
    meta = json.loads((tmp_path / "warm" / "reward_model.json").read_text())
    assert meta["version"] == summary["version"] == f"{source_version}+warm"
    assert meta["warm"]["source_version"] == source_version
    assert meta["warm"]["members_averaged"] == summary["members_averaged"] == [0, 1, 2, 3]
    assert meta["warm"]["source_ensemble"]["members"] == 4
    assert meta["warm"]["modules_averaged"] == ["bert.encoder.layer.2", "bert.pooler", "classifier"]
    # the source's statistics describe the members' mean reward, not the averaged weights
    assert meta["reward_mean"] is None and meta["reward_std"] is None and "dev_results" not in meta
    # averaging weights is not averaging rewards: the summary says how far apart they land
    assert summary["max_abs_difference_to_members_mean_reward"] > 0
    # the service loads it as any single model (warm-up checks its one column), and it exports to ONNX as one
    served = load_model("warm", tmp_path / "warm", ServiceSettings(models=[str(tmp_path / "warm")]))
    served.warm_up()
    assert served.ensemble is None and served.spec.ensemble is None
    exported = export_onnx(tmp_path / "warm", tmp_path / "onnx")
    assert "ensemble" not in exported and exported["max_abs_difference_vs_torch"] < 1e-3


@pytest.mark.parametrize("members,chosen", [(1, None), (3, [0]), (3, [2])])
def test_one_member_averaged_alone_scores_exactly_as_that_member(tmp_path, members, chosen):
    source = tiny_models.build_tiny_ensemble_bert(tmp_path / "ens", members=members)
    summary = export_warm(source, tmp_path / "warm", members=chosen)
    m = (chosen or [0])[0]
    batch = _batch(open_model_dir(source))
    columns = _scores(source, batch)  # [items, 1 + K]: the mean, then each member
    np.testing.assert_allclose(_scores(tmp_path / "warm", batch), columns[:, 1 + m], atol=1e-5, rtol=1e-5)
    assert summary["members_averaged"] == [m]
    if chosen is not None:
        assert summary["version"].endswith(f"+warm-members-{m}")


def test_a_subset_of_members_averages_only_those(tmp_path):
    source = tiny_models.build_tiny_ensemble_bert(tmp_path / "ens", members=5)
    export_warm(source, tmp_path / "warm", members=[0, 2, 4])
    members = load_file(source / "reward_members.safetensors")
    warm = load_file(tmp_path / "warm" / "model.safetensors")
    mean = torch.stack([members[f"reward_members.members.{m}.classifier.weight"] for m in (0, 2, 4)]).mean(0)
    torch.testing.assert_close(warm["classifier.weight"], mean, rtol=1e-6, atol=1e-7)
    meta = json.loads((tmp_path / "warm" / "reward_model.json").read_text())
    assert meta["warm"]["members_averaged"] == [0, 2, 4]


def test_a_trained_top_mode_ensemble_becomes_a_partial_state_dict_over_the_same_base(tmp_path):
    base = tiny_models.build_tiny_bert(tmp_path / "base")
    (tmp_path / "data").mkdir()
    sets = write_objective_sets(tmp_path / "data")
    source = tmp_path / "runs" / "ens"
    train_reward_model(config_for(base, sets, source, num_epochs=1, top_layers=1, cache_frozen=True))
    # a base given relative to the model directory must still be found from the WARM directory
    meta = json.loads((source / "reward_model.json").read_text())
    meta["base_model"] = os.path.relpath(base, source)
    (source / "reward_model.json").write_text(json.dumps(meta))
    out = tmp_path / "elsewhere" / "deeper" / "warm"
    summary = export_warm(source, out)
    assert summary["layout"].startswith("top-mode partial state dict")
    warm = load_file(out / "model.safetensors")
    # the trained parts only (block 1 of 2 is the top block); the base supplies the rest
    assert {"bert.encoder.layer.1.output.dense.weight", "bert.pooler.dense.weight", "classifier.weight"} <= set(warm)
    assert all(k.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for k in warm), sorted(warm)
    files = open_model_dir(out)
    assert (out / files.spec.base_model).resolve() == base.resolve()
    written = json.loads((out / "reward_model.json").read_text())
    assert written["warm"]["source_dev_results"] == meta["dev_results"]  # kept for comparison, not as its own
    assert written["warm"]["source_training"]["config"]["ensemble"] == 3
    assert "training" not in written
    rewards = _scores(out, _batch(files))
    assert rewards.shape == (len(CONVERSATIONS),) and np.isfinite(rewards).all()


def test_what_cannot_be_averaged_is_refused_with_the_reason(tmp_path, capsys):
    plain = tiny_models.build_tiny_bert(tmp_path / "plain")
    with pytest.raises(WarmExportError, match="not an ensemble"):
        export_warm(plain, tmp_path / "out")
    assert reward_cli.main(["export-warm", "--model", str(plain), "--out", str(tmp_path / "out")]) == 1
    assert "not an ensemble" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    source = tiny_models.build_tiny_ensemble_bert(tmp_path / "ens", members=3)
    export_onnx(source, tmp_path / "onnx")
    with pytest.raises(WarmExportError, match="ONNX export"):
        export_warm(tmp_path / "onnx", tmp_path / "out")
    with pytest.raises(WarmExportError, match=r"members \[3\] do not exist: the ensemble has members 0 to 2"):
        export_warm(source, tmp_path / "out", members=[0, 3])
    with pytest.raises(WarmExportError, match="more than once"):
        export_warm(source, tmp_path / "out", members=[1, 1])
    with pytest.raises(SystemExit):
        reward_cli.main(["export-warm", "--model", str(source), "--out", str(tmp_path / "out"), "--members", "0,two"])
    assert "such as 0,2,4" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(WarmExportError, match="--overwrite"):
        export_warm(source, tmp_path / "taken")
    assert reward_cli.main(["export-warm", "--model", str(source), "--out", str(tmp_path / "taken"), "--overwrite",
                            "--members", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["members_averaged"] == [1]
    assert not (tmp_path / "taken" / "file").exists()


# ---- several runs of one recipe (other seeds) averaged into one model


def _train_objective_runs(tmp_path, seeds):
    """Top-mode runs of one recipe (three heads and a gate over one tiny base), one per seed."""
    from test_train_objectives import config_for as objectives_config

    base = tiny_models.build_tiny_bert(tmp_path / "base")
    (tmp_path / "data").mkdir()
    sets = write_objective_sets(tmp_path / "data", n_train=48, n_dev=8)
    runs = []
    for seed in seeds:
        out = tmp_path / "runs" / f"s{seed}"
        train_reward_model(objectives_config(base, sets, out, num_epochs=1, combine="gate", seed=seed))
        runs.append(out)
    return base, sets, runs


def test_runs_of_one_recipe_average_into_one_model_that_scores_near_their_mean(tmp_path):
    base, sets, runs = _train_objective_runs(tmp_path, (1, 2))
    out = tmp_path / "elsewhere" / "warm"
    summary = export_warm_runs(runs, out, stats_data=[str(sets["helpfulness"]["train"])], stats_samples=40)
    # every tensor of every weight file is the runs' mean, the gate's included
    assert summary["files_averaged"] == ["model.safetensors", "reward_gate.safetensors"]
    for name in summary["files_averaged"]:
        tensors = [load_file(run / name) for run in runs]
        warm = load_file(out / name)
        assert set(warm) == set(tensors[0])
        for key in warm:
            torch.testing.assert_close(warm[key], (tensors[0][key].float() + tensors[1][key].float()).div(2).to(warm[key].dtype))
    # a partial state dict over the same base, found from where it was written
    files = open_model_dir(out)
    assert (out / files.spec.base_model).resolve() == base.resolve()
    assert files.spec.objective_names == open_model_dir(runs[0]).spec.objective_names
    columns = _scores(out, _batch(files))  # [items, 1 + 3 heads]
    assert columns.shape == (len(CONVERSATIONS), 4) and np.isfinite(columns).all()
    # the summary says how far the averaged weights' rewards land from the runs' mean reward, on its sample items
    sample = pad_batch(encode_conversations(SAMPLE_CONVERSATIONS, files.tokenizer, files.spec), pad_token_id(files.tokenizer))
    runs_mean = np.mean([_scores(run, sample) for run in runs], axis=0)
    far = float(np.abs(_scores(out, sample) - runs_mean).max())
    assert summary["max_abs_difference_to_runs_mean_reward"] == pytest.approx(far, abs=1e-6) and far > 0
    meta = json.loads((out / "reward_model.json").read_text())
    assert [s["seed"] for s in meta["warm"]["sources"]] == [1, 2]
    assert all(s["training"]["data"]["train"] for s in meta["warm"]["sources"])  # what each run saw
    assert [s["version"] for s in meta["warm"]["sources"]] == [open_model_dir(r).spec.version for r in runs]
    assert meta["version"].endswith("+warm-of-2") and "dev_results" not in meta and "training" not in meta
    # its reward statistics are measured on the data asked for, so the service can normalize with them
    stats = meta["warm"]["reward_stats"]
    assert stats["n_responses"] == 40 and meta["reward_mean"] == stats["mean"] and meta["reward_std"] == stats["std"] > 0
    served = load_model("warm", out, ServiceSettings(models=[str(out)]))
    served.warm_up()
    assert served.spec.normalize_available


def test_runs_that_differ_only_in_their_heads_average_to_exactly_their_mean_reward(tmp_path):
    # the heads are linear and the gate is shared, so averaging their weights is averaging the rewards
    first = tiny_models.build_tiny_objectives_bert(tmp_path / "a")
    second = tmp_path / "b"
    shutil.copytree(first, second)
    weights = load_file(second / "model.safetensors")
    weights["classifier.weight"] = torch.randn_like(weights["classifier.weight"])
    weights["classifier.bias"] = torch.randn_like(weights["classifier.bias"])
    save_file(weights, str(second / "model.safetensors"), metadata={"format": "pt"})
    summary = export_warm_runs([first, second], tmp_path / "warm")
    batch = _batch(open_model_dir(first))
    expected = (_scores(first, batch) + _scores(second, batch)) / 2
    np.testing.assert_allclose(_scores(tmp_path / "warm", batch), expected, atol=1e-5, rtol=1e-5)
    assert summary["max_abs_difference_to_runs_mean_reward"] < 1e-5
    assert json.loads((tmp_path / "warm" / "reward_model.json").read_text())["reward_mean"] is None  # no --stats-data


def test_runs_averaged_with_a_gate_temperature_serve_their_gate_at_it(tmp_path, capsys):
    first = tiny_models.build_tiny_objectives_bert(tmp_path / "a")
    second = tiny_models.build_tiny_objectives_bert(tmp_path / "b", seed=1)
    args = ["export-warm", "--model", str(first), "--model", str(second)]
    assert reward_cli.main(args + ["--out", str(tmp_path / "warm"), "--gate-temperature", "0.5"]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "warm" / "reward_model.json").read_text())
    assert written["objectives"]["gate_temperature"] == 0.5
    plain = export_warm_runs([first, second], tmp_path / "plain")
    assert "gate_temperature" not in json.loads((tmp_path / "plain" / "reward_model.json").read_text())["objectives"]
    batch = _batch(open_model_dir(first))
    sharp, soft = _scores(tmp_path / "warm", batch), _scores(tmp_path / "plain", batch)
    np.testing.assert_allclose(sharp[:, 1:], soft[:, 1:], atol=1e-6)  # the same heads, mixed otherwise
    assert np.abs(sharp[:, 0] - soft[:, 0]).max() > 1e-4
    assert plain["tensors_averaged"] > 0
    weights = tiny_models.build_tiny_objectives_bert(tmp_path / "w1", combine="weights")
    other = tiny_models.build_tiny_objectives_bert(tmp_path / "w2", combine="weights", seed=1)
    with pytest.raises(WarmExportError, match="do not combine by a gate"):
        export_warm_runs([weights, other], tmp_path / "out", gate_temperature=0.5)
    with pytest.raises(WarmExportError, match="gate_temperature must be a positive number"):
        export_warm_runs([first, second], tmp_path / "out", gate_temperature=0.0)
    assert reward_cli.main(["export-warm", "--model", str(tiny_models.build_tiny_ensemble_bert(tmp_path / "ens")),
                            "--out", str(tmp_path / "out"), "--gate-temperature", "0.5"]) == 1
    assert "--gate-temperature is for averaging several" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_runs_that_are_not_one_recipe_are_refused_with_the_reason(tmp_path, capsys):
    objectives = tiny_models.build_tiny_objectives_bert(tmp_path / "objectives")
    plain = tiny_models.build_tiny_bert(tmp_path / "plain")
    ensemble = tiny_models.build_tiny_ensemble_bert(tmp_path / "ens")
    weights = tiny_models.build_tiny_objectives_bert(tmp_path / "weights", combine="weights")
    with pytest.raises(WarmExportError, match="differs from .* in objectives"):
        export_warm_runs([objectives, plain], tmp_path / "out")
    with pytest.raises(WarmExportError, match="differs from .* in objectives"):
        export_warm_runs([objectives, weights], tmp_path / "out")
    with pytest.raises(WarmExportError, match="is an ensemble: average its members"):
        export_warm_runs([plain, ensemble], tmp_path / "out")
    with pytest.raises(WarmExportError, match="more than once"):
        export_warm_runs([plain, tmp_path / "plain"], tmp_path / "out")
    with pytest.raises(WarmExportError, match="--stats-data 'missing.jsonl:2': no such file"):
        export_warm_runs([plain, tiny_models.build_tiny_bert(tmp_path / "other", seed=1)], tmp_path / "out",
                         stats_data=["missing.jsonl:2"])
    with pytest.raises(WarmExportError, match="must not be one of"):
        export_warm_runs([plain, tmp_path / "other"], plain)
    bigger = tmp_path / "bigger"
    shutil.copytree(plain, bigger)
    weights_of = load_file(bigger / "model.safetensors")
    weights_of["classifier.weight"] = torch.zeros(1, 8)
    save_file(weights_of, str(bigger / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WarmExportError, match="has shape"):
        export_warm_runs([plain, bigger], tmp_path / "out")
    args = ["export-warm", "--model", str(plain), "--model", str(tmp_path / "other"), "--out", str(tmp_path / "out")]
    assert reward_cli.main(args + ["--members", "0"]) == 1
    assert "--members picks members of one ensemble" in capsys.readouterr().err
    assert reward_cli.main(["export-warm", "--model", str(ensemble), "--out", str(tmp_path / "out"),
                            "--stats-data", str(tmp_path / "x.jsonl")]) == 1
    assert "--stats-data is for averaging several" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # the command line averages two runs and prints the summary
    assert reward_cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["tensors_averaged"] > 0
    assert open_model_dir(tmp_path / "out").spec.version.endswith("+warm-of-2")
