"""A caller waiting for a person: the ``queue`` node's call side.

The call joins the unified queue (bridge/router.py) as a voice interaction and hears music on hold. Every
``announce_every`` seconds it hears its place and expected wait; a key texts it a link to a web chat joined to the
same interaction, another asks for a callback; both keep the place. The router decides who gets the call (any
ivr-bridge process may make and accept offers), so the call's task looks at its interaction every second: once an
agent has accepted, their phone rings (the caller hears music on hold meanwhile) and is bridged to the caller.

Whatever goes wrong on the agent's side, the caller is not dropped: a phone that does not answer (or an agent
without one) puts the call back at the head of the queue and the agent "away"; the caller keeps waiting.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

from bridge.models import Outcome
from bridge.router import RouterError
from ivr.agi import DIAL_TIMEOUT, CallHangup, LinkLost
from ivr.flow import Prompt

if TYPE_CHECKING:
    from ivr.engine import CallContext
    from ivr.nodes import QueueNode

log = logging.getLogger(__name__)

POLL = 1.0   # seconds between looks at the router while waiting (also how long a key press may wait)


class QueueWait:
    """One caller's wait in one ``queue`` node; ``run`` returns the next node (None: the call ends)."""

    def __init__(self, node: QueueNode, call: CallContext) -> None:
        self.node = node
        self.call = call
        self.iid = call.session.call_id
        self.moh = False
        self.kept = False   # the interaction outlives the call (chat link taken, callback): not finished here
        self.chat_sent = False

    async def run(self) -> str | None:
        node, call = self.node, self.call
        router = call.router
        if router is None or not self.iid:
            call.record(node.id, "queue-unavailable")
            call.session.log.error("queue %s: no router (Redis) configured; going to %s", node.id, node.on_timeout)
            return node.on_timeout
        if await router.enqueue(self.iid, "voice", node.skill, node.priority):
            await call.update_interaction(state="queued", skill=node.skill, queued_at=call.now())
        call.record(node.id, "queued", node.skill)
        leave = True
        try:
            return await self._wait()
        except CallHangup:
            if call.session.dial_answered:
                call.outcome = Outcome.ANSWERED
            elif self.chat_sent and await self._switch_to_chat():
                leave = False
            raise
        except LinkLost:
            leave = False   # the node is replayed once the AMI link is back: same interaction, same place
            raise
        except asyncio.CancelledError:
            leave = not call.session.detached   # a restart leaves the call for the next ivr-bridge to resume
            raise
        finally:
            if leave and not self.kept:
                # shielded: a hang-up or a stop must not leave the interaction waiting in the queue
                await asyncio.shield(self._leave())

    async def _leave(self) -> None:
        router = self.call.router
        assert router is not None
        try:
            state, agent = await router.finish(self.iid)
        except Exception:
            self.call.session.log.exception("could not take the call out of the queue")
            return
        if state:
            self.call.session.log.info("left the queue (%s%s)", state, f", agent {agent}" if agent else "")

    async def _wait(self) -> str | None:
        node, call = self.node, self.call
        router = call.router
        assert router is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + node.max_wait
        announce_at = loop.time()   # the first announcement right away
        keys = "".join(k for k in (node.chat_key, node.callback_key) if k)
        ringing = self._ringing_before_link_loss()
        if ringing is None and node.prompt is not None:
            await call.play(node.prompt)
        elif ringing is not None:
            # The AMI link broke while an agent's phone rang or talked: that Dial goes on in Asterisk. Its
            # DIALSTATUS is read once it has ended (AGI commands run one after the other), then go on from there.
            status = await call.session.agi.get_full_variable("${DIALSTATUS}", timeout=DIAL_TIMEOUT)
            talked, next_node = await self._dialled(ringing, status or "UNKNOWN")
            if talked:
                return next_node
        while True:
            item = await router.interaction(self.iid)
            state = item.get("state")
            if state == "active" and item.get("agent"):
                talked, next_node = await self._connect(item["agent"])
                if talked:
                    return next_node
                continue
            if not item:
                # ended elsewhere (a supervisor closed it): nothing to wait for
                call.record(node.id, "queue-ended")
                return node.on_timeout
            now = loop.time()
            if now >= deadline:
                call.record(node.id, "queue-timeout")
                await self._music(False)
                return node.on_timeout
            digit: str | None = None
            if now >= announce_at:
                announce_at = now + node.announce_every
                await self._music(False)
                digit = await self._announce(keys)
            if digit is None:
                await self._music(True)
                digit = await call.wait_digit(POLL)
            if digit and digit == node.chat_key:
                await self._chat_link()
            elif digit and digit == node.callback_key and await self._callback():
                return None

    def _ringing_before_link_loss(self) -> str | None:
        """The agent whose phone this node was ringing when the AMI link was lost (this run is the replay)."""
        for step in reversed(self.call.session.steps[:-1]):   # [-1] is this run's "queued"
            if step.node != self.node.id or step.event not in ("link-lost", "enter", "ringing"):
                return None
            if step.event == "ringing":
                return step.value
        return None

    async def _music(self, on: bool) -> None:
        if on != self.moh:
            await self.call.session.agi.music_on_hold(on)
            self.moh = on

    async def _announce(self, keys: str) -> str | None:
        """Place and expected wait, then the keys; returns a key pressed meanwhile."""
        node, call = self.node, self.call
        assert call.router is not None
        where = await call.router.position(self.iid)
        if node.position is not None and where.place:
            digit = await call.play(_filled(node.position, place=where.place), keys)
            if digit:
                return digit
        if node.expected_wait is not None and where.expected_wait is not None:
            minutes = max(1, math.ceil(where.expected_wait / 60))
            digit = await call.play(_filled(node.expected_wait, minutes=minutes), keys)
            if digit:
                return digit
        if node.choices is not None:
            return await call.play(node.choices, keys)
        return None

    async def _connect(self, agent: str) -> tuple[bool, str | None]:
        """Ring the agent who accepted and bridge them: (True, the node after the conversation), or (False, _)
        when nobody answered and the call waits again."""
        node, call = self.node, self.call
        router = call.router
        assert router is not None
        phone = await call.agent_phone(agent)
        if phone is None:
            call.record(node.id, "agent-no-phone", agent)
            await router.requeue(self.iid, agent, away=True, reason="no phone")
            return False, None
        await self._music(False)
        call.record(node.id, "ringing", agent)
        await call.update_interaction(agent=agent)
        call.session.dial_answered = False
        return await self._dialled(agent, await call.session.agi.dial(f"PJSIP/{phone}", node.ring_seconds))

    async def _dialled(self, agent: str, status: str) -> tuple[bool, str | None]:
        node, call = self.node, self.call
        router = call.router
        assert router is not None
        if status == "ANSWER":
            # The bridge has ended and the caller is still here: the agent hung up first. If they transferred
            # the call meanwhile (the desktop), it is back in the queue: the caller waits for the next agent.
            item = await router.interaction(self.iid)
            if item and item.get("agent") != agent:
                call.record(node.id, "transferred", f"{agent} {item.get('skill', '')}".strip())
                call.session.log.info("agent %s transferred the call to %s", agent, item.get("skill"))
                return False, None
            call.record(node.id, "agent-hung-up", agent)
            call.outcome = Outcome.ANSWERED
            return True, node.after
        call.record(node.id, "agent-no-answer", f"{agent} {status.lower()}")
        call.session.log.info("agent %s's phone: %s; back at the head of the queue", agent, status)
        await router.requeue(self.iid, agent, away=True, reason=f"phone {status.lower()}"[:64])
        return False, None

    async def _chat_link(self) -> None:
        """Text the caller a link to a chat on this interaction; the call goes on waiting."""
        node, call = self.node, self.call
        await self._music(False)
        prepared = await call.send_followup("sms", call.session.caller, node.chat_message, None,
                                            purpose="in_call")
        if prepared is None or not prepared.accepted:
            call.record(node.id, "chat-link-refused", prepared.reason if prepared is not None else "off")
            if node.unavailable is not None:
                await call.play(node.unavailable)
            return
        call.record(node.id, "chat-link-sent")
        # The caller may hold on (an agent who takes the call rings through as usual) or hang up, even during
        # the next prompt: then the interaction waits on as the chat, in the same place.
        self.chat_sent = True
        assert node.chat_sent is not None
        await call.play(node.chat_sent)

    async def _switch_to_chat(self) -> bool:
        router = self.call.router
        assert router is not None
        if not await router.switch(self.iid, "web"):
            return False
        self.call.outcome = Outcome.CHAT
        self.call.session.log.info("caller hung up after the chat link; the interaction waits on as a chat")
        return True

    async def _callback(self) -> bool:
        """Keep the place for a call back to the caller's number; True: the call ends."""
        node, call = self.node, self.call
        router = call.router
        assert router is not None
        await self._music(False)
        number = call.callback_number()
        if number is None:
            call.record(node.id, "callback-refused", "number")
            if node.unavailable is not None:
                await call.play(node.unavailable)
            return False
        try:
            switched = await router.switch(self.iid, "voice", "callback")
        except RouterError:
            switched = False
        if not switched:   # an agent took the call meanwhile: connect as usual
            return False
        self.kept = True
        call.outcome = Outcome.CALLBACK
        await call.update_interaction(state="callback")
        call.record(node.id, "callback", number)
        assert node.callback_confirm is not None
        await call.play(node.callback_confirm)
        await call.session.agi.hangup()
        return True


def _filled(prompt: Prompt, **values: int) -> Prompt:
    return Prompt(text={lang: text.format(**values) for lang, text in prompt.text.items()},
                  all_languages=prompt.all_languages)

