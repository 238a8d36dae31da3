from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import Http404

from chat.models import Conversation, Message


def conversation_list(*, user: User) -> QuerySet[Conversation]:
    return Conversation.objects.filter(user=user).order_by("-updated_at", "-id")


def conversation_get(*, user: User, conversation_id: int) -> Conversation:
    """The user's conversation, or Http404: another user's conversation does not exist for them."""
    conversation = Conversation.objects.filter(pk=conversation_id, user=user).first()
    if conversation is None:
        raise Http404("No such conversation.")
    return conversation


def conversation_messages(*, conversation: Conversation) -> QuerySet[Message]:
    return conversation.messages.order_by("created_at", "id")


def message_get_for_user(*, user: User, message_id: int) -> Message:
    message = (
        Message.objects.select_related("conversation")
        .filter(pk=message_id, conversation__user=user)
        .first()
    )
    if message is None:
        raise Http404("No such message.")
    return message
