"""Deployments and policies are read from each process's cache, and every change reaches every
process at its next request: saves, queryset updates, in this process and in the worker."""

import time
from collections.abc import Iterator

import pytest
from django.db import connection, transaction

from chat.models import Job
from genai_site import config_cache
from governance.models import ReviewPolicy
from models_admin.models import Deployment
from models_admin.routing import DeploymentUnavailable, route_choose
from tests.chat.api_helpers import http, key_for
from tests.chat.test_api_controls import FRANCE
from tests.models_admin.registry_helpers import deployment_create, version_create


@pytest.mark.django_db(transaction=True)
def test_a_second_read_takes_no_query_and_an_update_is_seen_at_once(
    django_assert_num_queries,  # type: ignore[no-untyped-def]
) -> None:
    deployment_create(alias="cached", primary=version_create(version="v1"))
    assert route_choose(alias="cached", sticky_key=1).deployment.alias == "cached"
    with django_assert_num_queries(0):
        route = route_choose(alias="cached", sticky_key=1)
    # Callers get their own copy: changing it changes nothing for the next request.
    route.deployment.is_active = False
    assert route_choose(alias="cached", sticky_key=1).deployment.is_active

    Deployment.objects.filter(alias="cached").update(is_active=False)
    with pytest.raises(DeploymentUnavailable, match="switched off"):
        route_choose(alias="cached", sticky_key=1)


@pytest.mark.django_db(transaction=True)
def test_a_change_not_yet_committed_is_read_by_its_writer_alone_and_a_rollback_leaves_nothing() -> (
    None
):
    deployment = deployment_create(alias="pending", primary=version_create(version="v1"))
    route_choose(alias="pending", sticky_key=1)  # cached while active

    class Undo(Exception):
        pass

    with pytest.raises(Undo):
        with transaction.atomic():
            deployment.is_active = False
            deployment.save()
            with pytest.raises(DeploymentUnavailable):
                route_choose(alias="pending", sticky_key=1)
            raise Undo
    assert route_choose(alias="pending", sticky_key=1).deployment.is_active


@pytest.mark.django_db(transaction=True)
def test_a_change_behind_the_orms_back_waits_for_config_cache_clear() -> None:
    deployment_create(alias="raw", primary=version_create(version="v1"))
    route_choose(alias="raw", sticky_key=1)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE models_admin_deployment SET is_active = false WHERE alias = 'raw'")
    assert route_choose(alias="raw", sticky_key=1).deployment.is_active, "documented: not seen"
    config_cache.config_cache_clear()
    with pytest.raises(DeploymentUnavailable):
        route_choose(alias="raw", sticky_key=1)


@pytest.fixture
def redis_away(settings) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """The settings cache's own Redis client, as the code builds it, pointed where none listens."""
    config_cache._client.cache_clear()
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    yield
    config_cache._client.cache_clear()


@pytest.mark.django_db(transaction=True)
def test_without_redis_every_read_goes_to_the_database_at_once(
    redis_away: None,
    django_assert_num_queries,  # type: ignore[no-untyped-def]
) -> None:
    deployment_create(alias="no-redis", primary=version_create(version="v1"))
    started = time.monotonic()
    for _ in range(2):
        with django_assert_num_queries(2):  # the deployment, its tier rules
            route_choose(alias="no-redis", sticky_key=1)
    # Not after redis-py's default retries, which take about 8 s a read.
    assert time.monotonic() - started < 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("chat_model")
def test_the_worker_applies_a_policy_made_and_then_switched_off_after_it_cached_the_policies(
    live_asgi_server: str,
) -> None:
    body = {"model": "chat-default", "messages": FRANCE, "max_tokens": 8}
    with http(live_asgi_server, key_for()) as api:
        assert api.post("/chat/completions", json=body).json()["object"] == "chat.completion"

        policy = ReviewPolicy.objects.create(
            name="approve all",
            kind=ReviewPolicy.Kind.DEPLOYMENT_APPROVAL,
            deployment=Deployment.objects.get(alias="chat-default"),
        )
        held = api.post("/chat/completions", json=body)
        assert held.status_code == 202, held.text
        assert Job.objects.get(public_id=held.json()["id"]).status == Job.Status.HELD_FOR_REVIEW

        ReviewPolicy.objects.filter(pk=policy.pk).update(is_active=False)
        answered = api.post("/chat/completions", json=body)
        assert answered.status_code == 200, answered.text


def test_a_process_drops_what_it_read_under_older_generations() -> None:
    # One entry per user and key (the limits): another process's change must not leave them all.
    config_cache.config_cached(("old-entry",), lambda: 1)
    config_cache._client().incr(config_cache._GENERATION_KEY)  # as another process announces
    assert config_cache.config_cached(("new-entry",), lambda: 2) == 2
    assert ("old-entry",) not in config_cache._entries
    assert ("new-entry",) in config_cache._entries


class _Unpicklable:
    def __init__(self) -> None:
        self.items = [1]
        self.callback = lambda: None  # a lambda cannot be pickled


@pytest.mark.parametrize("make", [lambda: {"items": [1]}, _Unpicklable], ids=["pickled", "copied"])
def test_every_caller_gets_its_own_copy_of_what_the_loader_gave(make) -> None:  # type: ignore[no-untyped-def]
    key = ("copies", make.__name__)
    loaded = config_cache.config_cached(key, make)
    mutable = loaded["items"] if isinstance(loaded, dict) else loaded.items
    mutable.append(2)  # the loader's own value, changed after it was cached
    first, second = (config_cache.config_cached(key, make) for _ in range(2))
    assert first is not second
    for copy in (first, second):
        assert (copy["items"] if isinstance(copy, dict) else copy.items) == [1]


def test_a_counter_that_went_missing_starts_at_a_random_value_and_an_unsent_change_is_sent_later(
    settings,  # type: ignore[no-untyped-def]
) -> None:
    # A process may hold entries read under the old counter's values: counting from 0 again
    # could meet one of them.
    config_cache._client().delete(config_cache._GENERATION_KEY)
    restarted = config_cache._generation()
    assert restarted is not None and restarted > 2**20
    assert config_cache._generation() == restarted

    # Redis down while a change commits: the change is owed and announced by the next read.
    real_url = settings.REDIS_URL
    config_cache._client.cache_clear()
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    try:
        config_cache._bump()
        assert config_cache._generation() is None
    finally:
        config_cache._client.cache_clear()
        settings.REDIS_URL = real_url
    assert config_cache._generation() == restarted + 1
    assert config_cache._generation() == restarted + 1
