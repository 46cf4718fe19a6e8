"""Async storage for interaction records (SQLAlchemy 2; SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Table, event, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from bridge.models import FollowUp, Interaction, Link, Outcome, Step, SurveyAnswer, new_id, utcnow

# Queued writes wait this long for others to share their transaction. Nothing in a call waits for them (only the
# end of a call, after the hang-up); a crash loses at most this much of the calls' paths.
GROUP_WINDOW = 0.05
_INTERACTIONS: Table = Interaction.__table__  # type: ignore[assignment]
_STEPS: Table = Step.__table__  # type: ignore[assignment]
_FOLLOWUPS: Table = FollowUp.__table__  # type: ignore[assignment]
_TABLES: dict[str, Table] = {"interactions": _INTERACTIONS, "steps": _STEPS, "followups": _FOLLOWUPS,
                             "links": Link.__table__, "survey_answers": SurveyAnswer.__table__}  # type: ignore[dict-item]


@dataclass(frozen=True)
class StepRecord:
    node: str
    event: str
    value: str | None = None
    at: dt.datetime | None = None


class InteractionStore:
    """Creates interactions, appends their steps and closes them with an outcome."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine | None = None
        self.sessions: async_sessionmaker | None = None
        self._queued: list[_Op] = []
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.url.startswith("sqlite"):
            path = self.url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # One connection: SQLite takes one writer at a time, and calls writing through several pooled
            # connections wait on its file lock in sleeps of up to 100 ms (busy_timeout), then fail with
            # "database is locked" under load. Queuing for the one connection in asyncio is fast and fair.
            # No pre-ping (a SELECT 1 before every transaction) for a local file.
            # pool_reset_on_return=None (both back ends): sessions and connections end their own transactions
            # (commit, or rollback on close); the pool's extra ROLLBACK cost a round trip to the driver each time.
            # check_same_thread=False (SQLAlchemy's default for files, made explicit): the outbox commits a batch
            # with hand-overs from the event loop's thread (bridge/outbox.py, _run_sqlite).
            file_db = path not in ("", ":memory:") and "mode=memory" not in self.url
            options: dict[str, Any] = {"pool_size": 1, "max_overflow": 0} if file_db else {}
            self.engine = create_async_engine(self.url, pool_reset_on_return=None,
                                              connect_args={"check_same_thread": False}, **options)
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(self.url, pool_pre_ping=True, pool_reset_on_return=None)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def aclose(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), 10)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
            self._writer = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    def _maker(self) -> async_sessionmaker:
        if self.sessions is None:
            raise RuntimeError("InteractionStore.start() was not called")
        return self.sessions

    async def create(self, **fields: object) -> Interaction:
        async with self._maker().begin() as session:
            record = Interaction(**fields)
            session.add(record)
        return record

    # Plain SQL statements on the tables, not the ORM's unit of work (a SELECT, object tracking and a flush cost
    # milliseconds of CPU on the event loop each time).
    async def update(self, interaction_id: str, **fields: object) -> None:
        if not fields:
            return
        async with self._maker().begin() as session:
            await session.execute(update(_INTERACTIONS).where(_INTERACTIONS.c.id == interaction_id).values(fields))

    async def add_steps(self, interaction_id: str, first_seq: int, steps: Sequence[StepRecord]) -> None:
        if not steps:
            return
        async with self._maker().begin() as session:
            await session.execute(insert(_STEPS), step_rows(interaction_id, first_seq, steps))

    # ---- write-behind: what calls write while they run (the interaction, a step row per node, the outcome) goes
    # through one ordered queue. A writer task takes everything queued and commits it in one transaction (group
    # commit), so the number of transactions does not grow with the number of calls, and a call never waits
    # for the database in front of its next prompt. Operations of one call stay in order; each future completes
    # once its operation is committed.
    def create_soon(self, **fields: object) -> tuple[str, asyncio.Future[None]]:
        """Queue a new interaction; returns its id at once and a future that completes when it is stored."""
        row = {"id": new_id(), "started_at": utcnow(), **fields}
        return str(row["id"]), self._submit("interactions", [row])

    def queue_steps(self, interaction_id: str, first_seq: int, steps: Sequence[StepRecord]) -> asyncio.Future[None]:
        """Queue steps (after what this call queued before); the future completes when they are committed."""
        return self._submit("steps", step_rows(interaction_id, first_seq, steps))

    def _submit(self, kind: str, rows: list[dict[str, object]]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not rows:
            future.set_result(None)
            return future
        self._queued.append((kind, rows, future))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_queued(), name="store-writer")
        return future

    async def _write_queued(self) -> None:
        batch: list[_Op] = []
        try:
            while self._queued:
                await asyncio.sleep(GROUP_WINDOW)  # let a batch gather: fewer, larger transactions
                batch, self._queued = self._queued, []
                try:
                    async with self._maker().begin() as session:
                        await _apply(session, batch)
                except Exception as exc:
                    if len(batch) == 1:
                        _settle(batch[0][2], exc)
                    else:  # one bad operation (e.g. steps of an unknown call) must not lose the others
                        for op in batch:
                            try:
                                async with self._maker().begin() as session:
                                    await _apply(session, [op])
                            except Exception as op_exc:
                                _settle(op[2], op_exc)
                for _, _, future in batch:
                    _settle(future, None)
                batch = []
        except BaseException as exc:
            for _, _, future in batch + self._queued:
                _settle(future, exc if isinstance(exc, Exception) else RuntimeError("store writer stopped"))
            self._queued = []
            if not isinstance(exc, Exception):
                raise

    def queue_bundle(self, bundle: Bundle) -> asyncio.Future[None]:
        """Queue rows of several tables (and an interaction update) that must commit together: a follow-up
        with its link and the call step that asked for it. Follow-ups whose idempotency key exists are skipped."""
        return self._submit("bundle", [dict(bundle)])

    async def finish(self, interaction_id: str, outcome: Outcome, node: str | None,
                     destination: str | None = None, extra: Bundle | None = None, **fields: object) -> None:
        """Store the outcome (through the write-behind queue, after the call's queued writes); waits for it.
        ``extra`` rows (the after-call follow-ups) commit in the same transaction."""
        values = {"outcome": outcome.value, "outcome_node": node, "destination": destination,
                  "ended_at": utcnow(), "state": "ended", **fields}
        await self._submit("bundle", [{**(extra or {}), "update": {"_id": interaction_id, **values}}])

    async def get(self, interaction_id: str) -> Interaction | None:
        async with self._maker()() as session:
            result = await session.execute(select(Interaction).options(selectinload(Interaction.steps))
                                           .where(Interaction.id == interaction_id))
            return result.scalar_one_or_none()

    async def find_by_uniqueid(self, uniqueid: str) -> Interaction | None:
        async with self._maker()() as session:
            result = await session.execute(select(Interaction).options(selectinload(Interaction.steps))
                                           .where(Interaction.asterisk_uniqueid == uniqueid)
                                           .order_by(Interaction.started_at.desc()).limit(1))
            return result.scalar_one_or_none()

    async def recent(self, limit: int = 20) -> list[Interaction]:
        async with self._maker()() as session:
            result = await session.execute(select(Interaction).options(selectinload(Interaction.steps))
                                           .order_by(Interaction.started_at.desc()).limit(limit))
            return list(result.scalars())


_Op = tuple[str, list[dict[str, object]], asyncio.Future[None]]   # (table or "bundle", rows, done)
Bundle = dict[str, object]   # table name -> list of rows; "update" -> interaction values with "_id"


async def _apply(session: AsyncSession, ops: list[_Op]) -> None:
    """Run queued operations in order; consecutive inserts into one table with the same columns go together."""
    i = 0
    while i < len(ops):
        kind, rows, _ = ops[i]
        if kind == "bundle":
            for bundle in rows:
                await _apply_bundle(session, bundle)
            i += 1
            continue
        keys = rows[0].keys()
        run: list[dict[str, object]] = []
        while i < len(ops) and ops[i][0] == kind and all(r.keys() == keys for r in ops[i][1]):
            run.extend(ops[i][1])
            i += 1
        if not run:  # rows of one operation with different columns
            run = rows
            i += 1
        await session.execute(insert(_TABLES[kind]), run)


async def _apply_bundle(session: AsyncSession, bundle: Bundle) -> None:
    written: set[str] | None = None
    for name, rows in bundle.items():
        if name == "update" or not isinstance(rows, list) or not rows:
            continue
        if name == "followups":
            written = await insert_followups(session, rows)
        elif name == "links" and written is not None:  # a follow-up skipped as a duplicate brings no link
            rows = [r for r in rows if r.get("followup_id") in written]
            if rows:
                await session.execute(insert(_TABLES[name]), rows)
        elif name == "survey_answers":
            await insert_ignoring(session, _TABLES[name], rows, ["interaction_id", "question"])
        else:
            await session.execute(insert(_TABLES[name]), rows)
    change = bundle.get("update")
    if isinstance(change, dict):
        values = {k: v for k, v in change.items() if k != "_id"}
        await session.execute(update(_INTERACTIONS).where(_INTERACTIONS.c.id == change["_id"]).values(values))


async def insert_followups(session: AsyncSession, rows: list[dict[str, object]]) -> set[str]:
    """Insert follow-ups; one whose idempotency key is already stored is skipped (it was accepted before).
    Returns the ids actually written."""
    return await insert_ignoring(session, _FOLLOWUPS, rows, ["idempotency_key"])


async def insert_ignoring(session: AsyncSession, table: Table, rows: list[dict[str, object]],
                          unique: list[str]) -> set[str]:
    """INSERT ... ON CONFLICT (unique) DO NOTHING on SQLite and PostgreSQL; returns the written rows' ids."""
    if not rows:
        return set()
    dialect = session.get_bind().dialect.name
    make = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = make(table).on_conflict_do_nothing(index_elements=unique).returning(table.c.id)
    written: set[str] = set()
    for row in rows:  # one statement a row: RETURNING over executemany does not say which rows were skipped
        written.update(str(i) for i in (await session.execute(statement, row)).scalars())
    return written


def step_rows(interaction_id: str, first_seq: int, steps: Sequence[StepRecord]) -> list[dict[str, object]]:
    return [{"interaction_id": interaction_id, "seq": first_seq + i, "node": s.node, "event": s.event,
             "value": s.value, "at": s.at or utcnow()} for i, s in enumerate(steps)]


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL with synchronous=NORMAL: no fsync per commit (the WAL is synced at checkpoints); the database stays
    # consistent and survives an ivr-bridge crash, only the last commits can be lost if the machine loses power.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()

