"""Hybrid search over chunks: pgvector HNSW (cosine) and PostgreSQL full-text search, fused by
reciprocal rank fusion, always filtered to the knowledge bases a conversation may use.

A filtered HNSW scan visits `hnsw.ef_search` candidates and drops those outside the filter
afterwards, so when the filter is selective it returns fewer rows than asked for (pgvector
0.6 has no iterative scan). `chunks_nearest` makes the result complete: a filter matching few
rows is searched exactly; otherwise the scan is widened, and if even the widest scan comes back
short, the exact search runs.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from django.db import connection, transaction

from models_admin.embeddings import embed_texts

SearchMode = Literal["hybrid", "vector", "text"]

# Below this many rows under the filter, an exact scan is about as fast as the index.
EXACT_SCAN_BELOW = 5000
_EF_SEARCH_START = 40
_EF_SEARCH_MAX = 1000  # pgvector's upper bound for hnsw.ef_search
_RRF_K = 60
# Rows matching the question's words that the full-text half ranks, at most.
TEXT_CANDIDATES = 1000


@dataclass(frozen=True)
class Passage:
    chunk_id: int
    document_id: int
    document_name: str
    knowledge_base_id: int
    text: str
    score: float
    similarity: float


def _vector_literal(embedding: Sequence[float]) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in embedding) + "]"


def chunks_nearest(
    *,
    embedding: Sequence[float],
    knowledge_base_ids: Sequence[int],
    limit: int,
    exact_scan_below: int = EXACT_SCAN_BELOW,
) -> list[tuple[int, float]]:
    """(chunk id, cosine distance) of the `limit` nearest chunks in the knowledge bases, as
    many as there are up to `limit`, nearest first."""
    ids = list(knowledge_base_ids)
    if not ids or limit <= 0:
        return []
    vector = _vector_literal(embedding)
    # The index scan needs ORDER BY on the distance alone: a second sort key (for ties) makes
    # the planner sort every row under the filter instead (measured: 430 ms at 100k chunks).
    indexed = (
        "SELECT id, embedding <=> %s::vector AS distance FROM chat_chunk "
        "WHERE knowledge_base_id = ANY(%s) ORDER BY distance LIMIT %s"
    )
    select = (
        "SELECT id, embedding <=> %s::vector AS distance FROM chat_chunk "
        "WHERE knowledge_base_id = ANY(%s) ORDER BY distance, id LIMIT %s"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        # Only "fewer than exact_scan_below?" matters, so counting stops there. A full count(*)
        # visited every row under the filter on every query (vector search at 100k chunks: 108
        # ms p50 with it, 7 ms with this bound).
        cursor.execute(
            "SELECT count(*) FROM (SELECT 1 FROM chat_chunk WHERE knowledge_base_id = ANY(%s) "
            "LIMIT %s) AS eligible",
            [ids, max(exact_scan_below, limit)],
        )
        eligible = cursor.fetchone()[0]
        wanted = min(limit, eligible)
        if wanted == 0:
            return []
        if eligible >= exact_scan_below:
            ef = max(_EF_SEARCH_START, limit)
            while True:
                cursor.execute(f"SET LOCAL hnsw.ef_search = {min(ef, _EF_SEARCH_MAX)}")
                cursor.execute(indexed, [vector, ids, limit])
                rows = sorted(cursor.fetchall(), key=lambda row: (row[1], row[0]))
                if len(rows) >= wanted:
                    return [(int(i), float(d)) for i, d in rows]
                if ef >= _EF_SEARCH_MAX:
                    break
                ef *= 4
        # Exact: with index scans off the planner sorts every row under the filter.
        cursor.execute("SET LOCAL enable_indexscan = off")
        cursor.execute(select, [vector, ids, limit])
        return [(int(i), float(d)) for i, d in cursor.fetchall()]


def chunks_matching(
    *,
    query: str,
    knowledge_base_ids: Sequence[int],
    limit: int,
    candidates: int = TEXT_CANDIDATES,
) -> list[tuple[int, float]]:
    """(chunk id, rank) of chunks sharing words with the query (stemmed, stop words dropped),
    best ts_rank_cd first.

    Chunks holding all of the query's words come first; when there are fewer than `limit` of
    them, chunks holding any of the words are ranked instead. Ranking reads each matching row
    from the table, and on a large repetitive corpus even an all-words query matches thousands
    (3,700 rows, 160 ms at 100k chunks), so each query ranks at most `candidates` matching rows.
    """
    ids = list(knowledge_base_ids)
    if not ids or limit <= 0:
        return []
    ranked = (
        "SELECT id, ts_rank_cd(search_vector, q) AS rank FROM ("
        "SELECT c.id, c.search_vector, q FROM chat_chunk c, {tsquery} q "
        "WHERE c.knowledge_base_id = ANY(%s) AND c.search_vector @@ q LIMIT %s"
        ") AS matching ORDER BY rank DESC, id LIMIT %s"
    )
    all_words = "plainto_tsquery('english', %s)"
    any_word = "to_tsquery('english', replace(plainto_tsquery('english', %s)::text, ' & ', ' | '))"
    with connection.cursor() as cursor:
        cursor.execute(ranked.format(tsquery=all_words), [query, ids, candidates, limit])
        rows = cursor.fetchall()
        if len(rows) < limit:
            cursor.execute(ranked.format(tsquery=any_word), [query, ids, candidates, limit])
            rows = cursor.fetchall()
        return [(int(i), float(r)) for i, r in rows]


def _fuse(rankings: list[list[int]]) -> dict[int, float]:
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (_RRF_K + rank)
    return scores


def passages_search(
    *,
    query: str,
    knowledge_base_ids: Sequence[int],
    limit: int,
    mode: SearchMode = "hybrid",
    min_similarity: float | None = None,
    exact_scan_below: int = EXACT_SCAN_BELOW,
) -> list[Passage]:
    """The best `limit` passages for `query` in the knowledge bases, best first.

    `min_similarity` drops passages whose cosine similarity to the query is lower: fused ranks
    say which passages are better, not whether any is relevant at all.
    """
    ids = list(knowledge_base_ids)
    if not ids or not query.strip():
        return []
    embedding = embed_texts([query])[0]
    depth = max(limit * 4, 20)
    rankings: list[list[int]] = []
    if mode in ("hybrid", "vector"):
        nearest = chunks_nearest(
            embedding=embedding,
            knowledge_base_ids=ids,
            limit=depth,
            exact_scan_below=exact_scan_below,
        )
        rankings.append([i for i, _ in nearest])
    if mode in ("hybrid", "text"):
        rankings.append(
            [i for i, _ in chunks_matching(query=query, knowledge_base_ids=ids, limit=depth)]
        )
    scores = _fuse(rankings)
    if not scores:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.id, c.document_id, d.filename, c.knowledge_base_id, c.text, "
            "1 - (c.embedding <=> %s::vector) "
            "FROM chat_chunk c JOIN chat_document d ON d.id = c.document_id "
            "WHERE c.id = ANY(%s)",
            [_vector_literal(embedding), list(scores)],
        )
        rows = cursor.fetchall()
    passages = [
        Passage(
            chunk_id=chunk_id,
            document_id=document_id,
            document_name=filename,
            knowledge_base_id=kb_id,
            text=text,
            score=scores[chunk_id],
            similarity=float(similarity),
        )
        for chunk_id, document_id, filename, kb_id, text, similarity in rows
    ]
    if min_similarity is not None:
        passages = [p for p in passages if p.similarity >= min_similarity]
    passages.sort(key=lambda p: (-p.score, -p.similarity, p.chunk_id))
    return passages[:limit]
