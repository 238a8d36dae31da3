"""Ingestion through the real Celery worker into real PostgreSQL + pgvector."""

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from django.db import connection

from chat.knowledge.chunking import text_chunk
from chat.knowledge.ingestion import (
    UploadedFile,
    document_reingest,
    document_upload,
    documents_requeue_stale,
    documents_upload,
)
from chat.knowledge.retrieval import passages_search
from chat.models import Chunk, Document
from genai_site.launcher import worker_command
from governance.models import AuditEvent
from tests.chat.knowledge_helpers import documents_wait, knowledge_base_create
from tests.conftest import BASE_DIR, TEST_QUEUE, _start_worker, _stop, _wait
from tests.factories import pdf_bytes, user_create

pytestmark = pytest.mark.django_db(transaction=True)

HTML = b"""<!doctype html><html><head><title>Ignored</title>
<script>var secret = "never-index-scripts";</script><style>p{color:red}</style></head>
<body><h1>Harbour ferry timetable</h1><p>The first ferry leaves the north pier at 06:40
and the last one returns at 23:10 on weekdays.</p></body></html>"""


@pytest.fixture
def knowledge_queue(settings, celery_worker_process) -> str:  # type: ignore[no-untyped-def]
    settings.KNOWLEDGE_QUEUE = TEST_QUEUE
    return TEST_QUEUE


def test_text_markdown_html_and_pdf_documents_are_ingested_into_chunks(knowledge_queue):
    operator = user_create(is_staff=True)
    kb = knowledge_base_create("Ferries", chunk_tokens=32, chunk_overlap_tokens=8)
    files = [
        UploadedFile(
            "fares.txt", b"A single adult fare costs 4 crowns. Children under 12 travel free."
        ),
        UploadedFile("bikes.md", b"# Bicycles\n\nBicycles ride **free** on the lower deck only."),
        UploadedFile("timetable.html", HTML),
        UploadedFile(
            "pets.pdf", pdf_bytes("Dogs are welcome on board", "when kept on a short leash.")
        ),
    ]
    uploaded = documents_upload(knowledge_base=kb, files=files, actor=operator)
    assert [d.status for d in uploaded] == ["queued"] * 4

    documents = documents_wait(*(d.pk for d in uploaded))
    by_name = {d.filename: d for d in documents.values()}
    assert {d.status for d in documents.values()} == {"ready"}, {
        d.filename: d.error for d in documents.values()
    }
    assert "never-index-scripts" not in by_name["timetable.html"].text
    assert "06:40" in by_name["timetable.html"].text
    assert "Dogs are welcome on board" in by_name["pets.pdf"].text
    for document in documents.values():
        chunks = list(document.chunks.all())
        assert chunks and document.chunks_total == len(chunks) == document.chunks_embedded
        vector = np.array(chunks[0].embedding)
        assert vector.shape == (384,)
        assert abs(np.linalg.norm(vector) - 1) < 1e-4
    # Long text is cut into overlapping windows of at most chunk_tokens tokens.
    assert all(c.token_count <= 32 for c in Chunk.objects.filter(knowledge_base=kb))

    found = passages_search(query="Can I bring my dog?", knowledge_base_ids=[kb.pk], limit=1)
    assert found[0].document_name == "pets.pdf"


def test_bad_documents_fail_with_a_reason_and_the_rest_of_the_batch_is_ingested(
    knowledge_queue, settings
):
    settings.KNOWLEDGE_MAX_DOCUMENT_BYTES = 2000
    kb = knowledge_base_create("Mixed batch")
    files = [
        UploadedFile("report.docx", b"PK\x03\x04 binary"),
        UploadedFile("huge.txt", b"x " * 2000),
        UploadedFile("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog"),
        UploadedFile("empty.txt", b""),
        UploadedFile("blank.md", b"   \n\n\t  \n"),
        UploadedFile("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1")),
        UploadedFile("good.txt", b"Lockers on the ferry cost one crown per hour."),
    ]
    uploaded = documents_upload(knowledge_base=kb, files=files, actor=None)
    documents = {d.filename: d for d in documents_wait(*(d.pk for d in uploaded)).values()}

    assert documents["good.txt"].status == "ready"
    errors = {name: d.error for name, d in documents.items() if d.status == "failed"}
    assert set(errors) == {
        "report.docx",
        "huge.txt",
        "broken.pdf",
        "empty.txt",
        "blank.md",
        "latin1.txt",
    }
    assert "Unsupported file type .docx" in errors["report.docx"]
    assert "limit is 2,000 bytes" in errors["huge.txt"]
    assert errors["broken.pdf"].startswith("The PDF could not be read")
    assert errors["empty.txt"] == "The file is empty."
    assert errors["blank.md"] == "The document contains no text."
    assert "not UTF-8" in errors["latin1.txt"]
    assert not Chunk.objects.filter(document__status="failed").exists()
    assert Chunk.objects.filter(knowledge_base=kb).count() == 1


def test_identical_documents_and_repeated_passages_are_stored_once(knowledge_queue):
    kb = knowledge_base_create("Dedup", chunk_tokens=16, chunk_overlap_tokens=0)
    paragraph = "Refunds are paid within fourteen days of a cancelled crossing. "
    data = (paragraph * 8).encode()
    first = document_upload(knowledge_base=kb, filename="refunds.txt", data=data, actor=None)
    again = document_upload(knowledge_base=kb, filename="refunds-copy.txt", data=data, actor=None)
    assert again.pk == first.pk
    assert Document.objects.filter(knowledge_base=kb).count() == 1

    document = documents_wait(first.pk)[first.pk]
    assert document.status == "ready"
    texts = list(document.chunks.values_list("text", flat=True))
    windows = text_chunk(text=document.text, chunk_tokens=16, overlap_tokens=0)
    # The same windows repeat through the text; each distinct one is stored once.
    assert len(texts) == len(set(texts)) == len({w.text for w in windows}) < len(windows)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM chat_chunk GROUP BY document_id, content_sha256 HAVING count(*) > 1"
        )
        assert cursor.fetchall() == []


def test_reuploading_a_document_replaces_its_chunks_in_one_transaction(knowledge_queue):
    kb = knowledge_base_create("Versions", chunk_tokens=16, chunk_overlap_tokens=4)
    old = " ".join(f"Old rule {i}: the ferry leaves from pier alpha." for i in range(40))
    new = " ".join(f"New rule {i}: the ferry leaves from pier bravo." for i in range(60))
    document = document_upload(
        knowledge_base=kb, filename="rules.txt", data=old.encode(), actor=None
    )
    documents_wait(document.pk)
    old_count = Chunk.objects.filter(document=document).count()
    assert old_count > 5

    snapshots: list[tuple[int, int]] = []
    stop = threading.Event()

    def observe() -> None:
        from django.db import connections

        try:
            while not stop.is_set():
                with connections["default"].cursor() as cursor:
                    cursor.execute(
                        "SELECT count(*) FILTER (WHERE text LIKE '%%alpha%%'), "
                        "count(*) FILTER (WHERE text LIKE '%%bravo%%') "
                        "FROM chat_chunk WHERE document_id = %s",
                        [document.pk],
                    )
                    snapshots.append(cursor.fetchone())
                time.sleep(0.01)
        finally:
            connections["default"].close()

    observer = threading.Thread(target=observe)
    observer.start()
    try:
        again = document_upload(
            knowledge_base=kb, filename="rules.txt", data=new.encode(), actor=None
        )
        assert again.pk == document.pk and again.generation == 2
        replaced = documents_wait(document.pk)[document.pk]
    finally:
        stop.set()
        observer.join()

    assert replaced.status == "ready"
    new_count = Chunk.objects.filter(document=document).count()
    assert not Chunk.objects.filter(document=document, text__contains="alpha").exists()
    # Every state any reader saw was all of the old chunks or all of the new ones.
    assert set(snapshots) <= {(old_count, 0), (0, new_count)}
    assert (old_count, 0) in snapshots


def test_a_document_can_be_reingested_and_a_refused_upload_cannot(knowledge_queue):
    kb = knowledge_base_create("Reingest")
    ok = document_upload(
        knowledge_base=kb, filename="a.txt", data=b"Cabins have bunks.", actor=None
    )
    bad = document_upload(knowledge_base=kb, filename="a.exe", data=b"MZ", actor=None)
    documents_wait(ok.pk)
    first_ids = set(Chunk.objects.filter(document=ok).values_list("pk", flat=True))
    assert document_reingest(document_id=ok.pk, actor=None) is True
    assert document_reingest(document_id=bad.pk, actor=None) is False
    again = documents_wait(ok.pk)[ok.pk]
    assert again.status == "ready" and again.generation == 2
    second_ids = set(Chunk.objects.filter(document=ok).values_list("pk", flat=True))
    assert second_ids and not (first_ids & second_ids)


@pytest.fixture
def doomed_worker(subprocess_env) -> Iterator[tuple[subprocess.Popen, str]]:  # type: ignore[no-untyped-def, type-arg]
    env = {**subprocess_env, "KNOWLEDGE_INGEST_LEASE_SECONDS": "3"}
    queue = f"{TEST_QUEUE}-doomed"
    from tests.conftest import ARTIFACTS

    log = ARTIFACTS / "doomed-worker.log"
    proc = _start_worker(env, "doomed", log, queue)
    _wait(lambda: "ready." in log.read_text(errors="replace"), 90, "doomed worker", proc)
    yield proc, queue
    if proc.poll() is None:
        _stop(proc)


def _kill_mid_embedding(proc, document):  # type: ignore[no-untyped-def]
    """SIGKILL the ingesting worker once some of the document's chunks are embedded."""
    deadline = time.monotonic() + 120
    while True:
        document.refresh_from_db()
        if document.status == "embedding" and document.chunks_embedded > 0:
            break
        assert document.status != "ready", "finished before it could be interrupted"
        assert time.monotonic() < deadline, document.status
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_a_worker_killed_mid_ingestion_leaves_no_chunks_and_the_document_is_queued_again(
    doomed_worker, knowledge_queue, settings
):
    proc, doomed_queue = doomed_worker
    settings.KNOWLEDGE_QUEUE = doomed_queue
    kb = knowledge_base_create("Killed", chunk_tokens=32, chunk_overlap_tokens=0)
    text = " ".join(f"Clause {i} sets out rule number {i} for crossings." for i in range(1000))
    document = document_upload(
        knowledge_base=kb, filename="long.txt", data=text.encode(), actor=None
    )
    _kill_mid_embedding(proc, document)

    document.refresh_from_db()
    assert document.status == "embedding"
    assert not Chunk.objects.filter(document=document).exists()
    # While the lease lives the document is not taken from its worker.
    assert documents_requeue_stale() == 0
    time.sleep(3.5)
    settings.KNOWLEDGE_QUEUE = knowledge_queue
    assert documents_requeue_stale() == 1
    document.refresh_from_db()
    assert document.status == "queued" and document.generation == 2

    finished = documents_wait(document.pk, timeout=300)[document.pk]
    assert finished.status == "ready"
    assert Chunk.objects.filter(document=document).count() == finished.chunks_total > 300


@pytest.fixture
def beat_worker(subprocess_env, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A worker that also runs Celery beat, as the launcher starts it, checking every second."""
    from tests.conftest import ARTIFACTS

    queue = f"{TEST_QUEUE}-beat"
    env = {
        **subprocess_env,
        "KNOWLEDGE_QUEUE": queue,
        "KNOWLEDGE_INGEST_LEASE_SECONDS": "3",
        "KNOWLEDGE_REQUEUE_INTERVAL_SECONDS": "1",
    }
    log = ARTIFACTS / "beat-worker.log"
    ARTIFACTS.mkdir(exist_ok=True)
    command = [
        *worker_command(queues=queue, concurrency=2, beat_schedule=tmp_path / "beat-schedule"),
        "-n",
        "beat@%h",
    ]
    proc = subprocess.Popen(
        command, env=env, cwd=BASE_DIR, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    _wait(lambda: "ready." in log.read_text(errors="replace"), 90, "beat worker", proc)
    yield queue
    _stop(proc)


def test_celery_beat_queues_again_a_document_whose_worker_was_killed(
    doomed_worker, beat_worker, settings
):
    proc, doomed_queue = doomed_worker
    settings.KNOWLEDGE_QUEUE = doomed_queue
    kb = knowledge_base_create("Reaped", chunk_tokens=32, chunk_overlap_tokens=0)
    text = " ".join(f"Article {i} names harbour {i} for night crossings." for i in range(1000))
    document = document_upload(
        knowledge_base=kb, filename="reaped.txt", data=text.encode(), actor=None
    )
    _kill_mid_embedding(proc, document)

    # Nobody calls documents_requeue_stale here: beat does, once the dead worker's lease expires,
    # and the worker beside beat ingests the new generation.
    finished = documents_wait(document.pk, timeout=300)[document.pk]
    assert finished.status == "ready" and finished.generation == 2
    assert Chunk.objects.filter(document=document).count() == finished.chunks_total > 300
    assert AuditEvent.objects.filter(
        action="document.requeued", target_type="document", target_id=str(document.pk)
    ).exists()
