"""The operator's side: knowledge bases, uploads and ingestion progress in the admin."""

import pytest
from django.contrib.auth.models import Group, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from chat.models import Chunk, Document, KnowledgeBase
from governance.models import AuditEvent
from tests.chat.knowledge_helpers import documents_wait, knowledge_base_create
from tests.conftest import TEST_QUEUE
from tests.factories import pdf_bytes, user_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def operator_client(settings, celery_worker_process) -> Client:  # type: ignore[no-untyped-def]
    settings.KNOWLEDGE_QUEUE = TEST_QUEUE
    operator = User.objects.create_superuser("operator", password="x-very-long-password-1")
    client = Client()
    client.force_login(operator)
    return client


def test_an_operator_creates_a_knowledge_base_and_uploads_several_documents_at_once(
    operator_client,
):
    staff = Group.objects.create(name="staff")
    response = operator_client.post(
        "/admin/chat/knowledgebase/add/",
        {
            "name": "Handbook",
            "description": "",
            "groups": [staff.pk],
            "chunk_tokens": 64,
            "chunk_overlap_tokens": 8,
            "upload": [
                SimpleUploadedFile("leave.md", b"# Leave\n\nTwenty-eight days of leave."),
                SimpleUploadedFile("badges.pdf", pdf_bytes("Badges are worn at all times.")),
                SimpleUploadedFile("photo.png", b"\x89PNG\r\n"),
            ],
            "documents-TOTAL_FORMS": 0,
            "documents-INITIAL_FORMS": 0,
        },
        follow=True,
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "2 document(s) queued for ingestion." in page
    assert "Not ingested: photo.png: Unsupported file type .png" in page
    kb = KnowledgeBase.objects.get(name="Handbook")
    assert list(kb.groups.all()) == [staff]
    documents = documents_wait(*kb.documents.values_list("pk", flat=True))
    statuses = {d.filename: d.status for d in documents.values()}
    assert statuses == {"leave.md": "ready", "badges.pdf": "ready", "photo.png": "failed"}
    assert AuditEvent.objects.filter(action="knowledge_base.created").exists()

    listing = operator_client.get("/admin/chat/document/").content.decode()
    assert "leave.md" in listing and "Unsupported file type .png" in listing
    change = operator_client.get(f"/admin/chat/knowledgebase/{kb.pk}/change/").content.decode()
    assert "badges.pdf" in change and "Ready" in change and "Failed" in change


def test_an_operator_reingests_and_deletes_documents(operator_client):
    kb = knowledge_base_create("Ops")
    operator_client.post(
        f"/admin/chat/knowledgebase/{kb.pk}/change/",
        {
            "name": "Ops",
            "chunk_tokens": 200,
            "chunk_overlap_tokens": 40,
            "upload": [SimpleUploadedFile("a.txt", b"Ferries sail at dawn.")],
            "documents-TOTAL_FORMS": 0,
            "documents-INITIAL_FORMS": 0,
        },
    )
    document = Document.objects.get(knowledge_base=kb, filename="a.txt")
    documents_wait(document.pk)
    operator_client.post(
        "/admin/chat/document/",
        {"action": "reingest", "_selected_action": [document.pk]},
    )
    again = documents_wait(document.pk)[document.pk]
    assert again.generation == 2 and again.status == "ready"

    operator_client.post(
        "/admin/chat/document/",
        {"action": "delete_selected", "_selected_action": [document.pk], "post": "yes"},
    )
    assert not Document.objects.filter(pk=document.pk).exists()
    assert not Chunk.objects.filter(knowledge_base=kb).exists()
    assert AuditEvent.objects.filter(action="document.deleted", target_id=str(document.pk)).exists()


def test_a_user_who_is_not_staff_cannot_reach_the_knowledge_base_admin():
    user = user_create()
    client = Client()
    client.force_login(user)
    response = client.get("/admin/chat/knowledgebase/add/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    response = client.post("/admin/chat/knowledgebase/add/", {"name": "Sneaky"})
    assert response.status_code == 302
    assert not KnowledgeBase.objects.filter(name="Sneaky").exists()


def _queries_for(client: Client, url: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        assert client.get(url).status_code == 200
    return len(captured)


def test_the_document_and_knowledge_base_lists_cost_the_same_queries_for_more_rows():
    operator = User.objects.create_superuser("lister", password="x-very-long-password-1")
    client = Client()
    client.force_login(operator)

    def add(count: int) -> None:
        kb = knowledge_base_create(f"KB {KnowledgeBase.objects.count()}")
        for i in range(count):
            Document.objects.create(knowledge_base=kb, filename=f"{i}.txt", status="ready")

    add(2)
    documents, bases = (
        _queries_for(client, "/admin/chat/document/"),
        _queries_for(client, "/admin/chat/knowledgebase/"),
    )
    add(5)
    add(3)
    assert _queries_for(client, "/admin/chat/document/") == documents
    assert _queries_for(client, "/admin/chat/knowledgebase/") == bases
