from typing import Any

from celery import shared_task
from django.db import OperationalError

from chat.generation import reply_generate
from chat.knowledge.ingestion import document_ingest, documents_requeue_stale
from chat.privacy import conversations_purge_expired, documents_purge_expired

# PostgreSQL out of reach or out of connections for a moment (or a lock it gave up waiting for):
# a generation task is sent again after 1, 2, 4 ... 30 s, rather than failing and leaving its
# turn pending or its job queued with no task. A run that had begun is met as after a
# redelivery: a turn is failed and offered for Retry, a job is taken over.
_RETRY_ON_DATABASE_ERROR: dict[str, Any] = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "max_retries": 10,
}


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    **_RETRY_ON_DATABASE_ERROR,
)
def generate_reply(
    self: Any, message_id: int, attempt: int, deployment_id: int | None = None
) -> None:
    reply_generate(
        message_id=message_id,
        attempt=attempt,
        deployment_id=deployment_id,
        retried=self.request.retries > 0,
    )


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def ingest_document(document_id: int, generation: int) -> None:
    document_ingest(document_id=document_id, generation=generation)


@shared_task(ignore_result=True)
def requeue_stale_ingestions() -> int:
    """Celery beat: queue again the documents whose ingesting worker died (lease expired)."""
    return documents_requeue_stale()


@shared_task(ignore_result=True)
def reap_stale_turns() -> int:
    """Celery beat: fail the chat answers whose worker died mid-answer (lease lapsed)."""
    from chat.services import turns_reap_stale

    return turns_reap_stale()


@shared_task(ignore_result=True)
def purge_expired_data() -> dict[str, int]:
    """The retention purge (Celery beat): conversations, and knowledge base documents."""
    return {
        "conversations": conversations_purge_expired(),
        "documents": documents_purge_expired(),
    }


@shared_task(ignore_result=True)
def requeue_stale_jobs() -> int:
    """Celery beat: queue again the /v1 jobs whose worker died mid-run (lease lapsed)."""
    from chat.api.generation import jobs_requeue_stale

    return jobs_requeue_stale()


@shared_task(
    acks_late=True, reject_on_worker_lost=True, ignore_result=True, **_RETRY_ON_DATABASE_ERROR
)
def generate_job(job_id: int, deployment_id: int | None = None, public_id: str = "") -> None:
    from chat.api.generation import job_generate

    job_generate(job_id=job_id, deployment_id=deployment_id, public_id=public_id)
