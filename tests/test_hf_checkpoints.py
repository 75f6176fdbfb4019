"""Published reward checkpoints come in a few shapes; each is served as it is (tiny random-init
versions built here): Qwen2 / Mistral / Gemma sequence classifiers (Mistral and Gemma without a
pad token; transformers' Qwen2 tokenizer brings its own ``<|endoftext|>``),
a DeBERTa-v2 cross-encoder, and OpenRLHF's backbone + ``value_head`` layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaModel

import tiny_models
from client import RewardClient
from server import running_server
from reward_core.loading import load_sequence_classifier
from reward_core.forward import reward_forward
from reward_core.forward import pad_batch
from reward_core.formatting import encode_items
from reward_core.model_dir import ModelDirError, load_spec
from service.registry import load_model
from service.settings import ServiceSettings

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "Say hi", "response": "Hi! How can I help you today? I am here to help."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-checkpoints")
    return {
        "qwen2": tiny_models.build_tiny_hf_decoder(root / "qwen2", "qwen2", with_pad=False),
        "mistral": tiny_models.build_tiny_hf_decoder(root / "mistral", "mistral", with_pad=False),
        "gemma": tiny_models.build_tiny_hf_decoder(root / "gemma", "gemma", with_pad=False),
        "deberta": tiny_models.build_tiny_deberta(root / "deberta"),
        "openrlhf": tiny_models.build_openrlhf_llama(root / "openrlhf"),
        "openrlhf-unprefixed": tiny_models.build_openrlhf_llama(root / "openrlhf-unprefixed", with_base_prefix=False),
    }


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    args = [f"--model={name}={path}" for name, path in checkpoints.items()] + ["--max-wait-ms", "5"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


def hf_scores(model_dir, items) -> list[float]:
    """Hugging Face's own forward, one unpadded item at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    spec = load_spec(model_dir, model.config, tokenizer)
    out = []
    with torch.inference_mode():
        for e in encode_items(items, tokenizer, spec):
            inputs = {"input_ids": torch.tensor([e.input_ids])}
            if e.token_type_ids is not None:
                inputs["token_type_ids"] = torch.tensor([e.token_type_ids])
            out.append(model(**inputs).logits[0, 0].item())
    return out


def openrlhf_scores(model_dir, items) -> list[float]:
    """OpenRLHF's reward: the backbone's last hidden state at the last token through value_head."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig.from_pretrained(model_dir)
    state = load_file(model_dir / "model.safetensors")
    backbone = LlamaModel(config).eval()
    backbone.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k != "value_head.weight"})
    spec = load_spec(model_dir, config, tokenizer)
    out = []
    with torch.inference_mode():
        for e in encode_items(items, tokenizer, spec):
            hidden = backbone(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0, -1]
            out.append(float(hidden @ state["value_head.weight"][0]))
    return out


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gemma", "deberta"])
def test_hf_sequence_classifiers_are_served_as_they_are(server, checkpoints, name):
    with RewardClient(server.url) as client:
        served = client.score(ITEMS, model=name).scores  # batched together: rows of different lengths, padded

    assert served == pytest.approx(hf_scores(checkpoints[name], ITEMS), abs=1e-4)


@pytest.mark.parametrize("name", ["openrlhf", "openrlhf-unprefixed"])
def test_an_openrlhf_checkpoint_is_served_through_its_value_head(server, checkpoints, name):
    with RewardClient(server.url) as client:
        served = client.score(ITEMS, model=name).scores

    assert served == pytest.approx(openrlhf_scores(checkpoints[name], ITEMS), abs=1e-4)


def test_an_openrlhf_checkpoint_without_the_option_is_refused_with_the_fix(checkpoints, tmp_path):
    import shutil

    unnamed = tmp_path / "unnamed"
    shutil.copytree(checkpoints["openrlhf"], unnamed)
    (unnamed / "reward_model.json").unlink()

    with pytest.raises(ModelDirError, match='"value_head_prefix": "value_head"'):
        load_model("x", unnamed, ServiceSettings())


def test_openrlhf_normalisation_statistics_become_normalize(checkpoints, tmp_path):
    import shutil

    normalised = tmp_path / "normalised"
    shutil.copytree(checkpoints["openrlhf"], normalised)
    config = json.loads((normalised / "config.json").read_text())
    (normalised / "config.json").write_text(json.dumps({**config, "normalize_reward": True, "mean": 0.5, "std": 2.0}))

    spec = load_model("x", normalised, ServiceSettings()).spec

    assert (spec.reward_mean, spec.reward_std) == (0.5, 2.0)


def _left_padded(batch, pad_token_id: int):
    ids, mask = np.full_like(batch.input_ids, pad_token_id), np.zeros_like(batch.attention_mask)
    for row in range(ids.shape[0]):
        n = int(batch.attention_mask[row].sum())
        ids[row, ids.shape[1] - n:] = batch.input_ids[row, :n]
        mask[row, ids.shape[1] - n:] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma"])
def test_a_decoder_scores_the_same_with_left_and_right_padding(model_dirs, checkpoints, name):
    model_dir = {**model_dirs, **checkpoints}[name]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = load_spec(model_dir, AutoModelForSequenceClassification.from_pretrained(model_dir).config, tokenizer)
    model = load_sequence_classifier(model_dir, spec).eval()
    # No pad token (GPT-2, Gemma here): padding with EOS, as trainers do, must not matter either.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    right = pad_batch(encode_items(ITEMS, tokenizer, spec), pad)
    left_ids, left_mask = _left_padded(right, pad)

    with torch.inference_mode():
        right_scores = reward_forward(model, "decoder", torch.from_numpy(right.input_ids), torch.from_numpy(right.attention_mask))
        left_scores = reward_forward(model, "decoder", left_ids, left_mask)

    assert left_scores.tolist() == pytest.approx(right_scores.tolist(), abs=1e-5)
    assert right_scores.tolist() == pytest.approx(hf_scores(model_dir, ITEMS), abs=1e-4)
