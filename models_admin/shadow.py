"""Shadow answers: a copy of a request, answered in the background by another version, stored
for comparison and never delivered to anyone."""

import logging
import time
from functools import partial

from django.db import close_old_connections, transaction
from django.utils import timezone

from models_admin.backends import Prompt, backend_for
from models_admin.engine import SamplingParams
from models_admin.models import Deployment, ModelVersion, ShadowAnswer

logger = logging.getLogger(__name__)


def shadow_request(
    *,
    deployment: Deployment,
    request_ref: str,
    messages: list[dict[str, str]],
    primary_version: ModelVersion,
    primary_answer: str,
    primary_latency_ms: float | None,
    primary_ttft_ms: float | None,
) -> ShadowAnswer | None:
    """Store the request for the deployment's shadow and queue its answer (after commit)."""
    shadow = deployment.shadow_version
    if shadow is None or not shadow.can_serve or not messages:
        return None
    row = ShadowAnswer.objects.create(
        deployment=deployment,
        version=shadow,
        request_ref=request_ref,
        messages=messages,
        max_tokens=shadow.max_output_tokens,
        primary_version=primary_version,
        primary_answer=primary_answer,
        primary_latency_ms=primary_latency_ms,
        primary_ttft_ms=primary_ttft_ms,
    )
    transaction.on_commit(partial(_enqueue, row.pk, deployment.queue))
    return row


def _enqueue(shadow_id: int, queue: str) -> None:
    from models_admin.tasks import answer_shadow

    answer_shadow.apply_async(args=(shadow_id,), queue=queue)


def shadow_answer(*, shadow_id: int) -> None:
    """Generate a stored shadow request once (a conditional update claims it)."""
    claimed = ShadowAnswer.objects.filter(
        pk=shadow_id, status=ShadowAnswer.Status.PENDING, finished_at__isnull=True
    ).update(finished_at=timezone.now())
    if not claimed:
        return
    row = ShadowAnswer.objects.select_related("version__model").get(pk=shadow_id)
    version = row.version
    close_old_connections()  # no connection is held while the model runs
    started = time.perf_counter()
    try:
        backend = backend_for(version)
        ids = backend.encode_chat(row.messages)
        result = backend.generate(
            Prompt(ids=ids, messages=row.messages),
            SamplingParams(
                max_tokens=row.max_tokens, temperature=version.temperature, top_p=version.top_p
            ),
        )
    except Exception as exc:
        logger.warning("Shadow answer %s failed: %s", shadow_id, exc)
        ShadowAnswer.objects.filter(pk=shadow_id).update(
            status=ShadowAnswer.Status.FAILED, error=str(exc)[:2000], finished_at=timezone.now()
        )
        return
    ShadowAnswer.objects.filter(pk=shadow_id).update(
        status=ShadowAnswer.Status.COMPLETE,
        answer=result.text,
        latency_ms=(time.perf_counter() - started) * 1000,
        ttft_ms=result.time_to_first_token_s * 1000,
        completion_tokens=result.completion_tokens,
        finished_at=timezone.now(),
    )
