from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from pgvector.django import HnswIndex, VectorField

from genai_site.config_cache import ConfigQuerySet
from models_admin.embeddings import EMBEDDING_DIM


class Model(models.Model):
    """A model family (e.g. SmolLM2-135M-Instruct); its versions are the servable artifacts."""

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ConfigQuerySet.as_manager()

    def __str__(self) -> str:
        return self.name


class EvaluationStatus(models.TextChoices):
    NOT_RUN = "not_run", "not run"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"


class ModelVersion(models.Model):
    class Backend(models.TextChoices):
        TRANSFORMERS = "transformers", "transformers (local worker)"
        OPENAI_COMPATIBLE = "openai-compatible", "OpenAI-compatible server (remote)"

    class Stage(models.TextChoices):
        DRAFT = "draft"
        STAGING = "staging"
        PRODUCTION = "production"
        ARCHIVED = "archived"

    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="versions")
    version = models.CharField(max_length=100)
    backend = models.CharField(max_length=30, choices=Backend.choices, default=Backend.TRANSFORMERS)
    stage = models.CharField(max_length=20, choices=Stage.choices, default=Stage.PRODUCTION)
    # Relative to settings.MODEL_STORE, so a store can move between machines. A remote version
    # may name one too: its tokenizer then counts tokens for budgets and context fitting.
    artifact_path = models.CharField(max_length=500, blank=True)
    sha256 = models.CharField(
        max_length=64, blank=True, help_text="sha256 over the artifact's weight files"
    )
    base_url = models.URLField(
        blank=True, help_text="openai-compatible only: the server's base URL, e.g. http://h:8000/v1"
    )
    remote_model = models.CharField(
        max_length=200, blank=True, help_text="openai-compatible only: the model name it serves"
    )
    api_key_env = models.CharField(
        max_length=100,
        blank=True,
        help_text="openai-compatible only: the environment variable holding the API secret",
    )
    # Lineage.
    base_model = models.CharField(max_length=200, blank=True)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    training_data = models.CharField(
        max_length=500, blank=True, help_text="Reference to the training data"
    )
    training_params = models.JSONField(default=dict, blank=True)
    # Resilience.
    first_token_timeout_s = models.FloatField(
        default=60.0, validators=[MinValueValidator(0.1)], help_text="Give up without a token"
    )
    total_timeout_s = models.FloatField(
        default=300.0, validators=[MinValueValidator(0.1)], help_text="Give up on the answer"
    )
    max_retries = models.PositiveSmallIntegerField(
        default=2, help_text="Retries for errors that say they are retryable"
    )
    retry_backoff_s = models.FloatField(
        default=0.5, validators=[MinValueValidator(0)], help_text="First retry's wait (doubles)"
    )
    breaker_failures = models.PositiveSmallIntegerField(
        default=5, validators=[MinValueValidator(1)], help_text="Failures in a row that open it"
    )
    breaker_cooldown_s = models.FloatField(
        default=30.0, validators=[MinValueValidator(0.1)], help_text="Open this long, then probe"
    )
    # The evaluation gate.
    evaluation_status = models.CharField(
        max_length=20, choices=EvaluationStatus.choices, default=EvaluationStatus.NOT_RUN
    )
    evaluation_report = models.JSONField(default=dict, blank=True)
    source = models.CharField(max_length=500, blank=True, help_text="Where it was imported from")
    context_window = models.PositiveIntegerField(default=2048)
    max_output_tokens = models.PositiveIntegerField(default=256)
    temperature = models.FloatField(default=0.3)
    top_p = models.FloatField(default=0.9)
    system_prompt = models.TextField(default="You are a helpful assistant. Answer concisely.")
    # What a request costs, for budgets (governance). Any currency, as long as it is one.
    price_per_1k_input_tokens = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal(0), validators=[MinValueValidator(0)]
    )
    price_per_1k_output_tokens = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal(0), validators=[MinValueValidator(0)]
    )
    registered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ConfigQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "version"], name="unique_model_version"),
            models.CheckConstraint(
                condition=models.Q(temperature__gte=0) & models.Q(top_p__gt=0, top_p__lte=1),
                name="model_version_sampling_in_range",
            ),
            models.CheckConstraint(
                condition=models.Q(price_per_1k_input_tokens__gte=0)
                & models.Q(price_per_1k_output_tokens__gte=0),
                name="model_version_prices_not_negative",
            ),
            models.CheckConstraint(
                condition=~models.Q(backend="transformers")
                | (~models.Q(artifact_path="") & ~models.Q(sha256="")),
                name="model_version_local_has_artifact",
                violation_error_message="A local version needs its artifact path and sha256.",
            ),
            models.CheckConstraint(
                condition=~models.Q(backend="openai-compatible") | ~models.Q(base_url=""),
                name="model_version_remote_has_base_url",
                violation_error_message="A remote version needs its base URL.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model.name}@{self.version}"

    @property
    def can_serve(self) -> bool:
        return self.stage != self.Stage.ARCHIVED


class Deployment(models.Model):
    """An alias people and programs choose (`chat-default`): a primary version, optionally a
    canary taking a share of conversations, a shadow answering copies in the background, and
    an ordered fallback chain (DeploymentFallback)."""

    alias = models.SlugField(max_length=100, unique=True)
    primary_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="deployments"
    )
    previous_primary = models.ForeignKey(
        ModelVersion,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="What a rollback returns to",
    )
    canary_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    canary_weight = models.PositiveSmallIntegerField(
        default=0,
        validators=[MaxValueValidator(100)],
        help_text="Percent of conversations the canary answers (sticky per conversation)",
    )
    shadow_version = models.ForeignKey(
        ModelVersion,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="Answers a copy of every request in the background; never shown",
    )
    hedge_after_ms = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Remote backends: without a first token after this long, also ask the next "
        "target; the first answer wins",
    )
    queue = models.CharField(
        max_length=100, default="inference", help_text="Celery queue whose workers serve it"
    )
    is_active = models.BooleanField(default=True)
    exact_cache_enabled = models.BooleanField(
        default=True,
        help_text="Answer repeated deterministic requests (temperature 0 or a seed) from Redis.",
    )
    cache_ttl_seconds = models.PositiveIntegerField(
        default=86400, help_text="How long a cached answer may be served."
    )
    # Off by default: on the shipped labeled set, no threshold keeps wrong hits under 1% while
    # still hitting paraphrases (bench/results/semantic_cache-cpu-2core.md).
    semantic_cache_enabled = models.BooleanField(
        default=False,
        help_text="Answer a single-turn question that means the same as a cached one.",
    )
    semantic_threshold = models.FloatField(
        default=0.95,
        help_text="Cosine similarity (0-1] a question needs to a cached one to reuse its answer.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConfigQuerySet.as_manager()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(semantic_threshold__gt=0, semantic_threshold__lte=1),
                name="deployment_semantic_threshold_in_range",
                violation_error_message="The semantic cache threshold must be in (0, 1].",
            ),
            models.CheckConstraint(
                condition=models.Q(canary_weight__lte=100),
                name="deployment_canary_weight_percent",
                violation_error_message="The canary weight is a percentage (0-100).",
            ),
        ]

    def __str__(self) -> str:
        return self.alias


class DeploymentFallback(models.Model):
    """One step of a deployment's fallback chain, tried in `position` order."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="fallbacks")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    position = models.PositiveSmallIntegerField(default=0)

    objects = ConfigQuerySet.as_manager()

    class Meta:
        ordering = ["position", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "version"], name="unique_deployment_fallback"
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment.alias} -> {self.version_id} (#{self.position})"


class TierRule(models.Model):
    """Sends a turn meant for `deployment` to `target` instead, when its conditions hold.

    Rules are tried in `position` order; the first that matches wins. Empty conditions match
    anything, so a rule with only `user_choice` fires when the user asked for that tier.
    """

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="tiers")
    target = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="+")
    position = models.PositiveSmallIntegerField(default=0)
    min_prompt_chars = models.PositiveIntegerField(null=True, blank=True)
    max_prompt_chars = models.PositiveIntegerField(null=True, blank=True)
    uses_retrieval = models.BooleanField(
        null=True, blank=True, help_text="Match only turns that do (yes) or do not (no) retrieve"
    )
    user_choice = models.SlugField(
        max_length=50, blank=True, help_text="Match when the user chose this tier, e.g. 'large'"
    )

    objects = ConfigQuerySet.as_manager()

    class Meta:
        ordering = ["position", "id"]

    def __str__(self) -> str:
        return f"{self.deployment_id} -> {self.target_id} (#{self.position})"


class ShadowAnswer(models.Model):
    """A shadow (or compared) version's answer to a request the primary answered; never shown.

    `request_ref` names the request in the app that made it ("message:42") by id only: the
    registry imports no other app.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        COMPLETE = "complete"
        FAILED = "failed"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="shadows")
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="+")
    request_ref = models.CharField(max_length=100, db_index=True)
    messages = models.JSONField(help_text="The prompt, as chat messages")
    max_tokens = models.PositiveIntegerField()
    primary_version = models.ForeignKey(
        ModelVersion, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    primary_answer = models.TextField(blank=True)
    primary_latency_ms = models.FloatField(null=True, blank=True)
    primary_ttft_ms = models.FloatField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    answer = models.TextField(blank=True)
    error = models.TextField(blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["deployment", "-created_at"])]

    def __str__(self) -> str:
        return f"shadow {self.version_id} for {self.request_ref}"


class EvaluationCase(models.Model):
    """One prompt of the evaluation gate and the property its answer must have."""

    class Expect(models.TextChoices):
        CONTAINS = "contains", "answer contains"
        REFUSES = "refuses", "answer refuses"
        CITES = "cites", "answer cites a passage"

    name = models.CharField(max_length=200)
    prompt = models.TextField()
    context = models.TextField(
        blank=True, help_text="Passages given as [1], [2] (for 'cites'), one per paragraph"
    )
    expect = models.CharField(max_length=10, choices=Expect.choices)
    expected_text = models.CharField(
        max_length=500,
        blank=True,
        help_text="For 'contains': case-insensitive; '|' separates accepted options",
    )
    is_active = models.BooleanField(default=True)

    def __str__(self) -> str:
        return self.name


class SemanticCacheEntry(models.Model):
    """A single-turn question and its answer, found again by the meaning of the question.

    `namespace` says what else shaped the answer (the knowledge bases and their contents); an
    entry is only served to a question with the same version and namespace. `source_id` names
    the answer the entry was made from, in the app that stored it (a chat message), so that the
    app can promote the entry (rated up, approved) or withdraw it (rated down, reported,
    rejected, held).
    """

    class Standing(models.IntegerChoices):
        UNRATED = 0, "unrated"
        RATED_UP = 1, "rated up"
        REVIEWED = 2, "approved by a reviewer"

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="+")
    namespace = models.CharField(max_length=100)
    prompt = models.TextField()
    embedding = VectorField(dimensions=EMBEDDING_DIM)
    answer = models.TextField()
    completion_tokens = models.PositiveIntegerField()
    finish_reason = models.CharField(max_length=20)
    source_id = models.CharField(max_length=100, blank=True, default="")
    standing = models.SmallIntegerField(choices=Standing.choices, default=Standing.UNRATED)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["version", "namespace"]),
            models.Index(fields=["source_id"], name="semantic_cache_source_idx"),
            HnswIndex(
                name="semantic_cache_embedding_hnsw",
                fields=["embedding"],
                m=16,
                ef_construction=64,
                opclasses=["vector_cosine_ops"],
            ),
        ]

    def __str__(self) -> str:
        return f"{self.prompt[:60]} ({self.version_id}/{self.namespace})"
