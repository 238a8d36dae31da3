"""Who may see what, and what malformed or unacceptable input gets back."""

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from chat.models import Message
from chat.services import conversation_create
from tests.chat.wsclient import communicator, receive, send
from tests.factories import PASSWORD, session_cookie_for, user_create

pytestmark = pytest.mark.django_db(transaction=True)


def test_chat_requires_login(client: Client) -> None:
    response = client.get("/chat/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_another_users_conversation_is_not_found_over_http(client: Client) -> None:
    owner = user_create(username="owner")
    conversation = conversation_create(user=owner)
    intruder = user_create(username="intruder")
    client.login(username=intruder.username, password=PASSWORD)
    assert client.get(f"/chat/{conversation.pk}/").status_code == 404
    client.login(username=owner.username, password=PASSWORD)
    assert client.get(f"/chat/{conversation.pk}/").status_code == 200


def test_user_sees_only_their_conversations_in_the_list(client: Client) -> None:
    mine = user_create(username="me")
    conversation_create(user=mine, title="mine-visible")
    conversation_create(user=user_create(username="them"), title="theirs-hidden")
    client.login(username=mine.username, password=PASSWORD)
    page = client.get("/chat/").content.decode()
    assert "mine-visible" in page and "theirs-hidden" not in page


async def test_another_users_conversation_refuses_the_socket() -> None:
    owner = await sync_to_async(user_create)(username="owner")
    conversation = await sync_to_async(conversation_create)(user=owner)
    intruder = await sync_to_async(user_create)(username="intruder")
    comm = communicator(conversation.pk, await sync_to_async(session_cookie_for)(intruder))
    connected, code = await comm.connect()
    assert not connected and code == 4403


async def test_anonymous_socket_is_refused() -> None:
    owner = await sync_to_async(user_create)(username="owner")
    conversation = await sync_to_async(conversation_create)(user=owner)
    comm = communicator(conversation.pk, "sessionid=not-a-session")
    connected, code = await comm.connect()
    assert not connected and code == 4401


async def test_socket_from_a_foreign_origin_is_refused() -> None:
    owner = await sync_to_async(user_create)(username="owner")
    conversation = await sync_to_async(conversation_create)(user=owner)
    cookie = await sync_to_async(session_cookie_for)(owner)
    comm = communicator(conversation.pk, cookie, origin=b"https://evil.example")
    connected, _ = await comm.connect()
    assert not connected


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("this is not json", "could not be read"),
        ("[1, 2, 3]", "could not be read"),
        ('{"action": "send", "text": "   "}', "Type a message"),
        ('{"action": "send", "text": 42}', "Type a message"),
        ('{"action": "send", "text": "' + "x" * 8001 + '"}', "limit is 8,000"),
        ('{"action": "explode"}', "Unknown action"),
        ('{"action": "stop", "message_id": "abc"}', "named none"),
        ('{"action": "stop", "message_id": 999999}', "No such message"),
        ('{"action": "retry", "message_id": null}', "named none"),
    ],
)
async def test_malformed_or_unacceptable_frames_get_a_notice_and_the_socket_stays_open(
    frame: str, expected: str
) -> None:
    owner = await sync_to_async(user_create)(username="owner")
    conversation = await sync_to_async(conversation_create)(user=owner)
    comm = communicator(conversation.pk, await sync_to_async(session_cookie_for)(owner))
    assert (await comm.connect())[0]
    await comm.send_to(text_data=frame)
    reply = await receive(comm, timeout=10)
    assert reply.notice is not None and expected in reply.notice
    # Still open, still answering:
    await send(comm, action="explode")
    assert "Unknown action" in ((await receive(comm, timeout=10)).notice or "")
    assert not await Message.objects.filter(conversation=conversation).aexists()
    await comm.disconnect()


async def test_user_cannot_stop_another_users_answer() -> None:
    owner = await sync_to_async(user_create)(username="owner")
    theirs = await sync_to_async(conversation_create)(user=owner)
    question = await Message.objects.acreate(
        conversation=theirs, role="user", status="sent", content="hi"
    )
    answer = await Message.objects.acreate(
        conversation=theirs, role="assistant", status="pending", reply_to=question, attempt=1
    )
    intruder = await sync_to_async(user_create)(username="intruder")
    mine = await sync_to_async(conversation_create)(user=intruder)
    comm = communicator(mine.pk, await sync_to_async(session_cookie_for)(intruder))
    assert (await comm.connect())[0]
    await send(comm, action="stop", message_id=answer.pk)
    assert "No such message" in ((await receive(comm, timeout=10)).notice or "")
    await answer.arefresh_from_db()
    assert answer.status == "pending"
    await comm.disconnect()
