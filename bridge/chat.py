"""Web chat: messages stored in order, delivered live to every ivr-bridge process that follows the chat.

A chat is an interaction. :meth:`ChatService.open` starts one on the ``web`` channel and puts it in the unified
queue; :meth:`ChatService.join` attaches a chat to an interaction that exists already (a caller waiting in the
queue got a link by SMS: same interaction, still queued once).

Messages are numbered per interaction (``seq`` 1, 2, 3 ... without gaps) and carry the sender's own id
(``client_id``), so a client that lost its connection resends what was not acknowledged without making
duplicates, and asks for what came after the last number it saw. Posts are written in batches (group commit):
everything posted while a commit runs goes into the next one, so the number of transactions does not grow with
the number of chats (one writer task on SQLite, which has one write lock; on PostgreSQL a few, each for its own
share of the chats, so commits waiting for the disk overlap). Numbers stay right with several processes posting into one
chat: each batch first takes a per-interaction write lock (PostgreSQL: transaction-scoped advisory locks, in a
fixed order; SQLite: ``BEGIN IMMEDIATE``, its one write lock), then reads the last number; the unique constraint on
(interaction, seq) would refuse anything else.

Live delivery: every event (a stored message, typing, a change of state) goes to this process's followers at
once and to Redis pub/sub for the other processes; each process subscribes once and fans events out to its own
:class:`Feed` objects (one per websocket). Pub/sub can lose events (a reconnect, a slow subscriber); a feed that
sees a number jump reads the missing messages from the database, and after its subscription reconnects every
feed reads what it may have missed, so what a client is shown is complete and in order. Typing and state are
best effort.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import re
import sqlite3
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import DateTime
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from bridge.events import EventBus
from bridge.models import ChatMessage, Interaction, Outcome, new_id, utcnow
from bridge.router import NAME_RE

if TYPE_CHECKING:
    from bridge.router import Router
    from bridge.store import InteractionStore

log = logging.getLogger(__name__)

MAX_TEXT = 2000                      # characters of one message
SENDERS = ("visitor", "agent", "system")
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
BATCH = 500                          # posts in one transaction at most
PENDING = 10000                      # posts waiting for a writer; post() waits beyond that
PG_WRITERS = 4                       # PostgreSQL: writers (connections) committing at once, each for its own chats
HISTORY_PAGE = 200                   # messages a feed reads from the database at a time
FEED_SIZE = 256                      # live events a feed holds for a slow reader before it falls back to history
# C0 controls but tab and line feed, DEL, C1 controls, lone surrogates (from JSON "\ud800"; not storable as UTF-8)
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# what the visitor is told about the router's state of their interaction
_STATES = {"queued": "waiting", "offered": "waiting", "active": "active"}
_ROUTER_EVENTS = {"queue-accepted": "active", "queue-requeued": "waiting", "queue-left": "closed"}


class ChatError(ValueError):
    """A post or request the chat refuses; ``code`` says why to programs (``empty``, ``too_long``,
    ``bad_sender``, ``bad_client_id``, ``unknown_chat``), the message to people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Message:
    """A stored message; ``seq`` numbers it within its interaction."""

    interaction_id: str
    seq: int
    sender: str                 # visitor | agent | system
    text: str
    at: dt.datetime
    agent: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class Posted:
    """What :meth:`ChatService.post` did: the stored message, and False when it was stored before (the same
    ``client_id`` posted again, e.g. resent after a reconnect)."""

    message: Message
    new: bool


@dataclass(frozen=True)
class ChatEvent:
    """Something that happened in a chat, as a :class:`Feed` gives it.

    ``kind``: ``msg`` (``message``), ``typing`` (``sender`` and ``on``; ``agent`` when an agent types) or ``state``
    (``state``: ``waiting``, ``active`` or ``closed``; ``agent`` who took it when ``active``).
    """

    kind: str
    interaction_id: str
    message: Message | None = None
    sender: str = ""
    on: bool = False
    state: str = ""
    agent: str | None = None


@dataclass(frozen=True)
class ChatInfo:
    """An interaction as the chat sees it; ``state`` is the router's (``waiting``, ``active``, ``closed``)."""

    interaction_id: str
    channel: str
    language: str
    state: str


def clean_text(value: str) -> str:
    """A message's text as stored: line breaks as ``\\n``, control characters (NUL included) and unpaired
    surrogates as U+FFFD, surrounding blanks dropped; :class:`ChatError` when empty or longer than MAX_TEXT."""
    if not isinstance(value, str):
        raise ChatError("empty", "the text must be a string")
    value = _UNPRINTABLE.sub("\ufffd", value.replace("\r\n", "\n").replace("\r", "\n")).strip()
    if not value:
        raise ChatError("empty", "the message is empty")
    if len(value) > MAX_TEXT:
        raise ChatError("too_long", f"a message has at most {MAX_TEXT} characters (this one has {len(value)})")
    return value


@dataclass
class _Post:
    interaction_id: str
    sender: str
    text: str
    agent: str | None
    client_id: str | None
    at: dt.datetime
    done: asyncio.Future[Posted]


class ChatService:
    """Chats over the store (SQL), the router (the queue) and Redis (live delivery between processes).

    ``channel`` is the Redis pub/sub channel shared by every process; ``skill`` the queue skill of new web
    chats. ``start()`` subscribes and starts the writers; ``aclose()`` finishes queued posts, then stops.
    """

    def __init__(self, store: InteractionStore, redis_url: str, router: Router, *,
                 channel: str = "ivr-bridge:chat", skill: str = "general") -> None:
        self.store = store
        self.router = router
        self.redis_url = redis_url
        self.channel = channel
        self.skill = skill
        self._origin = uuid.uuid4().hex[:12]       # this process's events come back from Redis: skipped
        self._mark = json.dumps({"o": self._origin})[1:-1].encode()   # how the bus writes it: '"o": "..."'
        self._bus: EventBus | None = None
        self._redis: aioredis.Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writers: list[asyncio.Task[None]] = []
        self._queues: list[asyncio.Queue[_Post]] = []
        self._feeds: dict[str, set[Feed]] = {}
        self._listening = False

    # ---------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self.store.engine is None:
            raise RuntimeError("start the InteractionStore before the ChatService")
        self._bus = EventBus(self.redis_url, self.channel)
        await self._bus.start()
        self._bus.add_listener(self._deliver)
        # No transparent retries on the subscription's connection: redis-py would reconnect and resubscribe
        # silently, and nobody would know that events were lost meanwhile. _read() reconnects and resyncs.
        self._redis = aioredis.from_url(self.redis_url, retry=Retry(NoBackoff(), 0))
        pubsub = await self._subscribe()   # subscribed before start() returns: nothing posted later is missed
        self._reader = asyncio.create_task(self._read(pubsub), name="chat-subscriber")
        # One writer per connection that can commit at once (SQLite has one write lock); a chat always goes to
        # the same writer, so its posts are numbered in the order they were made.
        writers = PG_WRITERS if self.store.engine.dialect.name == "postgresql" else 1
        self._queues = [asyncio.Queue(PENDING // writers) for _ in range(writers)]
        self._writers = [asyncio.create_task(self._write(queue), name=f"chat-writer-{n}")
                         for n, queue in enumerate(self._queues)]
        if not self._listening:  # the router has no way to remove a listener: added once, ignored when closed
            self.router.add_listener(self._router_event)
            self._listening = True

    async def aclose(self) -> None:
        if self._writers:
            with contextlib.suppress(TimeoutError):   # posts already queued are stored (bounded wait)
                await asyncio.wait_for(asyncio.gather(*(queue.join() for queue in self._queues)), 5)
            for writer in self._writers:
                await _stop(writer)
            self._writers = []
        for queue in self._queues:
            while not queue.empty():
                _settle(queue.get_nowait().done, RuntimeError("the chat service stopped"))
                queue.task_done()
        if self._reader is not None:
            await _stop(self._reader)
            self._reader = None
        if self._bus is not None:
            await self._bus.aclose()
            self._bus = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        for feeds in list(self._feeds.values()):
            for feed in list(feeds):
                feed.close()

    # ---------------------------------------------------------------------------------------- interactions
    async def open(self, *, language: str = "en", skill: str | None = None, priority: int = 0) -> ChatInfo:
        """A new chat: an interaction on the ``web`` channel, queued for an agent with ``skill``."""
        skill = skill or self.skill
        iid = new_id()
        now = utcnow()
        await self.store.create(id=iid, channel="web", state="queued", caller="", language=language[:8],
                                skill=skill, started_at=now, queued_at=now)
        try:
            await self.router.enqueue(iid, "web", skill, priority)
        except Exception:
            await self.store.update(iid, state="ended", ended_at=utcnow(), outcome=Outcome.FAILED.value)
            raise
        log.info("chat: %s opened (skill %s)", iid, skill)
        return ChatInfo(iid, "web", language[:8], "waiting")

    async def join(self, interaction_id: str) -> ChatInfo:
        """A chat on an interaction that exists (a call's, from the link texted during it). Not queued again:
        the interaction keeps its place. :class:`ChatError` ``unknown_chat`` when there is no such interaction."""
        info = await self.info(interaction_id)
        if info is None:
            raise ChatError("unknown_chat", "no such interaction")
        return info

    async def info(self, interaction_id: str) -> ChatInfo | None:
        """The interaction's channel and language, with the router's state (None: no such interaction)."""
        rows = await self._fetch(_INFO, interaction_id)
        if not rows:
            return None
        channel, language = rows[0]
        state = ""
        if NAME_RE.fullmatch(interaction_id):
            state = (await self.router.interaction(interaction_id)).get("state", "")
        return ChatInfo(interaction_id, channel, language, _STATES.get(state, "closed"))

    async def close(self, interaction_id: str) -> tuple[str, str | None]:
        """The chat ends: the interaction leaves the router (:meth:`Router.finish`: the state it ended from and
        the agent who had it), a ``web`` interaction is recorded as ended, and followers are told ``closed``."""
        state, agent = await self.router.finish(interaction_id)
        info = await self.info(interaction_id)
        if info is not None and info.channel == "web":
            outcome = Outcome.ABANDONED if state == "queued" else Outcome.COMPLETED
            await self.store.update(interaction_id, state="ended", ended_at=utcnow(), outcome=outcome.value)
        if not state:  # the router did not have it, so no queue-left told the followers
            self._publish("state", interaction_id, state="closed")
        log.info("chat: %s closed (was %s)", interaction_id, state or "unknown to the router")
        return state, agent

    # ---------------------------------------------------------------------------------------- messages
    async def post(self, interaction_id: str, sender: str, text: str, *, client_id: str | None = None,
                   agent: str | None = None) -> Posted:
        """Store a message and deliver it to every follower of the chat; returns it with ``new`` False when
        ``client_id`` was posted before (nothing is stored or delivered again). ``sender`` is ``visitor``,
        ``agent`` (``agent`` names who) or ``system``. :class:`ChatError` for a message that cannot be stored."""
        if sender not in SENDERS:
            raise ChatError("bad_sender", f"sender must be one of {', '.join(SENDERS)}")
        if (sender == "agent") != (agent is not None) or (agent is not None and not NAME_RE.fullmatch(agent)):
            raise ChatError("bad_sender", "an agent's message names the agent (1-64 letters, digits, _.@-), "
                                          "no other message does")
        if client_id is not None and not CLIENT_ID_RE.fullmatch(client_id):
            raise ChatError("bad_client_id", "client_id must be 1-64 letters, digits, _ or -")
        cleaned = clean_text(text)
        if not self._writers:
            raise RuntimeError("ChatService.start() was not called")
        done: asyncio.Future[Posted] = asyncio.get_running_loop().create_future()
        queue = self._queues[zlib.crc32(interaction_id.encode()) % len(self._queues)]
        await queue.put(_Post(interaction_id, sender, cleaned, agent, client_id, utcnow(), done))
        # A caller that gives up (cancelled) does not undo the post: resending its client_id finds it.
        return await asyncio.shield(done)

    async def history(self, interaction_id: str, after_seq: int = 0, limit: int = HISTORY_PAGE) -> list[Message]:
        """Messages numbered above ``after_seq``, in order, at most ``limit``."""
        return [_from_row(row, self._read_at) for row in
                await self._fetch(_HISTORY, interaction_id, after_seq, limit)]

    def typing(self, interaction_id: str, sender: str, on: bool = True, agent: str | None = None) -> None:
        """Tell the chat's followers that ``sender`` (visitor or agent) started or stopped typing."""
        if sender not in ("visitor", "agent"):
            raise ChatError("bad_sender", "visitor or agent")
        self._publish("typing", interaction_id, sender=sender, on=bool(on), agent=agent)

    def feed(self, interaction_id: str, after_seq: int = 0, size: int = FEED_SIZE) -> Feed:
        """Follow one chat from message ``after_seq`` on (see :class:`Feed`); close it when done."""
        feed = Feed(self, interaction_id, after_seq, size)
        self._feeds.setdefault(interaction_id, set()).add(feed)
        return feed

    # ---------------------------------------------------------------------------------------- writing
    def _engine(self) -> AsyncEngine:
        if self.store.engine is None:
            raise RuntimeError("the InteractionStore is not started")
        return self.store.engine

    async def _fetch(self, sql: str, *params: Any) -> list[Any]:
        """Rows of a query written with ``?`` markers, on the driver's own connection (see :meth:`_store`: a
        reconnecting crowd of visitors asks for their chats' state and history at once)."""
        async with self._engine().connect() as conn:
            driver: Any = (await conn.get_raw_connection()).driver_connection
            if conn.dialect.name == "postgresql":
                return list(await driver.fetch(_numbered(sql), *params))
            return list(await driver.execute_fetchall(sql, params))

    @property
    def _read_at(self) -> Callable[[Any], Any] | None:
        return _sqlite_read_at if self._engine().dialect.name == "sqlite" else None

    async def _write(self, queue: asyncio.Queue[_Post]) -> None:
        """Store what was posted to ``queue`` while the previous transaction ran, in one transaction (group
        commit), then deliver and answer."""
        while True:
            batch = [await queue.get()]
            while len(batch) < BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                try:
                    results: list[Posted | Exception] = await self._store(batch)
                except Exception as exc:
                    if len(batch) == 1:
                        results = [exc]
                    else:   # one bad post (or a conflict) must not lose the others: each alone
                        log.warning("chat: a batch of %d posts failed (%s); storing them one by one", len(batch),
                                    exc)
                        results = []
                        for post in batch:
                            try:
                                results.extend(await self._store([post]))
                            except Exception as one:
                                results.append(one)
                for result in results:
                    if isinstance(result, Posted) and result.new:
                        self._publish_message(result.message)
                for post, result in zip(batch, results, strict=True):
                    _settle(post.done, result)
            except BaseException as exc:
                for post in batch:
                    _settle(post.done, RuntimeError("the chat service stopped"))
                if not isinstance(exc, Exception):
                    raise
                log.exception("chat: the writer failed")
            finally:
                for _ in batch:
                    queue.task_done()

    async def _store(self, batch: list[_Post]) -> list[Posted | Exception]:
        """One transaction: lock the chats, read their last numbers and the client ids already stored, insert.

        Plain SQL on the driver's own connection (checked out of the pool, so nothing else uses it meanwhile):
        through SQLAlchemy each statement cost a compilation and, on SQLite, four trips to aiosqlite's thread;
        this is one trip (SQLite) or one round trip (PostgreSQL) a statement."""
        ids = sorted({post.interaction_id for post in batch})
        client_ids = sorted({post.client_id for post in batch if post.client_id})
        async with self._engine().connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            if conn.dialect.name == "postgresql":
                return await _store_postgresql(driver, batch, ids, client_ids)
            return await _store_sqlite(driver, batch, ids, client_ids)

    # ---------------------------------------------------------------------------------------- delivery
    def _publish(self, kind: str, interaction_id: str, **fields: Any) -> None:
        """To this process's feeds at once (the bus's listener) and to the other processes through Redis."""
        if self._bus is not None:
            self._bus.publish(kind, o=self._origin, i=interaction_id, **fields)

    def _publish_message(self, m: Message) -> None:
        self._publish("msg", m.interaction_id, seq=m.seq, sender=m.sender, agent=m.agent, text=m.text,
                      at=m.at.timestamp(), cid=m.client_id)

    def _router_event(self, kind: str, fields: dict[str, Any]) -> None:
        state = _ROUTER_EVENTS.get(kind)
        if state is not None and fields.get("interaction"):
            self._publish("state", str(fields["interaction"]), state=state,
                          agent=fields.get("agent") if state == "active" else None)

    def _deliver(self, event: dict[str, Any]) -> None:
        feeds = self._feeds.get(str(event.get("i")))
        if not feeds:
            return
        parsed = _event(event)
        if parsed is not None:
            for feed in list(feeds):
                feed.push(parsed)

    def _resync_all(self) -> None:
        for feeds in list(self._feeds.values()):
            for feed in list(feeds):
                feed.resync()

    def _forget(self, feed: Feed) -> None:
        feeds = self._feeds.get(feed.interaction_id)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._feeds[feed.interaction_id]

    async def _subscribe(self) -> Any:
        assert self._redis is not None
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub

    async def _read(self, pubsub: Any) -> None:
        """Events of the other processes, fanned out to this process's feeds; resubscribes after a failure."""
        delay = 0.1
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = await self._subscribe()
                        log.info("chat: subscribed to %s again; feeds read what they may have missed", self.channel)
                        self._resync_all()
                        delay = 0.1
                    async for item in pubsub.listen():
                        self._received(item.get("data"))
                    raise RedisConnectionError("the subscription ended")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Even without retries, redis-py reconnects a failed subscription before raising: that
                    # connection is dropped at once, what it received meanwhile is read back by the resync.
                    log.warning("chat: subscription to %s lost (%s); retrying in %.1f s", self.channel, exc, delay)
                    old, pubsub = pubsub, None
                    await _close(old)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            await _close(pubsub)

    def _received(self, data: Any) -> None:
        if isinstance(data, bytes) and self._mark in data[:64]:
            return   # this process's own event, delivered here already: not even decoded (the check below stays)
        try:
            event = json.loads(data)
        except (TypeError, ValueError):
            log.warning("chat: ignored an unreadable event on %s", self.channel)
            return
        if isinstance(event, dict) and event.get("o") != self._origin:
            self._deliver(event)


class Feed:
    """One follower of one chat (a websocket, an agent's view): messages in order and without gaps from
    ``after_seq`` on, with typing and state events as they come.

    Live events wait in a bounded buffer; a message whose number is not the next one expected (lost or late
    on pub/sub), a full buffer (a slow reader) or a resubscription makes the feed read the messages it misses from
    the database instead, so memory stays bounded and nothing is skipped. Iterate with ``async for``; ``close()``
    ends it (also used as ``async with``).
    """

    def __init__(self, service: ChatService, interaction_id: str, after_seq: int, size: int) -> None:
        self.service = service
        self.interaction_id = interaction_id
        self.last_seq = max(0, after_seq)
        self.size = size
        self._events: deque[ChatEvent] = deque()
        self._backlog: deque[Message] = deque()
        self._behind = True            # read the history after last_seq first
        self._wake = asyncio.Event()
        self._closed = False

    # called by the service, on the event loop, never blocking
    def push(self, event: ChatEvent) -> None:
        if self._closed or (event.message is not None and event.message.seq <= self.last_seq):
            return
        if len(self._events) >= self.size:
            # A slow reader: live messages and typing are dropped, the messages are read back from the database
            # when it catches up; of the states only the latest matters.
            self._events = deque([e for e in self._events if e.kind == "state"][-1:])
            self._behind = True
            if event.kind == "typing":
                self._wake.set()
                return
        self._events.append(event)
        self._wake.set()

    def resync(self) -> None:
        """Events may have been lost: read the messages after the last one given from the database."""
        self._behind = True
        self._wake.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.service._forget(self)
            self._wake.set()

    async def __aenter__(self) -> Feed:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[ChatEvent]:
        return self

    async def __anext__(self) -> ChatEvent:
        while not self._closed:
            if self._backlog:
                message = self._backlog.popleft()
                if message.seq > self.last_seq:  # the database has no gaps: what it gives is the next one
                    self.last_seq = message.seq
                    return ChatEvent("msg", self.interaction_id, message=message)
                continue
            if self._behind:
                self._behind = False
                try:
                    page = await self.service.history(self.interaction_id, self.last_seq, HISTORY_PAGE)
                except BaseException:   # cancelled or failed: read it again next time
                    self._behind = True
                    raise
                self._backlog.extend(page)
                if len(page) == HISTORY_PAGE:
                    self._behind = True   # more to read after this page
                continue
            if self._events:
                event = self._events.popleft()
                if event.kind != "msg":
                    return event
                assert event.message is not None
                if event.message.seq == self.last_seq + 1:
                    self.last_seq = event.message.seq
                    return event
                if event.message.seq > self.last_seq:
                    self._behind = True   # a gap: the missing ones are committed, read them (this one too)
                continue
            self._wake.clear()
            await self._wake.wait()
        raise StopAsyncIteration


# ------------------------------------------------------------------------------------------------ helpers
def _event(event: dict[str, Any]) -> ChatEvent | None:
    """A published event (this process's or another's) as a ChatEvent; None when it is not understood."""
    try:
        kind, iid = event["type"], str(event["i"])
        if kind == "msg":
            message = Message(iid, int(event["seq"]), str(event["sender"]), str(event["text"]),
                              dt.datetime.fromtimestamp(float(event["at"]), dt.UTC), event.get("agent"),
                              event.get("cid"))
            return ChatEvent("msg", iid, message=message)
        if kind == "typing":
            return ChatEvent("typing", iid, sender=str(event["sender"]), on=bool(event["on"]),
                             agent=event.get("agent"))
        if kind == "state":
            return ChatEvent("state", iid, state=str(event["state"]), agent=event.get("agent"))
    except (KeyError, TypeError, ValueError):
        pass
    log.warning("chat: ignored a malformed %s event", str(event.get("type"))[:20])
    return None


def _lock_key(interaction_id: str) -> int:
    return int.from_bytes(hashlib.sha256(b"ivr-bridge chat\0" + interaction_id.encode()).digest()[:8], "big",
                          signed=True)


# Plain SQL (see ChatService._store); "?" markers, numbered for PostgreSQL by _numbered().
_M, _I = ChatMessage.__tablename__, Interaction.__tablename__
_COLUMNS = "interaction_id, seq, sender, agent, client_id, text, at"
_LAST = (f"SELECT i.id, COALESCE(MAX(m.seq), 0) FROM {_I} i LEFT JOIN {_M} m ON m.interaction_id = i.id "
         "WHERE i.id {ids} GROUP BY i.id")
_KNOWN = f"SELECT {_COLUMNS} FROM {_M} WHERE interaction_id {{ids}} AND client_id {{cids}}"
_INSERT = f"INSERT INTO {_M} ({_COLUMNS}) VALUES ({{marks}})"
_INFO = f"SELECT channel, language FROM {_I} WHERE id = ?"
_HISTORY = f"SELECT {_COLUMNS} FROM {_M} WHERE interaction_id = ? AND seq > ? ORDER BY seq LIMIT ?"
# SQLite keeps times as text in SQLAlchemy's format; its own converters keep what is written here readable by the ORM
_SQLITE_AT = DateTime(timezone=True).dialect_impl(sqlite_dialect())
_sqlite_bind_at: Callable[[Any], Any] = _SQLITE_AT.bind_processor(sqlite_dialect()) or (lambda value: value)
_sqlite_read_at: Callable[[Any], Any] = _SQLITE_AT.result_processor(sqlite_dialect(), None) or (lambda value: value)


def _number(batch: list[_Post], last: dict[str, int], known: dict[tuple[str, str], Message],
            ) -> tuple[list[Posted | Exception], list[Message]]:
    """Each post's outcome in order (numbered after ``last``, or the message its client id already has) and the
    messages to insert."""
    results: list[Posted | Exception] = []
    new: list[Message] = []
    for post in batch:
        if post.interaction_id not in last:
            results.append(ChatError("unknown_chat", f"no interaction {post.interaction_id[:64]!r}"))
            continue
        key = (post.interaction_id, post.client_id or "")
        if post.client_id and key in known:
            results.append(Posted(known[key], False))
            continue
        last[post.interaction_id] += 1
        message = Message(post.interaction_id, last[post.interaction_id], post.sender, post.text, post.at,
                          post.agent, post.client_id)
        if post.client_id:
            known[key] = message
        new.append(message)
        results.append(Posted(message, True))
    return results, new


def _row(m: Message) -> tuple[Any, ...]:
    return m.interaction_id, m.seq, m.sender, m.agent, m.client_id, m.text, m.at


def _from_row(row: Any, read_at: Callable[[Any], Any] | None = None) -> Message:
    """A message from a row of ``_COLUMNS`` (SQLite: ``read_at`` reads its text times, naive UTC)."""
    iid, seq, sender, agent, cid, body, at = row
    at = read_at(at) if read_at is not None else at
    return Message(iid, seq, sender, body, at if at.tzinfo else at.replace(tzinfo=dt.UTC), agent, cid)


def _known(rows: Any, read_at: Callable[[Any], Any] | None = None) -> dict[tuple[str, str], Message]:
    return {(m.interaction_id, m.client_id or ""): m for m in (_from_row(row, read_at) for row in rows)}


def _numbered(sql: str) -> str:
    """``?`` markers as PostgreSQL's ``$1``, ``$2`` ..."""
    parts = sql.split("?")
    return "".join(part + (f"${n}" if n < len(parts) else "") for n, part in enumerate(parts, 1))


async def _store_sqlite(driver: Any, batch: list[_Post], ids: list[str], cids: list[str],
                        ) -> list[Posted | Exception]:
    """SQLite: the whole transaction in one trip to a worker thread, on the driver's sqlite3 connection (checked
    out of the pool, idle on aiosqlite's own thread meanwhile; the store opens it with check_same_thread=False).
    Five trips to aiosqlite's thread cost a turn of a busy event loop each, milliseconds under load; and a WAL
    checkpoint at the commit, or a write lock held by another process, is waited for on that thread, not on the
    event loop."""
    work = asyncio.ensure_future(asyncio.to_thread(_sqlite_transaction, driver._conn, batch, ids, cids))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait({work})   # the connection goes back to the pool only once the thread let go of it
        raise


def _sqlite_transaction(connection: sqlite3.Connection, batch: list[_Post], ids: list[str], cids: list[str],
                        ) -> list[Posted | Exception]:
    """``BEGIN IMMEDIATE`` takes the database's one write lock before the numbers are read (a deferred
    transaction could read a number another connection is about to use)."""
    in_ids = "IN (" + ",".join("?" * len(ids)) + ")"
    connection.execute("BEGIN IMMEDIATE")
    try:
        last = dict(connection.execute(_LAST.format(ids=in_ids), ids).fetchall())
        known = {}
        if cids:
            in_cids = "IN (" + ",".join("?" * len(cids)) + ")"
            known = _known(connection.execute(_KNOWN.format(ids=in_ids, cids=in_cids), ids + cids).fetchall(),
                           _sqlite_read_at)
        results, new = _number(batch, last, known)
        if new:
            connection.executemany(_INSERT.format(marks=",".join("?" * 7)),
                                   [(*_row(m)[:6], _sqlite_bind_at(m.at)) for m in new])
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    return results


async def _store_postgresql(driver: Any, batch: list[_Post], ids: list[str], cids: list[str],
                            ) -> list[Posted | Exception]:
    """PostgreSQL (asyncpg): a transaction-scoped advisory lock per chat, always taken in the same order (no
    deadlock between two processes' batches); each statement after it sees what the lock's last holder committed."""
    async with driver.transaction():
        await driver.execute("SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k",
                             sorted(_lock_key(iid) for iid in ids))
        last = {iid: seq for iid, seq in await driver.fetch(_LAST.format(ids="= ANY($1::varchar[])"), ids)}
        known = _known(await driver.fetch(_KNOWN.format(ids="= ANY($1::varchar[])", cids="= ANY($2::varchar[])"),
                                          ids, cids)) if cids else {}
        results, new = _number(batch, last, known)
        if new:
            await driver.executemany(_numbered(_INSERT.format(marks=",".join("?" * 7))), [_row(m) for m in new])
    return results


async def _close(pubsub: Any) -> None:
    """Close a subscription that may be broken already (nothing to report then)."""
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()


def _settle(future: asyncio.Future[Posted], result: Posted | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait for it to end (bounded); the caller's own cancellation is not swallowed."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:
        log.warning("chat: %s did not stop within 5 s", task.get_name())
    elif not task.cancelled() and task.exception() is not None:
        log.error("chat: %s had failed: %r", task.get_name(), task.exception())


__all__ = ["CLIENT_ID_RE", "MAX_TEXT", "ChatError", "ChatEvent", "ChatInfo", "ChatService", "Feed", "Message",
           "Posted", "clean_text"]
