"""Deleting one's data, and the retention purge; the audit chain stays valid through both."""

import datetime as dt

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from chat.models import Conversation, Message
from chat.privacy import conversations_purge_expired
from chat.services import conversation_create
from chat.tasks import purge_expired_data
from governance.audit import audit_record, audit_verify
from governance.models import AuditEvent, RetentionPolicy
from tests.factories import user_create

pytestmark = pytest.mark.django_db(transaction=True)


def _conversation_with_messages(user, n: int = 2) -> Conversation:  # type: ignore[no-untyped-def]
    conversation = conversation_create(user=user)
    for i in range(n):
        message = Message.objects.create(
            conversation=conversation, role="user", status="sent", content=f"secret {i}"
        )
        audit_record(
            actor=user, action="turn.admitted", target_type="message", target_id=message.pk
        )
    return conversation


def test_delete_my_data_removes_conversations_and_keeps_the_audit_chain_valid() -> None:
    alice, bob = user_create(), user_create()
    for _ in range(2):
        _conversation_with_messages(alice)
    bobs = _conversation_with_messages(bob)
    client = Client()
    client.force_login(alice)
    page = client.get("/chat/settings/")
    assert "You have 2 conversations" in page.content.decode()

    response = client.post("/chat/settings/delete-data/", {"confirm": "delete"})
    assert response.status_code == 302
    assert not Conversation.objects.filter(user=alice).exists()
    assert not Message.objects.filter(conversation__user=alice).exists()
    assert Message.objects.filter(conversation=bobs).count() == 2, "others' data stays"

    event = AuditEvent.objects.get(action="user.data_deleted")
    assert event.actor == alice and event.details["conversations"] == 2
    assert event.details["messages"] == 4
    assert not AuditEvent.objects.filter(details__icontains="secret").exists()
    verification = audit_verify()
    assert verification.intact and verification.events == AuditEvent.objects.count()


def test_delete_my_data_without_confirmation_deletes_nothing() -> None:
    alice = user_create()
    _conversation_with_messages(alice)
    client = Client()
    client.force_login(alice)
    response = client.post("/chat/settings/delete-data/", {"confirm": "yes please"})
    assert response.status_code == 400 and "Nothing was deleted" in response.content.decode()
    assert Conversation.objects.filter(user=alice).count() == 1


def test_anonymous_visitors_cannot_delete_anything() -> None:
    alice = user_create()
    _conversation_with_messages(alice)
    response = Client().post("/chat/settings/delete-data/", {"confirm": "delete"})
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert Conversation.objects.count() == 1


def test_retention_purge_deletes_only_conversations_idle_past_the_policy() -> None:
    user = user_create()
    old, recent = _conversation_with_messages(user), _conversation_with_messages(user)
    Conversation.objects.filter(pk=old.pk).update(updated_at=timezone.now() - dt.timedelta(days=31))
    assert conversations_purge_expired() == 0, "no policy: everything is kept"
    RetentionPolicy.objects.create(conversation_days=30)

    assert purge_expired_data.apply().get() == {"conversations": 1, "documents": 0}
    assert list(Conversation.objects.values_list("pk", flat=True)) == [recent.pk]
    event = AuditEvent.objects.get(action="retention.purged")
    assert event.details["conversations"] == 1 and event.details["retention_days"] == 30
    assert audit_verify().intact


def test_a_retention_of_zero_days_is_rejected_with_a_reason() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        RetentionPolicy(conversation_days=0).full_clean()


def test_deleting_a_conversation_with_an_answer_in_flight_gives_its_held_quota_back() -> None:
    from governance.admission import turn_admit
    from governance.models import BudgetUsage, QuotaReservation, UsageLimit

    alice = user_create()
    UsageLimit.objects.create(user=alice, tokens_per_day=1000)
    conversation = conversation_create(user=alice)
    question = Message.objects.create(
        conversation=conversation, role="user", status="sent", content="hi"
    )
    reservation = turn_admit(
        user=alice, input_tokens=100, max_output_tokens=50, target_type="message", target_id=1
    )
    assert isinstance(reservation, QuotaReservation)
    Message.objects.create(
        conversation=conversation,
        role="assistant",
        status="pending",
        reply_to=question,
        reservation=reservation,
    )
    assert BudgetUsage.objects.get(user=alice).tokens_reserved == 150

    client = Client()
    client.force_login(alice)
    assert client.post("/chat/settings/delete-data/", {"confirm": "delete"}).status_code == 302
    usage = BudgetUsage.objects.get(user=alice)
    assert (usage.tokens_reserved, usage.tokens_used) == (0, 0)
    reservation.refresh_from_db()
    assert reservation.status == "released"
    assert audit_verify().intact


def test_retention_purge_deletes_knowledge_base_documents_past_their_retention_only() -> None:
    from chat.models import Document, KnowledgeBase

    kept_kb = KnowledgeBase.objects.create(name="Forever")
    kb = KnowledgeBase.objects.create(name="Short-lived", retention_days=30)
    old = Document.objects.create(knowledge_base=kb, filename="old.txt", status="ready")
    new = Document.objects.create(knowledge_base=kb, filename="new.txt", status="ready")
    kept = Document.objects.create(knowledge_base=kept_kb, filename="kept.txt", status="ready")
    long_ago = timezone.now() - dt.timedelta(days=40)
    Document.objects.filter(pk__in=[old.pk, kept.pk]).update(created_at=long_ago)

    assert purge_expired_data.apply().get() == {"conversations": 0, "documents": 1}
    assert set(Document.objects.values_list("pk", flat=True)) == {new.pk, kept.pk}
    event = AuditEvent.objects.get(action="retention.purged", target_type="knowledge_base")
    assert event.details["documents"] == [old.pk]
    assert audit_verify().intact


def test_a_retention_of_zero_days_is_refused() -> None:
    from chat.models import KnowledgeBase

    with pytest.raises(ValidationError):
        KnowledgeBase(name="Bad", retention_days=0).full_clean()
