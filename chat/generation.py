"""The worker's side of a turn: claim, build context, stream from the engine, settle.

Database work happens in short transactions before and after the model call, never across it.
"""

import logging
import threading
import time
from functools import partial

from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, transaction
from django.utils import timezone

from chat import live
from chat.context import context_build_grounded
from chat.knowledge.citations import citations_store
from chat.models import Message
from chat.reply_cache import ReplyCache
from chat.services import answer_fail, lease_key, stop_key
from governance.audit import audit_record
from governance.budgets import budget_settle
from governance.holds import safety_hold_create
from governance.models import SafetyHold
from governance.safety.base import Action
from governance.safety.pipeline import Pipeline, Verdict
from governance.safety.policy import safety_output_pipeline
from models_admin import metrics
from models_admin.engine import EngineError, GenerationResult, SamplingParams, engine_get
from models_admin.models import Deployment
from models_admin.store import artifact_dir

logger = logging.getLogger(__name__)


class _Lease:
    """Says "this answer is being worked on" in Redis for as long as the worker lives.

    A heartbeat thread renews it, so waiting for the model to load or for the engine is covered
    too; when the process dies the key expires and the turn can be reaped as failed.
    """

    def __init__(self, message_id: int):
        self.key = lease_key(message_id)
        self.ttl = settings.CHAT_GENERATION_LEASE_SECONDS
        self.held = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._done.wait(self.ttl / 4):
            cache.set(self.key, 1, timeout=self.ttl)

    def __enter__(self) -> "_Lease":
        # add() only succeeds when no live delivery holds the lease.
        self.held = cache.add(self.key, 1, timeout=self.ttl)
        if self.held:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self._done.set()
            self._thread.join()
            cache.delete(self.key)


class _StreamPublisher:
    """Pushes the answer so far to the page in small batches, through the output filters.

    Every batch is checked before it is sent, so no text reaches the page unfiltered. A batch
    the policy redacts is sent redacted; one it blocks or holds is not sent at all: the trip is
    kept, `cancelled` turns true, and the engine stops at its next step.
    """

    def __init__(self, answer: Message, guard: Pipeline):
        self.answer = answer
        self.guard = guard
        self.text = ""
        self.tokens = 0
        self.last_flush = 0.0
        self.flushed_text = ""
        self.trip: Verdict | None = None

    def on_text(self, delta: str) -> None:
        self.text += delta
        self.tokens += 1
        if time.monotonic() - self.last_flush >= settings.CHAT_STREAM_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.trip is not None or self.text == self.flushed_text:
            return
        verdict = self.guard.run(self.text)
        if verdict.stops:
            self.trip = verdict
            return
        live.live_tokens(self.answer.conversation_id, self.answer.pk, verdict.text, self.tokens)
        self.flushed_text = self.text
        self.last_flush = time.monotonic()

    def verdict(self, text: str) -> Verdict:
        """The verdict on the finished answer: the trip that stopped it, or a last check."""
        return self.trip if self.trip is not None else self.guard.run(text)

    def cancelled(self) -> bool:
        return self.trip is not None or cache.get(stop_key(self.answer.pk)) is not None


def _claim(message_id: int, attempt: int) -> Message | None:
    """Take the turn: only one delivery of one attempt ever generates it.

    Called holding the lease, so no other delivery of this message is alive right now.
    """
    won = Message.objects.filter(
        pk=message_id, attempt=attempt, status=Message.Status.PENDING
    ).update(status=Message.Status.STREAMING)
    answer = Message.objects.select_related("model_version", "conversation").get(pk=message_id)
    if won:
        return answer
    if answer.attempt == attempt and answer.status == Message.Status.STREAMING:
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
    # The lease is taken before the claim, so no reaper ever sees a claimed turn without one.
    with _Lease(message_id) as lease:
        if not lease.held:
            logger.info("Answer %s is being generated by another delivery", message_id)
            return
        answer = _claim(message_id, attempt)
        if answer is None:
            logger.info("Answer %s attempt %s is not ours to generate", message_id, attempt)
            return
        _generate(answer, attempt)
    cache.delete(stop_key(message_id))


def _generate(answer: Message, attempt: int) -> None:
    message_id = answer.pk
    transaction.on_commit(partial(live.live_message_changed, answer.conversation_id, answer.pk))
    version = answer.model_version
    try:
        deployment = Deployment.objects.filter(alias=answer.conversation.model_alias).first()
        deployment_id = deployment.pk if deployment is not None else None
        publisher = _StreamPublisher(answer, safety_output_pipeline(deployment_id=deployment_id))
        if version is None:
            raise EngineError("The answer has no model version.")
        engine = engine_get(
            directory=artifact_dir(version.artifact_path),
            sha256=version.sha256,
            context_window=version.context_window,
        )
        built = context_build_grounded(answer=answer, version=version, engine=engine)
        if built.no_match_answer is not None:
            result = GenerationResult(
                text=built.no_match_answer,
                prompt_tokens=0,
                completion_tokens=0,
                finish_reason="no_match",
                time_to_first_token_s=0.0,
                tokens_per_second=0.0,
            )
        else:
            params = SamplingParams(
                max_tokens=version.max_output_tokens,
                temperature=version.temperature,
                top_p=version.top_p,
            )
            cache = ReplyCache.for_turn(
                answer=answer,
                version=version,
                deployment=deployment,
                engine=engine,
                prompt_ids=built.prompt_ids,
                params=params,
            )
            # No connection is held while the model runs.
            close_old_connections()
            cached = cache.lookup(built.prompt_ids)
            if cached is not None:
                result, text = cached
                publisher.on_text(text)
            else:
                result = engine.generate(
                    built.prompt_ids,
                    params,
                    on_text=publisher.on_text,
                    cancelled=publisher.cancelled,
                )
                cache.store(result)
            publisher.flush()
    except Exception as exc:
        logger.exception("Generation of answer %s failed", message_id)
        metrics.generation_observe(
            deployment=answer.conversation.model_alias, version=str(version), outcome="failed"
        )
        reason = str(exc) if isinstance(exc, EngineError) else "The model failed to answer."
        answer_fail(
            message_id=message_id,
            attempt=attempt,
            reason=reason,
            from_status=Message.Status.STREAMING,
        )
        return

    verdict = publisher.verdict(result.text)
    content, error = verdict.text, ""
    if verdict.action == Action.BLOCK:
        status = Message.Status.BLOCKED
        content, error = "", f"This answer was stopped by the safety filter: {verdict.reason}."
    elif verdict.action == Action.HOLD:
        # The full text is kept for the reviewer; the page never shows it.
        status = Message.Status.HELD
        content, error = result.text, f"Held for review: {verdict.reason}."
    elif result.finish_reason == "cancelled":
        status = Message.Status.STOPPED
    else:
        status = Message.Status.COMPLETE
    # The figures saved on the message below are these same measurements.
    metrics.generation_observe(
        deployment=answer.conversation.model_alias,
        version=str(version),
        outcome="cached" if result.cache and status == Message.Status.COMPLETE else str(status),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        time_to_first_token_s=result.time_to_first_token_s,
        tokens_per_second=result.tokens_per_second,
        queue_wait_s=result.queue_wait_s,
    )
    with transaction.atomic():
        won = Message.objects.filter(
            pk=message_id, attempt=attempt, status=Message.Status.STREAMING
        ).update(
            status=status,
            content=content,
            error=error,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            time_to_first_token_ms=result.time_to_first_token_s * 1000,
            tokens_per_second=result.tokens_per_second,
            finished_at=timezone.now(),
        )
        if not won:
            return
        hold_id = None
        if status == Message.Status.HELD:
            hold = safety_hold_create(
                verdict=verdict,
                direction=SafetyHold.Direction.OUTPUT,
                target_type="message",
                target_id=message_id,
                deployment_id=deployment_id,
                user_id=answer.conversation.user_id,
            )
            Message.objects.filter(pk=message_id).update(safety_hold=hold)
            hold_id = hold.pk
        citations_store(message_id=message_id, passages=built.passages)
        cost = None
        if answer.reservation_id:
            cost = budget_settle(
                reservation_id=answer.reservation_id,
                # A cached answer spent no model time; it is not charged.
                input_tokens=0 if result.cache else result.prompt_tokens,
                output_tokens=0 if result.cache else result.completion_tokens,
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
                "finish_reason": "safety" if verdict.stops else result.finish_reason,
                "cache": result.cache or None,
                **({"safety": verdict.summary()} if verdict.trips else {}),
                **({"hold": hold_id} if hold_id else {}),
                "cited_chunks": [p.chunk_id for p in built.passages],
                "cost": str(cost) if cost is not None else None,
            },
        )
        transaction.on_commit(partial(live.live_message_changed, answer.conversation_id, answer.pk))
