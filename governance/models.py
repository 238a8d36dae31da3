import datetime as dt
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import Group
from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from genai_site.config_cache import ConfigQuerySet


class ApiKey(models.Model):
    """A key a program presents instead of a session. Only a sha256 of the secret is stored;
    `prefix` (public, unique) finds the row and tells keys apart in lists."""

    class Scope(models.TextChoices):
        CHAT = "chat", "chat completions"
        EMBEDDINGS = "embeddings", "embeddings"
        MODELS = "models", "list models"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    scopes = ArrayField(models.CharField(max_length=20, choices=Scope.choices), default=list)
    allowed_models = ArrayField(
        models.CharField(max_length=100),
        default=list,
        blank=True,
        help_text="Model aliases this key may use, comma-separated; empty: every active model.",
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    # Keys are authenticated from each process's settings cache: a bulk update announces
    # itself as a save does.
    objects = ConfigQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def state_at(self, now: dt.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


_NON_NEGATIVE = [MinValueValidator(Decimal(0))]


def _cost_field(help_text: str = "") -> models.DecimalField:  # type: ignore[type-arg]
    return models.DecimalField(
        max_digits=14,
        decimal_places=6,
        null=True,
        blank=True,
        validators=_NON_NEGATIVE,
        help_text=help_text,
    )


class UsageLimit(models.Model):
    """Limits for one subject: a user, a group or an API key. Empty fields mean no limit.

    The row with no subject is the default for every user without a row of their own. Group rows
    are shared by the members (their counters are the group's), and a key's row applies on top
    of its owner's limits. Every limit that applies to a request must admit it.
    """

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="usage_limit",
    )
    group = models.OneToOneField(
        Group, null=True, blank=True, on_delete=models.CASCADE, related_name="usage_limit"
    )
    api_key = models.OneToOneField(
        ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="usage_limit"
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_month = models.PositiveIntegerField(null=True, blank=True)
    cost_per_day = _cost_field("In the currency of the model prices")
    cost_per_month = _cost_field("In the currency of the model prices")
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConfigQuerySet.as_manager()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(user__isnull=True, group__isnull=True)
                    | models.Q(user__isnull=True, api_key__isnull=True)
                    | models.Q(group__isnull=True, api_key__isnull=True)
                ),
                name="usage_limit_has_at_most_one_subject",
                violation_error_message="A limit applies to a user, a group or an API key: "
                "choose one of them (or none, for the default).",
            ),
            # At most one default row (no subject): NULLs must not count as distinct.
            models.UniqueConstraint(
                fields=["user", "group", "api_key"],
                name="one_usage_limit_per_subject",
                nulls_distinct=False,
                violation_error_message="There is already a limit for this subject.",
            ),
            models.CheckConstraint(
                condition=(
                    (models.Q(cost_per_day__isnull=True) | models.Q(cost_per_day__gte=0))
                    & (models.Q(cost_per_month__isnull=True) | models.Q(cost_per_month__gte=0))
                ),
                name="usage_limit_costs_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"limits for {self.subject_label}"

    @property
    def subject_label(self) -> str:
        if self.user_id:
            return f"user {self.user}"
        if self.group_id:
            return f"group {self.group}"
        if self.api_key_id:
            return f"API key {self.api_key}"
        return "everyone (default)"

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if (
            self.tokens_per_day is not None
            and self.tokens_per_month is not None
            and self.tokens_per_day > self.tokens_per_month
        ):
            errors["tokens_per_day"] = "A day cannot allow more tokens than its month."
        if (
            self.cost_per_day is not None
            and self.cost_per_month is not None
            and self.cost_per_day > self.cost_per_month
        ):
            errors["cost_per_day"] = "A day cannot allow a higher cost than its month."
        if errors:
            raise ValidationError(errors)


class BudgetUsage(models.Model):
    """One subject's spend in one period (a UTC day or month). `*_reserved` is held by answers
    in flight, `*_used` is settled. Exactly one of user, group and api_key is set."""

    class Period(models.TextChoices):
        DAY = "day"
        MONTH = "month"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE
    )
    group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.CASCADE)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE)
    period = models.CharField(max_length=5, choices=Period.choices)
    period_start = models.DateField()
    tokens_reserved = models.PositiveBigIntegerField(default=0)
    tokens_used = models.PositiveBigIntegerField(default=0)
    cost_reserved = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))
    cost_used = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "group", "api_key", "period", "period_start"],
                name="one_budget_usage_per_subject_period",
                nulls_distinct=False,
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(user__isnull=False, group__isnull=True, api_key__isnull=True)
                    | models.Q(user__isnull=True, group__isnull=False, api_key__isnull=True)
                    | models.Q(user__isnull=True, group__isnull=True, api_key__isnull=False)
                ),
                name="budget_usage_has_one_subject",
            ),
        ]

    def __str__(self) -> str:
        who = self.user or self.group or self.api_key
        return f"{who} {self.period} {self.period_start}: {self.tokens_used} tokens"


class QuotaReservation(models.Model):
    """Tokens and cost held for one answer in every budget that applies, settled (or
    released) exactly once. Prices are copied here so that a price edit while the answer runs
    does not change what it costs."""

    class Status(models.TextChoices):
        HELD = "held"
        SETTLED = "settled"
        RELEASED = "released"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL)
    usages = models.ManyToManyField(BudgetUsage, related_name="reservations", blank=True)
    tokens = models.PositiveIntegerField()
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))
    price_input_per_1k = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    price_output_per_1k = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.HELD)
    settled_tokens = models.PositiveIntegerField(null=True, blank=True)
    settled_cost = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"reservation {self.pk}: {self.tokens} ({self.status})"


class RetentionPolicy(models.Model):
    """How long conversations are kept after their last activity. One row; empty keeps them."""

    conversation_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Delete conversations this many days after their last message. "
        "Leave empty to keep them until their owner deletes them.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "retention policy"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(conversation_days__isnull=True)
                | models.Q(conversation_days__gte=1),
                name="retention_at_least_one_day",
            )
        ]

    def __str__(self) -> str:
        if self.conversation_days is None:
            return "conversations are kept"
        return f"conversations are deleted after {self.conversation_days} days"


class AuditEvent(models.Model):
    """Append-only record of what happened. Message content is referenced by id, never copied.

    Each event carries the sha256 of its own content and of the event before it (`prev_hash`),
    so `governance.audit.audit_verify` can tell an altered, removed or reordered row. The chain's
    order is `chain_position`: an event is linked into the chain as its transaction commits
    (migration 0010), so within an open transaction its `prev_hash`, `hash` and `chain_position`
    are still empty. A database trigger refuses UPDATE (but that one link) and DELETE.
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
    # NULL until the event is linked: "" would be a value, and prev_hash is unique.
    prev_hash = models.CharField(max_length=64, null=True, editable=False)  # noqa: DJ001
    hash = models.CharField(max_length=64, null=True, editable=False)  # noqa: DJ001
    chain_position = models.BigIntegerField(null=True, unique=True, editable=False)
    # Until the event is linked: the canonical text its hash is taken over, with U+001F where the
    # previous event's hash goes (JSON text never holds that character unescaped). NULL after.
    hash_input = models.TextField(null=True, editable=False)  # noqa: DJ001

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # Two events can never follow the same one: the chain cannot fork.
            models.UniqueConstraint(fields=["prev_hash"], name="audit_event_prev_hash_unique"),
            # Waiting for its commit (no link, its hashed text kept) or linked (the reverse).
            models.CheckConstraint(
                condition=models.Q(
                    chain_position__isnull=True,
                    prev_hash__isnull=True,
                    hash__isnull=True,
                    hash_input__isnull=False,
                )
                | models.Q(
                    chain_position__isnull=False,
                    prev_hash__isnull=False,
                    hash__isnull=False,
                    hash_input__isnull=True,
                ),
                name="audit_event_linked_or_waiting",
            ),
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

    objects = ConfigQuerySet.as_manager()

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

    objects = ConfigQuerySet.as_manager()

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


class ReviewPolicy(models.Model):
    """When an answer goes to a person before (or, for samples and reports, after) the user
    sees it. Edited in the admin; evaluated on every answer by `review_policy_match`."""

    class Kind(models.TextChoices):
        SAFETY_HOLD = "safety_hold", "output safety filter said hold"
        DEPLOYMENT_APPROVAL = "deployment_approval", "deployment requires approval"
        CANARY_CHECK = "canary_check", "model version being checked"
        LOW_CONFIDENCE = "low_confidence", "low confidence (mean token log-probability)"
        SENSITIVE_KNOWLEDGE = "sensitive_knowledge", "answer used a sensitive knowledge base"
        RANDOM_SAMPLE = "random_sample", "random sample (delivered, reviewed after)"
        USER_REPORT = "user_report", "a user reported the answer"

    class Overdue(models.TextChoices):
        STAY_HELD = "stay_held", "stay held (shown as overdue)"
        RELEASE = "release", "release to the user with a notice"
        REJECT = "reject", "reject with the policy's message"

    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=30, choices=Kind.choices)
    is_active = models.BooleanField(default=True)
    deployment = models.ForeignKey(
        "models_admin.Deployment",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        help_text="Only answers of this deployment; empty for every deployment.",
    )
    model_version = models.ForeignKey(
        "models_admin.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        help_text="For a version check: the version whose answers are held.",
    )
    logprob_threshold = models.FloatField(
        null=True,
        blank=True,
        help_text="For low confidence: hold answers whose mean token log-probability is below.",
    )
    sample_percent = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0)],
        help_text="For a random sample: the share of answers reviewed, in percent.",
    )
    time_limit_minutes = models.PositiveIntegerField(default=60)
    overdue_action = models.CharField(
        max_length=10, choices=Overdue.choices, default=Overdue.STAY_HELD
    )
    overdue_message = models.TextField(
        blank=True,
        help_text="Shown to the user when an overdue answer is released or rejected.",
    )
    priority = models.PositiveIntegerField(
        default=100, help_text="Lower numbers are checked first; the first policy that holds wins."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ConfigQuerySet.as_manager()

    class Meta:
        ordering = ["priority", "id"]
        verbose_name_plural = "review policies"
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(kind="low_confidence")
                | models.Q(logprob_threshold__isnull=False),
                name="review_policy_low_confidence_has_threshold",
                violation_error_message="A low-confidence policy needs a threshold.",
            ),
            models.CheckConstraint(
                condition=~models.Q(kind="random_sample")
                | models.Q(sample_percent__gte=0, sample_percent__lte=100),
                name="review_policy_sample_percent_in_range",
                violation_error_message="A random sample needs a percentage from 0 to 100.",
            ),
            models.CheckConstraint(
                condition=~models.Q(kind="canary_check") | models.Q(model_version__isnull=False),
                name="review_policy_canary_check_has_version",
                violation_error_message="A version check needs the model version to check.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_kind_display()})"


class ReviewItem(models.Model):
    """One piece of work waiting for a person: a held (or sampled, or reported) text.

    Generic by (`target_type`, `target_id`): the app that owns the target registers an adapter
    (`governance.review_targets`) that renders it and applies the decision. Kept beside
    `SafetyHold`, which stays the record of what a filter found; an item held by a filter
    points at it.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        EDITED = "edited"
        REJECTED = "rejected"
        RELEASED = "released"  # an overdue item let through by its policy, unreviewed

    policy = models.ForeignKey(ReviewPolicy, on_delete=models.PROTECT, related_name="items")
    kind = models.CharField(max_length=30, choices=ReviewPolicy.Kind.choices)
    reason = models.TextField()
    details = models.JSONField(default=dict, blank=True)
    target_type = models.CharField(max_length=100)
    target_id = models.CharField(max_length=100)
    # Whose text it is; reviewers see it only with `view_review_identity`.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    deployment = models.ForeignKey(
        "models_admin.Deployment",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    model_version = models.ForeignKey(
        "models_admin.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    # Ids of chat knowledge bases the answer drew on (governance does not import chat).
    knowledge_base_ids = ArrayField(models.IntegerField(), default=list, blank=True)
    safety_hold = models.ForeignKey(
        SafetyHold, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # True when the user already has the text (samples, reports): review happens after.
    delivered = models.BooleanField(default=False)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    due_at = models.DateTimeField()
    overdue_applied_at = models.DateTimeField(null=True, blank=True)
    original_text = models.TextField(blank=True)
    final_text = models.TextField(blank=True)
    diff = models.TextField(blank=True)
    reject_reason = models.TextField(blank=True)
    user_message = models.TextField(blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["status", "created_at"], name="review_item_queue"),
            models.Index(fields=["target_type", "target_id"], name="review_item_target"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["target_type", "target_id"],
                condition=models.Q(status="pending"),
                name="review_item_one_pending_per_target",
            ),
        ]
        permissions = [
            ("view_review_identity", "Can see whose conversation a review item is"),
        ]

    def __str__(self) -> str:
        return f"review #{self.pk} {self.target_type}:{self.target_id} ({self.status})"

    @property
    def is_overdue(self) -> bool:
        return self.status == self.Status.PENDING and self.due_at < timezone.now()
