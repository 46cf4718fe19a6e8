"""The visitor web chat over HTTP and websockets: a real aiohttp server (online_chat.WebServer) with the real
ChatService, Router and rate limiter on Redis, over SQLite and PostgreSQL. Headers and framing, the start API,
every refusal of the websocket, bad frames, the chat link texted during a call, a second process, and a long run
of messages from both sides through a proxy that cuts the visitor's connection at random moments."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select
from test_web_pages import SECRET, WebHarness, free_port, web_services

from bridge.chat import MAX_TEXT, ChatService
from bridge.config import Config, RouterConfig
from bridge.links import LinkSigner
from bridge.models import ChatMessage, FollowUp, Interaction
from bridge.router import Router
from bridge.store import InteractionStore
from online_chat import WebServer, WebServices
from online_chat.chat import MAX_FRAME, chat_tokens
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SHOP = "http://shop.example:8000"   # a widget origin
EVIL = "https://evil.example"


@dataclass
class ChatWeb:
    """A running web app with chat: its services, an HTTP client, and ways to talk to it as a visitor."""

    services: WebServices
    harness: WebHarness
    url: str
    http: aiohttp.ClientSession
    db_url: str
    channel: str
    extra: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def chat(self) -> ChatService:
        assert self.services.chat is not None
        return self.services.chat

    @property
    def router(self) -> Router:
        assert self.services.router is not None
        return self.services.router

    @property
    def store(self) -> InteractionStore:
        return self.services.store

    async def start(self, origin: str | None = None, body: Any = None) -> str:
        """POST /chat/start; the new chat's token."""
        async with self.http.post(f"{self.url}/chat/start", json=body or {"lang": "en"},
                                  headers={"Origin": origin or self.url}) as response:
            answer = await response.json()
            assert response.status == 201, answer
        return str(answer["token"])

    def interaction(self, token: str) -> str:
        return chat_tokens(SECRET).verify(token)[0]

    async def ws(self, token: str, after: int = 0, origin: str | None = None,
                 base: str | None = None) -> aiohttp.ClientWebSocketResponse:
        return await self.http.ws_connect(f"{(base or self.url).replace('http', 'ws', 1)}/chat/ws",
                                          params={"t": token, "after": str(after)},
                                          headers={"Origin": origin or self.url}, heartbeat=None)

    async def refused(self, token: str, status: int, **kwargs: Any) -> dict[str, Any]:
        """The websocket is refused with ``status``; the same request as a plain GET says why."""
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await self.ws(token, **kwargs)
        assert info.value.status == status
        headers = {"Origin": kwargs.get("origin") or self.url}
        async with self.http.get(f"{self.url}/chat/ws", params={"t": token, "after": str(kwargs.get("after", 0))},
                                 headers=headers) as response:
            assert response.status == status
            return dict(await response.json())

    async def rows(self, interaction_id: str) -> list[ChatMessage]:
        assert self.store.sessions is not None
        async with self.store.sessions() as session:
            return list((await session.execute(select(ChatMessage).where(
                ChatMessage.interaction_id == interaction_id).order_by(ChatMessage.seq))).scalars())

    async def process(self) -> ChatService:
        """A second ivr-bridge "process" on the same database, Redis, queue and chat channel."""
        store = InteractionStore(self.db_url)
        await store.start()
        self.extra.push_async_callback(store.aclose)
        router = Router(self.services.config.redis.url, self.services.config.router)
        self.extra.push_async_callback(router.aclose)
        chat = ChatService(store, self.services.config.redis.url, router, channel=self.channel)
        await chat.start()
        self.extra.push_async_callback(chat.aclose)
        return chat


@contextlib.asynccontextmanager
async def chat_web(db_url: str, redis_url: str, tweak: Callable[[Config], None] | None = None,
                   with_chat: bool = True) -> AsyncIterator[ChatWeb]:
    """A WebServer with a ChatService (its own router key prefix and chat channel) on a free port."""
    port = free_port()
    channel = f"test-chat:{uuid.uuid4().hex[:12]}"

    def configure(config: Config) -> None:
        config.router = RouterConfig(key_prefix=f"t:{{chat-web-{uuid.uuid4().hex[:12]}}}:")
        if tweak is not None:
            tweak(config)

    async with contextlib.AsyncExitStack() as stack:
        services, harness = await stack.enter_async_context(web_services(db_url, redis_url, port, configure))
        if with_chat:
            router = Router(redis_url, services.config.router)
            stack.push_async_callback(router.aclose)
            chat = ChatService(services.store, redis_url, router, channel=channel,
                               skill=services.config.web.chat_skill)
            await chat.start()
            stack.push_async_callback(chat.aclose)
            services.router, services.chat = router, chat
        server = WebServer(services)
        await server.start()
        stack.push_async_callback(server.aclose)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        web = ChatWeb(services, harness, f"http://127.0.0.1:{port}", http, db_url, channel)
        await stack.enter_async_context(web.extra)
        yield web


MakeChatWeb = Callable[..., Awaitable[ChatWeb]]


@pytest.fixture
async def make_chat_web(redis_url: str, tmp_path: Path) -> AsyncIterator[MakeChatWeb]:
    stack = contextlib.AsyncExitStack()

    async def make(db_url: str = "", tweak: Callable[[Config], None] | None = None, with_chat: bool = True,
                   ) -> ChatWeb:
        url = db_url or f"sqlite+aiosqlite:///{tmp_path / f'chat-{uuid.uuid4().hex[:6]}.db'}"
        return await stack.enter_async_context(chat_web(url, redis_url, tweak, with_chat))

    async with stack:
        yield make


def widget_origin(config: Config) -> None:
    config.web.widget_origins = [SHOP]


@pytest.fixture
async def web(make_chat_web: MakeChatWeb) -> ChatWeb:
    return await make_chat_web(tweak=widget_origin)


async def frame(ws: aiohttp.ClientWebSocketResponse, kind: str | None = None, timeout: float = 5) -> dict[str, Any]:
    """The next frame (of ``kind``, others skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            data: dict[str, Any] = json.loads(message.data)
            if kind is None or data["type"] == kind:
                return data


async def send(ws: aiohttp.ClientWebSocketResponse, **data: Any) -> None:
    await ws.send_str(json.dumps(data))


# ------------------------------------------------------------------------------------------------ pages
async def test_only_the_chat_page_may_be_framed_and_only_by_widget_origins(web: ChatWeb) -> None:
    async with web.http.get(f"{web.url}/chat?embed=1") as response:
        assert response.status == 200
        csp = response.headers["Content-Security-Policy"]
        assert f"frame-ancestors {SHOP}" in csp and "'none'" not in csp.split("frame-ancestors")[1].split(";")[0]
        assert f"connect-src 'self' {web.url.replace('http', 'ws')}" in csp
        assert "default-src 'self'" in csp and "object-src 'none'" in csp and "script-src" not in csp
        assert "X-Frame-Options" not in response.headers
        assert response.headers["Cache-Control"] == "no-store"
        body = await response.text()
    assert 'class="chat embed"' in body and 'data-token=""' in body
    for path in ("/help", "/chat/widget.js", "/nowhere", "/static/chat.js"):
        async with web.http.get(f"{web.url}{path}") as response:
            assert response.headers["X-Frame-Options"] == "DENY", path
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"], path


async def test_without_widget_origins_the_chat_page_cannot_be_framed(make_chat_web: MakeChatWeb) -> None:
    web = await make_chat_web()
    async with web.http.get(f"{web.url}/chat") as response:
        assert response.status == 200
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


async def test_the_widget_script_carries_both_languages_and_may_load_on_other_origins(web: ChatWeb) -> None:
    async with web.http.get(f"{web.url}/chat/widget.js") as response:
        assert response.status == 200
        assert response.content_type == "text/javascript"
        assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
        script = await response.text()
    assert "__STRINGS__" not in script
    assert '"zh-CN": {"open": "在线咨询"}' in script and '"en": {"open": "Chat with us"}' in script


async def test_the_chat_page_speaks_english_and_chinese(web: ChatWeb) -> None:
    async with web.http.get(f"{web.url}/chat", params={"lang": "zh-CN"}) as response:
        chinese = await response.text()
    assert '<html lang="zh-CN">' in chinese and "<h1>在线咨询</h1>" in chinese and "请输入消息…" in chinese
    strings = json.loads(re.search(r'<script type="application/json" id="chat-strings">(.*?)</script>',
                                   chinese, re.S).group(1))  # type: ignore[union-attr]
    assert strings["chat_typing"] == "客服正在输入…" and all(key.startswith("chat_") for key in strings)
    async with web.http.get(f"{web.url}/chat", headers={"Accept-Language": "en-GB"}) as response:
        english = await response.text()
    assert "<h1>Chat with us</h1>" in english and f'maxlength="{MAX_TEXT}"' in english


async def test_without_a_chat_service_chat_is_unavailable(make_chat_web: MakeChatWeb) -> None:
    web = await make_chat_web(with_chat=False)
    async with web.http.get(f"{web.url}/chat") as response:
        assert response.status == 503 and "Chat is not available" in await response.text()
    async with web.http.post(f"{web.url}/chat/start", json={}, headers={"Origin": web.url}) as response:
        assert response.status == 503 and (await response.json())["error"] == "unavailable"
    async with web.http.get(f"{web.url}/chat/ws", params={"t": "x"}) as response:
        assert response.status == 503


# ------------------------------------------------------------------------------------------------ starting
async def test_start_opens_a_queued_web_interaction(web: ChatWeb) -> None:
    token = await web.start(origin=SHOP, body={"lang": "zh-CN"})
    iid = web.interaction(token)
    record = await web.store.get(iid)
    assert record is not None and (record.channel, record.state, record.language) == ("web", "queued", "zh-CN")
    assert (await web.router.snapshot()).queue == [iid]


@pytest.mark.parametrize(("origin", "content_type", "body", "status", "code"), [
    (None, "application/json", "{}", 403, "origin"),
    (EVIL, "application/json", "{}", 403, "origin"),
    ("null", "application/json", "{}", 403, "origin"),
    ("self", "text/plain", "{}", 415, "content_type"),
    ("self", "application/json", "{not json", 400, "bad_json"),
    ("self", "application/json", "[1, 2]", 400, "bad_json"),
])
async def test_start_refuses_bad_requests_with_a_reason(web: ChatWeb, origin: str | None, content_type: str,
                                                        body: str, status: int, code: str) -> None:
    headers = {"Content-Type": content_type}
    if origin is not None:
        headers["Origin"] = web.url if origin == "self" else origin
    async with web.http.post(f"{web.url}/chat/start", data=body, headers=headers) as response:
        answer = await response.json()
        assert response.status == status, answer
    assert answer["error"] == code and answer["reason"]
    assert (await web.router.snapshot()).queue == []


async def test_starting_chats_is_limited_per_client_address(make_chat_web: MakeChatWeb) -> None:
    def two(config: Config) -> None:
        config.web.chat_starts_per_hour = 2

    web = await make_chat_web(tweak=two)
    await web.start()
    await web.start()
    async with web.http.post(f"{web.url}/chat/start", json={}, headers={"Origin": web.url}) as response:
        assert response.status == 429
        assert (await response.json())["error"] == "rate_limited"
    assert len((await web.router.snapshot()).queue) == 2


# ------------------------------------------------------------------------------------------------ refusals
async def test_a_websocket_from_a_foreign_or_missing_origin_is_refused(web: ChatWeb) -> None:
    token = await web.start()
    assert (await web.refused(token, 403, origin=EVIL))["error"] == "origin"
    assert (await web.refused(token, 403, origin="http://127.0.0.1:1"))["error"] == "origin"   # another port
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:   # no Origin at all
        await web.http.ws_connect(f"{web.url.replace('http', 'ws')}/chat/ws", params={"t": token})
    assert info.value.status == 403
    async with await web.ws(token, origin=SHOP) as ws:   # a widget origin may
        assert (await frame(ws))["type"] == "state"


async def test_bad_unknown_and_expired_tokens_are_refused(web: ChatWeb) -> None:
    token = await web.start()
    iid = web.interaction(token)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert (await web.refused(tampered, 400))["error"] == "bad_token"
    assert (await web.refused("nonsense", 400))["error"] == "bad_token"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    assert (await web.refused(chat_tokens(SECRET).token(iid, past), 410))["error"] == "expired"
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert (await web.refused(chat_tokens(SECRET).token(uuid.uuid4().hex, future), 404))["error"] == "unknown_chat"
    # a link token (same secret, other key) is no chat token
    assert (await web.refused(LinkSigner(SECRET).token(iid, future), 400))["error"] == "bad_token"
    assert (await web.refused(token, 400, after=-1))["error"] == "bad_after"


async def test_a_plain_get_with_a_good_token_is_told_to_use_a_websocket(web: ChatWeb) -> None:
    token = await web.start()
    async with web.http.get(f"{web.url}/chat/ws", params={"t": token}, headers={"Origin": web.url}) as response:
        assert response.status == 426
        assert (await response.json())["error"] == "websocket_expected"


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(web: ChatWeb) -> None:
    token = await web.start()
    async with await web.ws(token) as ws:
        assert await frame(ws) == {"type": "state", "state": "waiting", "joined": False}
        for raw, code in [("{nope", "bad_json"), ("[1]", "bad_frame"), ('{"kind": "msg"}', "bad_frame"),
                          ('{"type": 5}', "bad_frame"), ('{"type": "shout"}', "unknown_type"),
                          ('{"type": "msg", "cid": "a b", "text": "x"}', "bad_client_id"),
                          ('{"type": "msg", "text": "x"}', "bad_client_id"),
                          ('{"type": "msg", "cid": "c1", "text": 5}', "bad_frame"),
                          ('{"type": "msg", "cid": "c1", "text": "  \\n "}', "empty"),
                          (json.dumps({"type": "msg", "cid": "c1", "text": "长" * (MAX_TEXT + 1)}), "too_long")]:
            await ws.send_str(raw)
            error = await frame(ws)
            assert (error["type"], error["code"]) == ("error", code), raw
            assert error["reason"]
        await ws.send_bytes(b"\x00\x01")
        assert (await frame(ws))["code"] == "bad_frame"
        await send(ws, type="msg", cid="c1", text="长" * MAX_TEXT)   # exactly the limit is fine
        assert (await frame(ws, "ack"))["seq"] == 1
    assert len(await web.rows(web.interaction(token))) == 1


async def test_an_oversized_frame_closes_the_socket_with_1009(web: ChatWeb) -> None:
    token = await web.start()
    async with await web.ws(token) as ws:
        await frame(ws)
        await ws.send_str(json.dumps({"type": "msg", "cid": "big", "text": "x" * MAX_FRAME}))
        message = await ws.receive()
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1009   # "message too big"
    async with await web.ws(token) as ws:   # the chat itself is fine
        await frame(ws)
        await send(ws, type="msg", cid="small", text="ok")
        assert (await frame(ws, "ack"))["seq"] == 1


async def test_line_breaks_nul_and_markup_are_stored_and_sent_back_as_text(web: ChatWeb) -> None:
    token = await web.start()
    text = 'a\r\nb\x00c\rd <img src=x onerror=alert(1)> </script> \u2028"q"'
    async with await web.ws(token) as ws:
        await frame(ws)
        await send(ws, type="msg", cid="x1", text=text)
        echoed = await frame(ws, "msg")
    expected = 'a\nb\ufffdc\nd <img src=x onerror=alert(1)> </script> \u2028"q"'
    assert echoed["text"] == expected and echoed["from"] == "visitor"
    [row] = await web.rows(web.interaction(token))
    assert row.text == expected


async def test_a_resent_message_is_stored_once_and_acknowledged_as_a_duplicate(web: ChatWeb) -> None:
    token = await web.start()
    async with await web.ws(token) as ws:
        await frame(ws)
        await send(ws, type="msg", cid="same", text="hello")
        assert (await frame(ws, "ack")) == {"type": "ack", "cid": "same", "seq": 1, "dup": False}
    async with await web.ws(token, after=1) as ws:
        await frame(ws)
        await send(ws, type="msg", cid="same", text="hello")
        assert (await frame(ws, "ack")) == {"type": "ack", "cid": "same", "seq": 1, "dup": True}
    assert [r.text for r in await web.rows(web.interaction(token))] == ["hello"]


async def test_messages_over_the_limit_are_refused_and_not_stored(make_chat_web: MakeChatWeb) -> None:
    def three(config: Config) -> None:
        config.web.chat_messages_per_hour = 3

    web = await make_chat_web(tweak=three)
    token = await web.start()
    async with await web.ws(token) as ws:
        await frame(ws)
        for n in range(4):
            await send(ws, type="msg", cid=f"m{n}", text=f"n{n}")
        answers = [await frame(ws, None) for _ in range(7)]   # 3 x (msg + ack) and the refusal
    errors = [a for a in answers if a["type"] == "error"]
    assert sorted(a["cid"] for a in answers if a["type"] == "ack") == ["m0", "m1", "m2"]
    assert [(e["code"], e["cid"]) for e in errors] == [("rate_limited", "m3")]
    assert len(await web.rows(web.interaction(token))) == 3


# ------------------------------------------------------------------------------------------------ the chat
async def test_reconnecting_after_a_number_gets_only_what_was_missed(web: ChatWeb) -> None:
    token = await web.start()
    iid = web.interaction(token)
    for n in range(1, 4):
        await web.chat.post(iid, "agent", f"a{n}", agent="ann")
    async with await web.ws(token, after=1) as ws:
        await frame(ws)
        assert [(await frame(ws, "msg"))["seq"] for _ in range(2)] == [2, 3]
        await web.chat.post(iid, "agent", "live", agent="ann")
        live = await frame(ws, "msg")
    assert (live["seq"], live["from"], live["text"], live["cid"]) == (4, "agent", "live", None)
    assert "agent" not in live   # agents' login names are not shown to visitors


async def test_a_message_from_another_process_reaches_the_visitors_socket(web: ChatWeb) -> None:
    other = await web.process()
    token = await web.start()
    iid = web.interaction(token)
    async with await web.ws(token) as ws:
        await frame(ws)
        await other.post(iid, "agent", "from the other process", agent="ann")
        other.typing(iid, "agent", agent="ann")
        assert (await frame(ws, "msg"))["text"] == "from the other process"
        assert (await frame(ws, "typing")) == {"type": "typing", "from": "agent", "on": True}
        # and the visitor's reaches the other process's followers
        async with other.feed(iid, after_seq=1) as feed:
            await send(ws, type="msg", cid="v1", text="thanks")
            async with asyncio.timeout(5):
                event = await anext(aiter(feed))
    assert event.message is not None and (event.message.seq, event.message.text) == (2, "thanks")


async def test_typing_goes_both_ways_and_a_visitors_is_throttled(web: ChatWeb) -> None:
    token = await web.start()
    iid = web.interaction(token)
    async with web.chat.feed(iid) as feed, await web.ws(token) as ws:
        await frame(ws)
        for _ in range(5):
            await send(ws, type="typing", on=True)
        await send(ws, type="typing", on=False)
        seen = []
        async with asyncio.timeout(5):
            async for event in feed:
                if event.kind == "typing":
                    seen.append((event.sender, event.on))
                    if not event.on:
                        break
        assert seen == [("visitor", True), ("visitor", False)]   # the repeats within 2 s were not passed on
        web.chat.typing(iid, "agent", on=True, agent="ann")
        assert await frame(ws, "typing") == {"type": "typing", "from": "agent", "on": True}


async def test_the_visitor_ends_a_web_chat_and_cannot_write_after(web: ChatWeb) -> None:
    token = await web.start()
    iid = web.interaction(token)
    async with await web.ws(token) as ws:
        await frame(ws)
        await send(ws, type="close")
        assert await frame(ws, "state") == {"type": "state", "state": "closed"}
        await send(ws, type="msg", cid="late", text="hello?")
        assert (await frame(ws, "error"))["code"] == "closed"
    assert await web.router.interaction(iid) == {}
    record = await web.store.get(iid)
    assert record is not None and record.state == "ended"
    async with await web.ws(token) as ws:   # coming back shows it closed
        assert await frame(ws) == {"type": "state", "state": "closed", "joined": False}


async def test_the_state_follows_the_queue(web: ChatWeb) -> None:
    token = await web.start()
    iid = web.interaction(token)
    await web.router.login("ann", [web.services.config.web.chat_skill])
    assert await web.router.set_presence("ann", "available")
    async with await web.ws(token) as ws:
        assert (await frame(ws))["state"] == "waiting"
        [offer] = await web.router.assign()
        assert offer.interaction == iid and await web.router.accept(iid, "ann")
        assert await frame(ws, "state") == {"type": "state", "state": "active"}
        await web.chat.post(iid, "agent", "Hello, I am Ann.", agent="ann")
        assert (await frame(ws, "msg"))["text"] == "Hello, I am Ann."
        await web.chat.close(iid)
        assert await frame(ws, "state") == {"type": "state", "state": "closed"}


# ------------------------------------------------------------------------------------------------ the chat link
async def test_a_chat_link_texted_during_a_call_opens_the_chat_of_that_call(web: ChatWeb) -> None:
    call = await web.harness.call(channel="voice", state="queued", skill="billing", language="zh-CN")
    assert await web.router.enqueue(call.id, "voice", "billing")
    path, link_id = await web.harness.sms_link("chat_link", call, language="zh-CN")
    [followup] = await web.harness.rows(FollowUp)
    assert "排队位置保留" in followup.payload["text"]
    assert (await web.harness.link(link_id)).kind == "chat"
    async with web.http.get(f"{web.url}{path}") as response:
        page = await response.text()
        assert response.status == 200
        assert response.headers["X-Frame-Options"] == "DENY"   # the link's page is not framable
        assert response.headers["Cache-Control"] == "no-store"
    assert '<html lang="zh-CN">' in page and 'data-joined="1"' in page and "关于您在" in page
    token = re.search(r'data-token="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert web.interaction(token) == call.id
    async with await web.ws(token) as ws:
        assert await frame(ws) == {"type": "state", "state": "waiting", "joined": True}
        await send(ws, type="msg", cid="w1", text="我还在排队，可以先打字吗？")
        assert (await frame(ws, "ack"))["seq"] == 1
        await send(ws, type="close")   # a call's chat ends with the call
        assert (await frame(ws, "error"))["code"] == "not_allowed"
    assert [r.interaction_id for r in await web.rows(call.id)] == [call.id]
    snapshot = await web.router.snapshot()
    assert snapshot.queue == [call.id] and snapshot.interactions[call.id].channel == "voice"   # queued once
    assert (await web.harness.link(link_id)).opens == 1


async def test_a_chat_link_of_an_unknown_interaction_is_not_found(web: ChatWeb) -> None:
    path, _ = await web.harness.sms_link("chat_link", None)
    async with web.http.get(f"{web.url}{path}") as response:
        assert response.status == 404


# ------------------------------------------------------------------------------------------------ disconnects
class CuttingProxy:
    """A TCP proxy in front of the web app whose connections can be cut at any moment (both directions,
    whatever is in flight is lost), as a phone losing its network would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()
        self.cuts += bool(self._pairs)
        self._pairs.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pair = (writer, up_writer)
        self._pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._pairs.discard(pair)


@dataclass
class Visitor:
    """A visitor's browser, as chat.js behaves: messages shown by number (each must be the next one),
    unacknowledged ones resent after every reconnect."""

    web: ChatWeb
    token: str
    base: str
    shown: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)   # cid -> text, not acknowledged
    ws: aiohttp.ClientWebSocketResponse | None = None
    connects: int = 0
    resent_stored: int = 0     # acknowledged as stored before: the resend after a cut found it
    out_of_order: list[str] = field(default_factory=list)

    @property
    def last_seq(self) -> int:
        return self.shown[-1]["seq"] if self.shown else 0

    async def run(self, until: asyncio.Event) -> None:
        """Stay connected (reconnecting at once after a cut) until ``until`` is set."""
        while not until.is_set():
            try:
                self.ws = await self.web.ws(self.token, after=self.last_seq, base=self.base)
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.01)
                continue
            self.connects += 1
            try:
                for cid, text in list(self.pending.items()):
                    await self.ws.send_str(json.dumps({"type": "msg", "cid": cid, "text": text}))
                async for message in self.ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        break
                    self.receive(json.loads(message.data))
            except (aiohttp.ClientError, OSError, ConnectionError):
                pass
            finally:
                await self.ws.close()
                self.ws = None

    def receive(self, data: dict[str, Any]) -> None:
        if data["type"] == "msg":
            if data["seq"] != self.last_seq + 1:
                self.out_of_order.append(f"{data['seq']} after {self.last_seq}")
            if data["seq"] > self.last_seq:
                self.shown.append(data)
        elif data["type"] == "ack":
            self.pending.pop(data["cid"], None)
            self.resent_stored += data["dup"]
        elif data["type"] == "error":
            raise AssertionError(f"error frame: {data}")

    async def say(self, cid: str, text: str) -> None:
        self.pending[cid] = text
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(aiohttp.ClientError, OSError, ConnectionError):
                await self.ws.send_str(json.dumps({"type": "msg", "cid": cid, "text": text}))


async def test_random_disconnects_during_1000_messages_lose_and_duplicate_nothing(make_chat_web: MakeChatWeb,
                                                                                 db_url: str) -> None:
    def unlimited(config: Config) -> None:
        config.web.chat_messages_per_hour = 100000

    web = await make_chat_web(db_url, tweak=unlimited)
    agent_side = await web.process()   # the agent writes through another process
    token = await web.start()
    iid = web.interaction(token)
    proxy = CuttingProxy(int(web.url.rsplit(":", 1)[1]))
    await proxy.start()
    rng = random.Random(20261123)
    visitor = Visitor(web, token, f"http://127.0.0.1:{proxy.port}")
    done = asyncio.Event()
    agent_view: list[int] = []   # what the agent's desktop shows: a feed, reopened after its own "disconnects"

    async def agent_desktop() -> None:
        while not done.is_set():
            async with agent_side.feed(iid, after_seq=agent_view[-1] if agent_view else 0) as feed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(rng.uniform(0.05, 0.3)):
                        async for event in feed:
                            if event.kind == "msg":
                                assert event.message is not None
                                agent_view.append(event.message.seq)

    async def agent_writes() -> None:
        for n in range(500):
            await agent_side.post(iid, "agent", f"agent {n}", client_id=f"a{n}", agent="ann")
            await asyncio.sleep(rng.uniform(0, 0.004))

    async def visitor_writes() -> None:
        for n in range(500):
            await visitor.say(f"v{n}", f"visitor {n} <b>")
            await asyncio.sleep(rng.uniform(0, 0.004))

    async def chaos() -> None:
        while not done.is_set():
            await asyncio.sleep(rng.uniform(0.02, 0.15))
            proxy.cut()

    runner = asyncio.create_task(visitor.run(done))
    desktop = asyncio.create_task(agent_desktop())
    cutter = asyncio.create_task(chaos())
    try:
        await asyncio.wait_for(asyncio.gather(agent_writes(), visitor_writes()), 60)
        await wait_until(lambda: not visitor.pending and len(visitor.shown) >= 1000 and len(agent_view) >= 1000,
                         60, "everything resent, acknowledged and shown on both sides", interval=0.05)
    finally:
        done.set()
        cutter.cancel()
        await asyncio.wait({cutter})
        proxy.cut()
        await asyncio.wait_for(asyncio.gather(runner, desktop), 10)
        await proxy.aclose()

    assert proxy.cuts >= 10 and visitor.connects >= 10, (proxy.cuts, visitor.connects)
    assert visitor.resent_stored > 0, "no resend found its message stored: the dedup was not exercised"
    stored = await web.rows(iid)
    assert [r.seq for r in stored] == list(range(1, 1001))
    assert sorted(r.text for r in stored) == sorted([f"agent {n}" for n in range(500)] +
                                                    [f"visitor {n} <b>" for n in range(500)])
    visitor_texts = [r.text for r in stored if r.sender == "visitor"]
    assert visitor_texts == [f"visitor {n} <b>" for n in range(500)]   # the visitor's order kept
    assert [r.text for r in stored if r.sender == "agent"] == [f"agent {n}" for n in range(500)]
    assert visitor.out_of_order == []
    assert [(m["seq"], m["text"]) for m in visitor.shown] == [(r.seq, r.text) for r in stored]
    assert agent_view == list(range(1, 1001))
    record = await web.store.get(iid)
    assert isinstance(record, Interaction)
