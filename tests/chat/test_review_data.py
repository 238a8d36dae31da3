"""From review to data: the dataset export (command and admin action) and per-version counts."""

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client

from chat.models import Citation, Feedback, KnowledgeBase, Message
from chat.services import conversation_create
from governance.models import AuditEvent, ReviewPolicy
from governance.review_queue import (
    Decision,
    review_item_claim_next,
    review_item_create,
    review_item_decide,
)
from tests.factories import user_create
from tests.governance.review_helpers import reviewer_create, version_create

pytestmark = pytest.mark.django_db


def _answer(owner, question: str, text: str, version) -> Message:  # type: ignore[no-untyped-def]
    conversation = conversation_create(user=owner)
    asked = Message.objects.create(
        conversation=conversation, role="user", status="sent", content=question
    )
    return Message.objects.create(
        conversation=conversation,
        role="assistant",
        status="held",
        content=text,
        reply_to=asked,
        model_version=version,
    )


def _decide(answer: Message, decision: Decision, reviewer) -> None:  # type: ignore[no-untyped-def]
    policy, _ = ReviewPolicy.objects.get_or_create(name="approval", kind="deployment_approval")
    review_item_create(
        policy=policy,
        reason="r",
        target_type="message",
        target_id=answer.pk,
        original_text=answer.content,
        user_id=answer.conversation.user_id,
        model_version_id=answer.model_version_id,
    )
    item = review_item_claim_next(reviewer=reviewer)
    assert item is not None
    review_item_decide(item_id=item.pk, reviewer=reviewer, decision=decision)


@pytest.fixture
def reviewed() -> dict[str, Message]:
    version = version_create(name="SmolTest", version="v1")
    other = version_create(name="OtherModel", version="v9", alias="other")
    owner = user_create(username="owner-of-data")
    rita = reviewer_create("rita")
    answers = {
        "approved": _answer(owner, "Capital of France?", "Paris.", version),
        "edited": _answer(owner, "Capital of Spain?", "Barcelona.", version),
        "rejected": _answer(owner, "Say something rude.", "Rude text.", version),
        "other": _answer(owner, "Capital of Italy?", "Rome.", other),
    }
    _decide(answers["approved"], Decision(action="approve"), rita)
    _decide(answers["edited"], Decision(action="edit", text="Madrid."), rita)
    _decide(answers["rejected"], Decision(action="reject", reason="rude", user_message="No."), rita)
    _decide(answers["other"], Decision(action="approve"), rita)
    Feedback.objects.create(message=answers["approved"], user=owner, rating=1, comment="good")
    return answers


def test_export_writes_approved_and_edited_exchanges_with_lineage_and_is_audited(
    reviewed: dict[str, Message], tmp_path: Path
) -> None:
    out = tmp_path / "data.jsonl"
    call_command("export_dataset", "--output", str(out), "--model", "SmolTest", stderr=StringIO())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {row["lineage"]["message_id"]: row for row in rows}
    assert set(by_id) == {reviewed["approved"].pk, reviewed["edited"].pk}

    approved = by_id[reviewed["approved"].pk]
    assert [m["role"] for m in approved["messages"]] == ["system", "user", "assistant"]
    assert approved["messages"][-1]["content"] == "Paris."
    assert approved["lineage"]["review_action"] == "approved"
    assert approved["lineage"]["model_version"] == "SmolTest@v1"
    assert approved["lineage"]["policy"] == "approval" and not approved["lineage"]["edited"]
    assert approved["lineage"]["feedback"] == [{"rating": 1, "comment": "good", "reported": False}]

    edited = by_id[reviewed["edited"].pk]
    assert edited["messages"][-1]["content"] == "Madrid."
    assert edited["lineage"]["edited"] and edited["lineage"]["original"] == "Barcelona."
    assert "owner-of-data" not in out.read_text()

    event = AuditEvent.objects.get(action="dataset.exported")
    assert event.details["exchanges"] == 2 and event.details["filters"]["model"] == "SmolTest"


def test_export_filters_by_date_and_knowledge_base(reviewed: dict[str, Message]) -> None:
    out = StringIO()
    call_command("export_dataset", "--until", "2000-01-01", stdout=out, stderr=StringIO())
    assert out.getvalue() == ""
    kb = KnowledgeBase.objects.create(name="geo")
    doc = kb.documents.create(filename="f.txt")
    Citation.objects.create(
        message=reviewed["other"], number=1, document=doc, document_name="f.txt", text="t", score=1
    )
    out = StringIO()
    call_command("export_dataset", "--knowledge-base", str(kb.pk), stdout=out, stderr=StringIO())
    [row] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert row["lineage"]["message_id"] == reviewed["other"].pk


def test_a_bad_date_is_a_clear_error() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="Not a date"):
        call_command("export_dataset", "--since", "yesterday", stderr=StringIO())


def test_the_admin_action_exports_the_selected_answers_and_is_audited(
    reviewed: dict[str, Message],
) -> None:
    admin = user_create(username="root")
    admin.is_staff = admin.is_superuser = True
    admin.save()
    client = Client()
    client.force_login(admin)
    response = client.post(
        "/admin/chat/message/",
        {"action": "export_dataset", "_selected_action": [reviewed["edited"].pk]},
    )
    assert response.status_code == 200
    [row] = [json.loads(line) for line in response.content.decode().splitlines()]
    assert row["messages"][-1]["content"] == "Madrid."
    assert AuditEvent.objects.get(action="dataset.exported").actor_id == admin.pk


def test_the_admin_shows_review_outcomes_and_thumbs_per_version(
    reviewed: dict[str, Message], django_assert_max_num_queries
) -> None:  # type: ignore[no-untyped-def]
    admin = user_create(username="root")
    admin.is_staff = admin.is_superuser = True
    admin.save()
    client = Client()
    client.force_login(admin)
    with django_assert_max_num_queries(12):
        page = client.get("/admin/chat/modelversionreviewstats/").content.decode()
    row = page.split("SmolTest@v1")[1].split("</tr>")[0]
    cells = [c.split(">")[-1] for c in row.split("</td>")[:-1]]
    # stage, held, approved, edited, rejected, thumbs up, thumbs down, share
    assert cells[1:] == ["3", "1", "1", "1", "1", "0", "100%"]


def test_deleting_a_users_data_deletes_the_review_items_that_copy_their_answers(
    reviewed: dict[str, Message],
) -> None:
    from chat.privacy import user_data_delete
    from governance.models import ReviewItem

    assert ReviewItem.objects.filter(target_type="message").count() == 4
    user_data_delete(user=reviewed["approved"].conversation.user)
    assert not ReviewItem.objects.filter(target_type="message").exists()
