"""What a chat turn and an API job share on the worker: streaming through the output filters,
serving down the routed targets (reply caches, then the model), deciding what became of the
answer, and settling its cost and metrics.

`chat.generation` (turns) and `chat.api.generation` (jobs) differ in how the prompt is built and
where the answer goes; everything here is the same for both.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections

from chat.knowledge.retrieval import Passage
from chat.reply_cache import ReplyCache
from chat.review import answer_review_may_hold
from genai_site.config_cache import config_cached
from governance.budgets import budget_settle
from governance.review_policies import PolicyMatch
from governance.safety.base import Action
from governance.safety.pipeline import Pipeline, Verdict
from models_admin import metrics
from models_admin.backends import Backend, Prompt
from models_admin.engine import GenerationResult, SamplingParams
from models_admin.models import Deployment, ModelVersion
from models_admin.resilience import Served, serve_resilient
from models_admin.routing import route_targets

# How often a generation looks at its stop key (a person's Stop, a cancelled job).
STOP_CHECK_SECONDS = 0.2


class StreamPublisher:
    """Pushes the answer so far to its reader in small batches, through the output filters.

    Every batch is checked before it is sent, so no text reaches the page unfiltered. A batch
    the policy redacts is sent redacted; one it blocks or holds is not sent at all: the trip is
    kept, `cancelled` turns true, and the engine stops at its next step.
    """

    def __init__(self, guard: Pipeline, send: Callable[[str, int], None], stop: str):
        # `send(text_so_far, tokens)` delivers a checked batch; `stop` is the cache key whose
        # presence asks generation to end.
        self.guard = guard
        self.send = send
        self.stop = stop
        self.text = ""
        self.tokens = 0
        self.last_flush = 0.0
        self.flushed_text = ""
        self.trip: Verdict | None = None
        self.stopped = False
        self.last_stop_check = -STOP_CHECK_SECONDS
        # Off when a review policy may hold the answer: the text is checked, not shown.
        self.live = True

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
        if self.live:
            self.send(verdict.text, self.tokens)
        self.flushed_text = self.text
        self.last_flush = time.monotonic()

    def verdict(self, text: str) -> Verdict:
        """The verdict on the finished answer: the trip that stopped it, or a last check."""
        return self.trip if self.trip is not None else self.guard.run(text)

    def cancelled(self) -> bool:
        # The engine asks after every batch of tokens; the stop key is read at most every
        # STOP_CHECK_SECONDS (each read costs about 0.2 ms of CPU: with 8 streams, reading it
        # on every step took several percent of the CPU's time). A trip stops at once.
        if self.trip is not None or self.stopped:
            return True
        now = time.monotonic()
        if now - self.last_stop_check >= STOP_CHECK_SECONDS:
            self.last_stop_check = now
            self.stopped = cache.get(self.stop) is not None
        return self.stopped


@dataclass(frozen=True)
class Prepared:
    """One target's request: the prompt, sampling and reply cache to answer it with, or an
    answer that needs no model (a grounded turn with no matching passage)."""

    prompt: Prompt | None = None
    params: SamplingParams | None = None
    reply_cache: ReplyCache | None = None
    passages: list[Passage] = field(default_factory=list)
    answer: GenerationResult | None = None


def serve_routed(
    *,
    deployment: Deployment | None,
    chosen: ModelVersion,
    publisher: StreamPublisher,
    prepare: Callable[[ModelVersion, Backend], Prepared],
) -> Served:
    """Answer from the routed version or, when it cannot, down the deployment's fallback chain
    (`serve_resilient`). Per target: `prepare` builds the request with that target's tokenizer
    and settings; nothing is streamed when a review policy could hold the answer; the reply
    caches answer before the model does."""
    targets = route_targets(deployment=deployment, version=chosen) if deployment else [chosen]
    deployment_id = deployment.pk if deployment is not None else None

    def run(
        target: ModelVersion,
        backend: Backend,
        on_text: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> GenerationResult:
        prepared = prepare(target, backend)
        publisher.live = not answer_review_may_hold(
            deployment_id=deployment_id,
            model_version_id=target.pk,
            passages=prepared.passages,
            canary=deployment_is_canary(deployment, target),
        )
        if prepared.answer is not None:
            return prepared.answer
        assert prepared.prompt and prepared.params and prepared.reply_cache
        # No transaction is open while the model runs; a broken or too old connection is
        # dropped here rather than found broken at settle time.
        close_old_connections()
        cached = prepared.reply_cache.lookup(prepared.prompt.ids)
        if cached is not None:
            result, text = cached
            on_text(text)
            return result
        started = time.perf_counter()
        result = backend.generate(
            prepared.prompt, prepared.params, on_text=on_text, cancelled=cancelled
        )
        result.model_seconds = time.perf_counter() - started
        prepared.reply_cache.store(result)
        return result

    return serve_resilient(
        targets=targets,
        run=run,
        on_text=publisher.on_text,
        cancelled=publisher.cancelled,
        hedge_after_ms=deployment.hedge_after_ms if deployment else None,
    )


def deployment_for(*, deployment_id: int | None, alias: str) -> Deployment | None:
    """The deployment routing chose (its id travels with the task); tasks queued before
    routing named one carry no id, and the alias still says which."""

    def read() -> Deployment | None:
        deployments = Deployment.objects.select_related("shadow_version")
        deployment = deployments.filter(pk=deployment_id).first() if deployment_id else None
        return deployment or deployments.filter(alias=alias).first()

    return config_cached(("deployment_for", deployment_id, alias), read)


def deployment_is_canary(
    deployment: Deployment | None, version: ModelVersion | None
) -> bool | None:
    """Whether the answer came from the deployment's canary version (None: no deployment)."""
    if deployment is None or version is None:
        return None
    return deployment.canary_version_id is not None and deployment.canary_version_id == version.pk


class Fate:
    """What became of a finished answer, before it is saved (each caller maps these onto its
    own statuses)."""

    COMPLETE = "complete"
    BLOCKED = "blocked"
    HELD = "held"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    fate: str
    # What the reader may see: the filtered answer, the held text kept for the reviewer, or "".
    content: str
    error: str
    verdict: Verdict
    # The review policy that holds (or samples) the answer, when one does.
    review: PolicyMatch | None = None

    @property
    def safety_held(self) -> bool:
        return self.verdict.action == Action.HOLD


def outcome_decide(
    *,
    publisher: StreamPublisher,
    result: GenerationResult,
    review_match: Callable[[], PolicyMatch | None],
) -> Outcome:
    """The output filters' last word on the answer, then (for an answer that passed them) the
    review policies'. `review_match` is asked only for a complete answer."""
    verdict = publisher.verdict(result.text)
    if verdict.action == Action.BLOCK:
        error = f"This answer was stopped by the safety filter: {verdict.reason}."
        return Outcome(Fate.BLOCKED, "", error, verdict)
    if verdict.action == Action.HOLD:
        # The full text is kept for the reviewer; the reader never sees it until approved.
        return Outcome(Fate.HELD, result.text, f"Held for review: {verdict.reason}.", verdict)
    if result.finish_reason == "cancelled":
        return Outcome(Fate.CANCELLED, verdict.text, "", verdict)
    review = review_match()
    if review is not None and not review.deliver_now:
        error = f"Held for review: {review.reason}."
        return Outcome(Fate.HELD, verdict.text, error, verdict, review)
    return Outcome(Fate.COMPLETE, verdict.text, "", verdict, review)


def usage_observe(*, alias: str, version: object, outcome: str, result: GenerationResult) -> None:
    """The serving metrics of one answer; the figures saved with it are these same ones."""
    metrics.generation_observe(
        deployment=alias,
        version=str(version),
        outcome="cached" if result.cache and outcome == Fate.COMPLETE else outcome,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        time_to_first_token_s=result.time_to_first_token_s,
        tokens_per_second=result.tokens_per_second,
        queue_wait_s=result.queue_wait_s,
    )


def usage_settle(
    *, reservation_id: int | None, prompt_tokens: int, completion_tokens: int, cache: str
) -> Decimal | None:
    """Charge the answer's tokens against its reservation; an answer from a response cache
    (`cache` names it) spent no model time and is not charged. Call inside the transaction
    that saves the answer."""
    if not reservation_id:
        return None
    return budget_settle(
        reservation_id=reservation_id,
        input_tokens=0 if cache else prompt_tokens,
        output_tokens=0 if cache else completion_tokens,
    )
