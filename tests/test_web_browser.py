"""The self-service pages in Chromium (Debian's /usr/bin/chromium driven by Playwright) on a phone-sized screen,
against a real WebServer on a free port over SQLite and the real Redis rate limiter."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from test_web_pages import WebHarness, free_port, web_services

from bridge.models import FollowUp, SurveyAnswer
from online_chat import WebServer

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(60)]

CHROMIUM = "/usr/bin/chromium"
PHONE = {"width": 360, "height": 740}
SCREENSHOT = Path("/tmp/help-phone.png")


@pytest.fixture
async def site(redis_url: str, tmp_path: Path) -> AsyncIterator[WebHarness]:
    """A real WebServer on a free loopback port (its harness has no test client)."""
    port = free_port()
    async with web_services(f"sqlite+aiosqlite:///{tmp_path / 'web.db'}", redis_url, port) as (services, harness):
        server = WebServer(services)
        await server.start()
        try:
            yield harness
        finally:
            await server.aclose()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium (Playwright's own browsers are never downloaded)."""
    if shutil.which(CHROMIUM) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is not installed (required when CI is set)", pytrace=False)
        pytest.skip(f"{CHROMIUM} is not installed (make setup-test installs it)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu",
                                            "--disable-background-networking"])
        try:
            yield browser
        finally:
            await browser.close()


async def phone(browser: Browser, locale: str = "en-US") -> BrowserContext:
    return await browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True,
                                     locale=locale)


async def horizontal_overflow(page: Page) -> int:
    """How many CSS pixels the page is wider than the screen (0: no horizontal scrolling)."""
    return int(await page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))


async def test_help_pages_fit_a_phone_screen_without_horizontal_scrolling(site: WebHarness,
                                                                        browser: Browser) -> None:
    context = await phone(browser)
    page = await context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    await page.goto(f"{site.public_url}/help?lang=en")
    await expect(page.get_by_role("heading", level=1)).to_have_text("How can we help?")
    assert await page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(244, 246, 249)"  # CSS ok
    assert await horizontal_overflow(page) == 0
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    for path in ("/help?lang=zh-CN", "/help/a/billing_balance?lang=en", "/help/a/returns?lang=zh-CN",
                 "/help/search?q=refund&lang=en", "/dev/outbox?lang=en"):
        await page.goto(f"{site.public_url}{path}")
        assert await horizontal_overflow(page) == 0, path
    # tap targets are finger-sized
    await page.goto(f"{site.public_url}/help/a/returns?lang=en")
    box = await page.get_by_role("button", name="Send").bounding_box()
    assert box is not None and box["height"] >= 44
    assert errors == []  # nothing refused by the Content-Security-Policy, no failed loads
    await context.close()


async def test_searching_in_chinese_finds_the_returns_article(site: WebHarness, browser: Browser) -> None:
    context = await phone(browser, locale="zh-CN")
    page = await context.new_page()
    await page.goto(f"{site.public_url}/help")  # Chinese from the browser's Accept-Language
    assert await page.get_attribute("html", "lang") == "zh-CN"
    await page.get_by_label("搜索帮助中心").fill("退货")
    await page.get_by_role("button", name="搜索").tap()
    result = page.get_by_role("link", name="30 天内免费退货")
    await expect(result).to_be_visible()
    await result.tap()
    await expect(page.get_by_role("heading", level=1)).to_have_text("30 天内免费退货")
    await context.close()


async def test_the_email_form_submits_and_shows_the_confirmation(site: WebHarness, browser: Browser) -> None:
    context = await phone(browser)
    page = await context.new_page()
    await page.goto(f"{site.public_url}/help/a/order_tracking?lang=en")
    await page.get_by_label("Your email address").fill("ann@example.com")
    await page.get_by_role("button", name="Send").tap()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sent: check your inbox")
    assert page.url.endswith("/help/a/order_tracking/sent?lang=en")
    await page.reload()  # reloading the confirmation sends nothing more
    [followup] = await site.rows(FollowUp)
    assert (followup.state, followup.recipient, followup.article_id) == ("pending", "ann@example.com",
                                                                        "order_tracking")
    assert site.woken == [1]
    await context.close()


async def test_a_survey_link_opened_and_a_rating_tapped_stores_the_answer(site: WebHarness,
                                                                          browser: Browser) -> None:
    call = await site.call()
    path, _ = await site.sms_link("survey", call)
    context = await phone(browser)
    page = await context.new_page()
    await page.goto(f"{site.public_url}{path}")
    await expect(page.get_by_text("How happy are you with your call?")).to_be_visible()
    assert await page.get_by_text("About your call on").is_visible()
    four = page.get_by_role("button", name="4 of 5")
    box = await four.bounding_box()
    assert box is not None and box["height"] >= 48 and box["width"] >= 44
    assert await horizontal_overflow(page) == 0
    await four.tap()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Thank you!")
    [answer] = await site.rows(SurveyAnswer)
    assert (answer.interaction_id, answer.score, answer.channel) == (call.id, 4, "web")
    await page.goto(f"{site.public_url}{path}")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Already answered")
    await context.close()
