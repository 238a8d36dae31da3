"""Knowledge bases in a conversation: who may use which, passages in the prompt, citations
stored on the answer and opened from the page, and the "nothing relevant" answer."""

import re

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group
from django.test import Client

from chat.context import NO_MATCH_ANSWER
from chat.knowledge.ingestion import document_ingest, document_upload
from chat.models import Citation, Conversation, KnowledgeBase, Message
from chat.rendering import MessageView
from chat.services import conversation_create
from governance.models import AuditEvent, BudgetUsage
from tests.chat.knowledge_helpers import knowledge_base_create
from tests.chat.wsclient import communicator, receive, receive_until, send
from tests.factories import session_cookie_for, user_create

pytestmark = pytest.mark.django_db(transaction=True)

LEAVE = (
    "Annual leave policy. Every employee of Northwind Ferries receives twenty-eight days of "
    "paid annual leave per year. Unused leave of up to five days may be carried over into the "
    "next year."
)


def _kb_with_document(name: str, group: Group, text: str = LEAVE) -> KnowledgeBase:
    kb = knowledge_base_create(name)
    kb.groups.add(group)
    document = document_upload(
        knowledge_base=kb, filename=f"{name.lower()}.txt", data=text.encode(), actor=None
    )
    document_ingest(document_id=document.pk, generation=document.generation)
    return kb


@sync_to_async
def _setup(with_kb: bool = True):  # type: ignore[no-untyped-def]
    staff = Group.objects.create(name="staff")
    user = user_create()
    user.groups.add(staff)
    conversation = conversation_create(user=user)
    kb = _kb_with_document("Policies", staff)
    if with_kb:
        conversation.knowledge_bases.add(kb)
    return user, conversation, kb, session_cookie_for(user)


async def _connect(conversation_id: int, cookie: str):  # type: ignore[no-untyped-def]
    comm = communicator(conversation_id, cookie)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def _answer_id(comm) -> int:  # type: ignore[no-untyped-def]
    while True:
        frame = await receive(comm)
        for message_id, status, _ in frame.messages:
            if status in ("pending", "streaming"):
                return message_id


async def test_a_user_can_choose_only_knowledge_bases_their_groups_may_use() -> None:
    _user, conversation, kb, cookie = await _setup(with_kb=False)
    secret = await sync_to_async(knowledge_base_create)("Board minutes")  # no group may use it
    comm = await _connect(conversation.pk, cookie)

    await send(comm, action="knowledge", knowledge_base=[str(kb.pk), str(secret.pk)])
    frame = await receive(comm)
    assert frame.notice == "You may not use one of those knowledge bases."
    assert not await Conversation.knowledge_bases.through.objects.filter(
        conversation_id=conversation.pk
    ).aexists()

    await send(comm, action="knowledge", knowledge_base=str(kb.pk))
    frame = await receive(comm)
    assert frame.notice == "Knowledge bases in use: Policies."
    chosen = [
        pk
        async for pk in Conversation.knowledge_bases.through.objects.filter(
            conversation_id=conversation.pk
        ).values_list("knowledgebase_id", flat=True)
    ]
    assert chosen == [kb.pk]
    assert await AuditEvent.objects.filter(action="conversation.knowledge_bases_set").aexists()

    await send(comm, action="knowledge", knowledge_base="not-a-number")
    frame = await receive(comm)
    assert frame.notice == "Those knowledge bases could not be read."
    await comm.disconnect()


def test_the_picker_lists_only_the_knowledge_bases_the_user_may_use() -> None:
    staff = Group.objects.create(name="staff")
    user = user_create()
    user.groups.add(staff)
    knowledge_base_create("Visible").groups.add(staff)
    knowledge_base_create("Hidden")
    conversation = conversation_create(user=user)
    client = Client()
    client.force_login(user)
    page = client.get(f"/chat/{conversation.pk}/").content.decode()
    assert "Visible" in page and "Hidden" not in page


@pytest.mark.usefixtures("chat_model")
async def test_an_answer_from_a_knowledge_base_stores_its_citations_and_links_them() -> None:
    user, conversation, _kb, cookie = await _setup()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text="How many days of paid annual leave do employees get?")
    answer_id = await _answer_id(comm)
    frames = await receive_until(comm, answer_id, {"complete", "failed"})
    await comm.disconnect()

    answer = await Message.objects.aget(pk=answer_id)
    assert answer.status == "complete", answer.error
    citations = [c async for c in Citation.objects.filter(message=answer).order_by("number")]
    assert [c.number for c in citations] == list(range(1, len(citations) + 1))
    assert citations[0].document_name == "policies.txt"
    assert "twenty-eight days" in citations[0].text
    assert citations[0].chunk_id is not None
    # The passages went into the prompt: far more tokens than the question alone.
    assert answer.prompt_tokens and answer.prompt_tokens > 60
    event = await AuditEvent.objects.filter(action="turn.generated").alatest("id")
    assert event.details["cited_chunks"] == [c.chunk_id for c in citations]

    # The final frame shows the sources, each a link that opens the passage.
    last = frames[-1].raw
    links = re.findall(r'href="/chat/citations/(\d+)/"', last)
    assert [int(x) for x in links] == [c.pk for c in citations]

    def open_citation(as_user):  # type: ignore[no-untyped-def]
        client = Client()
        client.force_login(as_user)
        return client.get(f"/chat/citations/{citations[0].pk}/")

    response = await sync_to_async(open_citation)(user)
    assert response.status_code == 200
    body = response.content.decode()
    assert "twenty-eight days" in body and "policies.txt" in body
    assert '<mark id="cited">' in body  # the passage, marked inside its document
    stranger = await sync_to_async(user_create)()
    assert (await sync_to_async(open_citation)(stranger)).status_code == 404


def test_citation_markers_link_only_to_sources_the_answer_was_given() -> None:
    user = user_create()
    conversation = conversation_create(user=user)
    question = Message.objects.create(
        conversation=conversation, role="user", status="sent", content="q"
    )
    answer = Message.objects.create(
        conversation=conversation,
        role="assistant",
        status="complete",
        reply_to=question,
        content="Leave is 28 days [1]; see also [7].",
    )
    citation = Citation.objects.create(
        message=answer, number=1, document_name="leave.txt", text="28 days", score=0.1
    )
    view = MessageView.of(Message.objects.prefetch_related("citations").get(pk=answer.pk))
    assert f'href="/chat/citations/{citation.pk}/"' in view.html
    assert view.html.count("<a ") == 1 and "[7]" in view.html


@pytest.mark.usefixtures("chat_model")
async def test_when_nothing_relevant_is_found_the_answer_says_so_and_cites_nothing() -> None:
    user, conversation, _kb, cookie = await _setup()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text="What is the boiling point of liquid nitrogen?")
    answer_id = await _answer_id(comm)
    frames = await receive_until(comm, answer_id, {"complete", "failed"})
    await comm.disconnect()

    answer = await Message.objects.aget(pk=answer_id)
    assert answer.status == "complete", answer.error
    assert answer.content == NO_MATCH_ANSWER.format(names="Policies")
    assert not await Citation.objects.filter(message=answer).aexists()
    assert "/chat/citations/" not in frames[-1].raw
    assert "found nothing relevant" in frames[-1].raw
    usage = await BudgetUsage.objects.aget(user=user, period="day")
    assert usage.tokens_used == 0 and usage.tokens_reserved == 0


@pytest.mark.usefixtures("chat_model")
async def test_a_knowledge_base_the_user_may_no_longer_use_is_not_searched() -> None:
    user, conversation, _kb, cookie = await _setup()
    await sync_to_async(user.groups.clear)()
    comm = await _connect(conversation.pk, cookie)
    await send(comm, text="How many days of paid annual leave do employees get?")
    answer_id = await _answer_id(comm)
    await receive_until(comm, answer_id, {"complete", "failed"})
    await comm.disconnect()
    answer = await Message.objects.aget(pk=answer_id)
    assert answer.status == "complete"
    assert not await Citation.objects.filter(message=answer).aexists()
    assert answer.content != NO_MATCH_ANSWER.format(names="Policies")
