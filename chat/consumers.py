"""The chat socket: parses frames, calls one service, renders what the services announce."""

import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import close_old_connections
from django.http import Http404

from chat import services
from chat.feedback import feedback_submit
from chat.live import conversation_group
from chat.models import Conversation, Message
from chat.rendering import MessageView, message_fragment, notice_fragment, quota_fragment
from governance.budgets import budget_meters

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403


@database_sync_to_async
def _owns(user: Any, conversation_id: int) -> bool:
    close_old_connections()
    return Conversation.objects.filter(pk=conversation_id, user=user).exists()


@database_sync_to_async
def _message_view(message_id: int, conversation_id: int) -> MessageView | None:
    message = (
        Message.objects.filter(pk=message_id, conversation_id=conversation_id)
        .prefetch_related("citations")
        .first()
    )
    return MessageView.of(message) if message else None


@database_sync_to_async
def _quota_html(user: Any) -> str:
    return quota_fragment(budget_meters(user=user))


@database_sync_to_async
def _call(fn: Any, **kwargs: Any) -> Any:
    close_old_connections()
    return fn(**kwargs)


class ChatConsumer(AsyncWebsocketConsumer):
    conversation_id: int | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        conversation_id = int(self.scope["url_route"]["kwargs"]["conversation_id"])
        if not await _owns(user, conversation_id):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.conversation_id = conversation_id
        await self.channel_layer.group_add(conversation_group(conversation_id), self.channel_name)
        await self.accept()
        await _call(services.conversation_reap_stale_turns, conversation_id=conversation_id)

    async def disconnect(self, code: int) -> None:
        if self.conversation_id is not None:
            await self.channel_layer.group_discard(
                conversation_group(self.conversation_id), self.channel_name
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            payload = json.loads(text_data or "")
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            await self.send(text_data=notice_fragment("That message could not be read."))
            return
        try:
            await self._dispatch(payload)
        except services.TurnRejected as exc:
            await self.send(text_data=notice_fragment(str(exc)))
        except Http404:
            await self.send(text_data=notice_fragment("No such message in this conversation."))
        except Exception:
            # A bug in one turn must not take the socket (and the page) down with it.
            logger.exception("Chat frame failed in conversation %s", self.conversation_id)
            await self.send(
                text_data=notice_fragment("Something went wrong on our side; nothing was sent.")
            )

    async def _dispatch(self, payload: dict[str, Any]) -> None:
        user = self.scope["user"]
        action = payload.get("action") or "send"
        if action == "send":
            await _call(
                services.turn_submit,
                user=user,
                conversation_id=self.conversation_id,
                text=payload.get("text"),
                ip=self._client_ip(),
            )
            await self.send(text_data=notice_fragment("", level="clear") + _COMPOSER_RESET)
        elif action in ("stop", "retry"):
            try:
                message_id = int(payload.get("message_id", ""))
            except (TypeError, ValueError):
                await self.send(text_data=notice_fragment("Which answer? The request named none."))
                return
            if action == "stop":
                await _call(services.turn_stop, user=user, message_id=message_id)
            else:
                await _call(
                    services.turn_retry, user=user, message_id=message_id, ip=self._client_ip()
                )
        elif action == "knowledge":
            chosen = await _call(
                services.conversation_knowledge_bases_set,
                user=user,
                conversation_id=self.conversation_id,
                knowledge_base_ids=payload.get("knowledge_base"),
            )
            names = ", ".join(kb.name for kb in chosen) or "none"
            await self.send(
                text_data=notice_fragment(f"Knowledge bases in use: {names}.", level="info")
            )
        elif action == "tier":
            tier = await _call(
                services.conversation_tier_set,
                user=user,
                conversation_id=self.conversation_id,
                tier=payload.get("tier"),
            )
            said = f"the {tier} tier" if tier else "the default tier"
            notice = notice_fragment(f"Answers now come from {said}.", level="info")
            await self.send(text_data=notice)
        elif action == "feedback":
            try:
                message_id = int(payload.get("message_id", ""))
            except (TypeError, ValueError):
                await self.send(text_data=notice_fragment("Which answer? The request named none."))
                return
            feedback = await _call(
                feedback_submit,
                user=user,
                message_id=message_id,
                rating=payload.get("rating", 0),
                comment=payload.get("comment", ""),
                report=payload.get("report", False),
            )
            thanks = "Reported; a reviewer will look at this answer." if feedback.reported else ""
            await self.send(
                text_data=notice_fragment(thanks or "Thank you for the feedback.", level="info")
            )
        else:
            await self.send(text_data=notice_fragment(f"Unknown action '{str(action)[:40]}'."))

    def _client_ip(self) -> str | None:
        client = self.scope.get("client")
        return client[0] if client else None

    async def chat_message(self, event: dict[str, Any]) -> None:
        view = await _message_view(event["message_id"], self.conversation_id)
        if view is None:
            return
        if event.get("created"):
            html = message_fragment(view)
            html = f'<div hx-swap-oob="beforeend:#messages">{html}</div>'
        else:
            html = message_fragment(view, swap="true")
        # Each change of state may have reserved, settled or released quota.
        await self.send(text_data=html + await _quota_html(self.scope["user"]))

    async def chat_tokens(self, event: dict[str, Any]) -> None:
        view = MessageView.streaming(event["message_id"], event["text"])
        await self.send(text_data=message_fragment(view, swap="true"))


_COMPOSER_RESET = (
    '<textarea id="composer-text" name="text" rows="3" required '
    'placeholder="Ask anything" hx-swap-oob="true"></textarea>'
)
