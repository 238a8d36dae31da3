"""Citations: the passages an answer was given, stored with it and rendered as links."""

import re
from collections.abc import Sequence

from django.urls import reverse
from django.utils.html import escape

from chat.knowledge.retrieval import Passage
from chat.models import Chunk, Citation, Document

_MARKER = re.compile(r"\[(\d{1,3})\]")


def citations_store(*, message_id: int, passages: Sequence[Passage]) -> list[Citation]:
    """Record the passages of an answer's prompt, numbered as the prompt numbered them. Runs in
    the transaction that settles the answer; an answer keeps the citations of its last attempt."""
    Citation.objects.filter(message_id=message_id).delete()
    # A chunk or document replaced while the answer was generated is cited by its text alone.
    live_chunks = set(
        Chunk.objects.filter(pk__in=[p.chunk_id for p in passages]).values_list("pk", flat=True)
    )
    live_documents = set(
        Document.objects.filter(pk__in=[p.document_id for p in passages]).values_list(
            "pk", flat=True
        )
    )
    return Citation.objects.bulk_create(
        Citation(
            message_id=message_id,
            number=number,
            chunk_id=p.chunk_id if p.chunk_id in live_chunks else None,
            document_id=p.document_id if p.document_id in live_documents else None,
            document_name=p.document_name,
            text=p.text,
            score=p.score,
        )
        for number, p in enumerate(passages, start=1)
    )


def citations_link(html: str, citations: Sequence[tuple[int, int]]) -> str:
    """Turn the markers [n] in rendered answer HTML into links to the stored citations
    (`citations` holds (number, citation id) pairs). A marker with no stored citation stays
    plain text: an answer cannot cite a source it was not given."""
    targets = {number: citation_id for number, citation_id in citations}

    def link(match: re.Match[str]) -> str:
        citation_id = targets.get(int(match.group(1)))
        if citation_id is None:
            return match.group(0)
        url = escape(reverse("chat:citation", args=[citation_id]))
        return (
            f'<a class="cite" href="{url}" target="_blank" rel="noopener" '
            f'data-citation="{citation_id}">[{match.group(1)}]</a>'
        )

    return _MARKER.sub(link, html) if targets else html
