import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import phonenumbers
from asgiref.sync import sync_to_async
from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse

from governance.api_keys import api_key_create, api_key_revoke
from governance.audit import ExportFormat, audit_export, request_client_ip
from governance.models import (
    ApiKey,
    AuditEvent,
    BlockedTerm,
    BudgetUsage,
    RetentionPolicy,
    ReviewItem,
    ReviewPolicy,
    SafetyHold,
    SafetyPolicy,
    UsageLimit,
)


@admin.register(UsageLimit)
class UsageLimitAdmin(admin.ModelAdmin):
    """Edits apply to the next request: limits are read on every admission."""

    list_display = (
        "__str__",
        "requests_per_minute",
        "tokens_per_minute",
        "tokens_per_day",
        "tokens_per_month",
        "cost_per_day",
        "cost_per_month",
        "updated_at",
    )
    list_select_related = ("user", "group", "api_key")
    autocomplete_fields = ("user", "group")
    raw_id_fields = ("api_key",)
    fieldsets = (
        (
            "Applies to (one of them, or none for the default)",
            {"fields": ("user", "group", "api_key")},
        ),
        (
            "Per minute (Redis token buckets)",
            {"fields": ("requests_per_minute", "tokens_per_minute")},
        ),
        (
            "Budgets (reserved before generation, settled after)",
            {"fields": ("tokens_per_day", "tokens_per_month", "cost_per_day", "cost_per_month")},
        ),
    )


class _ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(BudgetUsage)
class BudgetUsageAdmin(_ReadOnlyAdmin):
    list_display = (
        "__str__",
        "period",
        "period_start",
        "tokens_used",
        "tokens_reserved",
        "cost_used",
        "cost_reserved",
    )
    list_filter = ("period", "period_start")
    list_select_related = ("user", "group", "api_key")


class UsageLimitInline(admin.StackedInline):
    model = UsageLimit
    fields = (
        "requests_per_minute",
        "tokens_per_minute",
        "tokens_per_day",
        "tokens_per_month",
        "cost_per_day",
        "cost_per_month",
    )
    extra = 0
    max_num = 1


class ApiKeyAddForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("user", "name", "scopes", "allowed_models", "expires_at")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Adding a key here creates its secret and shows it once; revoking is an action."""

    list_display = (
        "name",
        "prefix",
        "user",
        "scopes",
        "allowed_models",
        "expires_at",
        "revoked_at",
        "last_used_at",
    )
    list_filter = ("revoked_at", "expires_at")
    list_select_related = ("user",)
    search_fields = ("name", "prefix", "user__username")
    autocomplete_fields = ("user",)
    readonly_fields = ("prefix", "revoked_at", "last_used_at", "created_at")
    inlines = [UsageLimitInline]
    actions = ("revoke",)

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.inlines if obj is not None else []

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.readonly_fields if obj is not None else ()

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, raw = api_key_create(
            user=obj.user,
            name=obj.name,
            scopes=obj.scopes,
            expires_at=obj.expires_at,
            allowed_models=obj.allowed_models,
            actor=request.user,  # type: ignore[arg-type]
            ip=request_client_ip(request),
        )
        obj.pk = created.pk
        obj.prefix = created.prefix
        obj.secret_hash = created.secret_hash
        obj.created_at = created.created_at
        messages.warning(
            request,
            f"The new key is {raw} — copy it now; it is not stored and will not be shown again.",
        )

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        with transaction.atomic():
            for api_key in queryset:
                api_key_revoke(
                    api_key_id=api_key.pk,
                    actor=request.user,  # type: ignore[arg-type]
                    ip=request_client_ip(request),
                )
        messages.success(request, f"Revoked {queryset.count()} key(s).")


@admin.register(RetentionPolicy)
class RetentionPolicyAdmin(admin.ModelAdmin):
    list_display = ("__str__", "conversation_days", "updated_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not RetentionPolicy.objects.exists()


async def _in_batches(lines: Iterator[str], size: int = 500) -> AsyncIterator[str]:
    # Daphne serves responses asynchronously and would read a plain iterator into memory
    # first. The lines come from a database cursor, so pull them in the request's sync thread,
    # a batch at a time.
    take = sync_to_async(lambda: "".join(itertools.islice(lines, size)), thread_sensitive=True)
    while batch := await take():
        yield batch


def _export_response(
    request: HttpRequest, queryset: QuerySet[AuditEvent], fmt: ExportFormat
) -> StreamingHttpResponse:
    lines = audit_export(
        events=queryset,
        fmt=fmt,
        actor=request.user,
        ip=request_client_ip(request),
    )
    content_type = "text/csv; charset=utf-8" if fmt == "csv" else "application/jsonl; charset=utf-8"
    response = StreamingHttpResponse(_in_batches(lines), content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="audit-events.{fmt}"'
    return response


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only. To export what a filter shows, select all matching events, then an action."""

    list_display = ("created_at", "actor_label", "action", "target_type", "target_id", "ip")
    list_filter = ("action", "target_type", ("actor", admin.RelatedOnlyFieldListFilter))
    search_fields = ("actor_label", "target_id")
    date_hierarchy = "created_at"
    actions = ("export_csv", "export_jsonl")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Export selected events as CSV", permissions=["view"])
    def export_csv(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent]
    ) -> StreamingHttpResponse:
        return _export_response(request, queryset, "csv")

    @admin.action(description="Export selected events as JSON lines", permissions=["view"])
    def export_jsonl(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent]
    ) -> StreamingHttpResponse:
        return _export_response(request, queryset, "jsonl")


class SafetyPolicyForm(forms.ModelForm):
    class Meta:
        model = SafetyPolicy
        fields = (
            "deployment",
            "input_pii",
            "input_injection",
            "input_blocklist",
            "output_pii",
            "output_blocklist",
            "injection_threshold",
            "phone_region",
        )

    def clean_phone_region(self) -> str:
        region = str(self.cleaned_data["phone_region"]).upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise forms.ValidationError(f"'{region}' is not a region code phone numbers use.")
        return region


@admin.register(SafetyPolicy)
class SafetyPolicyAdmin(admin.ModelAdmin):
    form = SafetyPolicyForm
    list_display = (
        "deployment",
        "input_pii",
        "input_injection",
        "input_blocklist",
        "output_pii",
        "output_blocklist",
        "injection_threshold",
        "updated_at",
    )
    list_select_related = ("deployment",)
    fieldsets = (
        (None, {"fields": ("deployment",)}),
        ("Input", {"fields": ("input_pii", "input_injection", "input_blocklist")}),
        ("Output (checked as it streams)", {"fields": ("output_pii", "output_blocklist")}),
        ("Detectors", {"fields": ("injection_threshold", "phone_region")}),
    )


@admin.register(BlockedTerm)
class BlockedTermAdmin(admin.ModelAdmin):
    list_display = ("term", "note", "created_at")
    search_fields = ("term",)


@admin.register(SafetyHold)
class SafetyHoldAdmin(admin.ModelAdmin):
    """Read-only until the review queue decides holds; the held text is on the message."""

    list_display = ("created_at", "direction", "filter", "target_id", "user", "status")
    list_filter = ("status", "direction", "filter")
    list_select_related = ("user",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ReviewPolicy)
class ReviewPolicyAdmin(admin.ModelAdmin):
    """Which answers go to a reviewer; edits (audited by the admin site) apply at once."""

    list_display = (
        "name",
        "kind",
        "is_active",
        "deployment",
        "priority",
        "time_limit_minutes",
        "overdue_action",
    )
    list_filter = ("kind", "is_active", "overdue_action")
    list_editable = ("is_active", "priority")
    raw_id_fields = ("model_version",)


@admin.register(ReviewItem)
class ReviewItemAdmin(_ReadOnlyAdmin):
    """Decisions are made at /review/, where they are leased and audited."""

    list_display = (
        "created_at",
        "kind",
        "policy",
        "target_type",
        "target_id",
        "model_version",
        "status",
        "delivered",
        "decided_at",
    )
    list_filter = ("status", "kind", "delivered")
    list_select_related = ("policy", "model_version")
    exclude = ("user",)  # identity is for those with the identity permission, at /review/

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
