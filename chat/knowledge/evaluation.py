"""Retrieval quality on a labeled question set: recall@5, recall@10 and MRR per search mode."""

import json
from dataclasses import dataclass
from pathlib import Path

from django.db import transaction

from chat.knowledge.ingestion import document_ingest, document_upload
from chat.knowledge.retrieval import SearchMode, passages_search
from chat.models import Document, KnowledgeBase

MODES: tuple[SearchMode, ...] = ("vector", "text", "hybrid")


@dataclass(frozen=True)
class ModeScore:
    mode: SearchMode
    questions: int
    recall_at_5: float
    recall_at_10: float
    mrr: float


def corpus_ingest(
    *, corpus_dir: Path, name: str, chunk_tokens: int, overlap_tokens: int
) -> KnowledgeBase:
    """A fresh knowledge base holding every file of `corpus_dir`, ingested in this process."""
    with transaction.atomic():
        KnowledgeBase.objects.filter(name=name).delete()
        kb = KnowledgeBase.objects.create(
            name=name, chunk_tokens=chunk_tokens, chunk_overlap_tokens=overlap_tokens
        )
    for path in sorted(corpus_dir.iterdir()):
        if path.is_file():
            document = document_upload(
                knowledge_base=kb, filename=path.name, data=path.read_bytes(), actor=None
            )
            document_ingest(document_id=document.pk, generation=document.generation)
    failed = Document.objects.filter(knowledge_base=kb).exclude(status=Document.Status.READY)
    if failed.exists():
        raise RuntimeError(f"not ingested: {list(failed.values_list('filename', 'error'))}")
    return kb


def retrieval_evaluate(*, kb: KnowledgeBase, questions_path: Path) -> list[ModeScore]:
    """Each question is labeled with the documents that answer it; a passage from one of them
    is a hit. MRR takes the rank of the first hit among the top 10 passages (0 if none)."""
    labeled = json.loads(questions_path.read_text())
    scores = []
    for mode in MODES:
        at5 = at10 = reciprocal = 0.0
        for item in labeled:
            passages = passages_search(
                query=item["question"], knowledge_base_ids=[kb.pk], limit=10, mode=mode
            )
            ranks = [
                rank
                for rank, p in enumerate(passages, start=1)
                if p.document_name in item["documents"]
            ]
            first = ranks[0] if ranks else None
            at5 += first is not None and first <= 5
            at10 += first is not None
            reciprocal += 1 / first if first else 0.0
        n = len(labeled)
        scores.append(
            ModeScore(
                mode=mode,
                questions=n,
                recall_at_5=at5 / n,
                recall_at_10=at10 / n,
                mrr=reciprocal / n,
            )
        )
    return scores
