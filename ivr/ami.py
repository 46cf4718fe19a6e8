"""The AMI link: login, keepalive that detects a dead link, reconnect with capped backoff, typed errors.

Framing and message parsing come from panoramisk (``Message.from_line``). The connection itself is ours:
panoramisk 1.4's ``Manager`` pings without noticing a dead peer, reconnects at a fixed pace, re-sends unanswered
actions after a reconnect (wrong for non-idempotent ones) and never completes AsyncAGI command futures on
Asterisk 22 (which has no ``SubEvent`` header). Here every action fails fast with ``AmiDisconnected`` when the
link drops and the caller decides whether to try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from panoramisk.message import Message

from ivr import safe

log = logging.getLogger(__name__)

EOL = "\r\n"
# Headers an event carries once; seeing one twice means a value smuggled in a line break.
_SINGLE_HEADERS = ("Event", "Channel", "Uniqueid", "Linkedid", "CommandID", "ActionID", "Exten", "Context",
                   "Result", "Env", "CallerIDNum", "CallerIDName")
EventListener = Callable[[Message], None]
StateListener = Callable[[bool], Awaitable[None] | None]


def _frame(name: str, action_id: str, headers: dict[str, Any]) -> bytes:
    lines = [f"Action: {safe.name(name, 'AMI action')}", f"ActionID: {action_id}"]
    for key, value in headers.items():
        safe.name(key, "AMI header")
        lines.append(f"{key}: {safe.check_text(str(value), f'AMI header {key}')}")
    return (EOL.join(lines) + EOL + EOL).encode("utf-8")


class AmiError(Exception):
    """An AMI action failed. ``retryable`` says whether trying again later may work."""

    error_id = "ami-error"
    retryable = False

    def __init__(self, message: str, response: Message | None = None) -> None:
        super().__init__(message)
        self.response = response


class AmiDisconnected(AmiError):
    """The link is down (or went down while the action was in flight)."""

    error_id = "ami-disconnected"
    retryable = True


class AmiTimeout(AmiError):
    error_id = "ami-timeout"
    retryable = True


@dataclass
class AmiSettings:
    host: str
    port: int
    username: str
    secret: str
    timeout: float = 5.0
    keepalive_interval: float = 3.0
    reconnect_max_delay: float = 10.0
    heartbeat_variable: str | None = "IVR_BRIDGE_HEARTBEAT"


class AmiClient:
    """One AMI connection kept alive for the life of the process."""

    def __init__(self, settings: AmiSettings) -> None:
        self.settings = settings
        self._ids = itertools.count(1)
        self._prefix = f"ivr-{random.getrandbits(32):08x}-"
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._event_listeners: list[EventListener] = []
        self._state_listeners: list[StateListener] = []
        self._closing = False
        self.connects = 0
        self.last_ping_rtt: float | None = None

    # ------------------------------------------------------------------------------------------ listeners
    def add_event_listener(self, listener: EventListener) -> None:
        self._event_listeners.append(listener)

    def add_state_listener(self, listener: StateListener) -> None:
        """Called with True after each (re)login, False after each loss of the link."""
        self._state_listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    # ------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="ami-link")

    async def aclose(self) -> None:
        self._closing = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._drop_link()

    def drop_link(self) -> None:
        """Close the socket now (tests use it to simulate a cut link); the client reconnects."""
        if self._writer is not None:
            self._writer.transport.abort()

    async def _run(self) -> None:
        delay = 0.25
        while not self._closing:
            try:
                await self._session()
                delay = 0.25  # a session that logged in resets the backoff
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.IncompleteReadError, AmiError, TimeoutError) as exc:
                log.warning("AMI link to %s:%s lost: %s", self.settings.host, self.settings.port,
                            exc or type(exc).__name__)
            finally:
                await self._on_lost()
            if self._closing:
                break
            wait = delay * (0.8 + random.random() * 0.4)
            log.info("AMI reconnecting in %.1f s", wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.settings.reconnect_max_delay)

    async def _session(self) -> None:
        s = self.settings
        async with asyncio.timeout(s.timeout):
            reader, writer = await asyncio.open_connection(s.host, s.port)
        self._writer = writer
        async with asyncio.timeout(s.timeout):
            greeting = await reader.readline()
        if not greeting.startswith(b"Asterisk Call Manager"):
            raise AmiError(f"not an AMI server: {greeting[:60]!r}")
        reader_task = asyncio.create_task(self._read_loop(reader), name="ami-reader")
        keepalive: asyncio.Task[None] | None = None
        try:
            response = await self.action("Login", Username=s.username, Secret=s.secret, Events="on",
                                         _allow_before_login=True)
            if response.get("Response") != "Success":
                raise AmiError(f"AMI login refused for {s.username}: {response.get('Message')}")
            self.connects += 1
            self._connected.set()
            log.info("AMI logged in to %s:%s as %s", s.host, s.port, s.username)
            await self._notify(True)
            keepalive = asyncio.create_task(self._keepalive(), name="ami-keepalive")
            done, _ = await asyncio.wait({reader_task, keepalive}, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                finished.result()  # raise what ended the session
        finally:
            for child in (reader_task, keepalive):
                if child is not None:
                    child.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await child

    async def _keepalive(self) -> None:
        """Each beat is a round trip: no answer within the timeout means the link is dead."""
        s = self.settings
        while True:
            started = time.monotonic()
            if s.heartbeat_variable:
                await self.action("Setvar", Variable=s.heartbeat_variable, Value=str(int(time.time())))
            else:
                await self.action("Ping")
            self.last_ping_rtt = time.monotonic() - started
            await asyncio.sleep(s.keepalive_interval)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            block = await reader.readuntil(b"\r\n\r\n")
            message = Message.from_line(block.decode("utf-8", "replace").strip())
            if message is None:
                continue
            if "Response" in message and "Event" not in message:
                future = self._pending.pop(message.get("ActionID", ""), None)
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            forged = [key for key in _SINGLE_HEADERS if isinstance(message.get(key), list)]
            if forged:
                # Asterisk writes caller numbers into events unescaped: a caller-supplied line break shows up as
                # a repeated header. Such an event cannot be trusted as a whole.
                log.warning("dropping AMI %s event with repeated %s headers (forged by a caller?)",
                            message.get("Event"), ", ".join(forged))
                continue
            if message.get("Event") == "Shutdown":
                log.warning("Asterisk is shutting down")
            for listener in self._event_listeners:
                try:
                    listener(message)
                except Exception:
                    log.exception("AMI event listener failed on %s", message.get("Event"))

    async def _on_lost(self) -> None:
        was_connected = self._connected.is_set()
        self._drop_link()
        if was_connected:
            await self._notify(False)

    def _drop_link(self) -> None:
        self._connected.clear()
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(AmiDisconnected("AMI link lost before the answer came"))

    async def _notify(self, up: bool) -> None:
        for listener in self._state_listeners:
            try:
                result = listener(up)
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("AMI state listener failed")

    # ------------------------------------------------------------------------------------------ actions
    async def action(self, name: str, *, timeout: float | None = None, action_id: str | None = None,
                     then: tuple[str, dict[str, str]] | None = None, _allow_before_login: bool = False,
                     **headers: Any) -> Message:
        """Send one action and return its response message. Header values are checked for CR/LF/NUL.

        ``then`` is a second action written right behind it, whose answer nobody waits for (AMI runs one
        session's actions in order, so it takes effect after the first).
        """
        writer = self._writer
        if writer is None or (not _allow_before_login and not self._connected.is_set()):
            raise AmiDisconnected(f"AMI is not connected (action {name})")
        action_id = action_id or self.new_action_id()
        data = _frame(name, action_id, headers)
        if then is not None:
            data += _frame(then[0], f"{action_id}-then", then[1])
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = future
        writer.write(data)
        limit = timeout or self.settings.timeout
        try:
            async with asyncio.timeout(limit):  # not wait_for: it can swallow a cancellation on 3.11 (gh-86296)
                return await future
        except TimeoutError as exc:
            raise AmiTimeout(f"AMI action {name} got no answer in {limit:.1f} s") from exc
        finally:
            self._pending.pop(action_id, None)

    def new_action_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    async def list_action(self, name: str, complete_event: str, **headers: Any) -> list[Message]:
        """An action answered by a list of events ending with ``complete_event`` (e.g. CoreShowChannels)."""
        action_id = self.new_action_id()
        items: list[Message] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def collect(message: Message) -> None:
            if message.get("ActionID") != action_id:
                return
            if message.get("Event") == complete_event:
                if not done.done():
                    done.set_result(None)
            else:
                items.append(message)

        self._event_listeners.append(collect)
        try:
            response = await self.action(name, action_id=action_id, **headers)
            if response.get("Response") != "Success":
                raise AmiError(f"{name} failed: {response.get('Message')}", response)
            async with asyncio.timeout(self.settings.timeout):
                await done
            return items
        finally:
            self._event_listeners.remove(collect)
