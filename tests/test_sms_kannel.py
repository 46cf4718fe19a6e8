"""SMS through a real Kannel (the ``test`` instance: admin 23000, smsbox 23001, sendsms 23013, fake SMSC 20000).

The instance lives in ``var/kannel/test`` (so a run that died leaves nothing a later run cannot stop), is started
once per session with a fresh password and stopped at its end. What the fake SMSC receives is read back from its
log; delivery reports come to a small aiohttp server standing in for our web app at ``public_url``. Each test
texts its own number, so tests never see each other's messages.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from bridge.config import Config
from bridge.outbox import Outgoing
from sms.kannel import DLR_PATH, KannelGateway, parse_dlr, verify_dlr
from sms.kannel_proc import KannelInstance, ReceivedSms
from tests.conftest import KANNEL_SENDER as SENDER
from tests.conftest import wait_until as conftest_wait_until

pytestmark = pytest.mark.integration

SECRET = secrets.token_urlsafe(24)


@pytest.fixture
async def healthy(kannel: KannelInstance) -> KannelInstance:
    """The instance with every part running (a test that stops parts brings them back itself)."""
    await asyncio.to_thread(kannel.start)
    return kannel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WebApp:
    """Stands in for our web app: takes delivery-report callbacks at ``DLR_PATH``."""

    port: int
    reports: list[dict[str, str]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def dlr(request: web.Request) -> web.Response:
            self.reports.append({**request.query, "_at": str(time.monotonic())})
            return web.Response(text="ok")
        app = web.Application()
        app.router.add_get(DLR_PATH, dlr)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def aclose(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def of(self, followup_id: str) -> list[dict[str, str]]:
        return [r for r in self.reports if r.get("id") == followup_id]


@pytest.fixture
async def webapp() -> AsyncIterator[WebApp]:
    app = WebApp(free_port())
    await app.start()
    try:
        yield app
    finally:
        await app.aclose()


@pytest.fixture
async def gateway(kannel_config: Config, webapp: WebApp) -> AsyncIterator[KannelGateway]:
    gw = KannelGateway(kannel_config.sms, webapp.public_url, SECRET)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.aclose()


class Handing:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


def message(text: str) -> Outgoing:
    """An SMS to a number no other test uses."""
    followup_id = secrets.token_hex(16)
    number = f"+86139{secrets.randbelow(10**8):08d}"
    return Outgoing(followup_id=followup_id, idempotency_key=followup_id, channel="sms", recipient=number,
                    language="zh-CN", payload={"text": text})


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    return await conftest_wait_until(predicate, timeout, what, interval=0.05)


def arrived(kannel: KannelInstance, msg: Outgoing) -> list[ReceivedSms]:
    return [sms for sms in kannel.received() if sms.receiver == msg.recipient]


# ---------------------------------------------------------------------------------------------- sending
async def test_chinese_and_english_sms_arrives_at_the_fake_smsc_as_written(healthy: KannelInstance,
                                                                         gateway: KannelGateway) -> None:
    msg = message("您好！Your link: https://help.example.com/l/Ab_9-x?y=1&z=2 — 100% + ok 😀")
    handing = Handing()
    result = await gateway.send(msg, handing)
    assert result.status == "sent", result.error
    assert handing.calls == 1
    got = await wait_until(lambda: arrived(healthy, msg), "the SMS at the fake SMSC")
    assert got == [ReceivedSms(SENDER, msg.recipient, msg.payload["text"])]


async def test_long_sms_arrives_as_one_concatenated_message(healthy: KannelInstance, gateway: KannelGateway) -> None:
    msg = message("".join(f"第{i}段文字，" for i in range(40)))  # ~200 characters: three UCS-2 parts
    assert (await gateway.send(msg, Handing())).status == "sent"
    got = await wait_until(lambda: arrived(healthy, msg), "the long SMS at the fake SMSC")
    assert [sms.text for sms in got] == [msg.payload["text"]]


# ---------------------------------------------------------------------------------------------- delivery reports
async def test_delivery_reports_reach_the_web_app_signed(healthy: KannelInstance, gateway: KannelGateway,
                                                         webapp: WebApp) -> None:
    msg = message("delivery report please")
    sent_at = time.monotonic()
    assert (await gateway.send(msg, Handing())).status == "sent"
    reports = await wait_until(lambda: len(webapp.of(msg.followup_id)) >= 2 and webapp.of(msg.followup_id),
                               "the delivered and accepted reports")
    assert all(verify_dlr(SECRET, r["id"], r["sig"]) for r in reports)
    parsed = [parse_dlr(r, secret=SECRET) for r in reports]
    # The fake SMSC reports "accepted by the SMSC" (8) and "delivered" (1), in either order.
    assert sorted(p.dlr_type for p in parsed) == [1, 8]
    assert {p.status for p in parsed} == {"accepted", "delivered"}
    delivered = next(p for p in parsed if p.status == "delivered")
    assert delivered.followup_id == msg.followup_id and delivered.gateway_ref
    assert max(float(r["_at"]) for r in reports) - sent_at < 2


async def test_delivery_reports_are_retried_while_the_web_app_is_down(healthy: KannelInstance,
                                                                      kannel_config: Config) -> None:
    down = WebApp(free_port())
    gw = KannelGateway(kannel_config.sms, down.public_url, SECRET)
    await gw.start()
    try:
        msg = message("report me later")
        assert (await gw.send(msg, Handing())).status == "sent"
        await wait_until(lambda: arrived(healthy, msg), "the SMS at the fake SMSC")
        await asyncio.sleep(1.5)  # smsbox fails to call back at least once
        await down.start()
        reports = await wait_until(lambda: len(down.of(msg.followup_id)) >= 2 and down.of(msg.followup_id),
                                   "the retried delivery reports", timeout=5)
        assert {parse_dlr(r, secret=SECRET).status for r in reports} == {"accepted", "delivered"}
    finally:
        await gw.aclose()
        await down.aclose()


# ---------------------------------------------------------------------------------------------- outages
async def test_kannel_down_is_retry_without_handing(healthy: KannelInstance, gateway: KannelGateway) -> None:
    await asyncio.to_thread(healthy.stop_part, "bearerbox")  # smsbox goes with it: sendsms refuses connections
    try:
        handing = Handing()
        result = await gateway.send(message("while Kannel is down"), handing)
        assert result.status == "retry" and "cannot connect" in (result.error or "")
        assert handing.calls == 0  # the request never left: nothing for the outbox to verify
    finally:
        await asyncio.to_thread(healthy.start)
    msg = message("after Kannel is back")
    assert (await gateway.send(msg, Handing())).status == "sent"
    await wait_until(lambda: arrived(healthy, msg), "the SMS once Kannel is back")


async def test_smsc_down_queues_and_the_message_survives_a_bearerbox_restart(healthy: KannelInstance,
                                                                             gateway: KannelGateway,
                                                                             webapp: WebApp) -> None:
    await asyncio.to_thread(healthy.stop_part, "fakesmsc")
    try:
        msg = message("queued through a restart 排队")
        assert (await gateway.send(msg, Handing())).status == "sent"  # "3: Queued for later delivery"
        await asyncio.sleep(0.3)
        assert not arrived(healthy, msg)
        await asyncio.to_thread(healthy.stop_part, "bearerbox")   # the store file keeps the message
    finally:
        await asyncio.to_thread(healthy.start)
    got = await wait_until(lambda: arrived(healthy, msg), "the stored SMS after the restart")
    assert [sms.text for sms in got] == [msg.payload["text"]]


async def test_smsc_coming_back_delivers_what_was_queued(healthy: KannelInstance, gateway: KannelGateway) -> None:
    await asyncio.to_thread(healthy.stop_part, "fakesmsc")
    try:
        msg = message("waiting for the SMSC")
        assert (await gateway.send(msg, Handing())).status == "sent"
        assert not healthy.status().smsc_online
    finally:
        await asyncio.to_thread(healthy.start_part, "fakesmsc")
    await wait_until(lambda: arrived(healthy, msg), "the queued SMS once the SMSC is back")


def test_instance_start_is_idempotent_and_status_reports_every_part(kannel: KannelInstance) -> None:
    kannel.start()
    before = kannel.status()
    assert before.running
    kannel.start()
    assert kannel.status() == before  # nothing restarted
