"""A /v1 request that finds the database out of reach (down, or out of connections) is told to
try again (503 with Retry-After and OpenAI's error object), not given a 500."""

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from genai_site.embedded import free_port
from genai_site.launcher import web_command
from tests.conftest import BASE_DIR, _stop, _wait


@pytest.fixture
def server_without_database(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The web server with a database URL naming a database that does not exist: every
    connection the pool makes is refused, as when PostgreSQL has no connection slot left."""
    url = urlsplit(subprocess_env["DATABASE_URL"])
    port = free_port()
    proc = subprocess.Popen(
        web_command("127.0.0.1", port),
        env={
            **subprocess_env,
            "DATABASE_URL": urlunsplit(url._replace(path="/genai_no_such_database")),
            "DATABASE_POOL_TIMEOUT": "1",
        },
        cwd=BASE_DIR,
        stdout=(tmp_path / "web.log").open("w"),
        stderr=subprocess.STDOUT,
    )

    def listening() -> bool:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/openapi.json", timeout=5)
        except httpx.TransportError:
            return False
        return True

    _wait(listening, 60, "the web server", proc)
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


def test_a_request_that_cannot_reach_the_database_is_told_to_retry(
    server_without_database: str,
) -> None:
    started = time.monotonic()
    with httpx.Client(base_url=server_without_database, timeout=60) as client:
        response = client.post(
            "/v1/chat/completions",
            headers={"Authorization": "Bearer gsk_notcheckedyet_0123456789"},
            json={"model": "chat-default", "messages": [{"role": "user", "content": "Hi"}]},
        )
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "2"
    assert response.json()["error"]["code"] == "service_unavailable"
    assert response.json()["error"]["type"] == "server_error"
    # It waited for the pool (DATABASE_POOL_TIMEOUT), no longer.
    assert time.monotonic() - started < 30
