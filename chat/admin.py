import io
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html

from chat.datasets import DatasetFilters, dataset_export
from chat.knowledge.ingestion import (
    UploadedFile,
    document_delete,
    document_reingest,
    documents_requeue_stale,
    documents_upload,
)
from chat.models import (
    Citation,
    Conversation,
    Document,
    Feedback,
    KnowledgeBase,
    Message,
    ModelVersionReviewStats,
)
from governance.audit import audit_record, request_client_ip
from governance.models import ReviewItem


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("__str__", "user", "model_alias", "updated_at")
    list_select_related = ("user",)
    search_fields = ("title", "user__username")
    filter_horizontal = ("knowledge_bases",)


class CitationInline(admin.TabularInline):
    model = Citation
    extra = 0
    fields = ("number", "document_name", "chunk", "score", "text")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("pk", "conversation", "role", "status", "completion_tokens", "created_at")
    list_filter = ("role", "status", "model_version")
    list_select_related = ("conversation",)
    raw_id_fields = ("conversation", "reply_to", "reservation", "safety_hold")
    inlines = [CitationInline]
    actions = ["export_dataset"]

    @admin.action(description="Export reviewed / rated answers as a dataset (JSON lines)")
    def export_dataset(self, request: HttpRequest, queryset: QuerySet[Message]) -> HttpResponse:
        out = io.StringIO()
        dataset_export(
            out=out,
            filters=DatasetFilters(),
            actor=request.user,  # type: ignore[arg-type]
            message_ids=list(queryset.values_list("pk", flat=True)),
            ip=request_client_ip(request),
        )
        response = HttpResponse(out.getvalue(), content_type="application/x-ndjson")
        response["Content-Disposition"] = 'attachment; filename="dataset.jsonl"'
        return response


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    list_display = ("message", "rating", "reported", "comment", "updated_at")
    list_filter = ("rating", "reported")
    raw_id_fields = ("message", "user")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _count_per_version(queryset: QuerySet[Any], field: str) -> Coalesce:
    counts = (
        queryset.filter(**{field: OuterRef("pk")})
        .order_by()
        .values(field)
        .annotate(n=Count("pk"))
        .values("n")[:1]
    )
    return Coalesce(Subquery(counts), 0)


@admin.register(ModelVersionReviewStats)
class ModelVersionReviewStatsAdmin(admin.ModelAdmin):
    """Per model version: answers held for review and their outcomes, and users' thumbs."""

    list_display = (
        "__str__",
        "stage",
        "held",
        "approved",
        "edited",
        "rejected",
        "thumbs_up",
        "thumbs_down",
        "thumbs_ratio",
    )
    list_select_related = ("model",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        items = ReviewItem.objects.filter(target_type="message")
        ratings = Feedback.objects.all()
        return (
            super()
            .get_queryset(request)
            .annotate(
                n_held=_count_per_version(items.filter(delivered=False), "model_version"),
                n_approved=_count_per_version(
                    items.filter(status=ReviewItem.Status.APPROVED), "model_version"
                ),
                n_edited=_count_per_version(
                    items.filter(status=ReviewItem.Status.EDITED), "model_version"
                ),
                n_rejected=_count_per_version(
                    items.filter(status=ReviewItem.Status.REJECTED), "model_version"
                ),
                n_up=_count_per_version(ratings.filter(rating=1), "message__model_version"),
                n_down=_count_per_version(ratings.filter(rating=-1), "message__model_version"),
            )
        )

    @admin.display(ordering="n_held")
    def held(self, obj: Any) -> int:
        return int(obj.n_held)

    @admin.display(ordering="n_approved")
    def approved(self, obj: Any) -> int:
        return int(obj.n_approved)

    @admin.display(ordering="n_edited")
    def edited(self, obj: Any) -> int:
        return int(obj.n_edited)

    @admin.display(ordering="n_rejected")
    def rejected(self, obj: Any) -> int:
        return int(obj.n_rejected)

    @admin.display(ordering="n_up", description="thumbs up")
    def thumbs_up(self, obj: Any) -> int:
        return int(obj.n_up)

    @admin.display(ordering="n_down", description="thumbs down")
    def thumbs_down(self, obj: Any) -> int:
        return int(obj.n_down)

    @admin.display(description="thumbs up share")
    def thumbs_ratio(self, obj: Any) -> str:
        total = obj.n_up + obj.n_down
        return f"{obj.n_up / total:.0%}" if total else "-"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    widget = MultipleFileInput

    def clean(self, data: Any, initial: Any = None) -> list[Any]:
        one = super().clean
        if isinstance(data, list | tuple):
            return [one(item, initial) for item in data]
        return [one(data, initial)] if data else []


class KnowledgeBaseForm(forms.ModelForm):
    upload = MultipleFileField(
        required=False,
        label="Upload documents",
        help_text="Plain text, Markdown, HTML or PDF; select several at once. A file with the "
        "name of an existing document replaces it.",
    )

    class Meta:
        model = KnowledgeBase
        fields = (
            "name",
            "description",
            "groups",
            "chunk_tokens",
            "chunk_overlap_tokens",
            "retention_days",
            "sensitive",
        )


class DocumentInline(admin.TabularInline):
    model = Document
    extra = 0
    fields = ("filename", "status", "progress", "error", "size_bytes", "updated_at")
    readonly_fields = fields
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="progress")
    def progress(self, document: Document) -> str:
        return _progress(document)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Document]:
        return super().get_queryset(request).defer("source", "text")


def _progress(document: Document) -> str:
    if document.status == Document.Status.EMBEDDING and document.chunks_total:
        return f"{document.chunks_embedded} / {document.chunks_total} chunks"
    if document.status == Document.Status.READY:
        return f"{document.chunks_total} chunks"
    return ""


@admin.register(KnowledgeBase)
class KnowledgeBaseAdmin(admin.ModelAdmin):
    form = KnowledgeBaseForm
    list_display = ("name", "document_count", "created_at")
    filter_horizontal = ("groups",)
    search_fields = ("name",)
    inlines = [DocumentInline]

    @admin.display(description="documents", ordering="document_count")
    def document_count(self, kb: KnowledgeBase) -> int:
        return kb.document_count  # type: ignore[attr-defined]

    def get_queryset(self, request: HttpRequest) -> QuerySet[KnowledgeBase]:
        return super().get_queryset(request).annotate(document_count=Count("documents"))

    def save_model(self, request: HttpRequest, obj: KnowledgeBase, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_record(
            actor=request.user,
            action="knowledge_base.changed" if change else "knowledge_base.created",
            target_type="knowledge_base",
            target_id=obj.pk,
            details={"fields": sorted(form.changed_data)},
        )

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        uploads = form.cleaned_data.get("upload") or []
        if not uploads:
            return
        limit = settings.KNOWLEDGE_MAX_DOCUMENT_BYTES
        # Never more than limit + 1 bytes of a file in memory: enough to know it is too big.
        files = [UploadedFile(f.name, f.read(limit + 1), size=f.size) for f in uploads]
        documents = documents_upload(
            knowledge_base=form.instance,
            files=files,
            actor=request.user,  # type: ignore[arg-type]
        )
        refused = [d for d in documents if d.status == Document.Status.FAILED]
        self.message_user(
            request, f"{len(documents) - len(refused)} document(s) queued for ingestion."
        )
        for document in refused:
            self.message_user(
                request, f"Not ingested: {document.filename}: {document.error}", messages.ERROR
            )


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    change_list_template = "admin/chat/document/change_list.html"
    list_display = (
        "filename",
        "knowledge_base",
        "status_badge",
        "progress",
        "error",
        "size_bytes",
        "updated_at",
    )
    list_filter = ("status", "knowledge_base")
    list_select_related = ("knowledge_base",)
    search_fields = ("filename",)
    actions = ["reingest"]
    fields = (
        "knowledge_base",
        "filename",
        "content_type",
        "status",
        "error",
        "generation",
        "chunks_total",
        "chunks_embedded",
        "size_bytes",
        "content_sha256",
        "uploaded_by",
        "created_at",
        "ingested_at",
        "text",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Document]:
        # The uploaded bytes and the full text are not shown in the list.
        return super().get_queryset(request).defer("source")

    @admin.display(description="status", ordering="status")
    def status_badge(self, document: Document) -> str:
        return format_html(
            '<span class="doc-status-{}">{}</span>', document.status, document.status
        )

    @admin.display(description="progress")
    def progress(self, document: Document) -> str:
        return _progress(document)

    @admin.action(description="Ingest the selected documents again")
    def reingest(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        queued = sum(
            document_reingest(document_id=pk, actor=request.user)  # type: ignore[arg-type]
            for pk in queryset.values_list("pk", flat=True)
        )
        self.message_user(request, f"{queued} document(s) queued for ingestion.")

    def delete_model(self, request: HttpRequest, obj: Document) -> None:
        document_delete(document_id=obj.pk, actor=request.user)  # type: ignore[arg-type]

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        for pk in queryset.values_list("pk", flat=True):
            document_delete(document_id=pk, actor=request.user)  # type: ignore[arg-type]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # Documents whose worker died are queued again when someone looks at the list.
        documents_requeue_stale()
        in_flight = Document.objects.filter(
            status__in=[Document.Status.QUEUED, Document.Status.PARSING, Document.Status.EMBEDDING]
        ).exists()
        return super().changelist_view(request, {**(extra_context or {}), "in_flight": in_flight})
