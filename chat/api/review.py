"""API jobs in the review queue: a held job waits for a reviewer like a held chat answer.

A job's answer is held by a safety filter or by a review policy (the same policies as chat
answers: deployment approval, canary check, low confidence, samples); the queue item points at
it by its public id.
A decision completes the job (approved or edited text) or fails it with the reviewer's message
for the user, and the job's event stream tells a waiting program at once.
"""

from functools import partial
from typing import Any

from django.db import transaction

from chat.api.events import job_event_publish
from chat.models import Job
from chat.reply_cache import job_cache_withdraw
from governance.models import ReviewItem, SafetyHold
from governance.review_policies import PolicyMatch
from governance.review_queue import review_item_queue_answer
from governance.review_targets import ReviewContext

TARGET = "job"


def job_review_queue(
    *,
    job: Job,
    text: str,
    deployment_id: int | None,
    match: PolicyMatch | None,
    safety_hold: SafetyHold | None,
    mean_logprob: float | None,
) -> ReviewItem:
    """Queue a held (or sampled) job's answer; call inside the transaction that settles it."""
    return review_item_queue_answer(
        match=match,
        safety_hold=safety_hold,
        target_type=TARGET,
        target_id=job.public_id,
        text=text,
        user_id=job.user_id,
        deployment_id=deployment_id,
        model_version_id=job.model_version_id,
        mean_logprob=mean_logprob,
    )


class JobReviewTarget:
    """Renders a job for the reviewer: the program's messages, then the held answer."""

    def render_context(self, item: ReviewItem) -> ReviewContext:
        job = Job.objects.select_related("user").filter(public_id=item.target_id).first()
        if job is None:
            return ReviewContext(text=item.original_text)
        history = [
            (str(m.get("role", "")), str(m.get("content", "")))
            for m in job.request.get("messages", [])
        ]
        return ReviewContext(
            history=history,
            text=item.original_text,
            owner=job.user,
            extra={"job_id": job.public_id},
        )


def job_review_decision_apply(sender: object, item: ReviewItem, **kwargs: Any) -> None:
    """Receiver of `review_decided` for jobs: complete or fail the held job, and say so."""
    if item.target_type != TARGET:
        return
    if item.status == ReviewItem.Status.REJECTED:
        # Also a sampled answer, delivered before review: it is not served again.
        job_cache_withdraw(public_id=item.target_id)
    job = (
        Job.objects.select_for_update()
        .filter(public_id=item.target_id, status=Job.Status.HELD_FOR_REVIEW)
        .first()
    )
    if job is None:
        return
    Status = ReviewItem.Status
    if item.status == Status.REJECTED:
        job.status, job.content, job.finish_reason = Job.Status.FAILED, "", "content_filter"
        job.error = item.user_message or "The answer was rejected by a reviewer."
        job.error_code = "rejected_by_review"
    elif item.status == Status.EDITED:
        job.status, job.content, job.finish_reason = Job.Status.COMPLETED, item.final_text, "stop"
        job.error = "Edited by a reviewer."
    elif item.status in (Status.APPROVED, Status.RELEASED):
        job.status, job.finish_reason, job.error = Job.Status.COMPLETED, "stop", ""
    else:
        return
    job.save(update_fields=["status", "content", "finish_reason", "error", "error_code"])
    event: dict[str, Any] = {"type": "end", "status": str(job.status)}
    event.update(
        {"finish_reason": job.finish_reason}
        if job.status == Job.Status.COMPLETED
        else {"error": job.error, "code": job.error_code}
    )
    transaction.on_commit(partial(job_event_publish, job.public_id, event))
