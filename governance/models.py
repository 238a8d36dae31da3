from django.conf import settings
from django.db import models
from django.utils import timezone


class DailyTokenQuota(models.Model):
    """Tokens (prompt + completion) a user may spend per UTC day.

    The row without a user is the default for everyone without a row of their own.
    """

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE
    )
    tokens_per_day = models.PositiveIntegerField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            # At most one default row (user NULL); OneToOne alone lets NULLs repeat.
            models.UniqueConstraint(
                fields=["user"], name="one_daily_token_quota_per_user", nulls_distinct=False
            )
        ]

    def __str__(self) -> str:
        who = self.user or "everyone (default)"
        return f"{who}: {self.tokens_per_day} tokens/day"


class TokenUsage(models.Model):
    """A user's spend for one day: `reserved` is held by answers in flight, `used` is settled."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    day = models.DateField()
    reserved = models.PositiveIntegerField(default=0)
    used = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "day"], name="one_token_usage_per_user_day")
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.day}: used {self.used}, reserved {self.reserved}"


class QuotaReservation(models.Model):
    """Tokens held for one answer, settled (or released) exactly once."""

    class Status(models.TextChoices):
        HELD = "held"
        SETTLED = "settled"
        RELEASED = "released"

    usage = models.ForeignKey(TokenUsage, on_delete=models.CASCADE, related_name="reservations")
    tokens = models.PositiveIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.HELD)
    settled_tokens = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"reservation {self.pk}: {self.tokens} ({self.status})"


class AuditEvent(models.Model):
    """Append-only record of what happened. Message content is referenced by id, never copied.

    Each event carries the sha256 of its own content and of the event before it (`prev_hash`),
    so `governance.audit.audit_verify` can tell an altered, removed or reordered row. A database
    trigger (migration 0003) refuses UPDATE and DELETE.
    """

    # No database constraint and no SET_NULL: deleting a user must not rewrite (and so break)
    # the events that name them; `actor_label` keeps the name.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
    )
    actor_label = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=100, db_index=True)
    target_type = models.CharField(max_length=100, blank=True)
    target_id = models.CharField(max_length=100, blank=True)
    details = models.JSONField(default=dict, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    # Set in Python, not by the database, because it is part of the hashed content.
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    prev_hash = models.CharField(max_length=64, editable=False)
    hash = models.CharField(max_length=64, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # Two events can never follow the same one: the chain cannot fork.
            models.UniqueConstraint(fields=["prev_hash"], name="audit_event_prev_hash_unique")
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action}"
