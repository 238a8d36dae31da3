"""The /v1 handler keeps the threads its requests' sync code ran in, for the next requests."""

import asyncio
import threading
import time
from typing import Any

import pytest
from django.core.signals import request_started

from genai_site.api_handler import ApiHandler


async def _get(handler: ApiHandler, path: str) -> int:
    """One GET through the handler as an ASGI server would make it; the response's status."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    incoming.put_nowait({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 50000),
        "server": ("localhost", 80),
    }
    await handler(scope, incoming.get, send)
    return int(sent[0]["status"])


def _threads(handler: ApiHandler) -> set[threading.Thread]:
    return {t for executor in handler._idle for t in executor._threads}


async def test_requests_one_after_another_run_their_sync_code_in_the_same_kept_thread() -> None:
    handler = ApiHandler()
    # No key: the key check (sync code, in the request's thread) answers 401.
    assert await _get(handler, "/v1/models") == 401
    assert len(handler._idle) == 1
    first = _threads(handler)
    assert len(first) == 1 and all(t.is_alive() for t in first)
    assert await _get(handler, "/v1/models") == 401
    assert _threads(handler) == first


async def test_requests_at_the_same_time_get_threads_of_their_own_and_only_some_are_kept() -> None:
    handler = ApiHandler()
    handler.IDLE_THREADS = 2
    statuses = await asyncio.gather(*(_get(handler, "/v1/models") for _ in range(4)))
    assert statuses == [401] * 4
    assert len(handler._idle) == 2 and len(_threads(handler)) == 2


async def test_a_request_cancelled_while_its_sync_code_runs_gives_its_thread_to_no_other() -> None:
    handler = ApiHandler()
    running = threading.Event()

    def slow(**kwargs: Any) -> None:  # a sync receiver: it runs in the request's thread
        running.set()
        time.sleep(0.5)

    request_started.connect(slow)
    try:
        request = asyncio.ensure_future(_get(handler, "/v1/models"))
        assert await asyncio.to_thread(running.wait, 10)
        request.cancel()  # as the server does when it gives up on a client that left
        with pytest.raises(asyncio.CancelledError):
            await request
    finally:
        request_started.disconnect(slow)
    assert handler._idle == []
