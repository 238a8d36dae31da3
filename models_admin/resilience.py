"""Serving one request from an ordered list of versions, surviving the failures of some.

For each target in order: skipped if archived or its circuit breaker is open; otherwise tried,
with its own timeouts (first token, total), and retried with exponential backoff and jitter while
its errors say they are retryable and nothing has reached the caller yet. A target that fails
for good counts against its breaker and the next one is tried. When a deployment hedges and both
the current and the next target are remote, the next one is also asked once the first token is
late; the first to produce a token wins and the other is cancelled.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import connection
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from models_admin.backends import Backend, backend_for
from models_admin.breaker import (
    Pass,
    breaker_allow,
    breaker_record_failure,
    breaker_record_success,
)
from models_admin.engine import EngineError, GenerationResult
from models_admin.models import ModelVersion

logger = logging.getLogger(__name__)

# run(version, backend, on_text, cancelled) -> result: the caller's request against one target.
Run = Callable[[ModelVersion, Backend, Callable[[str], None], Callable[[], bool]], GenerationResult]


class AllTargetsFailed(EngineError):
    """No version could answer; the message says what was tried, for the person waiting."""


class _TimedOut(EngineError):
    pass


@dataclass
class Served:
    result: GenerationResult
    version: ModelVersion
    # What happened to each target, in order: {"version": id, "outcome": ..., "error": ...}.
    attempts: list[dict[str, Any]] = field(default_factory=list)
    # From the first try to the answer's end, retries and fallbacks included.
    latency_s: float = 0.0


class _Attempt:
    """Callbacks for one try: forwards text, and cancels on the caller's stop or a timeout."""

    def __init__(
        self,
        version: ModelVersion,
        on_text: Callable[[str], None],
        cancelled: Callable[[], bool],
        *,
        gate: Callable[["_Attempt"], bool] | None = None,
    ):
        self.version = version
        self._on_text = on_text
        self._cancelled = cancelled
        self._gate = gate
        self.started = time.monotonic()
        self.first_text_at: float | None = None
        self.timed_out = ""
        self.lost = False

    def on_text(self, delta: str) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.monotonic()
        if self._gate is not None and not self._gate(self):
            self.lost = True
            return
        self._on_text(delta)

    def cancelled(self) -> bool:
        if self.lost or self._cancelled():
            return True
        elapsed = time.monotonic() - self.started
        if self.first_text_at is None and elapsed > self.version.first_token_timeout_s:
            self.timed_out = f"no first token after {self.version.first_token_timeout_s:g}s"
        elif elapsed > self.version.total_timeout_s:
            self.timed_out = f"not finished after {self.version.total_timeout_s:g}s"
        return bool(self.timed_out)

    @property
    def emitted(self) -> bool:
        return self.first_text_at is not None


def _try_once(run: Run, version: ModelVersion, attempt: _Attempt) -> GenerationResult:
    backend = backend_for(version)
    result = run(version, backend, attempt.on_text, attempt.cancelled)
    if attempt.timed_out:
        raise _TimedOut(f"{version} timed out: {attempt.timed_out}", retryable=True)
    return result


def _try_target(
    run: Run,
    version: ModelVersion,
    on_text: Callable[[str], None],
    cancelled: Callable[[], bool],
    gate: Callable[[_Attempt], bool] | None = None,
) -> GenerationResult:
    """One target with its retries. Raises the last EngineError when it gives up."""
    attempts: list[_Attempt] = []

    def worth_retrying(exc: BaseException) -> bool:
        # Once text has reached the person, a retry would show them a second answer.
        return (
            isinstance(exc, EngineError)
            and exc.retryable
            and not attempts[-1].emitted
            and not cancelled()
        )

    retrying = Retrying(
        stop=stop_after_attempt(version.max_retries + 1),
        wait=wait_random_exponential(multiplier=version.retry_backoff_s, max=30),
        retry=retry_if_exception(worth_retrying),
        reraise=True,
        before_sleep=before_sleep_log(logger, logging.WARNING),
    )
    for try_ in retrying:
        with try_:
            attempt = _Attempt(version, on_text, cancelled, gate=gate)
            attempts.append(attempt)
            try:
                return _try_once(run, version, attempt)
            except Exception as exc:
                # Every failed call counts against the breaker, retries included.
                breaker_record_failure(version_id=version.pk, threshold=version.breaker_failures)
                if isinstance(exc, EngineError):
                    raise
                raise EngineError(f"{version} failed: {exc}") from exc
    raise AssertionError("tenacity re-raises the last error")


def _available(version: ModelVersion, attempts: list[dict[str, Any]], clean: set[int]) -> bool:
    """May `version` be asked? Those whose breaker is closed with no failure counted go into
    `clean`: their success need not be recorded."""
    if not version.can_serve:
        attempts.append({"version": version.pk, "outcome": "archived"})
        return False
    allowed = breaker_allow(version_id=version.pk, cooldown_s=version.breaker_cooldown_s)
    if not allowed:
        attempts.append({"version": version.pk, "outcome": "breaker open"})
        return False
    if allowed == Pass.CLEAN:
        clean.add(version.pk)
    return True


def _succeeded(version: ModelVersion, clean: set[int]) -> None:
    if version.pk not in clean:
        breaker_record_success(version_id=version.pk)


def serve_resilient(
    *,
    targets: list[ModelVersion],
    run: Run,
    on_text: Callable[[str], None],
    cancelled: Callable[[], bool],
    hedge_after_ms: int | None = None,
) -> Served:
    """Answer from the first target that can; raises AllTargetsFailed when none could."""
    attempts: list[dict[str, Any]] = []
    sent: list[bool] = []
    started = time.monotonic()

    def forward(delta: str) -> None:
        if not sent:
            sent.append(True)
        on_text(delta)

    clean: set[int] = set()
    queue = [v for v in targets if _available(v, attempts, clean)]
    while queue:
        version = queue.pop(0)
        hedge = queue[0] if queue and hedge_after_ms is not None else None
        if hedge is not None and _remote(version) and _remote(hedge):
            outcome = _serve_hedged(
                version, hedge, run, forward, cancelled, hedge_after_ms or 0, clean
            )
            attempts.extend(outcome.attempts)
            if outcome.hedged:
                queue.pop(0)
            if outcome.result is not None:
                return Served(outcome.result, outcome.version, attempts, time.monotonic() - started)
        else:
            try:
                result = _try_target(run, version, forward, cancelled)
            except EngineError as exc:
                logger.warning("%s could not answer: %s", version, exc)
                attempts.append({"version": version.pk, "outcome": "failed", "error": str(exc)})
            else:
                _succeeded(version, clean)
                attempts.append({"version": version.pk, "outcome": "served"})
                return Served(result, version, attempts, time.monotonic() - started)
        if sent or cancelled():
            # Part of an answer is on the person's screen (or they stopped it): another model
            # must not continue it.
            raise EngineError(f"{version} failed in the middle of its answer.")
    tried = "; ".join(_describe(targets, a) for a in attempts)
    raise AllTargetsFailed(
        "No model could answer right now"
        + (f" ({tried})" if tried else "")
        + ". Your message is saved: select Retry to try again."
    )


def _remote(version: ModelVersion) -> bool:
    return version.backend == ModelVersion.Backend.OPENAI_COMPATIBLE


def _describe(targets: list[ModelVersion], attempt: dict[str, Any]) -> str:
    label = next((str(v) for v in targets if v.pk == attempt["version"]), attempt["version"])
    error = str(attempt.get("error", ""))
    return f"{label}: {attempt['outcome']}" + (f", {error[:300]}" if error else "")


@dataclass
class _HedgeOutcome:
    result: GenerationResult | None
    version: ModelVersion
    attempts: list[dict[str, Any]]
    hedged: bool


def _serve_hedged(
    first: ModelVersion,
    second: ModelVersion,
    run: Run,
    on_text: Callable[[str], None],
    cancelled: Callable[[], bool],
    delay_ms: int,
    clean: set[int],
) -> _HedgeOutcome:
    """`first`, and `second` too if `first` has no token after `delay_ms`; first token wins.

    The loser sees `cancelled()` turn true and stops at its next event; nobody waits for it.
    """
    lock = threading.Lock()
    winner: list[ModelVersion] = []
    done: dict[int, GenerationResult | EngineError] = {}
    finished = threading.Condition()

    def gate(attempt: _Attempt) -> bool:
        with lock:
            if not winner:
                winner.append(attempt.version)
            return winner[0].pk == attempt.version.pk

    def work(version: ModelVersion) -> None:
        outcome: GenerationResult | EngineError
        try:
            outcome = _try_target(run, version, on_text, cancelled, gate=gate)
        except EngineError as exc:
            outcome = exc
        finally:
            connection.close()  # this thread's own connection, if the request used one
        with finished:
            done[version.pk] = outcome
            finished.notify_all()

    def settled(started: list[ModelVersion]) -> bool:
        if winner and winner[0].pk in done:
            return True
        return all(v.pk in done for v in started)

    started = [first]
    threading.Thread(target=work, args=(first,), name="hedge-first", daemon=True).start()
    with finished:
        finished.wait_for(lambda: bool(winner) or first.pk in done, timeout=delay_ms / 1000)
        hedged = not winner and first.pk not in done
    if hedged:
        logger.info("%s has no first token after %d ms; also asking %s", first, delay_ms, second)
        started.append(second)
        threading.Thread(target=work, args=(second,), name="hedge-second", daemon=True).start()
    with finished:
        finished.wait_for(lambda: settled(started))
    attempts: list[dict[str, Any]] = []
    result: GenerationResult | None = None
    served = first
    for version in started:
        outcome = done.get(version.pk)
        lost = bool(winner) and winner[0].pk != version.pk
        if lost:
            attempts.append({"version": version.pk, "outcome": "cancelled (hedge lost)"})
        elif isinstance(outcome, GenerationResult):
            result, served = outcome, version
            _succeeded(version, clean)
            attempts.append({"version": version.pk, "outcome": "served"})
        else:
            attempts.append({"version": version.pk, "outcome": "failed", "error": str(outcome)})
    return _HedgeOutcome(result, served, attempts, hedged)
