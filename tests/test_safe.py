"""Injection at the edge: the allowlists in ivr.safe, AGI quoting and parsing, and what reaches the AMI socket.

The AMI tests run ``AmiClient`` against a tiny AMI server on 127.0.0.1 started here: it greets, answers every
action with ``Response: Success`` and records the raw bytes it received, so the tests can check that an unsafe
value never reaches the socket and that caller-controlled text never produces an extra header line.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import pytest
from panoramisk.message import Message

from ivr import safe
from ivr.agi import AgiChannel, AgiCommandError, AgiResult, CallHangup, parse_env, parse_result, quote_arg
from ivr.ami import AmiClient, AmiSettings
from ivr.safe import UnsafeValue

pytestmark = pytest.mark.unit

LINE_BREAKS = ["\r", "\n", "\r\n", "\x00", "a\r\nAction: Originate", "x\nChannel: PJSIP/other", "end\x00"]


# ------------------------------------------------------------------------------------------------ ivr.safe
@pytest.mark.parametrize("value", LINE_BREAKS)
def test_check_text_refuses_line_breaks_and_nul(value: str) -> None:
    with pytest.raises(UnsafeValue, match="line break or NUL"):
        safe.check_text(value)


@pytest.mark.parametrize("value", ["", "plain text", "1,2&3${EPOCH}", "你好", "tab\tis fine", "quote \" ok"])
def test_check_text_passes_single_lines(value: str) -> None:
    assert safe.check_text(value) == value


@pytest.mark.parametrize("value", ["operator", "ivr-transfer", "queue_1", "+8610", "A" * 64])
def test_name_accepts_plain_names(value: str) -> None:
    assert safe.name(value) == value


@pytest.mark.parametrize("value", ["", "a,b", "a&b", "a b", "${EXTEN}", "$[1+1]", "ctx\n", "ctx\r\nAction: x",
                                   "a\x00", "a;b", "a|b", "a(b)", "a\"b", "a'b", "a\\b", "a/b", "A" * 65, "ö"])
def test_name_refuses_dialplan_syntax(value: str) -> None:
    with pytest.raises(UnsafeValue):
        safe.name(value, "context")


def test_unsafe_value_is_a_value_error() -> None:
    """Pydantic turns ValueError from validators into flow errors, so flow files get positions, not crashes."""
    assert issubclass(UnsafeValue, ValueError)


@pytest.mark.parametrize(("check", "good", "bad"), [
    (safe.digits, ["", "0", "123#", "*9", "0123456789*#"], ["a", "1,2", "1 2", "1\n", "1&2", "٣", "１", "#" * 65]),
    (safe.var_name, ["x", "_x", "IVR_DEST_CONTEXT", "a1"], ["", "1a", "a-b", "a b", "a=b", "${A}", "a\n", "a:b"]),
    (safe.channel, ["PJSIP/softphone-00000001", "Local/100@ivr-entry-00000001;1", "SIP/1.2.3.4:5060-0a"],
     ["", "PJSIP/a,b", "PJSIP/a&b", "PJSIP/a b", "PJSIP/a\r\nAction: Hangup", "PJSIP/${X}", "PJSIP/a\x00"]),
    (safe.sound_path, ["ivr-bridge/prompts/en/abc", "custom/hello-world.8k"],
     ["../etc/passwd", "a/../../b", "a b", "a,b", "a;b", "a&b", "a\nb", "${X}", "a|b", ""]),
])
def test_allowlists(check: Any, good: list[str], bad: list[str]) -> None:
    for value in good:
        assert check(value) == value
    for value in bad:
        with pytest.raises(UnsafeValue):
            check(value)


@pytest.mark.parametrize("value", [None, 123, b"123", ["1"]])
def test_allowlists_refuse_non_strings(value: Any) -> None:
    with pytest.raises(UnsafeValue):
        safe.name(value)


@pytest.mark.parametrize("value", ["en", "billing", "1,2&3", "a b c", "x=y", "100%", "it's", "$5", "{x}", "你好"])
def test_var_value_accepts_plain_text(value: str) -> None:
    assert safe.var_value(value) == value


@pytest.mark.parametrize("value", ['say "hi"', "back\\slash", "${EPOCH}", "a${SHELL(id)}b", "$[1+1]", "x$[",
                                   "a\r\nb", "a\nb", "a\x00", "x" * 257])
def test_var_value_refuses_quotes_backslashes_and_expressions(value: str) -> None:
    with pytest.raises(UnsafeValue):
        safe.var_value(value)


@pytest.mark.parametrize(("raw", "expected"), [
    ("13800138000", "13800138000"), ("+8613800138000", "+8613800138000"), ("100", "100"),
    (None, "anonymous"), ("", "anonymous"), ("anonymous", "anonymous"), ("Anonymous", "anonymous"),
    ("unknown", "anonymous"), ("+", "anonymous"), ("++86", "anonymous"), ("86+", "anonymous"),
    ("+86 138", "anonymous"), ("138-0013", "anonymous"), ("(010) 1234", "anonymous"),
    ("1" * 20, "1" * 20), ("1" * 21, "anonymous"), ("123\r\n", "anonymous"), ("123\n", "anonymous"),
    ("123\x00", "anonymous"), ("1,2", "anonymous"), ("1&2", "anonymous"), ("${CALLERID(num)}", "anonymous"),
    ("١٢٣", "anonymous"), ("１２３", "anonymous"), ("sip:100@example.com", "anonymous"), ("\"100\"", "anonymous"),
    ("1\nagi_uniqueid: 9", "anonymous"),
])
def test_caller_number(raw: str | None, expected: str) -> None:
    assert safe.caller_number(raw) == expected


# ------------------------------------------------------------------------------------------------ AGI text
@pytest.mark.parametrize(("value", "quoted"), [
    ("", '""'), ("hello", '"hello"'), ("1,2&3${EPOCH}", '"1,2&3${EPOCH}"'), ("$[1+1]", '"$[1+1]"'),
    ("a b", '"a b"'), ("ivr-bridge/prompts/en/x", '"ivr-bridge/prompts/en/x"'), ("你好", '"你好"'),
])
def test_quote_arg_wraps_one_argument(value: str, quoted: str) -> None:
    """Inside double quotes, spaces, commas, & and ${...} stay one literal AGI argument."""
    assert quote_arg(value) == quoted


@pytest.mark.parametrize("value", [*LINE_BREAKS, '"', 'a" "b', 'x" ; HANGUP', "\\", "a\\nb", 'end\\"'])
def test_quote_arg_refuses_what_could_end_the_argument_or_the_command(value: str) -> None:
    with pytest.raises(UnsafeValue):
        quote_arg(value)


@pytest.mark.parametrize(("raw", "code", "result", "data", "endpos", "digit"), [
    ("200 result=0", 200, 0, "", None, None),
    ("200 result=49", 200, 49, "", None, "1"),
    ("200 result=35 endpos=16000", 200, 35, "", 16000, "#"),
    ("200 result=-1", 200, -1, "", None, None),
    ("200 result=1 (timeout)", 200, 1, "timeout", None, "\x01"),
    ("200 result=0 endpos=0", 200, 0, "", 0, None),
    ("200%20result%3D50%0A", 200, 50, "", None, "2"),   # as it comes url-encoded in AsyncAGIExec
    ("200 result=1 (PJSIP%2Fa-1)", 200, 1, "PJSIP/a-1", None, "\x01"),
])
def test_parse_result(raw: str, code: int, result: int, data: str, endpos: int | None, digit: str | None) -> None:
    parsed = parse_result(raw)
    assert parsed == AgiResult(code, result, data, endpos)
    assert parsed.digit == digit


@pytest.mark.parametrize("raw", ["HANGUP", "HANGUP%0A", "511 Command Not Permitted on a dead channel",
                                 "511%20Command%20Not%20Permitted"])
def test_parse_result_hangup(raw: str) -> None:
    with pytest.raises(CallHangup):
        parse_result(raw)


@pytest.mark.parametrize("raw", ["", "garbage", "510 Invalid or unknown command", "520 Invalid command syntax.",
                                 "result=1", "20 result=1", "%00", "200 reslt=1"])
def test_parse_result_errors(raw: str) -> None:
    with pytest.raises(AgiCommandError):
        parse_result(raw)


def encode_env(lines: list[str]) -> str:
    return urllib.parse.quote("".join(f"{line}\n" for line in lines) + "\n")


GENUINE_ENV = [
    "agi_request: async", "agi_channel: PJSIP/trunk-00000001", "agi_language: en", "agi_type: PJSIP",
    "agi_uniqueid: 1700000000.1", "agi_version: 22.0.0", "agi_callerid: 13800138000", "agi_calleridname: Li",
    "agi_dnid: 100", "agi_context: ivr-entry", "agi_extension: s", "agi_priority: 5", "agi_enhanced: 0.0",
    "agi_accountcode: ", "agi_threadid: 140000000", "agi_arg_1: 100",
]


def test_parse_env() -> None:
    env = parse_env(encode_env(GENUINE_ENV))
    assert env["uniqueid"] == "1700000000.1"
    assert env["callerid"] == "13800138000"
    assert env["arg_1"] == "100"
    assert env["accountcode"] == ""
    assert all(not key.startswith("agi_") for key in env)


def test_parse_env_ignores_lines_that_are_not_agi_variables() -> None:
    env = parse_env(encode_env(["agi_callerid: 1", "Action: Originate", "garbage", "agi_arg_1: 100"]))
    assert env == {"callerid": "1", "arg_1": "100"}


def injected(name: str, value: str) -> list[str]:
    """The genuine env where the caller ID (from the far end) carries a line break and a fake variable."""
    return [f"{line}\n{name}: {value}" if line.startswith("agi_callerid:") else line for line in GENUINE_ENV]


def test_caller_id_with_a_line_break_cannot_change_the_dialled_number() -> None:
    """A smuggled copy of a variable drops both copies; the engine reads the number from the event's Exten."""
    env = parse_env(encode_env(injected("agi_arg_1", "999")))
    assert "arg_1" not in env
    assert safe.caller_number(env["callerid"]) == "13800138000"
    fake = parse_env(encode_env([line.replace("13800138000", "1\nagi_foo: x") for line in GENUINE_ENV]))
    assert safe.caller_number(fake["callerid"]) == "1"  # the part before the break, still only digits


def test_caller_id_with_a_line_break_cannot_change_the_uniqueid() -> None:
    env = parse_env(encode_env(injected("agi_uniqueid", "1699999999.7")))
    assert env.get("uniqueid") != "1699999999.7"
    assert "uniqueid" not in env  # both copies dropped: the engine takes Uniqueid from the event header


# ---------------------------------------------------------------------------------------- a tiny AMI server
class FakeAmi:
    """Speaks enough AMI: greeting, Success for every action (and an AsyncAGIExec for AGI actions)."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.actions: list[list[str]] = []  # header lines of each action, in order
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        try:
            while True:
                block = await reader.readuntil(b"\r\n\r\n")
                self.raw += block
                lines = block.decode("utf-8").split("\r\n")[:-2]
                self.actions.append(lines)
                headers = dict(line.split(": ", 1) for line in lines)
                writer.write(f"Response: Success\r\nActionID: {headers['ActionID']}\r\n\r\n".encode())
                if headers["Action"] == "AGI":
                    result = urllib.parse.quote("200 result=0\n")
                    writer.write(f"Event: AsyncAGIExec\r\nChannel: {headers['Channel']}\r\n"
                                 f"CommandID: {headers['CommandID']}\r\nResult: {result}\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def sent(self, action: str) -> list[list[str]]:
        return [lines for lines in self.actions if lines[0] == f"Action: {action}"]


@pytest.fixture
async def ami() -> AsyncIterator[tuple[AmiClient, FakeAmi]]:
    server = FakeAmi()
    await server.start()
    client = AmiClient(AmiSettings(host="127.0.0.1", port=server.port, username="ivr", secret="s3cret",
                                   timeout=2.0, keepalive_interval=60.0, heartbeat_variable=None))
    await client.start()
    try:
        await client.wait_connected(5)
        yield client, server
    finally:
        await client.aclose()
        await server.aclose()


async def test_fake_ami_login_and_action(ami: tuple[AmiClient, FakeAmi]) -> None:
    client, server = ami
    response = await client.action("Setvar", Variable="IVR_BRIDGE_HEARTBEAT", Value="1700000000")
    assert response.get("Response") == "Success"
    (login,) = server.sent("Login")
    assert "Username: ivr" in login and "Secret: s3cret" in login
    (setvar,) = server.sent("Setvar")
    assert setvar[2:] == ["Variable: IVR_BRIDGE_HEARTBEAT", "Value: 1700000000"]


@pytest.mark.parametrize("value", LINE_BREAKS)
async def test_action_refuses_line_breaks_before_writing(ami: tuple[AmiClient, FakeAmi], value: str) -> None:
    client, server = ami
    await client.action("Ping")  # a round trip: everything sent so far has arrived
    before = bytes(server.raw)
    with pytest.raises(UnsafeValue):
        await client.action("Setvar", Variable="X", Value=f"1{value}")
    await client.action("Ping")
    after = bytes(server.raw)[len(before):]
    assert b"Setvar" not in after and b"Originate" not in after
    assert [lines[0] for lines in server.actions[-2:]] == ["Action: Ping", "Action: Ping"]
    assert client.connected


async def test_originate_smuggled_in_a_header_never_reaches_the_socket(ami: tuple[AmiClient, FakeAmi]) -> None:
    client, server = ami
    evil = "1\r\nAction: Originate\r\nChannel: PJSIP/premium-rate\r\nApplication: Dial"
    with pytest.raises(UnsafeValue):
        await client.action("Setvar", Variable="IVR_X", Value=evil)
    with pytest.raises(UnsafeValue):
        await client.action("Setvar", **{"Value\r\nAction": "Originate"})  # through a header name
    with pytest.raises(UnsafeValue):
        await client.action("Ping\r\nAction: Originate")  # through the action name
    await client.action("Ping")
    assert b"Originate" not in server.raw and b"premium" not in server.raw
    assert not client._pending  # nothing left waiting for an answer that will never come


async def test_agi_command_with_caller_text_stays_one_header(ami: tuple[AmiClient, FakeAmi]) -> None:
    client, server = ami
    events: asyncio.Queue[Message | Exception] = asyncio.Queue()
    client.add_event_listener(events.put_nowait)
    channel = AgiChannel(client, "PJSIP/trunk-00000001", events)
    result = await channel.command("SAY ALPHA", "1,2&3${EPOCH}", "#")
    assert result == AgiResult(200, 0, "", None)
    (agi,) = server.sent("AGI")
    assert [line.split(": ", 1)[0] for line in agi] == ["Action", "ActionID", "Channel", "Command", "CommandID"]
    assert agi[3] == 'Command: SAY ALPHA "1,2&3${EPOCH}" "#"'
    assert server.raw.count(b"\r\n\r\n") == len(server.actions)  # every block is one of the actions above


@pytest.mark.parametrize("text", ["1\r\nAction: Originate", "1\nAction: Originate", "a\x00b", 'x" "y', "a\\"])
async def test_agi_command_refuses_unsafe_text_before_sending(ami: tuple[AmiClient, FakeAmi], text: str) -> None:
    client, server = ami
    channel = AgiChannel(client, "PJSIP/trunk-00000001", asyncio.Queue())
    with pytest.raises(UnsafeValue):
        await channel.command("SAY ALPHA", text)
    await client.action("Ping")
    assert server.sent("AGI") == []
    assert b"Originate" not in server.raw


async def test_agi_set_variable_refuses_expressions(ami: tuple[AmiClient, FakeAmi]) -> None:
    client, server = ami
    channel = AgiChannel(client, "PJSIP/trunk-00000001", asyncio.Queue())
    for name, value in [("IVR_DEST_CONTEXT", "${SHELL(id)}"), ("IVR_DEST_CONTEXT", "$[1+1]"),
                        ("IVR DEST", "x"), ("X=Y", "x"), ("X", 'a"b')]:
        with pytest.raises(UnsafeValue):
            await channel.set_variable(name, value)
    await client.action("Ping")
    assert server.sent("AGI") == []


async def test_agi_stream_file_refuses_odd_paths_and_digits(ami: tuple[AmiClient, FakeAmi]) -> None:
    client, server = ami
    channel = AgiChannel(client, "PJSIP/trunk-00000001", asyncio.Queue())
    for path, digits in [("../../etc/passwd", ""), ("prompts/a b", ""), ("prompts/x", "1,2"), ("prompts/x", "a")]:
        with pytest.raises(UnsafeValue):
            await channel.stream_file(path, digits)
    await client.action("Ping")
    assert server.sent("AGI") == []


@pytest.mark.parametrize("name", ["PJSIP/a,b", "PJSIP/a\r\nAction: Hangup", "PJSIP/${X}", ""])
def test_agi_channel_refuses_odd_channel_names(name: str) -> None:
    with pytest.raises(UnsafeValue):
        AgiChannel(AmiClient(AmiSettings("127.0.0.1", 1, "u", "s")), name, asyncio.Queue())
