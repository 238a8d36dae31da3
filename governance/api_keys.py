"""API keys: created with a secret shown once, stored as a hash, found by a public prefix.

A key reads `gsk_<prefix>_<secret>`, the prefix being 8 hex characters. The secret is 32 random
bytes, so a plain sha256 is enough to store it (a slow password hash protects guessable
secrets; these are not guessable), and authenticating costs one indexed lookup by prefix and a
constant-time comparison."""

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from genai_site.config_cache import config_cached_async
from genai_site.rows import quote, row_columns, row_load
from governance.audit import audit_record
from governance.models import ApiKey, UsageLimit

KEY_PREFIX = "gsk"
_PREFIX_BYTES = 4  # 8 hex characters: no "_", which separates the parts


class ApiKeyInvalid(Exception):
    """The presented key does not admit anyone; the message says why, without secrets."""


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_key_scopes_clean(scopes: Iterable[str]) -> list[str]:
    valid = set(ApiKey.Scope.values)
    chosen = sorted(set(scopes))
    unknown = [s for s in chosen if s not in valid]
    if unknown:
        raise ValidationError(
            f"Unknown scope {', '.join(unknown)}; choose from {', '.join(sorted(valid))}."
        )
    if not chosen:
        raise ValidationError("Choose at least one scope.")
    return chosen


@transaction.atomic
def api_key_create(
    *,
    user: User,
    name: str,
    scopes: Iterable[str],
    expires_at: dt.datetime | None = None,
    allowed_models: Iterable[str] = (),
    requests_per_minute: int | None = None,
    tokens_per_day: int | None = None,
    actor: User | None,
    ip: str | None = None,
) -> tuple[ApiKey, str]:
    """Create a key for `user`; returns it with the raw key, which is not stored anywhere."""
    name = name.strip()
    if not name:
        raise ValidationError("Give the key a name.")
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError("The expiry must be in the future.")
    chosen = api_key_scopes_clean(scopes)
    prefix = secrets.token_hex(_PREFIX_BYTES)
    raw = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    api_key = ApiKey(
        user=user,
        name=name[:100],
        prefix=prefix,
        secret_hash=_hash(raw),
        scopes=chosen,
        expires_at=expires_at,
        allowed_models=sorted({m.strip() for m in allowed_models if m.strip()}),
    )
    api_key.full_clean()
    api_key.save()
    limits = {"requests_per_minute": requests_per_minute, "tokens_per_day": tokens_per_day}
    if any(v is not None for v in limits.values()):
        limit = UsageLimit(api_key=api_key, **limits)
        limit.full_clean()
        limit.save()
    audit_record(
        actor=actor,
        action="api_key.created",
        target_type="api_key",
        target_id=api_key.pk,
        details={
            "user": user.pk,
            "name": api_key.name,
            "prefix": prefix,
            "scopes": chosen,
            "expires_at": expires_at.isoformat() if expires_at else None,
            "limits": {k: v for k, v in limits.items() if v is not None},
        },
        ip=ip,
    )
    return api_key, raw


@transaction.atomic
def api_key_revoke(*, api_key_id: int, actor: User, ip: str | None = None) -> ApiKey:
    """Revoke a key; the next request that presents it is refused. Users revoke only their
    own keys; staff with the change permission revoke anyone's."""
    api_key = ApiKey.objects.select_for_update().get(pk=api_key_id)
    if api_key.user_id != actor.pk and not actor.has_perm("governance.change_apikey"):
        raise ApiKey.DoesNotExist("No such API key.")
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        audit_record(
            actor=actor,
            action="api_key.revoked",
            target_type="api_key",
            target_id=api_key.pk,
            details={"user": api_key.user_id, "prefix": api_key.prefix},
            ip=ip,
        )
    return api_key


def _raise_unless_active(api_key: ApiKey, now: dt.datetime) -> None:
    state = api_key.state_at(now)
    if state == "revoked":
        raise ApiKeyInvalid(f"API key {api_key.prefix} was revoked.")
    if state == "expired":
        assert api_key.expires_at is not None
        raise ApiKeyInvalid(
            f"API key {api_key.prefix} expired at {api_key.expires_at:%Y-%m-%d %H:%M} UTC."
        )


_STATE_SQL = (
    f"SELECT prefix, revoked_at, expires_at, {quote(User._meta.db_table)}.is_active "
    f"FROM {quote(ApiKey._meta.db_table)} "
    f"JOIN {quote(User._meta.db_table)} ON {quote(User._meta.db_table)}.id = user_id "
    f"WHERE {quote(ApiKey._meta.db_table)}.id = %s"
)


def api_key_require_active(*, api_key_id: int) -> None:
    """Raise ApiKeyInvalid unless the key and its owner are still active now (one statement:
    admission asks on every request, from the database, whatever the request's check read
    from the settings cache)."""
    with connection.cursor() as cursor:
        cursor.execute(_STATE_SQL, [api_key_id])
        row = cursor.fetchone()
    if row is None:
        raise ApiKeyInvalid("Unknown API key.")
    prefix, revoked_at, expires_at, owner_active = row
    _raise_unless_active(
        ApiKey(prefix=prefix, revoked_at=revoked_at, expires_at=expires_at), timezone.now()
    )
    if not owner_active:
        raise ApiKeyInvalid(f"The owner of API key {prefix} is deactivated.")


_WITH_USER_SQL = (
    f"SELECT {row_columns(ApiKey)}, {row_columns(User)} FROM {quote(ApiKey._meta.db_table)} "
    f"JOIN {quote(User._meta.db_table)} ON {quote(User._meta.db_table)}.id = user_id "
    f"WHERE {quote(ApiKey._meta.db_table)}.prefix = %s"
)


def _api_key_with_user(prefix: str) -> ApiKey | None:
    """The key with this prefix and its owner, as `select_related("user")` gives them."""
    with connection.cursor() as cursor:
        cursor.execute(_WITH_USER_SQL, [prefix])
        row = cursor.fetchone()
    if row is None:
        return None
    width = len(ApiKey._meta.concrete_fields)
    api_key = row_load(ApiKey, row[:width])
    api_key.user = row_load(User, row[width:])
    return api_key


def _prefix_of(raw: str) -> str:
    parts = raw.strip().split("_", 2) if isinstance(raw, str) else []
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise ApiKeyInvalid("Malformed API key: expected gsk_<prefix>_<secret>.")
    return parts[1]


def _verify(api_key: ApiKey | None, raw: str, now: dt.datetime) -> ApiKey:
    """`api_key` if `raw` is its secret and it and its owner are active at `now`."""
    if api_key is None or not hmac.compare_digest(api_key.secret_hash, _hash(raw.strip())):
        raise ApiKeyInvalid("Unknown API key.")
    _raise_unless_active(api_key, now)
    if not api_key.user.is_active:
        raise ApiKeyInvalid(f"The owner of API key {api_key.prefix} is deactivated.")
    return api_key


# Not audited: every API request is, through admission. One write a minute per key and process.
_LAST_USED_EVERY = dt.timedelta(minutes=1)
_touched: dict[int, dt.datetime] = {}


def _touch_due(api_key: ApiKey, now: dt.datetime) -> bool:
    seen = [t for t in (api_key.last_used_at, _touched.get(api_key.pk)) if t is not None]
    return not seen or now - max(seen) > _LAST_USED_EVERY


_TOUCH_SQL = f"UPDATE {quote(ApiKey._meta.db_table)} SET last_used_at = %s WHERE id = %s"


def _touch(api_key_id: int, now: dt.datetime) -> None:
    # Not through the queryset: the time of last use changes no cached reader's answer, and
    # announcing it would drop every process's settings cache once a minute per key.
    _touched[api_key_id] = now
    with connection.cursor() as cursor:
        cursor.execute(_TOUCH_SQL, [now, api_key_id])


def api_key_authenticate(*, raw: str) -> ApiKey:
    """The active key that `raw` is, or ApiKeyInvalid saying why not."""
    prefix = _prefix_of(raw)
    now = timezone.now()
    api_key = _verify(_api_key_with_user(prefix), raw, now)
    if _touch_due(api_key, now):
        _touch(api_key.pk, now)
    return api_key


async def api_key_authenticate_async(*, raw: str) -> ApiKey:
    """`api_key_authenticate` on the event loop. The key and its owner, once read, are kept in
    this process's settings cache (`genai_site.config_cache`): a later request with that key
    takes no query and no thread, only the cache's generation read. The secret, the key's
    state and expiry and its owner's are checked on every request; revoking or changing a key,
    or changing a user, is a settings change, so the next request reads the rows again."""
    prefix = _prefix_of(raw)
    api_key = await config_cached_async(
        ("api_key", prefix), lambda: sync_to_async(api_key_authenticate)(raw=raw)
    )
    now = timezone.now()
    _verify(api_key, raw, now)
    if _touch_due(api_key, now):
        await sync_to_async(_touch)(api_key.pk, now)
    return api_key
