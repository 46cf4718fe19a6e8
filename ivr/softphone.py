"""Asyncio-friendly SIP softphone built on pjsua2 (PyPI ``pjsua2-python``).

Used by the ``ivr-bridge call`` command and by integration tests that call a real Asterisk.

Threading model: pjsua2 runs with ``threadCnt = 0`` and ``mainThreadOnly = True``; a background
asyncio task polls ``Endpoint.libHandleEvents(0)`` every ~10 ms, so every pjsua2 callback runs
inside the event loop's thread and may touch asyncio futures directly.  Audio uses the null sound
device, whose clock thread drives the conference bridge (recording and playback work without a
sound card).

Endpoint lifetime: pjsua2 allows one ``pj.Endpoint`` per process.  A module-level, reference
counted engine owns it: the first started ``Softphone`` creates the library, the last
``aclose()`` destroys it (calls, players and recorders are dropped first, otherwise
``libDestroy()`` aborts the process with an assertion).  Creating and destroying the library
repeatedly in one process works, so softphones can be used sequentially (one per test), and
several softphones may run at the same time as long as they share one event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import gc
import logging
import os
import re
import sys
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pjsua2 as pj

__all__ = [
    "CallFailed",
    "CallState",
    "RegistrationFailed",
    "Softphone",
    "SoftphoneCall",
    "SoftphoneConfig",
    "SoftphoneError",
    "sip_uri",
]

log = logging.getLogger(__name__)

_NUMBER_RE = re.compile(r"[0-9*#+]{1,32}")
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_TOKEN_RE = re.compile(r"[A-Za-z0-9!%*_+`'~.\-]{1,64}")
_DTMF_RE = re.compile(r"[0-9*#A-Da-d]*")
_POLL_INTERVAL = 0.01


class SoftphoneError(Exception):
    """Base error of the softphone."""


class CallFailed(SoftphoneError):
    """The call ended before it was answered (or media never came up)."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(f"call failed: {status_code} {reason}".rstrip())
        self.status_code = status_code
        self.reason = reason


class RegistrationFailed(SoftphoneError):
    """REGISTER was rejected or timed out."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(f"registration failed: {status_code} {reason}".rstrip())
        self.status_code = status_code
        self.reason = reason


class CallState(enum.StrEnum):
    """SIP INVITE session state (mirrors ``pjsip_inv_state``)."""

    NULL = "NULL"
    CALLING = "CALLING"
    INCOMING = "INCOMING"
    EARLY = "EARLY"
    CONNECTING = "CONNECTING"
    CONFIRMED = "CONFIRMED"
    DISCONNECTED = "DISCONNECTED"


_STATE_MAP: dict[int, CallState] = {
    pj.PJSIP_INV_STATE_NULL: CallState.NULL,
    pj.PJSIP_INV_STATE_CALLING: CallState.CALLING,
    pj.PJSIP_INV_STATE_INCOMING: CallState.INCOMING,
    pj.PJSIP_INV_STATE_EARLY: CallState.EARLY,
    pj.PJSIP_INV_STATE_CONNECTING: CallState.CONNECTING,
    pj.PJSIP_INV_STATE_CONFIRMED: CallState.CONFIRMED,
    pj.PJSIP_INV_STATE_DISCONNECTED: CallState.DISCONNECTED,
}


def sip_uri(number: str, host: str, port: int) -> str:
    """Build ``sip:<number>@<host>:<port>``; ``number`` must match ``[0-9*#+]{1,32}``."""
    if not isinstance(number, str) or not _NUMBER_RE.fullmatch(number):
        raise ValueError(f"invalid number {number!r}: expected 1-32 of 0-9 * # +")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if not _HOST_RE.fullmatch(host):
        raise ValueError(f"invalid host {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"invalid port {port!r}")
    # '#' is not allowed unescaped in a SIP user part; Asterisk decodes %23 back to '#'.
    return f"sip:{number.replace('#', '%23')}@{host}:{port}"


@dataclass
class SoftphoneConfig:
    """Identity, transport and optional authentication of a softphone."""

    local_host: str = "127.0.0.1"
    local_port: int = 0  # 0: pick a free port
    user: str = "caller"  # From user part (caller ID number)
    display_name: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)  # added to every INVITE
    username: str | None = None  # digest auth user
    password: str | None = None
    registrar: str | None = None  # e.g. "sip:127.0.0.1:5060"; REGISTER only when set
    register_timeout: float = 10.0
    log_level: int = 1  # pjsip console log level (0 = silent, 5 = very verbose)


# --------------------------------------------------------------------------- engine


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence C-level stdout (pjlib prints banners at libCreate before the log level applies)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        sys.stdout.flush()
        libc.fflush(None)
        saved = os.dup(1)
    except (OSError, AttributeError, ValueError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
        finally:
            os.close(devnull)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


class _Engine:
    """The process-wide pjsua2 endpoint, reference counted by started softphones."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log_level: int) -> None:
        self.loop = loop
        self.phones: set[Softphone] = set()
        self.transports: dict[tuple[str, int], tuple[int, int]] = {}
        self.ep = pj.Endpoint()
        with _quiet_stdout() if log_level < 4 else contextlib.nullcontext():
            self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = 32
        cfg.uaConfig.userAgent = "ivr-bridge-softphone"
        cfg.logConfig.level = log_level
        cfg.logConfig.consoleLevel = log_level
        cfg.medConfig.clockRate = 8000  # recordings come out as 8 kHz mono 16-bit
        cfg.medConfig.sndClockRate = 8000
        cfg.medConfig.channelCount = 1
        cfg.medConfig.ecTailLen = 0
        cfg.medConfig.noVad = True
        self.ep.libInit(cfg)
        self.ep.audDevManager().setNullDev()
        for codec, prio in (("PCMU/8000", 255), ("PCMA/8000", 254)):
            with contextlib.suppress(pj.Error):
                self.ep.codecSetPriority(codec, prio)
        self.ep.libStart()
        self.poll_task: asyncio.Task[None] = loop.create_task(self._poll(), name="pjsua2-poll")

    def transport(self, host: str, port: int) -> tuple[int, int]:
        """Return ``(transport id, bound port)`` of a UDP transport on ``host``."""
        key = (host, port)
        if key not in self.transports:
            tc = pj.TransportConfig()
            tc.port = port
            tc.boundAddress = host
            tid = self.ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
            name = self.ep.transportGetInfo(tid).localName
            self.transports[key] = (tid, int(name.rsplit(":", 1)[1]))
        return self.transports[key]

    async def _poll(self) -> None:
        while True:
            try:
                busy = self.ep.libHandleEvents(0) > 0
            except pj.Error as exc:
                log.warning("libHandleEvents: %s", exc.info())
                busy = False
            await asyncio.sleep(0 if busy else _POLL_INTERVAL)

    def pump(self, seconds: float) -> None:
        """Handle events synchronously for a short while (used while tearing down)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.ep.libHandleEvents(10)

    async def destroy(self) -> None:
        self.poll_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.poll_task
        self.destroy_sync()

    def destroy_sync(self) -> None:
        """Destroy the library; softphones that were never closed are dropped forcibly."""
        if not self.poll_task.done() and not self.loop.is_closed():
            self.poll_task.cancel()
        if not self.ep.libIsThreadRegistered():
            self.ep.libRegisterThread("softphone-teardown")
        for phone in list(self.phones):
            phone._drop_pj_objects()
        self.phones.clear()
        with contextlib.suppress(pj.Error):
            self.ep.hangupAllCalls()
        self.pump(0.05)
        gc.collect()  # pj.Call / recorder / player objects must be gone before libDestroy
        # Calls and registrations were ended gracefully already; NO_NETWORK skips the fixed
        # one-second sleep pjsua_destroy() does otherwise.
        self.ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)
        self.ep = None
        gc.collect()


_engine: _Engine | None = None


async def _acquire_engine(phone: Softphone, log_level: int) -> _Engine:
    global _engine
    loop = asyncio.get_running_loop()
    if _engine is not None and _engine.loop is not loop:
        if not _engine.loop.is_closed():
            raise RuntimeError("the pjsua2 endpoint is in use by another event loop")
        # A previous event loop ended without closing its softphones (e.g. an aborted test).
        stale, _engine = _engine, None
        stale.destroy_sync()
    if _engine is None:
        _engine = _Engine(loop, log_level)
    elif not _engine.ep.libIsThreadRegistered():
        _engine.ep.libRegisterThread("asyncio")
    _engine.phones.add(phone)
    return _engine


async def _release_engine(phone: Softphone, engine: _Engine) -> None:
    global _engine
    engine.phones.discard(phone)
    if not engine.phones and _engine is engine:
        _engine = None
        await engine.destroy()


@atexit.register
def _destroy_at_exit() -> None:
    global _engine
    if _engine is not None and _engine.ep is not None:
        engine, _engine = _engine, None
        with contextlib.suppress(Exception):
            engine.destroy_sync()


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Never let a Python exception escape into the pjsua2 C++ director."""

    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("error in pjsua2 callback %s", fn.__name__)

    wrapper.__name__ = fn.__name__
    return wrapper


def _set(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


# --------------------------------------------------------------------------- pjsua2 subclasses


class _PjAccount(pj.Account):
    def __init__(self, owner: Softphone) -> None:
        pj.Account.__init__(self)
        self.owner = owner

    @_guarded
    def onRegState(self, prm: Any) -> None:
        self.owner._on_reg_state(int(prm.code), str(prm.reason))

    @_guarded
    def onIncomingCall(self, prm: Any) -> None:
        self.owner._on_incoming(self, int(prm.callId))


class _PjCall(pj.Call):
    def __init__(self, acc: pj.Account, owner: SoftphoneCall, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        pj.Call.__init__(self, acc, call_id)
        self.owner: SoftphoneCall | None = owner

    @_guarded
    def onCallState(self, prm: Any) -> None:
        if self.owner is not None:
            self.owner._on_state(self.getInfo())

    @_guarded
    def onCallMediaState(self, prm: Any) -> None:
        if self.owner is not None:
            self.owner._on_media(self)


# --------------------------------------------------------------------------- public API


class SoftphoneCall:
    """One call: outgoing (:meth:`Softphone.dial`) or incoming (:meth:`Softphone.incoming`)."""

    def __init__(self, phone: Softphone, uri: str, record_to: Path | None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._phone = phone
        self.uri = uri
        self.record_to = record_to
        self.sip_call_id = ""
        self._state = CallState.NULL
        self._status_code: int | None = None
        self._reason = ""
        self._local_hangup = False
        self._was_answered = False
        self._answered: asyncio.Future[bool] = loop.create_future()
        self._media: asyncio.Future[bool] = loop.create_future()
        self._ended: asyncio.Future[None] = loop.create_future()
        self._pjcall: _PjCall | None = None
        self._audio: pj.AudioMedia | None = None
        self._recorder: pj.AudioMediaRecorder | None = None
        # Players/recorder are referenced only here, so dropping them is immediate and complete.
        self._players: dict[int, pj.AudioMediaPlayer] = {}
        self._next_player = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- properties

    @property
    def state(self) -> CallState:
        """Current INVITE session state."""
        return self._state

    @property
    def last_status_code(self) -> int | None:
        """Last SIP status code seen on the INVITE dialog (None before any response)."""
        return self._status_code

    @property
    def last_reason(self) -> str:
        """Reason phrase belonging to :attr:`last_status_code`."""
        return self._reason

    @property
    def answered(self) -> bool:
        """True once the call reached CONFIRMED."""
        return self._was_answered

    @property
    def ended(self) -> bool:
        """True once the call is DISCONNECTED and its resources are released."""
        return self._ended.done()

    @property
    def ended_by_remote(self) -> bool:
        """True if the call ended without us hanging up (BYE or rejection from the far end)."""
        return self.ended and not self._local_hangup

    # ---- awaitables

    async def wait_answered(self, timeout: float = 10) -> None:
        """Wait for CONFIRMED; raise ``TimeoutError`` or :class:`CallFailed`."""
        async with asyncio.timeout(timeout):
            ok = await asyncio.shield(self._answered)
        if not ok:
            raise CallFailed(self._status_code or 0, self._reason)

    async def wait_ended(self, timeout: float = 30) -> None:
        """Wait for DISCONNECTED (recording finalized); raise ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._ended)

    async def wait_media(self, timeout: float = 10) -> None:
        """Wait until the call's audio is active; raise :class:`CallFailed` if it ends first."""
        async with asyncio.timeout(timeout):
            ok = await asyncio.shield(self._media)
        if not ok or self._audio is None:
            raise CallFailed(self._status_code or 0, self._reason or "no active media")

    async def send_digits(self, digits: str, gap: float = 0.25) -> None:
        """Send RFC 4733 DTMF one digit at a time, sleeping ``gap`` seconds after each."""
        if not _DTMF_RE.fullmatch(digits):
            raise ValueError(f"invalid DTMF digits {digits!r}")
        await self.wait_media()
        for digit in digits:
            call = self._pjcall
            if call is None or self.ended:
                raise CallFailed(self._status_code or 0, self._reason or "call ended")
            call.dialDtmf(digit)
            await asyncio.sleep(gap)

    async def play(self, wav: Path) -> None:
        """Play a 16-bit mono wav (any rate) into the call; return when it finished or the call ended."""
        duration = _wav_duration(wav)
        await self.wait_media()
        assert self._audio is not None
        key = self._next_player = self._next_player + 1
        player = pj.AudioMediaPlayer()
        player.createPlayer(str(wav), pj.PJMEDIA_FILE_NO_LOOP)
        player.startTransmit(self._audio)
        self._players[key] = player
        del player  # no reference across awaits: teardown must be able to free it
        try:
            start = time.monotonic()
            last_pos = -1
            while not self.ended and key in self._players:
                elapsed = time.monotonic() - start
                pos = self._players[key].getPos()
                # The null sound device clocks the bridge in real time; after the nominal
                # duration wait until the position stops moving (bounded by 0.5 s).
                if elapsed >= duration and (pos == last_pos or elapsed >= duration + 0.5):
                    break
                last_pos = pos
                await asyncio.sleep(0.02)
        finally:
            self._drop_player(key)

    async def answer(self, *, record_to: Path | None = None) -> None:
        """Answer a ringing incoming call (200 OK), optionally recording the far end; waits for CONFIRMED."""
        call = self._pjcall
        if call is None or self.ended:
            raise CallFailed(self._status_code or 0, self._reason or "call ended")
        if record_to is not None:
            self.record_to = Path(record_to)
        prm = pj.CallOpParam(True)
        prm.statusCode = 200
        call.answer(prm)
        await self.wait_answered()

    async def reject(self, status_code: int = 486) -> None:
        """Refuse a ringing incoming call (486 Busy Here by default) and wait until it is gone."""
        call = self._pjcall
        if call is None or self.ended:
            return
        self._local_hangup = True
        prm = pj.CallOpParam(True)
        prm.statusCode = status_code
        call.hangup(prm)
        await self.wait_ended(5)

    async def hangup(self, timeout: float = 5) -> None:
        """Hang up (CANCEL/BYE) and wait until the call is DISCONNECTED."""
        if self.ended:
            return
        call = self._pjcall
        if call is not None and self._state != CallState.DISCONNECTED:
            self._local_hangup = True
            try:
                call.hangup(pj.CallOpParam())
            except pj.Error as exc:
                log.debug("hangup: %s", exc.info())
        await self.wait_ended(timeout)

    # ---- pjsua2 callbacks (run inside libHandleEvents in the loop thread)

    def _on_state(self, ci: Any) -> None:
        self._state = _STATE_MAP.get(int(ci.state), CallState.NULL)
        if ci.lastStatusCode:
            self._status_code = int(ci.lastStatusCode)
            self._reason = str(ci.lastReason)
        if not self.sip_call_id:
            self.sip_call_id = str(ci.callIdString)
        if self._state == CallState.CONFIRMED:
            self._was_answered = True
            _set(self._answered, True)
        elif self._state == CallState.DISCONNECTED:
            _set(self._answered, self._was_answered)
            # Release pjsua2 objects outside of the director callback.
            self._loop.call_soon(self._finish)

    def _on_media(self, call: _PjCall) -> None:
        ci = call.getInfo()
        for mi in ci.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            audio = call.getAudioMedia(mi.index)
            self._audio = audio
            # Connect the call to the (null) sound device both ways: a call port with nothing connected is not
            # clocked by the conference bridge, and then pjsua sends no RTP at all, DTMF events included.
            devices = pj.Endpoint.instance().audDevManager()
            devices.getCaptureDevMedia().startTransmit(audio)
            audio.startTransmit(devices.getPlaybackDevMedia())
            if self.record_to is not None and self._recorder is None:
                self.record_to.parent.mkdir(parents=True, exist_ok=True)
                rec = pj.AudioMediaRecorder()
                rec.createRecorder(str(self.record_to))
                self._recorder = rec
            if self._recorder is not None:
                audio.startTransmit(self._recorder)
            for player in self._players.values():
                player.startTransmit(audio)
            _set(self._media, True)
            return

    # ---- teardown

    def _drop_player(self, key: int) -> None:
        player = self._players.pop(key, None)
        if player is not None and self._audio is not None:
            with contextlib.suppress(pj.Error):
                player.stopTransmit(self._audio)

    def _drop_pj_objects(self) -> None:
        self._players.clear()
        self._recorder = None  # deleting the recorder writes the final wav header
        self._audio = None
        if self._pjcall is not None:
            self._pjcall.owner = None
            self._pjcall = None

    def _finish(self) -> None:
        """Drop recorder, players and the pj.Call (finalizing the recording), then resolve waiters."""
        if self._ended.done():
            return
        self._state = CallState.DISCONNECTED
        self._drop_pj_objects()
        for task in self._tasks:
            task.cancel()
        _set(self._answered, self._was_answered)
        _set(self._media, False)
        _set(self._ended, None)
        self._phone._forget(self)

    def _start_background_play(self, wav: Path) -> None:
        async def runner() -> None:
            try:
                await self.play(wav)
            except (SoftphoneError, TimeoutError, pj.Error) as exc:
                log.info("background play of %s stopped: %r", wav, exc)

        task = asyncio.get_running_loop().create_task(runner(), name=f"softphone-play-{wav.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _wav_duration(wav: Path) -> float:
    with wave.open(str(wav), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{wav}: pjsua2 plays 16-bit mono PCM wav only")
        return w.getnframes() / float(w.getframerate())


class Softphone:
    """A SIP user agent that places and receives calls; use ``async with Softphone(cfg) as sp``."""

    def __init__(self, config: SoftphoneConfig | None = None) -> None:
        self.config = config or SoftphoneConfig()
        _validate_config(self.config)
        self._engine: _Engine | None = None
        self._account: _PjAccount | None = None
        self._calls: list[SoftphoneCall] = []
        self._reg: asyncio.Future[tuple[int, str]] | None = None
        self._incoming: asyncio.Queue[SoftphoneCall] = asyncio.Queue()
        self._closed = False
        self.local_port = 0

    async def __aenter__(self) -> Softphone:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def calls(self) -> list[SoftphoneCall]:
        """Calls that have not ended yet."""
        return list(self._calls)

    async def start(self) -> None:
        """Create (or reuse) the endpoint, a UDP transport and the account; REGISTER if configured."""
        if self._engine is not None:
            return
        if self._closed:
            raise RuntimeError("softphone was closed")
        cfg = self.config
        engine = await _acquire_engine(self, cfg.log_level)
        self._engine = engine
        try:
            tid, self.local_port = engine.transport(cfg.local_host, cfg.local_port)
            acfg = pj.AccountConfig()
            domain = _registrar_host(cfg.registrar) if cfg.registrar else _host_port(cfg.local_host)
            ident = f"sip:{cfg.user}@{domain}"
            if cfg.display_name:
                name = cfg.display_name.replace("\\", "\\\\").replace('"', '\\"')
                ident = f'"{name}" <{ident}>'
            acfg.idUri = ident
            acfg.sipConfig.transportId = tid
            acfg.mediaConfig.transportConfig.boundAddress = cfg.local_host
            acfg.mediaConfig.transportConfig.port = 0  # random free RTP port pair
            if cfg.username is not None:
                acfg.sipConfig.authCreds.append(
                    pj.AuthCredInfo("digest", "*", cfg.username, 0, cfg.password or "")
                )
            if cfg.registrar:
                acfg.regConfig.registrarUri = cfg.registrar
                acfg.regConfig.registerOnAdd = True
                acfg.regConfig.timeoutSec = 300
                acfg.regConfig.unregWaitMsec = 1000
                self._reg = engine.loop.create_future()
            acc = _PjAccount(self)
            acc.create(acfg)
            self._account = acc
            if self._reg is not None:
                try:
                    async with asyncio.timeout(cfg.register_timeout):
                        code, reason = await self._reg
                except TimeoutError:
                    raise RegistrationFailed(408, "Request Timeout") from None
                if not 200 <= code < 300:
                    raise RegistrationFailed(code, reason)
        except BaseException:
            await self.aclose()
            raise

    async def dial(
        self, uri: str, *, record_to: Path | None = None, play: Path | None = None
    ) -> SoftphoneCall:
        """Place a call to ``uri``; optionally record the far end and/or play a wav once media is up."""
        if self._account is None or self._engine is None:
            raise RuntimeError("softphone not started")
        if any(c in uri for c in "\r\n\0 <>"):
            raise ValueError(f"invalid SIP URI {uri!r}")
        if play is not None:
            _wav_duration(play)
        call = SoftphoneCall(self, uri, Path(record_to) if record_to is not None else None)
        pjcall = _PjCall(self._account, call)
        call._pjcall = pjcall
        prm = pj.CallOpParam(True)
        for name, value in self.config.extra_headers.items():
            hdr = pj.SipHeader()
            hdr.hName = name
            hdr.hValue = value
            prm.txOption.headers.append(hdr)
        self._calls.append(call)
        try:
            pjcall.makeCall(uri, prm)
        except pj.Error as exc:
            call._reason = str(exc.reason)
            call._finish()
            raise SoftphoneError(f"makeCall({uri}) failed: {exc.reason}") from None
        with contextlib.suppress(pj.Error):
            call.sip_call_id = str(pjcall.getInfo().callIdString)
        if play is not None:
            call._start_background_play(Path(play))
        return call

    async def aclose(self) -> None:
        """Hang up all calls and release the account (and the endpoint if last user); idempotent."""
        self._closed = True
        engine = self._engine
        if engine is None:
            return
        for call in list(self._calls):
            tasks = list(call._tasks)
            with contextlib.suppress(TimeoutError, pj.Error):
                await call.hangup(timeout=2)
            call._finish()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._calls.clear()
        if self._account is not None:
            acc, self._account = self._account, None
            with contextlib.suppress(pj.Error):
                acc.shutdown()
            if self.config.registrar:
                engine.pump(0.2)  # let the un-REGISTER go out
            del acc
        self._engine = None
        await _release_engine(self, engine)

    # ---- internals used by SoftphoneCall / _PjAccount

    def _drop_pj_objects(self) -> None:
        """Forcibly drop every pjsua2 object of this phone (the library is being destroyed)."""
        for call in self._calls:
            call._drop_pj_objects()
        self._calls.clear()
        self._account = None
        self._engine = None

    def _forget(self, call: SoftphoneCall) -> None:
        if call in self._calls:
            self._calls.remove(call)

    async def incoming(self, timeout: float = 10) -> SoftphoneCall:
        """The next incoming call (ringing: 180 sent); answer or reject it. Raises ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            return await self._incoming.get()

    def _on_incoming(self, account: _PjAccount, call_id: int) -> None:
        call = SoftphoneCall(self, "", None)
        pjcall = _PjCall(account, call, call_id)
        call._pjcall = pjcall
        with contextlib.suppress(pj.Error):
            info = pjcall.getInfo()
            call.uri = str(info.remoteUri)
            call.sip_call_id = str(info.callIdString)
        self._calls.append(call)
        prm = pj.CallOpParam(True)
        prm.statusCode = 180
        pjcall.answer(prm)
        self._incoming.put_nowait(call)

    def _on_reg_state(self, code: int, reason: str) -> None:
        if self._reg is not None:
            _set(self._reg, (code, reason))


def _validate_config(cfg: SoftphoneConfig) -> None:
    if not _TOKEN_RE.fullmatch(cfg.user):
        raise ValueError(f"invalid SIP user {cfg.user!r}")
    for text in (cfg.display_name, cfg.username, cfg.password, cfg.registrar, cfg.local_host):
        if text is not None and any(c in text for c in "\r\n\0"):
            raise ValueError("CR, LF and NUL are not allowed in softphone settings")
    for name, value in cfg.extra_headers.items():
        if not _TOKEN_RE.fullmatch(name):
            raise ValueError(f"invalid SIP header name {name!r}")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid value for header {name}")


def _host_port(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _registrar_host(registrar: str) -> str:
    rest = registrar.split(":", 1)[1] if registrar.lower().startswith(("sip:", "sips:")) else registrar
    return rest.split(";", 1)[0].split(">", 1)[0]
