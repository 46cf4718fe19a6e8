"""Deflection end to end on the real parts: a pjsua2 caller in the shipped hotline flow through the test Asterisk,
the SMS at Kannel's fake SMSC, the signed link opened over HTTP, the "email me this" mail at a real SMTP server,
the survey answer, the deflection report, and SMS pumping capped on a burst of real calls."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from bridge.app import App
from bridge.config import Config
from bridge.models import FollowUp, Link, SurveyAnswer
from bridge.reports import deflection
from email_out.devsink import DevMailSink, read_mailbox
from ivr.softphone import Softphone, SoftphoneConfig, sip_uri
from sms.kannel_proc import KannelInstance
from tests.conftest import SIP_PORT, Harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
FLOWS = Path(__file__).resolve().parent.parent / "flows"
MOBILE = "13800138000"   # a China Mobile number as a national caller ID (flows.default_region is CN)
LINK_RE = re.compile(r"http://127\.0\.0\.1:\d+/l/[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def mail_sink(tmp_path: Path) -> AsyncIterator[DevMailSink]:
    sink = DevMailSink(tmp_path / "mail", port=0)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.aclose()


def deflection_config(ivr: Harness, kannel_config: Config, mail_sink: DevMailSink) -> Config:
    """The shipped hotline and catalogue, the web app, a dispatcher through Kannel and SMTP."""
    config = ivr.config(flows=[FLOWS], default_flow="hotline")
    port = free_port()
    config.web.port = port
    config.web.public_url = f"http://127.0.0.1:{port}"
    config.outbox.enabled = True
    config.outbox.poll_interval = 0.1
    config.sms.kannel = kannel_config.sms.kannel
    config.sms.sender = kannel_config.sms.sender
    config.email.port = mail_sink.port
    config.email.dev_sink_dir = mail_sink.directory
    return config


async def received_sms(kannel: KannelInstance, to: str, count: int = 1, timeout: float = 15,
                       skip: int = 0) -> list[Any]:
    """The fake SMSC's messages to ``to`` (after the first ``skip`` in its log) once there are ``count``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [m for m in (await asyncio.to_thread(kannel.received))[skip:]
                 if m.receiver.lstrip("+") == to.lstrip("+")]
        if len(found) >= count or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.1)


async def rows(app: App, model: Any) -> list[Any]:
    assert app.store.sessions is not None
    async with app.store.sessions() as session:
        return list((await session.execute(select(model))).scalars())


async def test_a_caller_who_takes_the_self_service_option_gets_a_signed_link_that_records_its_opening(
        ivr: Harness, kannel: KannelInstance, kannel_config: Config, mail_sink: DevMailSink) -> None:
    app = await ivr.start_app(deflection_config(ivr, kannel_config, mail_sink))
    earlier = len(await asyncio.to_thread(kannel.received))  # the fake SMSC's log lives as long as the instance
    await ivr.softphone(user=MOBILE)
    call, watch = await ivr.dial("100", app=app)
    assert watch is not None
    await ivr.press(call, watch, "main", "2")
    await ivr.press(call, watch, "orders", "2")
    await watch.next("followup", timeout=10, state="pending")
    await watch.next("prompt", node="returns_info")        # "... we have texted you the link to start one."
    await ivr.press(call, watch, "rate_call", "5")
    ended = await watch.next("call-ended", timeout=20)
    assert ended["outcome"] == "completed"
    await call.wait_ended(timeout=10)

    # The SMS reached Kannel's fake SMSC with a signed link to the article, in the call's language.
    sms = await received_sms(kannel, "+86" + MOBILE, skip=earlier)
    assert len(sms) == 1, sms
    assert sms[0].text.startswith("Example Co.: Free returns within 30 days http://127.0.0.1:")
    link = LINK_RE.search(sms[0].text)
    assert link is not None
    followups = await rows(app, FollowUp)
    assert [(f.channel, f.recipient, f.purpose, f.article_id) for f in followups] == [
        ("sms", "+86" + MOBILE, "in_call", "returns")]
    surveys = await rows(app, SurveyAnswer)
    assert [(s.score, s.channel, s.interaction_id) for s in surveys] == [(5, "voice", watch.call_id)]

    # Opening the link (HTTP) records it and shows the article with the call it came from.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # keeps 127.0.0.1's
        async with http.get(link.group(0)) as response:
            assert response.status == 200
            page = await response.text()
        assert "Free returns within 30 days" in page
        assert MOBILE not in page  # the page knows the call, not the caller's number
        (opened,) = await rows(app, Link)
        assert opened.opens == 1 and opened.first_opened_at is not None and opened.interaction_id == watch.call_id

        # "Email me this" from that page: the mail reaches the SMTP server with a text and an HTML part.
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        nonce = re.search(r'name="nonce" value="([^"]+)"', page)
        action = re.search(r'<form[^>]+action="(/help/a/returns/email[^"]*)"', page)
        assert csrf and nonce and action, "the article page has an email form"
        async with http.post(app.config.web.public_url + action.group(1).replace("&amp;", "&"),
                             data={"csrf": csrf.group(1), "nonce": nonce.group(1), "address": "Caller@Example.COM"},
                             headers={"Origin": app.config.web.public_url}) as response:
            assert response.status == 200, await response.text()
    await ivr.wait_until(lambda: len(list(mail_sink.directory.glob("*.eml"))) == 1, 15, "the mail")
    (mail,) = read_mailbox(mail_sink.directory)
    assert mail.to == "Caller@example.com"  # the domain is normalised, the local part is the customer's
    assert mail.subject == "Free returns within 30 days"
    assert LINK_RE.search(mail.text) and LINK_RE.search(mail.html or "")

    # Kannel's report came back (the fake SMSC acknowledges: "accepted" keeps it "sent"); nothing is left over.
    sms_row = next(f for f in await rows(app, FollowUp) if f.channel == "sms")
    assert sms_row.state in ("sent", "delivered") and sms_row.attempts == 1
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    assert app.store.sessions is not None
    report = await deflection(app.store.sessions, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
                              dt.timedelta(hours=1), now=later)
    (row,) = [r for r in report if r.intent == "returns"]
    assert (row.calls, row.links_sent, row.opened, row.deflected) == (1, 1, 1, 1)


async def test_a_burst_of_calls_from_one_number_range_and_a_blocked_country_is_capped(
        ivr: Harness, kannel: KannelInstance, kannel_config: Config, mail_sink: DevMailSink) -> None:
    config = deflection_config(ivr, kannel_config, mail_sink)
    config.sms.limits.per_number = 5
    config.sms.limits.per_prefix = 3            # numbers sharing all but their last 3 digits
    config.sms.countries = ["CN"]
    config.redis.url = ivr.redis_url
    app = await ivr.start_app(config)
    earlier = len(await asyncio.to_thread(kannel.received))
    await app.limiter._redis.flushdb()  # type: ignore[union-attr]  # counters of earlier tests
    # pjsua2 places at most 4 calls at once: two waves. Six numbers in one range (all but the last 3 digits
    # shared), one from a country not on the list, one from another range.
    waves = [[f"1380099{i:04d}" for i in range(4)],
             ["13800990004", "13800990005", "+447911123456", "13900139000"]]
    for callers in waves:
        phones = [Softphone(SoftphoneConfig(user=c)) for c in callers]
        try:
            for phone in phones:
                await phone.start()
            calls = [await phone.dial(sip_uri("100", "127.0.0.1", SIP_PORT)) for phone in phones]
            for call in calls:
                await call.wait_answered(timeout=10)
                await call.wait_media(timeout=5)
            await asyncio.sleep(1.5)  # into the main menu's prompt
            for call in calls:
                await call.send_digits("3")  # the help centre link
            await ivr.wait_until(lambda calls=calls: all(c.ended for c in calls), 40, "every call to end")
        finally:
            for phone in phones:
                await phone.aclose()
    followups = await rows(app, FollowUp)
    states = sorted((f.recipient, f.state, f.reason) for f in followups)
    sent = [s for s in states if s[1] != "blocked"]
    blocked = sorted(s[2] or "" for s in states if s[1] == "blocked")
    assert len(followups) == 8, states
    assert blocked == ["country", "limit:prefix", "limit:prefix", "limit:prefix"], states
    assert sorted(r for r, *_ in sent) == ["+8613800990000", "+8613800990001", "+8613800990002", "+8613900139000"]
    await asyncio.sleep(1)  # the dispatcher's sends reach the fake SMSC
    sms = (await asyncio.to_thread(kannel.received))[earlier:]
    assert sorted(m.receiver for m in sms) == sorted(r for r, *_ in sent), "the fake SMSC got just those"
    assert await app.outbox.blocked_reasons() == {"limit:prefix": 3, "country": 1}


async def test_a_caller_who_hangs_up_in_the_menus_gets_the_answer_for_what_they_chose(
        ivr: Harness, kannel: KannelInstance, kannel_config: Config, mail_sink: DevMailSink) -> None:
    app = await ivr.start_app(deflection_config(ivr, kannel_config, mail_sink))
    earlier = len(await asyncio.to_thread(kannel.received))
    await ivr.softphone(user="13800138123")
    call, watch = await ivr.dial("101", app=app)              # the Chinese number
    assert watch is not None
    await ivr.press(call, watch, "main", "1")                 # billing: intent "billing"
    await watch.next("prompt", node="billing")
    await call.hangup()
    ended = await watch.next("call-ended", timeout=10)
    assert (ended["outcome"], ended["node"]) == ("abandoned", "billing")
    sms = await received_sms(kannel, "+8613800138123", skip=earlier)
    assert len(sms) == 1 and sms[0].text.startswith("示例公司：在线查看余额并付款 http://127.0.0.1:"), sms
    (followup,) = await rows(app, FollowUp)
    assert (followup.purpose, followup.article_id, followup.language) == ("after_call", "billing_balance", "zh-CN")


async def test_out_of_hours_the_caller_is_offered_a_link_instead_of_a_queue(
        ivr: Harness, kannel: KannelInstance, kannel_config: Config, mail_sink: DevMailSink,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ivr.engine import CallContext

    # 23:59:30 in Shanghai: after the hotline's office hours (00:00-23:59).
    closed = dt.datetime(2026, 11, 20, 15, 59, 30, tzinfo=dt.UTC)
    monkeypatch.setattr(CallContext, "now", lambda self: closed)
    app = await ivr.start_app(deflection_config(ivr, kannel_config, mail_sink))
    earlier = len(await asyncio.to_thread(kannel.received))
    await ivr.softphone(user="13800138124")
    call, watch = await ivr.dial("100", app=app)
    assert watch is not None
    await ivr.press(call, watch, "closed", "1")
    await watch.next("prompt", node="closed_link", text="We have texted you the link.")
    ended = await watch.next("call-ended", timeout=15)
    assert ended["outcome"] == "completed"
    sms = await received_sms(kannel, "+8613800138124", skip=earlier)
    assert len(sms) == 1 and sms[0].text.startswith("Example Co. help centre, open day and night: http://"), sms
    (link,) = await rows(app, Link)
    assert (link.kind, link.target) == ("help", "help")
