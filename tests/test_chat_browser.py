"""The chat widget in Chromium (Debian's /usr/bin/chromium through Playwright) on a phone-sized screen: a shop's
page on another origin (a second aiohttp server, listed in web.widget_origins, with a strict policy of its own)
loads the widget with one script tag; the visitor chats with an agent who writes through ChatService."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web as aioweb
from playwright.async_api import Browser, Dialog, FrameLocator, Page, expect
from sqlalchemy import select
from test_chat_web import ChatWeb, chat_web
from test_web_browser import browser, chromium, horizontal_overflow, phone  # noqa: F401  (fixtures)
from test_web_pages import free_port

from bridge.chat import ChatEvent, Feed
from bridge.config import Config
from bridge.models import Interaction

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(90)]

SCREENSHOT = Path("/tmp/chat-phone.png")
XSS_VISITOR = 'Hi <img src=x onerror="alert(\'visitor\')"><script>alert("v")</script> & "quotes"'
XSS_AGENT = "Sure! <img src=x onerror=alert('agent')><script>alert('a')</script>\nSecond line"


@contextlib.asynccontextmanager
async def shop_page(port: int, chat_url: str) -> AsyncIterator[str]:
    """A shop's page on its own origin: one script tag, and a strict policy that only lets the chat in."""
    html = f"""<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Shop</title></head>
<body><h1>Example shop</h1><p>Our products.</p>
<script src="{chat_url}/chat/widget.js" async></script></body></html>"""

    async def index(request: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(text=html, content_type="text/html", headers={
            "Content-Security-Policy": f"default-src 'self'; script-src {chat_url}; frame-src {chat_url}; "
                                       "style-src 'self'"})

    async def no_icon(request: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(status=204)

    app = aioweb.Application()
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", no_icon)
    runner = aioweb.AppRunner(app)
    await runner.setup()
    site = aioweb.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def shop(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[str, ChatWeb]]:
    """The shop's origin and the chat (a real WebServer) that lists it as a widget origin."""
    shop_port = free_port()

    def allow_the_shop(config: Config) -> None:
        config.web.widget_origins = [f"http://127.0.0.1:{shop_port}"]

    async with chat_web(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", redis_url, allow_the_shop) as chat, \
            shop_page(shop_port, chat.url) as shop_url:
        yield shop_url, chat


def watch(page: Page) -> tuple[list[str], list[str]]:
    """Dialogs (an alert would mean script ran) and console errors (CSP refusals among them) of every frame."""
    dialogs: list[str] = []
    errors: list[str] = []

    async def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return dialogs, errors


async def the_chat(chat: ChatWeb) -> str:
    assert chat.store.sessions is not None
    async with chat.store.sessions() as session:
        return str((await session.execute(select(Interaction.id).where(Interaction.channel == "web"))).scalar_one())


async def stored_texts(chat: ChatWeb, iid: str) -> list[str]:
    return [m.text for m in await chat.rows(iid)]


async def test_the_widget_on_a_shop_page_chats_with_an_agent_on_a_phone(shop: tuple[str, ChatWeb],
                                                                       browser: Browser) -> None:  # noqa: F811
    shop_url, chat = shop
    context = await phone(browser)
    page = await context.new_page()
    dialogs, errors = watch(page)
    await page.goto(shop_url)
    launcher = page.get_by_role("button", name="Chat with us")
    await expect(launcher).to_be_visible()
    await launcher.tap()
    frame: FrameLocator = page.frame_locator("iframe[title='Chat with us']")
    await expect(frame.get_by_role("heading", level=1)).to_have_text("Chat with us")
    box = await page.locator("iframe").bounding_box()
    assert box is not None and (box["width"], box["height"]) == (360, 740)   # the whole phone screen
    assert await horizontal_overflow(page) == 0

    box = await frame.get_by_role("button", name="Send").bounding_box()
    assert box is not None and box["height"] >= 44
    await frame.get_by_label("Your message").fill(XSS_VISITOR)
    await frame.get_by_role("button", name="Send").tap()
    await expect(frame.locator("#chat-log .msg.from-visitor .text")).to_have_text(XSS_VISITOR)
    await expect(frame.locator("#chat-status")).to_have_text("Waiting for the next free agent. You can keep writing.")
    iid = await the_chat(chat)
    assert await stored_texts(chat, iid) == [XSS_VISITOR]
    assert (await chat.router.snapshot()).queue == [iid]

    chat.chat.typing(iid, "agent", agent="ann")
    await expect(frame.get_by_text("The agent is typing…")).to_be_visible()
    await chat.chat.post(iid, "agent", XSS_AGENT, agent="ann")
    reply = frame.locator("#chat-log .msg.from-agent .text")
    await expect(reply).to_have_text(XSS_AGENT)
    await expect(frame.get_by_text("The agent is typing…")).to_be_hidden()
    assert await reply.evaluate("e => e.innerHTML") == XSS_AGENT.replace("&", "&amp;").replace("<", "&lt;") \
        .replace(">", "&gt;")
    assert await frame.locator("#chat img, #chat script").count() == 0
    await page.screenshot(path=str(SCREENSHOT))

    # the visitor's typing reaches the agent
    async with chat.chat.feed(iid, after_seq=2) as feed:
        await frame.get_by_label("Your message").press_sequentially("One more")
        typing = await wait_for_typing(feed)
    assert (typing.sender, typing.on) == ("visitor", True)

    await frame.get_by_role("button", name="Close the chat").tap()
    await expect(page.locator("iframe")).to_be_hidden()
    await expect(launcher).to_be_visible()
    assert dialogs == []            # no script of either side ran
    assert errors == []             # nothing refused by either page's policy, no failed loads
    await context.close()


async def wait_for_typing(feed: Feed) -> ChatEvent:
    async with asyncio.timeout(5):
        async for event in feed:
            if event.kind == "typing":
                return event
    raise AssertionError("the feed ended")


async def test_the_chat_speaks_chinese_to_a_chinese_browser_and_survives_a_reload(shop: tuple[str, ChatWeb],
                                                                                  browser: Browser,  # noqa: F811
                                                                                  ) -> None:
    shop_url, chat = shop
    context = await phone(browser, locale="zh-CN")
    page = await context.new_page()
    dialogs, errors = watch(page)
    await page.goto(shop_url)
    await page.get_by_role("button", name="在线咨询").tap()
    frame = page.frame_locator("iframe[title='在线咨询']")
    await expect(frame.get_by_role("heading", level=1)).to_have_text("在线咨询")
    await expect(frame.get_by_role("button", name="发送")).to_be_visible()
    assert await frame.get_by_label("您的消息").get_attribute("placeholder") == "请输入消息…"
    await frame.get_by_label("您的消息").fill("你好，我想查询订单")
    await frame.get_by_role("button", name="发送").tap()
    await expect(frame.locator("#chat-status")).to_have_text("正在等待空闲的客服，您可以继续输入。")
    iid = await the_chat(chat)
    record = await chat.store.get(iid)
    assert record is not None and record.language == "zh-CN"

    # a reload finds the same chat (the token is remembered in the frame's storage) with its history
    await chat.chat.post(iid, "agent", "您好，请提供订单号。", agent="ann")
    await page.reload()
    await page.get_by_role("button", name="在线咨询").tap()
    frame = page.frame_locator("iframe[title='在线咨询']")
    await expect(frame.locator("#chat-log .msg")).to_have_count(2)
    await expect(frame.locator("#chat-log .msg.from-agent .who")).to_have_text("客服")
    await frame.get_by_label("您的消息").fill("订单号 12345")
    await frame.get_by_label("您的消息").press("Enter")
    await expect(frame.locator("#chat-log .msg")).to_have_count(3)
    assert [(m.seq, m.text) for m in await chat.rows(iid)] == [(1, "你好，我想查询订单"), (2, "您好，请提供订单号。"),
                                                               (3, "订单号 12345")]
    assert dialogs == [] and errors == []
    await context.close()


async def test_the_visitor_ends_the_chat_and_can_start_a_new_one(shop: tuple[str, ChatWeb],
                                                                 browser: Browser) -> None:  # noqa: F811
    _, chat = shop
    context = await phone(browser)
    page = await context.new_page()
    await page.goto(f"{chat.url}/chat?lang=en")   # the page on its own, without the widget
    await page.get_by_label("Your message").fill("Never mind")
    await page.get_by_role("button", name="Send").tap()
    end = page.get_by_role("button", name="End chat")
    await expect(end).to_be_visible()
    await end.tap()
    await expect(page.locator("#chat-status")).to_have_text("This chat has ended.")
    await expect(page.get_by_label("Your message")).to_be_disabled()
    await page.get_by_role("button", name="Start a new chat").tap()
    await page.get_by_label("Your message").fill("A new question")
    await page.get_by_role("button", name="Send").tap()
    await expect(page.locator("#chat-log .msg.from-visitor .text")).to_have_text("A new question")
    assert len((await chat.router.snapshot()).queue) == 1   # the first one left the queue, the new one is in it
    assert await horizontal_overflow(page) == 0
    await context.close()
