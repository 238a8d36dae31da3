"""Request and response bodies of the /v1 API, following OpenAI's; the OpenAPI schema is
generated from these. Unknown request fields are ignored, as OpenAI does."""

from typing import Annotated, Literal

from ninja import Schema
from pydantic import AfterValidator, Field

from chat.text import text_unstorable_reason


def _storable(text: str) -> str:
    reason = text_unstorable_reason(text)
    if reason is not None:
        raise ValueError(f"the text {reason}")
    return text


# The pattern puts the rule in the OpenAPI schema; the validator gives the clear message.
Text = Annotated[
    str, AfterValidator(_storable), Field(json_schema_extra={"pattern": "^[^\\x00]*$"})
]


class ErrorBody(Schema):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorOut(Schema):
    error: ErrorBody


class TextPart(Schema):
    type: Literal["text"]
    text: Text


class ChatMessageIn(Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class StreamOptions(Schema):
    include_usage: bool | None = None


class ChatCompletionIn(Schema):
    model: Text = Field(min_length=1, max_length=100)
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: (
        Annotated[Text, Field(min_length=1)]
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=4)]
        | None
    ) = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: Text | None = Field(default=None, max_length=256)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(Schema):
    role: Literal["assistant"]
    content: str | None


class ChoiceOut(Schema):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionOut(Schema):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChoiceOut]
    usage: Usage | None = None


class JobOut(Schema):
    id: str
    object: Literal["job"]
    status: Literal["queued", "running", "held_for_review", "completed", "failed", "cancelled"]
    model: str
    created_at: int
    finished_at: int | None = None
    result: ChatCompletionOut | None = None
    error: ErrorBody | None = None


class ModelOut(Schema):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelListOut(Schema):
    object: Literal["list"]
    data: list[ModelOut]


class EmbeddingsIn(Schema):
    model: Text = Field(min_length=1, max_length=100)
    input: (
        Annotated[Text, Field(min_length=1)]
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=256)]
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=384, le=384)
    user: Text | None = Field(default=None, max_length=256)


class EmbeddingOut(Schema):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(Schema):
    prompt_tokens: int
    total_tokens: int


class EmbeddingListOut(Schema):
    object: Literal["list"]
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsage
