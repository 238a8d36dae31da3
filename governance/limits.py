"""Which limits apply to a request, and to whom they belong.

A request is made by a user, and maybe through one of their API keys. The user's own row (or
the default row when they have none), the row of every group they belong to, and the key's row
all apply; a request is admitted only if each of them admits it. An operator's edit takes
effect on the next request: each process keeps the rows it read only until any of them changes
(`genai_site.config_cache`).
"""

from dataclasses import dataclass
from typing import Literal

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Q

from genai_site.config_cache import config_cached
from governance.models import ApiKey, UsageLimit

SubjectKind = Literal["user", "group", "api_key"]


@dataclass(frozen=True)
class Subject:
    """Whose counters a limit runs on: the user's, a whole group's, or one key's."""

    kind: SubjectKind
    pk: int
    name: str

    @property
    def label(self) -> str:
        """How a refusal names it to the user."""
        if self.kind == "user":
            return "your"
        if self.kind == "group":
            return f"group “{self.name}”"
        return f"API key “{self.name}”"

    @property
    def usage_filter(self) -> dict[str, int]:
        return {f"{self.kind}_id": self.pk}

    def bucket_key(self, measure: str) -> str:
        return f"{settings.RATE_LIMIT_KEY_PREFIX}:{self.kind}:{self.pk}:{measure}"


@dataclass(frozen=True)
class AppliedLimit:
    subject: Subject
    limit: UsageLimit


def limits_applying(*, user: User, api_key: ApiKey | None = None) -> list[AppliedLimit]:
    """Every limit that a request by `user` (through `api_key`, if given) must pass: one query,
    kept in each process until a limit, a group or a membership changes anywhere."""
    if api_key is not None and api_key.user_id != user.pk:
        raise ValueError("The API key belongs to another user.")
    return config_cached(
        ("limits_applying", user.pk, api_key.pk if api_key is not None else None),
        lambda: _limits_read(user=user, api_key=api_key),
    )


def _limits_read(*, user: User, api_key: ApiKey | None) -> list[AppliedLimit]:
    default = Q(user__isnull=True, group__isnull=True, api_key__isnull=True)
    wanted = Q(user=user) | default | Q(group__in=user.groups.all())
    if api_key is not None:
        wanted |= Q(api_key=api_key)
    rows = list(UsageLimit.objects.filter(wanted).select_related("group", "api_key"))
    own = next((r for r in rows if r.user_id == user.pk), None)
    if own is None:
        own = next((r for r in rows if not (r.user_id or r.group_id or r.api_key_id)), None)
    applied = []
    if own is not None:
        applied.append(AppliedLimit(Subject("user", user.pk, user.get_username()), own))
    for row in rows:
        if row.group is not None:
            applied.append(AppliedLimit(Subject("group", row.group.pk, row.group.name), row))
        elif row.api_key is not None:
            applied.append(AppliedLimit(Subject("api_key", row.api_key.pk, row.api_key.name), row))
    return applied


def user_limit(*, user: User) -> UsageLimit | None:
    """The user's own limits, or the default ones."""
    return (
        UsageLimit.objects.filter(user=user).first()
        or UsageLimit.objects.filter(
            user__isnull=True, group__isnull=True, api_key__isnull=True
        ).first()
    )
