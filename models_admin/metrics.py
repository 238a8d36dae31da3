"""Serving metrics in Prometheus form, shared by web and worker processes.

Workers and web processes are separate; with PROMETHEUS_MULTIPROC_DIR set (the launcher sets
it) every process writes its samples there and `/metrics` merges them. The chat's per-message
figures (time to first token, tokens per second) are the same numbers observed here.
"""

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_ROUTE = ("deployment", "version")

TIME_TO_FIRST_TOKEN = Histogram(
    "genai_time_to_first_token_seconds",
    "From the request reaching the engine to its first token.",
    _ROUTE,
    buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "genai_time_per_output_token_seconds",
    "Mean time between output tokens of one answer.",
    _ROUTE,
    buckets=(0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1),
)
TOKENS_PER_SECOND = Histogram(
    "genai_tokens_per_second",
    "Decoding speed of one answer.",
    _ROUTE,
    buckets=(1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 500, 1000),
)
QUEUE_WAIT = Histogram(
    "genai_queue_wait_seconds",
    "From the turn being enqueued to the engine starting on it (broker plus engine queue).",
    _ROUTE,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
OUTPUT_TOKENS = Counter("genai_output_tokens", "Tokens generated.", _ROUTE)
PROMPT_TOKENS = Counter("genai_prompt_tokens", "Prompt tokens processed.", _ROUTE)
ANSWERS = Counter("genai_answers", "Answers by how they ended.", (*_ROUTE, "outcome"))
ERRORS = Counter("genai_errors", "Generations that failed.", _ROUTE)
CACHE_LOOKUPS = Counter(
    "genai_cache_lookups", "Response cache lookups.", (*_ROUTE, "cache", "result")
)
BATCH_SIZE = Histogram(
    "genai_engine_batch_size",
    "Sequences in each decoding step of an engine.",
    ("model",),
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
IN_FLIGHT = Gauge(
    "genai_engine_requests_in_flight",
    "Sequences being decoded or waiting for a slot.",
    ("model",),
    multiprocess_mode="livesum",
)


def generation_observe(
    *,
    deployment: str,
    version: str,
    outcome: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    time_to_first_token_s: float | None = None,
    tokens_per_second: float | None = None,
    queue_wait_s: float | None = None,
) -> None:
    """Record one finished (or failed) answer."""
    labels = {"deployment": deployment, "version": version}
    ANSWERS.labels(outcome=outcome, **labels).inc()
    if outcome == "failed":
        ERRORS.labels(**labels).inc()
        return
    PROMPT_TOKENS.labels(**labels).inc(prompt_tokens)
    OUTPUT_TOKENS.labels(**labels).inc(completion_tokens)
    if time_to_first_token_s is not None and completion_tokens > 0:
        TIME_TO_FIRST_TOKEN.labels(**labels).observe(time_to_first_token_s)
    if tokens_per_second:
        TOKENS_PER_SECOND.labels(**labels).observe(tokens_per_second)
        TIME_PER_OUTPUT_TOKEN.labels(**labels).observe(1 / tokens_per_second)
    if queue_wait_s is not None:
        QUEUE_WAIT.labels(**labels).observe(queue_wait_s)


def cache_observe(*, deployment: str, version: str, cache: str, hit: bool) -> None:
    CACHE_LOOKUPS.labels(
        deployment=deployment, version=version, cache=cache, result="hit" if hit else "miss"
    ).inc()


def metrics_exposition() -> tuple[bytes, str]:
    """The text exposition of every process's metrics (merged in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
