"""A failed generation keeps the question and can be retried; a dead worker never answers twice."""

import os
import signal
import time

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from chat.models import Message
from chat.services import conversation_create
from governance.models import BudgetUsage
from tests.chat.wsclient import communicator, receive, receive_until, send
from tests.conftest import TEST_QUEUE, served_past_a_lock_timeout
from tests.factories import PASSWORD, session_cookie_for, user_create

pytestmark = pytest.mark.django_db(transaction=True)


async def _answer_id(comm) -> int:  # type: ignore[no-untyped-def]
    while True:
        frame = await receive(comm)
        for message_id, status, _ in frame.messages:
            if status in ("pending", "streaming", "failed"):
                return message_id


async def test_weights_that_fail_their_hash_fail_the_turn_and_retry_answers(chat_model) -> None:  # type: ignore[no-untyped-def]
    good_hash = chat_model.sha256
    chat_model.sha256 = "0" * 64  # the registry no longer matches the weights on disk
    await chat_model.asave()
    user = await sync_to_async(user_create)(username="alice")
    conversation = await sync_to_async(conversation_create)(user=user)
    comm = communicator(conversation.pk, await sync_to_async(session_cookie_for)(user))
    assert (await comm.connect())[0]

    await send(comm, text="Hello?")
    answer_id = await _answer_id(comm)
    frames = await receive_until(comm, answer_id, {"failed"})
    assert "refusing to serve them" in frames[-1].raw and "Retry" in frames[-1].raw
    question, answer = [m async for m in Message.objects.order_by("id")]
    assert question.status == "sent" and question.content == "Hello?"
    assert answer.status == "failed"
    usage = await BudgetUsage.objects.aget(user=user, period="day")
    assert usage.tokens_reserved == 0 and usage.tokens_used == 0, "a failed answer costs nothing"

    chat_model.sha256 = good_hash  # the operator fixes the registry
    await chat_model.asave()
    await send(comm, action="retry", message_id=answer_id)
    await receive_until(comm, answer_id, {"complete"})
    await answer.arefresh_from_db()
    assert answer.status == "complete" and answer.attempt == 2 and answer.content
    assert await Message.objects.acount() == 2
    await comm.disconnect()


def test_a_worker_killed_mid_answer_leaves_a_failed_turn_that_can_be_retried(
    chat_model,
    spare_worker,
    client: Client,  # type: ignore[no-untyped-def]
) -> None:
    """The spare worker takes the turn and is killed with SIGKILL mid-answer."""
    from models_admin.models import Deployment

    proc, queue = spare_worker
    Deployment.objects.update(queue=queue)
    chat_model.max_output_tokens = 400
    chat_model.save()
    user = user_create(username="bob")
    conversation = conversation_create(user=user)
    client.login(username="bob", password=PASSWORD)

    from chat.services import turn_retry, turn_submit, turns_reap_stale

    outcome = turn_submit(user=user, conversation_id=conversation.pk, text="Tell me a long story.")
    # A second conversation, left open in no page: Celery beat's sweep reaps its turn.
    other = turn_submit(
        user=user, conversation_id=conversation_create(user=user).pk, text="Another story."
    )
    assert outcome.answer is not None and other.answer is not None
    deadline = time.monotonic() + 60
    while (
        Message.objects.filter(
            pk__in=[outcome.answer.pk, other.answer.pk], status="streaming"
        ).count()
        < 2
    ):
        assert time.monotonic() < deadline, "the spare worker never started both answers"
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert turns_reap_stale() == 0, "the leases outlive the worker by up to 3 s"

    time.sleep(4)  # the spare worker's leases (3 s) run out
    page = client.get(f"/chat/{conversation.pk}/").content.decode()
    answer = Message.objects.get(pk=outcome.answer.pk)
    assert answer.status == "failed" and "worker stopped" in answer.error
    assert "Retry" in page
    assert Message.objects.get(pk=other.answer.pk).status == "streaming"
    assert turns_reap_stale() == 1
    assert Message.objects.get(pk=other.answer.pk).status == "failed"
    assert Message.objects.get(pk=outcome.question.pk).status == "sent"
    assert Message.objects.filter(conversation=conversation).count() == 2
    # The page's Retry sends the turn to a live worker, which answers it.
    Deployment.objects.update(queue=TEST_QUEUE)
    chat_model.max_output_tokens = 48
    chat_model.save()
    turn_retry(user=user, message_id=answer.pk)
    deadline = time.monotonic() + 120
    while (answer := Message.objects.get(pk=answer.pk)).status not in ("complete", "failed"):
        assert time.monotonic() < deadline, "the retried answer never finished"
        time.sleep(0.2)
    assert answer.status == "complete" and answer.attempt == 2


def test_a_turn_whose_claim_meets_a_database_error_is_sent_again_and_answered(
    chat_model, subprocess_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    from chat.services import turn_submit
    from models_admin.models import Deployment

    queue = f"{TEST_QUEUE}-dberror-turn"
    Deployment.objects.update(queue=queue)
    user = user_create(username="carol")
    outcome = turn_submit(
        user=user, conversation_id=conversation_create(user=user).pk, text="Hello?"
    )
    assert outcome.answer is not None
    answer, log = served_past_a_lock_timeout(
        subprocess_env,
        "dberror-turn",
        queue,
        "chat_message",
        outcome.answer.pk,
        read=lambda: Message.objects.get(pk=outcome.answer.pk),  # type: ignore[union-attr]
        waiting=("pending", "streaming"),
    )
    assert answer.status == "complete" and answer.attempt == 1 and answer.content
    assert "due to lock timeout" in log


@pytest.mark.parametrize(
    ("retries", "reason"),
    [
        (0, "The worker stopped in the middle of this answer."),
        (1, "A database error interrupted this answer."),
    ],
)
def test_a_turn_met_again_mid_answer_is_failed_with_its_cause(
    chat_model, retries: int, reason: str
) -> None:  # type: ignore[no-untyped-def]
    """A delivery that finds its own turn already streaming fails it for Retry, naming why:
    its worker stopped (a redelivery) or a database error stopped it (the task sent again)."""
    from chat.services import turn_submit
    from chat.tasks import generate_reply
    from models_admin.models import Deployment

    # No worker serves this queue: the turn is left pending for the test to run.
    Deployment.objects.update(queue=f"{TEST_QUEUE}-unserved")
    user = user_create(username=f"dave{retries}")
    outcome = turn_submit(
        user=user, conversation_id=conversation_create(user=user).pk, text="Hello?"
    )
    assert outcome.answer is not None
    Message.objects.filter(pk=outcome.answer.pk).update(status=Message.Status.STREAMING)
    generate_reply.apply(args=(outcome.answer.pk, 1), retries=retries)
    answer = Message.objects.get(pk=outcome.answer.pk)
    assert answer.status == Message.Status.FAILED
    assert answer.error == reason
    assert BudgetUsage.objects.get(user=user, period="day").tokens_reserved == 0
