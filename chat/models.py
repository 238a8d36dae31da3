from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from pgvector.django import HnswIndex, VectorField

from governance.models import QuotaReservation, SafetyHold
from models_admin.embeddings import EMBEDDING_DIM
from models_admin.models import ModelVersion


class Conversation(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    model_alias = models.CharField(max_length=100)
    # A tier the user chose ("large"); the deployment's tier rules may route on it.
    tier = models.CharField(max_length=50, blank=True)
    knowledge_bases = models.ManyToManyField(
        "chat.KnowledgeBase", blank=True, related_name="conversations"
    )
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
        # The reaper (Celery beat) looks for streaming answers: few rows among all messages.
        indexes = [
            models.Index(
                fields=["status"],
                condition=models.Q(status="streaming"),
                name="chat_message_streaming",
            )
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.pk} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.PENDING, self.Status.STREAMING)


class KnowledgeBase(models.Model):
    """A set of documents that conversations may search; `groups` says who may use it."""

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    groups = models.ManyToManyField(
        "auth.Group",
        blank=True,
        related_name="knowledge_bases",
        help_text="Members of these groups may use this knowledge base in their conversations.",
    )
    # Chunk sizes are counted in the embedding model's word pieces (it reads at most 256).
    chunk_tokens = models.PositiveIntegerField(default=200)
    chunk_overlap_tokens = models.PositiveIntegerField(default=40)
    retention_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Delete documents this many days after they were uploaded. "
        "Leave empty to keep them until an operator deletes them.",
    )
    sensitive = models.BooleanField(
        default=False,
        help_text="Answers that draw on this knowledge base go to a reviewer first "
        "(when a 'sensitive knowledge base' review policy is active).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(chunk_tokens__gte=16, chunk_tokens__lte=256),
                name="knowledge_base_chunk_tokens_in_range",
            ),
            models.CheckConstraint(
                condition=models.Q(chunk_overlap_tokens__lt=models.F("chunk_tokens") / 2),
                name="knowledge_base_overlap_below_half_chunk",
            ),
            models.CheckConstraint(
                condition=models.Q(retention_days__isnull=True) | models.Q(retention_days__gte=1),
                name="knowledge_base_retention_at_least_one_day",
                violation_error_message="Retention must be at least one day (or empty).",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Document(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        PARSING = "parsing"
        EMBEDDING = "embedding"
        READY = "ready"
        FAILED = "failed"

    knowledge_base = models.ForeignKey(
        KnowledgeBase, on_delete=models.CASCADE, related_name="documents"
    )
    filename = models.CharField(max_length=255)
    content_type = models.CharField(max_length=20, blank=True)
    # The uploaded bytes, kept for re-ingestion; empty when the upload was refused.
    source = models.BinaryField(blank=True, default=b"")
    size_bytes = models.PositiveBigIntegerField(default=0)
    content_sha256 = models.CharField(max_length=64, blank=True)
    # The cleaned text the chunks were cut from.
    text = models.TextField(blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True)
    # Bumped by every upload or re-ingest request; a task only works for its own generation.
    generation = models.PositiveIntegerField(default=1)
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_embedded = models.PositiveIntegerField(default=0)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    ingested_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["knowledge_base", "filename"]
        constraints = [
            models.UniqueConstraint(
                fields=["knowledge_base", "filename"], name="document_filename_unique_in_kb"
            ),
        ]

    def __str__(self) -> str:
        return self.filename


class Chunk(models.Model):
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    # Denormalised from the document so that filtered searches need no join.
    knowledge_base = models.ForeignKey(
        KnowledgeBase, on_delete=models.CASCADE, related_name="chunks"
    )
    position = models.PositiveIntegerField()
    text = models.TextField()
    content_sha256 = models.CharField(max_length=64)
    token_count = models.PositiveIntegerField()
    start_char = models.PositiveIntegerField()
    end_char = models.PositiveIntegerField()
    embedding = VectorField(dimensions=EMBEDDING_DIM)
    search_vector = SearchVectorField(null=True)

    class Meta:
        ordering = ["document", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["document", "content_sha256"], name="chunk_text_unique_in_document"
            ),
        ]
        indexes = [
            HnswIndex(
                name="chunk_embedding_hnsw",
                fields=["embedding"],
                m=16,
                ef_construction=64,
                opclasses=["vector_cosine_ops"],
            ),
            GinIndex(fields=["search_vector"], name="chunk_search_vector_gin"),
            models.Index(fields=["content_sha256"], name="chunk_sha256"),
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"


class Citation(models.Model):
    """A passage an answer was given, numbered as the answer cites it ([1], [2], ...).

    The passage text and document name are copied, so a citation still opens what the answer
    saw after the document is re-ingested or deleted.
    """

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="citations")
    number = models.PositiveIntegerField()
    chunk = models.ForeignKey(
        Chunk, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    document = models.ForeignKey(
        Document, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    document_name = models.CharField(max_length=255)
    text = models.TextField()
    score = models.FloatField()

    class Meta:
        ordering = ["message", "number"]
        constraints = [
            models.UniqueConstraint(fields=["message", "number"], name="citation_number_unique"),
        ]

    def __str__(self) -> str:
        return f"[{self.number}] {self.document_name}"


class Feedback(models.Model):
    """A user's thumbs up or down on an answer, with an optional comment; `reported` sends the
    answer to the review queue."""

    class Rating(models.IntegerChoices):
        DOWN = -1, "thumbs down"
        NONE = 0, "no rating"
        UP = 1, "thumbs up"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    rating = models.SmallIntegerField(choices=Rating.choices, default=Rating.NONE)
    comment = models.TextField(blank=True)
    reported = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["message", "user"], name="feedback_one_per_user"),
        ]

    def __str__(self) -> str:
        return f"feedback on #{self.message_id}: {self.rating:+d}"


class ModelVersionReviewStats(ModelVersion):
    """The registry's versions seen from chat, for the admin's per-version review counts
    (models_admin may not import chat, so the counts live here)."""

    class Meta:
        proxy = True
        verbose_name = "review counts per model version"
        verbose_name_plural = "review counts per model version"


class Job(models.Model):
    """One request to the /v1 API's chat completions (streamed, waited for, or asynchronous).

    The request as the program sent it (after the input filters), its state, the answer and its
    usage. A worker claims it by a conditional UPDATE that bumps `run`, and settles it only if
    `run` is still its own, so a redelivered task completes the job exactly once.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        HELD_FOR_REVIEW = "held_for_review"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    public_id = models.CharField(max_length=40, unique=True, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey(
        "governance.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    model_alias = models.CharField(max_length=100)
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # {"messages": [...], "max_tokens": n, "temperature": t, "top_p": p, "stop": [...], ...}
    request = models.JSONField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    run = models.PositiveIntegerField(default=0)
    content = models.TextField(blank=True)
    finish_reason = models.CharField(max_length=20, blank=True)
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=50, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    reservation = models.ForeignKey(
        QuotaReservation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    safety_hold = models.ForeignKey(
        SafetyHold, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["user", "-created_at"]),
            # The sweep (Celery beat) looks for running jobs: few rows among all jobs.
            models.Index(
                fields=["status"], condition=models.Q(status="running"), name="chat_job_running"
            ),
        ]

    def __str__(self) -> str:
        return self.public_id

    @property
    def is_final(self) -> bool:
        return self.status in (
            self.Status.HELD_FOR_REVIEW,
            self.Status.COMPLETED,
            self.Status.FAILED,
            self.Status.CANCELLED,
        )
