"""The worker's side of a turn: claim, build context, stream from the engine, settle.

Database work happens in short transactions before and after the model call, never across it.
"""

import logging
import time
from functools import partial

from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, transaction
from django.utils import timezone

from chat import live
from chat.context import context_build
from chat.models import Message
from chat.services import answer_fail, lease_key, stop_key
from governance.audit import audit_record
from governance.quotas import quota_settle
from models_admin.engine import EngineError, SamplingParams, engine_get
from models_admin.store import artifact_dir

logger = logging.getLogger(__name__)


class _StreamPublisher:
    """Pushes the answer so far to the page in small batches, and keeps the lease alive."""

    def __init__(self, answer: Message):
        self.answer = answer
        self.text = ""
        self.tokens = 0
        self.last_flush = 0.0
        self.last_lease = time.monotonic()
        self.flushed_text = ""

    def on_text(self, delta: str) -> None:
        self.text += delta
        self.tokens += 1
        if time.monotonic() - self.last_flush >= settings.CHAT_STREAM_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.text == self.flushed_text:
            return
        live.live_tokens(self.answer.conversation_id, self.answer.pk, self.text, self.tokens)
        self.flushed_text = self.text
        self.last_flush = time.monotonic()

    def cancelled(self) -> bool:
        now = time.monotonic()
        if now - self.last_lease > settings.CHAT_GENERATION_LEASE_SECONDS / 4:
            cache.set(lease_key(self.answer.pk), 1, timeout=settings.CHAT_GENERATION_LEASE_SECONDS)
            self.last_lease = now
        return cache.get(stop_key(self.answer.pk)) is not None


def _claim(message_id: int, attempt: int) -> Message | None:
    """Take the turn: only one delivery of one attempt ever generates it."""
    won = Message.objects.filter(
        pk=message_id, attempt=attempt, status=Message.Status.PENDING
    ).update(status=Message.Status.STREAMING)
    answer = Message.objects.select_related("model_version", "conversation").get(pk=message_id)
    if won:
        cache.set(lease_key(message_id), 1, timeout=settings.CHAT_GENERATION_LEASE_SECONDS)
        return answer
    if (
        answer.attempt == attempt
        and answer.status == Message.Status.STREAMING
        and cache.get(lease_key(message_id)) is None
    ):
        # A redelivery (acks_late) of a task whose worker died mid-answer: the turn is failed
        # and offered for retry rather than answered a second time behind the user's back.
        answer_fail(
            message_id=message_id,
            attempt=attempt,
            reason="The worker stopped in the middle of this answer.",
            from_status=Message.Status.STREAMING,
        )
    return None


def reply_generate(*, message_id: int, attempt: int) -> None:
    answer = _claim(message_id, attempt)
    if answer is None:
        logger.info("Answer %s attempt %s is not ours to generate; skipping", message_id, attempt)
        return
    transaction.on_commit(partial(live.live_message_changed, answer.conversation_id, answer.pk))
    version = answer.model_version
    publisher = _StreamPublisher(answer)
    try:
        if version is None:
            raise EngineError("The answer has no model version.")
        engine = engine_get(directory=artifact_dir(version.artifact_path), sha256=version.sha256)
        prompt_ids = context_build(answer=answer, version=version, engine=engine)
        params = SamplingParams(
            max_tokens=version.max_output_tokens,
            temperature=version.temperature,
            top_p=version.top_p,
        )
        # No connection is held while the model runs.
        close_old_connections()
        result = engine.generate(
            prompt_ids, params, on_text=publisher.on_text, cancelled=publisher.cancelled
        )
        publisher.flush()
    except Exception as exc:
        logger.exception("Generation of answer %s failed", message_id)
        reason = str(exc) if isinstance(exc, EngineError) else "The model failed to answer."
        answer_fail(
            message_id=message_id,
            attempt=attempt,
            reason=reason,
            from_status=Message.Status.STREAMING,
        )
        return
    finally:
        cache.delete(lease_key(message_id))

    stopped = result.finish_reason == "cancelled"
    with transaction.atomic():
        won = Message.objects.filter(
            pk=message_id, attempt=attempt, status=Message.Status.STREAMING
        ).update(
            status=Message.Status.STOPPED if stopped else Message.Status.COMPLETE,
            content=result.text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            time_to_first_token_ms=result.time_to_first_token_s * 1000,
            tokens_per_second=result.tokens_per_second,
            finished_at=timezone.now(),
        )
        if not won:
            return
        if answer.reservation_id:
            quota_settle(
                reservation_id=answer.reservation_id,
                tokens_used=result.prompt_tokens + result.completion_tokens,
            )
        audit_record(
            actor=None,
            action="turn.generated",
            target_type="message",
            target_id=message_id,
            details={
                "model_version": str(version),
                "attempt": attempt,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "finish_reason": result.finish_reason,
            },
        )
        transaction.on_commit(partial(live.live_message_changed, answer.conversation_id, answer.pk))
    cache.delete(stop_key(message_id))
