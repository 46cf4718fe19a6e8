"""``ivr-bridge call``: dial the hotline from the terminal, print each prompt as it plays, send digits.

The prompt texts come from ivr-bridge's event bus (Redis), matched to this call by its SIP Call-ID, so a newcomer
sees what the IVR says without a phone. Digits come from ``--digits 1,0`` (one step after each menu prompt
starts) or are typed, one line at a time; an empty line or ``q`` hangs up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from bridge.config import Config
from bridge.events import subscription
from ivr import safe
from ivr.softphone import CallFailed, Softphone, SoftphoneCall, SoftphoneConfig, sip_uri

INPUT_NODES = ("menu", "collect")


def _say(line: str) -> None:
    print(line, flush=True)


class CallWatcher:
    """Follows this call's events: prints prompts, notes when a node is waiting for input."""

    def __init__(self) -> None:
        self.sip_call_id = ""
        self.call_id = ""
        self.input_prompts: asyncio.Queue[str] = asyncio.Queue()
        self.ended = asyncio.Event()
        self.outcome = ""
        self._node_type = ""
        self._early: list[dict[str, Any]] = []

    def bind(self, sip_call_id: str) -> None:
        self.sip_call_id = sip_call_id
        for event in self._early:
            self.handle(event)
        self._early.clear()

    def handle(self, event: dict[str, Any]) -> None:
        if not self.sip_call_id:
            self._early.append(event)
            return
        kind = event.get("type")
        if kind == "call-started" and event.get("sip_call_id") == self.sip_call_id:
            self.call_id = event.get("call_id", "")
            _say(f"… connected: call {self.call_id[:8]}, flow {event.get('flow')}")
        if not self.call_id or event.get("call_id") != self.call_id:
            return
        if kind == "node":
            self._node_type = str(event.get("node_type", ""))
        elif kind == "prompt":
            _say(f"♪ [{event.get('language')}] {event.get('text')}")
            if self._node_type in INPUT_NODES:
                self.input_prompts.put_nowait(str(event.get("node")))
        elif kind == "input" and event.get("event") not in ("enter",):
            value = f" {event['value']}" if event.get("value") else ""
            _say(f"  · {event.get('node')}: {event.get('event')}{value}")
        elif kind == "call-ended":
            self.outcome = f"{event.get('outcome')} at {event.get('node')}"
            self.ended.set()


async def _watch(config: Config, watcher: CallWatcher, ready: asyncio.Event) -> None:
    async with subscription(config.redis.url, config.redis.events_channel) as events:
        ready.set()
        async for event in events:
            watcher.handle(event)


async def _send_steps(call: SoftphoneCall, watcher: CallWatcher, steps: list[str], gap: float | None) -> None:
    for step in steps:
        if gap is not None:
            await asyncio.sleep(gap)
        else:
            await watcher.input_prompts.get()
            await asyncio.sleep(1.0)  # a moment into the prompt, as a caller would barge in
        _say(f"☎ pressing {step}")
        await call.send_digits(step)


async def _typed(call: SoftphoneCall) -> None:
    loop = asyncio.get_running_loop()
    _say("Type digits and Enter to send them; an empty line or q hangs up.")
    while not call.ended:
        raw = await loop.run_in_executor(None, sys.stdin.readline)
        if raw == "":  # end of input (not a terminal): just listen until the call ends
            return
        line = raw.strip()
        if not line or line.lower() == "q":
            await call.hangup()
            return
        try:
            await call.send_digits(safe.digits(line.replace(" ", "")))
        except ValueError:
            _say("  only 0-9, * and # can be sent")


async def run_call(config: Config, args: argparse.Namespace) -> int:
    """Place one call to the hotline and follow it to its end."""
    try:
        uri = sip_uri(args.number, "127.0.0.1", config.asterisk.sip_port)
        caller = safe.digits(args.caller, "caller number")
        steps = [safe.digits(s.strip(), "digits") for s in args.digits.split(",")] if args.digits else []
    except ValueError as exc:
        print(f"ivr-bridge call: {exc}", file=sys.stderr)
        return 2
    watcher = CallWatcher()
    ready = asyncio.Event()
    watch_task = asyncio.create_task(_watch(config, watcher, ready))
    await asyncio.wait({watch_task, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if watch_task.done():
        print(f"ivr-bridge call: cannot follow the call's prompts (Redis at {config.redis.url}): "
              f"{watch_task.exception()}", file=sys.stderr)
    phone = Softphone(SoftphoneConfig(user=caller))
    await phone.start()
    try:
        _say(f"☎ dialling {args.number} as {caller}")
        call = await phone.dial(uri, record_to=args.record, play=args.say)
        watcher.bind(call.sip_call_id)
        try:
            await call.wait_answered(timeout=15)
        except (CallFailed, TimeoutError) as exc:
            print(f"ivr-bridge call: the call was not answered: {exc}", file=sys.stderr)
            return 1
        driver = asyncio.create_task(_send_steps(call, watcher, steps, args.gap) if steps or args.digits
                                     else _typed(call))
        try:
            await asyncio.wait_for(call.wait_ended(timeout=args.timeout), args.timeout + 1)
        except TimeoutError:
            _say("… time is up, hanging up")
            await call.hangup()
        finally:
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await driver
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher.ended.wait(), 3)
        _say(f"☎ call ended ({'by the IVR' if call.ended_by_remote else 'by you'})"
             + (f": {watcher.outcome}" if watcher.outcome else ""))
        if args.record:
            _say(f"  what you heard is in {args.record}")
        return 0
    finally:
        await phone.aclose()
        watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch_task
