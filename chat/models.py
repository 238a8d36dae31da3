from django.conf import settings
from django.db import models

from governance.models import QuotaReservation, SafetyHold
from models_admin.models import ModelVersion


class Conversation(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    model_alias = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["user", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"

    @property
    def channel_group(self) -> str:
        return f"chat.conversation.{self.pk}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        # user messages
        SENT = "sent"
        REFUSED = "refused"
        # either role: a safety filter kept the text for review (`safety_hold` says why)
        HELD = "held"
        # assistant messages
        PENDING = "pending"
        STREAMING = "streaming"
        COMPLETE = "complete"
        STOPPED = "stopped"
        FAILED = "failed"
        # the output filter stopped the answer; `error` says why, the text is not kept
        BLOCKED = "blocked"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=10, choices=Role.choices)
    status = models.CharField(max_length=10, choices=Status.choices)
    content = models.TextField(blank=True)
    # For an assistant message: the user message it answers (one answer per question).
    reply_to = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="reply"
    )
    # Readable reason for a refusal or a failure.
    error = models.TextField(blank=True)
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reservation = models.ForeignKey(
        QuotaReservation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Set when a safety filter held this message's text for review; the text stays in
    # `content` but is not shown to the user until a reviewer decides.
    safety_hold = models.ForeignKey(
        SafetyHold, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Bumped on every retry; a task carries the attempt it was enqueued for, so a redelivered or
    # superseded task can tell that the turn is no longer its own.
    attempt = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    tokens_per_second = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(role="user", status__in=["sent", "refused", "held"])
                    | models.Q(
                        role="assistant",
                        status__in=[
                            "pending",
                            "streaming",
                            "complete",
                            "stopped",
                            "failed",
                            "blocked",
                            "held",
                        ],
                    )
                ),
                name="message_status_fits_role",
            ),
            models.CheckConstraint(
                condition=models.Q(role="user") | models.Q(reply_to__isnull=False),
                name="assistant_message_answers_a_user_message",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.pk} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.PENDING, self.Status.STREAMING)
