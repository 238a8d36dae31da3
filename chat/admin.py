from django.contrib import admin

from chat.models import Conversation, Message


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("__str__", "user", "model_alias", "updated_at")
    list_select_related = ("user",)
    search_fields = ("title", "user__username")


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("pk", "conversation", "role", "status", "completion_tokens", "created_at")
    list_filter = ("role", "status")
    list_select_related = ("conversation",)
    raw_id_fields = ("conversation", "reply_to", "reservation", "safety_hold")
