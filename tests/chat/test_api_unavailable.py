"""A /v1 request that finds the database out of reach (down, or out of connections) is told to
try again (503 with Retry-After and OpenAI's error object), not given a 500; one whose job is
already queued is given the job instead, so that trying again cannot run it twice."""

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from django.db import connection

from chat.models import Job
from models_admin.models import Deployment
from tests.chat.api_helpers import key_for
from tests.conftest import TEST_QUEUE, _stop, _wait, web_server_start


@pytest.fixture
def server_without_database(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The web server with a database URL naming a database that does not exist: every
    connection the pool makes is refused, as when PostgreSQL has no connection slot left."""
    url = urlsplit(subprocess_env["DATABASE_URL"])
    proc, base = web_server_start(
        {
            **subprocess_env,
            "DATABASE_URL": urlunsplit(url._replace(path="/genai_no_such_database")),
            "DATABASE_POOL_TIMEOUT": "1",
        },
        tmp_path / "web.log",
    )
    yield base
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


class _DatabaseLink:
    """A TCP relay to the test database that the test can cut, as a network or a server that
    goes away would: its connections are closed and new ones are refused."""

    def __init__(self) -> None:
        s = connection.settings_dict
        socket_dir = (s.get("OPTIONS") or {}).get("host") or (
            s["HOST"] if (s["HOST"] or "").startswith("/") else None
        )
        self.upstream: str | tuple[str, int] = (
            f"{socket_dir}/.s.PGSQL.{s['PORT'] or 5432}"
            if socket_dir
            else (s["HOST"] or "127.0.0.1", int(s["PORT"] or 5432))
        )
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            family = socket.AF_UNIX if isinstance(self.upstream, str) else socket.AF_INET
            server = socket.socket(family, socket.SOCK_STREAM)
            server.connect(self.upstream)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.mark.django_db(transaction=True)
def test_a_call_whose_job_is_queued_gets_the_job_when_the_database_goes_away(
    chat_model, subprocess_env: dict[str, str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # No worker serves this queue: the job waits, queued, while the database goes away.
    Deployment.objects.update(queue=f"{TEST_QUEUE}-unserved-{uuid.uuid4().hex[:6]}")
    link = _DatabaseLink()
    s = connection.settings_dict
    url = urlsplit(subprocess_env["DATABASE_URL"])
    relayed = url._replace(
        netloc=f"{s['USER']}@127.0.0.1:{link.port}"
        if not s["PASSWORD"]
        else f"{s['USER']}:{s['PASSWORD']}@127.0.0.1:{link.port}",
        query="",
    )
    proc, base = web_server_start(
        {
            **subprocess_env,
            "DATABASE_URL": urlunsplit(relayed),
            "DATABASE_POOL_TIMEOUT": "1",
            "API_WAIT_SECONDS": "3",
        },
        tmp_path / "web.log",
    )
    try:
        key = key_for()
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=base, timeout=60) as client:
            call = pool.submit(
                client.post,
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "chat-default", "messages": [{"role": "user", "content": "Hi"}]},
            )
            _wait(lambda: Job.objects.exists(), 30, "the job's row")
            link.cut()
            response = call.result(timeout=60)
    finally:
        link.cut()
        _stop(proc)
    # Not a 503 that the program would retry, queueing the same completion again: the job.
    assert response.status_code == 202, response.text
    job = Job.objects.get()
    assert response.json()["id"] == job.public_id
    assert job.status == Job.Status.QUEUED
