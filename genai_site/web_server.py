"""The web server: uvicorn, in one process or in `WEB_CONCURRENCY` of them.

    python -m genai_site.web_server --host 127.0.0.1 --port 8000 [--reuse-port] [APP]

Several processes each listen on a socket of their own, bound to the one address with
`SO_REUSEPORT`, and the kernel spreads new connections over those sockets by a hash of each
connection's addresses (`WebServer` starts and replaces them). uvicorn's own `--workers`
shares one listening socket among its processes instead: whichever is awake when connections
arrive accepts them, as many as are waiting, so a burst of connections lands on a few
processes. Programs keep their connections open (the openai SDK, any HTTP client's pool), so
where a connection lands is where its requests are served. 48 connections opened at once over
8 processes (bench/web_spread.py, 2 cores) gave the busiest 11 to 21 and up to three none,
where 6 each would be even; with a socket each, the busiest had 8 to 10 and none was idle.

On a platform whose `SO_REUSEPORT` does not balance connections (anything but Linux), or with
`WEB_REUSE_PORT=0`, several processes are uvicorn's own workers on one socket.
"""

import argparse
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

logger = logging.getLogger("uvicorn.error")

DEFAULT_APP = "genai_site.asgi:application"
# Linux spreads connections over the sockets of a SO_REUSEPORT group; other systems that have
# the option give them all to one socket.
REUSE_PORT_BALANCES = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
# A process that ends sooner than this after its start is not replaced: it would fail again.
RUNS_BEFORE_REPLACED_SECONDS = 5.0


def web_concurrency() -> int:
    """Web server processes: `WEB_CONCURRENCY`, uvicorn's own setting, 1 when unset."""
    return max(1, int(os.environ.get("WEB_CONCURRENCY") or 1))


def web_command(
    host: str,
    port: int,
    app: str = DEFAULT_APP,
    *,
    reuse_port: bool = False,
    workers: int = 1,
) -> list[str]:
    """One web server process (with `workers`, uvicorn's supervisor of that many)."""
    command = [sys.executable, "-m", "genai_site.web_server", "--host", host, "--port", str(port)]
    if reuse_port:
        command.append("--reuse-port")
    if workers > 1:
        command += ["--workers", str(workers)]
    return [*command, app]


def uvicorn_config(app: str, host: str, port: int, workers: int = 1) -> uvicorn.Config:
    """uvicorn with its C parts (uvloop's event loop, httptools' HTTP parser).

    On 2 cores a request takes less of the server's CPU than under daphne (GET /v1/models: 1.0-1.2
    against 1.65-1.95 ms; /healthz, through the site's middleware: 2.7-2.8 against 4.0-4.3 ms).
    Proxy headers are not trusted, as under daphne: a program on this host could otherwise set
    the address the audit log records. Open streams get 10 s to finish when it stops.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        lifespan="off",
        proxy_headers=False,
        timeout_graceful_shutdown=10,
        workers=workers,
    )


def _bound(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def reuse_port_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket on (host, port) in the address's SO_REUSEPORT group."""
    sock = _bound(host, port, reuse_port=True)
    sock.listen(backlog)
    return sock


def serve(app: str, host: str, port: int, *, reuse_port: bool, workers: int) -> int:
    config = uvicorn_config(app, host, port, workers)
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    # Imported before the event loop runs, as uvicorn's command does: an application that
    # reads the database as it loads (bench/direct_asgi.py) may not do so from the loop.
    config.load_app()
    server = uvicorn.Server(config)
    if reuse_port:
        try:
            sock = reuse_port_socket(host, port, config.backlog)
        except OSError as exc:
            logger.error("Cannot listen on %s:%d: %s", host, port, exc)
            return STARTUP_FAILURE
        logger.info("Uvicorn running on %s:%d (SO_REUSEPORT, process %d)", host, port, os.getpid())
        server.run(sockets=[sock])
    else:
        server.run()
    return 0 if server.started else STARTUP_FAILURE


class WebServer:
    """The web server's processes: one uvicorn, or `processes` of them on sockets of their own
    (see the module's note). `replace_ended` starts a new process for one that ended after it
    had run a while, as uvicorn's supervisor does for its workers."""

    def __init__(
        self,
        host: str,
        port: int,
        processes: int | None = None,
        app: str = DEFAULT_APP,
        **popen: Any,
    ) -> None:
        self.host, self.port, self.app, self.popen = host, port, app, popen
        self.processes = web_concurrency() if processes is None else processes
        wanted = os.environ.get("WEB_REUSE_PORT", "1").strip().lower() not in ("0", "false", "no")
        # Decided once: a replacement must join the group its siblings are in.
        self.reuse_port = self.processes > 1 and wanted and REUSE_PORT_BALANCES
        self.procs: list[subprocess.Popen] = []  # type: ignore[type-arg]
        self._started: dict[int, float] = {}

    def start(self) -> "WebServer":
        if self.reuse_port:
            self._refuse_taken_port()
            self.procs = [self._spawn() for _ in range(self.processes)]
        else:
            self.procs = [self._spawn(workers=self.processes)]
        return self

    def _refuse_taken_port(self) -> None:
        # Sockets of one user's SO_REUSEPORT group share the port: a second server on a port
        # that is taken would serve half its connections rather than fail. A plain bind fails.
        try:
            _bound(self.host, self.port, reuse_port=False).close()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"{self.host}:{self.port} is already in use") from exc
            raise

    def _spawn(self, workers: int = 1) -> subprocess.Popen:  # type: ignore[type-arg]
        command = web_command(
            self.host, self.port, self.app, reuse_port=self.reuse_port, workers=workers
        )
        proc = subprocess.Popen(command, **self.popen)
        self._started[proc.pid] = time.monotonic()
        return proc

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def replace_ended(self) -> bool:
        """Start a process for each that ended; False when one could not start (it would fail
        again: uvicorn's start-up failure, or an end within seconds of its start) or when the
        single process ended."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                continue
            ran = time.monotonic() - self._started.pop(proc.pid, 0.0)
            failed_to_start = proc.returncode == STARTUP_FAILURE
            if not self.reuse_port or failed_to_start or ran < RUNS_BEFORE_REPLACED_SECONDS:
                return False
            logger.warning("Web process %d ended (%s); starting another", proc.pid, proc.returncode)
            self.procs[i] = self._spawn()
        return True

    def stop(self, timeout: float = 20) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog="genai_site.web_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--reuse-port", action="store_true", help="join the port's SO_REUSEPORT group"
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn's own worker processes")
    parser.add_argument("app", nargs="?", default=DEFAULT_APP)
    args = parser.parse_args()
    return serve(args.app, args.host, args.port, reuse_port=args.reuse_port, workers=args.workers)


if __name__ == "__main__":
    sys.exit(main())
