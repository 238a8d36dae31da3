"""One chat turn over the real websocket, Redis channel layer, Celery worker and model."""

import asyncio
import itertools

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import conversation_create
from governance.models import AuditEvent, BudgetUsage, UsageLimit
from tests.chat.wsclient import communicator, receive, receive_until, send
from tests.factories import session_cookie_for, user_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("chat_model")]


@sync_to_async
def _user_with_conversation(username: str = "alice"):  # type: ignore[no-untyped-def]
    user = user_create(username=username)
    conversation = conversation_create(user=user)
    return user, conversation, session_cookie_for(user)


@sync_to_async
def _messages(conversation_id: int) -> list[Message]:
    return list(Message.objects.filter(conversation_id=conversation_id).order_by("id"))


async def _connect(conversation_id: int, cookie: str):  # type: ignore[no-untyped-def]
    comm = communicator(conversation_id, cookie)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def _first_answer_id(comm) -> int:  # type: ignore[no-untyped-def]
    """Read frames until the answer appears (pending, or already streaming); return its id."""
    while True:
        frame = await receive(comm)
        for message_id, status, _ in frame.messages:
            if status in ("pending", "streaming"):
                return message_id


async def test_answer_streams_in_order_and_is_saved_with_its_figures() -> None:
    user, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, action="send", text="Name three colours of the rainbow.")
    answer_id = await _first_answer_id(comm)

    frames = await receive_until(comm, answer_id, {"complete"})
    streamed = [
        t for f in frames for mid, st, t in f.messages if mid == answer_id and st == "streaming"
    ]
    assert len(streamed) >= 2, "the answer should arrive in several batches"
    for earlier, later in itertools.pairwise(streamed):
        assert later.startswith(earlier[:-1]), "each batch extends the text before it"

    question, answer = await _messages(conversation.pk)
    assert question.role == "user" and question.status == "sent"
    assert answer.status == "complete" and answer.reply_to_id == question.pk
    assert answer.content and " ".join(answer.content.split()).startswith(streamed[0][:-1])
    assert answer.completion_tokens and answer.completion_tokens > 1
    assert answer.prompt_tokens and answer.prompt_tokens > 10
    assert answer.time_to_first_token_ms and answer.time_to_first_token_ms > 0
    assert answer.tokens_per_second and answer.tokens_per_second > 0

    usage = await BudgetUsage.objects.aget(user=user, period="day")
    assert usage.tokens_reserved == 0
    assert usage.tokens_used == answer.prompt_tokens + answer.completion_tokens
    actions = [a async for a in AuditEvent.objects.values_list("action", flat=True)]
    assert "turn.admitted" in actions and "turn.generated" in actions
    await comm.disconnect()


async def test_history_is_part_of_the_next_prompt() -> None:
    _, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text="My name is Zorblax.")
    first = await _first_answer_id(comm)
    await receive_until(comm, first, {"complete"})
    await send(comm, text="What is my name?")
    second = await _first_answer_id(comm)
    await receive_until(comm, second, {"complete"})
    messages = await _messages(conversation.pk)
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3].prompt_tokens > messages[1].prompt_tokens  # type: ignore[operator]
    await comm.disconnect()


async def test_stop_ends_the_answer_and_keeps_the_partial_text(chat_model) -> None:  # type: ignore[no-untyped-def]
    chat_model.max_output_tokens = 400
    await chat_model.asave()
    _, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text="Write a long story about a lighthouse keeper and the sea.")
    answer_id = await _first_answer_id(comm)
    streamed = ""
    while not streamed:  # wait until some of the answer has reached the page
        frame = await receive(comm)
        streamed = next((t for m, st, t in frame.messages if m == answer_id and t), "")
    await send(comm, action="stop", message_id=answer_id)
    await receive_until(comm, answer_id, {"stopped"}, timeout=15)

    answer = (await _messages(conversation.pk))[1]
    assert answer.status == "stopped"
    assert " ".join(answer.content.split()).startswith(streamed[:-1])
    assert 0 < answer.completion_tokens < 400  # type: ignore[operator]
    await comm.disconnect()


async def test_over_quota_message_is_refused_with_reason_and_reset_time() -> None:
    user, conversation, cookie = await _user_with_conversation()
    await UsageLimit.objects.acreate(user=user, tokens_per_day=20)
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text="Hello there")
    frame = await receive(comm)
    while not frame.messages:
        frame = await receive(comm)
    [(_, status, _)] = frame.messages
    assert status == "refused"
    assert "Daily token quota reached" in frame.raw and "resets at 00:00 UTC" in frame.raw

    [question] = await _messages(conversation.pk)
    assert question.status == "refused" and question.content == "Hello there"
    assert await AuditEvent.objects.filter(action="turn.refused").aexists()
    await comm.disconnect()


async def test_redelivered_task_does_not_answer_twice() -> None:
    from chat.generation import reply_generate

    _, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text="Say hello.")
    answer_id = await _first_answer_id(comm)
    await receive_until(comm, answer_id, {"complete"})
    before = (await _messages(conversation.pk))[1]

    await sync_to_async(reply_generate)(message_id=answer_id, attempt=1)

    messages = await _messages(conversation.pk)
    assert len(messages) == 2
    assert messages[1].content == before.content and messages[1].status == "complete"
    await comm.disconnect()


async def test_a_second_message_waits_for_the_running_answer() -> None:
    _, conversation, cookie = await _user_with_conversation()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text="Tell me about the moon.")
    answer_id = await _first_answer_id(comm)
    await send(comm, text="And the sun?")
    frames = await receive_until(comm, answer_id, {"complete"})
    notices = [f.notice for f in frames if f.notice]
    assert any("Wait for the current answer" in n for n in notices)
    assert len(await _messages(conversation.pk)) == 2
    await asyncio.sleep(0)
    await comm.disconnect()
