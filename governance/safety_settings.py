"""Operators' changes to safety policies and the blocklist, each audited with the change."""

from django.contrib.auth.models import AnonymousUser, User
from django.db import transaction

from governance.audit import audit_record
from governance.models import BlockedTerm, SafetyPolicy


@transaction.atomic
def safety_setting_save(
    *,
    obj: SafetyPolicy | BlockedTerm,
    actor: User | AnonymousUser,
    ip: str | None,
    changed: list[str],
) -> None:
    created = obj.pk is None
    obj.save()
    if isinstance(obj, SafetyPolicy):
        target_type, details = "safety_policy", {"deployment": obj.deployment_id}
    else:
        target_type, details = "blocked_term", {}
    audit_record(
        actor=actor,
        action=f"{target_type}.{'created' if created else 'changed'}",
        target_type=target_type,
        target_id=obj.pk,
        details={**details, "fields": sorted(changed)},
        ip=ip,
    )


@transaction.atomic
def safety_setting_delete(
    *, obj: SafetyPolicy | BlockedTerm, actor: User | AnonymousUser, ip: str | None
) -> None:
    target_type = "safety_policy" if isinstance(obj, SafetyPolicy) else "blocked_term"
    target_id = obj.pk
    obj.delete()
    audit_record(
        actor=actor,
        action=f"{target_type}.deleted",
        target_type=target_type,
        target_id=target_id,
        ip=ip,
    )
