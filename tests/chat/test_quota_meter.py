"""The chat page's quota meter, updated after each turn, and rate-limit refusals inline."""

import re
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from chat.models import Message
from chat.services import conversation_create
from governance.models import AuditEvent, BudgetUsage, UsageLimit
from tests.chat.wsclient import Frame, communicator, receive, receive_until, send
from tests.factories import session_cookie_for, user_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("chat_model")]

_DAILY = re.compile(
    r'data-period="day" data-measure="tokens".*?Today: ([\d,]+) of ([\d,]+) tokens left', re.S
)


def _daily_left(frame: Frame) -> tuple[int, int] | None:
    found = _DAILY.search(frame.raw)
    if not found:
        return None
    return int(found.group(1).replace(",", "")), int(found.group(2).replace(",", ""))


@sync_to_async
def _setup(**limits: object):  # type: ignore[no-untyped-def]
    user = user_create()
    UsageLimit.objects.create(user=user, **limits)
    conversation = conversation_create(user=user)
    return user, conversation, session_cookie_for(user)


async def _answer_id(comm) -> int:  # type: ignore[no-untyped-def]
    while True:
        frame = await receive(comm)
        for message_id, status, _ in frame.messages:
            if status in ("pending", "streaming"):
                return message_id


async def test_the_meter_is_updated_after_each_turn_and_the_turn_is_charged_its_cost(
    chat_model,  # type: ignore[no-untyped-def]
) -> None:
    chat_model.price_per_1k_input_tokens = Decimal("0.5")
    chat_model.price_per_1k_output_tokens = Decimal("2")
    await chat_model.asave()
    user, conversation, cookie = await _setup(tokens_per_day=5000, cost_per_day=Decimal(1))
    client = AsyncClient()
    await client.aforce_login(user)
    page = (await client.get(f"/chat/{conversation.pk}/")).content.decode()
    assert "Today: 5,000 of 5,000 tokens left" in page

    comm = communicator(conversation.pk, cookie)
    assert (await comm.connect())[0]
    await send(comm, text="Say hi.")
    answer_id = await _answer_id(comm)
    frames = await receive_until(comm, answer_id, {"complete"})
    left, limit = _daily_left(frames[-1]) or (None, None)
    usage = await BudgetUsage.objects.aget(user=user, period="day")
    assert limit == 5000 and usage.tokens_reserved == 0
    assert left == 5000 - usage.tokens_used and usage.tokens_used > 0

    answer = await Message.objects.aget(pk=answer_id)
    assert answer.prompt_tokens and answer.completion_tokens
    cost = (Decimal(answer.prompt_tokens) * Decimal("0.5") + answer.completion_tokens * 2) / 1000
    assert usage.cost_used == cost.quantize(Decimal("0.000001")) and usage.cost_reserved == 0
    generated = await AuditEvent.objects.aget(action="turn.generated", target_id=str(answer_id))
    assert Decimal(generated.details["cost"]) == usage.cost_used
    spend = re.search(r"Today: ([\d.]+) of ([\d.]+) left to spend", frames[-1].raw)
    assert spend is not None and spend.group(2) == "1.00"
    assert Decimal(spend.group(1)) == Decimal(1) - usage.cost_used
    await comm.disconnect()


async def test_a_rate_limited_message_is_refused_inline_with_when_to_retry() -> None:
    _, conversation, cookie = await _setup(requests_per_minute=1, tokens_per_day=100_000)
    comm = communicator(conversation.pk, cookie)
    assert (await comm.connect())[0]
    await send(comm, text="Say hi.")
    answer_id = await _answer_id(comm)
    await receive_until(comm, answer_id, {"complete"})
    await send(comm, text="And again.")
    frame = await receive(comm)
    while not any(st == "refused" for _, st, _ in frame.messages):
        frame = await receive(comm)
    assert "Rate limit reached: your limit of 1 requests per minute" in frame.raw
    assert re.search(r"Try again in \d+ s", frame.raw)
    refused = await Message.objects.aget(conversation=conversation, status="refused")
    assert refused.content == "And again."
    await comm.disconnect()
