"""The web app, part 2: the visitor web chat (the chat page, the embeddable widget, the visitor's websocket).

Embedding: one tag on any page of an origin listed in ``web.widget_origins``::

    <script src="https://help.example.com/chat/widget.js" async></script>

adds a chat button that opens ``/chat?embed=1`` in a frame (full screen on a phone). Only ``/chat`` may be framed,
and only by those origins (``frame-ancestors``); every other page keeps ``X-Frame-Options: DENY``.

A chat starts with ``POST /chat/start`` (JSON, Origin-checked, limited per client address): the answer carries a
signed chat token (the interaction id and an expiry, ``web.chat_token_hours``). A link of kind ``chat`` texted
during a call opens the same page on the call's interaction (``/l/<token>``, see :meth:`ChatSite.open_link`).

The websocket ``/chat/ws?t=<chat token>&after=<last seq seen>``: a bad token gets 400, an expired one 410, an
unknown chat 404, an Origin other than the site's or a widget origin 403, a plain GET 426 (how the page learns why
its socket did not open), each with ``{"error": code, "reason": text}``. Frames are JSON text (at most 16 KiB;
larger: closed with 1009):

visitor -> server
    ``{"type": "msg", "cid": "<1-64 of A-Za-z0-9_->", "text": "..."}``: a message; ``cid`` is the client's id
    for it, the same when resent after a reconnect (stored once).
    ``{"type": "typing", "on": true|false}``
    ``{"type": "close"}``: the visitor ends the chat (not a call's chat: that ends with the call).
server -> visitor
    ``{"type": "state", "state": "waiting|active|closed", "joined": bool}``: first, then on every change.
    ``{"type": "msg", "seq": n, "from": "visitor|agent|system", "text": "...", "at": ms, "cid": ...}``: every
    message after ``after``, in order, without gaps (the server reads what pub/sub lost from the database).
    ``{"type": "ack", "cid": "...", "seq": n, "dup": bool}``: the visitor's message is stored (``dup``: before).
    ``{"type": "typing", "from": "agent", "on": bool}``
    ``{"type": "error", "code": "...", "reason": "...", "cid": ...}``: ``bad_json``, ``bad_frame``,
    ``unknown_type``, ``bad_client_id``, ``empty``, ``too_long``, ``closed``, ``rate_limited``,
    ``not_allowed``, ``unavailable``; the socket stays open.

Text is only ever put into the page with ``textContent`` (chat.js) and stored as sent (normalised, see
:func:`bridge.chat.clean_text`); nothing of it reaches a header.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from bridge.chat import CLIENT_ID_RE, MAX_TEXT, ChatError, ChatEvent, ChatInfo, ChatService, Feed, clean_text
from bridge.links import LinkInvalid, LinkSigner
from bridge.ratelimit import Limit
from online_chat import i18n
from online_chat.assets import STATIC, asset, load
from online_chat.security import SECURITY_HEADERS, origin_of

if TYPE_CHECKING:
    from bridge.models import Link
    from online_chat.app import Site

log = logging.getLogger(__name__)

MAX_FRAME = 16 * 1024          # bytes of one websocket frame (2000 characters of text fit, escaped)
HEARTBEAT = 25.0               # seconds between pings; a client that does not answer is dropped
TYPING_EVERY = 2.0             # a visitor's "typing" is passed on at most this often
MAX_AFTER = 2**31 - 1
# Redis calls (rate limits, the router's state) in flight at once from the chat's handlers: redis-py 8's pools
# hold 100 connections and refuse the 101st at once (MaxConnectionsError) rather than wait for one, and a crowd
# of visitors (all reconnecting after a restart, a burst of messages) asks for more than that.
REDIS_AT_ONCE = 48
FRAMABLE: web.ResponseKey[bool] = web.ResponseKey("online_chat.framable", bool)
CHAT: web.AppKey[ChatSite] = web.AppKey("online_chat.chat")


def add_chat_routes(app: web.Application, site: Site) -> ChatSite:
    """Register the chat's routes on ``app`` (``create_app`` calls this after the security headers hook)."""
    chat = ChatSite(site)
    app[CHAT] = chat
    app.on_response_prepare.append(chat.framing)   # after add_security_headers: it may drop X-Frame-Options
    r = app.router
    r.add_get("/chat", chat.page)
    r.add_post("/chat/start", chat.start)
    r.add_get("/chat/ws", chat.websocket)
    r.add_get("/chat/widget.js", chat.widget)
    r.add_get("/static/chat.js", chat.script)
    r.add_get("/static/chat.css", chat.stylesheet)
    return chat


def chat_tokens(secret: str) -> LinkSigner:
    """Chat tokens are signed like links, under a key of their own: a link token is no chat token."""
    return LinkSigner(secret + "\0chat")


def _refuse(status: int, code: str, reason: str) -> web.Response:
    """A refused API request: the status, and a code and a sentence saying why."""
    return web.json_response({"error": code, "reason": reason}, status=status, headers={"Cache-Control": "no-store"})


class ChatSite:
    """The chat's handlers; shares templates, languages and the client's address with :class:`Site`."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.s = site.s
        self.tokens = chat_tokens(self.s.config.links.secret)
        self.redis_gate = asyncio.Semaphore(REDIS_AT_ONCE)
        self.js, self.js_url = load("chat.js")
        self.css, self.css_url = load("chat.css")
        strings = {lang: {"open": i18n.UI[lang]["chat_open"]}
                   for lang in i18n.LANGUAGES}
        self.widget_js = (STATIC / "widget.js").read_text(encoding="utf-8").replace(
            "__STRINGS__", json.dumps(strings, ensure_ascii=False)).encode()

    @property
    def chat(self) -> ChatService | None:
        return self.s.chat

    # ---- origins, tokens, headers
    def widget_origins(self) -> list[str]:
        return sorted({o for o in map(origin_of, self.s.config.web.widget_origins) if o})

    def origin_allowed(self, request: web.Request) -> bool:
        """The request names an Origin, and it is the site's own or a widget origin."""
        origin = request.headers.get("Origin")
        allowed = {origin_of(self.s.config.web.public_url), *self.widget_origins()}
        return origin is not None and origin_of(origin) in allowed

    def token(self, interaction_id: str) -> str:
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=self.s.config.web.chat_token_hours)
        return self.tokens.token(interaction_id, expires)

    def csp(self, framable: bool) -> str:
        """The site's policy with the websocket origin allowed and, for a framable page, the widget origins as
        frame ancestors."""
        directives = dict(part.strip().split(" ", 1)
                          for part in SECURITY_HEADERS["Content-Security-Policy"].split(";") if part.strip())
        if framable:
            directives["frame-ancestors"] = " ".join(self.widget_origins()) or "'none'"
        public = origin_of(self.s.config.web.public_url) or ""
        directives["connect-src"] = "'self' " + public.replace("https://", "wss://").replace("http://", "ws://")
        return "; ".join(f"{name} {value}" for name, value in directives.items())

    async def framing(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: a framable chat page loses X-Frame-Options (it has no allowlist; the page's
        frame-ancestors names who may frame it)."""
        if response.get(FRAMABLE) and self.widget_origins():
            response.headers.popall("X-Frame-Options", None)

    # ---- pages and assets
    def render(self, request: web.Request, lang: str, *, token: str = "", joined: bool = False,
               embed: bool = False, banner: dict[str, str] | None = None) -> web.Response:
        t = i18n.UI[lang]
        response = self.site.render(
            request, "chat.html", lang, token=token, joined=joined, embed=embed, banner=banner, noindex=True,
            private=True, max_text=MAX_TEXT, chat_css_url=self.css_url, chat_js_url=self.js_url,
            strings={key: value for key, value in t.items() if key.startswith("chat_")})
        response.headers["Content-Security-Policy"] = self.csp(framable=not token)
        response[FRAMABLE] = not token
        return response

    def unavailable(self, request: web.Request, lang: str) -> web.Response:
        t = i18n.UI[lang]
        return self.site.message(request, lang, t["chat_title"], t["chat_unavailable"], status=503)

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The chat page: a new chat (or the visitor's own, remembered in the browser); ``?embed=1`` in the
        widget's frame."""
        lang = self.site.lang(request)
        if self.chat is None:
            return self.unavailable(request, lang)
        return self.render(request, lang, embed=request.query.get("embed") == "1")

    async def open_link(self, request: web.Request, link: Link, lang: str,
                        banner: dict[str, str] | None) -> web.StreamResponse:
        """A ``chat`` link from an SMS (``Site.open_link``): the chat of the link's interaction (a call's)."""
        if self.chat is None:
            return self.unavailable(request, lang)
        if not link.interaction_id:
            return self.site.not_found(request, lang)
        try:
            info = await self.chat.join(link.interaction_id)
        except ChatError:
            return self.site.not_found(request, lang)
        return self.render(request, lang, token=self.token(info.interaction_id), joined=True, banner=banner)

    async def widget(self, request: web.Request) -> web.StreamResponse:
        # Loaded by pages of other origins: they may need to say so (Cross-Origin-Resource-Policy).
        return asset(self.widget_js, "text/javascript", max_age=3600,
                     **{"Cross-Origin-Resource-Policy": "cross-origin"})

    async def script(self, request: web.Request) -> web.StreamResponse:
        return asset(self.js, "text/javascript")

    async def stylesheet(self, request: web.Request) -> web.StreamResponse:
        return asset(self.css, "text/css")

    # ---- the API
    async def start(self, request: web.Request) -> web.StreamResponse:
        """A new chat: ``{"lang": "en"}`` (optional) -> 201 ``{"token": ..., "state": "waiting"}``."""
        chat = self.chat
        if chat is None:
            return _refuse(503, "unavailable", "chat is not available")
        if not self.origin_allowed(request):
            return _refuse(403, "origin", "this request did not come from a page allowed to start a chat")
        if request.content_type != "application/json":
            return _refuse(415, "content_type", "send JSON (Content-Type: application/json)")
        try:
            raw = await request.text()
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            return _refuse(400, "bad_json", "the body is not JSON")
        if not isinstance(body, dict):
            return _refuse(400, "bad_json", "the body is a JSON object")
        lang = i18n.normalise(body.get("lang") if isinstance(body.get("lang"), str) else None) \
            or self.site.lang(request)
        client = self.site.clients.of(request)
        try:
            async with self.redis_gate:
                if await self.s.limiter.hit([Limit(f"chat-start:{client}", self.s.config.web.chat_starts_per_hour)]):
                    return _refuse(429, "rate_limited", "too many chats started from this address; try again later")
                info = await chat.open(language=lang)
        except Exception:
            log.exception("chat: could not open a chat")
            return _refuse(503, "unavailable", "chat is not available right now")
        return web.json_response({"token": self.token(info.interaction_id), "state": info.state}, status=201,
                                 headers={"Cache-Control": "no-store"})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """The visitor's websocket (see the module doc for the checks and the frames)."""
        chat = self.chat
        if chat is None:
            return _refuse(503, "unavailable", "chat is not available")
        # The token before the Origin: the page asks with a plain GET (no Origin) why its socket did not open.
        try:
            interaction_id, _ = self.tokens.verify(request.query.get("t", ""))
        except LinkInvalid as exc:
            if exc.reason == "expired":
                return _refuse(410, "expired", "this chat token has expired; start a new chat")
            return _refuse(400, "bad_token", "the chat token is malformed or was altered")
        after_text = request.query.get("after", "0")
        if not after_text.isdigit() or int(after_text) > MAX_AFTER:
            return _refuse(400, "bad_after", "after is the number of the last message seen (0 or more)")
        async with self.redis_gate:
            info = await chat.info(interaction_id)
        if info is None:
            return _refuse(404, "unknown_chat", "no such chat")
        if not self.origin_allowed(request):
            log.warning("chat: refused a websocket from origin %.100r", request.headers.get("Origin"))
            return _refuse(403, "origin", "websockets are accepted from this site and its widget origins only")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_FRAME, compress=False)
        if not ws.can_prepare(request).ok:
            return _refuse(426, "websocket_expected", "this address takes a websocket")
        await ws.prepare(request)
        await VisitorSession(self, ws, info, self.site.clients.of(request)).run(int(after_text))
        return ws


def _frame(event: ChatEvent) -> str:
    if event.kind == "msg":
        m = event.message
        assert m is not None
        data: dict[str, Any] = {"type": "msg", "seq": m.seq, "from": m.sender, "text": m.text,
                                "at": int(m.at.timestamp() * 1000), "cid": m.client_id}
    elif event.kind == "typing":
        data = {"type": "typing", "from": event.sender, "on": event.on}
    else:
        data = {"type": "state", "state": event.state}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class VisitorSession:
    """One visitor's websocket: their frames in (one at a time, so their messages keep their order), the chat's
    :class:`Feed` out (a task of its own; the feed's buffer is bounded, a slow visitor reads back from the database)."""

    def __init__(self, site: ChatSite, ws: web.WebSocketResponse, info: ChatInfo, client: str) -> None:
        assert site.chat is not None
        self.site = site
        self.chat: ChatService = site.chat
        self.ws = ws
        self.info = info
        self.client = client
        self.state = info.state
        self._typing: tuple[bool, float] = (False, 0.0)   # what was passed on last, and when

    async def run(self, after: int) -> None:
        feed = self.chat.feed(self.info.interaction_id, after)
        pump = asyncio.create_task(self._pump(feed), name=f"chat-ws-{self.info.interaction_id[:8]}")
        try:
            async for message in self.ws:
                if message.type == WSMsgType.TEXT:
                    await self._receive(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self.error("bad_frame", "frames are JSON text")
        finally:
            feed.close()
            pump.cancel()
            await asyncio.wait({pump})   # (a cancellation of this task is not swallowed)
            if not pump.cancelled() and pump.exception() is not None:
                log.error("chat: sending to a visitor failed: %r", pump.exception())

    async def send(self, data: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(data, ensure_ascii=False, separators=(",", ":")))

    async def error(self, code: str, reason: str, cid: str | None = None) -> None:
        await self.send({"type": "error", "code": code, "reason": reason, "cid": cid})

    async def _pump(self, feed: Feed) -> None:
        try:
            await self.send({"type": "state", "state": self.state, "joined": self.info.channel != "web"})
            async for event in feed:
                if event.kind == "typing" and event.sender == "visitor":
                    continue   # their own typing (another tab)
                if event.kind == "state":
                    self.state = event.state
                await self.ws.send_str(_frame(event))
        except ConnectionResetError:
            return   # the visitor went away; the handler ends with the socket
        except Exception:
            log.exception("chat: the feed of %s failed", self.info.interaction_id)
            await self.ws.close(code=1011, message=b"try again")   # the client reconnects and reads it back

    async def _receive(self, data: str) -> None:
        try:
            frame = json.loads(data)
        except ValueError:
            await self.error("bad_json", "a frame is a JSON object")
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            await self.error("bad_frame", "a frame is a JSON object with a type")
            return
        kind = frame["type"]
        if kind == "msg":
            await self._message(frame)
        elif kind == "typing":
            self._typing_frame(frame)
        elif kind == "close":
            await self._close()
        else:
            await self.error("unknown_type", f"unknown frame type {kind[:20]!r}; msg, typing or close")

    async def _message(self, frame: dict[str, Any]) -> None:
        cid, text = frame.get("cid"), frame.get("text")
        if not isinstance(cid, str) or not CLIENT_ID_RE.fullmatch(cid):
            await self.error("bad_client_id", "cid is 1-64 letters, digits, _ or -")
            return
        if not isinstance(text, str):
            await self.error("bad_frame", "text is a string", cid)
            return
        if self.state == "closed":
            await self.error("closed", "this chat has ended", cid)
            return
        try:
            clean_text(text)   # refused before it counts against the limits
        except ChatError as exc:
            await self.error(exc.code, str(exc), cid)
            return
        iid = self.info.interaction_id
        per_hour = self.site.s.config.web.chat_messages_per_hour
        try:
            async with self.site.redis_gate:
                limited = await self.site.s.limiter.hit([Limit(f"chat-msg:{iid}", per_hour),
                                                         Limit(f"chat-msg-client:{self.client}", per_hour * 4)])
            if limited:
                await self.error("rate_limited", "too many messages; wait a moment and send it again", cid)
                return
            posted = await self.chat.post(iid, "visitor", text, client_id=cid)
        except ChatError as exc:
            await self.error(exc.code, str(exc), cid)
            return
        except Exception:
            log.exception("chat: could not store a message of %s", iid)
            await self.error("unavailable", "the message could not be stored; send it again", cid)
            return
        await self.send({"type": "ack", "cid": cid, "seq": posted.message.seq, "dup": not posted.new})

    def _typing_frame(self, frame: dict[str, Any]) -> None:
        on = frame.get("on", True) is True
        was, at = self._typing
        now = time.monotonic()
        if on != was or (on and now - at >= TYPING_EVERY):
            self._typing = (on, now)
            self.chat.typing(self.info.interaction_id, "visitor", on)

    async def _close(self) -> None:
        if self.info.channel != "web":
            await self.error("not_allowed", "this chat belongs to a call and ends with it")
            return
        try:
            await self.chat.close(self.info.interaction_id)
        except Exception:
            log.exception("chat: could not close %s", self.info.interaction_id)
            await self.error("unavailable", "the chat could not be closed; try again")
