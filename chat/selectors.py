from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import Http404

from chat.models import Citation, Conversation, KnowledgeBase, Message


def conversation_list(*, user: User) -> QuerySet[Conversation]:
    return Conversation.objects.filter(user=user).order_by("-updated_at", "-id")


def conversation_get(*, user: User, conversation_id: int) -> Conversation:
    """The user's conversation, or Http404: another user's conversation does not exist for them."""
    conversation = Conversation.objects.filter(pk=conversation_id, user=user).first()
    if conversation is None:
        raise Http404("No such conversation.")
    return conversation


def conversation_messages(*, conversation: Conversation) -> QuerySet[Message]:
    return conversation.messages.order_by("created_at", "id").prefetch_related("citations")


def message_get_for_user(*, user: User, message_id: int) -> Message:
    message = (
        Message.objects.select_related("conversation")
        .filter(pk=message_id, conversation__user=user)
        .first()
    )
    if message is None:
        raise Http404("No such message.")
    return message


def knowledge_bases_for_user(*, user: User) -> QuerySet[KnowledgeBase]:
    """The knowledge bases the user may use: those shared with one of their groups."""
    if not user.is_active:
        return KnowledgeBase.objects.none()
    if user.is_superuser:
        return KnowledgeBase.objects.all()
    return KnowledgeBase.objects.filter(groups__user=user).distinct()


def citation_get_for_user(*, user: User, citation_id: int) -> Citation:
    """A citation on one of the user's own answers, or Http404."""
    citation = (
        Citation.objects.select_related("message__conversation", "chunk", "document")
        .filter(pk=citation_id, message__conversation__user=user)
        .first()
    )
    if citation is None:
        raise Http404("No such citation.")
    return citation
