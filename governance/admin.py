from typing import Any

from django.contrib import admin
from django.http import HttpRequest

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


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "actor_label", "action", "target_type", "target_id", "ip")
    list_filter = ("action", "target_type")
    search_fields = ("actor_label", "target_id")
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
