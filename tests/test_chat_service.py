"""ChatService (bridge/chat.py) against a real Redis and both databases (SQLite, PostgreSQL): chats opened and
joined, messages numbered per interaction and stored once per client id, two services ("processes") on one Redis
and one database posting at once, live delivery between them, and feeds that fill what pub/sub lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from bridge import db
from bridge.chat import MAX_TEXT, ChatError, ChatEvent, ChatService, Feed
from bridge.config import RouterConfig
from bridge.models import ChatMessage, Interaction
from bridge.router import Router
from bridge.store import InteractionStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@dataclass
class Process:
    """What one ivr-bridge process holds: its own store (engine), router client and chat service."""

    store: InteractionStore
    router: Router
    chat: ChatService


MakeProcess = Callable[[], Awaitable[Process]]


@pytest.fixture
async def make_process(db_url: str, redis_url: str) -> AsyncIterator[MakeProcess]:
    """Start "processes" sharing one database, one router key prefix and one chat channel."""
    await db.upgrade(db_url)
    router_config = RouterConfig(key_prefix=f"t:{{chat-{uuid.uuid4().hex[:12]}}}:")
    channel = f"test-chat:{uuid.uuid4().hex[:12]}"
    stack = contextlib.AsyncExitStack()

    async def make() -> Process:
        store = InteractionStore(db_url)
        await store.start()
        stack.push_async_callback(store.aclose)
        router = Router(redis_url, router_config)
        stack.push_async_callback(router.aclose)
        chat = ChatService(store, redis_url, router, channel=channel, skill="support")
        await chat.start()
        stack.push_async_callback(chat.aclose)
        return Process(store, router, chat)

    async with stack:
        yield make


@pytest.fixture
async def one(make_process: MakeProcess) -> Process:
    return await make_process()


async def collect(feed: Feed, count: int, timeout: float = 20) -> list[ChatEvent]:
    """The next ``count`` message events of a feed (other events skipped)."""
    got: list[ChatEvent] = []
    async with asyncio.timeout(timeout):
        async for event in feed:
            if event.kind == "msg":
                got.append(event)
                if len(got) == count:
                    break
    return got


async def next_event(feed: Feed, kind: str, timeout: float = 5) -> ChatEvent:
    async with asyncio.timeout(timeout):
        async for event in feed:
            if event.kind == kind:
                return event
    raise AssertionError("the feed ended")


async def rows(store: InteractionStore, interaction_id: str) -> list[ChatMessage]:
    assert store.sessions is not None
    async with store.sessions() as session:
        result = await session.execute(select(ChatMessage).where(ChatMessage.interaction_id == interaction_id)
                                       .order_by(ChatMessage.seq))
        return list(result.scalars())


async def call(p: Process) -> str:
    """A voice call waiting in the queue (what the queue node does before texting the chat link)."""
    record = await p.store.create(caller="+8613800138000", dialled="100", flow="hotline", language="zh-CN",
                                  channel="voice", state="queued", skill="billing")
    assert await p.router.enqueue(record.id, "voice", "billing")
    return record.id


# ------------------------------------------------------------------------------------------------ chats
async def test_open_stores_a_web_interaction_and_queues_it_once(one: Process) -> None:
    info = await one.chat.open(language="zh-CN")
    assert (info.channel, info.language, info.state) == ("web", "zh-CN", "waiting")
    record = await one.store.get(info.interaction_id)
    assert record is not None
    assert (record.channel, record.state, record.skill, record.caller) == ("web", "queued", "support", "")
    assert record.queued_at is not None
    queued = await one.router.interaction(info.interaction_id)
    assert (queued["state"], queued["channel"], queued["skill"]) == ("queued", "web", "support")
    assert (await one.router.snapshot()).queue == [info.interaction_id]
    assert await one.chat.info(info.interaction_id) == info


async def test_join_attaches_a_chat_to_a_queued_call_without_queueing_it_again(one: Process) -> None:
    iid = await call(one)
    info = await one.chat.join(iid)
    assert (info.interaction_id, info.channel, info.language, info.state) == (iid, "voice", "zh-CN", "waiting")
    await one.chat.join(iid)
    snapshot = await one.router.snapshot()
    assert snapshot.queue == [iid] and snapshot.interactions[iid].channel == "voice"
    posted = await one.chat.post(iid, "visitor", "我在等待，可以先文字说明吗？", client_id="c1")
    assert posted.message.seq == 1
    with pytest.raises(ChatError) as refused:
        await one.chat.join(uuid.uuid4().hex)
    assert refused.value.code == "unknown_chat"


async def test_posts_are_numbered_per_chat_and_a_resent_client_id_is_stored_once(one: Process) -> None:
    a, b = (await one.chat.open()).interaction_id, (await one.chat.open()).interaction_id
    first = await one.chat.post(a, "visitor", "hello", client_id="v-1")
    assert first.new and first.message.seq == 1 and first.message.sender == "visitor"
    assert (await one.chat.post(b, "visitor", "other chat", client_id="v-1")).message.seq == 1  # per chat
    reply = await one.chat.post(a, "agent", "Hi, how can I help?", agent="ann")
    assert (reply.message.seq, reply.message.agent, reply.message.client_id) == (2, "ann", None)
    again = await one.chat.post(a, "visitor", "hello (resent)", client_id="v-1")
    assert not again.new and again.message == first.message   # the first one, unchanged
    note = await one.chat.post(a, "system", "The agent has joined.")
    assert note.message.seq == 3
    assert [(m.seq, m.sender, m.text) for m in await one.chat.history(a)] == [
        (1, "visitor", "hello"), (2, "agent", "Hi, how can I help?"), (3, "system", "The agent has joined.")]
    assert [m.seq for m in await one.chat.history(a, after_seq=1)] == [2, 3]
    assert [m.seq for m in await one.chat.history(a, after_seq=1, limit=1)] == [2]
    assert [r.seq for r in await rows(one.store, a)] == [1, 2, 3]


@pytest.mark.parametrize(("sender", "text", "extra", "code"), [
    ("customer", "hi", {}, "bad_sender"),
    ("agent", "hi", {}, "bad_sender"),                          # an agent's message names the agent
    ("visitor", "hi", {"agent": "ann"}, "bad_sender"),
    ("agent", "hi", {"agent": "ann smith"}, "bad_sender"),
    ("visitor", "hi", {"client_id": "has space"}, "bad_client_id"),
    ("visitor", "hi", {"client_id": "x" * 65}, "bad_client_id"),
    ("visitor", " \r\n\t ", {}, "empty"),
    ("visitor", "x" * (MAX_TEXT + 1), {}, "too_long"),
])
async def test_bad_posts_are_refused_with_a_code(one: Process, sender: str, text: str, extra: dict[str, str],
                                                  code: str) -> None:
    iid = (await one.chat.open()).interaction_id
    with pytest.raises(ChatError) as refused:
        await one.chat.post(iid, sender, text, **extra)
    assert refused.value.code == code
    assert await one.chat.history(iid) == []


async def test_a_post_to_an_unknown_interaction_fails_alone(one: Process) -> None:
    iid = (await one.chat.open()).interaction_id
    results = await asyncio.gather(one.chat.post(iid, "visitor", "kept", client_id="a"),
                                   one.chat.post(uuid.uuid4().hex, "visitor", "lost"),
                                   one.chat.post(iid, "visitor", "kept too", client_id="b"),
                                   return_exceptions=True)
    assert isinstance(results[1], ChatError) and results[1].code == "unknown_chat"
    assert [m.text for m in await one.chat.history(iid)] == ["kept", "kept too"]


async def test_line_breaks_nul_and_control_characters_are_stored_as_text(one: Process) -> None:
    iid = (await one.chat.open()).interaction_id
    posted = await one.chat.post(iid, "visitor", "  line 1\r\nline 2\rline 3\x00end\x07\x1b[31m\ud800 ", client_id="x")
    expected = "line 1\nline 2\nline 3\ufffdend\ufffd\ufffd[31m\ufffd"
    assert posted.message.text == expected
    [row] = await rows(one.store, iid)
    assert row.text == expected   # PostgreSQL refuses NUL and unpaired surrogates: none reach it
    exactly = "x" * MAX_TEXT
    assert (await one.chat.post(iid, "visitor", exactly)).message.text == exactly


# ------------------------------------------------------------------------------------------------ processes
async def test_two_processes_posting_at_once_number_every_chat_without_gaps(make_process: MakeProcess) -> None:
    a, b = await make_process(), await make_process()
    chats = [(await a.chat.open()).interaction_id for _ in range(3)]
    rng = random.Random(7)
    posts = []
    for n in range(600):
        cid = f"m{n % 450}"   # 150 client ids are posted twice, often through both processes at once
        iid = chats[(n % 450) % 3]
        sender = rng.choice(["visitor", "agent"])
        posts.append((rng.choice([a, b]), iid, sender, f"{sender} {n}", cid))
    results = await asyncio.gather(*(p.chat.post(iid, sender, text, client_id=cid,
                                                 agent="ann" if sender == "agent" else None)
                                     for p, iid, sender, text, cid in posts))
    for iid in chats:
        stored = await rows(a.store, iid)
        assert [r.seq for r in stored] == list(range(1, len(stored) + 1)), "numbers with a gap or twice"
        assert len({r.client_id for r in stored}) == len(stored), "a client id stored twice"
        expected = {cid for _, i, _, _, cid in posts if i == iid}
        assert {r.client_id for r in stored} == expected
    new = [r for r in results if r.new]
    assert len(new) == 450 and sum(not r.new for r in results) == 150
    # every post of a client id got the same stored message back, through whichever process
    by_cid: dict[tuple[str, str | None], set[int]] = {}
    for r in results:
        by_cid.setdefault((r.message.interaction_id, r.message.client_id), set()).add(r.message.seq)
    assert all(len(seqs) == 1 for seqs in by_cid.values())


async def test_a_message_posted_in_one_process_reaches_a_feed_in_the_other_in_order(
        make_process: MakeProcess) -> None:
    a, b = await make_process(), await make_process()
    iid = (await a.chat.open()).interaction_id
    async with b.chat.feed(iid) as feed:
        sent = [await (a if n % 3 else b).chat.post(iid, "visitor" if n % 2 else "agent", f"n{n}",
                                                    agent=None if n % 2 else "ann") for n in range(30)]
        got = await collect(feed, 30)
    assert [e.message for e in got] == [p.message for p in sent]
    # typing and state cross too
    async with b.chat.feed(iid, after_seq=30) as feed:
        a.chat.typing(iid, "agent", agent="ann")
        typing = await next_event(feed, "typing")
        assert (typing.sender, typing.on, typing.agent) == ("agent", True, "ann")
        await a.chat.close(iid)
        assert (await next_event(feed, "state")).state == "closed"


async def test_a_feed_reads_what_pubsub_lost_from_the_database(make_process: MakeProcess,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await make_process(), await make_process()
    iid = (await a.chat.open()).interaction_id
    received = b.chat._received
    dropped: list[int] = []

    def lossy(data: bytes) -> None:   # pub/sub loses every third message on its way to process b
        event = json.loads(data)
        if event["type"] == "msg" and event["seq"] % 3 == 0 and event["seq"] < 30:
            dropped.append(event["seq"])
            return
        received(data)

    monkeypatch.setattr(b.chat, "_received", lossy)
    async with b.chat.feed(iid) as feed:
        sent = [await a.chat.post(iid, "visitor", f"n{n}", client_id=f"c{n}") for n in range(40)]
        got = await collect(feed, 40)
    assert dropped == list(range(3, 30, 3))
    assert [e.message for e in got] == [p.message for p in sent]


async def test_after_its_subscription_drops_a_process_reads_what_it_missed(make_process: MakeProcess,
                                                                           redis_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await make_process(), await make_process()
    iid = (await a.chat.open()).interaction_id
    gate = asyncio.Event()
    subscribe = b.chat._subscribe
    resubscribed: list[int] = []

    async def slow_subscribe() -> object:   # b gets its subscription back only when the test says so
        await gate.wait()
        resubscribed.append(1)
        return await subscribe()

    monkeypatch.setattr(b.chat, "_subscribe", slow_subscribe)
    async with b.chat.feed(iid) as feed:
        await a.chat.post(iid, "visitor", "before", client_id="c0")
        assert [e.message.text for e in await collect(feed, 1) if e.message] == ["before"]
        admin = aioredis.from_url(redis_url)
        try:
            assert await admin.client_kill_filter(_type="pubsub") >= 2   # both processes lose their subscription
        finally:
            await admin.aclose()
        for n in range(1, 6):   # b learns nothing of these until it is subscribed again
            await a.chat.post(iid, "visitor", f"during {n}", client_id=f"c{n}")
        with pytest.raises(TimeoutError):
            await collect(feed, 1, timeout=0.5)
        gate.set()
        got = await collect(feed, 5)
    assert resubscribed == [1]
    assert [e.message.text for e in got if e.message] == [f"during {n}" for n in range(1, 6)]


async def test_a_slow_reader_is_bounded_and_still_gets_everything_in_order(one: Process) -> None:
    iid = (await one.chat.open()).interaction_id
    feed = one.chat.feed(iid, size=8)
    try:
        for n in range(100):
            await one.chat.post(iid, "visitor", f"n{n}", client_id=f"c{n}")
            one.chat.typing(iid, "agent", agent="ann")
            assert len(feed._events) <= 8   # never more than its size, whatever is posted
        got = await collect(feed, 100)
    finally:
        feed.close()
    assert [e.message.seq for e in got if e.message] == list(range(1, 101))


async def test_a_feed_after_a_number_gives_only_what_came_after(one: Process) -> None:
    iid = (await one.chat.open()).interaction_id
    for n in range(5):
        await one.chat.post(iid, "visitor", f"n{n}")
    async with one.chat.feed(iid, after_seq=3) as feed:
        await one.chat.post(iid, "agent", "live", agent="bob")
        got = await collect(feed, 2)
    assert [(e.message.seq, e.message.text) for e in got if e.message] == [(4, "n3"), (5, "n4")]
    async with one.chat.feed(iid, after_seq=5) as feed:
        assert [(e.message.seq, e.message.text) for e in await collect(feed, 1) if e.message] == [(6, "live")]


# ------------------------------------------------------------------------------------------------ the queue
async def test_router_changes_reach_the_chat_as_states_and_close_ends_the_interaction(one: Process) -> None:
    iid = (await one.chat.open()).interaction_id
    await one.router.login("ann", ["support"], chat=2)
    assert await one.router.set_presence("ann", "available")
    async with one.chat.feed(iid) as feed:
        [offer] = await one.router.assign()
        assert offer.interaction == iid
        assert await one.router.accept(iid, "ann")
        active = await next_event(feed, "state")
        assert (active.state, active.agent) == ("active", "ann")
        info = await one.chat.info(iid)
        assert info is not None and info.state == "active"
        assert await one.router.requeue(iid, "ann")
        assert (await next_event(feed, "state")).state == "waiting"
        assert await one.chat.close(iid) == ("queued", None)
        assert (await next_event(feed, "state")).state == "closed"
    assert await one.router.interaction(iid) == {}
    record = await one.store.get(iid)
    assert record is not None and (record.state, record.outcome) == ("ended", "abandoned")
    assert record.ended_at is not None
    info = await one.chat.info(iid)
    assert info is not None and info.state == "closed"


async def test_closing_a_chat_the_router_does_not_know_still_tells_its_followers(one: Process) -> None:
    iid = (await one.chat.open()).interaction_id
    await one.router.finish(iid)
    async with one.chat.feed(iid) as feed:
        assert await one.chat.close(iid) == ("", None)
        assert (await next_event(feed, "state")).state == "closed"


async def test_aclose_stores_queued_posts_and_leaves_no_task(make_process: MakeProcess) -> None:
    p = await make_process()
    iid = (await p.chat.open()).interaction_id
    posts = [asyncio.create_task(p.chat.post(iid, "visitor", f"n{n}", client_id=f"c{n}")) for n in range(50)]
    await asyncio.sleep(0)
    await p.chat.aclose()
    results = await asyncio.gather(*posts, return_exceptions=True)
    stored = [r for r in results if not isinstance(r, BaseException)]
    assert len(stored) == 50, Counter(type(r).__name__ for r in results)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(("chat-writer", "chat-subscriber"))
                and not t.done()]
    assert isinstance(await p.store.get(iid), Interaction)
