"""One call's AsyncAGI channel: AGI commands as awaitables, results parsed, hang-up as a normal end.

Commands go out as the AMI ``AGI`` action with a ``CommandID``; Asterisk answers with an ``AsyncAGIExec`` event
carrying the url-encoded result. The engine routes this call's events into ``events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import urllib.parse
from dataclasses import dataclass

from panoramisk.message import Message

from ivr import safe
from ivr.ami import AmiClient, AmiDisconnected, AmiError, AmiTimeout

log = logging.getLogger(__name__)

_RESULT_RE = re.compile(r"^(?P<code>\d{3})[ -]result=(?P<result>-?\d*)\s*(?:\((?P<data>[^)]*)\))?"
                        r"(?:\s*endpos=(?P<endpos>\d+))?")
DIAL_TARGET_RE = re.compile(r"PJSIP/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # an agent phone's endpoint
DIAL_TIMEOUT = 6 * 3600.0   # the longest conversation a Dial may bridge before ivr-bridge gives up waiting


def _wake(channel: str) -> tuple[str, dict[str, str]]:
    return ("Setvar", {"Channel": channel, "Variable": "TIMEOUT(absolute)", "Value": "0"})


class CallHangup(Exception):
    """The caller hung up (or the channel left AsyncAGI): a normal end of the call, not an error."""


class LinkLost(Exception):
    """The AMI link dropped while a command was in flight; the node can be replayed after reconnecting."""

    retryable = True


class AgiCommandError(Exception):
    """Asterisk refused the command (bad syntax, unknown command)."""

    error_id = "agi-command"
    retryable = False


@dataclass(frozen=True)
class AgiResult:
    code: int
    result: int
    data: str
    endpos: int | None

    @property
    def digit(self) -> str | None:
        """The DTMF digit a STREAM FILE / WAIT FOR DIGIT returned, if any."""
        return chr(self.result) if self.result > 0 else None


def parse_result(raw: str) -> AgiResult:
    text = urllib.parse.unquote(raw).strip()
    if text == "HANGUP" or text.startswith("511"):
        raise CallHangup(text)
    match = _RESULT_RE.match(text)
    if not match:
        raise AgiCommandError(f"unexpected AGI result {text!r}")
    code = int(match["code"])
    if code != 200:
        raise AgiCommandError(f"AGI error {text!r}")
    result = int(match["result"]) if match["result"] not in ("", "-") else 0
    endpos = int(match["endpos"]) if match["endpos"] else None
    return AgiResult(code, result, match["data"] or "", endpos)


def parse_env(raw: str) -> dict[str, str]:
    """The ``Env`` header of AsyncAGIStart: url-encoded ``agi_key: value`` lines.

    Caller ID and name travel in the same text, so a caller can smuggle a line break and a fake ``agi_*`` line
    into it. A key seen twice is therefore dropped entirely: neither copy can be trusted.
    """
    env: dict[str, str] = {}
    seen_twice: set[str] = set()
    for line in urllib.parse.unquote(raw).splitlines():
        key, sep, value = line.partition(": ")
        if sep and key.startswith("agi_"):
            name = key[4:]
            if name in env:
                seen_twice.add(name)
            env[name] = value.strip()
    for name in seen_twice:
        del env[name]
    return env


def quote_arg(value: str) -> str:
    """Quote one AGI argument. CR/LF/NUL and double quotes are refused rather than escaped."""
    safe.check_text(value, "AGI argument")
    if '"' in value or "\\" in value:
        raise safe.UnsafeValue(f"AGI argument {value!r} may not contain quotes or backslashes")
    return f'"{value}"'


class AgiChannel:
    """Send AGI commands to one channel in AsyncAGI and wait for their results."""

    _ids = itertools.count(1)

    def __init__(self, ami: AmiClient, channel: str, events: asyncio.Queue[Message | Exception]) -> None:
        self.ami = ami
        self.channel = safe.channel(channel, "channel")
        self.events = events
        self.hung_up = False

    async def command(self, verb: str, *args: str, timeout: float = 120) -> AgiResult:
        """Run ``VERB "arg" ...`` and return its parsed result."""
        if self.hung_up:
            raise CallHangup("channel already hung up")
        if not re.fullmatch(r"[A-Z ]+", verb):
            raise AgiCommandError(f"bad AGI verb {verb!r}")
        text = " ".join([verb, *(quote_arg(a) for a in args)])
        command_id = f"{self.ami.new_action_id()}-c{next(self._ids)}"
        try:
            # Asterisk's AsyncAGI loop only looks for queued commands when a frame arrives from the caller (every
            # 20 ms) or after 100 ms. Writing TIMEOUT(absolute)=0 (no absolute timeout: the IVR sets none) queues a
            # null frame on the channel, which wakes it at once: the command starts without waiting for the
            # caller's next packet.
            response = await self.ami.action("AGI", Channel=self.channel, Command=text, CommandID=command_id,
                                             then=_wake(self.channel))
        except (AmiDisconnected, AmiTimeout) as exc:
            raise LinkLost(str(exc)) from exc
        if response.get("Response") != "Success":
            message = str(response.get("Message", ""))
            if "does not exist" in message or "not running" in message.lower() or "AsyncAGI" in message:
                self.hung_up = True
                raise CallHangup(message)
            raise AgiCommandError(f"{verb}: {message}")
        return await self._wait_result(command_id, timeout)

    async def _wait_result(self, command_id: str, timeout: float) -> AgiResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AgiCommandError(f"no AGI result in {timeout:.0f} s")
            try:
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives in the same loop
                # iteration as the event (CPython gh-86296), and the call task would then run on after aclose().
                async with asyncio.timeout(remaining):
                    item = await self.events.get()
            except TimeoutError:
                continue
            if isinstance(item, Exception):
                if isinstance(item, LinkLost):
                    raise LinkLost(str(item))
                raise item
            event = item.get("Event")
            if event == "AsyncAGIExec" and item.get("CommandID") == command_id:
                try:
                    return parse_result(str(item.get("Result", "")))
                except CallHangup:
                    self.hung_up = True
                    raise
            if event in ("AsyncAGIEnd", "Hangup"):
                self.hung_up = True
                raise CallHangup(event)
            # A result of a command from before a link loss: stale, ignore it.

    # ------------------------------------------------------------------------------------------ verbs
    async def answer(self) -> None:
        await self.command("ANSWER")

    async def stream_file(self, path: str, escape_digits: str = "") -> str | None:
        """Play a sound (path without extension); returns the digit that interrupted it, if any."""
        safe.sound_path(path.lstrip("/"), "sound path")
        safe.digits(escape_digits, "escape digits")
        result = await self.command("STREAM FILE", path, escape_digits)
        if result.result < 0:
            raise CallHangup("stream file failed: channel gone")
        return result.digit

    async def wait_for_digit(self, timeout_ms: int) -> str | None:
        result = await self.command("WAIT FOR DIGIT", str(int(timeout_ms)))
        if result.result < 0:
            raise CallHangup("wait for digit: channel gone")
        return result.digit

    async def set_variable(self, name: str, value: str) -> None:
        await self.command("SET VARIABLE", safe.var_name(name), safe.var_value(value))

    async def get_full_variable(self, expression: str, timeout: float = 120) -> str | None:
        """Evaluate a fixed expression (never caller input) such as ``${CHANNEL(pjsip,call-id)}``."""
        result = await self.command("GET FULL VARIABLE", expression, timeout=timeout)
        return result.data if result.result == 1 else None

    async def music_on_hold(self, on: bool, music_class: str = "default") -> None:
        """Start or stop music on hold (a prompt stops it too: start it again after one)."""
        if on:
            await self.command("SET MUSIC", "on", safe.name(music_class, "music class"))
        else:
            await self.command("SET MUSIC", "off")

    async def dial(self, target: str, ring_seconds: int, *, hold_music: bool = True) -> str:
        """Ring ``target`` (``TECH/resource``, e.g. ``PJSIP/agent1``) and bridge the caller to it; returns
        ``DIALSTATUS`` once the bridge has ended (ANSWER) or nobody answered (NOANSWER, BUSY, CHANUNAVAIL ...).
        With ``hold_music`` the caller hears music on hold while it rings, never silence."""
        if not DIAL_TARGET_RE.fullmatch(target):
            raise AgiCommandError(f"bad dial target {target!r:.80}")
        # g: the caller stays (and the flow goes on) when the agent hangs up first
        options = f"{target},{int(ring_seconds)},g" + ("m" if hold_music else "")
        # A conversation may last hours: the result comes when the bridge ends.
        result = await self.command("EXEC", "Dial", options, timeout=DIAL_TIMEOUT)
        if result.result < 0:
            raise CallHangup("the caller hung up during Dial")
        return (await self.get_full_variable("${DIALSTATUS}")) or "UNKNOWN"

    async def hangup(self) -> None:
        with contextlib.suppress(CallHangup):
            await self.command("HANGUP")
        self.hung_up = True

    async def leave(self) -> None:
        """End AsyncAGI so the dialplan continues after ``AGI(agi:async)`` (used for transfers)."""
        with contextlib.suppress(CallHangup, AmiError):
            await self.command("ASYNCAGI BREAK")
