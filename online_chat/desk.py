"""The agent desktop and the supervisor view: login, sessions, two pages and a websocket for each.

Routes (``add_desk_routes``; none without a router and an agent directory):

- ``GET /desk/login``, ``POST /desk/login`` (CSRF token, Origin check, rate limited per account and per client
  address, one answer for an unknown name and a wrong password), ``POST /desk/logout`` (CSRF token);
- ``GET /desk``: the desktop (every role); ``GET /desk/supervisor``: the live queue and agents (supervisor, admin);
- ``GET /desk/ws`` and ``GET /desk/supervisor/ws``: websockets, refused without a session or from another Origin;
- ``GET /static/desk.js``, ``GET /static/desk.css``.

Live state is never trusted from events alone. Router events (every process's, through Redis pub/sub, one
subscription per process; this process's also straight from its router, since pub/sub may lose some) only say
*who* needs telling; what they are told is read from ``router.snapshot()``, coalesced, and again on every
(re)connect and every ``REFRESH`` seconds.

Frames are JSON objects with a ``type`` (at most ``MAX_FRAME`` bytes from a browser). Desktop to server: ``ping``;
``presence`` {presence: available | away | offline}; ``accept``, ``decline``, ``card`` {interaction}; ``transfer``
{interaction, skill}; ``faq`` {interaction, article}; ``wrapup`` {interaction, code}; ``chat-send`` {interaction,
text, client_id?}; ``chat-typing`` {interaction, on}; ``chat-close`` {interaction}. A frame with an ``id`` is
answered by ``reply`` {id, ok, error?: a ``desk_err_<error>`` text of the page}. Server to desktop: ``hello`` (who,
UI strings, wrap-up codes, canned replies, articles, skills, wrap-up codes still owed), ``state`` (presence, loads,
the interactions offered and in hand), ``card`` (the call card and the customer's timeline), ``ended``
{interaction} (a wrap-up code is due), ``chat-message`` {interaction, seq, sender, agent, text, at},
``chat-typing`` {interaction, on}, ``chat-state`` {interaction, state}, ``pong``. Supervisor view: ``hello``,
``supervisor`` (per skill: waiting, longest wait, in progress, agents ready; the waiting interactions; the agents'
presence, loads and skills), ``pong``. Close codes: 4401 (signed out or expired: sign in again), 1009 (frame too
big), 1013 (a browser that did not keep up), 1011 (failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import jinja2
import redis.asyncio as aioredis
from aiohttp import WSCloseCode, WSMsgType, web
from sqlalchemy import select, update

from bridge.agents import AgentDirectory
from bridge.chat import ChatError, ChatService
from bridge.events import subscription
from bridge.followups import followup_key
from bridge.models import Agent, FollowUp, Interaction, Link, SurveyAnswer, utcnow
from bridge.ratelimit import Limit
from bridge.router import NAME_RE, Router, RouterError, Snapshot
from online_chat import i18n
from online_chat.assets import asset, load
from online_chat.security import ClientAddress, Csrf, same_origin
from online_chat.services import WebServices
from online_chat.sessions import Session, SessionStore

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_FRAME = 16 * 1024     # bytes of one websocket frame from a browser; larger ones close the socket (1009)
SEND_QUEUE = 256          # frames waiting for a slow browser; beyond that it is disconnected (it resyncs)
HEARTBEAT = 25.0          # websocket pings: a vanished browser is noticed within about twice this
COALESCE = 0.05           # seconds events are gathered before one snapshot serves them all
REFRESH = 5.0             # every open view is re-read this often even without events
DIRECTORY_TTL = 30.0      # seconds agents' names and skills are cached for the views
TIMELINE = 20             # contacts of a customer shown
MAX_STEPS = 100           # steps of an IVR path shown
WRAPUP_OWED = dt.timedelta(hours=12)
CLOSE_SESSION = 4401      # websocket close codes the page understands: sign in again
CLOSE_FORBIDDEN = 4403
ROUTER_EVENTS = frozenset({"queue-joined", "queue-offer", "queue-accepted", "queue-requeued", "queue-left",
                           "queue-switched", "agent-presence", "desk-login"})
SUPERVISORS = ("supervisor", "admin")
SESSION_PREFIX = "ivr-bridge:desk:session:"
ANONYMOUS = frozenset({"", "anonymous", "unknown", "restricted", "unavailable", "private"})

DESK: web.AppKey[Desk] = web.AppKey("online_chat.desk")
FrameHandler = Callable[["Connection", dict[str, Any]], Awaitable[Any]]


def add_desk_routes(app: web.Application, services: WebServices) -> None:
    """Register the desktop's routes and its start and stop; nothing when ``services`` has no router or agents."""
    if services.router is None or services.agents is None:
        return
    desk = Desk(services, services.router, services.agents)
    app[DESK] = desk
    app.on_startup.append(desk.start)
    app.on_shutdown.append(desk.shutdown)
    app.on_cleanup.append(desk.aclose)
    r = app.router
    r.add_get("/desk", desk.desktop)
    r.add_get("/desk/login", desk.login_page)
    r.add_post("/desk/login", desk.login)
    r.add_post("/desk/logout", desk.logout)
    r.add_get("/desk/supervisor", desk.supervisor)
    r.add_get("/desk/ws", desk.agent_socket)
    r.add_get("/desk/supervisor/ws", desk.supervisor_socket)
    r.add_get("/static/desk.js", desk.script)
    r.add_get("/static/desk.css", desk.stylesheet)


class Refused(Exception):
    """A desktop request that cannot be done; ``code`` names the text the page shows (``desk_err_<code>``)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _ts(moment: dt.datetime | None) -> float | None:
    """Unix time of a stored moment (SQLite gives back naive UTC)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _name(frame: dict[str, Any], field: str) -> str:
    value = frame.get(field)
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise Refused("bad")
    return value


def _see_other(location: str) -> web.Response:
    """A redirect after a POST that sets or clears a cookie (returned, not raised)."""
    return web.Response(status=303, headers={"Location": location})


# ------------------------------------------------------------------------------------------------ connections
class Connection:
    """One open websocket: who it belongs to, a bounded queue of frames to send and the task sending them."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, session: Session, agent: Agent) -> None:
        self.request = request
        self.ws = ws
        self.session = session
        self.agent = agent
        self.cards: set[str] = set()    # interactions whose card this view was sent
        self.active: set[str] = set()   # interactions in the agent's hands, as last told
        self.follows: dict[str, asyncio.Task[None]] = {}   # interaction -> the task relaying its chat
        self.closing = False
        self._queue: asyncio.Queue[str] = asyncio.Queue(SEND_QUEUE)
        self._writer = asyncio.create_task(self._write(), name=f"desk-send-{agent.id}")
        self._closer: asyncio.Task[None] | None = None

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a frame; a browser that does not keep up is disconnected (it resyncs when it reconnects)."""
        if self.closing:
            return
        try:
            self._queue.put_nowait(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))
        except asyncio.QueueFull:
            log.warning("desk: %s does not keep up with its frames; disconnected", self.agent.id)
            self.close(WSCloseCode.TRY_AGAIN_LATER)

    def close(self, code: int, reason: str = "") -> None:
        """Close the socket from anywhere (its handler then ends)."""
        if self._closer is None:
            self.closing = True
            self._writer.cancel()
            self._closer = asyncio.create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), 5)
        except (TimeoutError, ConnectionError):
            if self.request.transport is not None:   # its buffers are full: drop the connection
                self.request.transport.abort()

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionError):  # the browser went away; the handler notices and cleans up
            while True:
                await self.ws.send_str(await self._queue.get())

    async def aclose(self) -> None:
        self.closing = True
        self._writer.cancel()
        for task in self.follows.values():
            task.cancel()
        tasks = [self._writer, *self.follows.values()] + ([self._closer] if self._closer is not None else [])
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------------------------------------ the desk
class Desk:
    """Pages, sockets and the live views of one process."""

    def __init__(self, services: WebServices, router: Router, agents: AgentDirectory) -> None:
        cfg = services.config
        self.s = services
        self.router = router
        self.agents = agents
        self.csrf = Csrf(cfg.links.secret, cfg.web.secure_cookies)
        self.clients = ClientAddress(cfg.web.trusted_proxies)
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                      undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.js, self.js_url = load("desk.js")
        self.css, self.css_url = load("desk.css")
        self._redis: aioredis.Redis | None = None
        self._sessions: SessionStore | None = None
        self.views: dict[str, set[Connection]] = {}   # agent -> their open desktops
        self.supervisors: set[Connection] = set()
        self._dirty: set[str] = set()
        self._supervisors_dirty = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._directory: tuple[float, dict[str, Agent]] = (0.0, {})
        self._handlers: dict[str, FrameHandler] = {
            "presence": self._presence, "accept": self._accept, "decline": self._decline, "card": self._card,
            "transfer": self._transfer, "faq": self._faq, "wrapup": self._wrapup,
            "chat-send": self._chat_send, "chat-typing": self._chat_typing, "chat-close": self._chat_close,
        }

    # ---- lifecycle (the app's startup, shutdown and cleanup)
    async def start(self, app: web.Application) -> None:
        cfg = self.s.config
        self._redis = aioredis.Redis.from_url(cfg.redis.url, decode_responses=True)
        self._sessions = SessionStore(self._redis, SESSION_PREFIX, cfg.desk.session_idle,
                                      cfg.desk.session_lifetime, cfg.web.secure_cookies)
        # This process's router at once (the Router cannot remove a listener: it goes when the router does) ...
        self.router.add_listener(lambda kind, fields: self.on_event({"type": kind, **fields}))
        bus = self.s.bus
        if bus is not None and bus.redis_url:   # ... and every process's from Redis (this one's again: harmless)
            self._tasks.append(asyncio.create_task(self._listen(bus.redis_url, bus.channel), name="desk-events"))
        self._tasks.append(asyncio.create_task(self._sync(), name="desk-sync"))

    async def shutdown(self, app: web.Application) -> None:
        """Close every socket (the pages reconnect to another process or after the restart)."""
        for conn in [c for conns in self.views.values() for c in conns] + list(self.supervisors):
            conn.close(WSCloseCode.GOING_AWAY)

    async def aclose(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def sessions(self) -> SessionStore:
        if self._sessions is None:
            raise RuntimeError("the desk is not started")
        return self._sessions

    # ---- pages
    def render(self, template: str, lang: str, *, status: int = 200, **context: Any) -> web.Response:
        body = self.env.get_template(template).render(lang=lang, t=i18n.UI[lang], css_url=self.css_url,
                                                      js_url=self.js_url, **context)
        response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
        response.headers["Cache-Control"] = "no-store"
        response.headers["Vary"] = "Cookie, Accept-Language"
        return response

    def message(self, lang: str, title: str, body: str, status: int) -> web.Response:
        return self.render("desk_message.html", lang, status=status, title=title, body=body)

    async def who(self, request: web.Request) -> tuple[Session, Agent] | None:
        """The session and its agent (re-read: a disabled or removed agent is signed out at once)."""
        token = self.sessions.token(request)
        session = await self.sessions.get(token)
        if session is None:
            return None
        agent = await self.agents.get(session.agent)
        if agent is None or agent.disabled:
            await self.sessions.delete(token)
            return None
        return session, agent

    def _form_page(self, request: web.Request, template: str, lang: str, *, status: int = 200,
                   **context: Any) -> web.Response:
        """A page with a form: a CSRF token (and its cookie when the browser has none)."""
        token, cookie = self.csrf.issue(request)
        response = self.render(template, lang, status=status, csrf=token, **context)
        if cookie is not None:
            self.csrf.set_cookie(response, cookie)
        return response

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if await self.who(request) is not None:
            raise web.HTTPSeeOther("/desk")
        return self._form_page(request, "login.html", i18n.pick(request.query, request.cookies,
                                                                 request.headers.get("Accept-Language")),
                               error=None, name="")

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Check the form, count the attempt against the account and the client, then the password (argon2,
        off the loop). An unknown name and a wrong password get the same page, after the same work."""
        lang = i18n.pick(request.query, request.cookies, request.headers.get("Accept-Language"))
        t = i18n.UI[lang]
        form = await request.post()
        if not self.csrf.valid(request, form.get("csrf")):
            return self.message(lang, t["forbidden_title"], t["csrf_body"], 403)
        if not same_origin(request, self.s.config.web.public_url):
            return self.message(lang, t["forbidden_title"], t["origin_body"], 403)
        name, password = form.get("name"), form.get("password")
        if not isinstance(name, str) or not isinstance(password, str):
            return self.message(lang, t["bad_form_title"], t["bad_form_body"], 400)
        name = name.strip()[:64]
        cfg = self.s.config.desk
        account = hashlib.sha256(name.lower().encode()).hexdigest()[:32]
        if await self.s.limiter.hit([Limit(f"desk-login:client:{self.clients.of(request)}", cfg.login_per_client),
                                     Limit(f"desk-login:account:{account}", cfg.login_per_account)]):
            log.warning("desk: sign-in attempts over the limit (client %s)", self.clients.of(request))
            return self._form_page(request, "login.html", lang, status=429, error=t["desk_login_limited"],
                                   name=name)
        agent = await self.agents.authenticate(name, password)
        if agent is None:
            return self._form_page(request, "login.html", lang, status=401, error=t["desk_login_failed"],
                                   name=name)
        await self.sessions.delete(self.sessions.token(request))   # never keep a session id from before login
        token = await self.sessions.create(agent.id)
        log.info("desk: %s signed in (%s) from %s", agent.id, agent.role, self.clients.of(request))
        response = _see_other("/desk/supervisor" if agent.role in SUPERVISORS else "/desk")
        self.sessions.set_cookie(response, token)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """End the session everywhere (it is deleted in Redis; this process's sockets of it close at once, other
        processes' at their next ping) and take the agent off the queue unless work is still in hand."""
        lang = i18n.pick(request.query, request.cookies, request.headers.get("Accept-Language"))
        t = i18n.UI[lang]
        form = await request.post()
        if not self.csrf.valid(request, form.get("csrf")) or not same_origin(request, self.s.config.web.public_url):
            return self.message(lang, t["forbidden_title"], t["csrf_body"], 403)
        found = await self.who(request)
        await self.sessions.delete(self.sessions.token(request))
        if found is not None:
            session, agent = found
            for conn in [c for c in self.views.get(agent.id, ()) if c.session.key == session.key] + \
                    [c for c in self.supervisors if c.session.key == session.key]:
                conn.close(CLOSE_SESSION, "signed out")
            try:
                await self.router.set_presence(agent.id, "offline")
            except RouterError:   # interactions still in hand: no new ones, the ones in hand go on
                await self.router.set_presence(agent.id, "away")
            log.info("desk: %s signed out", agent.id)
        response = _see_other("/desk/login")
        self.sessions.clear_cookie(response)
        return response

    async def desktop(self, request: web.Request) -> web.StreamResponse:
        found = await self.who(request)
        if found is None:
            raise web.HTTPSeeOther("/desk/login")
        _, agent = found
        return self._form_page(request, "desk.html", self.language(agent), agent=agent,
                               supervisor=agent.role in SUPERVISORS)

    async def supervisor(self, request: web.Request) -> web.StreamResponse:
        found = await self.who(request)
        if found is None:
            raise web.HTTPSeeOther("/desk/login")
        _, agent = found
        lang = self.language(agent)
        if agent.role not in SUPERVISORS:
            t = i18n.UI[lang]
            return self.message(lang, t["forbidden_title"], t["desk_forbidden"], 403)
        return self._form_page(request, "supervisor.html", lang, agent=agent)

    async def script(self, request: web.Request) -> web.StreamResponse:
        return asset(self.js, "text/javascript")

    async def stylesheet(self, request: web.Request) -> web.StreamResponse:
        return asset(self.css, "text/css")

    @staticmethod
    def language(agent: Agent) -> str:
        return i18n.normalise(agent.language) or i18n.DEFAULT

    # ---- sockets
    async def _open(self, request: web.Request, supervisor: bool) -> Connection:
        """Checks before the upgrade (an HTTP error answers a refused one), then the upgrade."""
        if "Origin" not in request.headers or not same_origin(request, self.s.config.web.public_url):
            log.warning("desk: refused a websocket from origin %r", request.headers.get("Origin", "")[:100])
            raise web.HTTPForbidden(text="origin refused")
        found = await self.who(request)
        if found is None:
            raise web.HTTPUnauthorized(text="sign in first")
        session, agent = found
        if supervisor and agent.role not in SUPERVISORS:
            raise web.HTTPForbidden(text="supervisors only")
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=HEARTBEAT)
        await ws.prepare(request)
        return Connection(request, ws, session, agent)

    async def agent_socket(self, request: web.Request) -> web.StreamResponse:
        conn = await self._open(request, supervisor=False)
        agent = conn.agent
        self.views.setdefault(agent.id, set()).add(conn)
        try:
            await self.router.login(agent.id, [s for s in agent.skills.split(",") if s],
                                    voice=agent.voice_capacity, chat=agent.chat_capacity)
            if self.s.bus is not None:   # other processes' supervisor views learn of the login at once
                self.s.bus.publish("desk-login", agent=agent.id)
            conn.send(await self._hello(agent))
            self.mark(agent.id)
            await self._read(conn, self._agent_frame)
        except Exception:   # after the upgrade no error page can be sent: the page reconnects
            log.exception("desk: %s's desktop socket failed", agent.id)
            conn.close(WSCloseCode.INTERNAL_ERROR)
        finally:
            conns = self.views.get(agent.id, set())
            conns.discard(conn)
            if not conns:
                self.views.pop(agent.id, None)
            await conn.aclose()
        return conn.ws

    async def supervisor_socket(self, request: web.Request) -> web.StreamResponse:
        conn = await self._open(request, supervisor=True)
        self.supervisors.add(conn)
        try:
            lang = self.language(conn.agent)
            conn.send({"type": "hello", "agent": conn.agent.id, "language": lang, "server_time": time.time(),
                       "t": _strings(lang)})
            self._supervisors_dirty = True
            self._wake.set()
            await self._read(conn, self._ping_only)
        except Exception:
            log.exception("desk: %s's supervisor socket failed", conn.agent.id)
            conn.close(WSCloseCode.INTERNAL_ERROR)
        finally:
            self.supervisors.discard(conn)
            await conn.aclose()
        return conn.ws

    async def _read(self, conn: Connection, handle: Callable[[Connection, dict[str, Any]], Awaitable[None]]) -> None:
        async for message in conn.ws:
            if message.type != WSMsgType.TEXT:
                continue   # aiohttp answers pings and closes itself; browsers send nothing else
            try:
                frame = json.loads(message.data)
            except ValueError:
                frame = None
            if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                continue
            if frame["type"] != "chat-typing" and not await self.sessions.alive(conn.session):
                conn.close(CLOSE_SESSION, "session ended")   # logged out elsewhere, or expired
                return
            await handle(conn, frame)
            if conn.closing:
                return

    async def _ping_only(self, conn: Connection, frame: dict[str, Any]) -> None:
        if frame["type"] == "ping":
            conn.send({"type": "pong", "server_time": time.time()})

    async def _agent_frame(self, conn: Connection, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "ping":
            conn.send({"type": "pong", "server_time": time.time()})
            return
        ref = frame.get("id") if isinstance(frame.get("id"), int) else None
        handler = self._handlers.get(kind)
        try:
            if handler is None:
                raise Refused("bad")
            result = await handler(conn, frame)
        except Refused as exc:
            error = exc.code
        except RouterError as exc:
            log.info("desk: %s: %s refused: %s", conn.agent.id, kind, exc)
            error = "bad"
        except Exception:
            log.exception("desk: %s: %s failed", conn.agent.id, kind)
            error = "unavailable"
        else:
            if ref is not None:
                conn.send({"type": "reply", "id": ref, "ok": True, **(result or {})})
            return
        if ref is not None:   # frames without an id (typing) are not answered
            conn.send({"type": "reply", "id": ref, "ok": False, "error": error})

    # ---- what a desktop asks for
    async def _presence(self, conn: Connection, frame: dict[str, Any]) -> None:
        presence = frame.get("presence")
        if presence not in ("available", "away", "offline"):
            raise Refused("bad")
        try:
            changed = await self.router.set_presence(conn.agent.id, presence)
        except RouterError:
            raise Refused("busy") from None
        if not changed:   # offline before (signed out in another tab): back on the queue first
            agent = conn.agent
            await self.router.login(agent.id, [s for s in agent.skills.split(",") if s],
                                    voice=agent.voice_capacity, chat=agent.chat_capacity)
            await self.router.set_presence(agent.id, presence)
        self.mark(conn.agent.id)

    async def _mine(self, conn: Connection, iid: str, states: tuple[str, ...] = ("active",)) -> dict[str, str]:
        """The router's record of an interaction this agent has (in one of ``states``)."""
        record = await self.router.interaction(iid)
        if record.get("agent") != conn.agent.id or record.get("state") not in states:
            raise Refused("gone")
        return record

    async def _accept(self, conn: Connection, frame: dict[str, Any]) -> None:
        iid = _name(frame, "interaction")
        if not await self.router.accept(iid, conn.agent.id):
            raise Refused("gone")
        # Who took it, on the record (the wrap-up code and the agent's history are found by it).
        await self._update(Interaction.id == iid, agent=conn.agent.id)
        self.mark(conn.agent.id)

    async def _decline(self, conn: Connection, frame: dict[str, Any]) -> None:
        """Back to the head of the queue for someone else; the agent is set away so it does not come straight
        back to them (the same as an offer left to time out)."""
        iid = _name(frame, "interaction")
        if not await self.router.requeue(iid, conn.agent.id, away=True, reason="declined"):
            raise Refused("gone")
        self.mark(conn.agent.id)

    async def _card(self, conn: Connection, frame: dict[str, Any]) -> None:
        iid = _name(frame, "interaction")
        record = await self.router.interaction(iid)
        if conn.agent.role not in SUPERVISORS and record.get("agent") != conn.agent.id \
                and not await self._handled_by(iid, conn.agent.id):
            raise Refused("gone")
        conn.send(await self.card(iid, record))

    async def _transfer(self, conn: Connection, frame: dict[str, Any]) -> None:
        iid, skill = _name(frame, "interaction"), _name(frame, "skill")
        await self._mine(conn, iid)
        if not await self.router.transfer(iid, conn.agent.id, skill):
            raise Refused("gone")
        conn.cards.discard(iid)
        self.mark(conn.agent.id)

    async def _faq(self, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
        """A help article to the customer: in a chat as a message with its link; to a caller as an SMS through
        the outbox (once per call and article, whoever sends it: the IVR's key)."""
        iid, article_id = _name(frame, "interaction"), _name(frame, "article")
        catalogue = self.s.catalogue()
        if catalogue is None or article_id not in catalogue.articles:
            raise Refused("bad")
        record = await self._mine(conn, iid)
        if record.get("channel") != "voice":   # in the customer's language
            info = await self._chat().info(iid)
            title = catalogue.articles[article_id].title[catalogue.language(info.language if info else "")]
            url = f"{self.s.config.web.public_url.rstrip('/')}/help/a/{article_id}"
            await self._chat_post(conn, iid, f"{title}: {url}")
            return {"sent": "chat"}
        interaction = await self.s.store.get(iid)
        if interaction is None or interaction.caller.strip().lower() in ANONYMOUS:
            raise Refused("refused")
        earlier = await self.s.outbox.list(interaction_id=iid, channel="sms")
        if any(f.article_id == article_id and f.template == "article_link" and f.state != "blocked"
               for f in earlier):
            raise Refused("duplicate")
        prepared = await self.s.followups.prepare(
            channel="sms", recipient=interaction.caller, message="article_link",
            language=interaction.language or self.language(conn.agent), purpose="agent",
            key=followup_key(iid, "article_link", article_id),
            interaction_id=iid, article_id=article_id, region=self.s.config.flows.default_region)
        await self.s.outbox.enqueue([prepared])
        if not prepared.accepted:
            log.info("desk: %s: SMS for %s refused: %s", conn.agent.id, iid, prepared.reason)
            raise Refused("refused")
        if await self.s.outbox.get(prepared.id) is None:   # the key was taken meanwhile (the IVR sent it)
            raise Refused("duplicate")
        if self.s.on_enqueued is not None:
            self.s.on_enqueued()
        return {"sent": "sms"}

    async def _wrapup(self, conn: Connection, frame: dict[str, Any]) -> None:
        iid, code = _name(frame, "interaction"), frame.get("code")
        if not isinstance(code, str) or code not in self.s.config.desk.wrapup_codes:
            raise Refused("bad")
        if not await self._update((Interaction.id == iid) & (Interaction.agent == conn.agent.id), wrapup_code=code):
            record = await self.router.interaction(iid)   # taken so recently that the record lacks the agent
            if record.get("agent") != conn.agent.id or \
                    not await self._update(Interaction.id == iid, agent=conn.agent.id, wrapup_code=code):
                raise Refused("gone")

    # ---- chats (bridge/chat.py): the messages come back through the feed like the customer's
    def _chat(self) -> ChatService:
        if self.s.chat is None:
            raise Refused("unavailable")
        return self.s.chat

    async def _chat_send(self, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
        iid, text, client_id = _name(frame, "interaction"), frame.get("text"), frame.get("client_id")
        if not isinstance(text, str) or not text.strip() or not (client_id is None or isinstance(client_id, str)):
            raise Refused("bad")
        if len(text) > self.s.config.desk.max_message:
            raise Refused("too_long")
        await self._mine(conn, iid)
        return {"seq": await self._chat_post(conn, iid, text, client_id)}

    async def _chat_typing(self, conn: Connection, frame: dict[str, Any]) -> None:
        """Best effort and frequent: checked against what the desktop was last told, not the router."""
        iid = _name(frame, "interaction")
        if iid not in conn.active:
            raise Refused("gone")
        self._chat().typing(iid, "agent", bool(frame.get("on")), agent=conn.agent.id)

    async def _chat_close(self, conn: Connection, frame: dict[str, Any]) -> None:
        """The agent ends a chat (a call ends when the caller hangs up); a wrap-up code is then due."""
        iid = _name(frame, "interaction")
        record = await self._mine(conn, iid)
        if record.get("channel") == "voice":
            raise Refused("bad")
        await self._chat().close(iid)

    async def _chat_post(self, conn: Connection, iid: str, text: str, client_id: str | None = None) -> int:
        try:
            posted = await self._chat().post(iid, "agent", text, client_id=client_id, agent=conn.agent.id)
        except ChatError as exc:
            raise Refused({"too_long": "too_long", "unknown_chat": "gone"}.get(exc.code, "bad")) from None
        return posted.message.seq

    def _follow(self, conn: Connection, active: set[str]) -> None:
        """Relay the chat of every interaction in the agent's hands to this desktop (a call's too: a caller may
        have taken the chat link); stop when it leaves them."""
        conn.active = active
        if self.s.chat is None or conn.closing:
            return
        for iid in active - conn.follows.keys():
            conn.follows[iid] = asyncio.create_task(self._relay(conn, self.s.chat, iid), name=f"desk-chat-{iid}")
        for iid in conn.follows.keys() - active:
            conn.follows.pop(iid).cancel()

    async def _relay(self, conn: Connection, chat: ChatService, iid: str) -> None:
        """One chat's messages (all of them, in order: the feed reads the history first), typing and state."""
        feed = chat.feed(iid)
        try:
            async for event in feed:
                if event.kind == "msg" and event.message is not None:
                    m = event.message
                    conn.send({"type": "chat-message", "interaction": iid, "seq": m.seq, "sender": m.sender,
                               "agent": m.agent, "text": m.text, "at": m.at.timestamp()})
                elif event.kind == "typing" and event.sender == "visitor":
                    conn.send({"type": "chat-typing", "interaction": iid, "on": event.on})
                elif event.kind == "state":
                    conn.send({"type": "chat-state", "interaction": iid, "state": event.state})
        except Exception:
            log.exception("desk: relaying chat %s to %s failed", iid, conn.agent.id)
        finally:
            feed.close()

    # ---- storage
    def _db(self) -> Any:
        if self.s.store.sessions is None:
            raise RuntimeError("the store is not started")
        return self.s.store.sessions

    async def _update(self, where: Any, **values: Any) -> bool:
        """UPDATE interactions; True when a row changed."""
        async with self._db().begin() as session:
            result = await session.execute(update(Interaction).where(where).values(**values))
        return bool(result.rowcount)

    async def _handled_by(self, iid: str, agent: str) -> bool:
        async with self._db()() as session:
            found = await session.execute(select(Interaction.id).where(Interaction.id == iid,
                                                                       Interaction.agent == agent))
            return found.first() is not None

    async def _owed(self, agent: str) -> list[dict[str, Any]]:
        """Interactions this agent handled that ended without a wrap-up code (recent ones)."""
        async with self._db()() as session:
            rows = (await session.execute(
                select(Interaction).where(Interaction.agent == agent, Interaction.wrapup_code.is_(None),
                                          Interaction.ended_at.is_not(None),
                                          Interaction.ended_at >= utcnow() - WRAPUP_OWED)
                .order_by(Interaction.ended_at.desc()).limit(20))).scalars()
            return [{"interaction": i.id, "channel": i.channel, "number": i.caller, "ended_at": _ts(i.ended_at)}
                    for i in rows]

    async def card(self, iid: str, record: dict[str, str]) -> dict[str, Any]:
        """The call card (number, IVR path and the caller's entries, intent, wait) and the customer's timeline;
        ``record`` is the router's (channel, skill and times when the store has no such interaction)."""
        catalogue = self.s.catalogue()
        interaction = await self.s.store.get(iid)
        queued = float(record["queued_at"]) / 1000 if record.get("queued_at") else None
        accepted = float(record["accepted_at"]) / 1000 if record.get("accepted_at") else None
        card: dict[str, Any] = {"channel": record.get("channel"), "skill": record.get("skill"),
                                "queued_at": queued, "accepted_at": accepted}
        if interaction is None:
            return {"type": "card", "interaction": iid, "card": card, "timeline": []}
        article = catalogue.article_for_intent(interaction.intent) if catalogue else None
        path: list[dict[str, str]] = []
        variables: dict[str, str] = {}
        for step in interaction.steps:
            if step.event == "set" and step.value and "=" in step.value:
                name, _, value = step.value.partition("=")
                variables[name[:64]] = value[:200]
            elif len(path) < MAX_STEPS:
                path.append({"node": step.node, "event": step.event, "value": (step.value or "")[:200]})
        card.update(channel=interaction.channel, number=interaction.caller, dialled=interaction.dialled,
                    flow=interaction.flow, language=interaction.language, intent=interaction.intent,
                    intent_title=article.title[catalogue.language(self.language_of(interaction))]
                    if article and catalogue else None,
                    started_at=_ts(interaction.started_at), path=path, variables=sorted(variables.items()),
                    skill=card["skill"] or interaction.skill,
                    queued_at=queued or _ts(interaction.queued_at))
        return {"type": "card", "interaction": iid, "card": card,
                "timeline": await self.timeline(interaction.caller)}

    @staticmethod
    def language_of(interaction: Interaction) -> str:
        return interaction.language or i18n.DEFAULT

    async def timeline(self, caller: str) -> list[dict[str, Any]]:
        """The customer's contacts on every channel (the number a call gives, shared by chats joined to a call),
        newest first, with the links sent and opened and the survey answers. Nothing for a withheld number."""
        if caller.strip().lower() in ANONYMOUS:
            return []
        catalogue = self.s.catalogue()
        async with self._db()() as session:
            contacts = list((await session.execute(
                select(Interaction).where(Interaction.caller == caller)
                .order_by(Interaction.started_at.desc()).limit(TIMELINE))).scalars())
            ids = [c.id for c in contacts]
            followups = list((await session.execute(
                select(FollowUp).where(FollowUp.interaction_id.in_(ids)).order_by(FollowUp.created_at))).scalars())
            links = {link.followup_id: link for link in (await session.execute(
                select(Link).where(Link.interaction_id.in_(ids)))).scalars()}
            answers = list((await session.execute(
                select(SurveyAnswer).where(SurveyAnswer.interaction_id.in_(ids)))).scalars())

        def title(article_id: str | None, language: str) -> str | None:
            article = catalogue.articles.get(article_id or "") if catalogue else None
            return article.title[catalogue.language(language)] if article and catalogue else None

        out = []
        for contact in contacts:
            sent = []
            for f in (f for f in followups if f.interaction_id == contact.id):
                link = links.get(f.id)
                sent.append({"channel": f.channel, "template": f.template, "article": f.article_id,
                             "title": title(f.article_id, f.language), "state": f.state, "at": _ts(f.created_at),
                             "opened_at": _ts(link.first_opened_at) if link else None})
            intent = catalogue.article_for_intent(contact.intent) if catalogue else None
            out.append({"interaction": contact.id, "channel": contact.channel, "started_at": _ts(contact.started_at),
                        "intent": contact.intent, "intent_title": title(intent.id, contact.language) if intent
                        else None, "outcome": contact.outcome, "agent": contact.agent,
                        "wrapup_code": contact.wrapup_code, "sent": sent,
                        "surveys": [{"score": a.score, "channel": a.channel, "at": _ts(a.at)}
                                    for a in answers if a.interaction_id == contact.id]})
        return out

    async def directory(self, need: Iterable[str] = ()) -> dict[str, Agent]:
        """Everyone in the agents table (names, skills), cached for a few seconds unless someone in ``need`` is
        not in it yet."""
        taken, agents = self._directory
        if time.monotonic() - taken > DIRECTORY_TTL or any(a not in agents for a in need):
            agents = {a.id: a for a in await self.agents.list()}
            self._directory = (time.monotonic(), agents)
        return agents

    async def _hello(self, agent: Agent) -> dict[str, Any]:
        lang = self.language(agent)
        cfg = self.s.config.desk
        catalogue = self.s.catalogue()
        content = catalogue.language(lang) if catalogue else lang
        skills = sorted({s for a in (await self.directory()).values() if not a.disabled
                         for s in a.skills.split(",") if s})
        return {"type": "hello", "agent": agent.id, "name": agent.display_name or agent.id, "role": agent.role,
                "language": lang, "server_time": time.time(), "t": _strings(lang),
                "wrapup_codes": [[code, labels.get(lang) or labels["en"]] for code, labels in cfg.wrapup_codes.items()],
                "canned": [(reply.get(lang) or reply["en"]).replace("{agent}", agent.display_name or agent.id)
                           for reply in cfg.canned_replies],
                "articles": [[a.id, a.title[content]] for a in catalogue.articles.values()] if catalogue else [],
                "skills": skills, "max_message": cfg.max_message, "chat": self.s.chat is not None,
                "owed": await self._owed(agent.id)}

    # ---- live views
    def mark(self, agent: str | None = None, supervisors: bool = False) -> None:
        """Something changed for ``agent`` (and the supervisors): tell them after the next snapshot."""
        if agent is not None and agent in self.views:
            self._dirty.add(agent)
        if supervisors and self.supervisors:
            self._supervisors_dirty = True
        self._wake.set()

    def on_event(self, event: dict[str, Any]) -> None:
        """A router event of any process: whose views to refresh, and "a wrap-up is due" at once."""
        kind = event.get("type")
        if kind not in ROUTER_EVENTS:
            return
        agent = event.get("agent") if isinstance(event.get("agent"), str) else None
        if kind == "queue-left" and agent and event.get("state") == "active":
            for conn in self.views.get(agent, ()):
                conn.cards.discard(str(event.get("interaction")))
                conn.send({"type": "ended", "interaction": event.get("interaction")})
        self.mark(agent, supervisors=True)

    async def _listen(self, redis_url: str, channel: str) -> None:
        """Router events of every process from Redis; after a gap, everything is re-read."""
        delay = 0.5
        while True:
            try:
                async with subscription(redis_url, channel) as events:
                    self._dirty.update(self.views)
                    self.mark(supervisors=True)
                    delay = 0.5
                    async for event in events:
                        self.on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("desk: router events from Redis interrupted (%s); subscribing again", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _sync(self) -> None:
        """One snapshot for whatever changed (events come in bursts), sent to the views concerned; every view
        is refreshed every ``REFRESH`` seconds anyway."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), REFRESH)
            except TimeoutError:
                self._dirty.update(self.views)
                self._supervisors_dirty = bool(self.supervisors)
            await asyncio.sleep(COALESCE)
            self._wake.clear()
            agents, self._dirty = self._dirty, set()
            supervisors, self._supervisors_dirty = self._supervisors_dirty, False
            if not agents and not supervisors:
                continue
            try:
                snap = await self.router.snapshot()
                for agent in agents:
                    await self._push_agent(agent, snap)
                if supervisors:
                    await self._push_supervisors(snap)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("desk: cannot refresh the views; trying again")
                self._dirty |= agents
                self._supervisors_dirty |= supervisors
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _push_agent(self, agent: str, snap: Snapshot) -> None:
        conns = list(self.views.get(agent, ()))
        if not conns:
            return
        state = snap.agents.get(agent)
        work: list[dict[str, Any]] = []
        for item in snap.interactions.values():
            if item.agent != agent or item.state not in ("offered", "active"):
                continue
            record = await self.router.interaction(item.interaction)   # deadline and accepted_at
            if record.get("agent") != agent:
                continue   # changed since the snapshot; the event that changed it brings another push
            work.append({"interaction": item.interaction, "channel": item.channel, "skill": item.skill,
                         "mode": item.mode, "state": record.get("state"), "queued_at": item.queued_at,
                         "deadline": float(record["deadline"]) / 1000 if record.get("deadline") else None,
                         "accepted_at": float(record["accepted_at"]) / 1000 if record.get("accepted_at") else None,
                         "record": record})
        cards: dict[str, dict[str, Any]] = {}
        for entry in work:
            record = entry.pop("record")
            if any(entry["interaction"] not in conn.cards for conn in conns):
                cards[entry["interaction"]] = await self.card(entry["interaction"], record)
        frame = {"type": "state", "server_time": snap.taken_at,
                 "presence": state.presence if state else "offline",
                 "voice": state.voice if state else 0, "chat": state.chat if state else 0,
                 "cap_voice": state.cap_voice if state else 0, "cap_chat": state.cap_chat if state else 0,
                 "wrapup_until": state.wrapup_until if state else None, "work": work}
        active = {entry["interaction"] for entry in work if entry["state"] == "active"}
        for conn in conns:
            for iid, card in cards.items():
                if iid not in conn.cards:
                    conn.cards.add(iid)
                    conn.send(card)
            conn.send(frame)
            self._follow(conn, active)

    async def _push_supervisors(self, snap: Snapshot) -> None:
        names = await self.directory(snap.agents)
        per_skill = snap.per_skill()
        skills = sorted(set(per_skill) | {s for a in snap.agents.values() for s in a.skills}
                        | {i.skill for i in snap.interactions.values()})
        rows = []
        for skill in skills:
            items = [i for i in snap.interactions.values() if i.skill == skill]
            waiting = [i for i in items if i.state == "queued"]
            rows.append({"skill": skill, "waiting": len(waiting),
                         "longest_wait": per_skill.get(skill, {}).get("longest_wait", 0.0),
                         "oldest_queued_at": min((i.queued_at for i in waiting), default=None),
                         "offered": sum(1 for i in items if i.state == "offered"),
                         "active": sum(1 for i in items if i.state == "active"),
                         "ready": sum(1 for a in snap.agents.values() if a.agent in snap.ready and skill in a.skills)})
        queue = [{"interaction": i.interaction, "channel": i.channel, "skill": i.skill, "mode": i.mode,
                  "queued_at": i.queued_at} for i in (snap.interactions[iid] for iid in snap.queue[:200])]
        agents = [{"agent": a.agent, "name": (names[a.agent].display_name if a.agent in names else "") or a.agent,
                   "presence": a.presence, "voice": a.voice, "chat": a.chat, "cap_voice": a.cap_voice,
                   "cap_chat": a.cap_chat, "wrapup_until": a.wrapup_until, "skills": a.skills}
                  for a in sorted(snap.agents.values(), key=lambda a: a.agent)]
        frame = {"type": "supervisor", "server_time": snap.taken_at, "skills": rows, "queue": queue,
                 "waiting_total": len(snap.queue), "agents": agents}
        for conn in list(self.supervisors):
            conn.send(frame)


def _strings(lang: str) -> dict[str, str]:
    """The UI strings the script shows (the desktop's, in the agent's language)."""
    return {key: text for key, text in i18n.UI[lang].items() if key.startswith("desk_")}
