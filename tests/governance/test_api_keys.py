"""API keys: created once-shown, stored hashed, authenticated, revoked, and limited."""

import datetime as dt
import io
import re

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from governance.admission import Refusal, turn_admit
from governance.api_keys import ApiKeyInvalid, api_key_authenticate, api_key_create
from governance.models import ApiKey, AuditEvent, QuotaReservation, UsageLimit
from tests.factories import user_create

pytestmark = pytest.mark.django_db(transaction=True)

KEY = re.compile(r"gsk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
PAGE = "/account/api-keys/"


def _new_key(user, **kwargs):  # type: ignore[no-untyped-def]
    return api_key_create(user=user, name="ci", scopes=["chat"], actor=user, **kwargs)


def test_create_api_key_command_prints_a_key_that_authenticates_and_is_stored_hashed() -> None:
    user = user_create(username="scripts")
    out = io.StringIO()
    call_command("create_api_key", user="scripts", name="nightly", stdout=out)
    raw = out.getvalue().strip()
    assert KEY.fullmatch(raw)
    api_key = api_key_authenticate(raw=raw)
    assert api_key.user == user and api_key.name == "nightly"
    assert raw.split("_")[1] == api_key.prefix
    assert raw not in api_key.secret_hash and len(api_key.secret_hash) == 64
    assert sorted(api_key.scopes) == ["chat", "embeddings", "models"]
    assert AuditEvent.objects.filter(action="api_key.created", target_id=str(api_key.pk)).exists()


def test_create_api_key_command_rejects_an_unknown_user_or_scope() -> None:
    user_create(username="scripts")
    with pytest.raises(CommandError, match="No user named 'nobody'"):
        call_command("create_api_key", user="nobody", name="x")
    with pytest.raises(CommandError, match="Unknown scope admin"):
        call_command("create_api_key", user="scripts", name="x", scopes="chat,admin")
    assert not ApiKey.objects.exists()


def test_unknown_revoked_and_expired_keys_are_refused_with_a_clear_error() -> None:
    user = user_create()
    api_key, raw = _new_key(user)
    with pytest.raises(ApiKeyInvalid, match="Malformed API key"):
        api_key_authenticate(raw="Bearer nonsense")
    with pytest.raises(ApiKeyInvalid, match="Unknown API key"):
        api_key_authenticate(raw=raw[:-2] + ("AA" if raw[-2:] != "AA" else "BB"))
    with pytest.raises(ApiKeyInvalid, match="Unknown API key"):
        api_key_authenticate(raw=f"gsk_zzzzzzzz_{raw.split('_', 2)[2]}")
    with pytest.raises(ApiKeyInvalid, match="Unknown API key"):
        api_key_authenticate(raw=raw + "x")

    ApiKey.objects.filter(pk=api_key.pk).update(expires_at=timezone.now() - dt.timedelta(1))
    with pytest.raises(ApiKeyInvalid, match="expired"):
        api_key_authenticate(raw=raw)

    other, other_raw = _new_key(user)
    assert api_key_authenticate(raw=other_raw) == other
    client = Client()
    client.force_login(user)
    client.post(f"{PAGE}{other.pk}/revoke/")
    with pytest.raises(ApiKeyInvalid, match="was revoked"):
        api_key_authenticate(raw=other_raw)


def test_an_expiry_in_the_past_is_rejected() -> None:
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="expiry must be in the future"):
        _new_key(user_create(), expires_at=timezone.now() - dt.timedelta(seconds=1))


def test_admission_through_a_key_applies_the_keys_own_limits() -> None:
    user = user_create()
    api_key, _ = _new_key(user, requests_per_minute=1)
    assert UsageLimit.objects.get(api_key=api_key).requests_per_minute == 1

    def admit(key):  # type: ignore[no-untyped-def]
        return turn_admit(
            user=user,
            input_tokens=10,
            max_output_tokens=10,
            target_type="api",
            target_id="x",
            api_key=key,
        )

    assert isinstance(admit(api_key), QuotaReservation)
    refusal = admit(api_key)
    assert isinstance(refusal, Refusal) and refusal.limit == "api_key.requests_per_minute"
    assert "API key “ci”" in refusal.reason and refusal.retry_after > 0
    assert isinstance(admit(None), QuotaReservation), "the key's limit is the key's alone"
    event = AuditEvent.objects.filter(action="turn.refused").get()
    assert event.details["api_key"] == api_key.prefix

    stranger_key, _ = _new_key(user_create())
    with pytest.raises(ValueError, match="another user"):
        admit(stranger_key)

    stale = ApiKey.objects.get(pk=api_key.pk)  # authenticated before the revocation
    ApiKey.objects.filter(pk=api_key.pk).update(revoked_at=timezone.now())
    with pytest.raises(ApiKeyInvalid, match="was revoked"):
        admit(stale)


def test_the_page_creates_a_key_shown_once_and_lists_and_revokes_only_ones_own() -> None:
    alice, bob = user_create(), user_create()
    bobs_key, _ = _new_key(bob)
    client = Client()
    client.force_login(alice)

    response = client.post(
        PAGE,
        {
            "name": "laptop",
            "scopes": ["chat", "models"],
            "expires_in_days": "30",
            "requests_per_minute": "5",
        },
    )
    assert response.status_code == 200
    raw = KEY.search(response.content.decode())
    assert raw is not None
    key = api_key_authenticate(raw=raw.group(0))
    assert key.user == alice and key.scopes == ["chat", "models"]
    assert key.expires_at is not None and key.usage_limit.requests_per_minute == 5

    listing = client.get(PAGE).content.decode()
    assert "laptop" in listing and key.prefix in listing
    assert raw.group(0) not in listing, "the secret is shown only once"
    assert bobs_key.prefix not in listing

    assert client.post(f"{PAGE}{bobs_key.pk}/revoke/").status_code == 404
    bobs_key.refresh_from_db()
    assert bobs_key.revoked_at is None

    assert client.post(f"{PAGE}{key.pk}/revoke/").status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert AuditEvent.objects.filter(action="api_key.revoked", actor=alice).count() == 1


def test_the_page_rejects_a_key_without_name_or_scope_and_saves_nothing() -> None:
    client = Client()
    client.force_login(user_create())
    response = client.post(PAGE, {"name": "", "scopes": []})
    assert response.status_code == 200
    assert "This field is required" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_anonymous_visitors_are_sent_to_log_in() -> None:
    response = Client().get(PAGE)
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_a_key_seen_before_takes_no_query_and_a_revocation_or_deactivation_applies_at_once(
    django_assert_num_queries,  # type: ignore[no-untyped-def]
) -> None:
    from asgiref.sync import async_to_sync
    from django.contrib.auth.models import update_last_login

    from governance.api_keys import api_key_authenticate_async, api_key_revoke

    authenticate = async_to_sync(api_key_authenticate_async)
    user = user_create()
    api_key, raw = _new_key(user)
    other, other_raw = _new_key(user_create(username="other"))
    assert authenticate(raw=raw) == api_key
    assert authenticate(raw=other_raw) == other
    with django_assert_num_queries(0):
        assert authenticate(raw=raw).user == user
        # The prefix finds the cached key; the secret is still compared.
        with pytest.raises(ApiKeyInvalid, match="Unknown API key"):
            authenticate(raw=raw[:-1] + ("A" if raw[-1] != "A" else "B"))
    # Logging in saves only the time of the login: the keys stay cached.
    update_last_login(type(user), user)
    with django_assert_num_queries(0):
        authenticate(raw=raw)

    api_key_revoke(api_key_id=api_key.pk, actor=user)
    with pytest.raises(ApiKeyInvalid, match="was revoked"):
        authenticate(raw=raw)
    ApiKey.objects.filter(pk=other.pk).update(expires_at=timezone.now() - dt.timedelta(1))
    with pytest.raises(ApiKeyInvalid, match="expired"):
        authenticate(raw=other_raw)

    # Another process's announcement (here: the counter moved, this process's entries kept)
    # makes this one read the rows again.
    from django.db import connection

    from genai_site import config_cache

    fourth, fourth_raw = _new_key(user)
    assert authenticate(raw=fourth_raw) == fourth
    with connection.cursor() as cursor:
        cursor.execute("UPDATE governance_apikey SET revoked_at = now() WHERE id = %s", [fourth.pk])
    config_cache._client().incr(config_cache._GENERATION_KEY)
    with pytest.raises(ApiKeyInvalid, match="was revoked"):
        authenticate(raw=fourth_raw)

    third, third_raw = _new_key(user_create(username="third"))
    assert authenticate(raw=third_raw) == third
    third.user.is_active = False
    third.user.save()
    with pytest.raises(ApiKeyInvalid, match="deactivated"):
        authenticate(raw=third_raw)


def test_admission_refuses_a_key_whose_owner_was_deactivated_behind_the_cache() -> None:
    # A bulk update of users announces nothing, so the key check may still pass from the
    # cache; admission reads the key and its owner from the database on every request.
    from asgiref.sync import async_to_sync
    from django.contrib.auth.models import User

    from governance.api_keys import api_key_authenticate_async

    user = user_create()
    _, raw = _new_key(user)
    async_to_sync(api_key_authenticate_async)(raw=raw)
    User.objects.filter(pk=user.pk).update(is_active=False)
    cached = async_to_sync(api_key_authenticate_async)(raw=raw)
    with pytest.raises(ApiKeyInvalid, match="deactivated"):
        turn_admit(
            user=cached.user,
            api_key=cached,
            input_tokens=10,
            max_output_tokens=10,
            target_type="job",
            target_id="x",
        )
