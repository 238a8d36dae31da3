"""Shared fixtures: the suite runs against real PostgreSQL, Redis, a Celery worker and the model.

`make test` starts embedded PostgreSQL and Redis when DATABASE_URL / REDIS_URL are unset
(genai_site.launcher). The worker and the web server run as subprocesses against the test
database, so integration tests use `transaction=True`: other processes must see committed rows.
"""

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from django.db import connection

from genai_site.embedded import free_port
from genai_site.launcher import worker_command
from genai_site.web_server import web_command

BASE_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS = BASE_DIR / "test-artifacts"
# One queue per test session, so a platform running beside the tests never takes their turns.
TEST_QUEUE = f"tests-{uuid.uuid4().hex[:8]}"
# Circuit breakers of this session's versions (ids restart with each test database).
BREAKER_PREFIX = f"genai:breaker:{TEST_QUEUE}"
# The environment variable that holds the API secret of the OpenAI-compatible test server.
REMOTE_KEY_ENV = "GENAI_TEST_REMOTE_API_KEY"
REMOTE_KEY = uuid.uuid4().hex


def _test_database_url() -> str:
    s = connection.settings_dict
    auth = quote(s["USER"] or "", safe="")
    if s["PASSWORD"]:
        auth += ":" + quote(s["PASSWORD"], safe="")
    host = s["HOST"] or ""
    port = f":{s['PORT']}" if s["PORT"] else ""
    url = f"postgres://{auth}@{host}{port}/{s['NAME']}"
    socket_dir = (s.get("OPTIONS") or {}).get("host")
    return f"{url}?host={socket_dir}" if socket_dir else url


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:  # type: ignore[type-arg, no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not become ready in {timeout:.0f}s")


@pytest.fixture(scope="session")
def subprocess_env(
    django_db_setup: None, django_db_blocker: pytest.FixtureRequest
) -> dict[str, str]:
    """Environment for the worker and web subprocesses: the test database, the same Redis."""
    return {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "CIRCUIT_BREAKER_KEY_PREFIX": BREAKER_PREFIX,
        REMOTE_KEY_ENV: REMOTE_KEY,
    }


@pytest.fixture(scope="session", autouse=True)
def _drop_stray_connections(
    django_db_setup: None, django_db_blocker: pytest.FixtureRequest
) -> Iterator[None]:
    """At the end, end connections left by subprocesses and by the threads that run the
    consumers' database calls, so the test database can be dropped."""
    yield
    with django_db_blocker.unblock():  # type: ignore[attr-defined]
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


@pytest.fixture(scope="session")
def model_artifact() -> object:
    """The default model, converted into the store once per machine (not per run)."""
    from models_admin.importing import (
        DEFAULT_MODEL_NAME,
        DEFAULT_MODEL_VERSION,
        artifact_convert_gguf,
        default_gguf_path,
    )

    return artifact_convert_gguf(
        gguf_path=default_gguf_path(),
        artifact_path=f"{DEFAULT_MODEL_NAME}/{DEFAULT_MODEL_VERSION}",
    )


def _start_worker(env: dict[str, str], name: str, log: Path, queue: str) -> subprocess.Popen:  # type: ignore[type-arg]
    ARTIFACTS.mkdir(exist_ok=True)
    command = [*worker_command(queues=queue, concurrency=2), "-n", f"{name}@%h"]
    return subprocess.Popen(
        command, env=env, cwd=BASE_DIR, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def _stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def served_past_a_lock_timeout(
    env: dict[str, str],
    name: str,
    queue: str,
    table: str,
    row_id: int,
    read: Callable[[], Any],
    waiting: tuple[str, ...],
) -> tuple[Any, str]:
    """Serve `queue` with a worker whose connections give up waiting for a row lock after
    200 ms, started while another transaction holds row `row_id` of `table`: its task meets a
    real database error (lock timeout). Once the task has been sent again after that error, the
    row is let go and `read()` is polled until its status is no longer one of `waiting`.
    Returns what it read last and the worker's log."""
    url = env["DATABASE_URL"]
    url += ("&" if "?" in url else "?") + "options=" + quote("-c lock_timeout=200")
    log = ARTIFACTS / f"{name}-worker.log"
    with psycopg.connect(env["DATABASE_URL"]) as holder:
        holder.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", [row_id])
        proc = _start_worker({**env, "DATABASE_URL": url}, name, log, queue)
        try:
            _wait(lambda: "retry: Retry in" in log.read_text(errors="replace"), 90, "a retry", proc)
            holder.commit()
            deadline = time.monotonic() + 120
            while (row := read()).status in waiting:
                assert time.monotonic() < deadline, (
                    f"it was left {row.status}; the worker's log ends:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
                time.sleep(0.2)
        finally:
            _stop(proc)
    return row, log.read_text(errors="replace")


@pytest.fixture(scope="session")
def celery_worker_process(
    subprocess_env: dict[str, str], model_artifact: object
) -> Iterator[subprocess.Popen]:  # type: ignore[type-arg]
    """A real Celery worker (thread pool) serving the test queue."""
    log = ARTIFACTS / "worker.log"
    proc = _start_worker(subprocess_env, "tests", log, TEST_QUEUE)
    _wait(lambda: "ready." in log.read_text(errors="replace"), 90, "Celery worker", proc)
    yield proc
    _stop(proc)


@pytest.fixture
def spare_worker(subprocess_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, str]]:  # type: ignore[type-arg]
    """A second worker, on a queue of its own, that a test may kill. Its leases are short so
    that its death shows quickly."""
    env = {**subprocess_env, "CHAT_GENERATION_LEASE_SECONDS": "3"}
    log = ARTIFACTS / "spare-worker.log"
    queue = f"{TEST_QUEUE}-spare"
    proc = _start_worker(env, "spare", log, queue)
    _wait(lambda: "ready." in log.read_text(errors="replace"), 90, "spare worker", proc)
    yield proc, queue
    if proc.poll() is None:
        _stop(proc)


def web_server_start(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    """The web server (uvicorn) with `env`, once it listens: the process and its base URL."""
    port = free_port()
    log.parent.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        web_command("127.0.0.1", port),
        env=env,
        cwd=BASE_DIR,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    _wait(listening, 60, "the web server", proc)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def live_asgi_server(subprocess_env: dict[str, str]) -> Iterator[str]:
    """The real ASGI application under the web server (uvicorn), against the test database."""
    proc, base = web_server_start(subprocess_env, ARTIFACTS / "web.log")
    yield base
    _stop(proc)


@pytest.fixture
def chat_model(
    transactional_db: None,
    model_artifact: object,
    celery_worker_process: subprocess.Popen,  # type: ignore[type-arg]
) -> object:
    """The default model registered behind `chat-default`, served by the test worker.

    Greedy decoding and short answers keep the suite fast and repeatable.
    """
    from governance.models import UsageLimit
    from models_admin.importing import model_version_register
    from models_admin.models import Deployment

    version = model_version_register(
        model_name="SmolLM2-135M-Instruct",
        version="test",
        artifact=model_artifact,  # type: ignore[arg-type]
        source="tests",
        alias="chat-default",
    )
    version.temperature = 0.0
    version.max_output_tokens = 48
    version.save()
    # Response caches off: Redis outlives each test's database, and the same weights, prompt and
    # greedy parameters would answer later tests from the cache instead of streaming. The cache
    # tests switch them on.
    Deployment.objects.filter(alias="chat-default").update(
        queue=TEST_QUEUE, exact_cache_enabled=False, semantic_cache_enabled=False
    )
    # Flushing between transactional tests also removes the migration's default quota row.
    UsageLimit.objects.get_or_create(
        user=None, group=None, api_key=None, defaults={"tokens_per_day": 200_000}
    )
    return version


@pytest.fixture(scope="session", autouse=True)
def _rate_limit_buckets_of_this_session() -> None:
    """Ids restart with each test database while Redis keeps its buckets for a minute: give
    this session buckets of its own."""
    from django.conf import settings

    settings.RATE_LIMIT_KEY_PREFIX = f"genai:ratelimit:{TEST_QUEUE}"
    settings.CIRCUIT_BREAKER_KEY_PREFIX = BREAKER_PREFIX


@dataclass(frozen=True)
class RemoteServer:
    url: str  # the OpenAI-compatible base URL, ending in /v1
    api_key: str


@pytest.fixture(scope="session")
def openai_server() -> Iterator[RemoteServer]:
    """A real OpenAI-compatible server (llama-cpp-python's) serving the chat model's GGUF."""
    from models_admin.importing import default_gguf_path

    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "openai-server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(default_gguf_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",
            "--api_key",
            REMOTE_KEY,
        ],
        cwd=BASE_DIR,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    _wait(listening, 120, "llama_cpp.server", proc)
    yield RemoteServer(url=f"http://127.0.0.1:{port}/v1", api_key=REMOTE_KEY)
    _stop(proc)


@pytest.fixture
def remote_key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """The test server's API secret in this process's environment, under REMOTE_KEY_ENV."""
    monkeypatch.setenv(REMOTE_KEY_ENV, REMOTE_KEY)
    return REMOTE_KEY_ENV


@pytest.fixture(autouse=True)
def _fresh_settings_cache() -> None:
    """Between tests the database is rolled back or flushed, which no save signal announces:
    every process (this one and the workers) reads deployments and policies afresh."""
    from genai_site.config_cache import config_cache_clear

    config_cache_clear()


@pytest.fixture(autouse=True)
def _fresh_channel_layer() -> Iterator[None]:
    """Each async test runs in its own event loop; the Redis channel layer's connections and
    locks belong to the loop that made them, so every test gets a new layer."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()
