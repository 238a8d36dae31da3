import time

from chat.models import Document, KnowledgeBase

TERMINAL = (Document.Status.READY, Document.Status.FAILED)


def knowledge_base_create(name: str, **fields: object) -> KnowledgeBase:
    return KnowledgeBase.objects.create(name=name, **fields)


def documents_wait(*document_ids: int, timeout: float = 120) -> dict[int, Document]:
    """Wait until the worker has finished with every document (ready or failed)."""
    deadline = time.monotonic() + timeout
    while True:
        documents = {d.pk: d for d in Document.objects.filter(pk__in=document_ids)}
        if all(d.status in TERMINAL for d in documents.values()):
            return documents
        if time.monotonic() > deadline:
            states = {d.filename: d.status for d in documents.values()}
            raise TimeoutError(f"documents not ingested in {timeout}s: {states}")
        time.sleep(0.2)
