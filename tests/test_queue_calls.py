"""The ``queue`` node and voice connect through the real Asterisk: a pjsua2 caller waits in the unified queue,
an agent accepts through the real Router (Redis), the agent's pjsua2 desk phone (a registered PJSIP endpoint
with md5 credentials) rings and is bridged to the caller. Variants: the phone does not answer (back to the head,
the caller keeps waiting), the caller hangs up while waiting (abandoned), a callback keeps the place.

The flow is ``tests/flows_it/it_queue.yaml`` (number 300): a menu, 0 -> the queue (skill billing); the chat link
goes through the shipped hotline (number 100).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from panoramisk.message import Message
from sqlalchemy import select

from bridge.app import App
from bridge.models import FollowUp, Link, QueueEvent
from bridge.router import Router
from ivr.softphone import Softphone, SoftphoneCall, SoftphoneConfig
from tests.conftest import wait_until

if TYPE_CHECKING:
    from conftest import Harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
FLOWS = Path(__file__).resolve().parent.parent / "flows"
MOBILE = "13800138000"   # a China Mobile number as a national caller ID (flows.default_region is CN)


class Desk:
    """What the agent desktop would do, done by the test: log agents in, accept offers."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.router: Router = app.router
        self.offers: list[dict[str, Any]] = []
        self.bridge_enters: list[Message] = []
        self._new = asyncio.Event()
        self.router.add_listener(self._on_router)
        app.ami.add_event_listener(self._on_ami)

    def _on_router(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "queue-offer":
            self.offers.append(fields)
            self._new.set()

    def _on_ami(self, message: Message) -> None:
        if message.get("Event") == "BridgeEnter":
            self.bridge_enters.append(message)

    async def agent(self, name: str, phone: str) -> None:
        await self.app.agents.add(name, "a long enough password", skills=["billing"], phone=phone)
        await self.router.login(name, ["billing"])
        assert await self.router.set_presence(name, "available")

    async def take(self, agent: str) -> str:
        """Wait for the next offer to ``agent`` and accept it; returns the interaction id."""
        iid = await self.offer(agent)
        assert await self.router.accept(iid, agent)
        return iid

    async def answer(self, phone: Softphone) -> SoftphoneCall:
        """Answer the call ringing on an agent's phone and wait until Asterisk has bridged it to the caller."""
        ringing = await phone.incoming(timeout=10)
        await ringing.answer()
        await wait_until(lambda: any(str(m.get("Channel")).startswith(f"PJSIP/{phone.config.user}-")
                                     for m in self.bridge_enters), 10, f"{phone.config.user} bridged")
        return ringing

    async def offer(self, agent: str, timeout: float = 20) -> str:
        """Wait for an offer to ``agent``; returns the interaction id."""
        async with asyncio.timeout(timeout):
            while True:
                for offer in self.offers:
                    if offer["agent"] == agent:
                        self.offers.remove(offer)
                        return str(offer["interaction"])
                self._new.clear()
                await self._new.wait()


@pytest.fixture
async def queue_app(ivr: Harness) -> App:
    """The App with a router of its own in Redis; callbacks go to the test caller's softphone."""
    caller = await ivr.softphone()
    config = ivr.config()
    config.asterisk.callback_host = f"127.0.0.1:{caller.local_port}"
    config.router.key_prefix = f"t:{{router-{uuid.uuid4().hex[:12]}}}:"
    config.router.wrapup_seconds = 30
    config.router.offer_timeout = 15
    return await ivr.start_app(config)


@pytest.fixture
async def desk_phones(ivr: Harness, queue_app: App) -> AsyncIterator[dict[str, Softphone]]:
    """The agents' desk phones agent1 and agent2, registered with Asterisk."""
    ast = queue_app.config.asterisk
    await ivr.softphone()  # the caller's phone first: the pjsua2 endpoint is shared
    phones: dict[str, Softphone] = {}
    try:
        for name in ("agent1", "agent2"):
            phone = Softphone(SoftphoneConfig(user=name, username=name, password=ast.agent_phone_password(name),
                                              registrar=f"sip:127.0.0.1:{ast.sip_port}"))
            await phone.start()
            phones[name] = phone
        yield phones
    finally:
        for phone in phones.values():
            await phone.aclose()


async def talking_to_ann(ivr: Harness, desk: Desk, phones: dict[str, Softphone],
                         ) -> tuple[SoftphoneCall, Any, str, SoftphoneCall]:
    """A caller in the queue whom agent ann (desk phone agent1) takes and answers: the caller's call, its watch,
    the interaction id and ann's leg."""
    call, watch = await wait_in_queue(ivr, desk.app)
    await desk.agent("ann", "agent1")
    iid = await desk.take("ann")
    return call, watch, iid, await desk.answer(phones["agent1"])


async def wait_in_queue(ivr: Harness, app: App) -> tuple[SoftphoneCall, Any]:
    call, watch = await ivr.dial("300", app=app)
    assert watch is not None
    await ivr.press(call, watch, "menu", "0")
    await watch.next("prompt", node="wait", text="Please hold.")
    return call, watch


async def test_an_accepted_call_rings_the_agents_phone_is_bridged_and_ends_in_wrapup(
        ivr: Harness, queue_app: App, desk_phones: dict[str, Softphone]) -> None:
    app = queue_app
    desk = Desk(app)
    call, watch = await wait_in_queue(ivr, app)
    await watch.next("prompt", node="wait", text="You are number 1 in line.")
    await desk.agent("ann", "agent1")
    iid = await desk.take("ann")
    assert iid == watch.call_id

    ringing = await desk_phones["agent1"].incoming(timeout=10)
    await ringing.answer()
    await ringing.wait_media()
    # Asterisk bridged the caller's channel and the agent phone's channel
    await ivr.wait_until(lambda: len({m.get("Channel") for m in desk.bridge_enters
                                      if m.get("BridgeUniqueid")}) >= 2, 10, "both channels in one bridge")
    bridges = {m.get("BridgeUniqueid") for m in desk.bridge_enters}
    channels = {str(m.get("Channel")) for m in desk.bridge_enters}
    assert len(bridges) == 1 and any(c.startswith("PJSIP/agent1-") for c in channels), desk.bridge_enters
    await asyncio.sleep(1)
    assert (await app.router.interaction(iid))["state"] == "active"

    await ringing.hangup()   # the agent ends the conversation: the caller goes on to the flow's `after` node
    await watch.next("prompt", node="rate", text="Thank you for talking to us.")
    await call.wait_ended(timeout=10)
    ended = await watch.next("call-ended")
    assert ended["outcome"] == "answered"

    snap = await app.router.snapshot()
    assert iid not in snap.interactions
    assert snap.agents["ann"].presence == "wrapup" and snap.agents["ann"].voice == 0
    record = await app.store.get(iid)
    assert record is not None
    assert (record.outcome, record.agent, record.skill, record.intent) == ("answered", "ann", "billing", "billing")
    assert record.queued_at is not None
    events = [(s.node, s.event, s.value) for s in record.steps if s.node == "wait"]
    assert ("wait", "queued", "billing") in events and ("wait", "ringing", "ann") in events
    assert ("wait", "agent-hung-up", "ann") in events

    async def logged() -> list[str]:
        assert app.store.sessions is not None
        async with app.store.sessions() as session:
            rows = await session.execute(select(QueueEvent.kind).where(QueueEvent.interaction_id == iid)
                                         .order_by(QueueEvent.id))
            return list(rows.scalars())
    for _ in range(100):   # the queue log writes the router's stream to the database a moment later
        if (await logged())[-1:] == ["left"]:
            break
        await asyncio.sleep(0.1)
    assert await logged() == ["joined", "offered", "accepted", "left"]


async def test_a_phone_that_does_not_answer_puts_the_call_back_at_the_head_and_the_caller_keeps_waiting(
        ivr: Harness, queue_app: App, desk_phones: dict[str, Softphone]) -> None:
    app = queue_app
    desk = Desk(app)
    call, watch = await wait_in_queue(ivr, app)
    await desk.agent("ann", "agent1")
    iid = await desk.take("ann")
    ringing = await desk_phones["agent1"].incoming(timeout=10)
    await ringing.reject(486)   # busy

    await ivr.wait_until(lambda: any(e["event"] == "agent-no-answer" for e in watch.events("input")), 10,
                         "the IVR to see the busy phone")
    snap = await app.router.snapshot()
    assert snap.queue[:1] == [iid] and snap.agents["ann"].presence == "away"
    assert not call.ended, "the caller is never dropped because of the agent's phone"

    await desk.agent("bob", "agent2")
    assert await desk.take("bob") == iid
    second = await desk.answer(desk_phones["agent2"])
    await call.hangup()   # the caller ends the conversation
    ended = await watch.next("call-ended")
    assert ended["outcome"] == "answered"
    await second.wait_ended(timeout=10)
    snap = await app.router.snapshot()
    assert snap.agents["bob"].presence == "wrapup" and iid not in snap.interactions


async def test_a_caller_who_hangs_up_while_waiting_is_abandoned_and_leaves_the_queue(
        ivr: Harness, queue_app: App) -> None:
    app = queue_app
    call, watch = await wait_in_queue(ivr, app)
    iid = watch.call_id
    assert (await app.router.interaction(iid))["state"] == "queued"
    await call.hangup()
    ended = await watch.next("call-ended")
    assert ended["outcome"] == "abandoned"
    assert await app.router.interaction(iid) == {}
    assert (await app.router.snapshot()).queue == []


async def test_a_callback_keeps_the_place_and_ends_the_call(ivr: Harness, queue_app: App) -> None:
    app = queue_app
    call, watch = await wait_in_queue(ivr, app)
    iid = watch.call_id
    await app.router.enqueue("later-chat", "web", "billing")   # someone who came after the caller
    await ivr.press(call, watch, "wait", "2", text="For a call back, press 2.", timeout=20)
    await watch.next("prompt", node="wait", text="We will call you back. Goodbye.")
    await call.wait_ended(timeout=10)
    ended = await watch.next("call-ended")
    assert ended["outcome"] == "callback"
    snap = await app.router.snapshot()
    assert snap.queue == [iid, "later-chat"], "the callback kept its place ahead of later arrivals"
    assert (snap.interactions[iid].channel, snap.interactions[iid].mode) == ("voice", "callback")
    record = await app.store.get(iid)
    assert record is not None and (record.state, record.outcome) == ("callback", "callback")
    assert record.ended_at is None, "the interaction goes on until the call back"


async def test_an_accepted_callback_rings_the_agent_first_then_calls_the_customer_and_bridges_them(
        ivr: Harness, queue_app: App, desk_phones: dict[str, Softphone]) -> None:
    app = queue_app
    desk = Desk(app)
    call, watch = await wait_in_queue(ivr, app)
    iid = watch.call_id
    await ivr.press(call, watch, "wait", "2", text="For a call back, press 2.", timeout=20)
    await call.wait_ended(timeout=15)

    await desk.agent("ann", "agent1")
    assert await desk.offer("ann") == iid
    assert await app.router.accept(iid, "ann")
    agent_leg = await desk_phones["agent1"].incoming(timeout=10)   # the agent's phone rings first
    caller_phone = await ivr.softphone()
    assert not caller_phone.calls, "the customer is called only once the agent has answered"
    await agent_leg.answer()
    customer_leg = await caller_phone.incoming(timeout=10)
    assert "+86" in customer_leg.uri or ivr.CALLER in customer_leg.uri, customer_leg.uri
    await customer_leg.answer()
    await ivr.wait_until(lambda: any(str(m.get("Channel")).startswith("PJSIP/agent1-")
                                     for m in desk.bridge_enters) and len(desk.bridge_enters) >= 2, 10,
                         "the agent and the customer in one bridge")
    assert len({m.get("BridgeUniqueid") for m in desk.bridge_enters}) == 1
    record = await app.store.get(iid)
    assert record is not None and (record.state, record.agent) == ("active", "ann")

    await customer_leg.hangup()
    await agent_leg.wait_ended(timeout=10)

    async def ended() -> bool:
        got = await app.store.get(iid)
        return got is not None and got.state == "ended"
    for _ in range(50):
        if await ended():
            break
        await asyncio.sleep(0.1)
    record = await app.store.get(iid)
    assert record is not None and (record.state, record.outcome) == ("ended", "answered")
    snap = await app.router.snapshot()
    assert iid not in snap.interactions and snap.agents["ann"].presence == "wrapup"


async def test_a_caller_who_takes_the_chat_link_and_hangs_up_keeps_the_place_as_a_chat(ivr: Harness) -> None:
    await ivr.softphone(user=MOBILE)   # a mobile number: the chat link can be texted to it
    config = ivr.config(flows=[FLOWS], default_flow="hotline")
    config.router.key_prefix = f"t:{{router-{uuid.uuid4().hex[:12]}}}:"
    app = await ivr.start_app(config)
    await app.router.enqueue("earlier", "web", "general")
    call, watch = await ivr.dial("100", app=app)
    assert watch is not None
    await ivr.press(call, watch, "main", "0")
    await watch.next("prompt", node="agent", text="You are number 2 in line.", timeout=20)
    choices = app.flows.flows["hotline"].nodes["agent"].choices.text["en"]  # type: ignore[attr-defined]
    await ivr.press(call, watch, "agent", "1", text=choices, timeout=30)
    sent = await watch.next("followup", timeout=10)
    assert sent["state"] == "pending" and sent["channel"] == "sms"
    await watch.next("prompt", node="agent", text="We have texted you the link. You can hang up now and chat, "
                                                  "or stay on the line.")
    iid = watch.call_id
    await app.router.enqueue("later", "web", "general")
    assert (await app.router.interaction(iid))["channel"] == "voice", "still holding: still a call"
    await call.hangup()
    ended = await watch.next("call-ended")
    assert ended["outcome"] == "chat"

    snap = await app.router.snapshot()
    assert snap.queue == ["earlier", iid, "later"], "the chat kept the call's place"
    assert snap.interactions[iid].channel == "web"
    record = await app.store.get(iid)
    assert record is not None and (record.state, record.channel, record.outcome) == ("queued", "web", "chat")
    assert app.store.sessions is not None
    async with app.store.sessions() as session:
        followup = (await session.execute(select(FollowUp).where(FollowUp.id == sent["id"]))).scalar_one()
        link = (await session.execute(select(Link).where(Link.followup_id == followup.id))).scalar_one()
    assert (followup.template, followup.interaction_id, followup.recipient) == ("chat_link", iid, "+86" + MOBILE)
    assert (link.kind, link.interaction_id) == ("chat", iid)


async def test_a_conversation_goes_on_through_a_lost_ami_link_and_the_agent_is_not_rung_twice(
        ivr: Harness, queue_app: App, desk_phones: dict[str, Softphone]) -> None:
    app = queue_app
    desk = Desk(app)
    call, watch, iid, ringing = await talking_to_ann(ivr, desk, desk_phones)

    connects = app.ami.connects
    app.ami.drop_link()   # ivr-bridge loses Asterisk in the middle of the conversation
    await ivr.wait_until(lambda: app.ami.connects > connects and app.ami.connected, 15, "the AMI link back")
    await asyncio.sleep(1.5)
    assert not call.ended and not ringing.ended, "the conversation goes on"
    assert (await app.router.interaction(iid))["state"] == "active"

    await ringing.hangup()
    await watch.next("prompt", node="rate", text="Thank you for talking to us.", timeout=15)
    ended = await watch.next("call-ended")
    assert ended["outcome"] == "answered"
    assert len([e for e in watch.events("input") if e["event"] == "ringing"]) == 1, "the agent's phone rang once"
    with pytest.raises(TimeoutError):
        await desk_phones["agent1"].incoming(timeout=1)
    assert (await app.router.snapshot()).agents["ann"].presence == "wrapup"


async def test_a_call_the_agent_transfers_goes_back_to_the_queue_when_they_hang_up_and_rings_the_next_agent(
        ivr: Harness, queue_app: App, desk_phones: dict[str, Softphone]) -> None:
    app = queue_app
    desk = Desk(app)
    call, watch, iid, first = await talking_to_ann(ivr, desk, desk_phones)
    await app.agents.add("bob", "a long enough password", skills=["tech"], phone="agent2")
    await app.router.login("bob", ["tech"])
    assert await app.router.transfer(iid, "ann", "tech")   # ann passes the caller on (the desktop's transfer)
    await first.hangup()   # ... and hangs up: the caller is back in the queue, not hung up

    assert await app.router.set_presence("bob", "available")
    assert await desk.take("bob") == iid
    second = await desk.answer(desk_phones["agent2"])
    assert not call.ended
    await second.hangup()
    await watch.next("prompt", node="rate", text="Thank you for talking to us.")
    assert (await watch.next("call-ended"))["outcome"] == "answered"
    events = [(e["event"], e["value"]) for e in watch.events("input") if e["node"] == "wait"]
    assert ("transferred", "ann tech") in events and ("ringing", "bob") in events
