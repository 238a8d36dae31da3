"""Knowledge bases in a real browser: pick them on the page, get an answer with sources, open a
cited passage."""

import pytest
from django.contrib.auth.models import Group
from playwright.sync_api import expect, sync_playwright

from chat.knowledge.ingestion import document_ingest, document_upload
from tests.chat.knowledge_helpers import knowledge_base_create
from tests.chat.test_browser import CHROMIUM
from tests.conftest import ARTIFACTS
from tests.factories import PASSWORD, user_create

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


def test_pick_knowledge_bases_on_the_page_and_open_a_cited_passage(
    chat_model,
    live_asgi_server: str,  # type: ignore[no-untyped-def]
) -> None:
    staff = Group.objects.create(name="crew")
    user = user_create(username="dora")
    user.groups.add(staff)
    for name, text in (
        ("Policies", "Every employee receives twenty-eight days of paid annual leave per year."),
        ("Fleet", "The Kestrel carries up to 400 cars and 1,200 passengers."),
    ):
        kb = knowledge_base_create(name)
        kb.groups.add(staff)
        document = document_upload(
            knowledge_base=kb, filename=f"{name.lower()}.txt", data=text.encode(), actor=None
        )
        document_ingest(document_id=document.pk, generation=document.generation)
    knowledge_base_create("Board minutes")  # no group: never offered

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        page.goto(f"{live_asgi_server}/chat/")
        page.fill("#id_username", "dora")
        page.fill("#id_password", PASSWORD)
        page.click("button[type=submit]")
        page.click("#new-conversation")
        picker = page.locator("#knowledge-picker")
        expect(picker).to_contain_text("Policies")
        expect(picker).not_to_contain_text("Board minutes")
        page.wait_for_timeout(500)  # the socket opens after the page loads

        # Two boxes ticked: the frame carries both ids.
        picker.get_by_label("Policies").check()
        picker.get_by_label("Fleet").check()
        page.click("#use-knowledge")
        expect(page.locator("#notice")).to_have_text("Knowledge bases in use: Fleet, Policies.")

        page.fill("#composer-text", "How many days of paid annual leave do employees get?")
        page.click("#send")
        expect(page.locator(".msg-assistant.status-complete")).to_be_visible(timeout=120_000)
        source = page.locator(".msg-assistant ol.sources a.cite").first
        expect(source).to_contain_text("[1] policies.txt")

        page.goto(live_asgi_server + str(source.get_attribute("href")))
        expect(page.locator("#passage")).to_contain_text("twenty-eight days")
        expect(page.locator("mark#cited")).to_contain_text("twenty-eight days")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "citation.png"), full_page=True)
        browser.close()
