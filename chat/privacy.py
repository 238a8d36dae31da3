"""Deleting people's conversations: on their request, and when the retention period ends.

Audit events name messages and conversations by id and never copy their content, so deleting
them leaves the audit chain intact; the deletion itself is recorded.
"""

import datetime as dt

from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from chat.models import Conversation, Document, KnowledgeBase, Message
from chat.services import stop_key
from governance.audit import audit_record
from governance.budgets import budget_release_all
from governance.models import RetentionPolicy, ReviewItem


def _delete_conversations(conversations: QuerySet[Conversation]) -> tuple[list[int], int]:
    """Delete them with their messages; answers still running are stopped and their held
    quota given back, since nothing will settle it once the rows are gone."""
    conversation_ids = list(conversations.values_list("id", flat=True))
    messages = Message.objects.filter(conversation_id__in=conversation_ids)
    held: list[int] = []
    for message_id, reservation_id in messages.filter(
        status__in=[Message.Status.PENDING, Message.Status.STREAMING]
    ).values_list("id", "reservation_id"):
        cache.set(stop_key(message_id), 1, timeout=3600)
        if reservation_id:
            held.append(reservation_id)
    budget_release_all(reservation_ids=held)
    message_count = messages.count()
    # Review items copy the answer's text; they go with the messages they are about.
    ReviewItem.objects.filter(
        target_type="message", target_id__in=[str(i) for i in messages.values_list("id", flat=True)]
    ).delete()
    Conversation.objects.filter(id__in=conversation_ids).delete()
    return conversation_ids, message_count


@transaction.atomic
def user_data_delete(*, user: User, ip: str | None = None) -> int:
    """Delete all of the user's conversations and messages; returns how many conversations."""
    # Lock them, so no turn is being submitted into one while it goes.
    conversations = Conversation.objects.select_for_update().filter(user=user)
    conversation_ids, message_count = _delete_conversations(conversations)
    audit_record(
        actor=user,
        action="user.data_deleted",
        target_type="user",
        target_id=user.pk,
        details={
            "conversations": len(conversation_ids),
            "messages": message_count,
            "conversation_ids": conversation_ids[:1000],
        },
        ip=ip,
    )
    return len(conversation_ids)


@transaction.atomic
def conversations_purge_expired(*, now: dt.datetime | None = None) -> int:
    """Delete conversations idle for longer than the retention policy allows."""
    policy = RetentionPolicy.objects.first()
    if policy is None or policy.conversation_days is None:
        return 0
    cutoff = (now or timezone.now()) - dt.timedelta(days=policy.conversation_days)
    expired = (
        Conversation.objects.select_for_update(skip_locked=True)
        .filter(updated_at__lt=cutoff)
        .exclude(messages__status__in=[Message.Status.PENDING, Message.Status.STREAMING])
    )
    conversation_ids, message_count = _delete_conversations(expired)
    if conversation_ids:
        audit_record(
            actor=None,
            action="retention.purged",
            target_type="conversation",
            details={
                "cutoff": cutoff.isoformat(),
                "retention_days": policy.conversation_days,
                "conversations": len(conversation_ids),
                "messages": message_count,
            },
        )
    return len(conversation_ids)


@transaction.atomic
def documents_purge_expired(*, now: dt.datetime | None = None) -> int:
    """Delete documents (and their chunks) older than their knowledge base's retention.

    Answers that cited them keep their copy of the passage (`Citation`), as on any deletion.
    """
    moment = now or timezone.now()
    purged = 0
    for kb in KnowledgeBase.objects.filter(retention_days__isnull=False):
        assert kb.retention_days is not None
        cutoff = moment - dt.timedelta(days=kb.retention_days)
        expired = Document.objects.select_for_update(skip_locked=True).filter(
            knowledge_base=kb, created_at__lt=cutoff
        )
        ids = list(expired.values_list("pk", flat=True))
        if not ids:
            continue
        Document.objects.filter(pk__in=ids).delete()
        purged += len(ids)
        audit_record(
            actor=None,
            action="retention.purged",
            target_type="knowledge_base",
            target_id=kb.pk,
            details={
                "cutoff": cutoff.isoformat(),
                "retention_days": kb.retention_days,
                "documents": ids,
            },
        )
    return purged
