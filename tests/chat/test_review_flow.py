"""Held answers on the real chat path (websocket, Redis, Celery worker, model) and the
reviewer's screens deciding them, with the decision arriving live on the user's socket.

The greedy test model answers "What is the capital of France?" with "The capital of France is
Paris." (see test_safety_turn.py).
"""

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client

from chat.models import Feedback, Message
from governance.models import AuditEvent, ReviewItem, ReviewPolicy
from models_admin.models import Deployment
from tests.chat.test_turn import _connect, _first_answer_id, _messages, _user_with_conversation
from tests.chat.wsclient import receive, receive_until, send
from tests.governance.review_helpers import reviewer_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("chat_model")]

QUESTION = "What is the capital of France?"


@sync_to_async
def _policy(kind: str, **fields: object) -> ReviewPolicy:
    return ReviewPolicy.objects.create(name=f"test {kind}", kind=kind, **fields)


@sync_to_async
def _approval_policy() -> ReviewPolicy:
    return ReviewPolicy.objects.create(
        name="needs approval",
        kind=ReviewPolicy.Kind.DEPLOYMENT_APPROVAL,
        deployment=Deployment.objects.get(alias="chat-default"),
    )


async def _held_turn():  # type: ignore[no-untyped-def]
    """Ask the question under an approval policy; return the socket, answer id and frames."""
    _, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text=QUESTION)
    answer_id = await _first_answer_id(comm)
    frames = await receive_until(comm, answer_id, {"held"})
    return comm, answer_id, frames, conversation


@sync_to_async
def _decide_on_the_review_screen(action: str, **fields: str) -> tuple[int, str]:
    """A reviewer claims the next item and decides it through the real views."""
    client = Client()
    client.force_login(reviewer_create("rita"))
    claimed = client.post("/review/claim/")
    assert claimed.status_code == 302, claimed.content
    page = client.get(claimed["Location"])
    assert page.status_code == 200
    item_id = int(claimed["Location"].rstrip("/").rsplit("/", 1)[1])
    decided = client.post(f"/review/{item_id}/decide/", {"action": action, **fields})
    assert decided.status_code == 302, decided.content.decode()[:2000]
    return item_id, page.content.decode()


async def test_an_answer_under_an_approval_policy_is_held_unseen_then_approved_live() -> None:
    await _approval_policy()
    comm, answer_id, frames, conversation = await _held_turn()
    shown = [t for f in frames for mid, _, t in f.messages if mid == answer_id]
    assert all("Paris" not in t for t in shown), "a held answer is never streamed"
    assert "Held for review: this deployment" in frames[-1].raw
    answer = (await _messages(conversation.pk))[1]
    assert answer.status == "held" and "Paris" in answer.content
    item = await ReviewItem.objects.aget(target_type="message", target_id=str(answer_id))
    assert item.kind == "deployment_approval" and item.original_text == answer.content

    item_id, page = await _decide_on_the_review_screen("approve")
    assert "Paris" in page and "needs approval" in page
    frames = await receive_until(comm, answer_id, {"complete"}, timeout=30)
    [(_, _, text)] = [m for m in frames[-1].messages if m[0] == answer_id]
    assert "Paris" in text
    answer = (await _messages(conversation.pk))[1]
    assert answer.status == "complete" and answer.error == ""
    assert await AuditEvent.objects.filter(
        action="review.approved", target_id=str(item_id)
    ).aexists()
    await comm.disconnect()


async def test_an_edited_answer_replaces_the_text_live_and_keeps_the_original() -> None:
    await _approval_policy()
    comm, answer_id, _, conversation = await _held_turn()
    item_id, _ = await _decide_on_the_review_screen(
        "edit", text="The capital of France is Paris, on the Seine."
    )
    frames = await receive_until(comm, answer_id, {"complete"}, timeout=30)
    assert "on the Seine" in frames[-1].raw and "Edited by a reviewer" in frames[-1].raw
    answer = (await _messages(conversation.pk))[1]
    assert answer.content == "The capital of France is Paris, on the Seine."
    item = await ReviewItem.objects.aget(pk=item_id)
    assert item.status == "edited" and item.original_text != item.final_text
    assert "+The capital of France is Paris, on the Seine." in item.diff
    await comm.disconnect()


async def test_a_rejected_answer_shows_the_reviewers_message_live_and_never_the_text() -> None:
    await _approval_policy()
    comm, answer_id, _, conversation = await _held_turn()
    item_id, _ = await _decide_on_the_review_screen(
        "reject", reason="off topic", user_message="Our reviewers could not approve this answer."
    )
    frames = await receive_until(comm, answer_id, {"blocked"}, timeout=30)
    assert "Our reviewers could not approve this answer." in frames[-1].raw
    assert "Paris" not in frames[-1].raw
    answer = (await _messages(conversation.pk))[1]
    assert answer.status == "blocked" and answer.content == ""
    item = await ReviewItem.objects.aget(pk=item_id)
    assert item.reject_reason == "off topic" and "Paris" in item.original_text
    await comm.disconnect()


async def test_low_confidence_holds_under_its_threshold_and_not_above() -> None:
    # The model's mean log-probability is below 0 and far above -50 on any answer.
    await _policy("low_confidence", logprob_threshold=-50.0)
    _, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text=QUESTION)
    answer_id = await _first_answer_id(comm)
    await receive_until(comm, answer_id, {"complete"})
    assert not await ReviewItem.objects.aexists()

    await ReviewPolicy.objects.filter(kind="low_confidence").aupdate(logprob_threshold=0.0)
    await send(comm, text="Say hello.")
    second = await _first_answer_id(comm)
    await receive_until(comm, second, {"held"})
    item = await ReviewItem.objects.aget(target_id=str(second))
    assert item.kind == "low_confidence" and item.details["mean_logprob"] < 0
    await comm.disconnect()


async def test_a_sampled_answer_is_delivered_and_queued_for_review_after() -> None:
    await _policy("random_sample", sample_percent=100.0)
    _, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text=QUESTION)
    answer_id = await _first_answer_id(comm)
    frames = await receive_until(comm, answer_id, {"complete"})
    assert any("Paris" in t for f in frames for mid, _, t in f.messages if mid == answer_id)
    item = await ReviewItem.objects.aget(target_id=str(answer_id))
    assert item.delivered and item.kind == "random_sample" and item.status == "pending"
    await comm.disconnect()


async def test_thumbs_and_a_report_are_saved_and_the_report_queues_the_answer() -> None:
    _, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text=QUESTION)
    answer_id = await _first_answer_id(comm)
    await receive_until(comm, answer_id, {"complete"})

    await send(comm, action="feedback", message_id=answer_id, rating="1")
    assert "Thank you" in (await receive(comm)).raw
    feedback = await Feedback.objects.aget(message_id=answer_id)
    assert feedback.rating == 1 and not feedback.reported

    await send(comm, action="feedback", message_id=answer_id, rating="5")
    assert "A rating is 1" in (await receive(comm)).raw

    await send(
        comm, action="feedback", message_id=answer_id, rating="-1", comment="wrong", report="1"
    )
    assert "Reported" in (await receive(comm)).raw
    feedback = await Feedback.objects.aget(message_id=answer_id)
    assert feedback.rating == -1 and feedback.reported and feedback.comment == "wrong"
    item = await ReviewItem.objects.aget(target_id=str(answer_id))
    assert item.kind == "user_report" and item.delivered and "wrong" in item.reason
    await comm.disconnect()


async def test_feedback_on_someone_elses_answer_is_refused_and_saves_nothing() -> None:
    _, conversation, cookie = await _user_with_conversation("owner")
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text=QUESTION)
    answer_id = await _first_answer_id(comm)
    await receive_until(comm, answer_id, {"complete"})
    await comm.disconnect()

    _, other, other_cookie = await _user_with_conversation("other")
    intruder = await _connect(other.pk, other_cookie)
    await send(intruder, action="feedback", message_id=answer_id, rating="-1", report="1")
    assert "No such message" in (await receive(intruder)).raw
    assert not await Feedback.objects.aexists()
    assert not await ReviewItem.objects.aexists()
    await intruder.disconnect()


@sync_to_async
def _held_item_for_screens() -> tuple[ReviewItem, Message]:
    from chat.services import conversation_create
    from governance.review_queue import review_item_create
    from tests.factories import user_create

    owner = user_create(username="dana-owner")
    conversation = conversation_create(user=owner)
    question = Message.objects.create(
        conversation=conversation, role="user", status="sent", content="Secret question?"
    )
    answer = Message.objects.create(
        conversation=conversation,
        role="assistant",
        status="held",
        content="Held text.",
        reply_to=question,
    )
    policy = ReviewPolicy.objects.create(name="approval", kind="deployment_approval")
    item = review_item_create(
        policy=policy,
        reason="r",
        target_type="message",
        target_id=answer.pk,
        original_text=answer.content,
        user_id=owner.pk,
    )
    return item, answer


async def test_reviewers_see_the_owner_only_with_the_identity_permission() -> None:
    item, _ = await _held_item_for_screens()

    @sync_to_async
    def pages() -> tuple[str, str]:
        plain, trusted = reviewer_create("plain"), reviewer_create("trusted")
        trusted.user_permissions.add(Permission.objects.get(codename="view_review_identity"))
        out = []
        for user in (plain, trusted):
            client = Client()
            client.force_login(user)
            response = client.get(f"/review/{item.pk}/")
            assert response.status_code == 200
            out.append(response.content.decode())
        return out[0], out[1]

    plain_page, trusted_page = await pages()
    assert "Secret question?" in plain_page and "Held text." in plain_page
    assert "dana-owner" not in plain_page and "(hidden)" in plain_page
    assert "dana-owner" in trusted_page


async def test_non_reviewers_get_403_on_every_review_screen_and_change_nothing() -> None:
    item, _ = await _held_item_for_screens()

    @sync_to_async
    def statuses() -> list[int]:
        from tests.factories import user_create

        client = Client()
        client.force_login(user_create(username="nosy", is_staff=True))
        return [
            client.get("/review/").status_code,
            client.post("/review/claim/").status_code,
            client.get(f"/review/{item.pk}/").status_code,
            client.post(f"/review/{item.pk}/decide/", {"action": "approve"}).status_code,
            Client().get("/review/").status_code,
        ]

    assert await statuses() == [403, 403, 403, 403, 302]
    await item.arefresh_from_db()
    assert item.status == "pending" and item.claimed_by_id is None
