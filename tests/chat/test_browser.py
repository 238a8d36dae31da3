"""The whole path in a real browser: Debian's headless Chromium against a live ASGI server."""

from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import ARTIFACTS
from tests.factories import PASSWORD, user_create

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


def test_log_in_chat_watch_the_answer_stream_and_find_it_after_reload(
    chat_model,
    live_asgi_server: str,  # type: ignore[no-untyped-def]
) -> None:
    user_create(username="carol")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        page.goto(f"{live_asgi_server}/chat/")
        page.fill("#id_username", "carol")
        page.fill("#id_password", PASSWORD)
        page.click("button[type=submit]")
        page.click("#new-conversation")
        expect(page.locator("#composer-text")).to_be_visible()
        # The socket opens after the page loads; sending before that would be lost.
        page.wait_for_selector("body[data-socket=open]", timeout=30_000)

        # A question with a long answer (up to the test model's 48 tokens, a few seconds on the
        # CPU), so that the streaming state lasts long enough to be seen.
        page.fill("#composer-text", "Describe the city of Paris in three sentences.")
        page.click("#send")
        expect(page.locator(".msg-user")).to_contain_text("city of Paris")
        answer = page.locator(".msg-assistant .msg-body")
        # Streaming: text shows while the answer is still running.
        expect(page.locator(".msg-assistant.status-streaming .msg-body")).not_to_be_empty(
            timeout=60_000
        )
        expect(page.locator(".msg-assistant.status-complete")).to_be_visible(timeout=120_000)
        final_text = answer.inner_text()
        assert final_text.strip()
        expect(page.locator("#composer-text")).to_have_value("")

        page.reload()
        expect(page.locator(".msg-user")).to_contain_text("city of Paris")
        expect(page.locator(".msg-assistant .msg-body")).to_have_text(final_text)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
        browser.close()
