"""Keys and clients for the /v1 API tests."""

import json
import time
from collections.abc import Iterator

import httpx
import openai

from chat.models import Job
from governance.api_keys import api_key_create
from governance.models import ApiKey
from tests.factories import user_create


def api_key_for(
    username: str | None = None,
    *,
    scopes: tuple[str, ...] = ("chat", "embeddings", "models"),
    requests_per_minute: int | None = None,
) -> tuple[ApiKey, str]:
    """A new user's API key: the row, and the secret a client sends."""
    user = user_create(username=username)
    return api_key_create(
        user=user,
        name="tests",
        scopes=scopes,
        requests_per_minute=requests_per_minute,
        actor=user,
    )


def key_for(
    username: str | None = None,
    *,
    scopes: tuple[str, ...] = ("chat", "embeddings", "models"),
    requests_per_minute: int | None = None,
) -> str:
    return api_key_for(username, scopes=scopes, requests_per_minute=requests_per_minute)[1]


def sdk(server: str, raw_key: str) -> openai.OpenAI:
    # No retries: a 429 must reach the test as the SDK's error, not be retried away.
    return openai.OpenAI(base_url=f"{server}/v1", api_key=raw_key, max_retries=0, timeout=120)


def http(server: str, raw_key: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server}/v1", headers={"Authorization": f"Bearer {raw_key}"}, timeout=120
    )


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:  # type: ignore[type-arg]
    """(event name, data) for each Server-Sent Event of a streamed response."""
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: ") :])
            name = "message"


def job_once_settled(public_id: str, timeout: float = 30) -> Job:
    """The job of a completion that was just answered, once its settle has committed: a
    non-streamed answer reaches its caller before the worker writes the row, the budget and
    the audit (chat.api.generation)."""
    deadline = time.monotonic() + timeout
    while (job := Job.objects.get(public_id=public_id)).status in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {public_id} was never settled"
        time.sleep(0.05)
    return job
