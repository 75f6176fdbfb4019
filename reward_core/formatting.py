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

Prompts
-------
:func:`parse_prompt` is the one reader of a prompt value: a string (one user turn, or an
Anthropic HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, split into its turns here and
nowhere else) or a list of messages (``{"role", "content"}`` or ShareGPT ``{"from", "value"}``,
roles such as ``human``/``gpt`` mapped to the chat roles). :func:`render_policy_prompt` is the
one renderer of a prompt for a causal LM to continue (SFT, PPO and best-of-N): the decoder
rendering above without the response, i.e. the chat template with the generation prompt, or
the HH transcript ending in ``"\\n\\nAssistant:"``.

Where a decoder reads its reward
--------------------------------
``spec.read_reward_at`` (see ``reward_core.model_dir``) names the token: ``"template_end"``, the
end of the chat template's rendering of the whole conversation, or ``"eos"``, OpenRLHF's EOS.
:func:`reward_read_point` brings any text to that point: a text cut at the end-of-turn token
(``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``: what a policy's rollout ends with, as
OpenRLHF sends it) gets the rest of what the template writes after it (``"\\n"``), and for
``"eos"`` trailing newlines go and the EOS is appended when missing. Both
:func:`encode_conversations` and :func:`encode_texts` apply it, so every route reads the reward
at the same token. A text that stops elsewhere (a response cut by the length limit) is read
where it stops.

Chat markup read by encoders
----------------------------
An encoder was trained on the pair (prompt, response), never on chat markup. A text that
already went through a chat template (verl's reward input, OpenRLHF's query) is parsed back
into (prompt messages, response) by :func:`parse_chat_markup` (ChatML, which is also the
template our encoders ship, :data:`ENCODER_CHAT_TEMPLATE`; Llama 3; Gemma; and the
``<|user|>...</s>`` / ``<|user|>...<|end|>`` style of Zephyr and Phi-3) and then rendered as
:func:`render_conversation` renders it. Text in no known format is read as one segment.

Truncation
----------
When the input is longer than ``max_length`` tokens, tokens are removed from the START of the
prompt first (keeping the most recent turns, which matter most for judging the response); the
response is cut, from its end, only once the prompt is exhausted. Special tokens are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .model_dir import READ_AT_EOS, RewardModelSpec

# (prompt messages, response text): the canonical scoring unit, shared with the trainer.
Conversation = tuple[list[dict[str, str]], str]

_HH_ROLE = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_MARKER_ROLE = {"Human": "user", "Assistant": "assistant"}
_LINE_ROLE = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool"}

#: The chat template our encoders ship (``reward train-rm`` saves it with an encoder that had
#: none; models/default-rm has it): ChatML, so callers that format with the reward model's
#: template (verl, vLLM-style clients) can, and :func:`parse_chat_markup` reads it back.
ENCODER_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

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


# --------------------------------------------------------------------------- prompts

#: Role names seen in the wild, mapped to the canonical chat roles.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


class PromptError(ValueError):
    """A prompt (or a message, or an HH transcript) that cannot be read; the message says why."""


def looks_like_hh(text: str) -> bool:
    """Whether a string is an HH transcript (has a ``\\n\\nHuman:``/``\\n\\nAssistant:`` marker,
    or starts with ``Human:``)."""
    return bool(_HH_MARKER.search(text)) or text.lstrip().startswith("Human:")


def parse_hh_transcript(text: str, where: str = "transcript") -> list[dict]:
    """Split an HH transcript into messages on the ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` markers.

    Markers not preceded by a blank line (e.g. "Assistant: Human: ..." quoted inside a turn) are
    content, not turn boundaries. A transcript that starts with "Human:" without the leading
    blank line is accepted. PromptError (naming ``where``) when text comes before the first marker.
    """
    stripped = text.lstrip()
    if stripped.startswith(("Human:", "Assistant:")):
        text = "\n\n" + stripped
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise PromptError(f"{where} has text before its first '\\n\\nHuman:' marker")
    return [
        {"role": _HH_MARKER_ROLE[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)
    ]


def parse_message(m: Any, where: str) -> dict:
    """One chat turn, ``{"role", "content"}`` or ShareGPT ``{"from", "value"}``, as ``{"role", "content"}``
    with a canonical role (:data:`ROLE_ALIASES`). PromptError (naming ``where``) otherwise."""
    if not isinstance(m, dict):
        raise PromptError(f"{where} must be a message object")
    if "role" in m:
        role, content = m["role"], m.get("content")
    elif "from" in m:
        role, content = m["from"], m.get("value")
    else:
        raise PromptError(f"{where} has neither 'role' nor 'from'")
    canonical = ROLE_ALIASES.get(role.lower() if isinstance(role, str) else role)
    if canonical is None:
        raise PromptError(f"{where} has unsupported role {role!r}")
    if not isinstance(content, str):
        raise PromptError(f"{where} content must be a string")
    return {"role": canonical, "content": content}


def parse_prompt(value: Any, *, for_generation: bool = False) -> list[dict]:
    """The one prompt parser: a string (one user turn, or an HH transcript, whose trailing empty
    ``"\\n\\nAssistant:"`` is dropped) or a list of messages (:func:`parse_message`), as messages.

    ``for_generation``: the prompt is for a policy to answer (PPO, best-of-N), so it must have at
    least one message and must not end with an assistant turn. PromptError says what is wrong.
    """
    if isinstance(value, str):
        if not value.strip():
            raise PromptError("prompt is empty")
        if looks_like_hh(value):
            messages = parse_hh_transcript(value, "prompt")
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages.pop()  # TRL-extracted HH prompts end with an empty "\n\nAssistant:"
        else:
            messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = [parse_message(m, f"prompt message {i}") for i, m in enumerate(value)]
    else:
        raise PromptError(f"prompt must be a string or a list of messages, got {type(value).__name__}")
    if for_generation:
        if not messages:
            raise PromptError("prompt has no messages")
        if messages[-1]["role"] == "assistant":
            raise PromptError("the prompt ends with an assistant turn; the policy writes that turn")
    return messages


# --------------------------------------------------------------------------- rendering


def _hh_prompt(messages: Sequence[dict]) -> str:
    """The HH fallback of a prompt: its turns, then the ``"\\n\\nAssistant:"`` the response follows."""
    return "".join(f"\n\n{_HH_ROLE.get(m['role'], m['role'].title())}: {m['content']}" for m in messages) + "\n\nAssistant:"


def _generation_prompt(messages: Sequence[dict], tokenizer: Any, chat_template: bool) -> str:
    if chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return _hh_prompt(messages)


def render_policy_prompt(messages: Sequence[dict], tokenizer: Any) -> tuple[str, bool]:
    """The one renderer of a prompt for a causal LM to continue (SFT, PPO, best-of-N): (text,
    add_special_tokens). The chat template with the generation prompt when the tokenizer has one
    (it writes its own special tokens), else the HH transcript ending in ``"\\n\\nAssistant:"``
    (tokenised with the tokenizer's special tokens, e.g. BOS). This is the decoder prompt text
    of :func:`render_conversation`, so a policy is prompted as its reward model reads it."""
    chat_template = bool(getattr(tokenizer, "chat_template", None))
    return _generation_prompt(messages, tokenizer, chat_template), not chat_template


def render_policy_example(messages: Sequence[dict], response: str, tokenizer: Any) -> tuple[str, str, bool]:
    """A demonstration for a causal LM: (prompt text, response text, add_special_tokens for the
    prompt), rendered as :func:`render_conversation` renders it for a decoder; the prompt text is
    :func:`render_policy_prompt`'s and the response ends with the end-of-turn / EOS token."""
    chat_template = bool(getattr(tokenizer, "chat_template", None))
    prompt, response_text = _render_decoder(messages, response, tokenizer, chat_template)
    return prompt, response_text, not chat_template


def _render_decoder(messages: Sequence[dict], response: str, tokenizer: Any, chat_template: bool) -> tuple[str, str]:
    prefix = _generation_prompt(messages, tokenizer, chat_template)
    if chat_template:
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
    eos = getattr(tokenizer, "eos_token", None) or ""
    return prefix, " " + response + eos


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
    return _render_decoder(messages, response, tokenizer, bool(chat_template))


# --------------------------------------------------------------------------- the reward's token

_PROBE_USER, _PROBE_REPLY = "\u2063probe question\u2063", "\u2063probe reply\u2063"
_turn_end_cache: dict[tuple[int, str], tuple[str, str] | None] = {}


def assistant_turn_end(tokenizer: Any) -> tuple[str, str] | None:
    """What the chat template writes after an assistant turn's content, split in two: (the
    end-of-turn marker, up to and including the first special token, e.g. ``"<|im_end|>"``; the
    rest, e.g. ``"\\n"``). None without a template, or when nothing special ends the turn."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return None
    key = (id(tokenizer), template)
    if key not in _turn_end_cache:
        _turn_end_cache[key] = _probe_turn_end(tokenizer)
    return _turn_end_cache[key]


def _probe_turn_end(tokenizer: Any) -> tuple[str, str] | None:
    try:
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}], tokenize=False
        )
    except Exception:  # a template that refuses this conversation: nothing to complete
        return None
    at = full.rfind(_PROBE_REPLY)
    if at < 0:
        return None
    suffix = full[at + len(_PROBE_REPLY):]
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        specials |= set(tokenizer.get_added_vocab())
    except Exception:
        pass
    ends = [suffix.find(t) + len(t) for t in specials if t and suffix.find(t) >= 0]
    if not ends:
        return None
    first = min(ends)
    return suffix[:first], suffix[first:]


def reward_read_point(text: str, tokenizer: Any, spec: RewardModelSpec) -> str:
    """A decoder's full text (prompt and response) brought to the token its reward is read at
    (``spec.read_reward_at``; see the module docstring). Idempotent; encoders' text is returned
    as it is."""
    if spec.architecture != "decoder":
        return text
    if spec.read_reward_at == READ_AT_EOS:
        eos = getattr(tokenizer, "eos_token", None)
        text = text.rstrip("\n")
        if eos and not text.endswith(eos):
            text += " " + eos
        return text
    if not (spec.use_chat_template and getattr(tokenizer, "chat_template", None)):
        return text  # the HH fallback ends with the EOS it renders
    turn_end = assistant_turn_end(tokenizer)
    if turn_end is None:
        return text
    marker, rest = turn_end
    if rest and text.endswith(marker) and not text.endswith(marker + rest):
        return text + rest
    return text


# --------------------------------------------------------------------------- chat markup


@dataclass(frozen=True)
class _Markup:
    """One chat format: a turn (groups role, content) closed by its end token; the last turn may
    be open (a response cut by the length limit)."""

    name: str
    turn: re.Pattern
    open_turn: re.Pattern
    bos: tuple[str, ...]
    eos: tuple[str, ...]
    ends: tuple[str, ...]  # the tokens that close a turn


def _markup(name: str, head: str, ends: tuple[str, ...], bos: tuple[str, ...], eos: tuple[str, ...]) -> _Markup:
    end = "(?:" + "|".join(re.escape(e) for e in ends) + ")"
    return _Markup(
        name, re.compile(head + r"(?P<content>.*?)" + end, re.S), re.compile(head + r"(?P<content>.*)\Z", re.S), bos, eos,
        ends,
    )


_ROLE = r"(?P<role>[A-Za-z_]+)"
CHAT_MARKUPS: tuple[_Markup, ...] = (
    _markup("chatml", r"<\|im_start\|>" + _ROLE + r"\n", ("<|im_end|>",), (), ("<|endoftext|>",)),
    _markup(
        "llama3", r"<\|start_header_id\|>" + _ROLE + r"<\|end_header_id\|>\n\n", ("<|eot_id|>",),
        ("<|begin_of_text|>",), ("<|end_of_text|>",),
    ),
    _markup("gemma", r"<start_of_turn>" + _ROLE + r"\n", ("<end_of_turn>",), ("<bos>",), ("<eos>",)),
    _markup("zephyr", r"<\|(?P<role>user|assistant|system)\|>\n?", ("</s>", "<|end|>"), ("<s>",), ("<|endoftext|>",)),
)
_MARKUP_ROLES = dict(ROLE_ALIASES, tool="tool")
_PADS = ("<pad>", "<|pad|>", "[PAD]")
# Stands for the response after a templated prompt, to parse the prompt as a conversation.
_RESPONSE_MARK = "\u2063response\u2063"


def parse_chat_markup(text: str) -> Conversation | None:
    """A text in a known chat format (:data:`CHAT_MARKUPS`) that ends with an assistant turn, as
    (prompt messages, response); None for any other text. The whole text must be turns of one
    format (a leading BOS, whitespace between turns and a trailing EOS or pad allowed);
    contents are stripped, as the common templates strip them."""
    for markup in CHAT_MARKUPS:
        messages = _parse_turns(text, markup)
        if messages and messages[-1]["role"] == "assistant":
            return messages[:-1], messages[-1]["content"]
    return None


def split_rendered(prompt: str, response: str) -> Conversation | None:
    """A conversation rendered with a known chat template (:data:`CHAT_MARKUPS`) and cut where
    its response begins (slime's prompt, OpenRLHF's ``prompts[i]``): the prompt's messages, and
    the response as written less the end-of-turn, EOS and pad tokens that close it. The cut, not
    the markup, says where the response starts: markup inside a response (a policy spelling out
    ``<|im_end|>`` and a second assistant turn) is the response's text, not turns. None when the
    prompt is not a templated prompt ending with the opening of an assistant turn."""
    for markup in CHAT_MARKUPS:
        messages = _parse_turns(prompt + _RESPONSE_MARK, markup)
        if messages and len(messages) > 1 and messages[-1] == {"role": "assistant", "content": _RESPONSE_MARK}:
            return messages[:-1], _without_closing(response, markup)
    return None


def _without_closing(response: str, markup: _Markup) -> str:
    """``response`` less the end-of-turn, EOS and pad tokens (and the whitespace around them) at
    its end."""
    return response[:_end_before_tails(response, markup.ends + markup.eos + _PADS)]


def _end_before_tails(text: str, tails: tuple[str, ...]) -> int:
    """Where ``text`` ends once the tokens of ``tails`` it ends with, and the whitespace between
    them, are cut off (whitespace after the last content is kept). Moving an end index rather than
    slicing keeps this linear however many of them a text ends with."""
    cut = len(text)
    while True:
        end = cut
        while end and text[end - 1].isspace():
            end -= 1
        tail = next((t for t in tails if text.endswith(t, 0, end)), None)
        if tail is None:
            return cut
        cut = end - len(tail)


def prompt_response_conversation(prompt: Any, response: str) -> Conversation:
    """A (prompt, response) whose prompt may already be rendered (slime sends the policy's
    templated prompt): chat messages as they are; a templated prompt string parsed back, the
    response being all that follows it (:func:`split_rendered`), or parsed with its response
    (:func:`parse_chat_markup`); any other string read by :func:`parse_prompt` (one user turn or
    an HH transcript)."""
    if isinstance(prompt, str):
        split = split_rendered(prompt, response)
        if split is not None:
            return split
        parsed = parse_chat_markup(prompt + response)
        if parsed is not None and parsed[0] and parsed[1] == response.strip():
            return parsed[0], response
        return parse_prompt(prompt), response
    if isinstance(prompt, list):  # messages the protocol has validated: as /v1/score takes them, tool turns included
        return item_to_conversation({"prompt": prompt, "response": response})
    return parse_prompt(prompt), response


def _parse_turns(text: str, markup: _Markup) -> list[dict] | None:
    body = text.strip()
    for bos in markup.bos:
        if body.startswith(bos):
            body = body[len(bos):].lstrip()
    body = body[:_end_before_tails(body, markup.eos + _PADS)].rstrip()  # trailing EOS / pad tokens a decoded rollout may carry
    messages, pos = [], 0
    while pos < len(body):
        match = markup.turn.match(body, pos) or markup.open_turn.match(body, pos)
        if match is None:
            return None
        role = _MARKUP_ROLES.get(match["role"].lower())
        if role is None:
            return None
        messages.append({"role": role, "content": match["content"].strip()})
        pos = match.end()
        while pos < len(body) and body[pos].isspace():
            pos += 1
    return messages or None


def encode_conversations(
    conversations: Iterable[Conversation], tokenizer: Any, spec: RewardModelSpec
) -> list[EncodedInput]:
    """Render, tokenise (batched, with the fast tokenizer) and truncate to ``spec.max_length``."""
    rendered = [render_conversation(m, r, tokenizer, spec) for m, r in conversations]
    if not rendered:
        return []
    if spec.architecture == "decoder":
        rendered = [_at_read_point(p, r, tokenizer, spec) for p, r in rendered]
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


def _at_read_point(prompt: str, response: str, tokenizer: Any, spec: RewardModelSpec) -> tuple[str, str]:
    full = reward_read_point(prompt + response, tokenizer, spec)
    return (prompt, full[len(prompt):]) if full.startswith(prompt) else (full, "")


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
      The text is first brought to the model's reward token (:func:`reward_read_point`): a
      rollout cut at the end-of-turn token is read where ``/v1/score`` reads the conversation.
    * Encoders: a text in a known chat format is parsed back into (prompt messages, response)
      and rendered as ``encode_conversations`` renders it (the markup is not read). When
      ``prompt_prefixes[i]`` is a templated prompt and a prefix of the text, the response is
      all that follows it (:func:`split_rendered`: markup inside the response is its text);
      otherwise the text's last assistant turn is the response (:func:`parse_chat_markup`). Otherwise, when ``prompt_prefixes[i]`` is a non-empty prefix of the
      text, the text is split there and read as the text pair (prefix, rest), as
      ``encode_conversations`` does for a single-turn (prompt, response); otherwise the whole
      text is one segment.

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
            conversation = split_rendered(prefix, text[len(prefix):]) if prefix is not None else None
            if conversation is None:
                conversation = parse_chat_markup(text)
            if conversation is not None:
                first, second = render_conversation(*conversation, tokenizer, spec)
                enc = tokenizer(first, second, add_special_tokens=with_specials, truncation=False, verbose=False)
                kinds = [SPECIAL if s is None else (PROMPT if s == 0 else RESPONSE) for s in enc.sequence_ids(0)]
            elif prefix is not None and len(prefix) < len(text):
                enc = tokenizer(prefix, text[len(prefix):], add_special_tokens=with_specials, truncation=False, verbose=False)
                # Both segments are kept apart so truncation cuts the prompt before the response.
                kinds = [SPECIAL if s is None else (PROMPT if s == 0 else RESPONSE) for s in enc.sequence_ids(0)]
            else:
                enc = tokenizer(text, add_special_tokens=with_specials, truncation=False, verbose=False)
                kinds = [SPECIAL if s is None else PROMPT for s in enc.sequence_ids(0)]
            out.append(_truncate(enc["input_ids"], kinds, enc.get("token_type_ids"), limit))
        return out

    bos = getattr(tokenizer, "bos_token", None)
    texts = [reward_read_point(t, tokenizer, spec) for t in texts]
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
