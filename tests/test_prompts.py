"""One prompt parser and one policy-prompt renderer (reward_core.formatting): an HH transcript is
read into the same messages wherever a prompt comes from (preference data, PPO and best-of-N
prompt files), and SFT, PPO and best-of-N prompt a policy with the same text."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import tiny_models
from reward_core.formatting import PromptError, parse_prompt, render_policy_prompt
from trainer.data import DataError, load_file
from trainer.evaluate.best_of_n import generate_samples, read_prompt_file
from trainer.ppo import PPOTrainer
from trainer.sft import IGNORE, render_demonstration

torch.set_num_threads(1)

HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! You wrote Human: hi, right?\n\nHuman: Tell me a joke\n\nAssistant:"
MESSAGES = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! You wrote Human: hi, right?"},
    {"role": "user", "content": "Tell me a joke"},
]


def test_an_hh_transcript_is_the_same_messages_in_preference_data_and_in_prompt_files(tmp_path):
    data = tmp_path / "prefs.jsonl"
    row = {"prompt": HH_PROMPT, "chosen": " Why did the chicken cross the road?", "rejected": " No."}
    data.write_text(json.dumps(row) + "\n")
    (record,) = load_file(data).records
    assert record.prompt == MESSAGES

    # a PPO / best-of-N prompt file: the transcript as a JSON string, under "prompt", or on a .txt line
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(HH_PROMPT) + "\n" + json.dumps({"prompt": HH_PROMPT}) + "\n"
                       + json.dumps({"messages": MESSAGES}) + "\n")
    assert read_prompt_file(prompts) == [record.prompt] * 3
    text = tmp_path / "prompts.txt"
    text.write_text("Human: Tell me a joke\nTell me a joke\n")
    assert read_prompt_file(text) == [[{"role": "user", "content": "Tell me a joke"}]] * 2
    assert parse_prompt(HH_PROMPT) == parse_prompt(HH_PROMPT, for_generation=True) == MESSAGES


def test_a_bad_prompt_file_names_each_bad_line_and_why(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps("fine"),
        json.dumps("   "),
        json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant: hello"}),
        json.dumps({"prompt": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"question": "hi"}),
        json.dumps({"prompt": []}),
    ]) + "\n")
    with pytest.raises(DataError) as caught:
        read_prompt_file(prompts)
    message = str(caught.value)
    for line, reason in [(2, "prompt is empty"), (3, "the prompt ends with an assistant turn"),
                         (4, "prompt message 0 has unsupported role 'wizard'"),
                         (5, 'expected a JSON string, {"prompt": ...}'), (6, "prompt has no messages")]:
        assert f"prompts.jsonl:{line}: {reason}" in message, (line, message)
    assert "prompts.jsonl:1:" not in message
    with pytest.raises(PromptError, match="text before its first"):
        parse_prompt("preamble\n\nHuman: hi")


@pytest.mark.parametrize("template", [None, tiny_models.CHATML_TEMPLATE], ids=["hh-fallback", "chat-template"])
def test_sft_ppo_and_best_of_n_prompt_the_policy_with_the_same_tokens(tmp_path, monkeypatch, template):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_models.bpe_tokenizer(template, with_pad=False)
    text, specials = render_policy_prompt(MESSAGES, tokenizer)
    expected = tokenizer(text, add_special_tokens=specials)["input_ids"]
    if template:
        assert text == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) and not specials
    else:
        assert text == HH_PROMPT and specials

    # SFT: the demonstration's prompt tokens (the ones its labels mask)
    ids, labels = render_demonstration(MESSAGES, "banana", tokenizer, max_length=512)
    assert ids[: labels.count(IGNORE)] == expected

    # PPO: the rollout's query tokens (left-padded)
    fake = SimpleNamespace(tokenizer=tokenizer, max_prompt_tokens=512, pad_id=0, device=torch.device("cpu"))
    query_ids, query_mask = PPOTrainer.encode_prompts(fake, [MESSAGES, [{"role": "user", "content": "hi"}]])
    assert query_ids[0][query_mask[0].bool()].tolist() == expected

    # best-of-N: what the policy's generate is given
    torch.manual_seed(0)
    policy = tmp_path / "policy"
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    seen = []
    generate = GPT2LMHeadModel.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "generate", spy)
    generate_samples(policy, [MESSAGES], 1, max_new_tokens=2)
    assert seen == [expected]
