"""The whole wire protocol of the reward service, as pydantic v2 models.

One module, like vLLM's ``protocol.py``: the server validates requests with these models and
the client builds them, so both sides agree by construction. Everything here is plain data;
nothing imports torch or the service.

Versioned under ``/v1``:

- ``POST /v1/score``    ScoreRequest   -> ScoreResponse
- ``POST /v1/compare``  CompareRequest -> CompareResponse
- ``GET  /v1/models``   -> ModelList
- errors                -> ErrorResponse (every 4xx/5xx)
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

API_VERSION = "v1"

Role = Literal["system", "user", "assistant", "tool"]


class _Strict(BaseModel):
    # Unknown fields are an error, not silently ignored: a typo such as "respone" must be
    # reported to the caller instead of scoring an item with a missing field.
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Role
    content: str


class PromptResponseItem(_Strict):
    """A prompt (plain text or chat messages) and the response to score."""

    prompt: Union[str, list[Message]] = Field(
        description="The prompt: plain text, or the chat messages that precede the response."
    )
    response: str = Field(description="The assistant response to score.")

    @model_validator(mode="after")
    def _prompt_messages_not_empty(self) -> "PromptResponseItem":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty message list; give at least one message or a string")
        return self


class MessagesItem(_Strict):
    """A whole conversation; its last message is the assistant turn to score."""

    messages: list[Message] = Field(
        min_length=1, description="The conversation, ending with the assistant turn to score."
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


class ScoreRequest(_Strict):
    model: str | None = Field(default=None, description="Model name; the server's default when omitted.")
    items: list[ScoreItem] = Field(min_length=1, description="Items to score, at least one.")
    normalize: bool = Field(
        default=False,
        description="Return (reward - mean) / std using the statistics the model was trained with.",
    )


class Usage(BaseModel):
    items: int = Field(description="Items scored.")
    tokens: int = Field(description="Tokens fed to the model, after truncation.")
    truncated: int = Field(description="Items whose input was cut to the model's max length.")


class ScoreResponse(BaseModel):
    model: str = Field(description="The model that scored, as name@version.")
    scores: list[float] = Field(description="One reward per item, in item order.")
    usage: Usage


class ComparePair(_Strict):
    prompt: Union[str, list[Message]]
    a: str = Field(description="First response.")
    b: str = Field(description="Second response.")

    @model_validator(mode="after")
    def _prompt_messages_not_empty(self) -> "ComparePair":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty message list; give at least one message or a string")
        return self


class CompareRequest(_Strict):
    model: str | None = None
    pairs: list[ComparePair] = Field(min_length=1, description="Pairs to compare, at least one.")


class CompareResult(BaseModel):
    reward_a: float
    reward_b: float
    p_a_better: float = Field(description="sigmoid(reward_a - reward_b): the Bradley-Terry probability.")


class CompareResponse(BaseModel):
    model: str
    results: list[CompareResult]
    usage: Usage


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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

