"""A user chooses a tier in the conversation; the deployment's tier rules route on it."""

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from chat.models import Conversation
from chat.services import conversation_create, turn_submit
from governance.models import AuditEvent, UsageLimit
from models_admin.models import TierRule
from tests.chat.wsclient import communicator, receive, send
from tests.factories import session_cookie_for, user_create
from tests.models_admin.registry_helpers import deployment_create, version_create

pytestmark = pytest.mark.django_db(transaction=True)


@sync_to_async
def _setup():  # type: ignore[no-untyped-def]
    small, large = version_create(version="small"), version_create(version="large")
    default = deployment_create(alias="chat-default", primary=small, queue="unserved")
    bigger = deployment_create(alias="chat-large", primary=large, queue="unserved")
    TierRule.objects.create(deployment=default, target=bigger, user_choice="large")
    UsageLimit.objects.get_or_create(
        user=None, group=None, api_key=None, defaults={"tokens_per_day": 200_000}
    )
    user = user_create()
    conversation = conversation_create(user=user)
    return user, conversation, small, large, session_cookie_for(user)


async def test_a_chosen_tier_routes_the_next_turns_and_an_unknown_one_is_refused() -> None:
    user, conversation, small, large, cookie = await _setup()
    comm = communicator(conversation.pk, cookie)
    connected, _ = await comm.connect()
    assert connected

    await send(comm, action="tier", tier="huge")
    assert (
        await receive(comm)
    ).notice == "That tier is not offered for the model of this conversation."
    await send(comm, action="tier", tier=["large"])
    assert (
        await receive(comm)
    ).notice == "That tier is not offered for the model of this conversation."
    assert (await Conversation.objects.aget(pk=conversation.pk)).tier == ""

    await send(comm, action="tier", tier="large")
    assert (await receive(comm)).notice == "Answers now come from the large tier."
    await comm.disconnect()
    assert (await Conversation.objects.aget(pk=conversation.pk)).tier == "large"
    assert await AuditEvent.objects.filter(action="conversation.tier_set").aexists()

    outcome = await sync_to_async(turn_submit)(
        user=user, conversation_id=conversation.pk, text="Hello"
    )
    assert outcome.answer is not None and outcome.answer.model_version_id == large.pk

    # A conversation on the default tier stays on the deployment itself.
    plain = await sync_to_async(conversation_create)(user=user)
    other = await sync_to_async(turn_submit)(user=user, conversation_id=plain.pk, text="Hello")
    assert other.answer is not None and other.answer.model_version_id == small.pk


def test_the_page_offers_the_deployments_tiers_only_where_there_are_some(client: Client) -> None:
    small, large = version_create(version="small"), version_create(version="large")
    default = deployment_create(alias="chat-default", primary=small)
    user = user_create()
    conversation = conversation_create(user=user)
    client.force_login(user)
    page = client.get(f"/chat/{conversation.pk}/").content.decode()
    assert 'id="tier-picker"' not in page

    bigger = deployment_create(alias="chat-large", primary=large)
    TierRule.objects.create(deployment=default, target=bigger, user_choice="large")
    page = client.get(f"/chat/{conversation.pk}/").content.decode()
    assert 'id="tier-picker"' in page and '<option value="large">large</option>' in page
