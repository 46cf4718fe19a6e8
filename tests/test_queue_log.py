"""The router's change stream written to the database (bridge/queue_log.py) on SQLite and PostgreSQL with a real
Redis: every change once and in order, a reader that died before acknowledging, the stream trimmed behind."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from bridge.config import RouterConfig
from bridge.models import QueueEvent
from bridge.queue_log import GROUP, QueueLog, event_row
from bridge.router import Router
from bridge.store import InteractionStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def config() -> RouterConfig:
    return RouterConfig(key_prefix=f"t:{{ql-{uuid.uuid4().hex[:12]}}}:", offer_timeout=0.3, wrapup_seconds=0.2,
                        tick_interval=0.05)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def events(store: InteractionStore) -> list[QueueEvent]:
    assert store.sessions is not None
    async with store.sessions() as session:
        return list((await session.execute(select(QueueEvent).order_by(QueueEvent.id))).scalars())


async def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if result := await check():
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_every_router_change_reaches_the_database_once_and_in_order(
        store: InteractionStore, config: RouterConfig, redis_url: str, redis: aioredis.Redis) -> None:
    router = Router(redis_url, config)
    recorder = QueueLog(redis_url, config, store, block=0.1)
    await router.start()
    await recorder.start()
    try:
        await router.login("ann", ["billing"])
        await router.set_presence("ann", "available")
        await router.enqueue("call-1", "voice", "billing", priority=2)
        await until(lambda: _state(router, "call-1", "offered"), "the offer")
        assert await router.accept("call-1", "ann")
        await router.finish("call-1")                       # ann wraps up, then is available again
        await router.enqueue("chat-1", "web", "billing")    # offered to ann, not taken in time
        await until(lambda: _state(router, "chat-1", "queued", offers=1), "the offer to time out")
        await router.finish("chat-1")                       # the visitor left while waiting
        rows = await until(lambda: _count(store, 13), "13 events in the database")
    finally:
        await recorder.aclose()
        await router.aclose()

    by_interaction = {i: [(e.kind, e.agent, e.detail) for e in rows if e.interaction_id == i]
                      for i in ("call-1", "chat-1")}
    assert by_interaction["call-1"] == [("joined", None, "voice billing 2"), ("offered", "ann", "1"),
                                        ("accepted", "ann", ""), ("left", "ann", "active")]
    assert by_interaction["chat-1"] == [("joined", None, "web billing 0"), ("offered", "ann", "1"),
                                        ("requeued", "ann", "offer timed out"), ("left", None, "queued")]
    assert [(e.kind, e.detail) for e in rows if e.interaction_id is None] == [
        ("login", ",billing,"), ("presence", "available"), ("presence", "wrapup"), ("presence", "available"),
        ("presence", "away")]
    assert [e.id for e in rows] == sorted((e.id for e in rows), key=lambda i: tuple(map(int, i.split("-"))))
    assert all(rows[i].at <= rows[i + 1].at for i in range(len(rows) - 1))
    # written and acknowledged: the stream keeps at most the last entry it delivered
    assert await redis.xlen(config.key_prefix + "log") <= 1
    assert (await redis.xpending(config.key_prefix + "log", GROUP))["pending"] == 0


async def test_what_a_reader_took_and_never_acknowledged_is_written_by_another_without_duplicates(
        store: InteractionStore, config: RouterConfig, redis_url: str, redis: aioredis.Redis) -> None:
    router = Router(redis_url, config)  # not started: no offers, only what is asked here
    dead = QueueLog(redis_url, config, store, consumer="dead", block=0.1)
    await dead.start()
    await dead.aclose()  # the group exists; "dead" reads by hand below and dies before acknowledging
    dead = QueueLog(redis_url, config, store, consumer="dead", block=0.1)
    for n in range(30):
        await router.enqueue(f"web-{n}", "web", "sales")
    taken = await dead.read()
    assert len(taken) == 30
    await dead.write(taken[:10])  # committed ten, then died: no XACK
    await router.enqueue("web-30", "web", "sales")
    survivor = QueueLog(redis_url, config, store, consumer="survivor", claim_after=0.3, block=0.1)
    await survivor.start()
    try:
        rows = await until(lambda: _count(store, 31), "all 31 entries in the database")
        await until(lambda: _no_pending(redis, config), "nothing pending")
    finally:
        await survivor.aclose()
        await dead.aclose()
        await router.aclose()
    assert sorted(e.interaction_id or "" for e in rows) == sorted(f"web-{n}" for n in range(31))
    assert survivor.written == 31  # 30 claimed (10 of them written before: skipped by the database) + 1 new


def test_a_malformed_entry_is_refused_not_written() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        event_row("1-0", {"kind": "drop table", "at": "1"})
    row = event_row("1700000000000-3", {"kind": "left", "interaction": "c", "agent": "", "detail": "x" * 900})
    assert row["agent"] is None and len(row["detail"]) == 256 and row["at"].year == 2023


async def _state(router: Router, interaction: str, state: str, offers: int | None = None) -> bool:
    record = await router.interaction(interaction)
    return record.get("state") == state and (offers is None or int(record.get("offers", 0)) >= offers)


async def _count(store: InteractionStore, n: int) -> list[QueueEvent] | None:
    rows = await events(store)
    assert len(rows) <= n, [(e.kind, e.interaction_id, e.agent) for e in rows]
    return rows if len(rows) == n else None


async def _no_pending(redis: aioredis.Redis, config: RouterConfig) -> bool:
    return (await redis.xpending(config.key_prefix + "log", GROUP))["pending"] == 0
