"""Turns survive a primary that is down (fallback chain, a breaker shared by every worker), say
so clearly when nothing can answer, and copy requests to a shadow that is never shown."""

import time

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import conversation_create, turn_retry, turn_submit
from governance.models import AuditEvent
from models_admin.breaker import breaker_state
from models_admin.models import Deployment, DeploymentFallback, ModelVersion, ShadowAnswer
from tests.chat.wsclient import communicator, receive, receive_until, send
from tests.conftest import REMOTE_KEY_ENV, RemoteServer
from tests.factories import session_cookie_for, user_create
from tests.models_admin.registry_helpers import remote_version_create, version_create

pytestmark = pytest.mark.django_db(transaction=True)


def _dead_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def primary_down_with_fallback(
    fallback: ModelVersion, *, version: str = "remote-primary", **fields: object
) -> ModelVersion:
    """chat-default's primary becomes a remote version nobody listens for, `fallback` behind."""
    primary = remote_version_create(
        base_url=_dead_url(),
        version=version,
        api_key_env=REMOTE_KEY_ENV,
        max_retries=0,
        max_output_tokens=24,
        temperature=0,
        **fields,
    )
    deployment = Deployment.objects.get(alias="chat-default")
    deployment.primary_version = primary
    deployment.save()
    DeploymentFallback.objects.create(deployment=deployment, version=fallback)
    return primary


def _answered(user, conversation_id: int, text: str, timeout: float = 120) -> Message:  # type: ignore[no-untyped-def]
    outcome = turn_submit(user=user, conversation_id=conversation_id, text=text)
    assert outcome.answer is not None
    deadline = time.monotonic() + timeout
    while (answer := Message.objects.get(pk=outcome.answer.pk)).status in ("pending", "streaming"):
        assert time.monotonic() < deadline, "the answer never finished"
        time.sleep(0.2)
    return answer


def _targets(answer: Message) -> list[dict]:  # type: ignore[type-arg]
    event = AuditEvent.objects.get(action="turn.generated", target_id=str(answer.pk))
    return event.details.get("targets", [])


def test_turns_fall_back_while_the_primary_is_down_and_its_breaker_is_shared_by_every_worker(
    chat_model,  # type: ignore[no-untyped-def]
    spare_worker,
    openai_server: RemoteServer,
) -> None:
    _, spare_queue = spare_worker
    primary = primary_down_with_fallback(chat_model, breaker_failures=2, breaker_cooldown_s=3)
    deployment = Deployment.objects.get(alias="chat-default")
    user = user_create(username="carol")
    conversation = conversation_create(user=user)

    # The session's worker: the primary fails twice (answered by the fallback) and opens.
    for text in ("Hello?", "And again?"):
        answer = _answered(user, conversation.pk, text)
        assert answer.status == "complete" and answer.content
        assert answer.model_version_id == chat_model.pk, "the fallback answered"
        assert _targets(answer)[0]["version"] == primary.pk
        assert _targets(answer)[0]["outcome"] == "failed"
    assert breaker_state(version_id=primary.pk).state == "open"

    # Another worker process skips the primary without trying it: it reads the same breaker.
    Deployment.objects.filter(pk=deployment.pk).update(queue=spare_queue)
    answer = _answered(user, conversation.pk, "Still there?")
    assert answer.status == "complete" and answer.model_version_id == chat_model.pk
    assert _targets(answer)[0] == {"version": primary.pk, "outcome": "breaker open"}

    # The primary comes back; after the cool-down the next turn probes it and closes the breaker.
    ModelVersion.objects.filter(pk=primary.pk).update(base_url=openai_server.url)
    time.sleep(3.2)
    answer = _answered(user, conversation.pk, "Now?")
    assert answer.status == "complete" and answer.content
    assert answer.model_version_id == primary.pk, "the remote primary answered again"
    assert breaker_state(version_id=primary.pk).state == "closed"


def test_when_every_version_fails_the_user_is_told_and_keeps_the_message_for_retry(
    chat_model,  # type: ignore[no-untyped-def]
) -> None:
    primary = remote_version_create(base_url=_dead_url(), version="dead-1", max_retries=1)
    fallback = remote_version_create(base_url=_dead_url(), version="dead-2", max_retries=0)
    deployment = Deployment.objects.get(alias="chat-default")
    deployment.primary_version = primary
    deployment.save()
    DeploymentFallback.objects.create(deployment=deployment, version=fallback)
    user = user_create(username="dave")
    conversation = conversation_create(user=user)

    answer = _answered(user, conversation.pk, "Is anyone there?")
    assert answer.status == "failed"
    assert "No model could answer right now" in answer.error
    assert "remote@dead-1: failed" in answer.error and "remote@dead-2: failed" in answer.error
    assert "select Retry" in answer.error
    question = answer.reply_to
    assert question is not None
    assert question.status == "sent" and question.content == "Is anyone there?"

    # Once a version can answer, Retry answers the same message.
    DeploymentFallback.objects.filter(deployment=deployment).update(version=chat_model)
    turn_retry(user=user, message_id=answer.pk)
    deadline = time.monotonic() + 120
    while (answer := Message.objects.get(pk=answer.pk)).status not in ("complete", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert answer.status == "complete" and answer.attempt == 2
    assert answer.model_version_id == chat_model.pk


async def test_a_shadow_answers_a_copy_that_is_stored_and_never_delivered(
    chat_model,  # type: ignore[no-untyped-def]
    model_artifact,
) -> None:
    shadow = await sync_to_async(version_create)(
        model_artifact,
        name="SmolLM2-135M-Instruct",
        version="shadow",
        stage=ModelVersion.Stage.STAGING,
        temperature=0.0,
        max_output_tokens=8,
    )
    await Deployment.objects.filter(alias="chat-default").aupdate(shadow_version=shadow)
    user = await sync_to_async(user_create)(username="erin")
    conversation = await sync_to_async(conversation_create)(user=user)
    comm = communicator(conversation.pk, await sync_to_async(session_cookie_for)(user))
    assert (await comm.connect())[0]

    await send(comm, text="What is the sea?")
    answer_id = None
    while answer_id is None:
        frame = await receive(comm)
        answer_id = next((m for m, s, _ in frame.messages if s in ("pending", "streaming")), None)
    frames = await receive_until(comm, answer_id, {"complete"})
    answer = await Message.objects.aget(pk=answer_id)

    deadline = time.monotonic() + 120
    while (
        not (row := await ShadowAnswer.objects.filter(request_ref=f"message:{answer_id}").afirst())
        or row.status == "pending"
    ):
        assert time.monotonic() < deadline, "the shadow never answered"
        await sync_to_async(time.sleep)(0.3)
    assert row.status == "complete" and row.answer.strip()
    assert row.version_id == shadow.pk and row.primary_version_id == chat_model.pk
    assert row.primary_answer == answer.content and row.answer != answer.content
    assert row.messages[0]["content"] == chat_model.system_prompt, "the primary's own prompt"

    # Nothing of the shadow reached the page: no frame after the primary's answer, no message.
    assert await comm.receive_nothing(timeout=2)
    assert await Message.objects.filter(conversation=conversation).acount() == 2
    shown = {m for f in frames for m, _, _ in f.messages}
    assert shown <= {answer_id, answer.reply_to_id}
    await comm.disconnect()
