"""Several web processes (`WEB_CONCURRENCY`), each on a socket of its own in the port's
SO_REUSEPORT group (`genai_site.web_server.WebServer`), serving the real application."""

import os
import signal
import socket
import subprocess
from collections.abc import Iterator

import psutil
import pytest

from genai_site import web_server
from genai_site.embedded import free_port
from genai_site.web_server import REUSE_PORT_BALANCES, WebServer
from tests.conftest import ARTIFACTS, _wait

pytestmark = pytest.mark.skipif(not REUSE_PORT_BALANCES, reason="SO_REUSEPORT balances on Linux")


def _listening(pid: int, port: int) -> bool:
    try:
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for c in psutil.Process(pid).net_connections("tcp")
        )
    except psutil.NoSuchProcess:
        return False


def _healthz(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return sock.recv(1024)


@pytest.fixture
def two_web_processes(
    subprocess_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[WebServer, int]]:
    monkeypatch.setenv("WEB_REUSE_PORT", "1")
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    web = WebServer(
        "127.0.0.1",
        port,
        2,
        env=subprocess_env,
        stdout=(ARTIFACTS / "web-reuse-port.log").open("w"),
        stderr=subprocess.STDOUT,
    ).start()
    try:
        _wait(lambda: all(_listening(pid, port) for pid in web.pids), 90, "both web processes")
        yield web, port
    finally:
        web.stop()


def test_each_web_process_listens_on_the_port_and_takes_connections(
    two_web_processes: tuple[WebServer, int],
) -> None:
    web, port = two_web_processes
    assert web.reuse_port and len(web.pids) == 2
    # 16 connections held open: the kernel hashes each to one of the two sockets, so both
    # processes hold some (all 16 on one side: a chance of 2 in 65,536).
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(16)]
    try:
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for sock in held:
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        served = {
            pid: sum(
                c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                for c in psutil.Process(pid).net_connections("tcp")
            )
            for pid in web.pids
        }
        assert sum(served.values()) == 16
        assert all(count > 0 for count in served.values()), served
    finally:
        for sock in held:
            sock.close()


def test_a_web_process_that_dies_is_replaced_and_the_port_keeps_serving(
    two_web_processes: tuple[WebServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    web, port = two_web_processes
    monkeypatch.setattr(web_server, "RUNS_BEFORE_REPLACED_SECONDS", 0.0)
    dead = web.pids[0]
    os.kill(dead, signal.SIGKILL)
    _wait(lambda: web.procs[0].poll() is not None, 10, "the killed process's end")
    # Its socket closed with it: the kernel sends every new connection to the one left.
    for _ in range(8):
        assert _healthz(port).startswith(b"HTTP/1.1 200")
    assert web.replace_ended()
    assert dead not in web.pids and len(web.pids) == 2
    _wait(lambda: all(_listening(pid, port) for pid in web.pids), 90, "the new web process")


def test_a_process_that_ends_soon_after_its_start_is_not_replaced(
    two_web_processes: tuple[WebServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It would most likely fail again, as a process that cannot import the application does.
    web, _ = two_web_processes
    monkeypatch.setattr(web_server, "RUNS_BEFORE_REPLACED_SECONDS", 3600.0)
    web.procs[1].kill()
    web.procs[1].wait()
    assert not web.replace_ended()


def test_a_port_in_use_is_refused_rather_than_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_REUSE_PORT", "1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        web = WebServer("127.0.0.1", port, 2)
        with pytest.raises(OSError, match="already in use"):
            web.start()
        assert web.procs == []
