"""The outbox: follow-ups (SMS, email) are rows written with the change that called for them; a dispatcher sends
them through the channel's gateway with retries, backoff, a dead-letter state and no double sends.

A gateway (``sms/``, ``email_out/``) implements :class:`Gateway`. It awaits ``handing()`` right before the point
of no return (an SMTP server receiving the final dot, an HTTP request leaving for the SMS gateway), so the row
records whether a dispatcher that died mid-send may have handed the message over:

- died before ``handing``: the gateway never had it; sent again.
- died after: resolved as the gateway's ``interrupted`` says: ``sent``, ``verify`` (wait for the gateway's
  delivery report, send again only if none comes) or ``uncertain`` (kept for an operator:
  ``ivr-bridge outbox retry``).

``handing(then)`` runs ``then`` (a plain function) once the hand-over state is written but not yet committed,
right before the commit goes out, in the same step of the event loop (see :func:`_hand_over`): SMTP writes its
final dot there. So a committed "handing" means the dot was written, and a dispatcher killed in the microseconds
between dot and commit leaves the row in "sending": the mail goes again (SMTP's duplicate of RFC 1047), it is
never lost. Exactly once towards a server that cannot deduplicate is impossible in general; this keeps the
window that small, on the side of sending twice. ``handing()`` itself returns once the commit is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sqlalchemy import Table, func, select, update
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import DBAPIError

from bridge.models import FollowUp, FollowUpState, Interaction, Link, utcnow

if TYPE_CHECKING:
    from bridge.config import OutboxConfig
    from bridge.events import EventBus
    from bridge.followups import Prepared
    from bridge.store import InteractionStore

SendStatus = Literal["sent", "delivered", "retry", "failed", "unknown"]
Interrupted = Literal["sent", "verify", "uncertain"]


@dataclass(frozen=True)
class Outgoing:
    """One message as a gateway sees it. ``payload`` is ``{"text"}`` for SMS, ``{"subject", "text", "html"}``
    for email; ``idempotency_key`` is stable across attempts (an email's Message-ID is made from it)."""

    followup_id: str
    idempotency_key: str
    channel: str
    recipient: str
    language: str
    payload: Mapping[str, str]


@dataclass(frozen=True)
class SendResult:
    """What a gateway made of one attempt.

    ``sent``: taken (a delivery report may follow). ``delivered``: delivered. ``retry``: certainly not taken,
    try again later (gateway down, busy). ``failed``: refused for good (bad recipient). ``unknown``: it may
    have been taken (the connection broke after the request left).
    """

    status: SendStatus
    gateway_ref: str | None = None
    error: str | None = None
    retry_after: float | None = None


class Handing(Protocol):
    """Record "may have been handed over"; ``then`` runs right after that record is committed."""

    def __call__(self, then: Callable[[], None] | None = None) -> Awaitable[None]: ...


class Gateway(Protocol):
    """A channel's way out (one per channel: ``sms`` or ``email``)."""

    channel: str
    interrupted: Interrupted

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def send(self, message: Outgoing, handing: Handing) -> SendResult:
        """Send one message; await ``handing()`` right before the point of no return. Never raise for a
        gateway-side failure: return ``retry``, ``failed`` or ``unknown`` with the reason in ``error``."""
        ...


@dataclass(frozen=True)
class Admission:
    """A recipient check: ``recipient`` normalised (E.164, lower-cased domain) or ``reason`` why not."""

    recipient: str | None
    reason: str | None = None
    detail: str = ""
    counted: bool = field(default=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.recipient is not None


class RecipientPolicy(Protocol):
    """Validates and rate-limits the recipients of one channel (``sms/``: mobile numbers, fraud limits;
    ``email_out/``: addresses)."""

    channel: str

    async def admit(self, recipient: str, *, region: str | None = None) -> Admission:
        """Normalise ``recipient`` and count it against the limits; ``Admission.reason`` says why not.
        ``region`` (ISO 3166) reads national numbers."""
        ...


# ------------------------------------------------------------------------------------------------ the outbox
log = logging.getLogger(__name__)
S = FollowUpState
_F: Table = FollowUp.__table__  # type: ignore[assignment]
_L: Table = Link.__table__  # type: ignore[assignment]


@dataclass(eq=False)
class _Update:
    followup_id: str
    states: tuple[str, ...]
    values: dict[str, Any]
    future: asyncio.Future[bool]
    then: Callable[[], None] | None
    changed: bool = False
    handed: bool = False  # ``then`` ran: the message left, whatever the commit does


class RowUpdates:
    """Conditional updates of follow-up rows ("set these values if the row is still in one of these states"),
    group-committed: what concurrent sends and delivery reports ask for while the previous batch commits shares
    one transaction, and as a rule one statement (see :func:`_statements`).
    """

    def __init__(self, store: InteractionStore) -> None:
        self.store = store
        self._queued: list[_Update] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, followup_id: str, states: Iterable[FollowUpState], values: dict[str, Any],
               then: Callable[[], None] | None = None) -> asyncio.Future[bool]:
        """Queue an update; the future says whether the row changed. ``then`` runs when the row did change,
        right before the commit (see the module doc)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queued.append(_Update(followup_id, tuple(s.value for s in states), values, future, then))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write(), name="outbox-updates")
        return future

    async def drain(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def _write(self) -> None:
        while self._queued:
            await asyncio.sleep(0)  # what else this step of the loop asks for joins the batch
            batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
            try:
                await self._commit(batch)
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item in batch:
                if not item.future.done():
                    item.future.set_result(item.changed)

    async def _commit(self, batch: list[_Update]) -> None:
        """One transaction for the batch, setting each update's ``changed`` and running the hand-overs' ``then``
        before its commit; a deadlock, a busy database or a lost connection is retried."""
        if self.store.engine is None:
            raise RuntimeError("the store is not started")
        sqlite = self.store.engine.dialect.name == "sqlite"
        statements = _statements(batch, _SQLITE if sqlite else _POSTGRESQL)
        for attempt in range(4):
            committed = False
            try:
                async with self.store.engine.connect() as conn:
                    if sqlite:
                        await _run_sqlite(conn, statements, batch)
                    else:
                        async with conn.begin():
                            for sql, params, items in statements:
                                for (followup_id,) in await conn.exec_driver_sql(sql, tuple(params)):
                                    items[followup_id].changed = True
                            _hand_over(batch)  # the block's end writes COMMIT, in this same step
                    committed = True
                return
            except (DBAPIError, sqlite3.Error) as exc:
                if committed:  # only giving the connection back failed; the batch stands
                    log.warning("outbox: returning a connection failed after a commit: %s", exc)
                    return
                for item in batch:
                    item.changed = item.handed
                if attempt == 3:
                    raise
                log.warning("outbox: update batch failed (%s); retrying", type(getattr(exc, "orig", exc)).__name__)
                await asyncio.sleep(0.01 * (attempt + 1) * random.uniform(1, 2))


def _hand_over(batch: list[_Update]) -> bool:
    """Run the ``then`` of each hand-over the transaction wrote (once, even if the batch is retried); the caller
    commits right after, in the same step of the event loop. Whether any ran."""
    ran = False
    for item in batch:
        if item.then is not None and item.changed and not item.handed:
            item.handed = ran = True
            try:
                item.then()
            except Exception:
                log.exception("outbox: hand-over callback failed")
    return ran


async def _run_sqlite(conn: Any, statements: list[tuple[str, list[Any], dict[str, _Update]]],
                      batch: list[_Update]) -> None:
    # On the driver's own connection: through SQLAlchemy each statement costs four trips to aiosqlite's thread
    # (cursor, execute, fetch, close) and each trip waits for a turn of a busy event loop; this is one a
    # statement and one for the commit. The pooled connection is checked out, so nothing else uses it meanwhile.
    driver = (await conn.get_raw_connection()).driver_connection
    try:
        for sql, params, items in statements:
            for (followup_id,) in await driver.execute_fetchall(sql, params):
                items[followup_id].changed = True
        if _hand_over(batch):
            # Hand-overs just went out: commit here and now. Until the commit lands a dispatcher killed sends
            # them again, and awaiting aiosqlite's thread lets every ready task run first (milliseconds under
            # load). This blocks the event loop for the commit alone: the transaction holds the write lock
            # already, and a WAL commit without fsync takes tens of microseconds (docs/benchmarks.md). The
            # connection is ours and idle on its thread; the store opens it with check_same_thread=False.
            driver._conn.commit()
        else:
            await driver.commit()
    except BaseException:
        await driver.rollback()
        raise


@dataclass(frozen=True)
class _Backend:
    """How an update statement is written for one database: parameter markers and value conversions."""

    name: str
    dialect: Any

    @functools.cached_property
    def binders(self) -> dict[str, tuple[str, Callable[[Any], Any]]]:
        """Per column: the cast a parameter gets and the conversion its value needs."""
        out = {}
        for column in _F.c:
            impl = column.type.dialect_impl(self.dialect)
            process = impl.bind_processor(self.dialect) or (lambda value: value)
            cast = f"::{column.type.compile(dialect=self.dialect)}" if self.name == "postgresql" else ""
            out[column.name] = (cast, process)
        return out


_SQLITE = _Backend("sqlite", sqlite_dialect())
_POSTGRESQL = _Backend("postgresql", asyncpg_dialect())
MAX_BATCH = 500  # updates a transaction (SQLite takes at most 32,766 parameters a statement)


def _statements(batch: list[_Update], backend: _Backend) -> list[tuple[str, list[Any], dict[str, _Update]]]:
    """As few ``UPDATE .. RETURNING id`` statements as a batch allows, each with its parameters and its updates
    by row id: one for all of them, unless a row is updated more than once (a later update of a row goes to a
    later statement, in the order asked). Each row gets its own values (``CASE id``) under its own condition on
    the state. On PostgreSQL a deadlock with another process's writer is still possible and is retried.

    Written here rather than by SQLAlchemy: compiling these (their shape changes with every batch) cost more
    CPU than the database took to run them."""
    rounds: list[dict[str, _Update]] = []
    for item in batch:
        for round_ in rounds:
            if item.followup_id not in round_:
                round_[item.followup_id] = item
                break
        else:
            rounds.append({item.followup_id: item})
    return [(*_statement(round_, backend), round_) for round_ in rounds]


def _statement(updates: dict[str, _Update], backend: _Backend) -> tuple[str, list[Any]]:
    params: list[Any] = []
    binders = backend.binders

    def bind(column: str, value: Any) -> str:
        cast, process = binders[column]
        params.append(process(value))
        return f"${len(params)}{cast}" if backend.name == "postgresql" else "?"

    ids = sorted(updates)
    by_states: dict[tuple[str, ...], list[str]] = {}
    for i in ids:
        by_states.setdefault(updates[i].states, []).append(i)
    sets = []
    for key in sorted({key for item in updates.values() for key in item.values}):
        setting = [i for i in ids if key in updates[i].values]
        if len(setting) == len(ids) and len({repr(updates[i].values[key]) for i in ids}) == 1:
            sets.append(f"{key} = {bind(key, updates[ids[0]].values[key])}")
        else:
            whens = " ".join(f"WHEN {bind('id', i)} THEN {bind(key, updates[i].values[key])}" for i in setting)
            sets.append(f"{key} = CASE id {whens} ELSE {key} END")
    in_ids = ", ".join(bind("id", i) for i in ids)  # binds in the order of the text: "?" is positional
    where = " OR ".join(f"(id IN ({', '.join(bind('id', i) for i in group)}) "
                        f"AND state IN ({', '.join(bind('state', s) for s in states)}))"
                        for states, group in by_states.items())
    sql = f"UPDATE {_F.name} SET {', '.join(sets)} WHERE id IN ({in_ids}) AND ({where}) RETURNING id"
    return sql, params


class Outbox:
    """Reads and changes follow-ups: enqueue from a web request, list, retry, delivery reports, link opens."""

    def __init__(self, store: InteractionStore, bus: EventBus | None = None) -> None:
        self.store = store
        self.bus = bus
        self.updates = RowUpdates(store)  # shared with the dispatcher: its marks and the reports, one writer

    def _sessions(self) -> Any:
        if self.store.sessions is None:
            raise RuntimeError("the store is not started")
        return self.store.sessions

    async def enqueue(self, prepared: Sequence[Prepared]) -> None:
        """Write follow-ups (and their links) in one transaction of their own."""
        from bridge.store import insert_followups

        async with self._sessions().begin() as session:
            written = await insert_followups(session, [p.followup for p in prepared])
            links = [p.link for p in prepared if p.link is not None and p.id in written]
            if links:
                await session.execute(_L.insert(), links)

    async def list(self, state: str | None = None, limit: int = 50, channel: str | None = None,
                   interaction_id: str | None = None) -> list[FollowUp]:
        query = select(FollowUp).order_by(FollowUp.created_at.desc()).limit(limit)
        if state:
            query = query.where(FollowUp.state == state)
        if channel:
            query = query.where(FollowUp.channel == channel)
        if interaction_id:
            query = query.where(FollowUp.interaction_id == interaction_id)
        async with self._sessions()() as session:
            return list((await session.execute(query)).scalars())

    async def get(self, followup_id: str) -> FollowUp | None:
        async with self._sessions()() as session:
            return await session.get(FollowUp, followup_id)

    async def counts(self) -> dict[str, int]:
        async with self._sessions()() as session:
            rows = await session.execute(select(FollowUp.state, func.count()).group_by(FollowUp.state))
            return {str(state): int(n) for state, n in rows.all()}

    async def blocked_reasons(self, since: dt.datetime | None = None) -> dict[str, int]:
        query = select(FollowUp.reason, func.count()).where(FollowUp.state == S.BLOCKED.value) \
            .group_by(FollowUp.reason)
        if since is not None:
            query = query.where(FollowUp.created_at >= since)
        async with self._sessions()() as session:
            return {str(reason): int(n) for reason, n in (await session.execute(query)).all()}

    async def retry(self, ids: Iterable[str]) -> int:
        """Send dead, failed or uncertain follow-ups again (an operator's decision); returns how many."""
        ids = list(ids)
        async with self._sessions().begin() as session:
            result = await session.execute(
                update(_F).where(_F.c.id.in_(ids), _F.c.state.in_([S.DEAD.value, S.FAILED.value,
                                                                   S.UNCERTAIN.value]))
                .values(state=S.PENDING.value, next_attempt_at=utcnow(), lease_until=None))
        return int(result.rowcount or 0)

    async def delivery_report(self, followup_id: str, status: str, gateway_ref: str | None = None) -> bool:
        """Apply a gateway's report (``accepted``, ``delivered``, ``failed``, ``buffered``); idempotent."""
        now = utcnow()
        changes: dict[str, tuple[list[str], dict[str, Any]]] = {
            "accepted": ([S.SENDING, S.HANDING, S.VERIFYING], {"state": S.SENT.value, "sent_at": now}),
            "buffered": ([S.SENDING, S.HANDING, S.VERIFYING], {"state": S.SENT.value, "sent_at": now}),
            "delivered": ([S.SENDING, S.HANDING, S.VERIFYING, S.SENT, S.PENDING],
                          {"state": S.DELIVERED.value, "delivered_at": now}),
            "failed": ([S.SENDING, S.HANDING, S.VERIFYING, S.SENT], {"state": S.FAILED.value,
                                                                     "reason": "gateway reported a failure"}),
        }
        if status not in changes:
            raise ValueError(f"unknown delivery status {status!r}")
        states, values = changes[status]
        if gateway_ref:
            values = {**values, "gateway_ref": gateway_ref[:128]}
        # Kannel sends two reports a message: group-committed with the others arriving meanwhile.
        changed = await self.updates.submit(followup_id, [S(s) for s in states], {**values, "lease_until": None})
        if changed and self.bus is not None:
            self.bus.publish("followup", id=followup_id, state=values["state"])
        return changed

    async def open_link(self, link_id: str) -> tuple[Link, Interaction | None] | None:
        """Record that a link was opened; returns it with the interaction it came from."""
        now = utcnow()
        async with self._sessions().begin() as session:
            await session.execute(update(_L).where(_L.c.id == link_id)
                                  .values(opens=_L.c.opens + 1,
                                          first_opened_at=func.coalesce(_L.c.first_opened_at, now)))
            link = await session.get(Link, link_id)
            if link is None:
                return None
            interaction = await session.get(Interaction, link.interaction_id) if link.interaction_id else None
        if self.bus is not None:
            self.bus.publish("link-opened", link=link_id, interaction=link.interaction_id, target=link.target)
        return link, interaction


class Dispatcher:
    """Sends due follow-ups through their channel's gateway: claim with a lease, send with bounded concurrency,
    settle with retries and backoff; after a crash, leases expire and the rows are resolved (see module doc)."""

    def __init__(self, outbox: Outbox, gateways: Iterable[Gateway], config: OutboxConfig) -> None:
        self.store = outbox.store
        self.bus = outbox.bus
        self.gateways = {g.channel: g for g in gateways}
        self.config = config
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._sending: set[str] = set()  # ids of the rows whose sends are in flight (their leases are renewed)
        self._updates = outbox.updates
        self._room = asyncio.Event()
        self.sent = 0

    async def start(self) -> None:
        for gateway in self.gateways.values():
            await gateway.start()
        self._task = asyncio.create_task(self._run(), name="outbox-dispatcher")

    async def aclose(self) -> None:
        """Stop claiming, let sends in flight finish (bounded), then close the gateways."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._updates.drain()
        for gateway in self.gateways.values():
            with contextlib.suppress(Exception):
                await gateway.aclose()

    def wake(self) -> None:
        """New follow-ups were written: look now instead of at the next poll."""
        self._wake.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if len(self._inflight) <= self.config.concurrency:
            self._room.set()

    def _sessions(self) -> Any:
        if self.store.sessions is None:
            raise RuntimeError("the store is not started")
        return self.store.sessions

    async def _run(self) -> None:
        last_recover = last_renew = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._sending and loop.time() - last_renew >= self.config.lease / 3:
                    await self._renew()
                    last_renew = loop.time()
                if loop.time() - last_recover >= min(5.0, self.config.poll_interval * 4):
                    await self.recover()
                    last_recover = loop.time()
                # Claim when at most ``concurrency`` sends are in flight, up to twice that: one claim brings a
                # batch, instead of a transaction for every send that finishes.
                room = self.config.concurrency * 2 - len(self._inflight)
                claimed = await self._claim(min(room, self.config.batch))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox: cannot read follow-ups; retrying")
                claimed = []
            for row in claimed:
                task = asyncio.create_task(self._send(row), name=f"followup-{row['id'][:8]}")
                self._inflight.add(task)
                task.add_done_callback(self._done)
            if claimed and len(claimed) >= min(room, self.config.batch):
                if len(self._inflight) > self.config.concurrency:  # more are due: claim again when there is room
                    self._room.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), self.config.lease / 3)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)

    async def _claim(self, limit: int) -> list[dict[str, Any]]:
        if limit <= 0 or not self.gateways:
            return []
        now = utcnow()
        due = (select(_F.c.id).where(_F.c.state == S.PENDING.value, _F.c.next_attempt_at <= now,
                                     _F.c.channel.in_(list(self.gateways)))
               .order_by(_F.c.next_attempt_at).limit(limit))
        if self.store.url.startswith("postgresql"):
            # Another dispatcher's claim is not waited for. MATERIALIZED: PostgreSQL would otherwise re-run the
            # LIMITed subquery once per row of the UPDATE and claim the whole backlog.
            cte = due.with_for_update(skip_locked=True).cte("due").prefix_with("MATERIALIZED")
            ids: Any = select(cte.c.id).scalar_subquery()
        else:
            ids = due.scalar_subquery()
        statement = (update(_F).where(_F.c.id.in_(ids), _F.c.state == S.PENDING.value)
                     .values(state=S.SENDING.value, attempts=_F.c.attempts + 1,
                             lease_until=now + dt.timedelta(seconds=self.config.lease))
                     .returning(_F.c.id, _F.c.idempotency_key, _F.c.channel, _F.c.recipient, _F.c.language,
                                _F.c.payload, _F.c.attempts))
        async with self._sessions().begin() as session:
            rows = (await session.execute(statement)).mappings().all()
        return [dict(r) for r in rows]

    async def _renew(self) -> None:
        """Extend the leases of the rows this dispatcher is still sending (a slow send is not taken back)."""
        until = utcnow() + dt.timedelta(seconds=self.config.lease)
        async with self._sessions().begin() as session:
            await session.execute(update(_F).where(_F.c.id.in_(list(self._sending)),
                                                   _F.c.state.in_([S.SENDING.value, S.HANDING.value]))
                                  .values(lease_until=until))

    async def recover(self) -> None:
        """Take back what dispatchers that died left behind (leases expired), as the module doc says."""
        now = utcnow()
        async with self._sessions().begin() as session:
            await session.execute(update(_F).where(_F.c.state == S.SENDING.value, _F.c.lease_until < now)
                                  .values(state=S.PENDING.value, next_attempt_at=now, lease_until=None))
            for channel, gateway in self.gateways.items():
                expired = (_F.c.state == S.HANDING.value, _F.c.lease_until < now, _F.c.channel == channel)
                if gateway.interrupted == "sent":
                    values: dict[str, Any] = {"state": S.SENT.value, "sent_at": now,
                                              "reason": "dispatcher stopped right after handing it over"}
                elif gateway.interrupted == "verify":
                    values = {"state": S.VERIFYING.value,
                              "next_attempt_at": now + dt.timedelta(seconds=self.config.verify_timeout)}
                else:
                    values = {"state": S.UNCERTAIN.value,
                              "reason": "dispatcher stopped while handing it over; the gateway cannot tell"}
                result = await session.execute(update(_F).where(*expired).values(lease_until=None, **values))
                if result.rowcount:
                    log.warning("outbox: %d %s follow-up(s) interrupted while being handed over -> %s",
                                result.rowcount, channel, values["state"])
            # no delivery report within verify_timeout: the gateway never took it, send again
            await session.execute(update(_F).where(_F.c.state == S.VERIFYING.value, _F.c.next_attempt_at <= now)
                                  .values(state=S.PENDING.value, next_attempt_at=now))

    async def _send(self, row: dict[str, Any]) -> None:
        self._sending.add(row["id"])
        try:
            await self._send_one(row)
        finally:
            self._sending.discard(row["id"])

    async def _send_one(self, row: dict[str, Any]) -> None:
        gateway = self.gateways[row["channel"]]
        message = Outgoing(row["id"], row["idempotency_key"], row["channel"], row["recipient"], row["language"],
                           row["payload"])
        handed = False

        async def handing(then: Callable[[], None] | None = None) -> None:
            nonlocal handed
            if handed:
                if then is not None:
                    then()
                return
            if not await self._mark(row["id"], [S.SENDING], {"state": S.HANDING.value}, then):
                raise RuntimeError("follow-up is no longer ours (lease lost)")
            handed = True

        try:
            result = await gateway.send(message, handing)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a gateway bug must not lose the row: settle it like the gateway failed
            log.exception("outbox: %s gateway raised for %s", row["channel"], row["id"])
            result = SendResult("unknown" if handed else "retry", error=f"{type(exc).__name__}: {exc}")
        try:
            await self._settle(row, result, handed)
        except Exception:  # the row keeps its state; the lease brings it back (see recover)
            log.exception("outbox: could not record the result of %s (%s)", row["id"][:8], result.status)

    def _backoff(self, attempts: int) -> float:
        delay = min(self.config.backoff_max, self.config.backoff_base * 2 ** max(0, attempts - 1))
        return delay * random.uniform(0.8, 1.2)

    async def _settle(self, row: dict[str, Any], result: SendResult, handed: bool) -> None:
        now = utcnow()
        mine = [S.SENDING, S.HANDING]
        status = result.status
        if status == "unknown" and not handed:
            status = "retry"  # it never left
        if status in ("sent", "delivered"):
            values: dict[str, Any] = {"state": S.SENT.value if status == "sent" else S.DELIVERED.value,
                                      "sent_at": now, "gateway_ref": (result.gateway_ref or "")[:128] or None,
                                      "reason": None}
            if status == "delivered":
                values["delivered_at"] = now
            self.sent += 1
        elif status == "failed":
            values = {"state": S.FAILED.value, "reason": result.error or "refused by the gateway"}
        elif status == "retry":
            if row["attempts"] >= self.config.max_attempts:
                values = {"state": S.DEAD.value, "reason": f"gave up after {row['attempts']} attempts: "
                                                           f"{result.error or 'gateway unavailable'}"}
            else:
                delay = result.retry_after if result.retry_after is not None else self._backoff(row["attempts"])
                values = {"state": S.PENDING.value, "reason": result.error,
                          "next_attempt_at": now + dt.timedelta(seconds=delay)}
        else:  # unknown after handing over
            interrupted = self.gateways[row["channel"]].interrupted
            if interrupted == "verify":
                values = {"state": S.VERIFYING.value, "reason": result.error,
                          "next_attempt_at": now + dt.timedelta(seconds=self.config.verify_timeout)}
            elif interrupted == "sent":
                values = {"state": S.SENT.value, "sent_at": now, "reason": f"unconfirmed: {result.error}"}
            else:
                values = {"state": S.UNCERTAIN.value, "reason": result.error}
        values["lease_until"] = None
        changed = await self._mark(row["id"], mine, values)
        if changed and self.bus is not None:
            self.bus.publish("followup", id=row["id"], channel=row["channel"], state=values["state"])
        if values["state"] in (S.DEAD.value, S.FAILED.value, S.UNCERTAIN.value):
            log.warning("follow-up %s by %s: %s (%s)", row["id"][:8], row["channel"], values["state"],
                        values.get("reason"))

    async def _mark(self, followup_id: str, states: list[FollowUpState], values: dict[str, Any],
                    then: Callable[[], None] | None = None) -> bool:
        """Change a row if it is still in one of ``states`` (group-committed, see :class:`RowUpdates`)."""
        return await asyncio.shield(self._updates.submit(followup_id, states, values, then))
