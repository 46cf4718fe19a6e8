"""SMS gateways against local HTTP servers: what each answer and each broken connection becomes, when
``handing`` is awaited, the body templates and headers of the generic HTTP gateway, and delivery-report URLs."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web

from bridge.config import HttpSmsConfig, KannelConfig, SmsConfig
from bridge.outbox import Outgoing
from sms.http_gateway import HttpSmsGateway
from sms.kannel import KannelGateway, parse_dlr, sign_dlr, verify_dlr

pytestmark = pytest.mark.unit

SECRET = "dlr-test-secret"
TRICKY = 'Say "hi" \\ 你好 & 100% + = ? #\n</script> {{ not_a_var }} ${HOME}'


def outgoing(text: str = "hello", recipient: str = "+8613800138000", followup_id: str = "f" * 32) -> Outgoing:
    return Outgoing(followup_id=followup_id, idempotency_key=f"key-{followup_id}", channel="sms",
                    recipient=recipient, language="en", payload={"text": text})


class Handing:
    """A ``handing`` callback that records when it was awaited."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


@dataclass
class Server:
    """A local aiohttp server: ``respond`` decides the answer, ``requests`` keeps what arrived."""

    respond: Callable[[web.Request], Awaitable[web.StreamResponse]]
    requests: list[tuple[web.Request, bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async def default(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=202, text="0: Accepted for delivery")

    srv = Server(default)

    async def handle(request: web.Request) -> web.StreamResponse:
        srv.requests.append((request, await request.read()))
        return await srv.respond(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.port = runner.addresses[0][1]
    try:
        yield srv
    finally:
        await runner.cleanup()


@dataclass
class RawServer:
    """A TCP server that reads requests and then breaks the rules: closes without answering, or stays silent."""

    mode: str
    connections: int = 0
    requests: int = 0   # complete request heads received
    port: int = 0


@contextlib.asynccontextmanager
async def raw_server(mode: str) -> AsyncIterator[RawServer]:
    state = RawServer(mode)
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        state.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            state.requests += 1
            if mode == "silent":
                await reader.read()  # until the client gives up and closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = srv.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        srv.close()
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        await srv.wait_closed()


def closed_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kannel_config(port: int, timeout: float = 2.0) -> SmsConfig:
    return SmsConfig(kannel=KannelConfig(host="127.0.0.1", sendsms_port=port, password="pw", timeout=timeout))


@pytest.fixture
async def kannel_gateway(server: Server) -> AsyncIterator[KannelGateway]:
    gateway = KannelGateway(kannel_config(server.port), "https://help.example.com/cc/", SECRET)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.aclose()


# ---------------------------------------------------------------------------------------------- delivery reports
def test_dlr_signature_verifies_only_its_own_id() -> None:
    sig = sign_dlr(SECRET, "a" * 32)
    assert verify_dlr(SECRET, "a" * 32, sig)
    assert not verify_dlr(SECRET, "b" * 32, sig)
    assert not verify_dlr("other-secret", "a" * 32, sig)
    assert not verify_dlr(SECRET, "a" * 32, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    assert not verify_dlr(SECRET, "a" * 32, "ü" * 32)
    assert not verify_dlr("", "a" * 32, sig)


@pytest.mark.parametrize(("kind", "status"), [("1", "delivered"), ("2", "failed"), ("4", "buffered"),
                                              ("8", "accepted"), ("16", "failed")])
def test_dlr_types_map_to_statuses(kind: str, status: str) -> None:
    query = {"id": "a" * 32, "sig": sign_dlr(SECRET, "a" * 32), "type": kind, "ref": "abc-123"}
    report = parse_dlr(query, secret=SECRET)
    assert (report.followup_id, report.status, report.gateway_ref, report.dlr_type) == \
        ("a" * 32, status, "abc-123", int(kind))


def test_dlr_without_ref_has_no_gateway_ref() -> None:
    report = parse_dlr({"id": "a" * 32, "sig": sign_dlr(SECRET, "a" * 32), "type": "8", "ref": ""}, secret=SECRET)
    assert report.gateway_ref is None


@pytest.mark.parametrize("change", [
    {"sig": "0" * 32}, {"id": "b" * 32}, {"type": "3"}, {"type": "%d"}, {"type": "١"}, {"type": ""},
    {"ref": "a b"}, {"ref": "x" * 200}, {"id": "a/../b"}, {"sig": ""},
])
def test_tampered_or_malformed_dlr_is_refused(change: dict[str, str]) -> None:
    query = {"id": "a" * 32, "sig": sign_dlr(SECRET, "a" * 32), "type": "1", "ref": "r"} | change
    with pytest.raises(ValueError):
        parse_dlr(query, secret=SECRET)


# ---------------------------------------------------------------------------------------------- kannel
def test_sendsms_url_encodes_number_text_and_dlr_url(kannel_gateway: KannelGateway) -> None:
    url = str(kannel_gateway.request_url(outgoing(TRICKY, followup_id="c" * 32)))
    raw_query = urlsplit(url).query
    assert "to=%2B8613800138000" in raw_query                  # Kannel would read a bare '+' as a space
    assert "%25d" in raw_query and "%25F" in raw_query         # Kannel's escapes travel inside the dlr-url
    query = {k: v[0] for k, v in parse_qs(raw_query, keep_blank_values=True).items()}
    assert query["text"] == TRICKY
    assert query["coding"] == "2" and query["charset"] == "UTF-8" and query["dlr-mask"] == "31"
    assert query["dlr-url"] == (f"https://help.example.com/cc/sms/dlr?id={'c' * 32}"
                                f"&sig={sign_dlr(SECRET, 'c' * 32)}&type=%d&ref=%F")


async def test_kannel_acceptance_is_sent_after_handing(server: Server, kannel_gateway: KannelGateway) -> None:
    handing = Handing()
    result = await kannel_gateway.send(outgoing("hi"), handing)
    assert result.status == "sent" and handing.calls == 1
    request, _ = server.requests[0]
    assert request.path == "/cgi-bin/sendsms" and request.query["to"] == "+8613800138000"


async def test_kannel_takes_the_longest_text_that_fits(kannel_gateway: KannelGateway) -> None:
    assert (await kannel_gateway.send(outgoing("长" * 402), Handing())).status == "sent"
    assert (await kannel_gateway.send(outgoing("😀" * 35), Handing())).status == "sent"   # 70 UTF-16 units


async def test_kannel_queued_for_later_is_sent(server: Server, kannel_gateway: KannelGateway) -> None:
    async def queued(_r: web.Request) -> web.Response:
        return web.Response(status=202, text="3: Queued for later delivery")
    server.respond = queued
    assert (await kannel_gateway.send(outgoing(), Handing())).status == "sent"


@pytest.mark.parametrize(("status", "text", "expected"), [
    (403, "Authorization failed for sendsms", "retry"),       # our credentials: not the message's fault
    (400, "Number(s) has/have been denied by white- and/or black-lists.", "failed"),
    (400, "Missing receiver number, rejected", "failed"),
    (503, "Service unavailable", "retry"),
    (202, "4: something new", "unknown"),
])
async def test_kannel_answers_map_to_results(server: Server, kannel_gateway: KannelGateway, status: int,
                                             text: str, expected: str) -> None:
    async def answer(_r: web.Request) -> web.Response:
        return web.Response(status=status, text=text)
    server.respond = answer
    result = await kannel_gateway.send(outgoing(), Handing())
    assert result.status == expected and result.error and text[:20] in result.error
    if status == 403:
        assert result.retry_after and result.retry_after > 0


@pytest.mark.parametrize(("message", "error"), [
    (outgoing(recipient="13800138000"), "E.164"),
    (outgoing(text="  "), "empty"),
    (outgoing(followup_id="bad id%d"), "follow-up id"),
    (outgoing(text="长" * 403), "cut it short"),           # 6 parts of 67: Kannel would truncate silently
])
async def test_kannel_unsendable_message_fails_without_handing(server: Server, kannel_gateway: KannelGateway,
                                                               message: Outgoing, error: str) -> None:
    handing = Handing()
    result = await kannel_gateway.send(message, handing)
    assert result.status == "failed" and error in (result.error or "")
    assert handing.calls == 0 and not server.requests


async def test_kannel_unreachable_is_retry_and_never_handed() -> None:
    gateway = KannelGateway(kannel_config(closed_port()), "http://127.0.0.1:8080", SECRET)
    await gateway.start()
    try:
        handing = Handing()
        result = await gateway.send(outgoing(), handing)
    finally:
        await gateway.aclose()
    assert result.status == "retry" and "cannot connect" in (result.error or "")
    assert handing.calls == 0


async def test_kannel_connection_dropped_after_request_is_unknown_and_not_resent() -> None:
    async with raw_server("close") as state:
        gateway = KannelGateway(kannel_config(state.port), "http://127.0.0.1:8080", SECRET)
        await gateway.start()
        try:
            handing = Handing()
            result = await gateway.send(outgoing(), handing)
        finally:
            await gateway.aclose()
    assert result.status == "unknown" and handing.calls == 1
    # aiohttp's own retry of a broken GET was stopped before it even connected: no second SMS
    assert (state.connections, state.requests) == (1, 1)


async def test_kannel_silence_after_request_is_unknown() -> None:
    async with raw_server("silent") as state:
        gateway = KannelGateway(kannel_config(state.port, timeout=0.3), "http://127.0.0.1:8080", SECRET)
        await gateway.start()
        try:
            handing = Handing()
            started = time.monotonic()
            result = await gateway.send(outgoing(), handing)
        finally:
            await gateway.aclose()
    assert result.status == "unknown" and handing.calls == 1
    assert time.monotonic() - started < 2


async def test_handing_failure_is_raised_not_reported_as_gateway_failure(kannel_gateway: KannelGateway,
                                                                         server: Server) -> None:
    async def broken() -> None:
        raise OSError("database is gone")
    with pytest.raises(OSError, match="database is gone"):
        await kannel_gateway.send(outgoing(), broken)
    assert not server.requests


def test_public_url_with_percent_is_refused() -> None:
    with pytest.raises(ValueError, match="%"):
        KannelGateway(kannel_config(1), "http://example.com/a%20b", SECRET)


async def test_kannel_gateway_needs_a_dlr_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        await KannelGateway(kannel_config(1), "http://example.com", "").start()


# ---------------------------------------------------------------------------------------------- generic HTTP
def http_config(base: str, **changes: object) -> SmsConfig:
    values: dict[str, object] = {
        "url": f"{base}/v1/messages", "method": "POST", "content_type": "application/json",
        "body": '{"to": "{{ to }}", "from": "{{ sender }}", "text": "{{ text }}", "ref": {{ id|tojson }}}',
        "headers": {"Authorization": "Bearer ${SMS_TEST_TOKEN}", "X-Api-Version": "2"},
        "ref_pattern": r'"message_id"\s*:\s*"([^"]+)"', "timeout": 2.0,
    } | changes
    return SmsConfig(sender="Help", http=HttpSmsConfig.model_validate(values))


@pytest.fixture
async def http_gateway(server: Server, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HttpSmsGateway]:
    monkeypatch.setenv("SMS_TEST_TOKEN", "tok-123")

    async def ok(_r: web.Request) -> web.Response:
        return web.json_response({"message_id": "prov-42", "status": "queued"}, status=201)
    server.respond = ok
    gateway = HttpSmsGateway(http_config(server.url))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.aclose()


async def test_http_json_body_escapes_every_value(server: Server, http_gateway: HttpSmsGateway) -> None:
    handing = Handing()
    result = await http_gateway.send(outgoing(TRICKY, followup_id="d" * 32), handing)
    assert result.status == "sent" and result.gateway_ref == "prov-42" and handing.calls == 1
    request, body = server.requests[0]
    assert request.method == "POST" and request.path == "/v1/messages"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"to": "+8613800138000", "from": "Help", "text": TRICKY, "ref": "d" * 32}


async def test_http_headers_take_values_from_the_environment(server: Server, http_gateway: HttpSmsGateway) -> None:
    await http_gateway.send(outgoing(), Handing())
    request, _ = server.requests[0]
    assert request.headers["Authorization"] == "Bearer tok-123"
    assert request.headers["X-Api-Version"] == "2"


async def test_http_form_body_is_form_encoded(server: Server) -> None:
    config = http_config(server.url, content_type="application/x-www-form-urlencoded", headers={},
                         body="To={{ to }}&From={{ sender }}&Body={{ text }}", ref_pattern="")
    gateway = HttpSmsGateway(config)
    await gateway.start()
    try:
        result = await gateway.send(outgoing(TRICKY), Handing())
    finally:
        await gateway.aclose()
    assert result.status == "sent" and result.gateway_ref is None
    _, body = server.requests[0]
    assert {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()} == \
        {"To": "+8613800138000", "From": "Help", "Body": TRICKY}


async def test_http_get_carries_the_form_in_the_query(server: Server) -> None:
    config = http_config(server.url, url=server.url + "/send?api=1", method="GET", headers={},
                         content_type="application/x-www-form-urlencoded", body="to={{ to }}&text={{ text }}")
    gateway = HttpSmsGateway(config)
    await gateway.start()
    try:
        assert (await gateway.send(outgoing("a&b=c 你好"), Handing())).status == "sent"
    finally:
        await gateway.aclose()
    request, _ = server.requests[0]
    assert request.method == "GET" and dict(request.query) == {"api": "1", "to": "+8613800138000",
                                                               "text": "a&b=c 你好"}


@pytest.mark.parametrize(("status", "headers", "expected", "retry_after"), [
    (500, {}, "retry", None),
    (502, {"Retry-After": "12"}, "retry", 12.0),
    (429, {"Retry-After": "7"}, "retry", 7.0),
    (400, {}, "failed", None),
    (404, {}, "failed", None),
    (301, {"Location": "https://elsewhere.example/"}, "retry", None),
    (204, {}, "unknown", None),
])
async def test_http_answers_map_to_results(server: Server, http_gateway: HttpSmsGateway, status: int,
                                           headers: dict[str, str], expected: str,
                                           retry_after: float | None) -> None:
    async def answer(_r: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers, text="" if status == 204 else "nope")
    server.respond = answer
    result = await http_gateway.send(outgoing(), Handing())
    assert (result.status, result.retry_after) == (expected, retry_after)
    assert result.error and str(status) in result.error


async def test_http_retry_after_may_be_a_date(server: Server, http_gateway: HttpSmsGateway) -> None:
    async def busy(_r: web.Request) -> web.Response:
        when = email.utils.formatdate(time.time() + 90, usegmt=True)
        return web.Response(status=503, headers={"Retry-After": when})
    server.respond = busy
    result = await http_gateway.send(outgoing(), Handing())
    assert result.status == "retry" and result.retry_after is not None and 85 <= result.retry_after <= 91


async def test_http_unreachable_provider_is_retry_and_never_handed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMS_TEST_TOKEN", "t")
    gateway = HttpSmsGateway(http_config(f"http://127.0.0.1:{closed_port()}"))
    await gateway.start()
    try:
        handing = Handing()
        result = await gateway.send(outgoing(), handing)
    finally:
        await gateway.aclose()
    assert result.status == "retry" and handing.calls == 0


async def test_http_timeout_after_sending_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMS_TEST_TOKEN", "t")
    async with raw_server("silent") as state:
        gateway = HttpSmsGateway(http_config(f"http://127.0.0.1:{state.port}", timeout=0.3))
        await gateway.start()
        try:
            handing = Handing()
            result = await gateway.send(outgoing(), handing)
        finally:
            await gateway.aclose()
    assert result.status == "unknown" and handing.calls == 1 and state.requests == 1


@pytest.mark.parametrize("value", ["tok\r\nX-Injected: 1", "tok\nx", "tok\x00"])
async def test_http_header_values_with_cr_lf_nul_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        await HttpSmsGateway(http_config("http://127.0.0.1:1"), environ={"SMS_TEST_TOKEN": value}).start()
    literal = http_config("http://127.0.0.1:1", headers={"X-Key": value})
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        await HttpSmsGateway(literal, environ={}).start()


async def test_http_missing_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMS_TEST_TOKEN", raising=False)
    with pytest.raises(ValueError, match="SMS_TEST_TOKEN"):
        await HttpSmsGateway(http_config("http://127.0.0.1:1")).start()


@pytest.mark.parametrize(("changes", "match"), [
    ({"body": '{"text": {{ text }}}'}, "JSON"),            # unquoted: not JSON once escaped
    ({"body": "{{ text"}, "sms.http.body"),
    ({"body": "{{ nope }}"}, "sms.http.body"),
    ({"url": "ftp://example.com/"}, "http"),
    ({"method": "DELETE"}, "method"),
    ({"ref_pattern": "no group"}, "group"),
    ({"headers": {"Bad Name": "x"}}, "header name"),
])
async def test_http_bad_configuration_is_refused_at_start(monkeypatch: pytest.MonkeyPatch,
                                                          changes: dict[str, object], match: str) -> None:
    monkeypatch.setenv("SMS_TEST_TOKEN", "t")
    with pytest.raises(ValueError, match=match):
        await HttpSmsGateway(http_config("http://127.0.0.1:1", **changes)).start()
