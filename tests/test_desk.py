"""The agent desktop and the supervisor view over HTTP and websockets: a real WebServer on a free port, the real
Router and EventBus on the session's Redis, a real AgentDirectory (argon2), on SQLite and PostgreSQL.

Sign-in (CSRF, Origin, one answer for unknown names and wrong passwords, rate limits), the session cookie and its
lifetime, logout, websocket refusals, offers (also made by another Router "process"), accepting, the call card and
the customer's timeline, transfer, FAQ links by SMS and in chats, several chats at once (the real ChatService),
wrap-up codes and the supervisor's live view."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from test_web_pages import free_port, web_services
from yarl import URL

from bridge.agents import AgentDirectory
from bridge.chat import ChatService
from bridge.config import Config
from bridge.events import EventBus
from bridge.models import Agent, Interaction, Link, Step, SurveyAnswer
from bridge.router import Router
from online_chat import WebServer, WebServices
from online_chat.desk import MAX_FRAME, SESSION_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PASSWORD = "correct horse battery"
EVIL = "https://evil.example"
CALLER = "+8613800138000"


# ------------------------------------------------------------------------------------------------ harness
@dataclass
class Frames:
    """A desktop's websocket: frames read in order, requests answered by their reply."""

    ws: aiohttp.ClientWebSocketResponse
    seen: list[dict[str, Any]] = field(default_factory=list)
    unread: list[dict[str, Any]] = field(default_factory=list)   # read while looking for another kind
    _ids: int = 0

    async def next(self, kind: str, timeout: float = 5.0, where: Callable[[dict[str, Any]], bool] | None = None,
                   ) -> dict[str, Any]:
        """The first frame of ``kind`` (matching ``where``) not returned yet; a state frame only from those still
        to come (each is the whole state: an older one that matches says nothing about now)."""
        for i, frame in enumerate(self.unread):
            if kind != "state" and frame["type"] == kind and (where is None or where(frame)):
                return self.unread.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} frame within {timeout} s; seen {[f['type'] for f in self.seen]}")
            message = await self.ws.receive(timeout=left)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"socket ended while waiting for {kind}: {message.type} {message.data}")
            frame = json.loads(message.data)
            self.seen.append(frame)
            if frame["type"] == kind and (where is None or where(frame)):
                return frame
            self.unread.append(frame)

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        self._ids += 1
        ref = self._ids
        await self.ws.send_json({**frame, "id": ref})
        return await self.next("reply", where=lambda f: f["id"] == ref)

    async def state(self, where: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        return await self.next("state", timeout, where)

    async def current(self, where: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """The agent's state as last sent if it matches (it may have come with an earlier one), or the next one
        that does."""
        last = next((f for f in reversed(self.seen) if f["type"] == "state"), None)
        return last if last is not None and where(last) else await self.state(where, timeout)

    async def card(self, iid: str) -> dict[str, Any]:
        """The card of an interaction (sent once, maybe already read while waiting for something else)."""
        for frame in self.seen:
            if frame["type"] == "card" and frame["interaction"] == iid:
                return frame
        return await self.next("card", where=lambda f: f["interaction"] == iid)

    async def closed(self) -> int:
        """The close code, once the frames queued before it are read."""
        while True:
            message = await self.ws.receive(timeout=5)
            if message.type != aiohttp.WSMsgType.TEXT:
                assert message.type == aiohttp.WSMsgType.CLOSE, message
                return int(message.data)


@dataclass
class DeskHarness:
    services: WebServices
    router: Router
    public_url: str
    redis_url: str
    woken: list[int]
    clients: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def chat(self) -> ChatService:
        assert self.services.chat is not None
        return self.services.chat

    @property
    def agents(self) -> AgentDirectory:
        assert self.services.agents is not None
        return self.services.agents

    async def agent(self, name: str, role: str = "agent", skills: tuple[str, ...] = ("billing",),
                    **fields: Any) -> Agent:
        return await self.agents.add(name, PASSWORD, role=role, skills=list(skills), **fields)

    def client(self) -> aiohttp.ClientSession:
        """A browser-like client: its own cookie jar (which keeps 127.0.0.1's cookies)."""
        session = aiohttp.ClientSession(base_url=self.public_url, cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.clients.append(session)
        return session

    async def csrf(self, client: aiohttp.ClientSession, path: str = "/desk/login") -> str:
        async with client.get(path) as response:
            body = await response.text()
        found = re.search(r'name="csrf" value="([0-9a-f]{64})"', body)
        assert found, body[:2000]
        return found.group(1)

    async def login(self, client: aiohttp.ClientSession, name: str, password: str = PASSWORD,
                    headers: dict[str, str] | None = None, token: str | None = None) -> tuple[int, str, str]:
        """Submit the sign-in form: status, Location and body."""
        token = await self.csrf(client) if token is None else token
        async with client.post("/desk/login", data={"csrf": token, "name": name, "password": password},
                               headers={"Origin": self.public_url} if headers is None else headers,
                               allow_redirects=False) as response:
            return response.status, response.headers.get("Location", ""), await response.text()

    async def signed_in(self, name: str, role: str = "agent", **fields: Any) -> aiohttp.ClientSession:
        await self.agent(name, role, **fields)
        client = self.client()
        status, location, _ = await self.login(client, name)
        assert status == 303, location
        return client

    async def socket(self, client: aiohttp.ClientSession, path: str = "/desk/ws",
                     origin: str | None = "") -> Frames:
        headers = {} if origin is None else {"Origin": origin or self.public_url}
        return Frames(await client.ws_connect(path, headers=headers))

    async def desktop(self, name: str, **fields: Any) -> Frames:
        """Signed in, the desktop open and the agent available."""
        frames = await self.socket(await self.signed_in(name, **fields))
        await frames.next("hello")
        assert (await frames.request({"type": "presence", "presence": "available"}))["ok"]
        await frames.state(lambda s: s["presence"] == "available")
        return frames

    async def call(self, caller: str = CALLER, **fields: Any) -> Interaction:
        """A call that went through the IVR (stored with its path) and is waiting for an agent."""
        steps = [Step(seq=0, node="main", event="enter"), Step(seq=1, node="main", event="digit", value="2"),
                 Step(seq=2, node="billing", event="enter"), Step(seq=3, node="billing", event="set",
                                                                    value="account=12345"),
                 Step(seq=4, node="queue", event="enter")]
        values = {"caller": caller, "dialled": "100", "flow": "hotline", "language": "en", "intent": "billing",
                  "skill": "billing", "steps": steps, **fields}
        return await self.services.store.create(**values)

    async def row(self, iid: str) -> Interaction:
        found = await self.services.store.get(iid)
        assert found is not None
        return found


@contextlib.asynccontextmanager
async def desk_server(db_url: str, redis_url: str, tweak: Callable[[Config], None] | None = None,
                      start_router: bool = True) -> AsyncIterator[DeskHarness]:
    """A WebServer with the desk over ``db_url``, its own router keys and event channel on ``redis_url``.
    Without ``start_router`` its router makes no offers (another "process" does)."""
    port = free_port()
    tag = uuid.uuid4().hex[:12]

    def configure(config: Config) -> None:
        config.router.key_prefix = f"t:{{desk-{tag}}}:"
        config.router.wrapup_seconds = 1.0
        config.redis.events_channel = f"test-desk-{tag}"
        if tweak is not None:
            tweak(config)

    async with web_services(db_url, redis_url, port, configure) as (services, web):
        bus = EventBus(redis_url, services.config.redis.events_channel)
        await bus.start()
        router = Router(redis_url, services.config.router, bus)
        if start_router:
            await router.start()
        chat = ChatService(services.store, redis_url, router, channel=f"test-desk-chat-{tag}", skill="billing")
        await chat.start()
        services.router, services.bus, services.agents = router, bus, AgentDirectory(services.store)
        services.chat = chat
        server = WebServer(services)
        await server.start()
        harness = DeskHarness(services, router, services.config.web.public_url, redis_url, web.woken)
        try:
            yield harness
        finally:
            for client in harness.clients:
                await client.close()
            await server.aclose()
            await chat.aclose()
            await router.aclose()
            await bus.aclose()


@pytest.fixture
async def desk(db_url: str, redis_url: str) -> AsyncIterator[DeskHarness]:
    async with desk_server(db_url, redis_url) as harness:
        yield harness


def cookie(set_cookie: str) -> dict[str, str]:
    """The attributes of one Set-Cookie header, names lower-cased."""
    name_value, *attributes = [part.strip() for part in set_cookie.split(";")]
    out = {"": name_value}
    for attribute in attributes:
        key, _, value = attribute.partition("=")
        out[key.lower()] = value
    return out


# ------------------------------------------------------------------------------------------------ sign-in
async def test_sign_in_needs_the_forms_csrf_token_and_our_origin(desk: DeskHarness) -> None:
    await desk.agent("ann")
    client = desk.client()
    token = await desk.csrf(client)
    status, _, body = await desk.login(client, "ann", token="0" * 64)
    assert status == 403 and "This form has expired" in body
    status, _, _ = await desk.login(client, "ann", token="")
    assert status == 403
    status, _, body = await desk.login(client, "ann", token=token, headers={"Origin": EVIL})
    assert status == 403 and "did not come from our website" in body
    assert "desk" not in {c.key for c in client.cookie_jar}
    status, location, _ = await desk.login(client, "ann", token=token)
    assert (status, location) == (303, "/desk")


async def test_unknown_name_and_wrong_password_get_the_same_answer(desk: DeskHarness) -> None:
    await desk.agent("ann")
    client = desk.client()
    wrong = await desk.login(client, "ann", "not the password!")
    unknown = await desk.login(client, "nobody", PASSWORD)
    assert wrong[0] == unknown[0] == 401
    assert wrong[2].replace('value="ann"', "") == unknown[2].replace('value="nobody"', "")
    assert "The user name or the password is wrong." in wrong[2]
    assert "desk" not in {c.key for c in client.cookie_jar}


async def test_sign_in_attempts_are_limited_per_account_and_per_client(db_url: str, redis_url: str) -> None:
    def limits(config: Config) -> None:
        config.desk.login_per_account = 3
        config.desk.login_per_client = 7

    async with desk_server(db_url, redis_url, limits) as desk:
        await desk.agent("ann")
        client = desk.client()
        for _ in range(3):
            assert (await desk.login(client, "ann", "not the password!"))[0] == 401
        # the account is locked, the right password included (a refused attempt counts against nothing)
        status, _, body = await desk.login(client, "ann")
        assert status == 429 and "Too many sign-in attempts" in body
        assert (await desk.login(client, "ANN "))[0] == 429   # the same account, however it is typed
        # a name that does not exist is locked the same way, with the same answer
        for _ in range(3):
            assert (await desk.login(client, "ghost", "x" * 12))[0] == 401
        ghost = await desk.login(client, "ghost", "x" * 12)
        assert ghost[0] == 429 and ghost[2].replace('value="ghost"', "") == body.replace('value="ann"', "")
        # six attempts counted for this client address (every client here is 127.0.0.1): one more, then none
        await desk.agent("bob")
        assert (await desk.login(desk.client(), "bob"))[0] == 303
        assert (await desk.login(desk.client(), "bob"))[0] == 429


async def test_the_session_cookie_is_httponly_strict_and_secure_when_configured(db_url: str,
                                                                                redis_url: str) -> None:
    for secure in (False, True):
        def setting(config: Config, secure: bool = secure) -> None:
            config.web.secure_cookies = secure

        async with desk_server(db_url, redis_url, setting) as desk:   # the same database both times
            name = f"ann{secure:d}"
            await desk.agent(name)
            client = desk.client()
            async with client.get("/desk/login") as page:
                found = re.search(r'name="csrf" value="([0-9a-f]{64})"', await page.text())
                csrf_cookie = page.cookies["csrf"].value
            assert found is not None
            # the client keeps a Secure cookie from going over plain HTTP: this test sends it itself
            async with client.post("/desk/login", data={"csrf": found.group(1), "name": name, "password": PASSWORD},
                                   headers={"Origin": desk.public_url, "Cookie": f"csrf={csrf_cookie}"},
                                   allow_redirects=False) as response:
                assert response.status == 303
                [header] = [h for h in response.headers.getall("Set-Cookie") if h.startswith("desk=")]
            attributes = cookie(header)
            assert "httponly" in attributes and attributes["samesite"] == "Strict"
            assert attributes["path"] == "/desk" and "max-age" not in attributes
            assert ("secure" in attributes) is secure
            value = attributes[""].split("=", 1)[1]
            assert len(value) == 43   # 256 random bits
            # Redis knows the session by a hash of the id, never by the id itself
            redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
            try:
                keys = [k async for k in redis.scan_iter(f"{SESSION_PREFIX}*")]
                assert keys and not any(value in k for k in keys)
                ttls = [await redis.pttl(k) for k in keys]
                assert all(0 < ttl <= desk.services.config.desk.session_idle * 1000 for ttl in ttls)
            finally:
                await redis.aclose()


async def test_signing_in_again_gives_a_new_session_and_ends_the_old_one(desk: DeskHarness) -> None:
    client = await desk.signed_in("ann")
    first = client.cookie_jar.filter_cookies(URL(desk.public_url + "/desk"))["desk"].value
    status, _, _ = await desk.login(client, "ann")
    assert status == 303
    second = client.cookie_jar.filter_cookies(URL(desk.public_url + "/desk"))["desk"].value
    assert second != first
    stale = desk.client()
    stale.cookie_jar.update_cookies({"desk": first}, URL(desk.public_url + "/desk"))
    async with stale.get("/desk", allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (303, "/desk/login")


async def test_a_session_ends_when_idle_and_after_its_lifetime(db_url: str, redis_url: str) -> None:
    def short(config: Config) -> None:
        config.desk.session_idle = 1.0
        config.desk.session_lifetime = 3.0

    async with desk_server(db_url, redis_url, short) as desk:
        client = await desk.signed_in("ann")
        await asyncio.sleep(1.4)
        async with client.get("/desk", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (303, "/desk/login")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await desk.socket(client)
        assert refused.value.status == 401

        # kept busy, it still ends at its lifetime; an open socket is closed then (at its next frame)
        status, _, _ = await desk.login(client, "ann")
        assert status == 303
        started = time.monotonic()   # the session is a little older than this
        frames = await desk.socket(client)
        await frames.next("hello")
        while time.monotonic() - started < 2.0:
            assert (await frames.request({"type": "presence", "presence": "away"}))["ok"]
            await asyncio.sleep(0.4)
        async with client.get("/desk", allow_redirects=False) as response:
            assert response.status == 200   # still alive: used within its idle time
        await asyncio.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
        await frames.ws.send_json({"type": "presence", "presence": "away", "id": 99})
        assert await frames.closed() == 4401
        async with client.get("/desk", allow_redirects=False) as response:
            assert response.status == 303


async def test_logout_ends_the_session_on_the_server_and_closes_its_sockets(desk: DeskHarness) -> None:
    client = await desk.signed_in("ann")
    token = client.cookie_jar.filter_cookies(URL(desk.public_url + "/desk"))["desk"].value
    frames = await desk.socket(client)
    await frames.next("hello")
    csrf = await desk.csrf(client, "/desk")
    async with client.post("/desk/logout", data={"csrf": "0" * 64}, headers={"Origin": desk.public_url},
                           allow_redirects=False) as response:
        assert response.status == 403   # a forged logout does nothing
    async with client.get("/desk", allow_redirects=False) as response:
        assert response.status == 200
    async with client.post("/desk/logout", data={"csrf": csrf}, headers={"Origin": desk.public_url},
                           allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (303, "/desk/login")
    assert await frames.closed() == 4401
    # the old cookie, kept by someone, is worth nothing now
    copy = desk.client()
    copy.cookie_jar.update_cookies({"desk": token}, URL(desk.public_url + "/desk"))
    async with copy.get("/desk", allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (303, "/desk/login")
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await desk.socket(copy)
    assert (await desk.router.snapshot()).agents.get("ann") is None   # signed out of the queue too


async def test_websockets_refuse_other_origins_and_missing_sessions(desk: DeskHarness) -> None:
    client = await desk.signed_in("boss", role="supervisor")
    for path in ("/desk/ws", "/desk/supervisor/ws"):
        for origin in (EVIL, "null", None, desk.public_url.replace("http:", "https:")):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await desk.socket(client, path, origin=origin)
            assert refused.value.status == 403, (path, origin)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await desk.socket(desk.client(), path)
        assert refused.value.status == 401
        frames = await desk.socket(client, path)
        assert (await frames.next("hello"))["agent"] == "boss"
        await frames.ws.close()


async def test_an_agent_cannot_open_the_supervisor_view(desk: DeskHarness) -> None:
    agent = await desk.signed_in("ann")
    async with agent.get("/desk/supervisor") as response:
        assert response.status == 403 and "This page is for supervisors." in await response.text()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await desk.socket(agent, "/desk/supervisor/ws")
    assert refused.value.status == 403
    boss = await desk.signed_in("boss", role="supervisor")
    async with boss.get("/desk/supervisor") as response:
        assert response.status == 200
    async with desk.client().get("/desk/supervisor", allow_redirects=False) as response:
        assert response.headers["Location"] == "/desk/login"


async def test_pages_are_in_the_agents_language_and_escape_their_name(desk: DeskHarness) -> None:
    client = await desk.signed_in("li", display_name="<script>alert(1)</script>李", language="zh-CN")
    async with client.get("/desk") as response:
        body = await response.text()
        assert response.headers["Cache-Control"] == "no-store"
    assert '<html lang="zh-CN">' in body and "坐席工作台" in body and "退出登录" in body
    assert "<script>alert" not in body and "&lt;script&gt;alert(1)&lt;/script&gt;李" in body
    assert re.search(r'<script src="/static/desk\.js\?v=[0-9a-f]{10}" defer></script>', body)
    frames = await desk.socket(client)
    hello = await frames.next("hello")
    assert hello["language"] == "zh-CN" and hello["t"]["desk_accept"] == "接受"
    assert ["resolved", "已解决"] in hello["wrapup_codes"]
    assert hello["canned"][0] == "您好，我是<script>alert(1)</script>李，请问有什么可以帮您？"   # text, drawn as text
    assert ["returns", "30 天内免费退货"] in hello["articles"]


# ------------------------------------------------------------------------------------------------ work
async def test_an_offer_is_accepted_and_the_call_card_shows_number_path_intent_and_wait(desk: DeskHarness) -> None:
    frames = await desk.desktop("ann")
    call = await desk.call()
    await desk.router.enqueue(call.id, "voice", "billing")
    card = await frames.card(call.id)
    offered = await frames.state(lambda s: any(w["state"] == "offered" for w in s["work"]))
    [item] = offered["work"]
    assert (item["interaction"], item["channel"], item["skill"]) == (call.id, "voice", "billing")
    assert item["deadline"] > time.time() and item["queued_at"] <= time.time()
    c = card["card"]
    assert (c["number"], c["intent"], c["intent_title"], c["dialled"]) == \
        (CALLER, "billing", "See your balance and pay online", "100")
    assert [(s["node"], s["event"], s["value"]) for s in c["path"]] == [
        ("main", "enter", ""), ("main", "digit", "2"), ("billing", "enter", ""), ("queue", "enter", "")]
    assert c["variables"] == [["account", "12345"]]
    assert c["queued_at"] == pytest.approx(item["queued_at"])

    # someone else cannot accept it; the agent can, once
    assert (await frames.request({"type": "accept", "interaction": "nonexistent"}))["error"] == "gone"
    assert (await frames.request({"type": "accept", "interaction": "bad id!"}))["error"] == "bad"
    assert (await frames.request({"type": "accept", "interaction": call.id}))["ok"]
    record = await desk.router.interaction(call.id)
    assert (record["state"], record["agent"]) == ("active", "ann")
    assert (await desk.row(call.id)).agent == "ann"
    active = await frames.state(lambda s: s["work"] and s["work"][0]["state"] == "active")
    assert active["voice"] == 1 and active["work"][0]["accepted_at"] >= active["work"][0]["queued_at"]

    # the caller hangs up: a wrap-up code is due, and stored
    await desk.services.store.update(call.id, ended_at=dt.datetime.now(dt.UTC), state="ended")
    await desk.router.finish(call.id)
    assert (await frames.next("ended"))["interaction"] == call.id
    await frames.state(lambda s: s["presence"] == "wrapup" and s["wrapup_until"] and not s["work"])
    assert (await frames.request({"type": "wrapup", "interaction": call.id, "code": "no_such_code"}))["error"] \
        == "bad"
    assert (await frames.request({"type": "wrapup", "interaction": call.id, "code": "resolved"}))["ok"]
    assert (await desk.row(call.id)).wrapup_code == "resolved"
    await frames.state(lambda s: s["presence"] == "available", timeout=5)   # wrap-up time over


async def test_wrap_up_codes_owed_survive_a_reload_and_only_the_agent_may_give_them(desk: DeskHarness) -> None:
    frames = await desk.desktop("ann")
    call = await desk.call()
    await desk.router.enqueue(call.id, "voice", "billing")
    await frames.state(lambda s: bool(s["work"]))
    assert (await frames.request({"type": "accept", "interaction": call.id}))["ok"]
    await desk.services.store.update(call.id, ended_at=dt.datetime.now(dt.UTC), state="ended")
    await desk.router.finish(call.id)
    await frames.next("ended")
    await frames.ws.close()
    # the page reloads: the code still owed comes with the hello
    client = desk.clients[-1]
    again = await desk.socket(client)
    hello = await again.next("hello")
    assert [o["interaction"] for o in hello["owed"]] == [call.id] and hello["owed"][0]["number"] == CALLER
    bob = await desk.desktop("bob")
    assert (await bob.request({"type": "wrapup", "interaction": call.id, "code": "resolved"}))["error"] == "gone"
    assert (await again.request({"type": "wrapup", "interaction": call.id, "code": "follow_up"}))["ok"]
    assert (await desk.row(call.id)).wrapup_code == "follow_up"
    await again.ws.close()
    assert (await (await desk.socket(client)).next("hello"))["owed"] == []


async def test_a_declined_offer_goes_back_and_the_agent_is_away(desk: DeskHarness) -> None:
    frames = await desk.desktop("ann")
    await desk.router.enqueue("chat-1", "web", "billing")
    await frames.state(lambda s: bool(s["work"]))
    assert (await frames.request({"type": "decline", "interaction": "chat-1"}))["ok"]
    state = await frames.state(lambda s: not s["work"])
    assert state["presence"] == "away"
    assert (await desk.router.interaction("chat-1"))["state"] == "queued"


async def test_offers_made_by_another_process_reach_the_agent(db_url: str, redis_url: str) -> None:
    async with desk_server(db_url, redis_url, start_router=False) as desk:
        frames = await desk.desktop("ann")
        # another ivr-bridge process: its own Router and EventBus on the same Redis; this one makes no offers
        other_bus = EventBus(redis_url, desk.services.config.redis.events_channel)
        await other_bus.start()
        other = Router(redis_url, desk.services.config.router, other_bus)
        await other.start()
        try:
            call = await desk.call()
            await other.enqueue(call.id, "voice", "billing")
            state = await frames.state(lambda s: bool(s["work"]))
            assert state["work"][0]["interaction"] == call.id and state["work"][0]["state"] == "offered"
            assert (await frames.request({"type": "accept", "interaction": call.id}))["ok"]
            assert (await other.interaction(call.id))["state"] == "active"
        finally:
            await other.aclose()
            await other_bus.aclose()


async def test_transfer_puts_the_interaction_back_under_another_skill(desk: DeskHarness) -> None:
    frames = await desk.desktop("ann", skills=("billing", "tech"))
    call = await desk.call()
    await desk.router.enqueue(call.id, "voice", "billing")
    await frames.state(lambda s: bool(s["work"]))
    hello = next(f for f in frames.seen if f["type"] == "hello")
    assert hello["skills"] == ["billing", "tech"]
    assert (await frames.request({"type": "transfer", "interaction": call.id, "skill": "tech"}))["error"] \
        == "gone"   # only what is in hand can be transferred
    assert (await frames.request({"type": "accept", "interaction": call.id}))["ok"]
    assert (await frames.request({"type": "presence", "presence": "away"}))["ok"]   # so it is not offered back
    assert (await frames.request({"type": "transfer", "interaction": call.id, "skill": "tech"}))["ok"]
    record = await desk.router.interaction(call.id)
    assert (record["state"], record["skill"], record.get("agent")) == ("queued", "tech", None)
    state = await frames.state(lambda s: not s["work"])
    assert state["voice"] == 0 and state["presence"] == "away"   # no wrap-up after a transfer


async def test_send_faq_link_to_a_caller_by_sms_once(desk: DeskHarness) -> None:
    frames = await desk.desktop("ann")
    call = await desk.call()
    await desk.router.enqueue(call.id, "voice", "billing")
    await frames.state(lambda s: bool(s["work"]))
    faq = {"type": "faq", "interaction": call.id, "article": "returns"}
    assert (await frames.request(faq))["error"] == "gone"   # not before it is accepted
    assert (await frames.request({"type": "accept", "interaction": call.id}))["ok"]
    assert (await frames.request({**faq, "article": "no_such_article"}))["error"] == "bad"
    reply = await frames.request(faq)
    assert reply["ok"] and reply["sent"] == "sms"
    assert desk.woken == [1]
    [followup] = await desk.services.outbox.list(interaction_id=call.id)
    assert (followup.channel, followup.recipient, followup.article_id, followup.purpose, followup.state) == \
        ("sms", CALLER, "returns", "agent", "pending")
    assert "Free returns within 30 days" in followup.payload["text"] and "/l/" in followup.payload["text"]
    assert (await frames.request(faq))["error"] == "duplicate"   # one message about one article per call
    assert len(await desk.services.outbox.list(interaction_id=call.id)) == 1
    assert desk.woken == [1]


async def test_the_timeline_lists_the_customers_contacts_links_and_surveys(desk: DeskHarness) -> None:
    store = desk.services.store
    older = await desk.call(started_at=dt.datetime(2025, 3, 1, 9, tzinfo=dt.UTC), intent="returns",
                            outcome="abandoned", agent=None)
    chat = await desk.call(started_at=dt.datetime(2025, 3, 2, 9, tzinfo=dt.UTC), channel="web", intent=None,
                           agent="bob", wrapup_code="resolved", steps=[])
    await desk.call(caller="+8613900000000", started_at=dt.datetime(2025, 3, 3, 9, tzinfo=dt.UTC))  # not them
    prepared = await desk.services.followups.prepare(channel="sms", recipient=CALLER, message="article_link",
                                                     language="zh-CN", purpose="after_call", key="t1",
                                                     interaction_id=older.id, article_id="returns")
    await desk.services.outbox.enqueue([prepared])
    assert store.sessions is not None
    async with store.sessions.begin() as session:
        link = await session.get(Link, prepared.link["id"] if prepared.link else "")
        assert link is not None
        link.first_opened_at = dt.datetime(2025, 3, 1, 10, tzinfo=dt.UTC)
        session.add(SurveyAnswer(interaction_id=chat.id, question="call", score=4, channel="web",
                                 at=dt.datetime(2025, 3, 2, 10, tzinfo=dt.UTC)))
    frames = await desk.desktop("ann")
    call = await desk.call()
    await desk.router.enqueue(call.id, "voice", "billing")
    card = await frames.card(call.id)
    timeline = card["timeline"]
    assert [c["interaction"] for c in timeline] == [call.id, chat.id, older.id]   # newest first
    assert timeline[1]["channel"] == "web" and timeline[1]["surveys"][0]["score"] == 4
    assert (timeline[1]["agent"], timeline[1]["wrapup_code"]) == ("bob", "resolved")
    [sent] = timeline[2]["sent"]
    assert (sent["channel"], sent["title"], sent["state"]) == ("sms", "30 天内免费退货", "pending")
    assert sent["opened_at"] == dt.datetime(2025, 3, 1, 10, tzinfo=dt.UTC).timestamp()
    assert timeline[2]["intent_title"] == "Free returns within 30 days"

    # a withheld number has no history: anonymous callers are not one customer
    await desk.call(caller="anonymous")
    hidden = await desk.call(caller="anonymous")
    assert (await frames.request({"type": "accept", "interaction": call.id}))["ok"]
    await desk.router.enqueue(hidden.id, "voice", "billing")
    bob = await desk.desktop("bob")
    assert (await bob.card(hidden.id))["timeline"] == []
    # and nobody reads the card of a contact that is not theirs
    assert (await bob.request({"type": "card", "interaction": call.id}))["error"] == "gone"
    assert (await frames.request({"type": "card", "interaction": call.id}))["ok"]


async def test_frames_are_limited_in_size_and_checked(desk: DeskHarness) -> None:
    frames = await desk.desktop("ann")
    await desk.router.enqueue("chat-1", "web", "billing")
    await frames.state(lambda s: bool(s["work"]))
    assert (await frames.request({"type": "accept", "interaction": "chat-1"}))["ok"]
    limit = desk.services.config.desk.max_message
    long = await frames.request({"type": "chat-send", "interaction": "chat-1", "text": "x" * (limit + 1)})
    assert long["error"] == "too_long"
    assert (await frames.request({"type": "presence", "presence": "wrapup"}))["error"] == "bad"
    assert (await frames.request({"type": "no-such-frame"}))["error"] == "bad"
    await frames.ws.send_str("not json")
    assert (await frames.request({"type": "presence", "presence": "available"}))["ok"]   # still served
    await frames.ws.send_str(json.dumps({"type": "ping", "pad": "x" * MAX_FRAME}))
    assert await frames.closed() == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_going_offline_is_refused_with_work_in_hand(desk: DeskHarness) -> None:
    frames = await desk.desktop("ann")
    await desk.router.enqueue("chat-1", "web", "billing")
    await frames.state(lambda s: bool(s["work"]))
    assert (await frames.request({"type": "accept", "interaction": "chat-1"}))["ok"]
    assert (await frames.request({"type": "presence", "presence": "offline"}))["error"] == "busy"
    await desk.router.finish("chat-1")
    assert (await frames.request({"type": "presence", "presence": "offline"}))["ok"]
    assert (await frames.state(lambda s: s["presence"] == "offline"))["cap_chat"] == 0
    assert (await frames.request({"type": "presence", "presence": "available"}))["ok"]   # signs in again
    assert (await frames.state(lambda s: s["presence"] == "available"))["cap_chat"] == 4


# ------------------------------------------------------------------------------------------------ supervisor
async def test_the_supervisor_view_follows_the_queue_and_the_agents_live(desk: DeskHarness) -> None:
    boss = await desk.signed_in("boss", role="supervisor")
    view = await desk.socket(boss, "/desk/supervisor/ws")
    await view.next("hello")
    await view.next("supervisor")
    ann = await desk.desktop("ann", display_name="Ann Lee", skills=("tech",))
    seen = await view.next("supervisor", where=lambda f: any(a["agent"] == "ann" and a["presence"] == "available"
                                                              for a in f["agents"]))
    [row] = [a for a in seen["agents"] if a["agent"] == "ann"]
    assert (row["name"], row["skills"], row["cap_voice"], row["cap_chat"]) == ("Ann Lee", ["tech"], 1, 4)

    await desk.router.enqueue("chat-1", "web", "billing")   # nobody has billing: it waits
    frame = await view.next("supervisor", where=lambda f: f["waiting_total"] == 1)
    [billing] = [s for s in frame["skills"] if s["skill"] == "billing"]
    assert billing["waiting"] == 1 and billing["oldest_queued_at"] <= time.time()
    assert billing["longest_wait"] >= 0 and frame["queue"][0]["interaction"] == "chat-1"
    [tech] = [s for s in frame["skills"] if s["skill"] == "tech"]
    assert (tech["waiting"], tech["ready"]) == (0, 1)

    assert (await ann.request({"type": "presence", "presence": "away"}))["ok"]
    await view.next("supervisor", where=lambda f: any(a["agent"] == "ann" and a["presence"] == "away"
                                                     for a in f["agents"]))
    await desk.router.enqueue("chat-2", "web", "tech")
    assert (await ann.request({"type": "presence", "presence": "available"}))["ok"]
    await ann.state(lambda s: bool(s["work"]))
    assert (await ann.request({"type": "accept", "interaction": "chat-2"}))["ok"]
    frame = await view.next("supervisor", where=lambda f: any(s["skill"] == "tech" and s["active"] == 1
                                                             for s in f["skills"]))
    assert [a["chat"] for a in frame["agents"] if a["agent"] == "ann"] == [1]


async def test_a_display_name_in_the_store_cannot_break_the_frames(desk: DeskHarness) -> None:
    """Names and IVR values travel as JSON strings, whatever they hold (the page draws them as text)."""
    evil = '"><img src=x onerror=alert(1)>\u2028'
    client = await desk.signed_in("eve", display_name=evil[:-1])
    frames = await desk.socket(client)
    assert (await frames.next("hello"))["name"] == evil[:-1]
    assert (await frames.request({"type": "presence", "presence": "available"}))["ok"]
    call = await desk.call(steps=[Step(seq=0, node="main", event="set", value=f"name={evil}")])
    await desk.router.enqueue(call.id, "voice", "billing")
    card = await frames.card(call.id)
    assert card["card"]["variables"] == [["name", evil]]
    assert (await desk.router.snapshot()).agents["eve"].presence == "available"


# ------------------------------------------------------------------------------------------------ chats
async def test_an_agent_works_several_chats_at_once(desk: DeskHarness) -> None:
    first = await desk.chat.open(language="zh-CN")
    await desk.chat.post(first.interaction_id, "visitor", "我的订单在哪里？", client_id="v1")
    second = await desk.chat.open()
    await desk.chat.post(second.interaction_id, "visitor", "<b>hi</b>", client_id="v2")
    frames = await desk.desktop("ann")
    state = await frames.current(lambda s: len(s["work"]) == 2)
    assert {w["interaction"] for w in state["work"]} == {first.interaction_id, second.interaction_id}
    assert (await frames.request({"type": "chat-send", "interaction": first.interaction_id, "text": "hello"})) \
        ["error"] == "gone"   # not before accepting
    for info in (first, second):
        assert (await frames.request({"type": "accept", "interaction": info.interaction_id}))["ok"]

    # each chat's history, then live messages, reach the desktop tagged with their chat
    said = await frames.next("chat-message", where=lambda f: f["interaction"] == first.interaction_id)
    assert (said["seq"], said["sender"], said["text"]) == (1, "visitor", "我的订单在哪里？")
    said = await frames.next("chat-message", where=lambda f: f["interaction"] == second.interaction_id)
    assert (said["seq"], said["sender"], said["text"]) == (1, "visitor", "<b>hi</b>")
    reply = await frames.request({"type": "chat-send", "interaction": second.interaction_id, "text": "Hello!",
                                  "client_id": "a1"})
    assert reply["ok"] and reply["seq"] == 2
    mine = await frames.next("chat-message", where=lambda f: f["interaction"] == second.interaction_id)
    assert (mine["seq"], mine["sender"], mine["agent"], mine["text"]) == (2, "agent", "ann", "Hello!")
    desk.chat.typing(first.interaction_id, "visitor")
    typing = await frames.next("chat-typing")
    assert (typing["interaction"], typing["on"]) == (first.interaction_id, True)
    await frames.ws.send_json({"type": "chat-typing", "interaction": first.interaction_id, "on": True})

    # an FAQ link in a chat is a message with the article's address, titled in the customer's language
    assert (await frames.request({"type": "faq", "interaction": first.interaction_id, "article": "returns"}))["ok"]
    link = await frames.next("chat-message", where=lambda f: f["interaction"] == first.interaction_id)
    assert link["text"] == f"30 天内免费退货: {desk.public_url}/help/a/returns" and link["sender"] == "agent"
    assert [m.text for m in await desk.chat.history(first.interaction_id)] == [
        "我的订单在哪里？", f"30 天内免费退货: {desk.public_url}/help/a/returns"]
    assert (await frames.request({"type": "chat-send", "interaction": first.interaction_id, "text": "   "})) \
        ["error"] == "bad"

    # the agent ends one chat: the other goes on, a wrap-up code is due for the ended one
    assert (await frames.request({"type": "chat-close", "interaction": second.interaction_id}))["ok"]
    assert (await frames.next("ended"))["interaction"] == second.interaction_id
    state = await frames.state(lambda s: len(s["work"]) == 1)
    assert state["work"][0]["interaction"] == first.interaction_id and state["chat"] == 1
    assert (await frames.request({"type": "wrapup", "interaction": second.interaction_id, "code": "resolved"}))["ok"]
    assert (await desk.row(second.interaction_id)).wrapup_code == "resolved"
    assert (await frames.request({"type": "chat-send", "interaction": second.interaction_id, "text": "hi"})) \
        ["error"] == "gone"
    await desk.chat.post(first.interaction_id, "visitor", "谢谢", client_id="v3")
    thanks = await frames.next("chat-message", where=lambda f: f["interaction"] == first.interaction_id)
    assert (thanks["seq"], thanks["text"]) == (3, "谢谢")
