"""A websocket client for tests: the real ASGI application, read as a page would read it."""

import json
import re
from dataclasses import dataclass

from channels.testing import WebsocketCommunicator

from genai_site.asgi import application

ORIGIN = (b"origin", b"http://localhost")

_ARTICLE = re.compile(
    r'<article id="msg-(\d+)"[^>]*data-status="(\w+)"[^>]*>\s*<div class="msg-body">(.*?)</div>',
    re.S,
)
_TAG = re.compile(r"<[^>]+>")


@dataclass
class Frame:
    raw: str

    @property
    def messages(self) -> list[tuple[int, str, str]]:
        """(message id, status, text of its body) for every message the frame carries."""
        return [
            (int(m.group(1)), m.group(2), " ".join(_TAG.sub(" ", m.group(3)).split()))
            for m in _ARTICLE.finditer(self.raw)
        ]

    @property
    def notice(self) -> str | None:
        m = re.search(r'<div id="notice"[^>]*>(.*?)</div>', self.raw, re.S)
        return m.group(1).strip() if m else None


def communicator(
    conversation_id: int, cookie: str, origin: bytes = ORIGIN[1]
) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application,
        f"/ws/chat/{conversation_id}/",
        headers=[(b"cookie", cookie.encode()), (b"origin", origin), (b"host", b"localhost")],
    )


async def send(comm: WebsocketCommunicator, **payload: object) -> None:
    await comm.send_to(text_data=json.dumps(payload))


async def receive(comm: WebsocketCommunicator, timeout: float = 30) -> Frame:
    return Frame(await comm.receive_from(timeout=timeout))


async def receive_until(
    comm: WebsocketCommunicator, message_id: int, statuses: set[str], timeout: float = 90
) -> list[Frame]:
    """Frames up to the one showing `message_id` in one of `statuses`."""
    frames = []
    while True:
        frame = await receive(comm, timeout)
        frames.append(frame)
        if any(mid == message_id and st in statuses for mid, st, _ in frame.messages):
            return frames
