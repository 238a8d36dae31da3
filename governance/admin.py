import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse

from governance.audit import ExportFormat, audit_export, request_client_ip
from governance.models import AuditEvent, DailyTokenQuota, TokenUsage


@admin.register(DailyTokenQuota)
class DailyTokenQuotaAdmin(admin.ModelAdmin):
    list_display = ("__str__", "tokens_per_day", "updated_at")
    autocomplete_fields = ("user",)


@admin.register(TokenUsage)
class TokenUsageAdmin(admin.ModelAdmin):
    list_display = ("user", "day", "used", "reserved")
    list_filter = ("day",)
    list_select_related = ("user",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


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
