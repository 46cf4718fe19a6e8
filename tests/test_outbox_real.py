"""The outbox on the real parts: Kannel with its fake SMSC, a real SMTP server (aiosmtpd), SQLite files and
PostgreSQL, and ``ivr-bridge outbox dispatch`` as a process of its own killed with SIGKILL in the middle of a batch.

What is proven: every follow-up reaches its receiver exactly once (counted at the fake SMSC and in the mailbox by
the follow-up id written into each text) however the dispatcher died, nothing is lost or dead-lettered, and a
gateway that is down for a while is retried with backoff until it returns. Delivery reports come back over HTTP
to a web app (``online_chat.WebServer``) running in the test process, as in production.

A dispatcher never holds more than ``2 x outbox.concurrency`` rows (on PostgreSQL its claim once took the whole
backlog: the LIMITed subquery was rescanned per row; the claim now materialises it).

One window cannot be closed towards an SMTP server: between the final dot and the commit of "handing" (the
outbox writes the dot right before that commit, in the same step of the event loop). A mail sent twice because
its dispatcher died in that window is reported as XFAIL with the evidence, once everything else has held, so
that any loss or other double send still fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bridge import db
from bridge.config import PROJECT_DIR, Config, EmailConfig, OutboxConfig
from bridge.followups import FollowUpService, Prepared
from bridge.links import LinkSigner
from bridge.models import FollowUp, FollowUpState, new_id, utcnow
from bridge.outbox import Dispatcher, Outbox
from bridge.ratelimit import RateLimiter
from bridge.store import InteractionStore
from email_out.devsink import DevMailSink, read_mailbox
from email_out.message import message_id
from email_out.smtp import SmtpGateway
from online_chat import WebServer, WebServices
from sms.kannel import KannelGateway, parse_dlr
from sms.kannel_proc import KannelInstance, ReceivedSms, parse_fakesmsc_log

pytestmark = [pytest.mark.integration, pytest.mark.timeout(75)]
S = FollowUpState
SECRET = "test-outbox-real-secret-0123456789"
MAIL_DOMAIN = "example.com"            # email.from_addr's domain: the Message-ID's
FINAL = {S.SENT, S.DELIVERED, S.FAILED, S.DEAD, S.BLOCKED, S.UNCERTAIN}
DONE = {S.SENT, S.DELIVERED}
TAG_RE = re.compile(r"\[fu:([0-9a-f]{32})\]")


# ------------------------------------------------------------------------------------------------ rows
def followup(channel: str, index: int, label: str) -> dict[str, Any]:
    """One pending follow-up whose text carries its id (``[fu:<id>]``) so receivers can be matched to rows."""
    fid, now = new_id(), utcnow()
    tag = f"[fu:{fid}]"
    if channel == "sms":
        recipient, payload = f"+86138001{index:05d}", {"text": f"{label} {tag}"}
    else:
        recipient = f"user{index}@{MAIL_DOMAIN}"
        payload = {"subject": f"{label} {index}", "text": f"{label}\n\n{tag}\n"}
    return {"id": fid, "idempotency_key": f"outbox-real:{fid}", "interaction_id": None, "channel": channel,
            "recipient": recipient, "purpose": "test", "template": "article_link", "article_id": None,
            "language": "en", "payload": payload, "state": S.PENDING.value, "reason": None, "attempts": 0,
            "next_attempt_at": now, "created_at": now}


async def enqueue(store: InteractionStore, rows: list[dict[str, Any]]) -> None:
    await Outbox(store).enqueue([Prepared(r, None) for r in rows])


async def snapshot(store: InteractionStore) -> dict[str, FollowUp]:
    assert store.sessions is not None
    async with store.sessions() as session:
        return {f.id: f for f in (await session.execute(select(FollowUp))).scalars()}


async def settle(store: InteractionStore, check: Callable[[dict[str, FollowUp]], bool], timeout: float,
                 what: str) -> dict[str, FollowUp]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await snapshot(store)
        if check(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: "
                                 f"{Counter((f.channel, f.state) for f in rows.values())}")
        await asyncio.sleep(0.1)


def by_state(rows: Iterable[FollowUp]) -> dict[str, int]:
    return dict(sorted(Counter(f"{f.channel}:{f.state}" for f in rows).items()))


# ------------------------------------------------------------------------------------------------ receivers
def tags(texts: Iterable[str]) -> Counter[str]:
    return Counter(m for text in texts for m in TAG_RE.findall(text))


class SmscWatch:
    """What the fake SMSC got after this watch was made.

    Its log lives as long as the instance's folder (across sessions): parsing all of it every few milliseconds
    would starve this process's event loop, which serves the mail sink and the delivery reports. Polls read what
    the log gained since the start; the final counts come from ``kannel.received()`` after its first ``earlier``.
    """

    def __init__(self, kannel: KannelInstance) -> None:
        self.kannel = kannel
        try:
            self.offset = kannel.fakesmsc_log.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self.earlier = len(kannel.received())

    def _since(self) -> list[ReceivedSms]:
        try:
            with open(self.kannel.fakesmsc_log, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        return parse_fakesmsc_log(data.decode("utf-8", "replace"))

    async def ids(self) -> Counter[str]:
        """Follow-up ids in the texts received since the start (cheap: for polling)."""
        return tags(m.text for m in await asyncio.to_thread(self._since))

    async def final_ids(self) -> Counter[str]:
        """The same from ``kannel.received()`` (every message of the log parsed)."""
        return tags(m.text for m in (await asyncio.to_thread(self.kannel.received))[self.earlier:])


async def mail_received(directory: Path) -> tuple[Counter[str], Counter[str]]:
    """Follow-up ids in the texts of the stored mails, and the mails' Message-IDs."""
    mails = await asyncio.to_thread(read_mailbox, directory)
    return tags(m.text for m in mails), Counter(m.message_id for m in mails)


def exactly_once(expected: Iterable[str], got: Counter[str], what: str) -> None:
    expected = set(expected)
    missing = sorted(i[:8] for i in expected if got[i] == 0)
    twice = sorted(f"{i[:8]}x{n}" for i, n in got.items() if i in expected and n > 1)
    strangers = sorted(i[:8] for i in got if i not in expected)
    assert not (missing or twice or strangers), \
        f"{what}: {len(missing)} missing {missing[:10]}, {len(twice)} more than once {twice[:10]}, " \
        f"{len(strangers)} unknown {strangers[:10]}"


# ------------------------------------------------------------------------------------------------ parts
@contextlib.asynccontextmanager
async def dlr_web(store: InteractionStore, redis_url: str) -> AsyncIterator[WebServer]:
    """The web app on a free port, taking Kannel's delivery reports (``GET /sms/dlr``) as ``App._web`` wires it."""
    config = Config()
    config.links.secret = SECRET
    config.web.host = "127.0.0.1"
    config.web.port = 0
    config.web.dev_pages = False
    limiter = RateLimiter(redis_url, prefix=f"test-outbox-real:{uuid.uuid4().hex}")
    await limiter.start()
    signer = LinkSigner(SECRET)

    def verify(query: Mapping[str, str]) -> tuple[str, str, str | None]:
        report = parse_dlr(query, secret=SECRET)
        return report.followup_id, report.status, report.gateway_ref

    services = WebServices(config=config, store=store, outbox=Outbox(store),
                           followups=FollowUpService(lambda: None, signer, {}, "http://127.0.0.1",
                                                     dt.timedelta(days=1)),
                           catalogue=lambda: None, signer=signer, limiter=limiter, verify_dlr=verify)
    server = WebServer(services)
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()
        await limiter.aclose()


@contextlib.asynccontextmanager
async def database(url: str) -> AsyncIterator[InteractionStore]:
    await db.upgrade(url)
    store = InteractionStore(url)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[DevMailSink]:
    mail = DevMailSink(tmp_path / "mail", port=0)
    await mail.start()
    try:
        yield mail
    finally:
        await mail.aclose()


CONCURRENCY = 16


def outbox_settings() -> dict[str, Any]:
    return {"concurrency": CONCURRENCY, "lease": 3.0, "verify_timeout": 4.0, "poll_interval": 0.1, "backoff_base": 0.2,
            "backoff_max": 1.0, "max_attempts": 50}


def email_settings(port: int) -> dict[str, Any]:
    return {"gateway": "smtp", "host": "127.0.0.1", "port": port, "helo_name": "localhost", "timeout": 5.0,
            "from_addr": f"help@{MAIL_DOMAIN}"}


class DispatcherProcess:
    """``ivr-bridge outbox dispatch --config FILE`` as a child process (its output in ``log``)."""

    def __init__(self, config_file: Path, log: Path) -> None:
        self.log = log
        script = Path(sys.executable).with_name("ivr-bridge")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "bridge.cli"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("IVR_BRIDGE")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([*command, "outbox", "dispatch", "--config", str(config_file)],
                                         cwd=PROJECT_DIR, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM (a clean stop); SIGKILL if it does not end in 15 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)


# ------------------------------------------------------------------------------------------------ 1. SIGKILL
KILL_AT = (60, 200)   # received messages (SMS at the fake SMSC + mails) of this batch when each dispatcher dies
BATCH = 400


async def test_a_dispatcher_killed_mid_batch_loses_nothing_and_sends_nothing_twice(
        db_url: str, redis_url: str, kannel: KannelInstance, kannel_config: Config, sink: DevMailSink,
        tmp_path: Path) -> None:
    started = time.monotonic()
    smsc = await asyncio.to_thread(SmscWatch, kannel)
    async with database(db_url) as store, dlr_web(store, redis_url) as web:
        rows = [followup("sms" if i % 2 == 0 else "email", i, "outbox kill") for i in range(BATCH)]
        await enqueue(store, rows)
        sms_ids = {r["id"] for r in rows if r["channel"] == "sms"}
        mail_ids = {r["id"] for r in rows if r["channel"] == "email"}
        config_file = tmp_path / "dispatch.yaml"
        config_file.write_text(json.dumps({  # JSON is YAML
            "general": {"var_dir": str(tmp_path / "var"), "log_level": "INFO"},
            "database": {"url": db_url},
            "redis": {"url": redis_url},
            "links": {"secret": SECRET},
            "web": {"public_url": f"http://127.0.0.1:{web.port}"},
            "sms": {"gateway": "kannel", "sender": kannel_config.sms.sender,
                    "kannel": kannel_config.sms.kannel.model_dump(mode="json")},
            "email": email_settings(sink.port),
            "outbox": outbox_settings(),
        }), encoding="utf-8")
        log = tmp_path / "dispatch.log"
        mails_before = sink.received

        async def received() -> int:
            return sum((await smsc.ids()).values()) + sink.received - mails_before

        processes: list[DispatcherProcess] = []
        at_kill: list[dict[str, FollowUp]] = []   # the rows as each dead dispatcher left them
        notes: list[str] = []
        bugs: list[str] = []
        try:
            for threshold in KILL_AT:
                proc = DispatcherProcess(config_file, log)
                processes.append(proc)
                before = {i: (f.state, f.attempts) for i, f in at_kill[-1].items()} if at_kill else {}

                def holding(rows: dict[str, FollowUp], before: dict[str, tuple[str, int]] = before) -> list[FollowUp]:
                    """Rows this dispatcher holds: in sending/handing, and not as the one killed before left them."""
                    return [f for f in rows.values()
                            if f.state in (S.SENDING, S.HANDING) and before.get(f.id) != (f.state, f.attempts)]

                t0 = time.monotonic()
                deadline = t0 + 20
                while True:  # enough received, and this dispatcher has rows of its own in hand
                    if (count := await received()) >= threshold and holding(await snapshot(store)):
                        break
                    assert proc.proc.poll() is None, f"the dispatcher exited: {log.read_text()[-2000:]}"
                    assert time.monotonic() < deadline, f"only {count} received in 20 s"
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(proc.kill)
                left = await snapshot(store)
                count = await received()
                held = holding(left)
                at_kill.append(left)
                unfinished = [f for f in left.values() if f.state in (S.SENDING, S.HANDING)]
                notes.append(f"kill at >= {threshold} received ({count} by then, {time.monotonic() - t0:.1f} s "
                             f"after start), it held {len(held)}: {by_state(left.values())}")
                assert count < BATCH, "the whole batch was through before the kill: " + notes[-1]
                assert unfinished, "the dispatcher died with nothing in sending/handing: " + notes[-1]
                assert len(held) <= 2 * CONCURRENCY, \
                    f"one dispatcher held {len(held)} rows at once, more than 2 x outbox.concurrency: " + notes[-1]

            final_proc = DispatcherProcess(config_file, log)
            processes.append(final_proc)
            t0 = time.monotonic()
            final = await settle(store, lambda r: all(f.state in FINAL for f in r.values()), 40,
                                 "every follow-up to reach a final state")
            notes.append(f"last dispatcher: every row final {time.monotonic() - t0:.1f} s after its start: "
                         f"{by_state(final.values())}")
            t0 = time.monotonic()
            assert await asyncio.to_thread(final_proc.stop) == 0, log.read_text()[-2000:]
            notes.append(f"last dispatcher stopped (SIGTERM) in {time.monotonic() - t0:.1f} s")
        finally:
            for proc in processes:
                await asyncio.to_thread(proc.kill)

        # Every SMS reaches the fake SMSC (bearerbox may still be passing the last ones on), then nothing more.
        deadline = time.monotonic() + 15
        while True:
            if set(await smsc.ids()) >= sms_ids or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        sms = await smsc.final_ids()
        mail_tags, mail_message_ids = await mail_received(sink.directory)

        # How the rows each dead dispatcher left unfinished were settled.
        trail: Counter[str] = Counter()
        for fid, row in final.items():
            path = [snap[fid].state for snap in at_kill]
            if any(state not in FINAL and state != S.PENDING for state in path):
                trail[f"{row.channel}: {' > '.join(path)} => {row.state} (attempts {row.attempts}"
                      f"{', ' + row.reason if row.reason else ''})"] += 1
        recovered = [line.split(": ", 1)[-1] for line in log.read_text().splitlines()
                     if "interrupted while being handed over" in line]
        report = "\n  ".join([*notes, "unfinished at a kill, then:",
                              *(f"{n} x {t}" for t, n in sorted(trail.items())),
                              *(f"dispatcher log: {line}" for line in recovered),
                              f"{time.monotonic() - started:.1f} s in all"])
        print(f"\n[{db_url.split('+')[0]}] {report}")

        assert len(final) == BATCH
        assert by_state(f for f in final.values() if f.state not in DONE) == {}, report
        exactly_once(sms_ids, sms, "SMS at the fake SMSC\n  " + report)
        # A mail whose dispatcher died between its final dot and the commit of "handing" (microseconds, see the
        # outbox's module doc) was still "sending" at that kill and is sent again: that one may arrive twice.
        # Anything missing, any other mail twice, or any stranger fails the test.
        in_window = {i for i in mail_ids if mail_tags[i] == 2 and any(snap[i].state == S.SENDING for snap in at_kill)}
        exactly_once(mail_ids - in_window, mail_tags, "mail in the mailbox\n  " + report)
        expected_ids = {message_id(r["idempotency_key"], MAIL_DOMAIN) for r in rows if r["id"] in mail_ids}
        assert set(mail_message_ids) == expected_ids, report
        if in_window:
            bugs.append(f"{len(in_window)} mail(s) still 'sending' when their dispatcher died had left already "
                        f"and went twice ({', '.join(sorted(i[:8] for i in in_window))})")
        if bugs:  # everything else held: every other follow-up exactly once, none lost, none dead
            pytest.xfail("the SMTP hand-over window was hit: " + "; ".join(bugs) + "\n  " + report)


# ------------------------------------------------------------------------------------------------ 2. Kannel down
async def test_sms_wait_while_kannel_is_down_and_go_once_it_is_back(
        tmp_path: Path, redis_url: str, kannel: KannelInstance, kannel_config: Config) -> None:
    await asyncio.to_thread(kannel.start)  # healthy to begin with, whatever ran before
    smsc = await asyncio.to_thread(SmscWatch, kannel)
    url = f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}"
    async with database(url) as store, dlr_web(store, redis_url) as web:
        rows = [followup("sms", i, "outbox kannel down") for i in range(50)]
        ids = {r["id"] for r in rows}
        gateway = KannelGateway(kannel_config.sms, f"http://127.0.0.1:{web.port}", SECRET)
        dispatcher = Dispatcher(Outbox(store), [gateway], OutboxConfig(**outbox_settings()))
        try:
            t0 = time.monotonic()
            await asyncio.to_thread(kannel.stop_part, "bearerbox")
            stopped = time.monotonic() - t0
            assert not (await asyncio.to_thread(kannel.status)).sendsms, "sendsms still answers"
            await enqueue(store, rows)
            await dispatcher.start()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # retried, never given up, never taken
                current = await snapshot(store)
                assert {f.state for f in current.values()} <= {S.PENDING, S.SENDING}, by_state(current.values())
                await asyncio.sleep(0.2)
            current = await snapshot(store)
            attempts = Counter(f.attempts for f in current.values())
            assert min(attempts) >= 2, f"attempts while Kannel was down: {attempts}"
            reasons = {f.reason for f in current.values() if f.state == S.PENDING}
            assert all("kannel: cannot connect" in (r or "") for r in reasons), reasons
            t1 = time.monotonic()
            await asyncio.to_thread(kannel.start)
            restarted = time.monotonic() - t1
            final = await settle(store, lambda r: all(f.state == S.DELIVERED for f in r.values()), 30,
                                 "every SMS to be reported delivered")
            back = time.monotonic() - t1
        finally:
            await dispatcher.aclose()
            await asyncio.to_thread(kannel.start)
        await asyncio.sleep(0.5)
        exactly_once(ids, await smsc.final_ids(), "SMS at the fake SMSC")
        after = Counter(f.attempts for f in final.values())
        print(f"\nKannel down: stop {stopped:.1f} s, attempts while down {dict(sorted(attempts.items()))}, "
              f"start {restarted:.1f} s, all delivered {back:.1f} s after the restart began, final attempts "
              f"{dict(sorted(after.items()))}")


# ------------------------------------------------------------------------------------------------ 3. SMTP down
async def test_mail_waits_while_the_smtp_server_is_down_and_goes_once_it_is_back(tmp_path: Path) -> None:
    mail_dir = tmp_path / "mail"
    sink = DevMailSink(mail_dir, port=0)
    await sink.start()
    port = sink.port
    await sink.aclose()  # down: nothing listens on its port
    url = f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}"
    async with database(url) as store:
        rows = [followup("email", i, "outbox smtp down") for i in range(50)]
        ids = {r["id"] for r in rows}
        await enqueue(store, rows)
        dispatcher = Dispatcher(Outbox(store), [SmtpGateway(EmailConfig(**email_settings(port)))],
                                OutboxConfig(**outbox_settings()))
        revived = DevMailSink(mail_dir, port=port)
        await dispatcher.start()
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                current = await snapshot(store)
                assert {f.state for f in current.values()} <= {S.PENDING, S.SENDING}, by_state(current.values())
                await asyncio.sleep(0.2)
            current = await snapshot(store)
            attempts = Counter(f.attempts for f in current.values())
            assert min(attempts) >= 2, f"attempts while the SMTP server was down: {attempts}"
            reasons = {f.reason for f in current.values() if f.state == S.PENDING}
            assert all("cannot connect to SMTP server" in (r or "") for r in reasons), reasons
            t1 = time.monotonic()
            await revived.start()
            final = await settle(store, lambda r: all(f.state == S.SENT for f in r.values()), 20,
                                 "every mail to be sent")
            back = time.monotonic() - t1
        finally:
            await dispatcher.aclose()
            await revived.aclose()
        got, message_ids = await mail_received(mail_dir)
        exactly_once(ids, got, "mail in the mailbox")
        assert set(message_ids.values()) == {1} and len(message_ids) == len(rows)
        print(f"\nSMTP down: attempts while down {dict(sorted(attempts.items()))}, all sent {back:.1f} s after "
              f"it came back, final attempts {dict(sorted(Counter(f.attempts for f in final.values()).items()))}")
