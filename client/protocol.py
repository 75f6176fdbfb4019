"""The whole wire protocol of the reward service, as pydantic v2 models.

One module, like vLLM's ``protocol.py``: the server validates requests with these models and
the client builds them, so both sides agree by construction. Everything here is plain data;
nothing imports torch or the service.

Versioned under ``/v1``:

- ``POST /v1/score``    ScoreRequest   -> ScoreResponse
- ``POST /v1/compare``  CompareRequest -> CompareResponse
- ``GET  /v1/models``   -> ModelList
- ``POST /v1/models/{name}/reload``  ReloadRequest -> ReloadResponse (hot reload; needs --reload-token)
- errors                -> ErrorResponse (every 4xx/5xx)

The path carries the major version; within ``/v1`` the protocol only grows, and ``API_REVISION``
counts what it grew by. A new request field is optional and its default keeps the old behaviour;
a new response field is omitted unless the request asked for it. So a request of an older client
is answered exactly as before, and an older server refuses a newer field by name (422) rather
than ignoring it. Revisions:

- ``1.0``: the routes above.
- ``1.1``: rewards per objective, for models with several reward heads: ``objective`` and
  ``return_objectives`` on ``/v1/score`` and ``/v1/compare``, ``objectives`` in their answers,
  ``objectives`` and ``combine`` on the model card, per-objective ``extra_logs`` and ``objective``
  on ``/get_reward``.
- ``1.2``: reward-model ensembles (K members over one backbone; ``reward_core/ensemble.py``):
  ``aggregate`` (``mean``, ``min``, ``mean_minus_var``) and ``uncertainty_penalty`` (the λ of
  ``mean - λ·var``) on ``/v1/score``, ``/v1/compare`` and ``/get_reward`` choose how the members'
  rewards become the reward (the served default otherwise); ``return_uncertainty`` adds the
  members' mean and standard deviation (``ensemble_mean``, ``ensemble_std``; on ``/v1/compare``
  also ``member_agreement``, the share of members that rank ``a`` above ``b``) and
  ``return_members`` each member's reward (``members``); ``ensemble`` on the model card (K,
  top_layers, the served aggregate and penalty); ``reward_mean`` and ``reward_std`` in
  ``/get_reward``'s ``extra_logs``. Models that are not ensembles answer exactly as in 1.1.
- ``1.3``: ``gate_temperature`` in a gated model's ``combine`` on the model card (the gate's
  softmax temperature, ``objectives.gate_temperature`` in reward_model.json). The flags
  (``normalize``, ``return_*``) take JSON ``true``/``false`` only, as the numbers here refuse
  booleans: ``"yes"``, ``"off"`` or ``1`` were read as booleans before; now they are a 422 naming
  the field, so a client that sends the wrong JSON type learns of it.

Other frameworks' wire shapes, served beside ``/v1`` so their trainers work unchanged (last
section of this module):

- ``POST /get_reward``  GetRewardRequest      -> GetRewardResponse       (OpenRLHF remote RM)
- ``POST /classify``    ClassificationRequest -> ClassificationResponse  (vLLM; verl's reward loop)
- ``POST /pooling``     PoolingRequest        -> PoolingResponse         (vLLM)
- ``POST /slime_reward`` SlimeRewardRequest   -> a bare number           (slime's remote_rm)
- ``POST /predict``     TEIPredictRequest     -> [TEIPrediction] or [[TEIPrediction]] (TEI)
- ``POST /rerank``      TEIRerankRequest      -> [TEIRank], best first   (TEI)

``/classify`` and ``/pooling`` take either vLLM's text body (``input``) or its chat body
(``messages``, scored through the model's own template as ``/v1/score`` scores them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

API_VERSION = "v1"
API_REVISION = "1.3"  # see the module docstring: what each revision of /v1 added

# The largest integer the store keeps (a signed 64-bit column): ids, task ids and cursors.
MAX_ID = 2**63 - 1


def _check_text(value: str) -> str:
    # A JSON "\ud800" escape (or raw CESU-8 bytes) decodes to a lone surrogate: a Python str
    # that is not Unicode text, which no tokenizer reads and no UTF-8 answer can carry back.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_unicode",
            "holds a lone surrogate ({char} at character {index}), which is not Unicode text; send valid "
            "UTF-8 (a character outside the BMP is a high surrogate escape followed by a low one)",
            {"char": f"U+{ord(value[exc.start]):04X}", "index": exc.start},
        ) from None
    return value


# Every text field of every request, our routes' and the compatible ones', is this type: one
# place that decides what text the service takes. Per-field length is a server setting
# (--max-field-chars), checked on the one inference path (service/inference.py) and by the store.
Text = Annotated[str, AfterValidator(_check_text)]

Role = Literal["system", "user", "assistant", "tool"]

# The name of a reward head, as a request gives it (the model's names are at most 32 characters;
# a longer one names no head, and is refused before it is echoed into an error message).
ObjectiveName = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_check_text)]


# How an ensemble's members' rewards become the one reward (reward_core.ensemble.AGGREGATES; a
# test keeps the two lists equal, the client imports nothing of reward_core).
AggregateRule = Literal["mean", "min", "mean_minus_var"]

# The λ of ``mean - λ·var``: a JSON number (not a string or a boolean), finite, at least 0.
UncertaintyPenalty = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]

AGGREGATE_DESCRIPTION = (
    "An ensemble model: how its members' rewards become the reward: 'mean', 'min' (the worst case over members) or "
    "'mean_minus_var' (mean - uncertainty_penalty * the members' population variance); the served default (on "
    "GET /v1/models) when omitted. (1.2)"
)
PENALTY_DESCRIPTION = (
    "An ensemble model, with the rule 'mean_minus_var' (sent or served by default): the λ of mean - λ·var, a finite "
    "number >= 0; the served default when omitted. (1.2)"
)


# A body with more invalid values than this is answered with one error that counts them: pydantic
# reports every invalid value, and turning millions of them (a few MB of ``[1, 1, ...]`` where
# items belong) into error objects held the event loop, and so every request, for half a minute.
MAX_REPORTED_ERRORS = 1000
_EXAMPLE_ENTRIES = 8  # entries per list kept to find the first errors again, cheaply


def _first_entries(value: Any) -> Any:
    """``value`` with every list cut to its first few entries, at every depth."""
    if isinstance(value, list):
        return [_first_entries(v) for v in value[:_EXAMPLE_ENTRIES]]
    if isinstance(value, dict):
        return {k: _first_entries(v) for k, v in value.items()}
    return value


# The tags of the protocol's tagged unions, which pydantic puts in the path of an error right
# after the union-typed place: an item's shape after its index, a prompt's kind after "prompt",
# a message content's kind after "content", vLLM's input's after "input". Only there are they
# tags: "text" is also a field.
_UNION_TAGS_AFTER = {
    "prompt": {"text", "messages"}, "content": {"string", "parts"}, "input": {"text", "texts"},
    "inputs": {"text", "sequence", "batch"},
}
_ITEM_SHAPES = frozenset({"prompt_response", "messages"})


def error_path(loc: tuple) -> str:
    """A validation error's place as the caller wrote it (``items.0.prompt``): pydantic's loc less
    "body" and the union tags."""
    parts: list[str] = []
    previous: object = None
    for i, p in enumerate(loc):
        if isinstance(previous, int):
            tag = p in _ITEM_SHAPES
        else:
            tag = p in _UNION_TAGS_AFTER.get(previous, ()) if isinstance(previous, str) else False
        # An error of the whole item keeps its shape's name; one of a whole prompt list does not.
        last_shape = i == len(loc) - 1 and isinstance(previous, int) and p in _ITEM_SHAPES
        if p != "body" and (not tag or last_shape):
            parts.append(str(p))
        previous = p
    return ".".join(parts) or "body"


class _FewErrors(BaseModel):
    """A request body: validation errors past MAX_REPORTED_ERRORS are counted, not listed."""

    @model_validator(mode="wrap")
    @classmethod
    def _count_many_errors(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            count = exc.error_count()  # cheap: the errors are not built as Python objects
            if count <= MAX_REPORTED_ERRORS:
                raise
        example = ""
        try:
            handler(_first_entries(data))  # the same body, its lists cut short: a few errors, fast
        except ValidationError as few:
            first = few.errors(include_url=False)[0]
            where = error_path(first["loc"])
            example = f" (the first: {where}: {first['msg']})"
        raise PydanticCustomError(
            "too_many_errors",
            "{count} values in the body are invalid{example}; check the body's shape against the API (/docs)",
            {"count": count, "example": example},
        )


class _Strict(BaseModel):
    # Unknown fields are an error, not silently ignored: a typo such as "respone" must be
    # reported to the caller instead of scoring an item with a missing field.
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Role
    content: Text


# The most messages one conversation may hold: a prompt's message list, a ``messages`` item, vLLM's
# chat body. Generous: a model reads at most its max_length tokens of a conversation (the prompt
# is cut from its start), so thousands of turns are far more than any scored one; at the least
# a message takes (``{"role":"user","content":"x"}``) 4096 of them are 1.5% of the default body
# limit (8 MiB). Counted before any message is read.
MAX_MESSAGES = 4096


def _at_most_max_messages(value: Any) -> Any:
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise PydanticCustomError(
            "too_many_messages",
            "{count} messages is over the limit of {limit} messages per conversation; send the recent turns (a "
            "reward model reads only the last max_length tokens of a conversation; the rest is cut from its start)",
            {"count": len(value), "limit": MAX_MESSAGES},
        )
    return value


def message_list(message_type: Any) -> Any:
    """A list of ``message_type``: one conversation, at most MAX_MESSAGES messages."""
    return Annotated[list[message_type], BeforeValidator(_at_most_max_messages), Field(max_length=MAX_MESSAGES)]


def text_or_list(list_type: Any, text_tag: str, list_tag: str, error_type: str, error_message: str) -> Any:
    """A string or a ``list_type`` (a list type), told apart by the JSON type (a tagged union), so a
    bad value gets one error saying what the field takes instead of one per union member."""

    def kind(value: object) -> str | None:
        if isinstance(value, str):
            return text_tag
        if isinstance(value, list):
            return list_tag
        return None

    return Annotated[
        Union[Annotated[Text, Tag(text_tag)], Annotated[list_type, Tag(list_tag)]],
        Discriminator(kind, custom_error_type=error_type, custom_error_message=error_message),
    ]


# A prompt: plain text, or the chat messages that precede the response.
Prompt = text_or_list(
    message_list(Message), "text", "messages", "invalid_prompt", "the prompt is a string or a list of messages ({role, content})"
)


def _no_empty_message_list(prompt: Any) -> None:
    """An empty message list is a caller's bug, not a prompt to score an answer against (every
    body with a prompt refuses it alike)."""
    if isinstance(prompt, list) and not prompt:
        raise ValueError("prompt is an empty message list; give at least one message or a string")


class PromptResponseItem(_Strict):
    """A prompt (plain text or chat messages) and the response to score."""

    prompt: Prompt = Field(
        description="The prompt: plain text, or the chat messages that precede the response."
    )
    response: Text = Field(description="The assistant response to score.")

    @model_validator(mode="after")
    def _prompt_messages_not_empty(self) -> "PromptResponseItem":
        _no_empty_message_list(self.prompt)
        return self


class MessagesItem(_Strict):
    """A whole conversation; its last message is the assistant turn to score."""

    messages: message_list(Message) = Field(  # type: ignore[valid-type]
        min_length=1, description=f"The conversation, ending with the assistant turn to score (at most {MAX_MESSAGES} messages)."
    )

    @model_validator(mode="after")
    def _ends_with_assistant(self) -> "MessagesItem":
        if self.messages[-1].role != "assistant":
            raise ValueError(
                f"messages must end with an assistant turn (the response to score); "
                f"the last message has role {self.messages[-1].role!r}"
            )
        return self


def _item_kind(value: object) -> str | None:
    # Choose the item shape by its keys so a bad item gets the errors of the shape the
    # caller meant ("items.0.response: Field required"), not of every shape in the union.
    if isinstance(value, dict):
        return "messages" if "messages" in value else "prompt_response"
    if isinstance(value, MessagesItem):
        return "messages"
    if isinstance(value, PromptResponseItem):
        return "prompt_response"
    return None


ScoreItem = Annotated[
    Union[
        Annotated[PromptResponseItem, Tag("prompt_response")],
        Annotated[MessagesItem, Tag("messages")],
    ],
    Discriminator(
        _item_kind,
        custom_error_type="invalid_item",
        custom_error_message="an item is an object: {prompt, response} or {messages}",
    ),
]


class ScoreRequest(_Strict, _FewErrors):
    model: Text | None = Field(default=None, description="Model name; the server's default when omitted.")
    items: list[ScoreItem] = Field(min_length=1, description="Items to score, at least one.")
    normalize: StrictBool = Field(
        default=False,
        description="Return (reward - mean) / std using the statistics the model was trained with. Those are the "
        "statistics of the model's reward (the combination, for a model with objectives; the members' mean, for an "
        "ensemble): not with `objective`, nor with an ensemble aggregated by a rule other than 'mean'.",
    )
    objective: ObjectiveName | None = Field(
        default=None,
        description="A model with several reward heads: score with this objective's head instead of their "
        "combination (the names are on GET /v1/models). (1.1)",
    )
    return_objectives: StrictBool = Field(
        default=False,
        description="A model with several reward heads: also return each objective's raw reward (`objectives`). (1.1)",
    )
    aggregate: AggregateRule | None = Field(default=None, description=AGGREGATE_DESCRIPTION)
    uncertainty_penalty: UncertaintyPenalty | None = Field(default=None, description=PENALTY_DESCRIPTION)
    return_uncertainty: StrictBool = Field(
        default=False,
        description="An ensemble model: also return the members' mean and population standard deviation per item "
        "(`ensemble_mean`, `ensemble_std`). (1.2)",
    )
    return_members: StrictBool = Field(
        default=False, description="An ensemble model: also return each member's reward per item (`members`). (1.2)"
    )


class Usage(BaseModel):
    items: int = Field(description="Items scored.")
    tokens: int = Field(description="Tokens fed to the model, after truncation.")
    truncated: int = Field(description="Items whose input was cut to the model's max length.")


class ScoreResponse(BaseModel):
    model: str = Field(description="The model that scored, as name@version.")
    scores: list[float] = Field(
        description="One reward per item, in item order: the model's reward (for a model with objectives, their "
        "combination, or the head named by `objective`; for an ensemble, its members' rewards aggregated by "
        "`aggregate` or the served default)."
    )
    objectives: dict[str, list[float]] | None = Field(
        default=None,
        description="With return_objectives: each objective's raw reward (one per item, in item order), by "
        "objective name; never normalized. Omitted otherwise. (1.1)",
    )
    ensemble_mean: list[float] | None = Field(
        default=None,
        description="With return_uncertainty: the ensemble members' mean reward per item, in item order; never "
        "normalized. Omitted otherwise. (1.2)",
    )
    ensemble_std: list[float] | None = Field(
        default=None,
        description="With return_uncertainty: the population standard deviation of the members' rewards per item "
        "(how much they disagree), in item order. Omitted otherwise. (1.2)",
    )
    members: list[list[float]] | None = Field(
        default=None,
        description="With return_members: each member's raw reward per item (`members[i][m]`: item i, member m). "
        "Omitted otherwise. (1.2)",
    )
    usage: Usage


class ComparePair(_Strict):
    prompt: Prompt
    a: Text = Field(description="First response.")
    b: Text = Field(description="Second response.")

    @model_validator(mode="after")
    def _prompt_messages_not_empty(self) -> "ComparePair":
        _no_empty_message_list(self.prompt)
        return self


class CompareRequest(_Strict, _FewErrors):
    model: Text | None = None
    pairs: list[ComparePair] = Field(min_length=1, description="Pairs to compare, at least one.")
    objective: ObjectiveName | None = Field(
        default=None,
        description="A model with several reward heads: compare by this objective's head instead of their "
        "combination. (1.1)",
    )
    return_objectives: StrictBool = Field(
        default=False,
        description="A model with several reward heads: also compare by each objective (`objectives` of each result). (1.1)",
    )
    aggregate: AggregateRule | None = Field(default=None, description=AGGREGATE_DESCRIPTION)
    uncertainty_penalty: UncertaintyPenalty | None = Field(default=None, description=PENALTY_DESCRIPTION)
    return_uncertainty: StrictBool = Field(
        default=False,
        description="An ensemble model: also return, per pair, the share of members that rank a above b "
        "(`member_agreement`) and each response's members' mean and standard deviation. (1.2)",
    )
    return_members: StrictBool = Field(
        default=False, description="An ensemble model: also return each member's reward of a and of b (`members_a`, "
        "`members_b`). (1.2)",
    )


class ObjectiveComparison(BaseModel):
    """One pair compared by one objective's head."""

    reward_a: float
    reward_b: float
    p_a_better: float = Field(description="sigmoid(reward_a - reward_b) by this objective.")


class CompareResult(BaseModel):
    reward_a: float
    reward_b: float
    p_a_better: float = Field(description="sigmoid(reward_a - reward_b): the Bradley-Terry probability.")
    objectives: dict[str, ObjectiveComparison] | None = Field(
        default=None,
        description="With return_objectives: the pair compared by each objective's head, by objective name. "
        "Omitted otherwise. (1.1)",
    )
    member_agreement: float | None = Field(
        default=None,
        description="With return_uncertainty: the share of the ensemble's members whose reward ranks a above b (a "
        "tie counts half); 1 or 0 when they all agree, near 0.5 when they are split. Omitted otherwise. (1.2)",
    )
    ensemble_mean_a: float | None = Field(default=None, description="With return_uncertainty: the members' mean reward of a. (1.2)")
    ensemble_std_a: float | None = Field(default=None, description="With return_uncertainty: the members' standard deviation for a. (1.2)")
    ensemble_mean_b: float | None = Field(default=None, description="With return_uncertainty: the members' mean reward of b. (1.2)")
    ensemble_std_b: float | None = Field(default=None, description="With return_uncertainty: the members' standard deviation for b. (1.2)")
    members_a: list[float] | None = Field(default=None, description="With return_members: each member's reward of a. (1.2)")
    members_b: list[float] | None = Field(default=None, description="With return_members: each member's reward of b. (1.2)")


class CompareResponse(BaseModel):
    model: str
    results: list[CompareResult]
    usage: Usage


class CombineRule(BaseModel):
    """How a model's objective heads combine into its reward (reward_core/objectives.py)."""

    rule: Literal["gate", "weights"] = Field(
        description="'weights': a fixed weighted sum of the heads; 'gate': a weighted sum whose weights a gate "
        "computes from the prompt (ArmoRM-style)."
    )
    weights: list[float] | None = Field(
        default=None, description="The rule 'weights': one weight per objective, in `objectives` order."
    )
    gate_temperature: float | None = Field(
        default=None, description="The rule 'gate': the temperature of the gate's softmax over the objectives (1: as "
        "trained; below 1: the weights lean harder on the objective the gate ranks first). (1.3)"
    )


class EnsembleCard(BaseModel):
    """An ensemble model's members and the rule it aggregates them by unless a request chooses one."""

    members: int = Field(description="K: how many members (reward models over one shared backbone).")
    top_layers: int = Field(description="How many of the backbone's top blocks each member owns.")
    aggregate: AggregateRule = Field(
        description="The served default rule: from reward_model.json, or `reward serve --ensemble-aggregate`."
    )
    uncertainty_penalty: float = Field(
        description="The served default λ of mean_minus_var: from reward_model.json, or `reward serve --uncertainty-penalty`."
    )


class ModelCard(BaseModel):
    name: str
    version: str
    path: str
    backend: str
    max_length: int
    dtype: str
    device: str
    architecture: str = Field(description="'encoder' (text-pair cross-encoder) or 'decoder' (last-token).")
    normalize_available: bool = Field(description="Whether the model carries reward mean/std.")
    default: bool
    objectives: list[str] | None = Field(
        default=None,
        description="A model with several reward heads: their names (what `objective` takes). Omitted for a "
        "single-head model. (1.1)",
    )
    combine: CombineRule | None = Field(
        default=None, description="How the heads combine into the reward; omitted for a single-head model. (1.1)"
    )
    ensemble: EnsembleCard | None = Field(
        default=None,
        description="An ensemble model: its members and served aggregation (what `aggregate` and "
        "`uncertainty_penalty` default to). Omitted for a model that is not an ensemble. (1.2)",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReloadRequest(_Strict, _FewErrors):
    path: Text | None = Field(
        default=None, description="Directory to load instead; the model's current directory when omitted."
    )


class ReloadResponse(BaseModel):
    model: ModelCard = Field(description="The model now serving under this name.")
    previous_version: str
    seconds: float = Field(description="Time to load and warm up the new weights.")


class ErrorDetail(BaseModel):
    code: int = Field(description="The HTTP status.")
    type: str = Field(description="A stable machine-readable kind, e.g. 'validation_error'.")
    message: str = Field(description="What is wrong and how to fix it.")
    request_id: str | None = None
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def as_item(obj: PromptResponseItem | MessagesItem | dict) -> PromptResponseItem | MessagesItem:
    """Build a ScoreItem from a dict ({prompt, response} or {messages}) or pass one through."""
    if isinstance(obj, (PromptResponseItem, MessagesItem)):
        return obj
    if "messages" in obj:
        return MessagesItem.model_validate(obj)
    return PromptResponseItem.model_validate(obj)



# -- Compatibility: other frameworks' shapes -------------------------------------------------
#
# These mirror what OpenRLHF and vLLM put on the wire, field for field, so their clients need no
# change. Unlike our own requests they IGNORE unknown fields, as the servers they imitate do
# (vLLM accepts and ignores extras; OpenRLHF's server reads only "query"): a newer client adding
# a field must not break. Texts here are already formatted by the caller (chat template
# applied); see ``reward_core.formatting.encode_texts`` for how they are read.


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GetRewardRequest(_Lenient, _FewErrors):
    """OpenRLHF's remote reward model body (``--reward.remote_url http://host:port/get_reward``)."""

    query: list[Text] = Field(
        description="Full texts to score, prompt and response together, chat template already applied. "
        "May be empty (OpenRLHF sends empty slices when it spreads a batch over several URLs)."
    )
    prompts: list[Text] | None = Field(
        default=None, description="The prompt of each query; where it is a prefix of its query it marks the prompt part."
    )
    labels: list[Any] | None = Field(default=None, description="Ground-truth labels; accepted and not used by a reward model.")
    model: Text | None = Field(default=None, description="Served model name (our extension); the default when omitted.")
    objective: ObjectiveName | None = Field(
        default=None,
        description="Our extension (1.1): for a model with several reward heads, `rewards` are this objective's "
        "instead of their combination.",
    )
    aggregate: AggregateRule | None = Field(
        default=None, description="Our extension (1.2), as on /v1/score: " + AGGREGATE_DESCRIPTION
    )
    uncertainty_penalty: UncertaintyPenalty | None = Field(
        default=None, description="Our extension (1.2), as on /v1/score: " + PENALTY_DESCRIPTION
    )

    @model_validator(mode="after")
    def _same_lengths(self) -> "GetRewardRequest":
        if self.prompts is not None and len(self.prompts) != len(self.query):
            raise ValueError(
                f"prompts has {len(self.prompts)} entries but query has {len(self.query)}; send one prompt per query or none"
            )
        return self


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="One reward per query, in order.")
    scores: list[float] = Field(description="The same values: OpenRLHF reads `scores` for dynamic filtering.")
    extra_logs: dict[str, list[float]] = Field(
        default_factory=dict,
        description="Per-query values OpenRLHF logs: tokens read (`reward_model_tokens`), whether the input was "
        "truncated (`reward_model_truncated`), for a model with several reward heads each objective's raw "
        "reward (`objective_<name>`, 1.1), and for an ensemble the members' mean and standard deviation "
        "(`reward_mean`, `reward_std`, 1.2).",
    )


class VLLMContentPart(_Lenient):
    """One part of an OpenAI-style message content: a text part, the only kind a text reward
    model reads. Another kind (an image, audio) is refused: dropped, it left a prompt or a
    response without what the caller sent, and its reward answered for other input."""

    type: Literal["text"] = Field(default="text", description="'text': a reward model here reads text only.")
    text: Text | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "text":
            raise ValueError(
                f"a content part of type {value[:40]!r} cannot be read: the reward model reads text, so send text "
                "parts only ({\"type\": \"text\", \"text\": ...})"
            )
        return value


# A chat message's content, OpenAI's shape: a string or a list of parts.
MessageContent = text_or_list(
    list[VLLMContentPart], "string", "parts", "invalid_content", "the content is a string or a list of parts ({type, text})"
)


class VLLMChatMessage(_Lenient):
    """One message of vLLM's chat body: OpenAI's shape, content a string or a list of parts
    (the text parts are read)."""

    role: Role
    content: MessageContent | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        return "".join(p.text for p in self.content if p.type == "text" and p.text is not None)


# vLLM's text input: one text or a list of texts (token ids are not taken).
InputTexts = text_or_list(
    list[Text], "text", "texts", "invalid_input", "input is a string or a list of strings (text with the chat template applied)"
)


class _VLLMPoolingBase(_Lenient, _FewErrors):
    model: Text | None = Field(
        default=None, description="Served model name or its directory path (verl sends the path); the default when omitted."
    )
    input: InputTexts | None = Field(
        default=None, description="One text or a list of texts, chat template already applied. Send this or messages."
    )
    messages: message_list(VLLMChatMessage) | None = Field(  # type: ignore[valid-type]
        default=None,
        description="vLLM's chat form: one conversation ending with the assistant turn to score, formatted by the "
        f"model's own template (as /v1/score formats it), at most {MAX_MESSAGES} messages. Send this or input.",
    )
    use_activation: StrictBool | None = Field(
        default=None, description="Apply the head's activation (sigmoid for a one-output reward model)."
    )
    activation: StrictBool | None = Field(default=None, description="vLLM's older name for use_activation.")
    add_special_tokens: StrictBool = Field(
        default=True, description="Add the tokenizer's special tokens (BOS...), as vLLM does by default."
    )
    truncate_prompt_tokens: StrictInt | None = Field(
        default=None, ge=1, description="Keep at most this many tokens (cut from the start), within the model's max length."
    )
    user: Text | None = None
    priority: StrictInt = 0  # strict, as every number a request sends: true or "3" is not an integer
    request_id: Text | None = None

    @model_validator(mode="after")
    def _input_not_empty(self) -> "_VLLMPoolingBase":
        if (self.input is None) == (self.messages is None):
            raise ValueError("send input (text, or a list of texts) or messages (a chat ending with the assistant turn), one of the two")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is an empty list; send a string or at least one string")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "assistant"):
            raise ValueError("messages must end with the assistant turn to score (a reward model scores a response)")
        if self.messages is not None and self.truncate_prompt_tokens is not None:
            # It was ignored: the answer was the whole chat's reward, as if it had not been sent.
            raise ValueError(
                "truncate_prompt_tokens applies to the text form (input); a chat (messages) is cut to the model's "
                "max length keeping the response, as /v1/score cuts it: leave truncate_prompt_tokens out, or send "
                "the rendered text as input"
            )
        return self

    @property
    def texts(self) -> list[str]:
        if self.input is None:
            return []
        return [self.input] if isinstance(self.input, str) else list(self.input)

    @property
    def conversation(self) -> tuple[list[dict[str, str]], str] | None:
        """The chat body as (prompt messages, response); None for a text body."""
        if self.messages is None:
            return None
        turns = [{"role": m.role, "content": m.text} for m in self.messages]
        return turns[:-1], turns[-1]["content"]

    def activation_wanted(self, default: bool) -> bool:
        for value in (self.use_activation, self.activation):
            if value is not None:
                return value
        return default


class ClassificationRequest(_VLLMPoolingBase):
    """vLLM's ``/classify`` body. Its ``use_activation`` defaults to true, as in vLLM; verl sends false."""


class VLLMUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: dict | None = None


class ClassificationData(BaseModel):
    index: int
    label: str | None = Field(description="The model's label of its top class (id2label).")
    probs: list[float] = Field(description="The reward (use_activation false) or sigmoid(reward); one class.")
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: VLLMUsage


class PoolingRequest(_VLLMPoolingBase):
    """vLLM's ``/pooling`` body. ``use_activation`` defaults to false here (the raw reward)."""

    encoding_format: Literal["float"] = Field(default="float", description="Only 'float' is served.")
    task: Text | None = Field(default=None, description="Accepted for vLLM compatibility; a reward model has one task.")


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] = Field(description="The model's output for the text: [reward].")


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: VLLMUsage


# A prompt in the compatible routes' chat shape: plain or rendered text, or OpenAI-style messages.
ChatPrompt = text_or_list(
    message_list(VLLMChatMessage), "text", "messages", "invalid_prompt", "the prompt is a string or a list of messages ({role, content})"
)


class SlimeRewardRequest(_Lenient, _FewErrors):
    """slime's remote reward model body (``--rm-type remote_rm --rm-url http://host:8000/slime_reward``):
    one sample per request; the answer is the reward, a bare JSON number."""

    prompt: ChatPrompt = Field(
        description="The prompt: chat messages, a prompt already rendered with a chat template (parsed back), or plain text."
    )
    response: Text = Field(description="The generated response.")
    label: Any = Field(default=None, description="The sample's label; accepted and not used by a reward model.")
    model: Text | None = Field(default=None, description="Served model name (our extension); the default when omitted.")

    @model_validator(mode="after")
    def _prompt_messages_not_empty(self) -> "SlimeRewardRequest":
        _no_empty_message_list(self.prompt)  # as /v1/score
        return self

    def prompt_value(self) -> Union[str, list[dict[str, str]]]:
        if isinstance(self.prompt, str):
            return self.prompt
        return [{"role": m.role, "content": m.text} for m in self.prompt]


# -- text-embeddings-inference (TEI): /predict and /rerank -----------------------------------
#
# TEI serves a one-output sequence classifier (a reward model) on both: /predict scores texts or
# text pairs, /rerank scores one query against many texts. A pair [a, b] is read here as a prompt
# and its response, and scored as /v1/score scores {"prompt": a, "response": b}; a single text as
# /get_reward scores a query (already formatted, prompt and response together).

# One TEI sequence: [text] or [text, text].
TEISequence = Annotated[list[Text], Field(min_length=1, max_length=2)]


def _tei_inputs_kind(value: object) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "batch" if value and isinstance(value[0], list) else "sequence"
    return None


# TEI's rule: a string is one text; a list whose first element is a string is one sequence (a
# text or a pair); a list of lists is a batch of sequences.
TEIInputs = Annotated[
    Union[Annotated[Text, Tag("text")], Annotated[TEISequence, Tag("sequence")],
          Annotated[list[TEISequence], Tag("batch")]],
    Discriminator(
        _tei_inputs_kind, custom_error_type="invalid_inputs",
        custom_error_message="inputs is a text, a pair [text, text], or a batch of texts and pairs [[text], [text, text], ...]",
    ),
]

TRUNCATION_DESCRIPTION = (
    "true or left out: an input longer than the model reads is cut by the model's own rule, as on /v1/score (the "
    "prompt's start first, the response's end only once the prompt is used up); false: such an input is a 422."
)
TruncationDirection = Literal["right", "Right", "left", "Left"]
TRUNCATION_DIRECTION_DESCRIPTION = (
    "Accepted for TEI's clients. It does not change the cut: a reward model keeps the response and the most recent "
    "turns of the prompt whatever the direction (see truncate)."
)


class _TEIOptions(_Lenient, _FewErrors):
    """What /predict and /rerank take beside their inputs."""

    truncate: StrictBool | None = Field(default=None, description=TRUNCATION_DESCRIPTION)
    truncation_direction: TruncationDirection = Field(default="right", description=TRUNCATION_DIRECTION_DESCRIPTION)
    raw_scores: StrictBool = Field(default=False, description="The raw reward; false (TEI's default): sigmoid(reward).")
    model: Text | None = Field(default=None, description="Served model name (our extension); the default when omitted.")


class TEIPredictRequest(_TEIOptions):
    """TEI's ``/predict`` body."""

    inputs: TEIInputs = Field(
        description="A text, a pair [prompt, response], or a batch of them [[text], [prompt, response], ...]."
    )

    @property
    def batched(self) -> bool:
        return isinstance(self.inputs, list) and bool(self.inputs) and isinstance(self.inputs[0], list)

    @property
    def sequences(self) -> list[list[str]]:
        """Every input as [text] or [prompt, response], in order."""
        if isinstance(self.inputs, str):
            return [[self.inputs]]
        return [list(s) for s in self.inputs] if self.batched else [list(self.inputs)]


class TEIPrediction(BaseModel):
    score: float = Field(description="sigmoid(reward), or the reward with raw_scores.")
    label: str = Field(description="The model's one class (config.id2label[0]); 'reward' for a model with objectives.")


class TEIRerankRequest(_TEIOptions):
    """TEI's ``/rerank`` body: each text is scored as the response to ``query``."""

    query: Text = Field(description="The prompt.")
    texts: list[Text] = Field(min_length=1, description="The responses to score against the query.")
    return_text: StrictBool = Field(default=False, description="Echo each text in its rank.")


class TEIRank(BaseModel):
    index: int = Field(description="The text's position in texts.")
    text: str | None = Field(default=None, description="The text, with return_text.")
    score: float = Field(description="sigmoid(reward), or the reward with raw_scores.")


# -- Comparisons and the labelling queue (service/routers/comparisons.py) --------------------------
#
# - POST /v1/comparisons          ComparisonRequest (+ Idempotency-Key header) -> ComparisonCreated
# - GET  /v1/comparisons          (admin) filters, page -> ComparisonList
# - GET  /v1/comparisons/export   (admin) filters -> JSONL rows of the trainer's rankings format
# - POST /v1/label/tasks          LabelTasksRequest -> LabelTasksCreated (the queue /label shows)
# - GET  /v1/label/tasks/next     ?labeller= -> NextLabelTask

MAX_COMPARISON_RESPONSES = 16
TRAINED_ROLES = ("system", "user", "assistant")  # the roles of a training row's prompt (trainer/data.py reads them)
MAX_TAGS = 32


def _check_responses(responses: list[str]) -> list[str]:
    if len(responses) < 2:
        raise ValueError(f"a comparison needs at least 2 responses (K >= 2), got {len(responses)}")
    if len(responses) > MAX_COMPARISON_RESPONSES:
        raise ValueError(f"at most {MAX_COMPARISON_RESPONSES} responses per comparison, got {len(responses)}")
    empty = [i for i, r in enumerate(responses) if not r.strip()]
    if empty:
        raise ValueError(f"response {empty[0]} is empty; every response must have text to judge")
    # What `reward train-rm` (trainer/data.py) refuses as a malformed row, refused here rather than
    # stored: a store of such rows fails training (past --max-bad-fraction) or silently loses them.
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if r.strip() in seen:
            raise ValueError(
                f"responses {seen[r.strip()]} and {i} are the same text; a comparison is between different responses"
            )
        seen[r.strip()] = i
    return responses


def _check_prompt(prompt: Union[str, list[Message]]) -> Union[str, list[Message]]:
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("the prompt is empty; give the text (or messages) the responses answer")
    _no_empty_message_list(prompt)
    if isinstance(prompt, list):  # what `reward train-rm` reads, as for the responses above
        for i, m in enumerate(prompt):
            if m.role not in TRAINED_ROLES:
                raise ValueError(
                    f"prompt message {i} has role {m.role!r}; a stored prompt takes {', '.join(TRAINED_ROLES)} turns "
                    "(what reward train-rm reads)"
                )
        if not any(m.role == "user" and m.content.strip() for m in prompt):
            raise ValueError("the prompt has no user message with text; give the user turn the responses answer")
    return prompt


def _no_nul(value: Any, where: str = "") -> None:
    # PostgreSQL text cannot hold NUL; refusing it here keeps both stores taking the same input.
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where or 'a text field'} contains a NUL character (\\u0000); remove it")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_nul(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_nul(v, f"{where}.{i}" if where else str(i))


# Bounded text of the store's optional fields. The bound sits on the string itself: on the
# optional field it would be reported as "at most N items".
ShortText = Annotated[str, StringConstraints(max_length=200), AfterValidator(_check_text)]
ReasonText = Annotated[str, StringConstraints(max_length=10_000), AfterValidator(_check_text)]


class _StoredText(_Strict, _FewErrors):
    """Bodies whose text goes into the comparison store."""

    @model_validator(mode="after")
    def _no_nul_characters(self):
        _no_nul(self.model_dump())
        return self


def labeller_id(value: str) -> str:
    """A labeller's id as the store keeps it, in a comparison's body and in the task queue's query
    alike: trimmed, and not blank (a blank id would hold a lease no comparison can carry)."""
    if not value.strip():
        raise ValueError("labeller is blank; send the labeller's id")
    return value.strip()


class ComparisonRequest(_StoredText):
    """A labeller's judgement of K responses to one prompt: a ``ranking`` (best first) or, for
    two responses, a pairwise ``choice`` (the index of the better one)."""

    prompt: Prompt = Field(description="The prompt: plain text or chat messages.")
    responses: list[Text] = Field(description=f"The K candidate responses (2 <= K <= {MAX_COMPARISON_RESPONSES}), none empty.")
    ranking: list[StrictInt] | None = Field(
        default=None, description="Indices into responses, best first: a permutation of 0..K-1."
    )
    choice: StrictInt | None = Field(default=None, description="Pairwise (K = 2): the index (0 or 1) of the better response.")
    labeller: Text = Field(min_length=1, max_length=200, description="Who judged (an id the operator knows).")
    category: ShortText | None = Field(default=None, description="E.g. helpfulness, harmlessness.")
    tags: list[Text] = Field(default_factory=list, max_length=MAX_TAGS, description="Free labels for filtering.")
    reason: ReasonText | None = Field(default=None, description="The labeller's free-text reason.")
    task_id: StrictInt | None = Field(
        default=None, ge=1, le=MAX_ID, description="The label task this answers (from /v1/label/tasks/next)."
    )

    _prompt = field_validator("prompt")(_check_prompt)
    _responses = field_validator("responses")(_check_responses)

    _labeller = field_validator("labeller")(labeller_id)

    @field_validator("tags")
    @classmethod
    def _tags_short(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if not t.strip() or len(t) > 100]
        if bad:
            raise ValueError(f"tag {bad[0]!r} is blank or over 100 characters")
        return value

    @model_validator(mode="after")
    def _one_judgement(self) -> "ComparisonRequest":
        k = len(self.responses)
        if (self.ranking is None) == (self.choice is None):
            raise ValueError("send either ranking (indices best first) or choice (pairwise: index of the better of two), not both or neither")
        if self.choice is not None:
            if k != 2:
                raise ValueError(f"choice is for two responses; with {k} send a ranking (indices best first)")
            if self.choice not in (0, 1):
                raise ValueError(f"choice must be 0 or 1 (the index of the better response), got {self.choice}")
        elif sorted(self.ranking) != list(range(k)):
            raise ValueError(
                f"ranking {self.ranking} is not a permutation of 0..{k - 1}: list every response index exactly once, best first"
            )
        return self

    def best_first(self) -> list[int]:
        if self.ranking is not None:
            return list(self.ranking)
        return [self.choice, 1 - self.choice]


class ComparisonCreated(BaseModel):
    id: int
    created_at: datetime
    duplicate: bool = Field(description="True when this Idempotency-Key was already stored: the original is returned.")


class Comparison(BaseModel):
    id: int
    created_at: datetime
    labeller: str
    prompt: Union[str, list[Message]]
    responses: list[str]
    ranking: list[int] = Field(description="Best first (a pairwise choice c is stored as [c, 1 - c]).")
    kind: Literal["ranking", "pairwise"]
    category: str | None = None
    tags: list[str] = Field(default_factory=list)
    reason: str | None = None
    task_id: int | None = None


class ComparisonList(BaseModel):
    data: list[Comparison]
    next_after: int | None = Field(description="Pass as ?after= for the next page; null on the last page.")


class LabelTaskRequest(_StoredText):
    prompt: Prompt
    responses: list[Text] = Field(description="The candidates a person will rank (2 to 16, none empty).")
    category: ShortText | None = None
    source: ShortText | None = Field(default=None, description="Who queued it, e.g. 'ppo step 120'.")

    _prompt = field_validator("prompt")(_check_prompt)
    _responses = field_validator("responses")(_check_responses)


class LabelTasksRequest(_Strict, _FewErrors):
    tasks: list[LabelTaskRequest] = Field(min_length=1, description="Tasks to queue, at least one.")


class LabelTasksCreated(BaseModel):
    ids: list[int]


class LabelTask(BaseModel):
    id: int
    created_at: datetime
    prompt: Union[str, list[Message]]
    responses: list[str]
    category: str | None = None
    source: str | None = None


class NextLabelTask(BaseModel):
    task: LabelTask | None = Field(description="The task to label, leased to this labeller; null when the queue is empty.")
    waiting: int = Field(description="Open tasks in the queue, this one included.")
