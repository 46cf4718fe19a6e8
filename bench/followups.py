"""Benchmark of the outbox: N follow-ups (half SMS through Kannel, half email to an SMTP server), sent by the
outbox dispatcher and, as the baseline, by a plain asyncio loop calling sendsms / aiosmtplib directly.

    .venv/bin/python bench/followups.py [--count 10000] [--repeat K] [--concurrency 32] [--db URL] [--quick]
                                        [--timings] [--profile] [--breakdown N] [--json F] [--keep]

Both runs send the same kind of messages to the same kind of receivers, each run on fresh ones:

  * Kannel instance ``bench`` (admin 33000, smsbox 33001, sendsms 33013, fake SMSC 30000) in a private temp
    folder; what the fake SMSC got is read back from its log. Every SMS asks for delivery reports (dlr-mask 31)
    at a small aiohttp receiver in this process; in the outbox run it applies them as the web app does
    (``parse_dlr`` + ``Outbox.delivery_report``), in the baseline it only answers 200.
  * ``python -m email_out.devsink`` as a process of its own (the receiving server does not share the senders'
    CPU and event loop), one mail folder per run.

baseline: W workers (default: the dispatcher's in-flight bound, 2 x ``--concurrency``) take the messages in
turn; an SMS is one aiohttp GET of ``KannelGateway.request_url(message)`` (the gateway's exact request; a plain
session with keep-alive unless ``--baseline-no-keepalive``), an email is ``build_message`` + ``flatten`` (what
the gateway sends) and ``aiosmtplib.SMTP.sendmail`` on one of ``--smtp-connections`` open connections. No
database.

outbox: the N rows are enqueued first (``Outbox.enqueue``, timed separately), then a ``Dispatcher`` with
``KannelGateway`` and ``SmtpGateway`` runs in this process until every row is final (sent, delivered, failed,
dead, blocked). SQLite file in the temp folder by default; ``--db postgresql+asyncpg://...`` uses a private
schema of that database (dropped afterwards).

Measured: throughput of both (messages / second until the last one was taken by its gateway) and their ratio;
lost (tokens never received), duplicated (received more than once), rows not final; the RSS of this process
(which runs the dispatcher) every 0.5 s during the outbox run ("flat": the peak of the last 20 % of the run
within 10 % or 5 MiB of the RSS at 20 %); CPU seconds of every process involved, of other processes on the
machine meanwhile ("others") and of interrupts + hypervisor steal ("irq+steal").

Diagnosis: ``--timings`` times the outbox run's gateway sends (up to / in / after ``handing()``), delivery
reports, SQL statements and database connection use; ``--profile`` adds cProfile of the event loop;
``--breakdown N`` instead measures the CPU cost of each operation alone; ``--ignore-reports`` has the outbox run
only answer delivery reports, as the baseline does.

Exit status: 0 when every target was met, 1 when one was missed, 3 when the bench could not run. ``--quick``
(200 follow-ups) judges only lost / duplicated / not final: throughput and memory are printed, not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as dt
import fcntl
import io
import json
import os
import platform
import pstats
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

import aiohttp  # noqa: E402
import aiosmtplib  # noqa: E402
from aiohttp import web  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from bridge import db  # noqa: E402
from bridge.config import Config, EmailConfig, KannelConfig, OutboxConfig  # noqa: E402
from bridge.followups import Prepared  # noqa: E402
from bridge.models import FollowUp, FollowUpState, new_id, utcnow  # noqa: E402
from bridge.outbox import Dispatcher, Outbox, Outgoing  # noqa: E402
from bridge.store import InteractionStore  # noqa: E402
from email_out.devsink import read_mailbox  # noqa: E402
from email_out.message import build_message, flatten  # noqa: E402
from email_out.smtp import SmtpGateway  # noqa: E402
from sms.kannel import DLR_PATH, KannelGateway, parse_dlr  # noqa: E402
from sms.kannel_proc import BEARERBOX, FAKESMSC, INSTANCES, SMSBOX, KannelInstance, instance_config  # noqa: E402

sys.path.insert(0, str(BENCH_DIR))
from benchlib import CLK_TCK, BenchError, cpu_fields, cpu_model, cpu_seconds, free_port, log, median, wait_tcp  # noqa: E402

INSTANCE = "bench"
LOCK_FILE = Path(tempfile.gettempdir()) / "ivr-bridge-bench-followups.lock"
HELO = "bench.ivr-bridge.invalid"
SENDER_DOMAIN = "example.com"
S = FollowUpState
FINAL = {S.SENT.value, S.DELIVERED.value, S.FAILED.value, S.DEAD.value, S.BLOCKED.value}
TOKEN_RE = re.compile(r"#([BO]\d{6})\b")   # "#B000123" (baseline) / "#O000123" (outbox) in every text

TARGET_RATIO = 0.8
RSS_SAMPLE_S = 0.5
RSS_FLAT_FRACTION, RSS_FLAT_MIB = 0.10, 5.0
QUICK_COUNT = 200


# ------------------------------------------------------------------------------------------------- helpers
def rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot; busy = user, nice, system, irq, softirq (not steal)."""
    fields = cpu_fields()
    return fields.busy, fields.total


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False



def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def sparkline(values: list[float], width: int = 60) -> str:
    """The values as one line of block characters (resampled to ``width``), low to high."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step):max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    low, high = min(values), max(values)
    blocks = "▁▂▃▄▅▆▇█"
    if high == low:
        return blocks[0] * len(values)
    return "".join(blocks[min(len(blocks) - 1, int((v - low) / (high - low) * len(blocks)))] for v in values)


# ------------------------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class Spec:
    """One follow-up of a run: ``token`` is in its text (SMS) or subject (email) and identifies it on arrival."""

    token: str
    message: Outgoing


def make_specs(tag: str, count: int) -> list[Spec]:
    """``count`` messages alternating SMS / email, each with a unique token (``#B000007``)."""
    specs = []
    for i in range(count):
        token = f"{tag}{i:06d}"
        followup_id = new_id()
        if i % 2 == 0:
            payload = {"text": f"Your answer #{token}: https://help.{SENDER_DOMAIN}/a/returns?l=en"}
            message = Outgoing(followup_id, followup_id, "sms", f"+86139{i:08d}", "en", payload)
        else:
            link = f"https://help.{SENDER_DOMAIN}/l/{followup_id[:12]}"
            text_part = (f"Hello,\n\nhere is the answer to your question #{token}: {link}\n\nIt explains how to "
                         "return an item and when the refund arrives.\n\nExample Help\n")
            html = (f"<p>Hello,</p><p>here is the answer to your question #{token}: <a href=\"{link}\">{link}</a>"
                    "</p><p>It explains how to return an item and when the refund arrives.</p><p>Example Help</p>")
            payload = {"subject": f"Your answer #{token}", "text": text_part, "html": html}
            message = Outgoing(followup_id, followup_id, "email", f"customer{i}@{SENDER_DOMAIN}", "en", payload)
        specs.append(Spec(token, message))
    return specs


def outbox_row(message: Outgoing) -> dict[str, Any]:
    """The outbox row for ``message`` (as tests/test_outbox.py's ``row()`` makes them)."""
    now = utcnow()
    return {"id": message.followup_id, "idempotency_key": message.idempotency_key, "interaction_id": None,
            "channel": message.channel, "recipient": message.recipient, "purpose": "bench",
            "template": "article_link", "article_id": None, "language": message.language,
            "payload": dict(message.payload), "state": S.PENDING.value, "reason": None, "attempts": 0,
            "next_attempt_at": now, "created_at": now}


# ------------------------------------------------------------------------------------------------- receivers
class DlrReceiver:
    """Kannel's dlr-url: counts reports; with an ``outbox`` set it applies them as the web app does."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = free_port()
        self.outbox: Outbox | None = None
        self.timings: dict[str, list[float]] | None = None
        self.reports: Counter[str] = Counter()   # status -> reports received
        self.changed = 0
        self.refused = 0
        self.last_at = 0.0
        self._runner: web.AppRunner | None = None

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def total(self) -> int:
        return sum(self.reports.values())

    def reset(self, outbox: Outbox | None) -> None:
        self.outbox = outbox
        self.reports.clear()
        self.changed = self.refused = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(DLR_PATH, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.last_at = time.monotonic()
        if self.outbox is None:  # baseline: Kannel gets its answer, nothing else happens
            self.reports[request.query.get("type", "?")] += 1
            return web.Response(text="ok")
        try:
            report = parse_dlr(request.query, secret=self.secret)
        except ValueError:
            self.refused += 1
            return web.Response(status=403, text="forbidden")
        self.reports[str(report.dlr_type)] += 1
        started = time.perf_counter()
        if await self.outbox.delivery_report(report.followup_id, report.status, report.gateway_ref):
            self.changed += 1
        if self.timings is not None:
            self.timings.setdefault("delivery report: Outbox.delivery_report()", []).append(
                time.perf_counter() - started)
        return web.Response(text="ok")


class MailSink:
    """``python -m email_out.devsink`` as a process of its own, writing into ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        out = open(self.directory.parent / "devsink.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "email_out.devsink", "--dir", str(self.directory), "--port", str(self.port)],
                cwd=PROJECT_DIR, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            out.close()
        (self.directory.parent / "devsink.pid").write_text(f"{self.proc.pid}\n")
        wait_tcp(self.port, 15)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def count(self) -> int:
        return sum(1 for p in self.directory.glob("*.eml") if not p.name.startswith("."))


# ------------------------------------------------------------------------------------------------- results
@dataclass
class RunResult:
    name: str       # "baseline", "outbox" ("baseline-2", ... with --repeat)
    kind: str       # "baseline" or "outbox"
    count: int
    sms: int
    email: int
    workers: int = 0
    seconds: float = 0.0
    send_errors: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    received_sms: int = 0
    received_email: int = 0
    dlr_reports: dict[str, int] = field(default_factory=dict)
    dlr_changed: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0
    # outbox only
    enqueue_seconds: float = 0.0
    states: dict[str, int] = field(default_factory=dict)
    not_final: int = 0
    attempts_over_1: int = 0
    delivered_after_s: float | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)
    max_inflight: int = 0
    smtp_connections_opened: int = 0
    timings: dict[str, list[float]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    probe: dict[str, float] = field(default_factory=dict)
    lost_examples: list[str] = field(default_factory=list)
    dup_examples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def rss_check(self) -> tuple[int, int, float, bool] | None:
        """(RSS at 20 %, peak of the last 20 %, growth per 1000 messages over 20..100 %, flat?)."""
        if len(self.rss) < 5:
            return None
        end = self.rss[-1][0]
        ref = next(v for t, v in self.rss if t >= 0.2 * end)
        tail = [v for t, v in self.rss if t >= 0.8 * end]
        peak = max(tail)
        window = [(t, v) for t, v in self.rss if t >= 0.2 * end]
        slope = 0.0
        if len(window) >= 2:  # least squares, bytes per second -> bytes per 1000 messages
            mt = sum(t for t, _ in window) / len(window)
            mv = sum(v for _, v in window) / len(window)
            den = sum((t - mt) ** 2 for t, _ in window)
            slope = sum((t - mt) * (v - mv) for t, v in window) / den if den else 0.0
        per_1000 = slope / self.rate * 1000 if self.rate else 0.0
        flat = peak - ref <= max(RSS_FLAT_FRACTION * ref, RSS_FLAT_MIB * 2**20)
        return ref, peak, per_1000, flat


# ------------------------------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="ivr-followups-"))
        self.password = secrets.token_urlsafe(18)
        self.secret = secrets.token_urlsafe(24)
        self.dlr = DlrReceiver(self.secret)
        self.kannel: KannelInstance | None = None
        self.sink: MailSink | None = None
        self._lock: Any = None
        self.pg_schema: str | None = None
        self.profile: cProfile.Profile | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def config(self, run: str, sink_port: int = 0) -> Config:
        config = Config()
        config.general.var_dir = self.tmp / run
        config.sms.kannel = instance_config(INSTANCE, KannelConfig(password=self.password))
        config.email = EmailConfig(host="127.0.0.1", port=sink_port or 8025, helo_name=HELO,
                                   from_addr=f"help@{SENDER_DOMAIN}", connections=self.args.smtp_connections)
        config.outbox = OutboxConfig(concurrency=self.args.concurrency, batch=self.args.batch,
                                     poll_interval=self.args.poll_interval)
        return config

    def prepare(self) -> None:
        missing = [str(b) for b in (BEARERBOX, SMSBOX, FAKESMSC) if not b.exists()]
        if missing:
            raise BenchError(f"Kannel is not installed ({', '.join(missing)}; apt-get install kannel kannel-extras)")
        # One run at a time on this machine: the Kannel instance's ports are fixed.
        lock = open(LOCK_FILE, "a+")  # noqa: SIM115 - held until teardown
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock.close()
            raise BenchError(f"another followups bench is running ({LOCK_FILE})") from exc
        self._lock = lock
        lock.seek(0)
        previous = lock.read().strip()
        if previous and Path(previous).is_dir() and Path(previous) != self.tmp:
            self._stop_leftovers(Path(previous))
        lock.seek(0)
        lock.truncate()
        lock.write(f"{self.tmp}\n")
        lock.flush()
        ports = INSTANCES[INSTANCE]
        deadline = time.monotonic() + 10  # a Kannel that was just stopped may still be closing its sockets
        while busy := [p for p in (ports.admin, ports.smsbox, ports.sendsms, ports.smsc) if port_in_use(p)]:
            if time.monotonic() > deadline:
                raise BenchError(f"Kannel instance '{INSTANCE}' ports {busy} are in use by something else")
            time.sleep(0.2)

    def _stop_leftovers(self, old: Path) -> None:
        """Stop what a run that died (SIGKILL) left running in its temp folder ``old``."""
        for run_dir in [p for p in old.iterdir() if p.is_dir()] if old.is_dir() else []:
            if (run_dir / "kannel" / INSTANCE).is_dir():
                config = Config()
                config.general.var_dir = run_dir
                config.sms.kannel = instance_config(INSTANCE, KannelConfig(password="leftover"))
                log(f"stopping a Kannel left behind in {run_dir}")
                KannelInstance(config).stop()
            with contextlib.suppress(OSError, ValueError):
                pid = int((run_dir / "devsink.pid").read_text())
                if b"email_out.devsink" in Path(f"/proc/{pid}/cmdline").read_bytes() \
                        and str(run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    log(f"stopping a mail sink left behind (pid {pid})")
                    os.kill(pid, signal.SIGTERM)
        if old.name.startswith("ivr-followups-"):
            shutil.rmtree(old, ignore_errors=True)

    def start_receivers(self, run: str) -> Config:
        """A fresh mail sink and a fresh Kannel instance for ``run``."""
        sink = MailSink(self.tmp / run / "mail")
        sink.start()
        self.sink = sink
        config = self.config(run, sink.port)
        self.kannel = KannelInstance(config)
        self.kannel.start(timeout=30)
        return config

    def stop_receivers(self) -> None:
        if self.kannel is not None:
            with contextlib.suppress(Exception):
                self.kannel.stop()
            self.kannel = None
        if self.sink is not None:
            self.sink.stop()
            self.sink = None

    def teardown(self) -> None:
        self.stop_receivers()
        if self._lock is not None:
            self._lock.seek(0)
            self._lock.truncate()
            self._lock.close()
            self._lock = None
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept {self.tmp}")

    # ------------------------------------------------------------------------------------------ measuring
    def snapshot(self, pg_backends: list[int] | None = None) -> dict[str, float]:
        assert self.kannel is not None
        busy, total, processes, kernel, _ = cpu_fields()
        backends = {f"_pg{pid}": cpu_seconds(pid) for pid in pg_backends or []}  # same machine only
        return {**backends, "bench": cpu_seconds(os.getpid()), "bearerbox": cpu_seconds(self.kannel.pid("bearerbox")),
                "smsbox": cpu_seconds(self.kannel.pid("smsbox")), "fakesmsc": cpu_seconds(self.kannel.pid("fakesmsc")),
                "mail sink": cpu_seconds(self.sink.pid if self.sink else None), "_busy": busy, "_total": total,
                "_processes": processes, "_kernel": kernel,
                "_at": time.monotonic()}

    @staticmethod
    def fill_cpu(result: RunResult, before: dict[str, float], after: dict[str, float]) -> None:
        result.cpu = {k: round(after[k] - before[k], 2) for k in before if not k.startswith("_")}
        pg = [k for k in after if k.startswith("_pg")]
        if pg:  # PostgreSQL backends of this run (those that started during the run count from 0)
            result.cpu["postgres"] = round(sum(after[k] - before.get(k, 0.0) for k in pg), 2)
        # All processes' CPU time minus this run's processes: other work on this (shared) machine meanwhile;
        # "irq+steal" is interrupt and softirq time (loopback networking lands there) plus the hypervisor's steal.
        ours = sum(result.cpu.values())
        result.cpu["others"] = round((after["_processes"] - before["_processes"]) / CLK_TCK - ours, 1)
        result.cpu["irq+steal"] = round((after["_kernel"] - before["_kernel"]) / CLK_TCK, 1)
        result.machine_busy = (after["_busy"] - before["_busy"]) / max(1, after["_total"] - before["_total"])

    async def wait_receivers(self, result: RunResult, specs: list[Spec], sms_dlrs: int) -> None:
        """Wait (bounded) until the receivers have everything and Kannel's delivery reports stopped, then count
        lost and duplicated tokens."""
        assert self.kannel is not None and self.sink is not None
        kannel, sink = self.kannel, self.sink
        want_sms = sum(1 for s in specs if s.message.channel == "sms")
        want_mail = len(specs) - want_sms
        tag = specs[0].token[0] if specs else "?"

        def sms_tokens() -> list[str]:
            return [m.group(1) for sms in kannel.received() for m in TOKEN_RE.finditer(sms.text)
                    if m.group(1)[0] == tag]

        last_progress, seen = time.monotonic(), (-1, -1, -1)
        deadline = time.monotonic() + self.args.settle_timeout
        while time.monotonic() < deadline:
            now = (len(await asyncio.to_thread(sms_tokens)), await asyncio.to_thread(sink.count), self.dlr.total)
            if now != seen:
                seen, last_progress = now, time.monotonic()
            if now[0] >= want_sms and now[1] >= want_mail and now[2] >= sms_dlrs:
                break
            if time.monotonic() - last_progress > 10:
                log(f"receivers stopped making progress: {now[0]}/{want_sms} SMS, {now[1]}/{want_mail} mails, "
                    f"{now[2]}/{sms_dlrs} delivery reports")
                break
            await asyncio.sleep(0.5)
        got = Counter(await asyncio.to_thread(sms_tokens))
        result.received_sms = sum(got.values())
        mails = await asyncio.to_thread(read_mailbox, sink.directory)
        result.received_email = len(mails)
        for mail in mails:
            for m in TOKEN_RE.finditer(mail.subject):
                got[m.group(1)] += 1
        expected = {s.token for s in specs}
        lost = sorted(expected - set(got))
        dups = sorted(t for t, n in got.items() if n > 1)
        result.lost, result.duplicated = len(lost), len(dups)
        result.unexpected = sum(1 for t in got if t not in expected)
        result.lost_examples, result.dup_examples = lost[:5], dups[:5]
        result.dlr_reports = dict(self.dlr.reports)
        result.dlr_changed = self.dlr.changed

    # ------------------------------------------------------------------------------------------ baseline
    async def run_baseline(self, specs: list[Spec], workers: int, name: str = "baseline") -> RunResult:
        config = self.start_receivers(name)
        result = RunResult(name, "baseline", len(specs), sum(1 for s in specs if s.message.channel == "sms"),
                           sum(1 for s in specs if s.message.channel == "email"), workers=workers)
        self.dlr.reset(None)
        urls = KannelGateway(config.sms, self.dlr.public_url, self.secret)  # only builds request URLs
        from_addr = config.email.from_addr
        pool: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        # A plain session (keep-alive on) unless --baseline-no-keepalive: then one connection a request, as the
        # gateway does.
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                        connector=aiohttp.TCPConnector(force_close=self.args.baseline_no_keepalive))
        opened: list[aiosmtplib.SMTP] = []
        try:
            for _ in range(config.email.connections):
                smtp = aiosmtplib.SMTP(hostname=config.email.host, port=config.email.port, local_hostname=HELO,
                                       timeout=30)
                await smtp.connect()
                opened.append(smtp)
                pool.put_nowait(smtp)
            it = iter(specs)
            errors = result.send_errors

            sms_times = result.timings.setdefault("raw sms: the sendsms request", [])
            wait_times = result.timings.setdefault("raw email: waiting for a connection", [])
            mail_times = result.timings.setdefault("raw email: sendmail", [])

            async def worker() -> None:
                for spec in it:
                    msg = spec.message
                    t0 = time.perf_counter()
                    if msg.channel == "sms":
                        try:
                            async with session.get(urls.request_url(msg)) as resp:
                                body = await resp.text()
                            if not (200 <= resp.status < 300 and body.startswith(("0:", "3:"))):
                                errors[f"sms HTTP {resp.status}: {body[:60]}"] += 1
                        except (aiohttp.ClientError, TimeoutError) as exc:
                            errors[f"sms {type(exc).__name__}"] += 1
                        sms_times.append(time.perf_counter() - t0)
                    else:
                        data = flatten(build_message(msg, from_addr=from_addr, from_name=config.email.from_name,
                                                     domain=SENDER_DOMAIN))
                        smtp = await pool.get()
                        t1 = time.perf_counter()
                        try:
                            await smtp.sendmail(from_addr, [msg.recipient], data)
                        except (aiosmtplib.SMTPException, OSError) as exc:
                            errors[f"email {type(exc).__name__}"] += 1
                        finally:
                            pool.put_nowait(smtp)
                        wait_times.append(t1 - t0)
                        mail_times.append(time.perf_counter() - t1)

            before = self.snapshot()
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(workers)))
            result.seconds = time.perf_counter() - started
            self.fill_cpu(result, before, self.snapshot())
        finally:
            await session.close()
            for smtp in opened:
                with contextlib.suppress(Exception):
                    await smtp.quit()
        log(f"{name}: {result.count} in {result.seconds:.2f} s = {result.rate:.0f}/s; waiting for the receivers")
        await self.wait_receivers(result, specs, 2 * result.sms)
        await asyncio.to_thread(self.stop_receivers)
        return result

    # ------------------------------------------------------------------------------------------ breakdown
    async def run_breakdown(self, n: int) -> list[tuple[str, int, float, float]]:
        """CPU of this process per operation, each measured alone: the raw sends, the gateways' sends and the
        outbox's database work for one follow-up (enqueue, claim, two marks, delivery reports)."""
        config = self.start_receivers("breakdown")
        self.dlr.reset(None)
        rows: list[tuple[str, int, float, float]] = []
        conc = 2 * self.args.concurrency

        async def noop(then: Any = None) -> None:  # handing() with nothing to record
            if then is not None:
                then()

        sms = [s.message for s in make_specs("K", 2 * n) if s.message.channel == "sms"]
        mails = [s.message for s in make_specs("K", 2 * n) if s.message.channel == "email"]
        urls = KannelGateway(config.sms, self.dlr.public_url, self.secret)
        for label, force_close in (("raw sms: aiohttp GET, keep-alive", False),
                                   ("raw sms: aiohttp GET, one connection a request", True)):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=force_close)) as session:
                async def get(msg: Outgoing, session: aiohttp.ClientSession = session) -> None:
                    async with session.get(urls.request_url(msg)) as resp:
                        await resp.text()
                rows.append(await measure(label, sms[:n // 2], get, conc))
        gateway = KannelGateway(config.sms, self.dlr.public_url, self.secret)
        await gateway.start()
        try:
            rows.append(await measure("KannelGateway.send (handing() a no-op)", sms[n // 2:],
                                      lambda m: gateway.send(m, noop), conc))
        finally:
            await gateway.aclose()
        pool: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        for _ in range(config.email.connections):
            smtp = aiosmtplib.SMTP(hostname=config.email.host, port=config.email.port, local_hostname=HELO)
            await smtp.connect()
            pool.put_nowait(smtp)

        async def raw_mail(msg: Outgoing) -> None:
            data = flatten(build_message(msg, from_addr=config.email.from_addr, from_name=config.email.from_name,
                                         domain=SENDER_DOMAIN))
            smtp = await pool.get()
            try:
                await smtp.sendmail(config.email.from_addr, [msg.recipient], data)
            finally:
                pool.put_nowait(smtp)

        rows.append(await measure("raw email: build_message + flatten + sendmail", mails[:n // 2], raw_mail, conc))
        while not pool.empty():
            with contextlib.suppress(Exception):
                await pool.get_nowait().quit()
        smtp_gateway = SmtpGateway(config.email)
        await smtp_gateway.start()
        try:
            rows.append(await measure("SmtpGateway.send (handing() a no-op)", mails[n // 2:],
                                      lambda m: smtp_gateway.send(m, noop), conc))
        finally:
            await smtp_gateway.aclose()
        await self.wait_quiet()

        url = f"sqlite+aiosqlite:///{self.tmp / 'breakdown' / 'ivr-bridge.db'}" if not self.args.db \
            else await self.database_url()
        await db.upgrade(url)
        store = InteractionStore(url)
        await store.start()
        try:
            outbox = Outbox(store)
            dispatcher = Dispatcher(outbox, [urls, smtp_gateway], config.outbox)
            specs = make_specs("K", n)
            chunk = self.args.enqueue_batch
            batches = [specs[i:i + chunk] for i in range(0, n, chunk)]
            name, _, cpu, wall = await measure(
                f"Outbox.enqueue ({chunk} rows a transaction)", batches,
                lambda b: outbox.enqueue([Prepared(outbox_row(s.message), None) for s in b]), 1)
            rows.append((name + ", per row", n, cpu * len(batches) / n, wall * len(batches) / n))
            claimed: list[dict[str, Any]] = []
            limit = min(2 * config.outbox.concurrency, config.outbox.batch)

            async def claim(_: int) -> None:
                claimed.extend(await dispatcher._claim(limit))

            name, _, cpu, wall = await measure(f"Dispatcher._claim ({limit} rows a claim)",
                                               list(range(-(-n // limit))), claim, 1)
            rows.append((name + ", per row", len(claimed), cpu * -(-n // limit) / max(1, len(claimed)),
                         wall * -(-n // limit) / max(1, len(claimed))))
            ids = [r["id"] for r in claimed]
            rows.append(await measure("Dispatcher._mark sending -> handing (per row)", ids,
                                      lambda i: dispatcher._mark(i, [S.SENDING], {"state": S.HANDING.value}), conc))
            rows.append(await measure("Dispatcher._mark handing -> sent (per row)", ids,
                                      lambda i: dispatcher._mark(i, [S.SENDING, S.HANDING],
                                                                 {"state": S.SENT.value, "sent_at": utcnow(),
                                                                  "lease_until": None}), conc))
            rows.append(await measure("Outbox.delivery_report 'delivered' (per report)", ids,
                                      lambda i: outbox.delivery_report(i, "delivered", "ref"), 16))
            rows.append(await measure("Outbox.delivery_report, no change (per report)", ids,
                                      lambda i: outbox.delivery_report(i, "accepted", "ref"), 16))
        finally:
            await store.aclose()
            await self.drop_schema()
        await asyncio.to_thread(self.stop_receivers)
        return rows

    async def wait_quiet(self, quiet: float = 2.0, timeout: float = 60.0) -> None:
        """Until Kannel's delivery reports stopped coming for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now > deadline or now - self.dlr.last_at >= quiet:
                return
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------------------------------ outbox
    async def database_url(self) -> str:
        if not self.args.db:
            return f"sqlite+aiosqlite:///{self.tmp / f'db-{uuid.uuid4().hex[:8]}' / 'ivr-bridge.db'}"
        if not self.args.db.startswith("postgresql"):
            return self.args.db
        # A private schema of the given database, as the tests do (search_path through asyncpg's dsn).
        self.pg_schema = f"bench_{uuid.uuid4().hex[:12]}"
        admin = create_async_engine(self.args.db)
        try:
            async with admin.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA "{self.pg_schema}"'))
        finally:
            await admin.dispose()
        url = make_url(self.args.db).update_query_dict(
            {"dsn": "postgresql:///?" + urllib.parse.urlencode({"search_path": self.pg_schema,
                                                                 "application_name": self.pg_schema})})
        return url.render_as_string(hide_password=False)

    async def drop_schema(self) -> None:
        if self.pg_schema is None or self.args.keep:
            return
        admin = create_async_engine(self.args.db)
        try:
            async with admin.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.pg_schema}" CASCADE'))
        finally:
            await admin.dispose()

    async def run_outbox(self, specs: list[Spec], name: str = "outbox") -> RunResult:
        config = self.start_receivers(name)
        result = RunResult(name, "outbox", len(specs), sum(1 for s in specs if s.message.channel == "sms"),
                           sum(1 for s in specs if s.message.channel == "email"),
                           workers=2 * config.outbox.concurrency)
        url = await self.database_url()
        await db.upgrade(url)
        store = InteractionStore(url)
        await store.start()
        watcher = create_async_engine(url)   # a connection of its own to watch the states
        outbox = Outbox(store)
        self.dlr.reset(None if self.args.ignore_reports else outbox)
        sms_gateway = KannelGateway(config.sms, self.dlr.public_url, self.secret)
        smtp_gateway = SmtpGateway(config.email)
        gateways: list[Any] = [sms_gateway, smtp_gateway]
        if self.args.timings:
            gateways = [TimedGateway(g, result.timings) for g in gateways]
            watch_sql(store.engine, result.timings, result.counts)
            self.dlr.timings = result.timings
        dispatcher = Dispatcher(outbox, gateways, config.outbox)
        try:
            started = time.perf_counter()
            chunk = self.args.enqueue_batch
            for i in range(0, len(specs), chunk):
                await outbox.enqueue([Prepared(outbox_row(s.message), None) for s in specs[i:i + chunk]])
            result.enqueue_seconds = time.perf_counter() - started
            log(f"{name}: enqueued {len(specs)} rows in {result.enqueue_seconds:.2f} s; dispatching")

            async def states() -> dict[str, int]:
                async with watcher.connect() as conn:
                    rows = await conn.execute(select(FollowUp.state, func.count()).group_by(FollowUp.state))
                    return {str(state): int(n) for state, n in rows.all()}

            async def backends() -> list[int]:
                if self.pg_schema is None:
                    return []
                async with watcher.connect() as conn:
                    rows = await conn.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = "
                                                   ":name"), {"name": self.pg_schema})
                    return [int(pid) for (pid,) in rows.all()]

            sampler = RssSampler(os.getpid())
            before = self.snapshot(await backends())
            if self.profile is not None:
                self.profile.enable()
            sampler.start()
            started = time.perf_counter()
            await dispatcher.start()
            deadline = started + self.args.run_timeout
            last_db_check = 0.0
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                result.max_inflight = max(result.max_inflight, len(dispatcher._inflight))
                if dispatcher.sent < len(specs) and now - last_db_check < 1.0:
                    continue
                last_db_check = now
                current = await states()
                if sum(n for s, n in current.items() if s in FINAL) >= len(specs):
                    break
                if now > deadline:
                    log(f"outbox: not final after {self.args.run_timeout:.0f} s: {current}")
                    break
            result.seconds = time.perf_counter() - started
            sampler.stop()
            if self.profile is not None:
                self.profile.disable()
            self.fill_cpu(result, before, self.snapshot(await backends()))
            result.rss = sampler.samples
            log(f"{name}: {result.count} final in {result.seconds:.2f} s = {result.rate:.0f}/s; "
                "waiting for the receivers")
            await self.wait_receivers(result, specs, 2 * result.sms)
            # How long until every SMS was also reported delivered (after the run; not part of the throughput).
            current = await states()
            if current.get(S.DELIVERED.value, 0) >= result.sms:
                result.delivered_after_s = time.perf_counter() - started
            result.states = current
            result.not_final = sum(n for s, n in current.items() if s not in FINAL)
            async with watcher.connect() as conn:
                result.attempts_over_1 = int((await conn.execute(
                    select(func.count()).select_from(FollowUp).where(FollowUp.attempts > 1))).scalar_one())
            result.smtp_connections_opened = smtp_gateway.opened
            result.probe = await report_probe(outbox, [s.message.followup_id for s in specs[:400:2]])
        finally:
            await dispatcher.aclose()
            self.dlr.reset(None)
            self.dlr.timings = None
            await watcher.dispose()
            await store.aclose()
            await self.drop_schema()
        await asyncio.to_thread(self.stop_receivers)
        return result


async def measure(name: str, items: list[Any], op: Any, concurrency: int) -> tuple[str, int, float, float]:
    """Run ``op(item)`` for every item, ``concurrency`` at a time: (name, n, CPU ms of this process per item,
    wall ms per item)."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await op(item)

    cpu0, wall0 = cpu_seconds(os.getpid()), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = cpu_seconds(os.getpid()) - cpu0, time.perf_counter() - wall0
    n = max(1, len(items))
    log(f"breakdown: {name}: {cpu / n * 1000:.2f} ms CPU, {wall / n * 1000:.2f} ms wall per item")
    return name, len(items), cpu / n * 1000, wall / n * 1000


async def report_probe(outbox: Outbox, ids: list[str]) -> dict[str, float]:
    """Cost of one ``Outbox.delivery_report`` transaction with nothing else running: wall and CPU of this
    process per call (an "accepted" report for SMS already delivered: the UPDATE matches no row)."""
    if not ids:
        return {}
    cpu0, wall0 = cpu_seconds(os.getpid()), time.perf_counter()
    samples = []
    for followup_id in ids:
        t0 = time.perf_counter()
        await outbox.delivery_report(followup_id, "accepted", None)
        samples.append(time.perf_counter() - t0)
    cpu, wall = cpu_seconds(os.getpid()) - cpu0, time.perf_counter() - wall0
    samples.sort()
    return {"n": len(ids), "wall_ms_p50": samples[len(samples) // 2] * 1000,
            "wall_ms_mean": wall / len(ids) * 1000, "cpu_ms_mean": cpu / len(ids) * 1000}


class TimedGateway:
    """--timings: a gateway wrapped to time each send in three parts: up to ``handing()`` (SMTP: waiting for a
    free connection, MAIL, RCPT, DATA, the body; Kannel: connecting), ``handing()`` itself (the outbox's
    HANDING mark, a database write) and after it (SMTP: the final dot and its reply; Kannel: the request)."""

    def __init__(self, gateway: Any, timings: dict[str, list[float]]) -> None:
        self.gateway = gateway
        self.channel = gateway.channel
        self.interrupted = gateway.interrupted
        self.timings = timings

    @property
    def opened(self) -> int:
        return int(getattr(self.gateway, "opened", 0))

    async def start(self) -> None:
        await self.gateway.start()

    async def aclose(self) -> None:
        await self.gateway.aclose()

    async def send(self, message: Outgoing, handing: Any) -> Any:
        marks: dict[str, float] = {}

        async def timed_handing(then: Callable[[], None] | None = None) -> None:
            def timed_then() -> None:
                assert then is not None
                then()
                marks["then"] = time.perf_counter()

            marks["handing"] = time.perf_counter()
            try:
                await handing(None if then is None else timed_then)
            finally:
                marks["handed"] = time.perf_counter()

        t0 = time.perf_counter()
        try:
            return await self.gateway.send(message, timed_handing)
        finally:
            t1 = time.perf_counter()
            add = self.timings.setdefault
            add(f"gw {self.channel}: whole send", []).append(t1 - t0)
            if "handed" in marks:
                add(f"gw {self.channel}: up to handing()", []).append(marks["handing"] - t0)
                add(f"gw {self.channel}: handing() (db mark)", []).append(marks["handed"] - marks["handing"])
                add(f"gw {self.channel}: after handing()", []).append(t1 - marks["handed"])
            if "then" in marks and "handed" in marks:  # SMTP: bounds the window a kill sends a mail twice in
                add(f"gw {self.channel}: final dot -> commit acknowledged", []).append(marks["handed"] - marks["then"])


CLAIM = "claim (UPDATE .. RETURNING the rows)"


def watch_sql(engine: Any, timings: dict[str, list[float]], counts: Counter[str]) -> None:
    """--timings: wall time of every SQL statement on ``engine`` (by kind; on SQLite this includes the hop to
    aiosqlite's thread and back) and the number of transactions committed."""
    from sqlalchemy import event

    sync = engine.sync_engine

    @event.listens_for(sync, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    @event.listens_for(sync, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        started = conn.info["bench_started"].pop()
        flat = " ".join(statement.split())
        if flat.startswith("WITH due AS") or (flat.startswith("UPDATE followups") and "attempts=" in flat):
            kind = CLAIM
        elif flat.startswith("UPDATE followups SET lease_until=") and "state IN" in flat:
            kind = "UPDATE followups: lease renewal / recovery"
        elif flat.startswith("UPDATE followups"):
            kind = "UPDATE followups: marks, reports"
        else:
            kind = " ".join(flat.split()[:3])
        timings.setdefault(f"sql {kind}", []).append(time.perf_counter() - started)

    @event.listens_for(sync, "commit")
    def _commit(conn: Any) -> None:
        counts["commits"] += 1

    @event.listens_for(sync, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        counts["connections opened"] += 1

    # How long each pooled connection is held (checkout -> checkin): on SQLite there is one, so the sum over the
    # run is how busy the database connection was.
    @event.listens_for(sync, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        record.info["bench_out"] = time.perf_counter()

    @event.listens_for(sync, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        started = record.info.pop("bench_out", None)
        if started is not None:
            timings.setdefault("db connection held (checkout -> checkin)", []).append(time.perf_counter() - started)


class RssSampler:
    """RSS of a process every 0.5 s from a thread (independent of the event loop's latency)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic() - self._t0, rss_bytes(self.pid)))

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._t0, rss_bytes(self.pid)))
            if self._stop.wait(RSS_SAMPLE_S):
                return


# ------------------------------------------------------------------------------------------------- report
def summary(values: list[float]) -> dict[str, float]:
    """n, p50, p95, mean (ms) of durations in seconds."""
    ordered = sorted(values)
    return {"n": len(ordered), "p50_ms": ordered[len(ordered) // 2] * 1000,
            "p95_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000,
            "mean_ms": sum(ordered) / len(ordered) * 1000}


def machine() -> dict[str, str]:
    model = cpu_model()
    kannel = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "kannel"], capture_output=True, text=True,
                            check=False).stdout.strip()
    import sqlite3

    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "kannel": kannel or "?", "sqlite": sqlite3.sqlite_version,
            "aiosmtplib": aiosmtplib.__version__, "aiohttp": aiohttp.__version__,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def evaluate(pairs: list[tuple[RunResult, RunResult]], quick: bool) -> list[tuple[str, str, str, bool | None]]:
    """(what, figure, target, met); ``None`` = shown, not judged. With several pairs (--repeat) the ratio is the
    median of the pairs' ratios; lost, duplicated and not final are summed; every outbox run must be flat."""
    ratios = [out.rate / base.rate if base.rate else 0.0 for base, out in pairs]
    ratio = median(ratios)
    outs = [out for _, out in pairs]
    if len(pairs) == 1:
        base, out = pairs[0]
        figure = f"{out.rate:.0f}/s vs {base.rate:.0f}/s = {ratio:.2f}x"
    else:
        figure = (f"median {ratio:.2f}x of " + ", ".join(f"{o.rate:.0f}/{b.rate:.0f}" for b, o in pairs)
                  + " (outbox/baseline msgs/s)")
    lost, dup, not_final = (sum(o.lost for o in outs), sum(o.duplicated for o in outs),
                            sum(o.not_final for o in outs))
    rows: list[tuple[str, str, str, bool | None]] = [
        ("outbox throughput vs raw baseline", figure, f">= {TARGET_RATIO}x", None if quick else ratio >= TARGET_RATIO),
        ("lost (outbox)", str(lost), "0", lost == 0),
        ("duplicated (outbox)", str(dup), "0", dup == 0),
        ("rows not final (outbox)", str(not_final), "0", not_final == 0),
    ]
    for out in outs:
        check = out.rss_check()
        what = "memory flat over the run (RSS of the dispatcher's process)" + \
            (f", {out.name}" if len(outs) > 1 else "")
        if check is None:
            rows.append((what, "too few samples", "", None))
            continue
        ref, peak, per_1000, flat = check
        limit = max(RSS_FLAT_FRACTION * ref, RSS_FLAT_MIB * 2**20)
        rows.append((what, f"{mib(ref)} at 20% -> peak {mib(peak)} in the last 20% ({(peak - ref) / 2**20:+.1f} MiB; "
                           f"trend {per_1000 / 1024:+.0f} KiB / 1000 msgs)",
                     f"growth <= {mib(limit)}", None if quick else flat))
    base_lost = sum(b.lost for b, _ in pairs)
    base_dup = sum(b.duplicated for b, _ in pairs)
    rows.append(("baseline sanity: lost / duplicated", f"{base_lost} / {base_dup}", "0 / 0 (sanity)",
                 base_lost == 0 and base_dup == 0))
    return rows


def print_report(info: dict[str, Any], pairs: list[tuple[RunResult, RunResult]],
                 targets: list[tuple[str, str, str, bool | None]]) -> None:
    m = info["machine"]
    runs = [r for pair in pairs for r in pair]
    print(f"\nivr-bridge follow-ups benchmark, {m['date']}: {m['nproc']} x {m['cpu']}, kernel {m['kernel']}, "
          f"Python {m['python']}, Kannel {m['kannel']}, SQLite {m['sqlite']}" + (" [--quick]" if info["quick"] else ""))
    print(f"database: {info['db']}; dispatcher: concurrency {info['concurrency']} (in flight <= "
          f"{2 * info['concurrency']}), batch {info['batch']}, poll {info['poll_interval']} s; SMTP connections "
          f"{info['smtp_connections']}; baseline workers {pairs[0][0].workers}; machine {info['background_busy']:.0%} "
          "busy before the runs")
    print()
    header = ("run", "msgs", "SMS", "email", "seconds", "msgs/s", "lost", "dup", "not final", "send errors",
              "CPU s: bench", "(ms/msg)", "bearerbox", "smsbox", "mail sink", "postgres", "others", "irq+steal",
              "machine busy")
    rows = []
    for r in runs:
        rows.append((r.name, str(r.count), str(r.sms), str(r.email), f"{r.seconds:.2f}", f"{r.rate:.0f}",
                     str(r.lost), str(r.duplicated), str(r.not_final) if r.kind == "outbox" else "-",
                     str(sum(r.send_errors.values())) if r.kind == "baseline" else "-",
                     f"{r.cpu.get('bench', 0):.1f}", f"{r.cpu.get('bench', 0) / r.count * 1000:.2f}",
                     f"{r.cpu.get('bearerbox', 0):.1f}",
                     f"{r.cpu.get('smsbox', 0):.1f}", f"{r.cpu.get('mail sink', 0):.1f}",
                     f"{r.cpu['postgres']:.1f}" if "postgres" in r.cpu else "-", f"{r.cpu.get('others', 0):.1f}",
                     f"{r.cpu.get('irq+steal', 0):.1f}",
                     f"{r.machine_busy:.0%}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    for r in runs:
        print(f"  {r.name}: received {r.received_sms} SMS, {r.received_email} mails; delivery reports "
              f"{sum(r.dlr_reports.values())} (by Kannel type {dict(sorted(r.dlr_reports.items()))})"
              + (f", {r.dlr_changed} changed a row" if r.kind == "outbox" else ""))
        if r.send_errors:
            print(f"    send errors: {dict(r.send_errors.most_common(5))}")
        if r.lost_examples or r.dup_examples:
            print(f"    lost e.g. {r.lost_examples}, duplicated e.g. {r.dup_examples}")
        if r.kind == "outbox":
            print_outbox_details(info, r)
    print(f"    {'times, ms':<60} {'n':>6} {'p50':>8} {'p95':>8} {'mean':>8} {'sum s':>8}")
    for r in runs:
        for name, values in sorted(r.timings.items()):
            if values:
                t = summary(values)
                label = f"{name}" + (f" [{r.name}]" if len(runs) > 2 else "")
                print(f"    {label:<60} {t['n']:6d} {t['p50_ms']:8.2f} {t['p95_ms']:8.2f} {t['mean_ms']:8.2f} "
                      f"{sum(values):8.2f}")
        if r.counts:
            print(f"    {r.name}: {dict(r.counts)}")
    print()
    print("target                                                   figure / target / result")
    for what, figure, target, met in targets:
        mark = "PASS" if met else ("-" if met is None else "FAIL")
        print(f"  {mark:4}  {what}: {figure}  [target {target}]")
    print()
    outs = [out for _, out in pairs]
    print(f"throughput ratio: {median([o.rate / b.rate if b.rate else 0.0 for b, o in pairs]):.2f}")
    print(f"lost: {sum(o.lost for o in outs)}")
    print(f"duplicated: {sum(o.duplicated for o in outs)}")
    print(f"not final: {sum(o.not_final for o in outs)}")


def print_outbox_details(info: dict[str, Any], out: RunResult) -> None:
    enqueue_rate = out.count / max(out.enqueue_seconds, 1e-9)
    print(f"    enqueue {out.count} rows {out.enqueue_seconds:.2f} s ({enqueue_rate:.0f} rows/s, batches of "
          f"{info['enqueue_batch']}); final states {dict(sorted(out.states.items()))}; "
          f"rows sent more than once {out.attempts_over_1}; max in flight {out.max_inflight}; SMTP connections "
          f"opened {out.smtp_connections_opened}"
          + (f"; every SMS reported delivered {out.delivered_after_s:.1f} s after the start"
             if out.delivered_after_s is not None else ""))
    if out.rss:
        values = [v for _, v in out.rss]
        print(f"    RSS of the bench process (runs the dispatcher), every {RSS_SAMPLE_S} s over {out.seconds:.1f} s: "
              f"min {mib(min(values))}, max {mib(max(values))}")
        print(f"      {sparkline([float(v) for v in values])}")
    if out.probe:
        p = out.probe
        print(f"    one delivery report alone ({p['n']:.0f} in a row after the run, each awaited): wall p50 "
              f"{p['wall_ms_p50']:.2f} ms, mean {p['wall_ms_mean']:.2f} ms; CPU of this process "
              f"{p['cpu_ms_mean']:.2f} ms")


PROFILE_AREAS = (  # (area, substring of the function's file) - the first match wins
    ("SQLAlchemy", "/sqlalchemy/"), ("aiosqlite / asyncpg / greenlet", "/aiosqlite/"),
    ("aiosqlite / asyncpg / greenlet", "/asyncpg/"), ("aiosqlite / asyncpg / greenlet", "greenlet"),
    ("aiohttp / yarl / multidict", "/aiohttp/"), ("aiohttp / yarl / multidict", "/yarl/"),
    ("aiohttp / yarl / multidict", "/multidict/"), ("aiosmtplib", "/aiosmtplib/"),
    ("email package (build, flatten)", "/email/"), ("bridge/ (outbox)", "/bridge/"), ("sms/", "/sms/"),
    ("email_out/", "/email_out/"), ("bench itself", "/bench/"), ("asyncio + selectors", "/asyncio/"),
    ("asyncio + selectors", "selectors"), ("socket calls", "_socket"), ("queue / threads", "_queue"),
    ("queue / threads", "threading"),
)


def profile_summary(profile: cProfile.Profile, limit: int = 25) -> str:
    """Own time by area (which library the time is spent in), then the top functions by own time."""
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    areas: Counter[str] = Counter()
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = 0.0
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        where = f"{filename}:{name}"
        if "select.epoll" in where or "poll' of" in where:
            area = "waiting in epoll (idle)"
        else:
            area = next((a for a, key in PROFILE_AREAS if key in where), "other")
        areas[area] += tottime
        total += tottime
    out.write("own time by area (event-loop thread):\n")
    for area, seconds in areas.most_common():
        out.write(f"  {seconds:8.2f} s  {seconds / total:6.1%}  {area}\n")
    out.write("\n")
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    info: dict[str, Any] = {"machine": machine(), "quick": args.quick, "count": args.count,
                            "concurrency": args.concurrency, "batch": args.batch, "poll_interval": args.poll_interval,
                            "smtp_connections": args.smtp_connections, "enqueue_batch": args.enqueue_batch,
                            "db": (args.db.split("@")[-1] if args.db else "SQLite file (temp folder)")}
    workers = args.baseline_workers or 2 * args.concurrency
    pairs: list[tuple[RunResult, RunResult]] = []
    if args.breakdown:
        return await run_breakdown(bench, args, info)
    try:
        await asyncio.to_thread(bench.prepare)
        await bench.dlr.start()
        busy0, total0 = machine_jiffies()
        await asyncio.sleep(1)
        busy1, total1 = machine_jiffies()
        info["background_busy"] = (busy1 - busy0) / max(1, total1 - total0)
        if args.profile:
            bench.profile = cProfile.Profile()
        for k in range(1, args.repeat + 1):
            suffix = f"-{k}" if args.repeat > 1 else ""
            log(f"baseline{suffix}: {args.count} messages, {workers} workers")
            base = await bench.run_baseline(make_specs("B", args.count), workers, f"baseline{suffix}")
            await asyncio.sleep(1)
            log(f"outbox{suffix}: {args.count} follow-ups, dispatcher concurrency {args.concurrency}")
            out = await bench.run_outbox(make_specs("O", args.count), f"outbox{suffix}")
            pairs.append((base, out))
            await asyncio.sleep(1)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        await bench.dlr.aclose()
        await asyncio.to_thread(bench.teardown)
        return 3
    except BaseException:
        await bench.dlr.aclose()
        await asyncio.to_thread(bench.teardown)
        raise
    await bench.dlr.aclose()
    await asyncio.to_thread(bench.teardown)
    targets = evaluate(pairs, args.quick)
    print_report(info, pairs, targets)
    if bench.profile is not None:
        print("\ncProfile of the outbox run (event-loop thread only; figures above are slowed by it):")
        print(profile_summary(bench.profile))
    if args.json:
        runs = []
        for r in (r for pair in pairs for r in pair):
            d = asdict(r)
            d["rate"] = r.rate
            d["send_errors"] = dict(r.send_errors)  # asdict() garbles Counters (their pairs become keys)
            d["counts"] = dict(r.counts)
            d["timings"] = {k: summary(v) for k, v in r.timings.items() if v}
            runs.append(d)
        document = {"info": info, "runs": runs,
                    "targets": [dict(zip(("what", "figure", "target", "met"), t, strict=True)) for t in targets]}
        with open(args.json, "w", encoding="utf-8") as fh:  # noqa: ASYNC230 - once, after the runs
            json.dump(document, fh, indent=2, default=str)
    return 0 if all(t[3] is not False for t in targets) else 1


async def run_breakdown(bench: Bench, args: argparse.Namespace, info: dict[str, Any]) -> int:
    try:
        await asyncio.to_thread(bench.prepare)
        await bench.dlr.start()
        rows = await bench.run_breakdown(args.breakdown)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 3
    finally:
        await bench.dlr.aclose()
        await asyncio.to_thread(bench.teardown)
    m = info["machine"]
    print(f"\nivr-bridge follow-ups: cost per operation, each measured alone ({m['date']}, {m['nproc']} x "
          f"{m['cpu']}, {info['db']}); CPU = this process, all threads; {2 * args.concurrency} concurrent sends, "
          f"{args.smtp_connections} SMTP connections, 16 concurrent delivery reports")
    print(f"  {'operation':<64} {'n':>6} {'CPU ms':>8} {'wall ms':>8}")
    for name, n, cpu, wall in rows:
        print(f"  {name:<64} {n:6d} {cpu:8.2f} {wall:8.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=0, help="follow-ups per run (default 10000; --quick: 200)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_COUNT} follow-ups; judge only lost / duplicated / not final (smoke test)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run baseline and outbox this many times, alternating; the ratio judged is the median "
                             "of the pairs' (a shared machine's load comes and goes)")
    parser.add_argument("--concurrency", type=int, default=OutboxConfig().concurrency,
                        help="outbox.concurrency of the dispatcher (it keeps up to twice as many sends in flight)")
    parser.add_argument("--baseline-workers", type=int, default=0,
                        help="workers of the raw baseline (default: 2 x --concurrency, the dispatcher's in-flight "
                             "bound)")
    parser.add_argument("--baseline-no-keepalive", action="store_true",
                        help="the baseline opens one HTTP connection per sendsms request, as KannelGateway does "
                             "(default: a plain aiohttp session, keep-alive on)")
    parser.add_argument("--batch", type=int, default=OutboxConfig().batch, help="outbox.batch (rows per claim)")
    parser.add_argument("--poll-interval", type=float, default=OutboxConfig().poll_interval,
                        help="outbox.poll_interval (s)")
    parser.add_argument("--smtp-connections", type=int, default=EmailConfig().connections,
                        help="SMTP connections kept open (email.connections; the baseline opens as many)")
    parser.add_argument("--enqueue-batch", type=int, default=500, help="rows per Outbox.enqueue transaction")
    parser.add_argument("--db", default="",
                        help="database URL for the outbox run (default: a SQLite file in the temp folder); "
                             "postgresql+asyncpg://... runs in a private schema, dropped afterwards")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="give up on the outbox run after (s)")
    parser.add_argument("--settle-timeout", type=float, default=120.0,
                        help="how long to wait for receivers and delivery reports after each run (s)")
    parser.add_argument("--timings", action="store_true",
                        help="time the outbox run's gateway sends (up to / in / after handing()), delivery reports "
                             "and SQL statements (cheap, but not free)")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile the outbox run's event loop (slows it down a lot; implies --timings)")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="instead of the two runs: CPU per operation (raw and gateway sends, enqueue, claim, "
                             "marks, delivery reports), each measured alone over N items")
    parser.add_argument("--ignore-reports", action="store_true",
                        help="diagnosis: the outbox run only answers Kannel's delivery reports, as the baseline "
                             "does, instead of applying them (not what the product does)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (Kannel logs, mail, SQLite DB)")
    args = parser.parse_args()
    args.timings = args.timings or args.profile
    if not args.count:
        args.count = QUICK_COUNT if args.quick else 10000
    if args.count < 2 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--count must be >= 2, --concurrency and --repeat >= 1")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(stoppable(run(args)))
    except asyncio.CancelledError:  # SIGTERM / SIGINT: everything was stopped and removed on the way out
        print("bench: stopped by a signal", file=sys.stderr)
        return 128 + signal.SIGTERM


async def stoppable(main: Any) -> int:
    """Run ``main``; SIGTERM and SIGINT cancel it, so that its clean-up (Kannel, the mail sink, the temp folder)
    runs instead of leaving them behind."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return int(await main)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
