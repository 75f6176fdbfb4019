"""Turning a (prompt, response) into model input: the ONE place it happens.

The service scores with :func:`encode_conversations` and the trainer trains with it, so what a
reward model saw in training is byte-for-byte what it sees when served (train/serve skew is a
bug class we do not allow).

Rendering
---------
* Decoders (Llama, Qwen, GPT-2, ...) see the whole conversation as one sequence and are scored
  at its last token. With a chat template (``tokenizer.chat_template``), the prompt is the
  template applied to the prompt messages with the generation prompt, and the response is what
  the template adds for the assistant turn (so end-of-turn tokens are included). Without one,
  the documented fallback is Anthropic's HH transcript format::

      "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}...\\n\\nHuman: {user}\\n\\nAssistant:"  +  " {response}{eos}"

  (system turns render as ``"\\n\\nSystem: {content}"``).
* Encoders (BERT-like cross-encoders) get a text pair ``(prompt, response)`` with the
  tokenizer's own special tokens and segment ids. A single user turn is its bare text; a longer
  prompt is rendered with the chat template if the tokenizer has one, else as
  ``"User: ...\\nAssistant: ...\\nUser: ..."`` lines.

Truncation
----------
When the input is longer than ``max_length`` tokens, tokens are removed from the START of the
prompt first (keeping the most recent turns, which matter most for judging the response); the
response is cut, from its end, only once the prompt is exhausted. Special tokens are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .model_dir import RewardModelSpec

# (prompt messages, response text): the canonical scoring unit, shared with the trainer.
Conversation = tuple[list[dict[str, str]], str]

_HH_ROLE = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
_LINE_ROLE = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool"}

# Segment kinds of each token, used to decide what truncation may remove.
SPECIAL, PROMPT, RESPONSE = 0, 1, 2


@dataclass
class EncodedInput:
    """One tokenised (prompt, response), ready for a backend."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


def item_to_conversation(item: Any) -> Conversation:
    """A protocol item (PromptResponseItem or MessagesItem, or its dict) as (messages, response)."""
    if isinstance(item, dict):
        data = item
    else:
        data = item.model_dump()
    if "messages" in data and data["messages"] is not None:
        messages = [dict(role=m["role"], content=m["content"]) for m in data["messages"]]
        return messages[:-1], messages[-1]["content"]
    prompt = data["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], data["response"]
    return [dict(role=m["role"], content=m["content"]) for m in prompt], data["response"]


def render_conversation(messages: Sequence[dict], response: str, tokenizer: Any, spec: RewardModelSpec) -> tuple[str, str]:
    """(prompt text, response text) as the model reads them; see the module docstring."""
    chat_template = spec.use_chat_template and getattr(tokenizer, "chat_template", None)
    if spec.architecture == "encoder":
        if len(messages) == 1 and messages[0]["role"] == "user":
            return messages[0]["content"], response
        if not messages:
            return "", response
        if chat_template:
            return tokenizer.apply_chat_template(list(messages), tokenize=False), response
        return "\n".join(f"{_LINE_ROLE.get(m['role'], m['role'].title())}: {m['content']}" for m in messages), response

    if chat_template:
        prefix = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            list(messages) + [{"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prefix):
            return prefix, full[len(prefix):]
        # Some templates rewrite earlier turns (e.g. strip reasoning); split at the response.
        at = full.rfind(response) if response else -1
        if at >= 0:
            return full[:at], full[at:]
        return prefix, response
    prompt = "".join(f"\n\n{_HH_ROLE.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
    eos = getattr(tokenizer, "eos_token", None) or ""
    return prompt + "\n\nAssistant:", " " + response + eos


def encode_conversations(
    conversations: Iterable[Conversation], tokenizer: Any, spec: RewardModelSpec
) -> list[EncodedInput]:
    """Render, tokenise (batched, with the fast tokenizer) and truncate to ``spec.max_length``."""
    rendered = [render_conversation(m, r, tokenizer, spec) for m, r in conversations]
    if not rendered:
        return []
    prompts = [p for p, _ in rendered]
    responses = [r for _, r in rendered]
    if spec.architecture == "encoder":
        batch = tokenizer(prompts, responses, add_special_tokens=True, truncation=False, verbose=False)
        out = []
        for i, ids in enumerate(batch["input_ids"]):
            kinds = [SPECIAL if s is None else (PROMPT if s == 0 else RESPONSE) for s in batch.sequence_ids(i)]
            types = batch["token_type_ids"][i] if "token_type_ids" in batch else None
            out.append(_truncate(ids, kinds, types, spec.max_length))
        return out

    # Decoders: a chat template writes its own special tokens (BOS...) as text; the fallback
    # format relies on the tokenizer adding BOS the way it does for plain text.
    with_specials = not (spec.use_chat_template and getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if with_specials and _adds_bos(tokenizer) else []
    out = []
    for p_ids, r_ids in zip(prompt_ids, response_ids):
        ids = bos + p_ids + r_ids
        kinds = [SPECIAL] * len(bos) + [PROMPT] * len(p_ids) + [RESPONSE] * len(r_ids)
        out.append(_truncate(ids, kinds, None, spec.max_length))
    return out


def _adds_bos(tokenizer: Any) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def _truncate(ids: list[int], kinds: list[int], types: list[int] | None, max_length: int) -> EncodedInput:
    excess = len(ids) - max_length
    if excess <= 0:
        return EncodedInput(list(ids), list(types) if types is not None else None, truncated=False)
    drop: set[int] = set()
    prompt_positions = [i for i, k in enumerate(kinds) if k == PROMPT]
    drop.update(prompt_positions[:excess])  # oldest prompt tokens first
    remaining = excess - len(drop)
    if remaining > 0:
        response_positions = [i for i, k in enumerate(kinds) if k == RESPONSE]
        drop.update(response_positions[len(response_positions) - remaining:] if remaining <= len(response_positions) else response_positions)
    keep = [i for i in range(len(ids)) if i not in drop]
    if len(keep) > max_length:  # only special tokens left over the limit: a max_length too small
        keep = keep[:max_length]
    return EncodedInput(
        [ids[i] for i in keep],
        [types[i] for i in keep] if types is not None else None,
        truncated=True,
    )


def encode_items(items: Iterable[Any], tokenizer: Any, spec: RewardModelSpec) -> list[EncodedInput]:
    """Protocol items (score items or their dicts) to model input."""
    return encode_conversations((item_to_conversation(i) for i in items), tokenizer, spec)


def encode_texts(
    texts: Sequence[str],
    tokenizer: Any,
    spec: RewardModelSpec,
    *,
    prompt_prefixes: Sequence[str | None] | None = None,
    add_special_tokens: bool | None = None,
    max_length: int | None = None,
) -> list[EncodedInput]:
    """Already-formatted texts (OpenRLHF's ``query``, vLLM's ``input``) to model input.

    Nothing is re-rendered: the caller already applied the chat template. The rules:

    * Decoders: the text is tokenised as it is and scored at its last token. Special tokens
      are added the way the tokenizer adds them to plain text, unless the text already begins
      with the BOS token (a chat template wrote it) or ``add_special_tokens`` says otherwise.
      When ``prompt_prefixes[i]`` is a prefix of the text, the tokens inside it count as the
      prompt for truncation; otherwise the whole text does.
    * Encoders: when ``prompt_prefixes[i]`` is a non-empty prefix of the text, the text is
      split there and read as the text pair (prefix, rest), as ``encode_conversations`` does
      for a single-turn (prompt, response); otherwise the whole text is one segment.

    Trailing pad tokens (when the pad token is not also EOS) are removed first: a rollout
    decoded with its special tokens can carry them, and a pad is never what is being judged.
    Truncation follows the module's rule: tokens are cut from the start (the prompt) first, so
    the end of the text, where a decoder reads its reward, is what stays. ``max_length``, when
    given, lowers the model's limit for these texts (never raises it).
    """
    if not texts:
        return []
    limit = min(spec.max_length, max_length) if max_length else spec.max_length
    pad, eos = getattr(tokenizer, "pad_token", None), getattr(tokenizer, "eos_token", None)
    if pad and pad != eos:
        texts = [_strip_trailing(t, pad) for t in texts]
    prefixes = list(prompt_prefixes) if prompt_prefixes is not None else [None] * len(texts)
    if len(prefixes) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(prefixes)} prompt prefixes")
    splits = [p if p and t.startswith(p) else None for t, p in zip(texts, prefixes)]

    if spec.architecture == "encoder":
        out = []
        for text, prefix in zip(texts, splits):
            with_specials = True if add_special_tokens is None else add_special_tokens
            if prefix is not None and len(prefix) < len(text):
                enc = tokenizer(prefix, text[len(prefix):], add_special_tokens=with_specials, truncation=False, verbose=False)
                # Both segments are kept apart so truncation cuts the prompt before the response.
                kinds = [SPECIAL if s is None else (PROMPT if s == 0 else RESPONSE) for s in enc.sequence_ids(0)]
            else:
                enc = tokenizer(text, add_special_tokens=with_specials, truncation=False, verbose=False)
                kinds = [SPECIAL if s is None else PROMPT for s in enc.sequence_ids(0)]
            out.append(_truncate(enc["input_ids"], kinds, enc.get("token_type_ids"), limit))
        return out

    bos = getattr(tokenizer, "bos_token", None)
    out = []
    for text, prefix in zip(texts, splits):
        with_specials = add_special_tokens
        if with_specials is None:
            with_specials = not (bos and text.startswith(bos))
        if not getattr(tokenizer, "is_fast", False):
            # A slow tokenizer has no offsets: the whole text counts as prompt (cut from the start).
            ids = tokenizer(text, add_special_tokens=with_specials, truncation=False, verbose=False)["input_ids"]
            out.append(_truncate(ids, [PROMPT] * len(ids), None, limit))
            continue
        enc = tokenizer(
            text, add_special_tokens=with_specials, return_offsets_mapping=True, truncation=False, verbose=False
        )
        boundary = len(prefix) if prefix is not None else len(text)
        # A token belongs to the prompt when it ends inside the prefix (a token straddling the
        # boundary counts as response: truncation then never cuts into the response's start).
        kinds = [
            SPECIAL if seq_id is None else (PROMPT if end <= boundary else RESPONSE)
            for seq_id, (_, end) in zip(enc.sequence_ids(0), enc["offset_mapping"])
        ]
        out.append(_truncate(enc["input_ids"], kinds, None, limit))
    return out


def _strip_trailing(text: str, token: str) -> str:
    while text.endswith(token):
        text = text[: -len(token)]
    return text
