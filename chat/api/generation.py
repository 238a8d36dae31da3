"""The worker's side of a /v1 job: claim, generate through the shared engine, settle once.

Jobs run in the same worker processes and the same engine as chat turns, so the engine batches
them together. Like a turn, a job takes a heartbeat lease before it claims; unlike a turn, a
job whose worker died is run again: a program waiting on it has no Retry button. Celery beat
queues it again once the dead worker's lease has lapsed (`jobs_requeue_stale`), and the broker
would redeliver its task after the visibility timeout in any case (acks_late). Each claim bumps
`run`, and only the run that claimed last may settle, so the job completes once.

A caller waiting for the whole answer (a non-streamed completion) gets it as soon as the model
has answered: the run sends it in the same Redis call that checks that the run still holds the
job's lease, and the job's row, the budget, the audit and the commit follow, off the caller's
path. A run that has lost its lease sends nothing then: it sends the answer once it has taken
the job's row for its settle, or not at all. Should the worker stop before that commit, the run
that takes the job over (it must take the lease first) finds the answer in the job's event
stream and settles the job as the answer the caller received, without generating again.
"""

import logging
from decimal import Decimal
from functools import partial
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.utils import timezone

from chat.api.events import (
    job_answer_sent,
    job_end_event,
    job_event_publish,
    job_event_publish_leased,
    job_settled,
)
from chat.api.review import job_review_queue
from chat.api.services import enqueue_job, job_cancel_key, job_lease_key
from chat.leases import HeartbeatLease
from chat.models import Job
from chat.reply_cache import ReplyCache, job_cache_source, job_cache_withdraw
from chat.review import answer_review_match
from chat.serving import (
    Fate,
    Prepared,
    StreamPublisher,
    deployment_for,
    deployment_is_canary,
    outcome_decide,
    serve_routed,
    usage_observe,
    usage_settle,
)
from genai_site.config_cache import config_snapshot
from genai_site.rows import quote, row_columns, row_load, row_update
from governance.audit import audit_record
from governance.budgets import budget_release
from governance.holds import safety_hold_create
from governance.models import SafetyHold
from governance.safety.policy import safety_output_pipeline
from models_admin import metrics
from models_admin.backends import Backend, Prompt, backend_for
from models_admin.engine import EngineError, SamplingParams
from models_admin.models import Deployment, ModelVersion
from models_admin.resilience import Served
from models_admin.selectors import model_version_get
from models_admin.shadow import shadow_request

logger = logging.getLogger(__name__)


class _DeltaSender:
    """Turns "the checked answer so far" into the deltas a stream reader appends."""

    def __init__(self, public_id: str):
        self.public_id = public_id
        self.sent = ""

    def __call__(self, text: str, tokens: int) -> None:
        # Redaction can rewrite text already sent when a finding straddles two batches; a
        # delta cannot take text back, so the stream pauses and the settled answer has it right.
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return
        job_event_publish(self.public_id, {"type": "delta", "text": text[len(self.sent) :]})
        self.sent = text


def _no_delta(text: str, tokens: int) -> None:
    pass


_CLAIM_SQL = (
    f"UPDATE {quote(Job._meta.db_table)} SET status = %(running)s, run = run + 1, "
    "started_at = %(now)s WHERE id = %(id)s AND status IN (%(queued)s, %(running)s) "
    f"RETURNING {row_columns(Job)}"
)


def _claim(job_id: int) -> Job | None:
    """Take the job. Called holding its lease: a job still `running` has no live worker."""
    params: dict[str, Any] = {
        "id": job_id,
        "now": timezone.now(),
        "queued": Job.Status.QUEUED.value,
        "running": Job.Status.RUNNING.value,
    }
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, params)
        row = cursor.fetchone()
    if row is None:
        return None
    job = row_load(Job, row)
    if job.model_version_id is not None:
        job.model_version = model_version_get(pk=job.model_version_id)
    return job


@config_snapshot()
def job_generate(*, job_id: int, deployment_id: int | None = None, public_id: str = "") -> None:
    # Tasks queued before the public id travelled with them look it up.
    public_id = public_id or (
        Job.objects.filter(pk=job_id).values_list("public_id", flat=True).first() or ""
    )
    if not public_id:
        return
    with HeartbeatLease(
        key=job_lease_key(public_id), ttl_seconds=settings.CHAT_GENERATION_LEASE_SECONDS
    ) as lease:
        if not lease.held:
            logger.info("Job %s is being generated by another delivery", public_id)
            return
        job = _claim(job_id)
        if job is None:
            logger.info("Job %s is no longer waiting to run", public_id)
            return
        sent = None
        if job.run > 1 and not job.request.get("progress", True):
            sent = job_answer_sent(public_id)
        if sent is not None:
            _settle_sent(job, sent)
        else:
            _generate(job, deployment_id, lease)
    cache.delete(job_cancel_key(public_id))


def jobs_requeue_stale() -> int:
    """Queue again the jobs whose worker died while running them (their lease lapsed), rather
    than leave them until the broker's visibility timeout hands their task to another worker.
    The task it may still redeliver later finds the job taken or done and does nothing."""
    running = dict(
        Job.objects.filter(status=Job.Status.RUNNING).order_by().values_list("public_id", "pk")
    )
    live = cache.get_many([job_lease_key(public_id) for public_id in running])
    requeued = 0
    for public_id, pk in running.items():
        if job_lease_key(public_id) in live:
            continue
        with transaction.atomic():
            job = (
                Job.objects.select_for_update(skip_locked=True)
                .filter(pk=pk, status=Job.Status.RUNNING)
                .first()
            )
            # Checked again holding the row: a worker that took the job since holds the lease.
            if job is None or cache.get(job_lease_key(public_id)) is not None:
                continue
            deployment = deployment_for(deployment_id=None, alias=job.model_alias)
            if deployment is None:
                _fail(job, "The worker stopped, and the model's deployment is gone.", "")
                continue
            job.status = Job.Status.QUEUED
            job.save(update_fields=["status"])
            audit_record(
                actor=None,
                action="job.requeued",
                target_type="job",
                target_id=public_id,
                details={"run": job.run, "reason": "the worker running it stopped"},
            )
            if job.request.get("progress", True):
                transaction.on_commit(
                    partial(
                        job_event_publish,
                        public_id,
                        {"type": "state", "status": "queued", "run": job.run},
                    )
                )
            transaction.on_commit(partial(enqueue_job, job, deployment))
            requeued += 1
    if requeued:
        logger.warning("Queued again %d job(s) whose worker stopped", requeued)
    return requeued


def _fail(job: Job, reason: str, code: str) -> None:
    with transaction.atomic():
        won = Job.objects.filter(pk=job.pk, run=job.run, status=Job.Status.RUNNING).update(
            status=Job.Status.FAILED, error=reason, error_code=code, finished_at=timezone.now()
        )
        if not won:
            return
        if job.reservation_id:
            budget_release(reservation_id=job.reservation_id)
        audit_record(
            actor=None,
            action="job.failed",
            target_type="job",
            target_id=job.public_id,
            details={"run": job.run, "reason": reason},
        )
        transaction.on_commit(
            partial(
                job_event_publish,
                job.public_id,
                {"type": "end", "status": "failed", "error": reason, "code": code},
            )
        )


_STATUS = {
    Fate.COMPLETE: Job.Status.COMPLETED,
    # As OpenAI does: a completion whose finish_reason is "content_filter", with no text.
    Fate.BLOCKED: Job.Status.COMPLETED,
    Fate.HELD: Job.Status.HELD_FOR_REVIEW,
    Fate.CANCELLED: Job.Status.CANCELLED,
}


def _generate(job: Job, deployment_id: int | None, lease: HeartbeatLease) -> None:
    request = job.request
    # A caller waiting for the whole answer (a non-streamed completion) reads only the end.
    progress = request.get("progress", True)
    if progress:
        job_event_publish(job.public_id, {"type": "state", "status": "running", "run": job.run})
    chosen = version = job.model_version
    try:
        deployment = deployment_for(deployment_id=deployment_id, alias=job.model_alias)
        deployment_id = deployment.pk if deployment is not None else None
        publisher = StreamPublisher(
            safety_output_pipeline(deployment_id=deployment_id),
            _DeltaSender(job.public_id) if progress else _no_delta,
            job_cancel_key(job.public_id),
        )
        if chosen is None:
            raise EngineError("The job has no model version.")
        # A remote server checks its own window (and its tokens are only estimated here).
        backend = backend_for(chosen)
        chosen_ids = None if backend.remote else backend.encode_chat(request["messages"])
        prompt_tokens = len(chosen_ids) if chosen_ids is not None else 0
        if prompt_tokens + request["max_tokens"] > chosen.context_window:
            _fail(
                job,
                f"The messages take {prompt_tokens} tokens; with max_tokens "
                f"{request['max_tokens']} they do not fit in this model's context window of "
                f"{chosen.context_window} tokens.",
                "context_length_exceeded",
            )
            return
        params = SamplingParams(
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            top_p=request["top_p"],
            seed=request["seed"],
            stop=tuple(request["stop"]),
        )

        def prepare(target: ModelVersion, backend: Backend) -> Prepared:
            prompt_ids = (
                chosen_ids
                if chosen_ids is not None and target.pk == chosen.pk
                else backend.encode_chat(request["messages"])
            )
            reply_cache = ReplyCache.for_request(
                version=target,
                deployment=deployment,
                engine=backend,
                prompt_ids=prompt_ids,
                params=params,
                source_id=job_cache_source(job.public_id),
            )
            return Prepared(
                prompt=Prompt(ids=prompt_ids, messages=request["messages"]),
                params=params,
                reply_cache=reply_cache,
            )

        served = serve_routed(
            deployment=deployment, chosen=chosen, publisher=publisher, prepare=prepare
        )
        version = served.version
        publisher.flush()
    except Exception as exc:
        logger.exception("Job %s failed", job.public_id)
        metrics.generation_observe(
            deployment=job.model_alias, version=str(version), outcome="failed"
        )
        reason = str(exc) if isinstance(exc, EngineError) else "The model failed to answer."
        _fail(job, reason, "engine_error")
        return
    _settle(job, publisher, served, chosen, deployment, lease)


def _settle(
    job: Job,
    publisher: StreamPublisher,
    served: Served,
    chosen: ModelVersion,
    deployment: Deployment | None,
    lease: HeartbeatLease,
) -> None:
    result, version = served.result, served.version
    deployment_id = deployment.pk if deployment is not None else None
    outcome = outcome_decide(
        publisher=publisher,
        result=result,
        review_match=lambda: answer_review_match(
            deployment_id=deployment_id,
            model_version_id=version.pk,
            mean_logprob=result.mean_logprob,
            passages=[],
            canary=deployment_is_canary(deployment, version),
        ),
    )
    status = _STATUS[outcome.fate]
    finish_reason = {
        Fate.BLOCKED: "content_filter",
        Fate.HELD: "held_for_review",
    }.get(outcome.fate, result.finish_reason)
    usage_observe(alias=job.model_alias, version=version, outcome=outcome.fate, result=result)
    settled = {
        "status": status,
        "content": outcome.content,
        "error": outcome.error,
        "finish_reason": finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finished_at": timezone.now(),
    }
    # A caller waiting for the whole answer reads only the end event: it is sent now if this
    # run still holds the lease (no other run can have taken the job), else once the row is
    # this run's (locked by the update below); in either case before the books are written.
    answer = None
    if (
        not job.request.get("progress", True)
        and outcome.fate == Fate.COMPLETE
        and outcome.review is None
    ):
        answered = {"run": job.run, "model_version_id": version.pk, "cache": result.cache}
        answer = job_end_event(settled, answered=answered, model_seconds=result.model_seconds)
    sent = answer is not None and job_event_publish_leased(job.public_id, answer, lease=lease)
    with transaction.atomic():
        # Only if this run still holds the job: a redelivered task that claimed it since has
        # the last word. The version that answered: a fallback's, when the routed one could not.
        saved = row_update(
            Job,
            {**settled, "model_version_id": version.pk},
            id=job.pk,
            run=job.run,
            status=Job.Status.RUNNING,
        )
        if not saved:
            return
        if answer is not None and not sent:
            job_event_publish(job.public_id, answer)
        if outcome.fate in (Fate.HELD, Fate.BLOCKED):
            # The exact cache took the answer as the model gave it, before the filters and
            # the review policies had their say: an answer no caller may see is not reused.
            job_cache_withdraw(public_id=job.public_id)
        job.model_version = version
        hold_id = review_item_id = None
        hold = None
        if outcome.safety_held:
            hold = safety_hold_create(
                verdict=outcome.verdict,
                direction=SafetyHold.Direction.OUTPUT,
                target_type="job",
                target_id=job.public_id,
                deployment_id=deployment_id,
                user_id=job.user_id,
            )
            Job.objects.filter(pk=job.pk).update(safety_hold=hold)
            hold_id = hold.pk
        if status == Job.Status.HELD_FOR_REVIEW or outcome.review is not None:
            review_item_id = job_review_queue(
                job=job,
                text=outcome.content,
                deployment_id=deployment_id,
                match=outcome.review,
                safety_hold=hold,
                mean_logprob=result.mean_logprob,
            ).pk
        cost = usage_settle(
            reservation_id=job.reservation_id,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cache=result.cache,
        )
        _generated_audit(
            job,
            version,
            settled,
            cache=result.cache,
            cost=cost,
            **({"routed_to": str(chosen)} if version != chosen else {}),
            **({"targets": served.attempts} if len(served.attempts) > 1 else {}),
            **({"safety": outcome.verdict.summary()} if outcome.verdict.trips else {}),
            **({"hold": hold_id} if hold_id else {}),
            **({"review_item": review_item_id} if review_item_id else {}),
        )
        if deployment is not None and status == Job.Status.COMPLETED and not result.cache:
            shadow_request(
                deployment=deployment,
                request_ref=f"job:{job.public_id}",
                messages=job.request["messages"],
                primary_version=version,
                primary_answer=outcome.content,
                primary_latency_ms=served.latency_s * 1000,
                primary_ttft_ms=result.time_to_first_token_s * 1000,
            )
        if answer is None:
            end = job_end_event(settled, model_seconds=result.model_seconds)
            transaction.on_commit(partial(job_event_publish, job.public_id, end))


def _settle_sent(job: Job, end: dict[str, Any]) -> None:
    """Settle the job as the answer an earlier run sent its caller before that run's worker
    stopped: the row, the budget and the audit record what the caller received."""
    settled, answered = job_settled(end), end["answered"]
    assert settled is not None
    version = model_version_get(pk=answered["model_version_id"])
    with transaction.atomic():
        saved = row_update(
            Job,
            {**settled, "model_version_id": answered["model_version_id"]},
            id=job.pk,
            run=job.run,
            status=Job.Status.RUNNING,
        )
        if not saved:
            return
        cost = usage_settle(
            reservation_id=job.reservation_id,
            prompt_tokens=settled["prompt_tokens"],
            completion_tokens=settled["completion_tokens"],
            cache=answered["cache"],
        )
        _generated_audit(
            job,
            version,
            settled,
            cache=answered["cache"],
            cost=cost,
            answered_by_run=answered["run"],
        )
    logger.info("Job %s settled as the answer run %s sent", job.public_id, answered["run"])


def _generated_audit(
    job: Job,
    version: ModelVersion | None,
    settled: dict[str, Any],
    *,
    cache: str,
    cost: Decimal | None,
    **more: Any,
) -> None:
    """Audit `job.generated`: the answer a job settled with, what it cost, and `more`."""
    audit_record(
        actor=None,
        action="job.generated",
        target_type="job",
        target_id=job.public_id,
        details={
            "model_version": str(version),
            "run": job.run,
            "prompt_tokens": settled["prompt_tokens"],
            "completion_tokens": settled["completion_tokens"],
            "finish_reason": settled["finish_reason"],
            "cache": cache or None,
            **more,
            "cost": str(cost) if cost is not None else None,
        },
    )
