from decimal import Decimal

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from pgvector.django import HnswIndex, VectorField

from models_admin.embeddings import EMBEDDING_DIM


class Model(models.Model):
    """A model family (e.g. SmolLM2-135M-Instruct); its versions are the servable artifacts."""

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    class Backend(models.TextChoices):
        TRANSFORMERS = "transformers", "transformers (local worker)"

    class Stage(models.TextChoices):
        DRAFT = "draft"
        STAGING = "staging"
        PRODUCTION = "production"
        ARCHIVED = "archived"

    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="versions")
    version = models.CharField(max_length=100)
    backend = models.CharField(max_length=30, choices=Backend.choices, default=Backend.TRANSFORMERS)
    stage = models.CharField(max_length=20, choices=Stage.choices, default=Stage.PRODUCTION)
    # Relative to settings.MODEL_STORE, so a store can move between machines.
    artifact_path = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64, help_text="sha256 over the artifact's weight files")
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
        ]

    def __str__(self) -> str:
        return f"{self.model.name}@{self.version}"


class Deployment(models.Model):
    """An alias people and programs choose (`chat-default`), served by one version."""

    alias = models.SlugField(max_length=100, unique=True)
    primary_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="deployments"
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

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(semantic_threshold__gt=0, semantic_threshold__lte=1),
                name="deployment_semantic_threshold_in_range",
                violation_error_message="The semantic cache threshold must be in (0, 1].",
            )
        ]

    def __str__(self) -> str:
        return self.alias


class SemanticCacheEntry(models.Model):
    """A single-turn question and its answer, found again by the meaning of the question.

    `namespace` says what else shaped the answer (the knowledge bases and their contents); an
    entry is only served to a question with the same version and namespace.
    """

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="+")
    namespace = models.CharField(max_length=100)
    prompt = models.TextField()
    embedding = VectorField(dimensions=EMBEDDING_DIM)
    answer = models.TextField()
    completion_tokens = models.PositiveIntegerField()
    finish_reason = models.CharField(max_length=20)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["version", "namespace"]),
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
