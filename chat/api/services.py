"""What a program asks through /v1: chat-completion jobs, cancelling them, embeddings.

Every request goes through the same controls as a chat turn: the key's scopes, routing, the
input safety filters, admission (rate limits, budgets) and the audit log. Views call only these
and the selectors beside them.
"""

import dataclasses
import re
import secrets
from dataclasses import dataclass
from functools import partial
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from chat.api.errors import (
    ApiError,
    forbidden,
    invalid_request,
    not_found,
    rate_limited,
    unauthorized,
    unavailable,
)
from chat.api.events import job_event_publish
from chat.models import Job
from genai_site.config_cache import config_snapshot
from genai_site.rows import row_insert
from governance.admission import Held, Refusal, turn_admit
from governance.api_keys import ApiKeyInvalid
from governance.audit import audit_record
from governance.budgets import budget_release, budget_settle
from governance.models import ApiKey
from governance.safety.base import Action
from governance.safety.pipeline import Verdict
from governance.safety.policy import safety_input_pipeline
from models_admin.models import Deployment
from models_admin.routing import DeploymentUnavailable, Route, route_choose

# The tokenizer lives in the worker; at admission a request is estimated from its characters,
# as chat turns are (chat.services): 3 per token errs on the side of reserving too much.
_CHARS_PER_TOKEN_ESTIMATE = 3
# ... and 6 per token is surely no more tokens than the text has: past the window even then,
# the request can be refused before it is queued.
_CHARS_PER_TOKEN_AT_MOST = 6
_MAX_STOP_SEQUENCES = 4
_JOB_ID = re.compile(r"job_[0-9a-f]{24}")


def job_cancel_key(public_id: str) -> str:
    return f"genai:job:cancel:{public_id}"


def job_lease_key(public_id: str) -> str:
    return f"genai:job:lease:{public_id}"


def scope_require(*, api_key: ApiKey, scope: str) -> None:
    if scope not in api_key.scopes:
        raise forbidden(f"API key {api_key.prefix} does not have the '{scope}' scope.")


def _route(*, api_key: ApiKey, body: dict[str, Any], prompt_chars: int) -> Route:
    """Where the request goes, as for a chat turn (tiers by prompt length, canary, archived
    versions, fallbacks). Canary stickiness follows the key and the end user it names."""
    alias = body["model"]
    model_allow(api_key=api_key, model=alias)
    try:
        return route_choose(
            alias=alias,
            sticky_key=f"api:{api_key.pk}:{body.get('user') or ''}",
            prompt_chars=prompt_chars,
        )
    except DeploymentUnavailable as exc:
        if not Deployment.objects.filter(alias=alias).exists():
            raise not_found(
                f"The model '{alias}' does not exist.", code="model_not_found", param="model"
            ) from exc
        raise unavailable(f"The model is not available: {exc}") from exc


def model_allow(*, api_key: ApiKey, model: str) -> None:
    if not api_key.may_use(model):
        raise forbidden(
            f"API key {api_key.prefix} may not use the model '{model}'.",
            code="model_not_allowed",
            param="model",
        )


def _text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Screened:
    messages: list[dict[str, str]]
    verdict: Verdict | None


def _screen(messages: list[dict[str, str]], deployment_id: int | None) -> _Screened:
    """Every message through the input filters; the strongest verdict decides admission."""
    pipeline = safety_input_pipeline(deployment_id=deployment_id)
    out: list[dict[str, str]] = []
    deciding: Verdict | None = None
    for message in messages:
        verdict = pipeline.run(message["content"])
        out.append({"role": message["role"], "content": verdict.text})
        if deciding is None or verdict.action.rank > deciding.action.rank:
            deciding = verdict
    return _Screened(out, deciding if deciding and deciding.action != Action.OFF else None)


def _refusal_error(refusal: Refusal) -> ApiError:
    if refusal.limit == "safety":
        return invalid_request(refusal.reason, code="content_filter", param="messages")
    if refusal.limit == "rate_limiter_unavailable":
        return unavailable(refusal.reason, retry_after=refusal.retry_after or 5)
    # Budgets (per day or month) are quotas; per-minute buckets are rate limits.
    quota = refusal.limit.endswith(("_per_day", "_per_month"))
    return rate_limited(refusal.reason, retry_after=refusal.retry_after, quota=quota)


@config_snapshot()
def job_submit(
    *, api_key: ApiKey, body: dict[str, Any], ip: str | None = None, progress: bool = True
) -> Job:
    """Admit one chat completion and queue it on its deployment's queue.

    `progress=False` is for a caller that waits for the whole answer: the worker then reports
    only the job's end, not its state and each new piece of text (nobody would read them).

    Raises ApiError for a request that cannot run; a refusal by a limit or a filter is still
    recorded (the job row, failed, and the audit event) before the error goes back.
    """
    scope_require(api_key=api_key, scope=ApiKey.Scope.CHAT)
    asked = [
        {
            "role": "system" if m["role"] == "developer" else m["role"],
            "content": _text(m["content"]),
        }
        for m in body["messages"]
    ]
    route = _route(
        api_key=api_key,
        body=body,
        prompt_chars=sum(len(m["content"]) for m in asked if m["role"] != "system"),
    )
    deployment, version = route.deployment, route.version
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    # The version's limit is the operator's: a larger request is served up to it.
    max_tokens = min(requested or version.max_output_tokens, version.max_output_tokens)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > _MAX_STOP_SEQUENCES or any(not s for s in stops):
        raise invalid_request(
            f"'stop' takes at most {_MAX_STOP_SEQUENCES} non-empty strings.", param="stop"
        )
    messages = list(asked)
    if not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": version.system_prompt})
    chars = sum(len(m["content"]) for m in messages)
    if chars // _CHARS_PER_TOKEN_AT_MOST + max_tokens > version.context_window:
        raise invalid_request(
            f"This model's context window is {version.context_window} tokens; the messages "
            f"and max_tokens ({max_tokens}) do not fit in it.",
            param="messages",
            code="context_length_exceeded",
        )
    screened = _screen(messages, deployment.pk)
    request = {
        "messages": screened.messages,
        "max_tokens": max_tokens,
        "temperature": body.get("temperature")
        if body.get("temperature") is not None
        else version.temperature,
        "top_p": body.get("top_p") if body.get("top_p") is not None else version.top_p,
        "seed": body.get("seed"),
        "stop": stops,
        "user": body.get("user") or "",
        "progress": progress,
    }
    error: ApiError | None = None
    job = Job(
        public_id=f"job_{secrets.token_hex(12)}",
        user=api_key.user,
        api_key=api_key,
        model_alias=body["model"],
        model_version=version,
        request=request,
    )
    with transaction.atomic():
        # Admitted first, so that the row is written once, as the decision left it.
        try:
            admission = turn_admit(
                user=api_key.user,
                api_key=api_key,
                input_tokens=min(chars // _CHARS_PER_TOKEN_ESTIMATE, version.context_window),
                max_output_tokens=max_tokens,
                model_version=version,
                target_type="job",
                target_id=job.public_id,
                ip=ip,
                verdict=screened.verdict,
                deployment_id=deployment.pk,
            )
        except ApiKeyInvalid as exc:
            raise unauthorized(str(exc)) from exc
        if isinstance(admission, Held):
            job.status = Job.Status.HELD_FOR_REVIEW
            job.safety_hold = admission.hold
            job.error = admission.reason
            job.finished_at = timezone.now()
        elif isinstance(admission, Refusal):
            error = _refusal_error(admission)
            job.status = Job.Status.FAILED
            job.error, job.error_code = admission.reason, error.code or ""
            job.finished_at = timezone.now()
        else:
            job.reservation = admission
        row_insert(job)
        if job.status == Job.Status.QUEUED:
            transaction.on_commit(partial(enqueue_job, job, deployment))
    if error is not None:
        raise error
    return job


def enqueue_job(job: Job, deployment: Deployment) -> None:
    from chat.tasks import generate_job

    generate_job.apply_async(args=(job.pk, deployment.pk, job.public_id), queue=deployment.queue)


def job_get_for_key(*, api_key: ApiKey, public_id: str) -> Job:
    """The job, if it belongs to the key's owner; anyone else is told it does not exist."""
    job = None
    if _JOB_ID.fullmatch(public_id):
        job = Job.objects.filter(public_id=public_id, user_id=api_key.user_id).first()
    if job is None:
        raise not_found(f"No job '{public_id[:60]}'.")
    return job


def job_cancel(*, api_key: ApiKey, public_id: str, ip: str | None = None) -> Job:
    """Cancel a job: a queued one at once; a running one stops at the engine's next step and
    keeps its partial answer. A finished job is left as it is."""
    scope_require(api_key=api_key, scope=ApiKey.Scope.CHAT)
    job = job_get_for_key(api_key=api_key, public_id=public_id)
    if job.is_final:
        return job
    cache.set(job_cancel_key(job.public_id), 1, timeout=3600)
    with transaction.atomic():
        won = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).update(
            status=Job.Status.CANCELLED, finish_reason="cancelled", finished_at=timezone.now()
        )
        if won and job.reservation_id:
            budget_release(reservation_id=job.reservation_id)
        audit_record(
            actor=api_key.user,
            action="job.cancel_requested",
            target_type="job",
            target_id=job.public_id,
            details={"api_key": api_key.prefix, "was": job.status},
            ip=ip,
        )
        if won:
            transaction.on_commit(
                partial(
                    job_event_publish,
                    job.public_id,
                    {"type": "end", "status": "cancelled", "finish_reason": "cancelled"},
                )
            )
    job.refresh_from_db()
    return job


def embeddings_create(
    *, api_key: ApiKey, model: str, texts: list[str], ip: str | None = None
) -> tuple[list[list[float]], int]:
    """Vectors for `texts` from the platform's embedding model, admitted and settled like any
    request. Returns the vectors and the tokens they took."""
    from models_admin.embeddings import (
        EMBEDDING_MAX_TOKENS,
        embed_texts,
        embedding_tokenizer,
        embedding_tokenizer_lock,
    )

    scope_require(api_key=api_key, scope=ApiKey.Scope.EMBEDDINGS)
    model_allow(api_key=api_key, model=model)
    if model != settings.EMBEDDING_MODEL_ID:
        raise not_found(
            f"The embedding model is '{settings.EMBEDDING_MODEL_ID}', not '{model}'.",
            code="model_not_found",
            param="model",
        )
    if not texts or any(not t for t in texts):
        raise invalid_request("'input' must be a non-empty string or list of them.", param="input")
    if len(texts) > settings.API_MAX_EMBEDDING_INPUTS:
        raise invalid_request(
            f"'input' takes at most {settings.API_MAX_EMBEDDING_INPUTS} texts.", param="input"
        )
    # The input filters see every text (redactions apply to what is embedded). Nobody waits on
    # a held embedding, so a filter that would hold refuses instead.
    screened = _screen([{"role": "user", "content": t} for t in texts], None)
    texts = [m["content"] for m in screened.messages]
    verdict = screened.verdict
    if verdict is not None and verdict.action == Action.HOLD:
        verdict = dataclasses.replace(
            verdict,
            action=Action.BLOCK,
            trips=tuple(
                dataclasses.replace(t, action=Action.BLOCK) if t.action == Action.HOLD else t
                for t in verdict.trips
            ),
        )
    estimate = min(sum(len(t) for t in texts) // _CHARS_PER_TOKEN_ESTIMATE + len(texts), 10**9)
    with transaction.atomic():
        try:
            admission = turn_admit(
                user=api_key.user,
                api_key=api_key,
                input_tokens=estimate,
                max_output_tokens=0,
                target_type="embeddings",
                target_id=model,
                ip=ip,
                verdict=verdict,
            )
        except ApiKeyInvalid as exc:
            raise unauthorized(str(exc)) from exc
    if isinstance(admission, Refusal):
        raise _refusal_error(admission)
    assert not isinstance(admission, Held)
    try:
        tokenizer = embedding_tokenizer()
        with embedding_tokenizer_lock():
            counts = [min(len(tokenizer.encode(t)), EMBEDDING_MAX_TOKENS) for t in texts]
        # Exact fp32: a program's vector of a text must not depend on the other inputs.
        vectors = embed_texts(texts, backend="torch")
    except Exception:
        budget_release(reservation_id=admission.pk)
        raise
    with transaction.atomic():
        budget_settle(reservation_id=admission.pk, input_tokens=sum(counts), output_tokens=0)
    return vectors, sum(counts)
