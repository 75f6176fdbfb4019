"""`reward sft` (trainer/sft.py): demonstrations are rendered as the service and PPO render them,
only response tokens are learned, the loss goes down, and bad input is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import rlhf_fixtures
import tiny_models
from trainer.sft import IGNORE, SFTConfig, collate, load_causal_lm, render_demonstration, response_only_loss, train_sft

torch.set_num_threads(1)

PROMPT = [{"role": "user", "content": "which snack should I pick?"}]


def test_prompt_tokens_are_masked_and_the_response_ends_with_eos():
    # GPT-2 tokenizer without a chat template: the HH fallback format
    tokenizer = tiny_models.bpe_tokenizer(None, with_pad=False)
    ids, labels = render_demonstration(PROMPT, "banana", tokenizer, max_length=64)
    n_prompt = sum(label == IGNORE for label in labels)
    assert labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in labels[n_prompt:]
    assert tokenizer.decode(ids[:n_prompt]) == "\n\nHuman: which snack should I pick?\n\nAssistant:"
    assert tokenizer.decode(labels[n_prompt:]) == " banana</s>" and labels[n_prompt:] == ids[n_prompt:]

    # Llama-style tokenizer with a chat template: the template's assistant turn is the response
    chat = tiny_models.bpe_tokenizer(tiny_models.CHATML_TEMPLATE, with_pad=True)
    ids, labels = render_demonstration(PROMPT, "banana", chat, max_length=64)
    n_prompt = sum(label == IGNORE for label in labels)
    assert chat.decode(ids[:n_prompt]) == "<|user|>which snack should I pick?</s><|assistant|>"
    assert chat.decode(ids[n_prompt:]) == "banana</s>"

    # Too long: the oldest prompt tokens go first, the response stays whole
    long_prompt = [{"role": "user", "content": "the quick brown fox " * 40}]
    ids, labels = render_demonstration(long_prompt, "banana", tokenizer, max_length=32)
    assert len(ids) == 32 and tokenizer.decode([t for t in labels if t != IGNORE]) == " banana</s>"
    assert tokenizer.decode(ids).endswith("fox \n\nAssistant: banana</s>")


def test_the_loss_counts_response_tokens_only():
    torch.manual_seed(0)
    batch = [([5, 6, 7, 8, 9], [IGNORE, IGNORE, IGNORE, 8, 9]), ([1, 2, 3], [IGNORE, 2, 3])]
    input_ids, attention_mask, labels = collate(batch, pad_id=0)
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    logits = torch.randn(2, 5, 11)
    loss = response_only_loss(logits, labels)
    # by hand: position t predicts token t+1; targets 8 (t=2), 9 (t=3) in row 0, 2 (t=0), 3 (t=1) in row 1
    terms = [F.cross_entropy(logits[r, t][None], torch.tensor([y])) for r, t, y in [(0, 2, 8), (0, 3, 9), (1, 0, 2), (1, 1, 3)]]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    # what the model says at prompt and padding positions does not matter
    changed = logits.clone()
    changed[0, :2] = 100 * torch.randn(2, 11)
    changed[1, 2:] = 100 * torch.randn(3, 11)
    assert response_only_loss(changed, labels).item() == pytest.approx(loss.item(), rel=1e-6)


def test_sft_loss_goes_down_and_the_model_learns_the_demonstrations(tmp_path):
    from trainer.evaluate.best_of_n import generate_samples

    base = rlhf_fixtures.build_tiny_gpt2_lm(tmp_path / "base")
    demos = rlhf_fixtures.write_demonstrations(tmp_path / "demos.jsonl", 64, 0)
    result = train_sft(SFTConfig(model=str(base), data=[str(demos)], output_dir=str(tmp_path / "sft"), max_length=48,
                                 batch_size=16, learning_rate=5e-3, max_steps=300, num_threads=1, progress=False, seed=0))
    assert result.steps == 300 and result.n_demonstrations == 64
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    logged = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 300
    # the output is a causal-LM directory that samples mostly the demonstrated fruits
    samples = generate_samples(tmp_path / "sft", [PROMPT], 16, max_new_tokens=8, seed=0)[0]
    assert sum(s in rlhf_fixtures.FRUITS for s in samples) >= 8, samples


def test_a_config_only_directory_gives_a_random_init_model(tmp_path):
    from transformers import GPT2Config

    tokenizer = tiny_models.bpe_tokenizer(None, with_pad=False)
    GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_causal_lm(tmp_path)
    assert model.config.n_embd == 16 and len(loaded) == len(tokenizer)


def reward_sft(*args: str) -> int:
    from reward_cli import main

    return main(["sft", "--num-threads", "1", "--no-progress", *args])


def test_lengths_are_capped_to_the_model_context():
    """Past its position table a GPT-2 fails with an index error inside forward, so inputs are
    cut to fit; only flags that leave no room at all are refused."""
    from transformers import GPT2Config

    from trainer.sft import SFTConfigError, fit_to_context

    config = GPT2Config(n_positions=128)
    assert fit_to_context(config, 512, "--max-length") == 128
    assert fit_to_context(config, 100, "--max-length") == 100
    assert fit_to_context(config, 512, "--max-prompt-length", 32, "--max-new-tokens") == 96
    assert fit_to_context(config, None, "--max-prompt-length", 32, "--max-new-tokens") == 96
    with pytest.raises(SFTConfigError, match="--max-new-tokens 128 leaves no room for a prompt in the model's context of 128"):
        fit_to_context(config, 10, "--max-prompt-length", 128, "--max-new-tokens")


def test_bad_inputs_exit_2_with_the_reason(tmp_path, capsys):
    base = rlhf_fixtures.build_tiny_gpt2_lm(tmp_path / "base")
    demos = rlhf_fixtures.write_demonstrations(tmp_path / "demos.jsonl", 8, 0)
    out = ["--output-dir", str(tmp_path / "out")]

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert reward_sft("--model", str(base), "--data", str(empty), *out) == 2
    assert "no usable rows" in capsys.readouterr().err

    assert reward_sft("--model", str(tmp_path / "nowhere"), "--data", str(demos), *out) == 2
    assert "not a model directory" in capsys.readouterr().err

    mismatched = tmp_path / "mismatched"
    shutil.copytree(base, mismatched)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (mismatched / name).unlink(missing_ok=True)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_models.minilm_path()).save_pretrained(mismatched)
    assert reward_sft("--model", str(mismatched), "--data", str(demos), *out) == 2
    assert "does not belong to this model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
