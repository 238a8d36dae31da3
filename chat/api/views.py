"""The /v1 API: OpenAI-compatible chat completions, embeddings and models, and async jobs.

Schema and code are one: django-ninja builds `/v1/openapi.json` and `/v1/docs` from these
operations and the bodies in `schemas.py`. Views parse, call one service or selector, and
answer; every error leaves as OpenAI's error object.
"""

import base64
import logging
import re
import struct
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import OperationalError, close_old_connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from ninja import NinjaAPI, Status
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer

from chat.api.errors import ApiError, invalid_request, too_large, unauthorized
from chat.api.presenters import completion_body, job_body, job_error
from chat.api.schemas import (
    ChatCompletionIn,
    ChatCompletionOut,
    EmbeddingListOut,
    EmbeddingsIn,
    ErrorOut,
    JobOut,
    ModelListOut,
    ModelOut,
)
from chat.api.selectors import model_get, models_for_key
from chat.api.services import (
    embeddings_create,
    job_cancel,
    job_get_for_key,
    job_submit,
    scope_require,
)
from chat.api.streams import completion_chunks, job_event_stream, job_wait
from chat.models import Job
from governance.api_keys import ApiKeyInvalid, api_key_authenticate_async
from governance.models import ApiKey

logger = logging.getLogger(__name__)


class ApiKeyBearer(HttpBearer):
    """`Authorization: Bearer gsk_...`. Oversized bodies are refused here, before they are
    read and parsed."""

    def __call__(self, request: HttpRequest) -> ApiKey | None:
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > settings.API_MAX_REQUEST_BYTES:
            raise too_large(
                f"The request body is {length:,} bytes; the limit is "
                f"{settings.API_MAX_REQUEST_BYTES:,}."
            )
        if not request.headers.get("Authorization"):
            raise unauthorized("Send your API key as 'Authorization: Bearer gsk_...'.")
        return super().__call__(request)  # type: ignore[no-any-return]

    # ninja awaits the check in async views and runs it to completion in sync ones.
    is_async = True

    async def authenticate(self, request: HttpRequest, token: str) -> ApiKey:
        try:
            return await api_key_authenticate_async(raw=token)
        except ApiKeyInvalid as exc:
            raise unauthorized(str(exc)) from exc


api = NinjaAPI(
    title="genai-site API",
    version="1",
    description="OpenAI-compatible chat completions, embeddings and models, and async jobs.",
    urls_namespace="v1",
    auth=ApiKeyBearer(),
)

_UNION_MEMBER = re.compile(r".*\[.*\]|str|int|float|bool|none")
ERRORS: dict[int, Any] = {code: ErrorOut for code in (400, 401, 403, 404, 413, 429, 503)}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def _error_response(request: HttpRequest, error: ApiError) -> HttpResponse:
    response = api.create_response(request, error.body(), status=error.status)
    if error.retry_after is not None:
        response["Retry-After"] = str(error.retry_after)
    return response


@api.exception_handler(ApiError)
def _api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return _error_response(request, exc)


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    first = exc.errors[0] if exc.errors else {}
    # Pydantic names the union member that failed in the location ("str", "function-after[
    # ...]", "list[TextPart]"): the program needs the field's path alone.
    loc = [
        str(p)
        for p in first.get("loc", ())
        if p not in ("body", "payload") and not _UNION_MEMBER.fullmatch(str(p))
    ]
    where = ".".join(loc)
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else "Invalid request."
    return _error_response(request, invalid_request(message, param=where or None))


@api.exception_handler(AuthenticationError)
def _auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return _error_response(request, unauthorized("Invalid or missing API key."))


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    status = exc.status_code if 400 <= exc.status_code < 500 else 400
    return _error_response(request, ApiError(status, str(exc)))


@api.exception_handler(OperationalError)
def _database_unavailable(request: HttpRequest, exc: OperationalError) -> HttpResponse:
    # PostgreSQL out of reach or out of connections (every connection of the pool taken for
    # DATABASE_POOL_TIMEOUT, or refused: "too many clients"), or a transaction it rolled back
    # (a deadlock): the program may try again in a moment, as after a 429.
    logger.warning("Database unavailable for %s %s: %s", request.method, request.path, exc)
    return _error_response(
        request,
        ApiError(
            503,
            "The service is overloaded or its database is unavailable; try again shortly.",
            type="server_error",
            code="service_unavailable",
            retry_after=2,
        ),
    )


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    logger.exception("Unexpected error in %s %s", request.method, request.path)
    return api.create_response(
        request,
        {
            "error": {
                "message": "The server could not handle this request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        status=500,
    )


def _ip(request: HttpRequest) -> str | None:
    return request.META.get("REMOTE_ADDR")


def _event_stream(chunks: Any) -> StreamingHttpResponse:
    response = StreamingHttpResponse(chunks, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def _submit_and_release(
    *, api_key: ApiKey, body: dict[str, Any], ip: str | None, progress: bool
) -> Job:
    """Queue the job, then give this thread's database connection back to the pool: the
    request now waits on the model, which can take minutes, and needs none."""
    try:
        return job_submit(api_key=api_key, body=body, ip=ip, progress=progress)
    finally:
        close_old_connections()


@api.post(
    "/chat/completions",
    response={200: ChatCompletionOut, 202: JobOut, **ERRORS},
    openapi_extra={"responses": {200: {"content": _SSE}}},
    summary="Create a chat completion",
)
async def chat_completions(request: HttpRequest, body: ChatCompletionIn) -> Any:
    """`stream: true` answers with Server-Sent Events in OpenAI's chunk format, ending with
    `data: [DONE]`. A non-streamed call waits for the answer; when the answer is held for
    review (or takes longer than the server waits), it answers 202 with the job instead."""
    api_key: ApiKey = request.auth  # type: ignore[attr-defined]
    job = await sync_to_async(_submit_and_release)(
        api_key=api_key, body=body.model_dump(), ip=_ip(request), progress=bool(body.stream)
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _event_stream(completion_chunks(job, api_key=api_key, include_usage=include_usage))
    try:
        job, model_seconds = await job_wait(job)
    except OperationalError as exc:
        # The job is queued and will run: a 503 now would have the program (the openai SDK
        # retries one by itself) queue and pay for the same completion again. It gets the job
        # to follow instead, as when the answer takes longer than the server waits.
        logger.warning("Database unavailable while %s was awaited: %s", job.public_id, exc)
        return Status(202, job_body(job))
    # Reported in the answer's Server-Timing header (genai_site.api_handler).
    request.model_seconds = model_seconds  # type: ignore[attr-defined]
    if job.status in (Job.Status.COMPLETED, Job.Status.CANCELLED):
        return Status(200, completion_body(job))
    if job.status == Job.Status.FAILED:
        raise job_error(job)
    return Status(202, job_body(job))


@api.post("/jobs", response={202: JobOut, **ERRORS}, summary="Queue a chat completion")
def jobs_create(request: HttpRequest, body: ChatCompletionIn) -> Any:
    """Takes a chat-completion body (`stream` is ignored) and answers at once with the job."""
    api_key: ApiKey = request.auth  # type: ignore[attr-defined]
    job = job_submit(api_key=api_key, body=body.model_dump(), ip=_ip(request))
    return Status(202, job_body(job))


@api.get("/jobs/{job_id}", response={200: JobOut, **ERRORS}, summary="A job and its result")
def jobs_get(request: HttpRequest, job_id: str) -> Any:
    api_key: ApiKey = request.auth  # type: ignore[attr-defined]
    return job_body(job_get_for_key(api_key=api_key, public_id=job_id))


@api.get(
    "/jobs/{job_id}/events",
    response={200: None, **ERRORS},
    openapi_extra={"responses": {200: {"description": "Server-Sent Events", "content": _SSE}}},
    summary="A job's progress as Server-Sent Events",
)
async def jobs_events(request: HttpRequest, job_id: str) -> Any:
    """Events `state`, `delta` (new answer text) and, last, `end` carrying the job object. A
    job made by a non-streamed chat completion (one that answered 202) reports only its `end`."""
    api_key: ApiKey = request.auth  # type: ignore[attr-defined]
    job = await sync_to_async(job_get_for_key)(api_key=api_key, public_id=job_id)
    return _event_stream(job_event_stream(job))


@api.post("/jobs/{job_id}/cancel", response={200: JobOut, **ERRORS}, summary="Cancel a job")
def jobs_cancel(request: HttpRequest, job_id: str) -> Any:
    api_key: ApiKey = request.auth  # type: ignore[attr-defined]
    return job_body(job_cancel(api_key=api_key, public_id=job_id, ip=_ip(request)))


@api.get("/models", response={200: ModelListOut, **ERRORS}, summary="Models this key may use")
def models_list(request: HttpRequest) -> Any:
    api_key: ApiKey = request.auth  # type: ignore[attr-defined]
    scope_require(api_key=api_key, scope=ApiKey.Scope.MODELS)
    return {"object": "list", "data": models_for_key(api_key=api_key)}


@api.get("/models/{model_id}", response={200: ModelOut, **ERRORS}, summary="One model")
def models_get(request: HttpRequest, model_id: str) -> Any:
    api_key: ApiKey = request.auth  # type: ignore[attr-defined]
    scope_require(api_key=api_key, scope=ApiKey.Scope.MODELS)
    return model_get(api_key=api_key, model_id=model_id)


def _encode(vector: list[float], encoding: str | None) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@api.post("/embeddings", response={200: EmbeddingListOut, **ERRORS}, summary="Embed texts")
async def embeddings(request: HttpRequest, body: EmbeddingsIn) -> Any:
    api_key: ApiKey = request.auth  # type: ignore[attr-defined]
    texts = [body.input] if isinstance(body.input, str) else body.input
    if body.dimensions is not None and body.dimensions != settings.EMBEDDING_DIMENSIONS:
        raise invalid_request(
            f"The embedding model gives {settings.EMBEDDING_DIMENSIONS} dimensions.",
            param="dimensions",
        )
    # The model runs off the event loop, and off the thread that serves the ORM calls.
    vectors, tokens = await sync_to_async(embeddings_create, thread_sensitive=False)(
        api_key=api_key, model=body.model, texts=texts, ip=_ip(request)
    )
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
