"""The agent desktop and the supervisor view in Chromium (Debian's /usr/bin/chromium driven by Playwright): a real
WebServer on a free port, the real Router and EventBus on Redis, SQLite, a real AgentDirectory (argon2).

An agent signs in, goes available, is offered a call made through the real Router, sees its card (number, IVR path,
intent, wait), accepts it and gives a wrap-up code; the supervisor page follows the queue and the agents without a
reload; offers made by another Router "process" reach the browser; both pages fit a phone; names and IVR entries
that look like HTML stay text."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect
from test_desk import CALLER, PASSWORD, DeskHarness, desk_server
from test_web_browser import PHONE, browser, chromium, horizontal_overflow, phone  # noqa: F401 (fixtures)

from bridge.events import EventBus
from bridge.models import Step
from bridge.router import Router

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(90)]

WIDE = {"width": 1280, "height": 800}
SCREENSHOTS = Path("/tmp")


@pytest.fixture
def chrome(browser: Browser) -> Browser:  # noqa: F811 (test_web_browser's fixture, by another name here)
    return browser


@pytest.fixture
async def desk(redis_url: str, tmp_path: Path) -> AsyncIterator[DeskHarness]:
    async with desk_server(f"sqlite+aiosqlite:///{tmp_path / 'desk.db'}", redis_url) as harness:
        yield harness


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 5.0) -> Any:
    """Poll an async condition (the router's or the database's state after a click), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def console_errors(page: Page) -> list[str]:
    """Console errors of a page (a script or style refused by the Content-Security-Policy shows up here)."""
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


async def sign_in(page: Page, desk: DeskHarness, name: str, landing: str = "/desk") -> None:
    await page.goto(f"{desk.public_url}/desk/login")
    await page.get_by_label("User name").fill(name)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(f"{desk.public_url}{landing}")
    await expect(page.locator("#conn")).to_have_text("Connected")


async def wide(chrome: Browser) -> BrowserContext:
    return await chrome.new_context(viewport=WIDE, locale="en-US")


async def presence(desk: DeskHarness, agent: str) -> str | None:
    state = (await desk.router.snapshot()).agents.get(agent)
    return state.presence if state else None


async def test_an_agent_signs_in_accepts_a_call_from_its_card_and_gives_a_wrap_up_code(desk: DeskHarness,
                                                                                   chrome: Browser) -> None:
    await desk.agent("ann", display_name="Ann Lee")
    context = await wide(chrome)
    page = await context.new_page()
    errors = console_errors(page)
    await sign_in(page, desk, "ann")
    await expect(page.locator(".bar .who")).to_have_text("Ann Lee")
    await expect(page.locator("#offers")).to_contain_text("No offers right now.")
    await page.get_by_role("button", name="Available").click()
    await expect(page.locator("#presence")).to_have_text("Available")
    assert await presence(desk, "ann") == "available"

    call = await desk.call()
    await desk.router.enqueue(call.id, "voice", "billing")
    offer = page.locator(f'#offers [data-interaction="{call.id}"]')
    await expect(offer).to_be_visible()
    await expect(offer.locator(".number")).to_have_text(CALLER)
    await expect(offer.locator("dl.card")).to_contain_text("See your balance and pay online (billing)")
    await expect(offer.locator("ol.path li")).to_have_text(["main", "main · digit · 2", "billing", "queue"])
    await expect(offer.locator("dl.vars")).to_contain_text("account12345")
    await expect(offer.locator("header .timer")).to_have_text(re.compile(r"^Waited 0:0\d$"))
    await expect(offer.locator(".deadline")).to_have_text(re.compile(r"^\d+ s left to accept$"))
    await page.screenshot(path=str(SCREENSHOTS / "desk-offer.png"), full_page=True)

    await offer.get_by_role("button", name="Accept").click()
    await eventually(lambda: _active(desk, call.id, "ann"), "the call active with ann")
    card = page.locator(f'#work [data-interaction="{call.id}"]')
    await expect(card).to_be_visible()
    await expect(page.locator("#offers [data-interaction]")).to_have_count(0)
    await expect(page.locator("#load-voice")).to_have_text("1/1")
    await expect(card.get_by_role("button", name="Send FAQ link")).to_be_visible()
    await page.screenshot(path=str(SCREENSHOTS / "desk-call.png"), full_page=True)

    # the caller hangs up (the IVR's side): the card goes, a wrap-up code is asked for and stored
    await desk.services.store.update(call.id, ended_at=dt.datetime.now(dt.UTC), state="ended")
    await desk.router.finish(call.id)
    owed = page.locator(f'#owed [data-interaction="{call.id}"]')
    await expect(owed).to_be_visible()
    await expect(card).to_have_count(0)
    await expect(page.locator("#presence")).to_have_text("Wrap-up")
    await owed.get_by_label("Wrap-up code").select_option("follow_up")
    await owed.get_by_role("button", name="Save").click()
    await expect(owed).to_have_count(0)
    assert (await desk.row(call.id)).wrapup_code == "follow_up"
    await expect(page.locator("#presence")).to_have_text("Available", timeout=5000)   # wrap-up time over
    assert errors == []
    await context.close()


async def _active(desk: DeskHarness, iid: str, agent: str) -> bool:
    record = await desk.router.interaction(iid)
    return (record.get("state"), record.get("agent")) == ("active", agent)


async def test_the_supervisor_page_follows_the_queue_and_the_agents_without_reloading(desk: DeskHarness,
                                                                                    chrome: Browser) -> None:
    await desk.agent("boss", role="supervisor")
    await desk.agent("ann", display_name="Ann Lee", skills=("billing", "tech"))
    context = await phone(chrome)
    page = await context.new_page()
    errors = console_errors(page)
    await sign_in(page, desk, "boss", landing="/desk/supervisor")
    await page.evaluate("window.stillTheSamePage = true")
    await expect(page.locator("#agents")).to_have_text("No agent is signed in.")
    await expect(page.locator("#queue")).to_have_text("Nobody is waiting.")

    # ann's desktop, in another process: she signs in and becomes available
    await desk.router.login("ann", ["billing", "tech"])
    await desk.router.set_presence("ann", "available")
    ann = page.locator('#agents [data-agent="ann"]')
    await expect(ann).to_contain_text("Ann Lee")
    await expect(ann.locator(".badge")).to_have_text("Available")
    await expect(ann).to_contain_text("Calls 0/1 · Chats 0/4")

    # an interaction joins a skill nobody available has
    await desk.router.set_presence("ann", "away")
    await expect(ann.locator(".badge")).to_have_text("Away")
    await desk.router.enqueue("chat-1", "web", "billing")
    billing = page.locator('#skills tr[data-skill="billing"]')
    await expect(billing.locator(".waiting")).to_have_text("1")
    await expect(billing.locator("td.timer")).to_have_text(re.compile(r"^0:0\d$"))
    await expect(page.locator("#waiting-total")).to_have_text("(1)")
    await expect(page.locator("#queue li")).to_have_count(1)
    await expect(page.locator("#queue li")).to_contain_text("Web chat")
    await page.wait_for_timeout(1100)   # the longest wait goes on counting on the page
    await expect(billing.locator("td.timer")).not_to_have_text("0:00")

    # ann comes back: the chat is offered to her, then taken
    await desk.router.set_presence("ann", "available")
    await eventually(lambda: _offered(desk, "chat-1", "ann"), "the offer to ann")
    assert await desk.router.accept("chat-1", "ann")
    await expect(billing.locator(".waiting")).to_have_text("0")
    await expect(billing.locator("td.timer")).to_have_text("–")
    await expect(ann).to_contain_text("Chats 1/4")
    await expect(page.locator("#queue")).to_have_text("Nobody is waiting.")
    assert await horizontal_overflow(page) == 0
    await page.screenshot(path=str(SCREENSHOTS / "desk-supervisor-phone.png"), full_page=True)
    assert await page.evaluate("window.stillTheSamePage") is True
    assert errors == []
    await context.close()


async def _offered(desk: DeskHarness, iid: str, agent: str) -> bool:
    record = await desk.router.interaction(iid)
    return (record.get("state"), record.get("agent")) == ("offered", agent)


async def test_an_offer_made_by_another_process_reaches_the_browser(redis_url: str, tmp_path: Path,
                                                                    chrome: Browser) -> None:
    async with desk_server(f"sqlite+aiosqlite:///{tmp_path / 'desk.db'}", redis_url, start_router=False) as desk:
        await desk.agent("ann")
        context = await wide(chrome)
        page = await context.new_page()
        await sign_in(page, desk, "ann")
        await page.get_by_role("button", name="Available").click()
        await expect(page.locator("#presence")).to_have_text("Available")
        other_bus = EventBus(redis_url, desk.services.config.redis.events_channel)
        await other_bus.start()
        other = Router(redis_url, desk.services.config.router, other_bus)   # only this one makes offers
        await other.start()
        try:
            call = await desk.call()
            await other.enqueue(call.id, "voice", "billing")
            offer = page.locator(f'#offers [data-interaction="{call.id}"]')
            await expect(offer.locator(".number")).to_have_text(CALLER)
            await offer.get_by_role("button", name="Accept").click()
            await eventually(lambda: _active(desk, call.id, "ann"), "the call active with ann")
        finally:
            await other.aclose()
            await other_bus.aclose()
        await context.close()


async def test_the_pages_fit_a_phone_screen(desk: DeskHarness, chrome: Browser) -> None:
    await desk.agent("ann", display_name="Ann Lee-Featherstonehaugh of the Very Long Name",
                     skills=("billing", "a_rather_long_skill_name_for_returns_and_exchanges"))
    await desk.agent("boss", role="supervisor", language="zh-CN")
    context = await phone(chrome)
    page = await context.new_page()
    errors = console_errors(page)
    await page.goto(f"{desk.public_url}/desk/login")
    assert await horizontal_overflow(page) == 0
    box = await page.get_by_role("button", name="Sign in").bounding_box()
    assert box is not None and box["height"] >= 44
    await sign_in(page, desk, "ann")
    await page.get_by_role("button", name="Available").tap()
    await expect(page.locator("#presence")).to_have_text("Available")
    call = await desk.call(steps=[Step(seq=i, node=f"menu_level_{i}", event="digit", value=str(i)) for i in range(12)])
    await desk.router.enqueue(call.id, "voice", "billing")
    offer = page.locator(f'#offers [data-interaction="{call.id}"]')
    await expect(offer).to_be_visible()
    assert await horizontal_overflow(page) == 0
    accept = offer.get_by_role("button", name="Accept")
    box = await accept.bounding_box()
    assert box is not None and box["height"] >= 44
    await accept.tap()
    await expect(page.locator(f'#work [data-interaction="{call.id}"]')).to_be_visible()
    await page.locator("details.timeline summary").first.tap()
    assert await horizontal_overflow(page) == 0
    await page.screenshot(path=str(SCREENSHOTS / "desk-phone.png"), full_page=True)

    boss_context = await phone(chrome, locale="zh-CN")   # someone else's phone
    boss = await boss_context.new_page()
    await boss.goto(f"{desk.public_url}/desk/login?lang=zh-CN")
    await boss.get_by_label("用户名").fill("boss")
    await boss.get_by_label("密码").fill(PASSWORD)
    await boss.get_by_role("button", name="登录").tap()
    await expect(boss.locator("#conn")).to_have_text("已连接")
    await desk.router.enqueue("chat-9", "web", "a_rather_long_skill_name_for_returns_and_exchanges")
    await expect(boss.locator("#queue li")).to_have_count(1)
    await expect(boss.locator('#agents [data-agent="ann"]')).to_contain_text("通话 1/1")
    assert await horizontal_overflow(boss) == 0
    await boss.screenshot(path=str(SCREENSHOTS / "desk-supervisor-zh-phone.png"), full_page=True)
    assert errors == []
    await boss_context.close()
    await context.close()


async def test_names_and_ivr_entries_that_look_like_html_stay_text(desk: DeskHarness, chrome: Browser) -> None:
    name = "<img src=x onerror=window.xss=1>Eve"
    value = "<script>window.xss=2</script><em>bold</em>"
    await desk.agent("eve", display_name=name)
    await desk.agent("boss", role="supervisor")
    context = await wide(chrome)
    page = await context.new_page()
    await sign_in(page, desk, "eve")
    await expect(page.locator(".bar .who")).to_have_text(name)
    await page.get_by_role("button", name="Available").click()
    await expect(page.locator("#presence")).to_have_text("Available")
    call = await desk.call(caller=f"+86139{value}",
                           steps=[Step(seq=0, node="main", event="set", value=f"note={value}"),
                                  Step(seq=1, node="main", event="digit", value=value)])
    await desk.router.enqueue(call.id, "voice", "billing")
    offer = page.locator(f'#offers [data-interaction="{call.id}"]')
    await expect(offer.locator(".number")).to_have_text(f"+86139{value}")
    await expect(offer.locator("dl.vars dd")).to_have_text(value)
    await expect(offer.locator("ol.path li")).to_have_text([f"main · digit · {value}"])
    await expect(offer.get_by_role("button", name="Accept")).to_be_visible()   # the script ran on, unbroken

    boss_context = await wide(chrome)
    supervisor = await boss_context.new_page()
    await sign_in(supervisor, desk, "boss", landing="/desk/supervisor")
    await expect(supervisor.locator('#agents [data-agent="eve"] .name')).to_have_text(name)
    for shown in (page, supervisor):
        assert await shown.locator("img, main script, em").count() == 0
        assert await shown.evaluate("window.xss") is None
    await boss_context.close()
    await context.close()


async def test_several_chat_panes_at_once_with_canned_replies(desk: DeskHarness, chrome: Browser) -> None:
    evil = "<img src=x onerror=window.xss=3>退货怎么办？"
    first = (await desk.chat.open()).interaction_id
    await desk.chat.post(first, "visitor", "Where is my parcel?", client_id="v1")
    second = (await desk.chat.open(language="zh-CN")).interaction_id
    await desk.chat.post(second, "visitor", evil, client_id="v2")
    await desk.agent("ann", display_name="Ann")
    context = await wide(chrome)
    page = await context.new_page()
    errors = console_errors(page)
    await sign_in(page, desk, "ann")
    await page.get_by_role("button", name="Available").click()
    for iid in (first, second):
        await page.locator(f'#offers [data-interaction="{iid}"]').get_by_role("button", name="Accept").click()
    one = page.locator(f'#work [data-interaction="{first}"] .chat')
    two = page.locator(f'#work [data-interaction="{second}"] .chat')
    await expect(one.locator(".msg .text")).to_have_text(["Where is my parcel?"])
    await expect(two.locator(".msg .text")).to_have_text([evil])   # the visitor's text, as text
    await expect(page.locator("#load-chat")).to_have_text("2/4")

    # a reply typed in one pane, a canned reply in the other; each lands in its own chat
    await one.get_by_label("Message").fill("It left our warehouse today.")
    await one.get_by_role("button", name="Send").click()
    await expect(one.locator(".msg.from-agent .text")).to_have_text(["It left our warehouse today."])
    await two.get_by_label("Canned replies").select_option(label="Thank you for waiting.")
    await expect(two.get_by_label("Message")).to_have_value("Thank you for waiting.")
    await two.get_by_label("Message").press("Enter")
    await expect(two.locator(".msg.from-agent .text")).to_have_text(["Thank you for waiting."])
    await expect(two.locator(".msg.from-agent .from")).to_have_text(["You"])

    # the customers go on writing while both panes are open
    await desk.chat.post(first, "visitor", "Thanks!", client_id="v3")
    desk.chat.typing(second, "visitor")
    await expect(one.locator(".msg .text")).to_have_text(["Where is my parcel?", "It left our warehouse today.",
                                                          "Thanks!"])
    await expect(two.locator(".typing")).to_be_visible()
    assert [(m.sender, m.agent, m.text) for m in await desk.chat.history(first)] == [
        ("visitor", None, "Where is my parcel?"), ("agent", "ann", "It left our warehouse today."),
        ("visitor", None, "Thanks!")]
    assert [(m.sender, m.text) for m in await desk.chat.history(second)][1] == ("agent", "Thank you for waiting.")
    assert await page.locator("main img").count() == 0 and await page.evaluate("window.xss") is None

    # the FAQ link goes into the chat; the agent ends one chat and gives its wrap-up code
    card = page.locator(f'#work [data-interaction="{second}"]')
    await card.get_by_label("Help article").select_option("returns")
    await card.get_by_role("button", name="Send FAQ link").click()
    await expect(two.locator(".msg.from-agent .text").last).to_have_text(
        f"30 天内免费退货: {desk.public_url}/help/a/returns")
    await card.get_by_role("button", name="End chat").click()
    await expect(page.locator(f'#owed [data-interaction="{second}"]')).to_be_visible()
    await expect(card).to_have_count(0)
    await expect(one).to_be_visible()
    await page.set_viewport_size(PHONE)
    assert await horizontal_overflow(page) == 0
    await page.screenshot(path=str(SCREENSHOTS / "desk-chats-phone.png"), full_page=True)
    assert errors == []
    await context.close()
