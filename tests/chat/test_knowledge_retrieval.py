"""Hybrid search against real PostgreSQL + pgvector and the real embedding model."""

import numpy as np
import pytest
from django.db import connection, transaction

from chat.knowledge.ingestion import document_ingest, document_upload
from chat.knowledge.retrieval import chunks_nearest, passages_search
from chat.models import Chunk, Document, KnowledgeBase
from tests.chat.knowledge_helpers import knowledge_base_create

pytestmark = pytest.mark.django_db(transaction=True)


def _ingested(kb: KnowledgeBase, filename: str, text: str) -> Document:
    """Upload and ingest in this process (the worker path is covered in test_knowledge_ingestion)."""
    document = document_upload(knowledge_base=kb, filename=filename, data=text.encode(), actor=None)
    document_ingest(document_id=document.pk, generation=document.generation)
    document.refresh_from_db()
    assert document.status == "ready", document.error
    return document


@pytest.fixture
def handbook() -> KnowledgeBase:
    kb = knowledge_base_create("Handbook")
    _ingested(
        kb,
        "leave.txt",
        "Employees receive twenty-eight days of paid annual leave, including public holidays.",
    )
    _ingested(
        kb,
        "expenses.txt",
        "Travel claims need the form XK-4471 signed by a team lead within thirty days.",
    )
    _ingested(
        kb,
        "security.txt",
        "Badges must be worn visibly inside the building at all times.",
    )
    return kb


def test_vector_search_finds_a_passage_by_meaning_without_shared_words(handbook):
    found = passages_search(
        query="How much vacation do staff get?",
        knowledge_base_ids=[handbook.pk],
        limit=3,
        mode="vector",
    )
    assert found[0].document_name == "leave.txt"
    # No word of the question (stemmed) is in the passage: full text alone finds nothing.
    assert (
        passages_search(
            query="How much vacation do staff get?",
            knowledge_base_ids=[handbook.pk],
            limit=3,
            mode="text",
        )
        == []
    )


def test_full_text_search_finds_an_exact_form_number_and_hybrid_keeps_it_first(handbook):
    text = passages_search(query="XK-4471", knowledge_base_ids=[handbook.pk], limit=3, mode="text")
    assert [p.document_name for p in text] == ["expenses.txt"]
    hybrid = passages_search(query="form XK-4471", knowledge_base_ids=[handbook.pk], limit=3)
    assert hybrid[0].document_name == "expenses.txt"
    assert hybrid[0].score > hybrid[1].score


def test_search_returns_only_passages_of_the_knowledge_bases_asked_for(handbook):
    other = knowledge_base_create("Other")
    _ingested(other, "leave-other.txt", "Paid annual leave is twenty-eight days for everyone.")
    found = passages_search(query="annual leave", knowledge_base_ids=[other.pk], limit=10)
    assert {p.knowledge_base_id for p in found} == {other.pk}
    assert passages_search(query="annual leave", knowledge_base_ids=[], limit=10) == []


def test_min_similarity_leaves_nothing_for_an_unrelated_question(handbook):
    found = passages_search(
        query="What is the boiling point of liquid nitrogen?",
        knowledge_base_ids=[handbook.pk],
        limit=3,
        min_similarity=0.3,
    )
    assert found == []


def _unit(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    vectors = centre + spread * rng.standard_normal((n, centre.size))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _chunks(kb: KnowledgeBase, vectors: np.ndarray) -> list[int]:
    document = Document.objects.create(
        knowledge_base=kb, filename=f"{kb.name}.txt", status=Document.Status.READY
    )
    rows = Chunk.objects.bulk_create(
        Chunk(
            document=document,
            knowledge_base=kb,
            position=i,
            text=f"synthetic {i}",
            content_sha256=f"{kb.pk}-{i}",
            token_count=2,
            start_char=0,
            end_char=0,
            embedding=vector.tolist(),
        )
        for i, vector in enumerate(vectors)
    )
    return [c.pk for c in rows]


def test_filtered_vector_search_is_complete_where_a_filtered_hnsw_scan_comes_back_short():
    rng = np.random.default_rng(7)
    query = np.zeros(384)
    query[0] = 1.0
    far = np.zeros(384)
    far[1] = 1.0
    big = knowledge_base_create("Big")
    small = knowledge_base_create("Small")
    _chunks(big, _unit(rng, query, 3000, 0.02))  # everything near the query is in Big
    small_vectors = _unit(rng, far, 25, 0.05)
    small_ids = _chunks(small, small_vectors)
    expected = [small_ids[i] for i in np.argsort(-(small_vectors @ query), kind="stable")[:10]]

    # The problem: an HNSW scan (forced here) visits ef_search candidates, all from Big, and
    # the filter leaves fewer than the 10 rows asked for.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(
            "SELECT id FROM chat_chunk WHERE knowledge_base_id + 0 = %s "
            "ORDER BY embedding <=> %s::vector LIMIT 10",
            [small.pk, "[" + ",".join(map(str, query)) + "]"],
        )
        assert len(cursor.fetchall()) < 10

    for exact_scan_below in (0, 5000):  # through the widening index scan, and exact at once
        found = chunks_nearest(
            embedding=query.tolist(),
            knowledge_base_ids=[small.pk],
            limit=10,
            exact_scan_below=exact_scan_below,
        )
        assert [chunk_id for chunk_id, _ in found] == expected
    # Asking for more than there are gives all of them.
    everything = chunks_nearest(
        embedding=query.tolist(), knowledge_base_ids=[small.pk], limit=100, exact_scan_below=0
    )
    assert sorted(i for i, _ in everything) == sorted(small_ids)
