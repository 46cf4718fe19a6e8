"""The unified queue against a real Redis: the offer rule, capacities per channel, the rule across channels,
offer timeouts, wrap-up, abandonment, bad input, a Redis restart with AOF, and two processes assigning at once."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from bridge import db
from bridge.config import PROJECT_DIR, RouterConfig
from bridge.models import QueueEvent
from bridge.queue_log import GROUP, QueueLog
from bridge.router import Router, RouterError, Snapshot
from bridge.store import InteractionStore
from tests.conftest import _free_port, _redis_ping

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def config(**overrides: Any) -> RouterConfig:
    return RouterConfig(key_prefix=f"t:{{router-{uuid.uuid4().hex[:12]}}}:", **overrides)


@pytest.fixture
async def router(redis_url: str) -> AsyncIterator[Router]:
    router = Router(redis_url, config(offer_timeout=0.4, wrapup_seconds=0.3))
    yield router
    await router.aclose()


async def agent(router: Router, name: str, skills: list[str], **caps: int) -> None:
    await router.login(name, skills, **caps)
    assert await router.set_presence(name, "available")


def offered(offers: list[Any]) -> list[tuple[str, str]]:
    return [(o.interaction, o.agent) for o in offers]


async def test_the_oldest_interaction_goes_to_the_most_idle_agent_with_its_skill(router: Router) -> None:
    await agent(router, "ann", ["billing"])
    await agent(router, "bob", ["billing", "tech"])
    await router.enqueue("c1", "web", "tech")
    await router.enqueue("c2", "web", "billing")
    # c1 is the oldest and only bob has its skill; then ann holds nothing, bob one
    assert offered(await router.assign()) == [("c1", "bob"), ("c2", "ann")]
    await asyncio.sleep(0.01)
    await router.enqueue("c3", "web", "billing")
    await asyncio.sleep(0.01)
    await router.enqueue("c4", "web", "billing")
    await router.finish("c2")
    # ann holds nothing now: c3 is hers; then both hold one and bob has waited longer since his last offer
    assert offered(await router.assign()) == [("c3", "ann"), ("c4", "bob")]


async def test_higher_priority_goes_before_an_older_interaction(router: Router) -> None:
    await router.enqueue("old", "web", "sales")
    await router.enqueue("vip", "web", "sales", priority=5)
    await agent(router, "ann", ["sales"], chat=1)
    assert offered(await router.assign()) == [("vip", "ann")]


async def test_an_agent_gets_one_call_and_four_chats_at_most_and_a_fifth_chat_waits(router: Router) -> None:
    await agent(router, "ann", ["help"])
    for i in range(5):
        await router.enqueue(f"chat{i}", "web", "help")
    assert len(await router.assign()) == 4
    snap = await router.snapshot()
    assert snap.queue == ["chat4"] and snap.agents["ann"].chat == 4
    await router.finish("chat0")
    assert offered(await router.assign()) == [("chat4", "ann")]


async def test_a_call_blocks_new_chats_while_chats_in_progress_continue(redis_url: str) -> None:
    for blocks in (True, False):
        router = Router(redis_url, config(call_blocks_chats=blocks))
        try:
            await agent(router, "ann", ["help"])
            await router.enqueue("chat1", "web", "help")
            await router.assign()
            await router.enqueue("call", "voice", "help")
            assert offered(await router.assign()) == [("call", "ann")], "a call is offered beside a chat"
            await router.enqueue("chat2", "wechat", "help")
            assert offered(await router.assign()) == ([] if blocks else [("chat2", "ann")])
            await router.finish("call")  # no wrap-up: never accepted
            if blocks:
                assert offered(await router.assign()) == [("chat2", "ann")]
        finally:
            await router.aclose()


async def test_an_offer_not_accepted_in_time_returns_to_the_head_and_the_agent_goes_away(router: Router) -> None:
    await agent(router, "ann", ["help"], chat=1)
    await agent(router, "bob", ["help"], chat=1)
    await router.enqueue("first", "web", "help")
    [offer] = await router.assign(most=1)
    await router.enqueue("second", "web", "help")
    await asyncio.sleep(0.5)
    await router.tick()
    snap = await router.snapshot()
    assert snap.queue == ["first", "second"], "back at the head, before the newer one"
    assert snap.agents[offer.agent].presence == "away" and snap.agents[offer.agent].chat == 0
    assert not await router.accept("first", offer.agent), "a late accept is refused"
    [again] = await router.assign()  # the other agent; the one away gets nothing
    assert again.interaction == "first" and again.agent != offer.agent and again.number == 2


async def test_an_accepted_call_ends_in_wrapup_then_the_agent_is_available_again(router: Router) -> None:
    await agent(router, "ann", ["help"])
    await router.enqueue("call", "voice", "help")
    assert offered(await router.assign()) == [("call", "ann")]
    assert await router.accept("call", "ann")
    assert not await router.accept("call", "ann"), "accepting twice changes nothing"
    assert await router.finish("call") == ("active", "ann")
    snap = await router.snapshot()
    assert snap.agents["ann"].presence == "wrapup" and snap.agents["ann"].voice == 0
    await router.enqueue("next", "voice", "help")
    assert await router.assign() == [], "no offer during wrap-up"
    await asyncio.sleep(0.35)
    await router.tick()
    assert offered(await router.assign()) == [("next", "ann")]


async def test_a_caller_who_hangs_up_while_waiting_is_abandoned_and_forgotten(router: Router) -> None:
    await router.enqueue("call", "voice", "help")
    assert await router.finish("call") == ("queued", None)
    assert await router.finish("call") == ("", None), "a second hang-up event changes nothing"
    snap = await router.snapshot()
    assert snap.queue == [] and snap.interactions == {}


async def test_a_declined_offer_goes_back_and_a_requeue_by_another_agent_is_refused(router: Router) -> None:
    await agent(router, "ann", ["help"])
    await router.enqueue("chat", "web", "help")
    await router.assign()
    assert not await router.requeue("chat", "bob")
    assert await router.requeue("chat", "ann", reason="agent phone did not answer")
    assert (await router.snapshot()).queue == ["chat"]


async def test_enqueueing_twice_queues_once(router: Router) -> None:
    assert await router.enqueue("chat", "web", "help")
    assert not await router.enqueue("chat", "web", "help")
    assert (await router.snapshot()).queue == ["chat"]


async def test_an_agent_cannot_go_offline_with_interactions_in_hand(router: Router) -> None:
    await agent(router, "ann", ["help"])
    await router.enqueue("chat", "web", "help")
    await router.assign()
    with pytest.raises(RouterError, match="in hand"):
        await router.set_presence("ann", "offline")
    await router.finish("chat")
    assert await router.set_presence("ann", "offline")
    assert "ann" not in (await router.snapshot()).agents


@pytest.mark.parametrize(("call", "message"), [
    (lambda r: r.enqueue("bad id\r\n", "web", "help"), "interaction id"),
    (lambda r: r.enqueue("x", "fax", "help"), "unknown channel"),
    (lambda r: r.enqueue("x", "web", "he lp"), "skill"),
    (lambda r: r.enqueue("x", "web", "help", priority=10), "priority"),
    (lambda r: r.set_presence("ann", "busy"), "presence"),
    (lambda r: r.login("ann", ["help"], chat=11), "capacities"),
    (lambda r: r.accept("x" * 65, "ann"), "interaction id"),
])
async def test_bad_requests_are_refused_with_a_reason_and_change_nothing(
        router: Router, call: Any, message: str) -> None:
    with pytest.raises(RouterError, match=message):
        await call(router)
    snap = await router.snapshot()
    assert snap.queue == [] and snap.interactions == {} and snap.agents == {}


async def test_the_live_state_survives_a_restart_of_redis_with_aof(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    assert binary is not None
    port = _free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
               "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"]
    cfg = config()
    url = f"redis://127.0.0.1:{port}/0"
    for restart in (False, True):
        proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not _redis_ping(port):
                assert time.monotonic() < deadline and proc.returncode is None, "redis-server did not start"
                await asyncio.sleep(0.05)
            router = Router(url, cfg)
            if not restart:
                await agent(router, "ann", ["help"])
                await router.enqueue("chat1", "web", "help")
                await router.enqueue("chat2", "web", "help")
                await router.assign(most=1)
                before = await router.snapshot()
            else:
                after = await router.snapshot()
                assert after.queue == before.queue == ["chat2"]
                assert after.interactions["chat1"].agent == "ann" and after.agents["ann"].chat == 1
            await router.aclose()
        finally:
            proc.kill()  # SIGKILL: only what the append-only file holds comes back
            await proc.wait()


def check_invariants(snap: Snapshot) -> None:
    held: Counter[tuple[str, str]] = Counter()
    for item in snap.interactions.values():
        if item.state == "queued":
            assert item.interaction in snap.queue and item.agent is None
        else:
            assert item.state in ("offered", "active") and item.agent, item
            assert item.interaction not in snap.queue
            held[(item.agent, "voice" if item.channel == "voice" else "chat")] += 1
    assert len(snap.queue) == len(set(snap.queue)) and set(snap.queue) <= set(snap.interactions)
    room = {name for name, a in snap.agents.items()
            if a.presence == "available" and (a.voice < a.cap_voice or a.chat < a.cap_chat)}
    assert snap.ready == room, f"ready {sorted(snap.ready)} != available with room {sorted(room)}"
    for name, state in snap.agents.items():
        assert state.voice == held[(name, "voice")], f"{name}: voice count {state.voice} != {held}"
        assert state.chat == held[(name, "chat")], f"{name}: chat count {state.chat} != {held}"
        assert state.voice <= state.cap_voice and state.chat <= state.cap_chat, state


def replay(events: list[QueueEvent], caps: dict[str, dict[str, int]]) -> dict[str, tuple[str, str | None]]:
    """Re-run the database's record of the queue, checking every step: an offer only of a waiting interaction,
    an accept only by the agent offered, no agent above a capacity at any moment. Returns what is still live
    (interaction -> state, agent)."""
    live: dict[str, tuple[str, str | None]] = {}
    channel: dict[str, str] = {}
    load: Counter[tuple[str, str]] = Counter()
    for e in events:
        where = f"event {e.id} {e.kind} {e.interaction_id} {e.agent} {e.detail}"
        if e.kind in ("login", "presence"):
            continue
        assert e.interaction_id is not None, where
        iid, state = e.interaction_id, live.get(e.interaction_id, ("", None))
        kind = "voice" if channel.get(iid) == "voice" else "chat"
        if e.kind == "joined":
            assert iid not in live, where
            channel[iid] = e.detail.split()[0]
            live[iid] = ("queued", None)
        elif e.kind == "offered":
            assert state[0] == "queued", f"offered while {state}: {where}"
            assert e.agent is not None
            load[(e.agent, kind)] += 1
            assert load[(e.agent, kind)] <= caps[e.agent][kind], f"{e.agent} above {kind} capacity: {where}"
            live[iid] = ("offered", e.agent)
        elif e.kind == "accepted":
            assert state == ("offered", e.agent), f"accepted while {state}: {where}"
            live[iid] = ("active", e.agent)
        elif e.kind == "requeued":
            assert state[0] in ("offered", "active") and state[1] == e.agent, f"requeued while {state}: {where}"
            load[(e.agent or "", kind)] -= 1
            live[iid] = ("queued", None)
        elif e.kind == "left":
            assert state[0] == e.detail and state[1] == e.agent, f"left while {state}: {where}"
            if state[1] is not None:
                load[(state[1], kind)] -= 1
            del live[iid]
    return live


async def test_two_processes_assigning_at_once_never_offer_twice_or_exceed_a_capacity(
        redis_url: str, db_url: str, tmp_path: Path) -> None:
    cfg = config(offer_timeout=0.3, wrapup_seconds=0.05)
    router = Router(redis_url, cfg)
    await db.upgrade(db_url)
    store = InteractionStore(db_url)
    await store.start()
    recorder = QueueLog(redis_url, cfg, store, block=0.1)
    await recorder.start()
    try:
        caps = {}
        for i in range(12):
            await agent(router, f"a{i}", [["billing", "tech", "sales"][i % 3], "sales"], chat=1 + i % 4)
            caps[f"a{i}"] = {"voice": 1, "chat": 1 + i % 4}
        env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
        workers = [await asyncio.create_subprocess_exec(
            sys.executable, str(PROJECT_DIR / "tests" / "router_stress_worker.py"), redis_url, cfg.key_prefix,
            f"p{n}", str(n + 1), "8", str(tmp_path / f"p{n}.json"), env=env) for n in range(2)]
        checks = 0
        while any(w.returncode is None for w in workers):
            check_invariants(await router.snapshot())
            checks += 1
            await asyncio.sleep(0.05)
        assert [await w.wait() for w in workers] == [0, 0]
        check_invariants(await router.snapshot())
        offers = [tuple(o) for n in range(2) for o in json.loads((tmp_path / f"p{n}.json").read_text())]
        by_offer = Counter((iid, number) for iid, number, _, _ in offers)
        assert len(offers) > 200 and checks > 20, (len(offers), checks)  # enough traffic to mean something
        assert any(number > 1 for _, number in by_offer), "offers were also taken back and made again"
        assert max(by_offer.values()) == 1, "an interaction was offered twice under one offer number"
        assert {o[0][:2] for o in offers} == {"p0", "p1"} and len({o[2] for o in offers}) == 12

        # The database's record, written from the router's stream while both processes ran, says the same.
        final = await router.snapshot()
        stream = cfg.key_prefix + "log"
        deadline = time.monotonic() + 20
        async with aioredis.Redis.from_url(redis_url, decode_responses=True) as client:
            while (await client.xpending(stream, GROUP))["pending"] or await client.xlen(stream) > 1 \
                    or recorder.written == 0:
                assert time.monotonic() < deadline, f"the queue log did not catch up: {await client.xlen(stream)}"
                await asyncio.sleep(0.1)
        assert store.sessions is not None
        async with store.sessions() as session:
            events = list((await session.execute(select(QueueEvent).order_by(QueueEvent.id))).scalars())
        assert len(events) == recorder.written
        in_db = Counter((e.interaction_id, int(e.detail), e.agent) for e in events if e.kind == "offered")
        assert in_db == Counter((iid, number, agent_id) for iid, number, agent_id, _ in offers)
        live = replay(sorted(events, key=lambda e: tuple(map(int, e.id.split("-")))), caps)
        assert live == {i: (s.state, s.agent) for i, s in final.interactions.items()}
    finally:
        await recorder.aclose()
        await store.aclose()
        await router.aclose()


async def test_the_running_router_offers_new_interactions_at_once_and_expires_offers_on_its_own(
        redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    router = Router(redis_url, config(offer_timeout=0.3, tick_interval=0.05), redis=client)
    events: list[tuple[str, dict[str, Any]]] = []
    router.add_listener(lambda kind, fields: events.append((kind, fields)))
    await router.start()
    try:
        await agent(router, "ann", ["help"])
        t0 = time.monotonic()
        await router.enqueue("chat", "web", "help")
        deadline = time.monotonic() + 5
        while not any(k == "queue-offer" for k, _ in events):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert time.monotonic() - t0 < 0.05, "offered when queued, not at the next tick"
        while not any(k == "queue-requeued" for k, _ in events):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        kinds = [k for k, _ in events]
        assert kinds[:4] == ["agent-presence", "queue-joined", "queue-offer", "queue-requeued"]
        assert ("agent-presence", {"agent": "ann", "presence": "away"}) in events
    finally:
        await router.aclose()
        await client.aclose()


def test_the_queue_command_shows_waiting_per_skill_and_each_agents_state_and_load(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.cli import main

    cfg = config()

    async def seed() -> None:
        router = Router(redis_url, cfg)
        try:
            await agent(router, "ann", ["billing", "tech"])
            await router.login("bob", ["billing"])
            for iid, channel, skill in (("c1", "voice", "billing"), ("c2", "web", "tech"), ("c3", "web", "sales")):
                await router.enqueue(iid, channel, skill)
            await router.assign()
        finally:
            await router.aclose()

    asyncio.run(seed())
    assert main(["queue", "--set", f"redis.url={redis_url}", "--set", f"router.key_prefix='{cfg.key_prefix}'"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[1][:2] == ["sales", "1"] and lines[2][:2] == ["tech", "1"], "a call blocks ann's new chats"
    assert lines[4] == ["ann", "available", "1/1", "0/4", "billing,", "tech"]
    assert lines[5] == ["bob", "away", "0/1", "0/4", "billing"]


async def test_a_transfer_puts_an_active_interaction_at_the_head_under_the_new_skill_and_frees_the_agent(
        router: Router) -> None:
    await agent(router, "ann", ["billing"], voice=1)
    await agent(router, "bob", ["tech"], voice=1)
    await router.enqueue("call1", "voice", "billing")
    await router.enqueue("call2", "voice", "tech")
    assert offered(await router.assign()) == [("call1", "ann"), ("call2", "bob")]
    assert await router.accept("call1", "ann")
    assert not await router.transfer("call1", "bob", "tech"), "only the agent who has it may transfer it"
    await router.enqueue("call3", "voice", "tech")
    assert await router.transfer("call1", "ann", "tech")
    snap = await router.snapshot()
    assert snap.queue == ["call1", "call3"], "the transferred call waits at the head, ahead of older ones"
    assert snap.interactions["call1"].skill == "tech" and snap.interactions["call1"].state == "queued"
    assert snap.agents["ann"].voice == 0 and snap.agents["ann"].presence == "available", "no wrap-up"
    assert offered(await router.assign()) == []   # bob still has call2, ann lacks "tech"
    assert await router.accept("call2", "bob")
    await router.finish("call2")
    await router.set_presence("bob", "available")
    assert offered(await router.assign()) == [("call1", "bob")]


async def test_switching_channel_or_to_a_callback_keeps_the_place_and_takes_back_an_offer(router: Router) -> None:
    await router.enqueue("call1", "voice", "billing")
    await router.enqueue("call2", "voice", "billing")
    await router.enqueue("call3", "voice", "billing")
    assert await router.switch("call2", "web")
    assert await router.switch("call3", "voice", "callback")
    snap = await router.snapshot()
    assert snap.queue == ["call1", "call2", "call3"]
    assert (snap.interactions["call2"].channel, snap.interactions["call3"].mode) == ("web", "callback")
    # an agent with chat room only gets call2, now a chat, without call1 ahead of it being offered to them
    await agent(router, "ann", ["billing"], voice=0, chat=2)
    assert offered(await router.assign()) == [("call2", "ann")]
    # switching an offered interaction takes the offer back and frees the agent's room
    assert await router.switch("call2", "voice")
    snap = await router.snapshot()
    assert snap.queue == ["call1", "call2", "call3"] and snap.agents["ann"].chat == 0
    assert await router.accept("call2", "ann") is False
    with pytest.raises(RouterError):
        await router.switch("call1", "fax")
    with pytest.raises(RouterError):
        await router.switch("call1", "voice", "later")
    assert not await router.switch("nobody", "web")


async def test_the_position_counts_from_the_head_and_the_expected_wait_follows_the_pace_of_accepts(
        router: Router) -> None:
    for i in range(4):
        await router.enqueue(f"c{i}", "voice", "billing")
    assert (await router.position("c2")).place == 3
    assert (await router.position("c2")).expected_wait is None, "no pace known yet"
    await agent(router, "ann", ["billing"], voice=1)
    assert (await router.position("c2")).staffed == 1
    # two accepts about 200 ms apart set the pace: c3, then second in line, expects about 2 x 0.2 s
    assert offered(await router.assign()) == [("c0", "ann")]
    assert await router.accept("c0", "ann")
    await router.finish("c0")
    await router.set_presence("ann", "available")
    await asyncio.sleep(0.2)
    assert offered(await router.assign()) == [("c1", "ann")]
    assert await router.accept("c1", "ann")
    position = await router.position("c3")
    assert position.place == 2
    assert position.expected_wait is not None and 0.35 <= position.expected_wait <= 0.8, position
    assert (await router.position("c1")).place == 0, "an active interaction is not waiting"


async def test_an_accepted_callback_is_handed_to_one_dialer_and_again_after_a_failed_attempt(
        router: Router, redis_url: str) -> None:
    other = Router(redis_url, router.config)   # a second process on the same Redis
    try:
        await router.enqueue("cb1", "voice", "billing")
        await router.enqueue("call2", "voice", "billing")
        assert await router.switch("cb1", "voice", "callback")
        assert await router.callbacks_due() == [], "not accepted yet"
        await agent(router, "ann", ["billing"], voice=1)
        assert offered(await router.assign()) == [("cb1", "ann")]
        assert await router.accept("cb1", "ann")
        due = await asyncio.gather(router.callbacks_due(), other.callbacks_due())
        assert sorted(due, key=len) == [[], [("cb1", "ann")]], "exactly one process dials"
        assert await router.callbacks_due() == []
        # the agent's phone did not answer: back at the head, another attempt once accepted again
        assert await router.requeue("cb1", "ann", away=True, reason="no answer")
        await router.set_presence("ann", "available")
        assert offered(await router.assign()) == [("cb1", "ann")]
        assert await router.accept("cb1", "ann")
        assert await other.callbacks_due() == [("cb1", "ann")]
        await router.finish("cb1")
        assert await router.callbacks_due() == []
    finally:
        await other.aclose()
