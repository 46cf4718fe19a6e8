"""The outbox dispatcher on SQLite and PostgreSQL with a scripted gateway: states, retries, dead letters,
recovery after a dispatcher died, two dispatchers sharing one database, idempotency keys, delivery reports.

The real gateways (Kannel, SMTP) and a dispatcher killed with SIGKILL are in test_outbox_real.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import create_async_engine

from bridge import outbox as outbox_module
from bridge.config import OutboxConfig
from bridge.models import FollowUp, FollowUpState, new_id, utcnow
from bridge.outbox import Dispatcher, Handing, Interrupted, Outbox, Outgoing, SendResult
from bridge.store import InteractionStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
S = FollowUpState


class ScriptedGateway:
    """Answers each send from ``script(message, attempt)``; records what it was given and when it handed over."""

    def __init__(self, channel: str = "sms", interrupted: Interrupted = "verify",
                 script: Callable[[Outgoing, int], Awaitable[SendResult] | SendResult] | None = None,
                 hand: bool = True) -> None:
        self.channel = channel
        self.interrupted = interrupted
        self.script = script
        self.hand = hand
        self.taken: list[str] = []
        self.attempts: Counter[str] = Counter()

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def send(self, message: Outgoing, handing: Handing) -> SendResult:
        self.attempts[message.followup_id] += 1
        result: Any = SendResult("sent", gateway_ref=f"ref-{message.followup_id[:6]}")
        if self.script is not None:
            result = self.script(message, self.attempts[message.followup_id])
            if asyncio.iscoroutine(result):
                result = await result
        if self.hand and result.status in ("sent", "delivered", "unknown"):
            await handing()
        if result.status in ("sent", "delivered"):
            self.taken.append(message.followup_id)
        return result


def row(key: str | None = None, channel: str = "sms", **extra: Any) -> dict[str, Any]:
    now = utcnow()
    return {"id": new_id(), "idempotency_key": key or new_id(), "interaction_id": None, "channel": channel,
            "recipient": "+8613800138000", "purpose": "test", "template": "article_link", "article_id": None,
            "language": "en", "payload": {"text": "hello"}, "state": S.PENDING.value, "reason": None,
            "attempts": 0, "next_attempt_at": now, "created_at": now, **extra}


def fast(**overrides: Any) -> OutboxConfig:
    return OutboxConfig(**{"poll_interval": 0.05, "backoff_base": 0.02, "backoff_max": 0.1, "lease": 30.0,
                           "verify_timeout": 0.3, "max_attempts": 3, **overrides})


async def enqueue(store: InteractionStore, rows: list[dict[str, Any]]) -> None:
    from bridge.followups import Prepared

    await Outbox(store).enqueue([Prepared(r, None) for r in rows])


async def states(store: InteractionStore) -> dict[str, str]:
    assert store.sessions is not None
    async with store.sessions() as session:
        return {f.id: f.state for f in (await session.execute(select(FollowUp))).scalars()}


async def until(store: InteractionStore, check: Callable[[dict[str, str]], bool], timeout: float = 10) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        current = await states(store)
        if check(current):
            return current
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"outbox did not settle: {Counter(current.values())}")
        await asyncio.sleep(0.05)


async def test_pending_follow_ups_are_sent_once_and_marked_sent(store: InteractionStore) -> None:
    gateway = ScriptedGateway()
    rows = [row() for _ in range(50)]
    await enqueue(store, rows)
    dispatcher = Dispatcher(Outbox(store), [gateway], fast())
    await dispatcher.start()
    try:
        final = await until(store, lambda s: all(v == S.SENT for v in s.values()))
    finally:
        await dispatcher.aclose()
    assert sorted(gateway.taken) == sorted(r["id"] for r in rows)
    assert len(final) == 50
    record = await Outbox(store).get(rows[0]["id"])
    assert record is not None and record.attempts == 1 and record.gateway_ref == f"ref-{rows[0]['id'][:6]}"


async def test_the_same_idempotency_key_is_stored_once(store: InteractionStore) -> None:
    await enqueue(store, [row("call-1:article_link:returns")])
    await enqueue(store, [row("call-1:article_link:returns"), row("call-1:survey:-")])
    assert len(await states(store)) == 2


async def test_a_gateway_that_is_down_is_retried_with_backoff_until_it_returns(store: InteractionStore) -> None:
    down = {"on": True}
    gateway = ScriptedGateway(script=lambda m, n: SendResult("retry", error="connection refused") if down["on"]
                              else SendResult("sent"))
    rows = [row() for _ in range(5)]
    await enqueue(store, rows)
    dispatcher = Dispatcher(Outbox(store), [gateway], fast(max_attempts=50))
    await dispatcher.start()
    try:
        await asyncio.sleep(0.4)
        assert all(gateway.attempts[r["id"]] >= 2 for r in rows)
        assert set((await states(store)).values()) <= {S.PENDING, S.SENDING}  # retried, never given up
        down["on"] = False
        await until(store, lambda s: all(v == S.SENT for v in s.values()))
    finally:
        await dispatcher.aclose()
    assert Counter(gateway.taken) == Counter({r["id"]: 1 for r in rows})


async def test_out_of_attempts_is_a_dead_letter_that_an_operator_can_retry(store: InteractionStore) -> None:
    broken = {"on": True}
    gateway = ScriptedGateway(script=lambda m, n: SendResult("retry", error="503") if broken["on"]
                              else SendResult("sent"))
    record = row()
    await enqueue(store, [record])
    dispatcher = Dispatcher(Outbox(store), [gateway], fast(max_attempts=3))
    await dispatcher.start()
    try:
        await until(store, lambda s: s[record["id"]] == S.DEAD)
        assert gateway.attempts[record["id"]] == 3
        dead = await Outbox(store).get(record["id"])
        assert dead is not None and "gave up after 3 attempts: 503" in (dead.reason or "")
        broken["on"] = False
        assert await Outbox(store).retry([record["id"]]) == 1
        dispatcher.wake()
        await until(store, lambda s: s[record["id"]] == S.SENT)
    finally:
        await dispatcher.aclose()


async def test_a_refused_follow_up_fails_without_retrying(store: InteractionStore) -> None:
    gateway = ScriptedGateway(script=lambda m, n: SendResult("failed", error="unknown subscriber"))
    record = row()
    await enqueue(store, [record])
    dispatcher = Dispatcher(Outbox(store), [gateway], fast())
    await dispatcher.start()
    try:
        await until(store, lambda s: s[record["id"]] == S.FAILED)
        await asyncio.sleep(0.2)
    finally:
        await dispatcher.aclose()
    assert gateway.attempts[record["id"]] == 1
    failed = await Outbox(store).get(record["id"])
    assert failed is not None and failed.reason == "unknown subscriber"


async def test_an_sms_that_may_have_left_waits_for_its_report_and_is_resent_only_without_one(
        store: InteractionStore) -> None:
    gateway = ScriptedGateway(script=lambda m, n: SendResult("unknown", error="read timeout") if n == 1
                              else SendResult("sent"))
    reported, silent = row(), row()
    await enqueue(store, [reported, silent])
    # verify_timeout: room for the report on a loaded machine (it must come before the row is sent again)
    dispatcher = Dispatcher(Outbox(store), [gateway], fast(verify_timeout=2.0))
    await dispatcher.start()
    try:
        await until(store, lambda s: s[reported["id"]] == S.VERIFYING and s[silent["id"]] == S.VERIFYING)
        assert await Outbox(store).delivery_report(reported["id"], "accepted", "kannel-1")
        await until(store, lambda s: s[silent["id"]] == S.SENT, timeout=10)
        await asyncio.sleep(0.3)
    finally:
        await dispatcher.aclose()
    assert gateway.attempts[reported["id"]] == 1, "a reported SMS must not be sent again"
    assert gateway.attempts[silent["id"]] == 2
    assert (await states(store))[reported["id"]] == S.SENT


@pytest.mark.parametrize(("interrupted", "expected"), [("sent", S.SENT), ("verify", S.VERIFYING),
                                                       ("uncertain", S.UNCERTAIN)])
async def test_rows_left_by_a_dead_dispatcher_are_resolved_by_where_they_stopped(
        store: InteractionStore, interrupted: Interrupted, expected: FollowUpState) -> None:
    before, during = row(), row()
    await enqueue(store, [before, during])
    past = utcnow() - dt.timedelta(seconds=1)
    assert store.sessions is not None
    async with store.sessions.begin() as session:  # as a dispatcher that died would have left them
        await session.execute(update(FollowUp).where(FollowUp.id == before["id"])
                              .values(state=S.SENDING.value, attempts=1, lease_until=past))
        await session.execute(update(FollowUp).where(FollowUp.id == during["id"])
                              .values(state=S.HANDING.value, attempts=1, lease_until=past))
    gateway = ScriptedGateway(interrupted=interrupted)
    dispatcher = Dispatcher(Outbox(store), [gateway], fast(verify_timeout=30))
    await dispatcher.start()
    try:
        final = await until(store, lambda s: s[before["id"]] == S.SENT and s[during["id"]] == expected)
    finally:
        await dispatcher.aclose()
    assert gateway.taken == [before["id"]], "only the one that never reached the gateway is sent again"
    assert final[during["id"]] == expected


async def test_two_dispatchers_on_one_database_never_send_one_follow_up_twice(store: InteractionStore) -> None:
    async def slow(message: Outgoing, attempt: int) -> SendResult:
        await asyncio.sleep(0.002)
        return SendResult("sent")

    gateway_a, gateway_b = ScriptedGateway(script=slow), ScriptedGateway(script=slow)
    rows = [row() for _ in range(400)]
    other = InteractionStore(store.url)  # the second process's own connections
    await other.start()
    a = Dispatcher(Outbox(store), [gateway_a], fast(concurrency=8, batch=20))
    b = Dispatcher(Outbox(other), [gateway_b], fast(concurrency=8, batch=20))
    await a.start()
    await b.start()
    try:
        for i in range(0, 400, 100):
            await enqueue(store, rows[i:i + 100])
            a.wake()
            b.wake()
        await until(store, lambda s: len(s) == 400 and all(v == S.SENT for v in s.values()), timeout=30)
    finally:
        await a.aclose()
        await b.aclose()
        await other.aclose()
    taken = Counter(gateway_a.taken + gateway_b.taken)
    assert set(taken.values()) == {1} and len(taken) == 400
    assert gateway_a.taken and gateway_b.taken, "both dispatchers took part"


async def test_delivery_reports_are_idempotent_and_checked(store: InteractionStore) -> None:
    record = row(state=S.SENT.value)
    await enqueue(store, [record])
    outbox = Outbox(store)
    assert await outbox.delivery_report(record["id"], "delivered", "r1")
    assert not await outbox.delivery_report(record["id"], "delivered", "r1")
    assert not await outbox.delivery_report(record["id"], "failed")  # a late failure does not undo delivery
    assert (await states(store))[record["id"]] == S.DELIVERED
    with pytest.raises(ValueError, match="unknown delivery status"):
        await outbox.delivery_report(record["id"], "exploded")
    assert not await outbox.delivery_report(new_id(), "delivered")


async def test_concurrent_reports_share_one_transaction_but_keep_each_rows_own_values(
        store: InteractionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [row(state=S.SENT.value) for _ in range(30)]
    waiting = row(state=S.VERIFYING.value)
    await enqueue(store, [*records, waiting])
    outbox = Outbox(store)
    transactions: list[int] = []  # statements in each

    def statements(batch: list[Any], backend: Any) -> list[Any]:
        made = write_statements(batch, backend)
        transactions.append(len(made))
        return made

    write_statements = outbox_module._statements
    monkeypatch.setattr(outbox_module, "_statements", statements)
    # every row twice in one batch (Kannel reports "accepted" and "delivered"), the "accepted" no longer
    # applying once "delivered" is in; one row is reported twice with the same status
    changed = await asyncio.gather(
        *(outbox.delivery_report(r["id"], "delivered", f"ref-{i}") for i, r in enumerate(records)),
        *(outbox.delivery_report(r["id"], "accepted", f"acc-{i}") for i, r in enumerate(records)),
        outbox.delivery_report(records[0]["id"], "delivered", "ref-again"),
        # two updates of one row in one batch, both applying (in the order asked), both say so
        outbox.updates.submit(waiting["id"], [S.VERIFYING], {"state": S.SENT.value}),
        outbox.updates.submit(waiting["id"], [S.SENT], {"state": S.DELIVERED.value, "reason": "w"}))
    assert changed == [True] * 30 + [False] * 31 + [True, True]
    assert transactions == [3], "one transaction; one statement a round of updates of a row"
    assert store.sessions is not None
    async with store.sessions() as session:
        stored = {f.id: f for f in (await session.execute(select(FollowUp))).scalars()}
    assert stored[waiting["id"]].state == S.DELIVERED
    for i, record in enumerate(records):
        assert stored[record["id"]].state == S.DELIVERED
        assert stored[record["id"]].gateway_ref == f"ref-{i}"
        assert stored[record["id"]].delivered_at is not None


def committed_state(url: str, followup_id: str) -> str:
    """The row's state as another connection sees it; from a thread, so a synchronous caller can ask."""
    async def read() -> str:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return str((await conn.execute(select(FollowUp.state).where(FollowUp.id == followup_id))).scalar())
        finally:
            await engine.dispose()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result(timeout=10)


async def test_a_hand_over_runs_its_then_before_the_commit_and_only_when_the_row_changed(
        store: InteractionStore, db_url: str) -> None:
    record = row(state=S.SENDING.value)
    await enqueue(store, [record])
    updates = Outbox(store).updates
    seen: list[str] = []  # the committed state when ``then`` ran (SMTP writes its final dot there)

    def then() -> None:
        seen.append(committed_state(db_url, record["id"]))

    assert await updates.submit(record["id"], [S.SENDING], {"state": S.HANDING.value}, then)
    assert seen == [S.SENDING.value], "the dot goes out before 'handing' is committed, never after"
    assert (await states(store))[record["id"]] == S.HANDING.value
    assert not await updates.submit(record["id"], [S.SENDING], {"state": S.HANDING.value}, then)
    assert len(seen) == 1, "no hand-over for a row that is no longer ours"


async def test_a_hand_over_whose_commit_failed_is_retried_without_running_then_again(
        store: InteractionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [row(state=S.SENDING.value) for _ in range(3)]
    await enqueue(store, records)
    updates = Outbox(store).updates
    failures = [sqlite3.OperationalError("database is locked")]
    hand_over = outbox_module._hand_over

    def failing_once(batch: list[Any]) -> bool:
        ran = hand_over(batch)
        if failures:
            raise failures.pop()
        return ran

    monkeypatch.setattr(outbox_module, "_hand_over", failing_once)
    dots: Counter[str] = Counter()
    changed = await asyncio.gather(*(
        updates.submit(r["id"], [S.SENDING], {"state": S.HANDING.value}, lambda i=r["id"]: dots.update([i]))
        for r in records))
    assert not failures, "the first commit failed"
    assert changed == [True] * 3
    assert dots == Counter(r["id"] for r in records), "each message went out once"
    assert set((await states(store)).values()) == {S.HANDING.value}


async def test_a_channel_without_a_gateway_here_is_left_for_another_process(store: InteractionStore) -> None:
    mail = row(channel="email")
    await enqueue(store, [mail])
    dispatcher = Dispatcher(Outbox(store), [ScriptedGateway(channel="sms")], fast())
    await dispatcher.start()
    try:
        await asyncio.sleep(0.3)
    finally:
        await dispatcher.aclose()
    assert (await states(store))[mail["id"]] == S.PENDING


async def test_a_send_slower_than_the_lease_is_not_taken_back_by_another_dispatcher(
        store: InteractionStore) -> None:
    async def slow(message: Outgoing, attempt: int) -> SendResult:
        await asyncio.sleep(1.5)
        return SendResult("sent")

    record = row()
    await enqueue(store, [record])
    busy, other = ScriptedGateway(script=slow), ScriptedGateway()
    a = Dispatcher(Outbox(store), [busy], fast(lease=0.6, poll_interval=0.05))
    await a.start()
    await until(store, lambda s: s[record["id"]] in (S.SENDING, S.HANDING))
    b = Dispatcher(Outbox(store), [other], fast(lease=0.6, poll_interval=0.05))
    await b.start()
    try:
        await until(store, lambda s: s[record["id"]] == S.SENT)
    finally:
        await a.aclose()
        await b.aclose()
    assert (busy.taken, other.taken) == ([record["id"]], [])
