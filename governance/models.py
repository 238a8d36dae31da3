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


class SafetyAction(models.TextChoices):
    """What a safety filter's trip does; the same words as `governance.safety.base.Action`."""

    OFF = "off", "off"
    FLAG = "flag", "flag (record only)"
    REDACT = "redact", "redact"
    BLOCK = "block", "block"
    HOLD = "hold", "hold for review"


class SafetyPolicy(models.Model):
    """Safety filters' actions for one deployment. Without a row, `governance.safety.policy`
    applies the built-in default (PII redacted on input, injection flagged, blocklist blocks).
    """

    deployment = models.OneToOneField(
        "models_admin.Deployment", on_delete=models.CASCADE, related_name="safety_policy"
    )
    input_pii = models.CharField(
        "PII in input", max_length=10, choices=SafetyAction.choices, default=SafetyAction.REDACT
    )
    input_injection = models.CharField(
        "prompt injection in input",
        max_length=10,
        choices=SafetyAction.choices,
        default=SafetyAction.FLAG,
    )
    input_blocklist = models.CharField(
        "blocked terms in input",
        max_length=10,
        choices=SafetyAction.choices,
        default=SafetyAction.BLOCK,
    )
    output_pii = models.CharField(
        "PII in output", max_length=10, choices=SafetyAction.choices, default=SafetyAction.FLAG
    )
    output_blocklist = models.CharField(
        "blocked terms in output",
        max_length=10,
        choices=SafetyAction.choices,
        default=SafetyAction.BLOCK,
    )
    injection_threshold = models.FloatField(
        default=0.5,
        help_text="Injection score (0 to 1) at which the injection filter trips.",
    )
    phone_region = models.CharField(
        max_length=2,
        default="US",
        help_text="Region (ISO 3166 alpha-2) for phone numbers written without a country code.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "safety policies"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(injection_threshold__gt=0, injection_threshold__lte=1),
                name="safety_policy_threshold_in_range",
                violation_error_message="The injection threshold must be above 0 and at most 1.",
            ),
            # A score has no span to mask: redacting an injection would mean nothing.
            models.CheckConstraint(
                condition=~models.Q(input_injection="redact"),
                name="safety_policy_injection_not_redacted",
                violation_error_message=(
                    "Prompt injection cannot be redacted: a score has no span to mask. "
                    "Choose flag, block or hold."
                ),
            ),
        ]

    def __str__(self) -> str:
        return f"safety policy for {self.deployment}"


class BlockedTerm(models.Model):
    """A word or phrase the blocklist filter looks for, in every deployment."""

    term = models.CharField(max_length=200, unique=True)
    note = models.CharField(max_length=200, blank=True, help_text="Why it is blocked.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["term"]

    def __str__(self) -> str:
        return self.term


class SafetyHold(models.Model):
    """A text a safety filter held for a person to review.

    The text itself stays where it was written (the chat message named by `target_type` and
    `target_id`), stored but not shown; this row says which filter held it and why (kinds and
    counts, never the matched text) and carries the review's state. A review queue claims
    pending rows with `select_for_update(skip_locked=True)` in `created_at` order.
    """

    class Direction(models.TextChoices):
        INPUT = "input"
        OUTPUT = "output"

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"

    direction = models.CharField(max_length=6, choices=Direction.choices)
    target_type = models.CharField(max_length=100)
    target_id = models.CharField(max_length=100)
    deployment = models.ForeignKey(
        "models_admin.Deployment",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    filter = models.CharField(max_length=50, help_text="The filter whose policy said hold.")
    reason = models.TextField()
    findings = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"{self.direction} hold #{self.pk} by {self.filter} ({self.status})"
