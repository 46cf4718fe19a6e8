"""The AMI link against a scripted AMI server: login, dead-link detection, reconnect with capped backoff."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from ivr.ami import AmiClient, AmiDisconnected, AmiSettings

pytestmark = pytest.mark.unit


class FakeAmi:
    """Enough of AMI for the link: greeting, Login, Setvar/Ping answers; can go silent or refuse logins."""

    def __init__(self) -> None:
        self.silent = False
        self.refuse_login = False
        self.connections = 0
        self.connect_times: list[float] = []
        self.actions: list[dict[str, str]] = []
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.connected = asyncio.Event()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def reached(self, count: int) -> None:
        while self.connections < count:
            self.connected.clear()
            await self.connected.wait()

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.connect_times.append(time.monotonic())
        self.connected.set()
        self.writers.append(writer)
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                block = (await reader.readuntil(b"\r\n\r\n")).decode()
                headers = dict(line.split(": ", 1) for line in block.strip().split("\r\n") if ": " in line)
                self.actions.append(headers)
                if self.silent:
                    continue
                ok = not (headers.get("Action") == "Login" and self.refuse_login)
                answer = "Success" if ok else "Error\r\nMessage: Authentication failed"
                writer.write(f"Response: {answer}\r\nActionID: {headers.get('ActionID')}\r\n\r\n".encode())
                if headers.get("Action") == "Login" and ok:
                    writer.write(b"Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n")


@pytest.fixture
async def fake_ami():
    server = FakeAmi()
    port = await server.start()
    server.port = port  # type: ignore[attr-defined]
    yield server
    await server.close()


def _client(port: int, **kw: float) -> AmiClient:
    settings = AmiSettings("127.0.0.1", port, "ivr-bridge", "secret", timeout=kw.get("timeout", 0.5),
                           keepalive_interval=kw.get("keepalive", 0.1),
                           reconnect_max_delay=kw.get("max_delay", 0.4))
    return AmiClient(settings)


async def test_logs_in_and_keeps_the_heartbeat_going(fake_ami: FakeAmi) -> None:
    events: list[str] = []
    client = _client(fake_ami.port)  # type: ignore[attr-defined]
    client.add_event_listener(lambda m: events.append(m.get("Event")))
    await client.start()
    try:
        await client.wait_connected(2)
        await asyncio.sleep(0.35)
        beats = [a for a in fake_ami.actions if a.get("Action") == "Setvar"]
        assert beats and all(b["Variable"] == "IVR_BRIDGE_HEARTBEAT" for b in beats)
        assert abs(int(beats[-1]["Value"]) - time.time()) < 5
        assert "FullyBooted" in events
        login = fake_ami.actions[0]
        assert login["Action"] == "Login" and login["Username"] == "ivr-bridge"
    finally:
        await client.aclose()


async def test_a_silent_peer_is_detected_and_the_link_is_rebuilt(fake_ami: FakeAmi) -> None:
    states: list[bool] = []
    lost = asyncio.Event()

    def on_state(up: bool) -> None:
        states.append(up)
        if not up:
            lost.set()

    client = _client(fake_ami.port, timeout=0.3)  # type: ignore[attr-defined]
    client.add_state_listener(on_state)
    await client.start()
    try:
        await client.wait_connected(2)
        fake_ami.silent = True  # the socket stays open but nothing answers: a dead link
        await asyncio.wait_for(lost.wait(), 3)  # the keepalive noticed the silent peer
        fake_ami.silent = False
        await client.wait_connected(3)
        assert client.connects >= 2
        assert states[:2] == [True, False] and states[-1] is True
    finally:
        await client.aclose()


async def test_actions_in_flight_fail_fast_when_the_link_drops(fake_ami: FakeAmi) -> None:
    client = _client(fake_ami.port, timeout=5)  # type: ignore[attr-defined]
    await client.start()
    try:
        await client.wait_connected(2)
        fake_ami.silent = True
        pending = asyncio.create_task(client.action("Ping"))
        await asyncio.sleep(0.05)
        fake_ami.cut()
        started = time.monotonic()
        with pytest.raises(AmiDisconnected):
            await pending
        assert time.monotonic() - started < 1
        with pytest.raises(AmiDisconnected):
            await client.action("Ping")  # not connected now: refused at once, never queued for later
    finally:
        await client.aclose()


async def test_reconnect_backoff_grows_and_is_capped(fake_ami: FakeAmi) -> None:
    fake_ami.refuse_login = True
    client = _client(fake_ami.port, max_delay=0.4)  # type: ignore[attr-defined]
    await client.start()
    try:
        await asyncio.wait_for(fake_ami.reached(7), 4)
        gaps = [b - a for a, b in zip(fake_ami.connect_times, fake_ami.connect_times[1:], strict=False)]
        assert len(gaps) >= 5
        assert gaps[0] < gaps[2], f"backoff did not grow: {gaps}"
        assert max(gaps) < 0.4 * 1.2 + 0.15, f"backoff not capped: {gaps}"
        assert not client.connected
    finally:
        await client.aclose()


async def test_unsafe_header_values_never_reach_the_socket(fake_ami: FakeAmi) -> None:
    client = _client(fake_ami.port)  # type: ignore[attr-defined]
    await client.start()
    try:
        await client.wait_connected(2)
        with pytest.raises(ValueError):
            await client.action("Setvar", Variable="X", Value="1\r\nAction: Originate\r\nChannel: PJSIP/evil")
        with pytest.raises(ValueError):
            await client.action("Setvar", Variable="X", Value="nul\x00byte")
        with pytest.raises(ValueError):
            await client.action("Setvar", **{"Variable\r\nAction": "Originate", "Value": "1"})
        await asyncio.sleep(0.1)
        assert not any(a.get("Action") == "Originate" or "Channel" in a for a in fake_ami.actions)
    finally:
        await client.aclose()
