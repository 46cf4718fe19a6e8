"""The SMTP gateway against a real SMTP server: the dev mail sink (aiosmtpd) on a free loopback port.

One case needs a server misbehaving in a way aiosmtpd will not: ``FakeSmtp`` below answers every command, records
the DATA bytes as they arrive and then, after the final dot, replies as told, stays silent or hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import EmailConfig
from bridge.outbox import Outgoing, SendResult
from email_out.devsink import DevMailSink, read_mailbox
from email_out.smtp import SmtpGateway

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parent.parent

SUBJECT = "您的查询链接"
TEXT = "您好！\n.a line starting with a dot\n.\n..two dots\n请点击：https://help.example.com/a/42\n"
HTML = "<p>您好！</p><p><a href=\"https://help.example.com/a/42\">查看答案</a></p>"


def outgoing(n: int = 1, recipient: str = "caller@example.com", **payload: str) -> Outgoing:
    body = {"subject": f"{SUBJECT} {n}", "text": TEXT, "html": HTML} | payload
    return Outgoing(followup_id=f"f-{n}", idempotency_key=f"key-{n}", channel="email", recipient=recipient,
                    language="zh-CN", payload=body)


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class Handing:
    """A ``handing`` callback that counts its calls and runs ``check`` (e.g. "nothing arrived yet") in them."""

    def __init__(self, check: Callable[[], Awaitable[None]] | None = None) -> None:
        self.calls = 0
        self.check = check

    async def __call__(self, then: Callable[[], None] | None = None) -> None:
        self.calls += 1
        if self.check is not None:
            await self.check()
        if then is not None:  # as the outbox does, right after recording the hand-over
            then()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[DevMailSink]:
    server = DevMailSink(tmp_path / "mail", port=0)
    await server.start()
    yield server
    await server.aclose()


@pytest.fixture
async def gateways() -> AsyncIterator[Callable[..., Awaitable[SmtpGateway]]]:
    """Makes started gateways (``EmailConfig`` fields as keywords) and closes them after the test."""
    made: list[SmtpGateway] = []

    async def make(port: int, **settings: Any) -> SmtpGateway:
        defaults = {"helo_name": "gateway.ivr-bridge.test", "timeout": 5.0, "from_addr": "help@example.com",
                    "from_name": "客服中心"}
        config = EmailConfig.model_validate({"port": port} | defaults | settings)
        gateway = SmtpGateway(config)
        await gateway.start()
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        await gateway.aclose()


# ------------------------------------------------------------------------------------------------ delivery
async def test_a_message_arrives_with_both_parts_intact(sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port)
    result = await gateway.send(outgoing(), Handing())
    [mail] = read_mailbox(sink.directory)
    assert result == SendResult("sent", gateway_ref=mail.path.stem)
    assert mail.to == "caller@example.com"
    assert mail.mail_from == "help@example.com"
    assert mail.subject == f"{SUBJECT} 1"
    assert mail.text == TEXT  # dot-stuffed on the way, unstuffed by the server
    assert mail.html.rstrip("\n") == HTML
    assert mail.message_id == mail.message["Message-ID"]
    assert mail.message_id.endswith("@example.com>")
    assert mail.message["From"].addresses[0].display_name == "客服中心"


async def test_a_resend_carries_the_same_message_id(sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port)
    for _ in range(2):
        assert (await gateway.send(outgoing(7), Handing())).status == "sent"
    first, second = read_mailbox(sink.directory)
    assert first.message_id == second.message_id


async def test_many_messages_share_the_configured_number_of_connections(sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port, connections=3)
    results = await asyncio.gather(*(gateway.send(outgoing(n), Handing()) for n in range(40)))
    assert {r.status for r in results} == {"sent"}
    mails = read_mailbox(sink.directory)
    assert sorted(m.subject for m in mails) == sorted(f"{SUBJECT} {n}" for n in range(40))
    assert len({m.message_id for m in mails}) == 40
    assert sink.connections == gateway.opened == 3
    # ... and the pool keeps them open for the next messages.
    assert (await gateway.send(outgoing(99), Handing())).status == "sent"
    assert sink.connections == 3


async def test_handing_runs_once_after_rcpt_and_before_the_server_has_the_message(
        sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port)

    async def nothing_delivered_yet() -> None:
        assert read_mailbox(sink.directory) == []
        assert sink.received == 0

    handing = Handing(nothing_delivered_yet)
    assert (await gateway.send(outgoing(), handing)).status == "sent"
    assert handing.calls == 1
    assert len(read_mailbox(sink.directory)) == 1


async def test_server_without_8bitmime_gets_a_7bit_message(tmp_path: Path, gateways: Any) -> None:
    # With eight_bit=False aiosmtpd refuses any non-ASCII byte in DATA ("500 strict ASCII mode").
    sink = DevMailSink(tmp_path / "mail", port=0, eight_bit=False)
    await sink.start()
    try:
        gateway = await gateways(sink.port)
        assert (await gateway.send(outgoing(text="短行\n" + "长" * 300), Handing())).status == "sent"
        [mail] = read_mailbox(sink.directory)
        assert mail.text == "短行\n" + "长" * 300
        assert mail.path.read_bytes().isascii()
    finally:
        await sink.aclose()


async def test_the_dev_sink_command_prints_each_mail_and_stops_on_sigterm(tmp_path: Path, gateways: Any) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "email_out.devsink", "--dir", str(tmp_path / "mail"), "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=PROJECT_DIR)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            assert b"dev mail sink on" in await proc.stdout.readline()
            gateway = await gateways(port)
            assert (await gateway.send(outgoing(3), Handing())).status == "sent"
            line = (await proc.stdout.readline()).decode()
            assert line.startswith(f"mail from help@example.com to caller@example.com: {SUBJECT} 3")
            await gateway.aclose()
            proc.send_signal(signal.SIGTERM)
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert [m.subject for m in read_mailbox(tmp_path / "mail")] == [f"{SUBJECT} 3"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ------------------------------------------------------------------------------------------------ refusals
async def test_refused_recipient_fails_without_handing_and_the_connection_stays_usable(
        tmp_path: Path, gateways: Any) -> None:
    sink = DevMailSink(tmp_path / "mail", port=0, refuse_recipients={"gone@example.com"})
    await sink.start()
    try:
        gateway = await gateways(sink.port, connections=1)
        handing = Handing()
        result = await gateway.send(outgoing(1, recipient="gone@example.com"), handing)
        assert result.status == "failed"
        assert result.error is not None and "550" in result.error and "RCPT" in result.error
        assert handing.calls == 0
        # RSET cleared the refused transaction: the next message goes out on the same connection.
        assert (await gateway.send(outgoing(2), handing)).status == "sent"
        assert handing.calls == 1
        assert sink.connections == 1
        assert [m.to for m in read_mailbox(sink.directory)] == ["caller@example.com"]
    finally:
        await sink.aclose()


async def test_deferred_recipient_is_retried_without_handing(tmp_path: Path, gateways: Any) -> None:
    sink = DevMailSink(tmp_path / "mail", port=0, defer_recipients={"busy@example.com"})
    await sink.start()
    try:
        gateway = await gateways(sink.port)
        handing = Handing()
        result = await gateway.send(outgoing(recipient="busy@example.com"), handing)
        assert (result.status, handing.calls) == ("retry", 0)
        assert result.error is not None and "451" in result.error
    finally:
        await sink.aclose()


async def test_invalid_recipient_fails_without_connecting(sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port)
    handing = Handing()
    result = await gateway.send(outgoing(recipient="not an address"), handing)
    assert (result.status, handing.calls, sink.connections) == ("failed", 0, 0)


async def test_header_injection_fails_without_connecting(sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port)
    result = await gateway.send(outgoing(subject="hi\r\nBcc: victim@example.net"), Handing())
    assert result.status == "failed"
    assert sink.connections == 0


async def test_server_down_means_retry(gateways: Any) -> None:
    gateway = await gateways(free_port())
    handing = Handing()
    result = await gateway.send(outgoing(), handing)
    assert (result.status, handing.calls) == ("retry", 0)
    assert result.error is not None and "cannot connect" in result.error


async def test_a_restarted_server_is_reconnected_to(sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port, connections=1)
    assert (await gateway.send(outgoing(1), Handing())).status == "sent"
    await sink.aclose()  # drops the pooled connection
    again = DevMailSink(sink.directory, port=sink.port)
    await again.start()
    try:
        assert (await gateway.send(outgoing(2), Handing())).status == "sent"
        assert gateway.opened == 2
        assert len(read_mailbox(sink.directory)) == 2
    finally:
        await again.aclose()


async def test_a_failing_handing_abandons_the_message_undelivered(sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port, connections=1)

    async def database_down(then: Any = None) -> None:
        raise RuntimeError("outbox row could not be marked")

    with pytest.raises(RuntimeError, match="could not be marked"):
        await gateway.send(outgoing(1), database_down)
    assert (await gateway.send(outgoing(2), Handing())).status == "sent"
    assert [m.subject for m in read_mailbox(sink.directory)] == [f"{SUBJECT} 2"]
    assert gateway.opened == 2  # the connection holding the half-sent message was closed


async def test_a_send_cancelled_in_handing_delivers_nothing(sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(sink.port)
    entered = asyncio.Event()

    async def slow(then: Any = None) -> None:
        entered.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(gateway.send(outgoing(), slow))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: sink.open_connections == 0, "the server to see the connection closed")
    assert read_mailbox(sink.directory) == []


@pytest.mark.parametrize("hang_up", ["close", "abort"])
async def test_the_dev_sink_keeps_a_message_whose_client_left_right_after_the_final_dot(
        sink: DevMailSink, hang_up: str) -> None:
    # As a real MTA does (RFC 1047): a dispatcher killed just after writing the dot must not lose the mail.
    for n in range(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        await reader.readline()
        for command in (b"EHLO client", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"):
            writer.write(command + b"\r\n")
            while (line := await reader.readline())[3:4] == b"-":
                pass
            assert line[:1] in (b"2", b"3"), line
        writer.write(b"Subject: left %d\r\n\r\nbody\r\n.\r\n" % n)
        writer.transport.abort() if hang_up == "abort" else writer.close()
    await wait_until(lambda: len(read_mailbox(sink.directory)) == 10, "all ten mails to be stored")
    assert sorted(m.subject for m in read_mailbox(sink.directory)) == [f"left {n}" for n in range(10)]


# ------------------------------------------------------------------------------------------------ TLS, AUTH
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for localhost / 127.0.0.1 (openssl; the cryptography package is not here)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    yield cert, key


@pytest.fixture
async def tls_sink(tmp_path: Path, certificate: tuple[Path, Path]) -> AsyncIterator[DevMailSink]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = DevMailSink(tmp_path / "mail", port=0, tls_context=context, auth={"ivr": "s3cret"})
    await server.start()
    yield server
    await server.aclose()


async def test_starttls_and_auth_with_a_self_signed_certificate(tls_sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(tls_sink.port, starttls=True, validate_certs=False, username="ivr",
                             password="s3cret")
    assert (await gateway.send(outgoing(), Handing())).status == "sent"
    [mail] = read_mailbox(tls_sink.directory)
    assert mail.text == TEXT


async def test_wrong_password_is_retried_not_failed(tls_sink: DevMailSink, gateways: Any) -> None:
    """Decision: bad credentials are the gateway's configuration, not the message; retry until fixed."""
    gateway = await gateways(tls_sink.port, starttls=True, validate_certs=False, username="ivr",
                             password="wrong")
    handing = Handing()
    result = await gateway.send(outgoing(), handing)
    assert (result.status, handing.calls) == ("retry", 0)
    assert result.error is not None and "authentication" in result.error and "535" in result.error
    assert read_mailbox(tls_sink.directory) == []


async def test_an_untrusted_certificate_is_refused_when_validating(tls_sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(tls_sink.port, starttls=True, validate_certs=True, username="ivr",
                             password="s3cret")
    result = await gateway.send(outgoing(), Handing())
    assert result.status == "retry"
    assert result.error is not None and "CERTIFICATE_VERIFY_FAILED" in result.error


async def test_a_sink_without_tls_takes_auth_in_the_clear(tmp_path: Path, gateways: Any) -> None:
    sink = DevMailSink(tmp_path / "mail", port=0, auth={"ivr": "s3cret"})
    await sink.start()
    try:
        gateway = await gateways(sink.port, username="ivr", password="s3cret")
        assert (await gateway.send(outgoing(), Handing())).status == "sent"
        unauthenticated = await gateways(sink.port)
        result = await unauthenticated.send(outgoing(2), Handing())
        assert result.status == "retry"  # 530 at MAIL FROM: missing credentials are configuration, as 535
        assert result.error is not None and "530" in result.error
    finally:
        await sink.aclose()


async def test_auth_is_not_offered_without_starttls(tls_sink: DevMailSink, gateways: Any) -> None:
    gateway = await gateways(tls_sink.port, starttls=False, username="ivr", password="s3cret")
    result = await gateway.send(outgoing(), Handing())
    assert result.status == "retry"
    assert read_mailbox(tls_sink.directory) == []


# ------------------------------------------------------------------------------------------------ after the dot
class FakeSmtp(asyncio.Protocol):
    """Answers like a server until the final dot, then does ``after_dot``: a reply line, "silent" or "hangup"."""

    def __init__(self, after_dot: str, give_up_after: int | None = None) -> None:
        self.after_dot = after_dot
        self.give_up_after = give_up_after  # answer MAIL with 421 once this many messages went through
        self.messages = 0
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.data = b""
        self.in_data = False
        self.got_dot = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 fake ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        assert self.transport is not None
        if self.in_data:
            self.data += chunk
            if self.data.endswith(b"\r\n.\r\n"):
                self.in_data, self.got_dot = False, True
                self.messages += 1
                if self.after_dot == "hangup":
                    self.transport.close()
                elif self.after_dot != "silent":
                    self.transport.write(self.after_dot.encode() + b"\r\n")
            return
        self.buffer += chunk
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"DATA":
                self.in_data = True
                self.transport.write(b"354 go ahead\r\n")
            elif verb == b"MAIL" and self.give_up_after is not None and self.messages >= self.give_up_after:
                self.transport.write(b"421 4.4.2 idle too long, closing\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
            else:  # EHLO (no extensions: the 7-bit path), MAIL, RCPT, RSET
                self.transport.write(b"250 ok\r\n")


@pytest.fixture
async def fake_smtp() -> AsyncIterator[Callable[..., Awaitable[tuple[int, list[FakeSmtp]]]]]:
    servers: list[asyncio.Server] = []

    async def start(after_dot: str, give_up_after: int | None = None) -> tuple[int, list[FakeSmtp]]:
        sessions: list[FakeSmtp] = []

        def factory() -> FakeSmtp:
            sessions.append(FakeSmtp(after_dot, give_up_after))
            return sessions[-1]

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1]), sessions

    yield start
    for server in servers:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


@pytest.mark.parametrize(("after_dot", "status", "ref"), [
    ("250 2.0.0 Ok: queued as 4Ft1Zb2kqBz9sWH", "sent", "4Ft1Zb2kqBz9sWH"),
    ("250 OK", "sent", "<message-id>"),
    ("451 4.3.0 temporary failure", "retry", None),
    ("554 5.7.1 rejected as spam", "failed", None),
    ("hangup", "unknown", None),
    ("silent", "unknown", None),
])
async def test_the_reply_to_the_final_dot_decides(fake_smtp: Any, gateways: Any, after_dot: str, status: str,
                                                  ref: str | None) -> None:
    port, sessions = await fake_smtp(after_dot)
    gateway = await gateways(port, timeout=0.5)

    async def body_arrived_but_not_the_dot() -> None:
        await wait_until(lambda: sessions and re.search(rb"--=+\d+==--\r\n$", sessions[0].data),
                         "the whole body at the server")
        assert not sessions[0].got_dot

    handing = Handing(body_arrived_but_not_the_dot)
    result = await gateway.send(outgoing(), handing)
    assert handing.calls == 1
    assert sessions[0].got_dot
    assert result.status == status
    if ref == "<message-id>":
        assert result.gateway_ref is not None and re.fullmatch(r"<[0-9a-f]{32}@example\.com>", result.gateway_ref)
    else:
        assert result.gateway_ref == ref
    if status != "sent":
        assert result.error


async def test_a_pooled_connection_the_server_gave_up_on_is_replaced_transparently(fake_smtp: Any,
                                                                                   gateways: Any) -> None:
    port, sessions = await fake_smtp("250 OK", give_up_after=1)
    gateway = await gateways(port, connections=1)
    handing = Handing()
    assert (await gateway.send(outgoing(1), handing)).status == "sent"
    assert (await gateway.send(outgoing(2), handing)).status == "sent"
    assert handing.calls == 2
    assert [s.messages for s in sessions] == [1, 1]
