"""Uploading documents and turning them into searchable chunks.

An upload is stored and queued in one short transaction; the worker then parses, chunks and
embeds with no transaction open, and writes all of a document's chunks in one transaction that
also replaces the previous ones. A worker that dies leaves the old chunks (or none) in place,
never half of the new ones, and its document is queued again once its lease has expired.
"""

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection, transaction
from django.utils import timezone

from chat.knowledge.chunking import text_chunk
from chat.knowledge.parsing import DocumentRejected, document_parse, document_type_of
from chat.leases import HeartbeatLease
from chat.models import Chunk, Document, KnowledgeBase
from governance.audit import audit_record
from models_admin.embeddings import embed_texts

logger = logging.getLogger(__name__)

_EMBED_BATCH = 64
_IN_FLIGHT = (Document.Status.QUEUED, Document.Status.PARSING, Document.Status.EMBEDDING)


@dataclass(frozen=True)
class UploadedFile:
    name: str
    data: bytes
    # The size the client sent, when only the first bytes of an oversized file were read.
    size: int | None = None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ingest_lease_key(document_id: int) -> str:
    return f"genai:knowledge:lease:{document_id}"


def _enqueue(document_id: int, generation: int) -> None:
    from chat.tasks import ingest_document

    ingest_document.apply_async(args=(document_id, generation), queue=settings.KNOWLEDGE_QUEUE)


def _rejection(filename: str, data: bytes, size: int) -> str | None:
    try:
        document_type_of(filename)
    except DocumentRejected as exc:
        return str(exc)
    limit = settings.KNOWLEDGE_MAX_DOCUMENT_BYTES
    if size > limit:
        return f"The file is {size:,} bytes; the limit is {limit:,} bytes."
    if not data:
        return "The file is empty."
    return None


def document_upload(
    *,
    knowledge_base: KnowledgeBase,
    filename: str,
    data: bytes,
    actor: User | None,
    size: int | None = None,
) -> Document:
    """Store one uploaded file and queue its ingestion.

    A file whose bytes equal a document already in the knowledge base is not stored again: that
    document is returned. A file with the name of an existing document replaces it; its chunks
    are swapped for the new ones when ingestion finishes. A file that cannot be ingested
    (type, size, empty) is recorded as a failed document with the reason.
    """
    filename = filename.strip().replace("\\", "/").rsplit("/", 1)[-1][:255] or "unnamed"
    size = len(data) if size is None else max(size, len(data))
    digest = sha256_of(data)
    reason = _rejection(filename, data, size)
    with transaction.atomic():
        if reason is None:
            same = (
                Document.objects.filter(knowledge_base=knowledge_base, content_sha256=digest)
                .exclude(status=Document.Status.FAILED)
                .first()
            )
            if same is not None:
                return same
        document = (
            Document.objects.select_for_update()
            .filter(knowledge_base=knowledge_base, filename=filename)
            .first()
        )
        if document is None:
            document = Document(knowledge_base=knowledge_base, filename=filename, generation=0)
        else:
            # The name now stands for the new upload; old chunks go when new ones are ready,
            # or now if the upload was refused.
            if reason is not None:
                document.chunks.all().delete()
        document.generation += 1
        document.uploaded_by = actor
        document.size_bytes = size
        document.content_sha256 = digest if reason is None else ""
        document.source = data if reason is None else b""
        document.content_type = "" if reason else document_type_of(filename)
        document.status = Document.Status.FAILED if reason else Document.Status.QUEUED
        document.error = reason or ""
        document.chunks_total = document.chunks_embedded = 0
        document.save()
        audit_record(
            actor=actor,
            action="document.uploaded" if reason is None else "document.refused",
            target_type="document",
            target_id=document.pk,
            details={
                "knowledge_base": knowledge_base.pk,
                "filename": filename,
                "bytes": size,
                **({"reason": reason} if reason else {}),
            },
        )
        if reason is None:
            transaction.on_commit(partial(_enqueue, document.pk, document.generation))
    return document


def documents_upload(
    *, knowledge_base: KnowledgeBase, files: Iterable[UploadedFile], actor: User | None
) -> list[Document]:
    """Each file on its own: one refused file does not stop the others."""
    return [
        document_upload(
            knowledge_base=knowledge_base, filename=f.name, data=f.data, actor=actor, size=f.size
        )
        for f in files
    ]


def document_delete(*, document_id: int, actor: User | None) -> None:
    """Remove a document and its chunks; answers that cited it keep their copy of the passage."""
    with transaction.atomic():
        document = Document.objects.select_for_update().filter(pk=document_id).first()
        if document is None:
            return
        audit_record(
            actor=actor,
            action="document.deleted",
            target_type="document",
            target_id=document.pk,
            details={"knowledge_base": document.knowledge_base_id, "filename": document.filename},
        )
        document.delete()


def document_reingest(*, document_id: int, actor: User | None) -> bool:
    """Queue a stored document for ingestion again (new generation). False if it has no source
    to ingest (a refused upload)."""
    with transaction.atomic():
        document = Document.objects.select_for_update().get(pk=document_id)
        if not document.source:
            return False
        document.generation += 1
        document.status = Document.Status.QUEUED
        document.error = ""
        document.chunks_embedded = 0
        document.save(update_fields=["generation", "status", "error", "chunks_embedded"])
        audit_record(
            actor=actor, action="document.reingest", target_type="document", target_id=document.pk
        )
        transaction.on_commit(partial(_enqueue, document.pk, document.generation))
    return True


def documents_requeue_stale() -> int:
    """Queue again documents whose ingestion has no live worker (its lease expired)."""
    requeued = 0
    stale = Document.objects.filter(
        status__in=[Document.Status.PARSING, Document.Status.EMBEDDING]
    ).values_list("pk", flat=True)
    for document_id in stale:
        if cache.get(ingest_lease_key(document_id)) is not None:
            continue
        with transaction.atomic():
            document = (
                Document.objects.select_for_update(skip_locked=True)
                .filter(
                    pk=document_id,
                    status__in=[Document.Status.PARSING, Document.Status.EMBEDDING],
                )
                .first()
            )
            if document is None:
                continue
            document.generation += 1
            document.status = Document.Status.QUEUED
            document.chunks_embedded = 0
            document.save(update_fields=["generation", "status", "chunks_embedded"])
            audit_record(
                actor=None,
                action="document.requeued",
                target_type="document",
                target_id=document.pk,
                details={"reason": "the worker ingesting it stopped"},
            )
            transaction.on_commit(partial(_enqueue, document.pk, document.generation))
            requeued += 1
    return requeued


def _mine(document_id: int, generation: int) -> bool:
    return Document.objects.filter(
        pk=document_id, generation=generation, status__in=_IN_FLIGHT
    ).exists()


def _fail(document_id: int, generation: int, reason: str) -> None:
    with transaction.atomic():
        won = Document.objects.filter(
            pk=document_id, generation=generation, status__in=_IN_FLIGHT
        ).update(status=Document.Status.FAILED, error=reason)
        if won:
            # A failed document is not searchable: it no longer stands for its old content.
            Chunk.objects.filter(document_id=document_id).delete()
            audit_record(
                actor=None,
                action="document.failed",
                target_type="document",
                target_id=document_id,
                details={"generation": generation, "reason": reason},
            )


def document_ingest(*, document_id: int, generation: int) -> None:
    """Parse, chunk, embed and store one generation of a document (the Celery task's body)."""
    with HeartbeatLease(
        key=ingest_lease_key(document_id), ttl_seconds=settings.KNOWLEDGE_INGEST_LEASE_SECONDS
    ) as lease:
        if not lease.held:
            logger.info("Document %s is being ingested by another delivery", document_id)
            return
        # Holding the lease, no other delivery is alive: a document left in parsing/embedding
        # by a dead worker of the same generation is taken over.
        won = Document.objects.filter(
            pk=document_id, generation=generation, status__in=_IN_FLIGHT
        ).update(status=Document.Status.PARSING, error="", chunks_embedded=0)
        if not won:
            logger.info("Document %s generation %s is not ours", document_id, generation)
            return
        try:
            _ingest(document_id, generation)
        except DocumentRejected as exc:
            _fail(document_id, generation, str(exc))
        except Exception:
            logger.exception("Ingestion of document %s failed", document_id)
            _fail(document_id, generation, "Ingestion failed because of an internal error.")


def _ingest(document_id: int, generation: int) -> None:
    document = Document.objects.select_related("knowledge_base").get(pk=document_id)
    kb = document.knowledge_base
    text = document_parse(filename=document.filename, data=bytes(document.source))
    pieces = text_chunk(
        text=text, chunk_tokens=kb.chunk_tokens, overlap_tokens=kb.chunk_overlap_tokens
    )
    # A passage repeated inside a document (boilerplate, headers) is stored once.
    unique: dict[str, int] = {}
    for index, piece in enumerate(pieces):
        unique.setdefault(sha256_of(piece.text.encode()), index)
    if not Document.objects.filter(pk=document_id, generation=generation).update(
        status=Document.Status.EMBEDDING, text=text, chunks_total=len(unique)
    ):
        return
    # Identical text has an identical embedding: reuse the ones already stored.
    known: dict[str, list[float]] = {}
    for digest, vector in (
        Chunk.objects.filter(content_sha256__in=list(unique))
        .order_by()
        .distinct("content_sha256")
        .values_list("content_sha256", "embedding")
    ):
        known[digest] = list(vector)
    todo = [digest for digest in unique if digest not in known]
    done = len(unique) - len(todo)
    for start in range(0, len(todo), _EMBED_BATCH):
        batch = todo[start : start + _EMBED_BATCH]
        # Stored passages are exact (fp32), whatever the batch or the chunk length.
        vectors = embed_texts([pieces[unique[d]].text for d in batch], backend="torch")
        known.update(zip(batch, vectors, strict=True))
        done += len(batch)
        # Progress for the admin; also notices a newer upload or a deletion and stops early.
        if not Document.objects.filter(
            pk=document_id, generation=generation, status=Document.Status.EMBEDDING
        ).update(chunks_embedded=done):
            return
    _store(document, generation, pieces, unique, known)


def _store(
    document: Document,
    generation: int,
    pieces: list,  # type: ignore[type-arg]
    unique: dict[str, int],
    vectors: dict[str, list[float]],
) -> None:
    with transaction.atomic():
        current = (
            Document.objects.select_for_update()
            .filter(pk=document.pk, generation=generation, status=Document.Status.EMBEDDING)
            .first()
        )
        if current is None:
            return
        Chunk.objects.filter(document=current).delete()
        Chunk.objects.bulk_create(
            Chunk(
                document=current,
                knowledge_base_id=current.knowledge_base_id,
                position=position,
                text=pieces[index].text,
                content_sha256=digest,
                token_count=pieces[index].token_count,
                start_char=pieces[index].start_char,
                end_char=pieces[index].end_char,
                embedding=vectors[digest],
            )
            for position, (digest, index) in enumerate(unique.items())
        )
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE chat_chunk SET search_vector = to_tsvector('english', text) "
                "WHERE document_id = %s",
                [current.pk],
            )
        current.status = Document.Status.READY
        current.chunks_embedded = len(unique)
        current.ingested_at = timezone.now()
        current.save(update_fields=["status", "chunks_embedded", "ingested_at"])
        audit_record(
            actor=None,
            action="document.ingested",
            target_type="document",
            target_id=current.pk,
            details={"generation": generation, "chunks": len(unique)},
        )
