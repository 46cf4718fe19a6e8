"""The unified queue's record in the database: the router's change stream (``<prefix>log`` in Redis, appended by
the same Lua step as each change, see :mod:`bridge.router`) written to ``queue_events``.

Every ivr-bridge process runs one :class:`QueueLog`; they share the Redis consumer group ``db``, so each entry is
read by one of them. An entry is acknowledged only after its transaction committed, and the row's key is the
entry's id, so an entry read by a process that died before acknowledging it is claimed by another after
``claim_after`` seconds and written again without a duplicate. Entries every reader has acknowledged are trimmed
from the stream; unread ones never are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite

from bridge.models import QueueEvent
from bridge.router import wait_or_cancel

if TYPE_CHECKING:
    from bridge.config import RouterConfig
    from bridge.store import InteractionStore

log = logging.getLogger(__name__)

GROUP = "db"
_EVENTS: Table = QueueEvent.__table__  # type: ignore[assignment]
KINDS = frozenset({"joined", "offered", "accepted", "requeued", "switched", "left", "login", "presence"})
Entry = tuple[str, dict[str, str]]


def event_row(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The ``queue_events`` row for one stream entry."""
    kind = fields.get("kind", "")
    if kind not in KINDS:
        raise ValueError(f"queue log entry {entry_id}: unknown kind {kind!r:.40}")
    at = dt.datetime.fromtimestamp(int(fields.get("at") or entry_id.split("-")[0]) / 1000, dt.UTC)
    return {"id": entry_id, "at": at, "kind": kind, "interaction_id": fields.get("interaction") or None,
            "agent": fields.get("agent") or None, "detail": (fields.get("detail") or "")[:256]}


class QueueLog:
    """Reads the router's change stream and writes it to the store; ``start()`` / ``aclose()``."""

    def __init__(self, redis_url: str, config: RouterConfig, store: InteractionStore, *,
                 consumer: str | None = None, claim_after: float = 30.0, block: float = 1.0,
                 batch: int = 500, redis: aioredis.Redis | None = None) -> None:
        self.store = store
        self.key = config.key_prefix + "log"
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_after = claim_after
        self.block = block
        self.batch = batch
        self.written = 0  # entries this reader wrote (a re-delivered one counts again)
        self._redis = redis or aioredis.Redis.from_url(redis_url, decode_responses=True)
        self._own_redis = redis is None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._claimed_at = 0.0

    async def start(self) -> None:
        try:
            await self._redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._task = asyncio.create_task(self._run(), name="queue-log")

    async def aclose(self) -> None:
        if self._task is not None:
            # Asked to stop (a blocked XREADGROUP ends within ``block``), cancelled only if stuck: see Router.
            self._stopping = True
            await wait_or_cancel(self._task, self.block + 5)
            self._task = None
        if self._own_redis:
            await self._redis.aclose()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                entries = await self.claim_stale() or await self.read()
                if entries:
                    await self.write(entries)
                    await self.acknowledge(entries)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue log: cannot move router events to the database; retrying")
                await asyncio.sleep(1.0)

    async def read(self) -> list[Entry]:
        """New entries for this reader (waits up to ``block`` seconds for some)."""
        reply: Any = await self._redis.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=self.batch,
                                                  block=max(1, int(self.block * 1000)))
        return [(i, f) for _, entries in reply or [] for i, f in entries]

    async def claim_stale(self) -> list[Entry]:
        """Entries another reader took and did not acknowledge within ``claim_after`` (it died)."""
        loop_time = asyncio.get_running_loop().time()
        if loop_time - self._claimed_at < self.claim_after / 2:
            return []
        self._claimed_at = loop_time
        reply = await self._redis.xautoclaim(self.key, GROUP, self.consumer, int(self.claim_after * 1000),
                                             start_id="0-0", count=self.batch)
        entries = [(i, f) for i, f in reply[1] if f]  # entries trimmed meanwhile come back empty
        if entries:
            log.warning("queue log: %d router event(s) left unwritten by a reader that stopped; writing them",
                        len(entries))
            self._claimed_at = 0.0  # more may wait
        return entries

    async def write(self, entries: list[Entry]) -> None:
        """One transaction; an entry already written (a re-delivery) is skipped."""
        rows = []
        for entry_id, fields in entries:
            try:
                rows.append(event_row(entry_id, fields))
            except ValueError:
                log.exception("queue log: skipping a malformed entry")
        if not rows:
            return
        assert self.store.sessions is not None, "the store is not started"
        async with self.store.sessions.begin() as session:
            make = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
            await session.execute(make(_EVENTS).on_conflict_do_nothing(index_elements=["id"]), rows)
        self.written += len(rows)

    async def acknowledge(self, entries: list[Entry]) -> None:
        """Acknowledge written entries and trim what no reader still holds."""
        await self._redis.xack(self.key, GROUP, *(i for i, _ in entries))
        # Delivered-up-to first, then what is pending: an entry another reader takes in between is newer than
        # the first and so kept.
        groups = await self._redis.xinfo_groups(self.key)
        keep = next((str(g["last-delivered-id"]) for g in groups if g["name"] == GROUP), "0-0")
        pending = await self._redis.xpending(self.key, GROUP)
        if pending["pending"]:
            keep = min(keep, str(pending["min"]), key=_stream_id)
        if keep != "0-0":
            await self._redis.xtrim(self.key, minid=keep, approximate=False)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
