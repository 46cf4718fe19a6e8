"""Fixtures for the integration tests: a private Redis, the ``test`` Asterisk instance, apps, callers.

The ``test`` Asterisk instance (SIP 127.0.0.1:15060, AMI 15038, RTP 12000-12999) lives in the Asterisk chroot
(``/var/cache/ivr-bridge/asterisk-root``, see ivr.pbx) with freshly generated secrets, answers the numbers of the
flows in ``tests/flows_it`` and is started once per session. Every test gets its own SQLite file (or PostgreSQL
schema) and its own ``bridge.app.App`` running in the test's event loop; a pjsua2 softphone plays the caller.

Waiting is done on the event bus (``CallWatch``), on AMI events and on the softphone's own futures, always bounded.
The one deliberate pause is ``BARGE_IN``: a caller presses a key a moment after a prompt starts, because AsyncAGI
drops DTMF that arrives between two AGI commands (there is no event for "the prompt is playing now").
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from panoramisk.message import Message

from bridge import db
from bridge.app import App
from bridge.config import PROJECT_DIR, AsteriskConfig, Config, KannelConfig, TtsConfig
from bridge.store import InteractionStore
from ivr.flow import load_flows
from ivr.pbx import AsteriskInstance
from ivr.prompts import PromptLibrary
from ivr.softphone import Softphone, SoftphoneCall, SoftphoneConfig, sip_uri
from sms.kannel_proc import BEARERBOX, FAKESMSC, SMSBOX, KannelInstance, instance_config

ROOT = Path(os.environ.get("IVR_ASTERISK_ROOT", "/var/cache/ivr-bridge/asterisk-root"))
FLOWS_IT = Path(__file__).resolve().parent / "flows_it"
SIP_PORT = 15060
AMI_PORT = 15038
CALLER = "5551234"
CALL_LOG = "it-calls.log"  # a temporary logger channel of the test instance (in its log folder)
BARGE_IN = 0.3  # seconds into a prompt before the caller presses a key
SILENCE_RMS = 200.0  # TTS speech is in the thousands; transmit_silence / comfort noise stays well below this


def _unavailable(reason: str) -> None:
    """Missing infrastructure fails the run in CI and skips the test elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)", pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------------------------------------------ redis
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port (no persistence), stopped at the end of the session."""
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not installed")
    assert binary is not None
    workdir = tmp_path_factory.mktemp("redis")
    for _attempt in range(3):
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--logfile", str(workdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline and not _redis_ping(port):
            time.sleep(0.05)
        if proc.poll() is None and _redis_ping(port):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"redis-server did not start; see {workdir / 'redis.log'}")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ asterisk
def _flow_numbers() -> list[str]:
    """Numbers the test instance routes to the IVR: the test flows' and the shipped hotline's."""
    flows, problems = load_flows([FLOWS_IT, FLOWS_IT.parent.parent / "flows"])
    errors = [str(p) for p in problems if p.severity == "error"]
    assert not errors, "test flows have errors:\n" + "\n".join(errors)
    return sorted({number for flow in flows.values() for number in flow.numbers})


@pytest.fixture(scope="session")
def asterisk_config() -> AsteriskConfig:
    # token_urlsafe only uses letters, digits, '-' and '_', which AsteriskInstance.variables() accepts.
    return AsteriskConfig(root=ROOT, instance="test", sip_port=SIP_PORT, ami_port=AMI_PORT, rtp_start=12000,
                          rtp_end=12999, ami_secret=secrets.token_urlsafe(24),
                          softphone_password=secrets.token_urlsafe(24),
                          agent_phone_secret=secrets.token_urlsafe(24))


@pytest.fixture(scope="session")
def asterisk(asterisk_config: AsteriskConfig) -> Iterator[AsteriskInstance]:
    """The ``test`` Asterisk instance, started once per session and stopped at its end."""
    if not (ROOT / "usr/sbin/asterisk").exists():
        _unavailable(f"no Asterisk chroot at {ROOT} (make setup-test builds it)")
    if os.geteuid() != 0:
        _unavailable("the Asterisk chroot needs root")
    instance = AsteriskInstance(asterisk_config, _flow_numbers())
    # The dialplan's own announcements (fallback, nobody) must exist before any call, even with no App running.
    library = PromptLibrary(TtsConfig(), asterisk_config)
    try:
        library.render_system_prompts()
    finally:
        library.close()
    instance.start()
    try:
        # A private log with "Executing [...]" lines (verbose 3) shows where calls went in the dialplan.
        instance.rx(f"logger add channel {CALL_LOG} verbose(3),notice,warning,error,dtmf")
        yield instance
    finally:
        instance.stop()


# ------------------------------------------------------------------------------------------------ databases
def pg_base_url() -> str:
    """IVR_TEST_PG_URL; without it PostgreSQL tests fail in CI and are skipped elsewhere."""
    base = os.environ.get("IVR_TEST_PG_URL", "")
    if not base:
        _unavailable("IVR_TEST_PG_URL is not set (scripts/test.sh sets it up: "
                     "postgresql+asyncpg://ivr_test:ivr_test@127.0.0.1:5432/ivr_test)")
    return base


@contextlib.asynccontextmanager
async def pg_schema(base: str) -> AsyncIterator[str]:
    """A URL on a private, empty schema of the test database, dropped afterwards (runs never share tables)."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    schema = f"it_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(base)
    try:
        async with admin.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        # asyncpg takes server settings from the query of a DSN, and SQLAlchemy passes URL query items to
        # asyncpg.connect() as keywords: a `dsn` item carries search_path to every connection of the URL.
        url = make_url(base).update_query_dict(
            {"dsn": "postgresql:///?" + urllib.parse.urlencode({"search_path": schema})})
        yield url.render_as_string(hide_password=False)
    finally:
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """PostgreSQL (IVR_TEST_PG_URL) on a private empty schema."""
    async with pg_schema(pg_base_url()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The database URL for tests that run against both back ends."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ivr-bridge.db'}"
        return
    async with pg_schema(pg_base_url()) as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[InteractionStore]:
    """A started store on a migrated database, once per back end (``db_url``)."""
    await db.upgrade(db_url)
    store = InteractionStore(db_url)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


# ------------------------------------------------------------------------------------------------ helpers
def rms(path: Path, start: float = 0.0, end: float | None = None) -> float:
    """Root mean square of a 16-bit mono wav between ``start`` and ``end`` seconds."""
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2), f"{path}: not 16-bit mono"
        rate = wav.getframerate()
        total = wav.getnframes()
        first = min(int(start * rate), total)
        last = total if end is None else min(int(end * rate), total)
        wav.setpos(first)
        frames = wav.readframes(max(last - first, 0))
    samples = array.array("h", frames)
    return math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0


def wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll a cheap in-process condition (bounded); for things that publish no event."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        await asyncio.sleep(interval)


class CallWatch:
    """The bus events of one call, consumed in order: ``await watch.next('prompt', node='main')``.

    The call is recognised by its SIP Call-ID (``call-started``) or, for a resumed call, by its interaction id.
    """

    def __init__(self, app: App, *, sip_call_id: str = "", call_id: str = "") -> None:
        self.app = app
        self.sip_call_id = sip_call_id
        self.call_id = call_id
        self.seen: list[dict[str, Any]] = []
        self._pos = 0
        self._new = asyncio.Event()
        app.bus.add_listener(self._on_event)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.app.bus.remove_listener(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.seen.append(event)
        self._new.set()

    def _mine(self, event: dict[str, Any]) -> bool:
        if not self.call_id and self.sip_call_id and event.get("type") == "call-started" \
                and event.get("sip_call_id") == self.sip_call_id:
            self.call_id = str(event["call_id"])
        return bool(self.call_id) and event.get("call_id") == self.call_id

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Events of this call seen so far (consumed or not)."""
        return [e for e in self.seen if self._mine(e) and (kind is None or e.get("type") == kind)]

    async def next(self, kind: str, timeout: float = 15, **match: Any) -> dict[str, Any]:
        """The next not yet consumed event of this call of type ``kind`` whose fields equal ``match``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while self._pos < len(self.seen):
                        event = self.seen[self._pos]
                        self._pos += 1
                        if self._mine(event) and event.get("type") == kind \
                                and all(event.get(k) == v for k, v in match.items()):
                            return event
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            mine = [{k: v for k, v in e.items() if k not in ("call_id", "sip_call_id")} for e in self.events()]
            raise AssertionError(f"no {kind} event {match or ''} within {timeout:.0f} s; this call's events: "
                                 f"{mine}") from None


class AgiWatch:
    """AsyncAGIExec events (AGI command completions) that Asterisk reports on an App's AMI link."""

    def __init__(self, app: App) -> None:
        self.execs: list[Message] = []
        self._new = asyncio.Event()
        app.ami.add_event_listener(self._on_event)

    def _on_event(self, message: Message) -> None:
        if message.get("Event") == "AsyncAGIExec":
            self.execs.append(message)
            self._new.set()

    def of(self, channel: str) -> list[Message]:
        return [m for m in self.execs if m.get("Channel") == channel]

    async def completion(self, channel: str, index: int, timeout: float = 10) -> Message:
        """The ``index``-th (0-based) command completion seen on ``channel``, waiting for it if need be."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.of(channel)) <= index:
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError(f"no AGI command completion #{index + 1} on {channel} within {timeout:.0f} s "
                                 f"(seen {len(self.of(channel))})") from None
        return self.of(channel)[index]


class Harness:
    """What the integration tests share: configs, apps, the caller, and ways to look into Asterisk."""

    def __init__(self, asterisk: AsteriskInstance, redis_url: str, tmp_path: Path) -> None:
        self.asterisk = asterisk
        self.redis_url = redis_url
        self.tmp_path = tmp_path
        self.apps: list[App] = []
        self.phone: Softphone | None = None
        self._log_offset = self._log_size()

    # ---- configuration and apps
    def config(self, database_url: str = "", flows: list[Path] | None = None, default_flow: str = "it_main",
               reload_interval: float = 2.0) -> Config:
        config = Config()
        config.general.var_dir = self.tmp_path / "var"
        config.database.url = database_url or f"sqlite+aiosqlite:///{self.tmp_path / 'ivr-bridge.db'}"
        config.redis.url = self.redis_url
        config.asterisk = self.asterisk.config.model_copy()
        config.flows.paths = flows or [FLOWS_IT]
        config.flows.default_flow = default_flow
        config.flows.reload_interval = reload_interval
        config.tts = TtsConfig()
        config.links.secret = "test-link-secret-" + "x" * 16
        config.web.port = 0              # no web app and no dispatcher unless a test asks for them
        config.outbox.enabled = False
        return config

    def make_app(self, config: Config | None = None) -> App:
        """An App not started yet (attach watches first when they must see what happens at start-up)."""
        app = App(config or self.config())
        self.apps.append(app)
        return app

    async def start(self, app: App) -> App:
        """Start an App in this event loop, wait for its AMI login and its first heartbeat in Asterisk."""
        await app.start(wait_for_asterisk=10)
        await wait_until(lambda: app.ami.last_ping_rtt is not None, 10, "the first AMI heartbeat")
        return app

    async def start_app(self, config: Config | None = None) -> App:
        return await self.start(self.make_app(config))

    async def close_app(self, app: App, **kwargs: Any) -> None:
        """Close an App and check that it left no call behind (sessions, call-* tasks)."""
        await app.aclose(**kwargs)
        assert app.engine.sessions == {}, f"sessions left after close: {list(app.engine.sessions)}"
        left = self.call_tasks()
        assert left == [], f"call tasks left running after close: {left}"

    # ---- the caller
    async def softphone(self, user: str = CALLER, display_name: str | None = None) -> Softphone:
        if self.phone is None:
            self.phone = Softphone(SoftphoneConfig(user=user, display_name=display_name))
            await self.phone.start()
        return self.phone

    async def dial(self, number: str, record: str | None = "heard.wav",
                   app: App | None = None) -> tuple[SoftphoneCall, CallWatch | None]:
        """Dial ``number`` on the test instance; returns the call and a watch on ``app``'s events for it."""
        phone = await self.softphone()
        watch = CallWatch(app) if app is not None else None
        record_to = self.tmp_path / f"{uuid.uuid4().hex[:6]}-{record}" if record else None
        call = await phone.dial(sip_uri(number, "127.0.0.1", SIP_PORT), record_to=record_to)
        if watch is not None:
            watch.sip_call_id = call.sip_call_id
        await call.wait_answered(timeout=10)
        await call.wait_media(timeout=5)
        return call, watch

    async def press(self, call: SoftphoneCall, watch: CallWatch, node: str, digits: str, text: str | None = None,
                    timeout: float = 15) -> dict[str, Any]:
        """Wait until ``node`` starts a prompt (its main prompt when ``text`` is given: no-input and invalid
        prompts cannot be interrupted), then press ``digits`` a moment into it (a caller barging in)."""
        match = {"text": text} if text is not None else {}
        event = await watch.next("prompt", node=node, timeout=timeout, **match)
        await asyncio.sleep(BARGE_IN)
        await call.send_digits(digits)
        return event

    # ---- looking at calls
    CALLER = CALLER
    SILENCE_RMS = SILENCE_RMS
    BARGE_IN = BARGE_IN
    rms = staticmethod(rms)
    wav_seconds = staticmethod(wav_seconds)
    wait_until = staticmethod(wait_until)

    async def wav_ready(self, path: Path, timeout: float = 3) -> None:
        """Wait until the softphone's recorder has finalized the wav.

        pjsua2 2.15 removes conference ports asynchronously (in the media clock thread), so the recorder finalizes
        the file a little after ``wait_ended`` returned; it then writes the RIFF size and the data size one after
        the other. Done means both sizes agree with the file's length (pjmedia writes a 44-byte header).
        """
        def complete() -> bool:
            try:
                data = path.read_bytes()
            except OSError:
                return False
            if len(data) < 44 or data[:4] != b"RIFF" or data[36:40] != b"data":
                return False
            riff, chunk = int.from_bytes(data[4:8], "little"), int.from_bytes(data[40:44], "little")
            return riff == len(data) - 8 and chunk == len(data) - 44

        await wait_until(complete, timeout, f"the recording {path.name} to be finalized")

    async def heard(self, call: SoftphoneCall, start: float = 0.0, end: float | None = None) -> float:
        """RMS of what the caller heard between ``start`` and ``end`` s after the media came up (call ended)."""
        assert call.record_to is not None, "the call was not recorded"
        await call.wait_ended(timeout=5)
        await self.wav_ready(call.record_to)
        return rms(call.record_to, start, end)

    @staticmethod
    def loudness(call: SoftphoneCall, step: float = 0.5) -> str:
        """RMS per ``step`` seconds of the recording, for assertion messages."""
        assert call.record_to is not None
        total = wav_seconds(call.record_to)
        starts = [i * step for i in range(int(total / step) + 1)]
        marks = [round(rms(call.record_to, t, t + step)) for t in starts]
        return f"{total:.2f} s recorded, RMS per {step} s: {marks}"

    def watch(self, app: App, *, sip_call_id: str = "", call_id: str = "") -> CallWatch:
        return CallWatch(app, sip_call_id=sip_call_id, call_id=call_id)

    @contextlib.asynccontextmanager
    async def redis_events(self, app: App) -> AsyncIterator[list[dict[str, Any]]]:
        """What ``app`` publishes on Redis (bridge.events.subscribe), collected while the block runs."""
        from bridge.events import subscription

        received: list[dict[str, Any]] = []
        async with subscription(self.redis_url, app.config.redis.events_channel) as stream:

            async def pump() -> None:
                async for event in stream:
                    received.append(event)

            task = asyncio.create_task(pump(), name="redis-events")
            try:
                # Ready once a probe published through the App comes back (no fixed settling time).
                for attempt in range(100):
                    app.bus.publish("probe", n=attempt)
                    with contextlib.suppress(AssertionError):
                        await wait_until(lambda: any(e.get("type") == "probe" for e in received), 0.1, "probe")
                        break
                else:
                    raise AssertionError("the Redis subscription never received a probe event")
                yield received
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def agi_watch(self, app: App) -> AgiWatch:
        return AgiWatch(app)

    @staticmethod
    def spy_actions(app: App) -> list[tuple[str, dict[str, Any]]]:
        """Record every AMI action the App sends from now on (name and headers)."""
        sent: list[tuple[str, dict[str, Any]]] = []
        original = app.ami.action

        async def action(name: str, **kwargs: Any) -> Message:
            sent.append((name, {k: v for k, v in kwargs.items() if not k.startswith("_")}))
            return await original(name, **kwargs)

        app.ami.action = action  # type: ignore[method-assign]
        return sent

    @staticmethod
    def call_tasks(channel: str = "") -> list[str]:
        """Names of call tasks still running (of one channel, or all)."""
        return [t.get_name() for t in asyncio.all_tasks() if not t.done()
                and (t.get_name() == f"call-{channel}" if channel else t.get_name().startswith("call-"))]

    # ---- Asterisk
    async def channels(self) -> list[dict[str, str]]:
        """``core show channels concise`` of the test instance."""
        out = await asyncio.to_thread(self.asterisk.rx, "core show channels concise", check=False) or ""
        keys = ("channel", "context", "exten", "priority", "state", "application", "data")
        return [dict(zip(keys, line.split("!"), strict=False)) for line in out.splitlines() if "!" in line]

    @property
    def log_file(self) -> Path:
        return self.asterisk.log_file.with_name(CALL_LOG)

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def asterisk_log(self) -> str:
        """What the test instance logged since this test started."""
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def executed(self, context: str, exten: str, app: str, channel: str, data: str = "") -> str:
        """A regex for the verbose line of one dialplan step (any priority: the dialplan may gain steps)."""
        return (rf"Executing \[{re.escape(exten)}@{re.escape(context)}:\d+\] {re.escape(app)}\("
                rf"\"{re.escape(channel)}\", \"{re.escape(data)}")

    def log_match(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.asterisk_log())

    async def wait_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait for a line matching ``pattern`` (a regex) in what the test instance logged during this test."""
        match: re.Match[str] = await wait_until(lambda: self.log_match(pattern), timeout,
                                                f"{pattern!r} in the Asterisk log", interval=0.1)
        return match

    # ---- teardown
    async def aclose(self) -> None:
        errors: list[str] = []
        if self.phone is not None:
            await self.phone.aclose()
        for app in reversed(self.apps):
            try:
                await self.close_app(app)
            except AssertionError as exc:
                errors.append(str(exc))
        assert not errors, "; ".join(errors)


@pytest.fixture
async def ivr(asterisk: AsteriskInstance, redis_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """The harness for one test; closes its softphone and every App it started, checking nothing is left."""
    harness = Harness(asterisk, redis_url, tmp_path)
    try:
        yield harness
    finally:
        await harness.aclose()


@pytest.fixture
async def app(ivr: Harness) -> App:
    """A running App on the test instance with a fresh SQLite database and the tests/flows_it flows."""
    return await ivr.start_app()


@pytest.fixture
async def caller(ivr: Harness) -> Softphone:
    """The pjsua2 softphone calling as 5551234 (closed by the harness after the test)."""
    return await ivr.softphone()


class LogCapture(logging.Handler):
    """Log records of one logger, for tests that wait for a log line (e.g. a refused flow reload)."""

    def __init__(self, logger: str, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(logger)
        self._old_level = self.logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> LogCapture:
        self.logger.addHandler(self)
        if self.logger.getEffectiveLevel() > self.level:
            self.logger.setLevel(self.level)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._old_level)

    def matching(self, level: int, text: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno == level and text in r.getMessage()]


@pytest.fixture
def engine_log() -> Iterator[LogCapture]:
    with LogCapture("ivr.engine") as capture:
        yield capture


# Used by tests that need a writable copy of a flow (reload).
@pytest.fixture
def flows_copy(tmp_path: Path) -> Callable[[str], Path]:
    def copy(name: str) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="flows-", dir=tmp_path))
        shutil.copy(FLOWS_IT / name, folder / name)
        return folder
    return copy


# ------------------------------------------------------------------------------------------------ kannel
KANNEL_SENDER = "IVRBridge"


@pytest.fixture(scope="session")
def kannel_config() -> Config:
    config = Config()
    config.general.var_dir = PROJECT_DIR / "var"
    # Delivery reports our web app did not take are retried every second (the dev instance waits 10 s).
    config.sms.kannel = instance_config("test", KannelConfig(password=secrets.token_urlsafe(18), timeout=5.0,
                                                             dlr_retries=20, dlr_retry_delay=1))
    config.sms.sender = KANNEL_SENDER
    return config


@pytest.fixture(scope="session")
def kannel(kannel_config: Config) -> Iterator[KannelInstance]:
    """The ``test`` Kannel instance, started once per session and stopped at its end."""
    missing = [str(b) for b in (BEARERBOX, SMSBOX, FAKESMSC) if not b.exists()]
    if missing:
        _unavailable(f"Kannel is not installed ({', '.join(missing)}; apt-get install kannel kannel-extras)")
    instance = KannelInstance(kannel_config)
    instance.stop()  # whatever an earlier run left behind, with its old password
    (instance.dir / "kannel.store").unlink(missing_ok=True)
    instance.fakesmsc_log.unlink(missing_ok=True)  # what earlier sessions received (it is parsed often)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
