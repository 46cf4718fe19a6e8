"""Calling customers back: a caller in the queue asked for a callback (``queue`` node) and hung up, keeping the
place. When an agent accepts that interaction, Asterisk first rings the agent's phone (AMI ``Originate``); once
the agent answers, the dialplan's ``[ivr-callback]`` calls the customer through the callback trunk and bridges them.

Any ivr-bridge process may run a dialer: the router hands each accepted callback to exactly one of them. An agent
phone that does not answer puts the callback back at the head of the queue (and the agent away), like a call. The
end of the call back (the ``IvrCallback`` user event from the dialplan's hangup handler) ends the interaction:
the agent goes to wrap-up, and the interaction's outcome says whether the customer was reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import phonenumbers
from panoramisk.message import Message

from bridge.agents import AgentDirectory
from bridge.config import AsteriskConfig
from bridge.models import Outcome, utcnow
from bridge.router import Router, wait_or_cancel
from bridge.store import InteractionStore
from ivr.agi import DIAL_TARGET_RE
from ivr.ami import AmiClient, AmiError

log = logging.getLogger(__name__)

CONTEXT = "ivr-callback"


class CallbackDialer:
    """Dials the callbacks that agents accepted; ``start()`` runs the loop, ``aclose()`` stops it."""

    def __init__(self, ami: AmiClient, router: Router, agents: AgentDirectory, store: InteractionStore,
                 config: AsteriskConfig, default_region: str, interval: float = 1.0) -> None:
        self.ami = ami
        self.router = router
        self.agents = agents
        self.store = store
        self.config = config
        self.default_region = default_region
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._pending: dict[str, asyncio.Future[Message]] = {}   # Originate action id -> its OriginateResponse
        self._stopping = False

    async def start(self) -> None:
        self.ami.add_event_listener(self._on_event)
        self._task = asyncio.create_task(self._run(), name="callback-dialer")

    async def aclose(self) -> None:
        self._stopping = True
        if self._task is not None:
            await wait_or_cancel(self._task, 5)
            self._task = None
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if self.ami.connected:
                    for iid, agent in await self.router.callbacks_due():
                        task = asyncio.create_task(self._call_back(iid, agent), name=f"callback-{iid}")
                        self._calls.add(task)
                        task.add_done_callback(self._calls.discard)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("callbacks: cannot reach the router; retrying")
            await asyncio.sleep(self.interval)

    def _on_event(self, message: Message) -> None:
        event = message.get("Event")
        if event == "OriginateResponse":
            waiter = self._pending.pop(str(message.get("ActionID", "")), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        elif event == "UserEvent" and message.get("UserEvent") == "IvrCallback":
            iid, status = str(message.get("Interaction", "")), str(message.get("Status", ""))
            task = asyncio.create_task(self._ended(iid, status), name=f"callback-end-{iid}")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    def target(self, number: str) -> str | None:
        """The dial string that reaches ``number`` (E.164) through the callback trunk; None when callbacks are
        not configured or the number is not a valid one."""
        cfg = self.config
        if not cfg.callback_host:   # the config's pattern has allowlisted it
            return None
        try:
            parsed = phonenumbers.parse(number, self.default_region)
        except phonenumbers.NumberParseException:
            return None
        if not phonenumbers.is_valid_number(parsed):
            return None
        e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
        return f"PJSIP/{cfg.callback_trunk}/sip:{e164}@{cfg.callback_host}"

    async def _call_back(self, iid: str, agent: str) -> None:
        record = await self.store.get(iid)
        person = await self.agents.get(agent)
        phone = person.phone if person is not None and not person.disabled else None
        target = self.target(record.caller) if record is not None else None
        if record is None or target is None:
            log.warning("[call %s] callback impossible (no interaction or no callback route); ended", iid[:8])
            await self.router.finish(iid)
            if record is not None:
                await self.store.update(iid, state="ended", outcome=Outcome.CALLBACK_FAILED.value,
                                        ended_at=utcnow())
            return
        if phone is None or not DIAL_TARGET_RE.fullmatch(f"PJSIP/{phone}"):
            await self.router.requeue(iid, agent, away=True, reason="no phone")
            return
        action_id = self.ami.new_action_id()
        answered: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = answered
        ring = int(self.config.callback_ring_seconds)
        log.info("[call %s] calling %s back: ringing agent %s on %s", iid[:8], record.caller, agent, phone)
        try:
            response = await self.ami.action(
                "Originate", action_id=action_id, Channel=f"PJSIP/{phone}", Context=CONTEXT, Exten="s",
                Priority=1, Timeout=ring * 1000, Async="true", CallerID=f"Callback <{record.caller}>",
                Variable=f"IVR_INTERACTION={iid},IVR_CALLBACK_TARGET={target},IVR_CALLBACK_RING={ring}")
            if response.get("Response") != "Success":
                raise AmiError(str(response.get("Message", "Originate refused")))
            async with asyncio.timeout(ring + 15):
                result = await answered
        except (AmiError, TimeoutError) as exc:
            log.warning("[call %s] callback: could not ring agent %s: %s", iid[:8], agent, exc)
            await self.router.requeue(iid, agent, away=True, reason="phone failed")
            return
        finally:
            self._pending.pop(action_id, None)
        if result.get("Response") != "Success":
            log.info("[call %s] callback: agent %s's phone did not answer; back at the head", iid[:8], agent)
            await self.router.requeue(iid, agent, away=True, reason="no answer")
            return
        await self.store.update(iid, agent=agent, state="active", answered_at=utcnow())

    async def _ended(self, iid: str, status: str) -> None:
        """The dialplan's hangup handler reported the end of a call back (DIALSTATUS of the customer leg)."""
        with contextlib.suppress(ValueError):
            state, _ = await self.router.finish(iid)
            if not state:
                return   # not ours, or already ended
            reached = status == "ANSWER"
            log.info("[call %s] callback ended: customer %s", iid[:8], "reached" if reached else status.lower())
            await self.store.update(iid, state="ended", ended_at=utcnow(),
                                    outcome=(Outcome.ANSWERED if reached else Outcome.CALLBACK_FAILED).value)
