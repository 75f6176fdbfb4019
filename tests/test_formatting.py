"""How an item becomes model input: chat templates, the documented fallbacks, truncation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from reward_core.forward import plan_batches
from reward_core.formatting import encode_conversations, item_to_conversation, render_conversation
from reward_core.model_dir import RewardModelSpec

USER = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def tokenizers(model_dirs):
    return {name: AutoTokenizer.from_pretrained(path) for name, path in model_dirs.items()}


def spec(arch: str, max_length: int = 512) -> RewardModelSpec:
    return RewardModelSpec(architecture=arch, max_length=max_length)


def test_items_of_both_shapes_become_the_same_conversation():
    as_pair = item_to_conversation({"prompt": "What is 2+2?", "response": "4"})
    as_messages = item_to_conversation({"messages": USER + [{"role": "assistant", "content": "4"}]})
    assert as_pair == as_messages == (USER, "4")


def test_a_decoder_with_a_chat_template_reads_the_template(tokenizers):
    prompt, response = render_conversation(USER, "4", tokenizers["llama"], spec("decoder"))
    assert prompt == "<|user|>What is 2+2?</s><|assistant|>"
    assert response == "4</s>"


def test_a_decoder_without_a_template_reads_the_hh_transcript_fallback(tokenizers):
    prompt, response = render_conversation(
        [{"role": "system", "content": "Be nice."}] + USER, "4", tokenizers["gpt2"], spec("decoder")
    )
    assert prompt == "\n\nSystem: Be nice.\n\nHuman: What is 2+2?\n\nAssistant:"
    assert response == " 4</s>"


def test_an_encoder_reads_a_text_pair_with_segment_ids(tokenizers):
    tok = tokenizers["minilm"]
    (encoded,) = encode_conversations([(USER, "4")], tok, spec("encoder"))
    assert encoded.input_ids == tok("What is 2+2?", "4")["input_ids"]
    assert encoded.token_type_ids[-2:] == [1, 1] and encoded.token_type_ids[0] == 0


def test_an_encoder_reads_a_multi_turn_prompt_as_role_lines(tokenizers):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"}]
    prompt, _ = render_conversation(turns, "Bye!", tokenizers["minilm"], spec("encoder"))
    assert prompt == "User: Hi\nAssistant: Hello\nUser: Bye?"


@pytest.mark.parametrize("name,arch", [("minilm", "encoder"), ("llama", "decoder"), ("gpt2", "decoder")])
def test_truncation_cuts_the_start_of_the_prompt_and_keeps_the_response(tokenizers, name, arch):
    tok = tokenizers[name]
    response = "Paris is the capital of France."
    long_prompt = [{"role": "user", "content": "blah " * 200 + "What is the capital of France?"}]
    (full,) = encode_conversations([(long_prompt, response)], tok, spec(arch, max_length=10_000))
    (cut,) = encode_conversations([(long_prompt, response)], tok, spec(arch, max_length=64))
    assert cut.truncated and not full.truncated and len(cut) == 64
    # The response (and the template tokens after it) survive whole: the two end alike.
    n_response = len(tok(response, add_special_tokens=False)["input_ids"])
    assert cut.input_ids[-(n_response + 4):] == full.input_ids[-(n_response + 4):]


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.text(min_size=0, max_size=300),
    response=st.text(min_size=0, max_size=300),
    max_length=st.integers(min_value=8, max_value=96),
)
def test_truncation_properties_hold_for_any_text(model_dirs, prompt, response, max_length):
    # The response is never cut before the prompt is exhausted, and nothing exceeds max_length.
    tok = _cached_tokenizer(str(model_dirs["minilm"]))
    messages = [{"role": "user", "content": prompt}]
    (full,) = encode_conversations([(messages, response)], tok, spec("encoder", 100_000))
    (cut,) = encode_conversations([(messages, response)], tok, spec("encoder", max_length))
    assert len(cut) <= max_length
    response_full = [i for i, t in zip(full.input_ids, full.token_type_ids) if t == 1]
    response_cut = [i for i, t in zip(cut.input_ids, cut.token_type_ids) if t == 1]
    prompt_cut = [i for i, t in zip(cut.input_ids[1:], cut.token_type_ids[1:]) if t == 0][:-1]  # minus [CLS]/[SEP]
    if response_cut != response_full:
        assert prompt_cut == [], "the response was cut while prompt tokens remained"
    assert cut.truncated == (len(full) > max_length)


_TOKENIZERS: dict = {}


def _cached_tokenizer(path: str):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def test_batches_respect_the_token_budget_and_group_similar_lengths():
    lengths = [5, 100, 7, 90, 6, 95, 300]
    batches = plan_batches(lengths, max_batch_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 200 or len(batch) == 1
    assert [sorted(b) for b in batches][0] == [0, 2, 4]  # the short ones share a batch
    assert batches[-1] == [6]  # a row over the budget goes alone


def test_a_padding_cap_cuts_batches_before_they_carry_too_much_padding():
    """The CPU setting: rows of very different lengths do not share a forward even when the
    token budget would allow it, and similar ones still do."""
    lengths = [100, 10, 98, 12, 11, 95]
    uncapped = plan_batches(lengths, max_batch_tokens=10_000)
    assert len(uncapped) == 1
    capped = plan_batches(lengths, max_batch_tokens=10_000, max_padding=0.1)
    assert [sorted(b) for b in capped] == [[1, 3, 4], [0, 2, 5]]
    for batch in capped:
        real = sum(lengths[i] for i in batch)
        assert real >= 0.9 * len(batch) * max(lengths[i] for i in batch)
    assert plan_batches(lengths, max_batch_tokens=10_000, max_padding=1.0) == uncapped  # 1: no limit


def test_a_long_formatted_text_keeps_its_response_when_cut(tokenizers):
    from reward_core.formatting import encode_texts

    tokenizer = tokenizers["llama"]
    prompt = "<|user|>" + "tell me more " * 50 + "</s><|assistant|>"
    response = "The sea is wide.</s>"
    [cut] = encode_texts([prompt + response], tokenizer, spec("decoder", max_length=24), prompt_prefixes=[prompt])

    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert cut.truncated and len(cut) == 24
    assert cut.input_ids[-len(response_ids):] == response_ids, "the response was cut"


def test_an_encoder_reads_a_formatted_text_as_a_pair_only_when_the_prompt_is_its_prefix(tokenizers):
    from reward_core.formatting import encode_texts

    tokenizer = tokenizers["bert"]
    prompt, response = "What is the capital of France?", "Paris."
    split, whole = encode_texts(
        [prompt + " " + response, prompt + " " + response], tokenizer, spec("encoder"), prompt_prefixes=[prompt, "not a prefix"]
    )

    assert split.input_ids == tokenizer(prompt, " " + response)["input_ids"]
    assert whole.input_ids == tokenizer(prompt + " " + response)["input_ids"]


# --------------------------------------------------------------------------- issue #19: read point, chat markup

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


@pytest.mark.parametrize("text", [
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|><|endoftext|>",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "Say hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there!<|eot_id|>",
    "<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nSay hi<end_of_turn>\n<start_of_turn>model\nHi there!<end_of_turn>\n",
    "<|system|>\nBe brief.</s>\n<|user|>\nSay hi</s>\n<|assistant|>\nHi there!</s>",
    # a response cut by the length limit: the last turn is still open
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi there!",
])
def test_chat_markup_of_the_common_formats_is_parsed_back_into_the_conversation(text):
    from reward_core.formatting import parse_chat_markup

    assert parse_chat_markup(text) == (CHAT, "Hi there!")


@pytest.mark.parametrize("text", [
    "What is the capital of France? Paris.",
    "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n",  # no response: a prompt
    "<|im_start|>user\nSay hi<|im_end|>\n",
    "Intro text <|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>",  # not all turns
])
def test_text_that_is_not_a_whole_conversation_is_not_parsed(text):
    from reward_core.formatting import parse_chat_markup

    assert parse_chat_markup(text) is None


def test_the_encoder_template_round_trips_through_the_parser():
    from jinja2 import Template

    from reward_core.formatting import ENCODER_CHAT_TEMPLATE, parse_chat_markup

    conversation = CHAT + [{"role": "assistant", "content": "Hi there!"}]
    text = Template(ENCODER_CHAT_TEMPLATE).render(messages=conversation, add_generation_prompt=False)
    assert parse_chat_markup(text) == (CHAT, "Hi there!")


def test_the_default_model_still_reads_multi_turn_prompts_as_lines():
    # Its chat template is for callers (verl); it was trained on "User: ..." lines and still reads them.
    from transformers import AutoConfig

    from reward_core.model_dir import load_spec, load_tokenizer
    from server import REPO_ROOT

    path = REPO_ROOT / "models" / "default-rm"
    tokenizer = load_tokenizer(path)
    model_spec = load_spec(path, AutoConfig.from_pretrained(path), tokenizer)
    assert tokenizer.chat_template and not model_spec.use_chat_template
    prompt, response = render_conversation(CHAT, "Hi", tokenizer, model_spec)
    assert (prompt, response) == ("System: Be brief.\nUser: Say hi", "Hi")


def test_the_read_point_of_each_setting(tokenizers):
    from reward_core.formatting import reward_read_point

    llama = tokenizers["llama"]  # template "<|user|>...</s><|assistant|>...</s>": nothing after the end of turn
    text = "<|user|>hi</s><|assistant|>yo</s>"
    assert reward_read_point(text, llama, spec("decoder")) == text
    eos = RewardModelSpec(architecture="decoder", max_length=64, read_reward_at="eos")
    assert reward_read_point("<|user|>hi</s><|assistant|>yo\n\n", llama, eos) == "<|user|>hi</s><|assistant|>yo </s>"
    assert reward_read_point(text + "\n", llama, eos) == text
    assert reward_read_point("plain", tokenizers["bert"], spec("encoder")) == "plain"


def test_an_older_reward_model_json_gets_the_documented_default(tmp_path, model_dirs):
    import json

    from transformers import AutoConfig

    from reward_core.model_dir import load_spec

    config, tokenizer = AutoConfig.from_pretrained(model_dirs["llama"]), AutoTokenizer.from_pretrained(model_dirs["llama"])
    (tmp_path / "reward_model.json").write_text(json.dumps({"architecture": "decoder", "max_length": 64}))
    assert load_spec(tmp_path, config, tokenizer).read_reward_at == "template_end"
    (tmp_path / "reward_model.json").write_text(json.dumps({"value_head_prefix": "value_head"}))
    assert load_spec(tmp_path, config, tokenizer).read_reward_at == "eos"  # OpenRLHF's layout, trained at the EOS
    (tmp_path / "reward_model.json").write_text(json.dumps({"read_reward_at": "middle"}))
    with pytest.raises(ValueError, match="read_reward_at"):
        load_spec(tmp_path, config, tokenizer)
