"""Events to the pages watching a conversation, over the channel layer (Redis).

Two kinds: `chat.message` says a message changed state (the consumer re-reads and re-renders
it), `chat.tokens` carries the answer's text so far while it streams (no database read per batch).
Send them with transaction.on_commit so no page sees a row that was rolled back.
"""

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer


def conversation_group(conversation_id: int) -> str:
    return f"chat.conversation.{conversation_id}"


def live_send(conversation_id: int, event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    async_to_sync(layer.group_send)(conversation_group(conversation_id), event)


def live_message_changed(conversation_id: int, message_id: int, *, created: bool = False) -> None:
    live_send(
        conversation_id, {"type": "chat.message", "message_id": message_id, "created": created}
    )


def live_tokens(conversation_id: int, message_id: int, text: str, tokens: int) -> None:
    live_send(
        conversation_id,
        {"type": "chat.tokens", "message_id": message_id, "text": text, "tokens": tokens},
    )
