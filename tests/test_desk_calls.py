"""The whole path of a call to a person, on the real parts: a pjsua2 caller dials the test Asterisk and presses 0,
waits in the queue; the agent signs in to the desktop in Chromium and accepts the offer there; the agent's pjsua2
desk phone (a registered PJSIP endpoint) rings and answers and Asterisk bridges the two (BridgeEnter events); the
agent hangs up, the caller hears the flow's goodbye, and the desktop asks for the wrap-up code, which is stored.
And one agent with a call and three chats at once, a fourth chat waiting until the call ends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from playwright.async_api import Browser, Page, expect
from test_desk import PASSWORD
from test_queue_calls import Desk
from test_web_browser import browser, chromium  # noqa: F401 (fixtures)
from test_web_pages import free_port

from bridge.app import App
from ivr.softphone import Softphone, SoftphoneCall, SoftphoneConfig

if TYPE_CHECKING:
    from conftest import CallWatch, Harness

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(120)]


class Floor:
    """An App on the test Asterisk with the web app, agent ann (desk phone agent1, registered) signed in to the
    desktop in Chromium and available."""

    def __init__(self, app: App, page: Page, phone: Softphone) -> None:
        self.app = app
        self.page = page
        self.phone = phone
        self.bridges = Desk(app)   # BridgeEnter events seen on the App's AMI link


@pytest.fixture
async def floor(ivr: Harness, browser: Browser) -> AsyncIterator[Floor]:  # noqa: F811 (fixture)
    await ivr.softphone()
    config = ivr.config()
    port = free_port()
    config.web.port = port
    config.web.public_url = f"http://127.0.0.1:{port}"
    config.router.key_prefix = f"t:{{router-{uuid.uuid4().hex[:12]}}}:"
    config.router.wrapup_seconds = 2
    app = await ivr.start_app(config)
    await app.agents.add("ann", PASSWORD, display_name="Ann Lee", skills=["billing", "general"], phone="agent1")
    ast = config.asterisk
    phone = Softphone(SoftphoneConfig(user="agent1", username="agent1", password=ast.agent_phone_password("agent1"),
                                      registrar=f"sip:127.0.0.1:{ast.sip_port}"))
    await phone.start()
    context = await browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
    try:
        page = await context.new_page()
        await page.goto(f"{config.web.public_url}/desk/login")
        await page.get_by_label("User name").fill("ann")
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#conn")).to_have_text("Connected")
        await page.get_by_role("button", name="Available").click()
        await expect(page.locator("#presence")).to_have_text("Available")
        yield Floor(app, page, phone)
    finally:
        await context.close()
        await phone.aclose()


async def call_in(ivr: Harness, floor: Floor) -> tuple[SoftphoneCall, CallWatch, SoftphoneCall]:
    """A caller presses 0, ann accepts the offer in the browser, her phone rings, she answers: bridged."""
    call, watch = await ivr.dial("300", app=floor.app)
    assert watch is not None
    await ivr.press(call, watch, "menu", "0")
    await watch.next("prompt", node="wait", text="Please hold.")
    offer = floor.page.locator(f'#offers [data-interaction="{watch.call_id}"]')
    await expect(offer).to_be_visible(timeout=10000)
    await expect(offer.locator(".number")).to_have_text(ivr.CALLER)
    await offer.get_by_role("button", name="Accept").click()
    ringing = await floor.bridges.answer(floor.phone)   # the IVR rings the agent's phone
    assert len({m.get("BridgeUniqueid") for m in floor.bridges.bridge_enters}) == 1
    await expect(floor.page.locator(f'#work [data-interaction="{watch.call_id}"]')).to_be_visible()
    return call, watch, ringing


async def test_a_caller_is_bridged_to_the_agent_who_accepts_in_the_browser_then_wraps_up(
        ivr: Harness, floor: Floor) -> None:
    page = floor.page
    call, watch, ringing = await call_in(ivr, floor)
    iid = watch.call_id
    await ringing.hangup()
    await watch.next("prompt", node="rate", text="Thank you for talking to us.")
    assert (await watch.next("call-ended"))["outcome"] == "answered"
    await call.wait_ended(timeout=10)
    owed = page.locator(f'#owed [data-interaction="{iid}"]')
    await expect(owed).to_be_visible(timeout=10000)
    await owed.get_by_label("Wrap-up code").select_option("resolved")
    await owed.get_by_role("button", name="Save").click()
    await expect(owed).to_have_count(0)
    record = await floor.app.store.get(iid)
    assert record is not None
    assert (record.outcome, record.agent, record.wrapup_code) == ("answered", "ann", "resolved")


async def test_an_agent_holds_a_call_and_three_chats_and_a_fourth_chat_waits_until_the_call_ends(
        ivr: Harness, floor: Floor) -> None:
    app, page = floor.app, floor.page
    chats = [await app.chat.open(language="en") for _ in range(3)]
    for info in chats:
        offer = page.locator(f'#offers [data-interaction="{info.interaction_id}"]')
        await expect(offer).to_be_visible(timeout=10000)
        await offer.get_by_role("button", name="Accept").click()
        await expect(page.locator(f'#work [data-interaction="{info.interaction_id}"]')).to_be_visible()
    _, watch, ringing = await call_in(ivr, floor)   # chats in progress do not stop a call
    await expect(page.locator("#load-voice")).to_have_text("1/1")
    await expect(page.locator("#work [data-interaction]")).to_have_count(4)

    fourth = await app.chat.open(language="en")   # room for a fourth chat, but a call blocks new chats
    await asyncio.sleep(2)
    assert (await app.router.interaction(fourth.interaction_id))["state"] == "queued"
    await expect(page.locator(f'#offers [data-interaction="{fourth.interaction_id}"]')).to_have_count(0)
    await app.chat.post(chats[0].interaction_id, "visitor", "still here?", client_id="c1")
    await expect(page.locator(f'#work [data-interaction="{chats[0].interaction_id}"]')).to_contain_text(
        "still here?")   # the chats in progress go on during the call

    await ringing.hangup()   # the call ends: after the wrap-up time the fourth chat is offered
    assert (await watch.next("call-ended"))["outcome"] == "answered"
    offer = page.locator(f'#offers [data-interaction="{fourth.interaction_id}"]')
    await expect(offer).to_be_visible(timeout=10000)
    await offer.get_by_role("button", name="Accept").click()
    await expect(page.locator("#work [data-interaction]")).to_have_count(4)
    await expect(page.locator("#load-chat")).to_have_text("4/4")
    snap = await app.router.snapshot()
    assert (snap.agents["ann"].voice, snap.agents["ann"].chat) == (0, 4)
