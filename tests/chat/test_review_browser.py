"""Two browsers: a user's answer is held; a reviewer approves it from the keyboard; the user's
page shows it without a reload."""

import pytest
from playwright.sync_api import expect, sync_playwright

from governance.models import ReviewPolicy
from models_admin.models import Deployment
from tests.chat.test_browser import CHROMIUM
from tests.conftest import ARTIFACTS
from tests.factories import PASSWORD, user_create
from tests.governance.review_helpers import reviewer_create

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


def _log_in(page, base: str, username: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{base}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")


def test_a_held_answer_approved_by_a_reviewer_appears_on_the_users_page(
    chat_model,
    live_asgi_server: str,  # type: ignore[no-untyped-def]
) -> None:
    ReviewPolicy.objects.create(
        name="needs approval",
        kind="deployment_approval",
        deployment=Deployment.objects.get(alias="chat-default"),
    )
    user_create(username="uma")
    reviewer_create("rex")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        user_page = browser.new_context().new_page()
        _log_in(user_page, live_asgi_server, "uma")
        user_page.click("#new-conversation")
        user_page.wait_for_selector("body[data-socket=open]", timeout=30_000)
        user_page.fill("#composer-text", "What is the capital of France?")
        user_page.click("#send")
        held = user_page.locator(".msg-assistant.status-held")
        expect(held).to_contain_text("Held for review", timeout=120_000)
        expect(user_page.locator(".msg-assistant .msg-body")).not_to_contain_text("Paris")

        reviewer_page = browser.new_context().new_page()
        _log_in(reviewer_page, live_asgi_server, "rex")
        reviewer_page.goto(f"{live_asgi_server}/review/")
        expect(reviewer_page.locator("strong[data-kind=deployment_approval]")).to_have_text("1")
        reviewer_page.click("#claim-next")
        expect(reviewer_page.locator("#review-answer")).to_contain_text("Paris")
        reviewer_page.keyboard.press("a")  # approve
        expect(reviewer_page.locator(".review-queue")).to_contain_text("Nothing waiting.")

        approved = user_page.locator(".msg-assistant.status-complete .msg-body")
        expect(approved).to_contain_text("Paris", timeout=30_000)
        ARTIFACTS.mkdir(exist_ok=True)
        user_page.screenshot(path=str(ARTIFACTS / "review-approved.png"), full_page=True)
        browser.close()
