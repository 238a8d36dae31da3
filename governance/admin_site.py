"""The admin site, with every operator's change written to the audit log.

Django's admin reports each addition, change and deletion through `ModelAdmin.log_addition`,
`log_change` and `log_deletions`, inside the transaction of the change. `AuditedAdminSite`
mixes `AuditedModelAdmin` into every ModelAdmin registered with it, so each of those calls
also appends an AuditEvent in the same transaction: models registered later are covered
without doing anything. The bulk "delete selected" action is made atomic for the same reason.
"""

import json
from typing import Any

from django.contrib import admin
from django.contrib.admin import actions
from django.db import models, transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse

from governance.audit import audit_record, request_client_ip

# Fields whose values never go into the log, whatever model they are on.
_SECRET_FIELDS = {"password", "secret_hash"}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, models.Model):
        return value.pk
    return str(value)


def _values(obj: models.Model, names: set[str] | None = None) -> dict[str, Any]:
    """Current values of the object's fields (those whose name or verbose name is in
    `names`, if given), as JSON."""
    values = {}
    for field in obj._meta.concrete_fields:
        if field.name in _SECRET_FIELDS or field.primary_key:
            continue
        if names is not None and not {field.name, str(field.verbose_name).lower()} & names:
            continue
        values[field.name] = _json_value(field.value_from_object(obj))
    return values


def _changed_names(message: Any) -> set[str]:
    if isinstance(message, str):
        try:
            message = json.loads(message) if message else []
        except ValueError:
            return set()
    names: set[str] = set()
    for part in message or []:
        if isinstance(part, dict) and "changed" in part:
            # The admin names fields by their form labels: verbose names, capitalised.
            names.update(str(n).lower() for n in part["changed"].get("fields", []))
    return names


def _target(obj: models.Model) -> str:
    return obj._meta.label_lower


class AuditedModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def _audit(
        self, request: HttpRequest, action: str, obj: models.Model, details: dict[str, Any]
    ) -> None:
        audit_record(
            actor=request.user,
            action=f"admin.{action}",
            target_type=_target(obj),
            target_id=obj.pk,
            details={"object": str(obj)[:200], **details},
            ip=request_client_ip(request),
        )

    def log_addition(self, request: HttpRequest, obj: models.Model, message: Any) -> Any:
        entry = super().log_addition(request, obj, message)
        self._audit(request, "added", obj, {"values": _values(obj)})
        return entry

    def log_change(self, request: HttpRequest, obj: models.Model, message: Any) -> Any:
        entry = super().log_change(request, obj, message)
        names = _changed_names(message)
        self._audit(
            request, "changed", obj, {"changed": sorted(names), "values": _values(obj, names)}
        )
        return entry

    def log_deletions(self, request: HttpRequest, queryset: Any) -> Any:
        objects = list(queryset)
        entries = super().log_deletions(request, objects)  # type: ignore[arg-type]
        for obj in objects:
            self._audit(request, "deleted", obj, {"values": _values(obj)})
        return entries


def _delete_selected_atomic(
    modeladmin: admin.ModelAdmin,  # type: ignore[type-arg]
    request: HttpRequest,
    queryset: QuerySet[Any],
) -> TemplateResponse | None:
    # Django logs the deletions, then deletes: one transaction, so the log cannot outlive a
    # deletion that failed.
    with transaction.atomic():
        return actions.delete_selected(modeladmin, request, queryset)


_delete_selected_atomic.short_description = actions.delete_selected.short_description  # type: ignore[attr-defined]
_delete_selected_atomic.allowed_permissions = ("delete",)  # type: ignore[attr-defined]


class AuditedAdminSite(admin.AdminSite):
    site_header = "genai-site administration"

    def __init__(self, name: str = "admin") -> None:
        super().__init__(name)
        self._actions["delete_selected"] = _delete_selected_atomic
        self._global_actions["delete_selected"] = _delete_selected_atomic

    def register(self, model_or_iterable: Any, admin_class: Any = None, **options: Any) -> None:
        admin_class = admin_class or admin.ModelAdmin
        if not issubclass(admin_class, AuditedModelAdmin):
            admin_class = type(admin_class.__name__, (AuditedModelAdmin, admin_class), {})
        super().register(model_or_iterable, admin_class, **options)
