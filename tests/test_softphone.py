"""Integration tests of ivr.softphone against a throwaway Asterisk in the Debian sid chroot.

The Asterisk instance lives under ``<root>/var/lib/ivr-bridge/softphone-test`` with its own
asterisk.conf, listens on 127.0.0.1:25060 (PJSIP/UDP only, no AMI/HTTP) and is stopped with
``core stop now`` at the end of the module.
"""

from __future__ import annotations

import array
import asyncio
import math
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivr.softphone import (
    CallFailed,
    CallState,
    RegistrationFailed,
    Softphone,
    SoftphoneConfig,
    sip_uri,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(os.environ.get("IVR_ASTERISK_ROOT", "/var/cache/ivr-bridge/asterisk-root"))
INSTANCE = "/var/lib/ivr-bridge/softphone-test"  # path inside the chroot
SIP_PORT = 25060
MODDIR = "/usr/lib/x86_64-linux-gnu/asterisk/modules"
REG_USER, REG_PASSWORD = "reguser", "s3cret-softphone"
SOX_FORMAT = ("-r", "8000", "-c", "1", "-b", "16")  # 8 kHz mono 16-bit

ASTERISK_CONF = f"""\
[directories]
astcachedir => {INSTANCE}/cache
astetcdir => {INSTANCE}/etc
astmoddir => {MODDIR}
astvarlibdir => {INSTANCE}/lib
astdbdir => {INSTANCE}/db
astkeydir => {INSTANCE}/lib
astdatadir => /usr/share/asterisk
astagidir => /usr/share/asterisk/agi-bin
astspooldir => {INSTANCE}/spool
astrundir => {INSTANCE}/run
astlogdir => {INSTANCE}/log
astsbindir => /usr/sbin

[options]
verbose = 3
nocolor = yes
systemname = softphone-test
"""

MODULES_CONF = """\
[modules]
autoload = no
load = res_sorcery_config.so
load = res_sorcery_memory.so
load = res_sorcery_astdb.so
load = res_timing_timerfd.so
load = res_pjproject.so
load = res_pjsip.so
load = res_pjsip_session.so
load = res_pjsip_pubsub.so
load = res_pjsip_sdp_rtp.so
load = res_rtp_asterisk.so
load = res_pjsip_endpoint_identifier_ip.so
load = res_pjsip_endpoint_identifier_user.so
load = res_pjsip_authenticator_digest.so
load = res_pjsip_registrar.so
load = res_pjsip_caller_id.so
load = res_pjsip_header_funcs.so
load = chan_pjsip.so
load = codec_ulaw.so
load = format_wav.so
load = format_pcm.so
load = pbx_config.so
load = app_playback.so
load = app_read.so
load = app_echo.so
load = app_verbose.so
load = func_callerid.so
load = func_logic.so
"""

LOGGER_CONF = """\
[general]
dateformat = %F %T.%3q
[logfiles]
softphone.log => notice,warning,error
full.log => notice,warning,error,verbose,dtmf
"""

RTP_CONF = """\
[general]
rtpstart = 26000
rtpend = 26999
icesupport = no
"""

PJSIP_CONF = f"""\
[global]
type = global
user_agent = softphone-test
endpoint_identifier_order = username,ip

[transport-udp]
type = transport
protocol = udp
bind = 127.0.0.1:{SIP_PORT}

[endpoint-tpl](!)
type = endpoint
context = softphone-test
disallow = all
allow = ulaw
dtmf_mode = rfc4733
direct_media = no
rtp_symmetric = yes
media_address = 127.0.0.1
bind_rtp_to_media_address = yes
ice_support = no

[softphone](endpoint-tpl)

[softphone-ip]
type = identify
endpoint = softphone
match = 127.0.0.1

[{REG_USER}](endpoint-tpl)
auth = {REG_USER}-auth
aors = {REG_USER}

[{REG_USER}-auth]
type = auth
auth_type = userpass
username = {REG_USER}
password = {REG_PASSWORD}

[{REG_USER}]
type = aor
max_contacts = 1
remove_existing = yes
"""

EXTENSIONS_CONF = f"""\
[general]
static = yes
writeprotect = yes

[softphone-test]
; 600: answer, play a 1 s tone as the prompt of Read(); "42" hangs up at once, else a 3 s tone first.
exten => 600,1,Answer()
 same => n,Log(NOTICE,SPTEST start trace=${{PJSIP_HEADER(read,X-IVR-Trace)}} cid=${{CALLERID(num)}})
 same => n,Read(D,{INSTANCE}/sounds/tone1s,3,,1,5)
 same => n,Log(NOTICE,SPTEST digits trace=${{PJSIP_HEADER(read,X-IVR-Trace)}} d=${{D}})
 same => n,GotoIf($["${{D}}" = "42"]?bye)
 same => n,Playback({INSTANCE}/sounds/tone3s)
 same => n(bye),Hangup()

; 601: echo everything back until the caller hangs up.
exten => 601,1,Answer()
 same => n,Echo()

; 602: ring (180) for 20 s without answering.
exten => 602,1,Ringing()
 same => n,Wait(20)
 same => n,Hangup()
"""


def _rms(frames: bytes) -> float:
    samples = array.array("h", frames)
    return math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0


def _tone(path: Path, seconds: float, freq: int = 440) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["sox", "-n", *SOX_FORMAT, str(path), "synth", str(seconds), "sine", str(freq), "vol", "0.5"],
        check=True,
    )
    return path


@dataclass
class AsteriskInstance:
    root: Path
    conf: str  # asterisk.conf path inside the chroot
    host_dir: Path  # instance folder seen from the host
    proc: subprocess.Popen[bytes]

    def rx(self, command: str, timeout: float = 10) -> str:
        if not (self.host_dir / "etc" / "asterisk.conf").exists():
            # Without its config file "asterisk -C" would fall back to the chroot's default
            # instance; never talk to (or stop) somebody else's Asterisk.
            return ""
        res = subprocess.run(
            ["chroot", str(self.root), "asterisk", "-C", self.conf, "-rx", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return res.stdout

    def uri(self, number: str) -> str:
        return sip_uri(number, "127.0.0.1", SIP_PORT)

    def wait_log(self, pattern: str, timeout: float = 5) -> re.Match[str]:
        log_file = self.host_dir / "log" / "softphone.log"
        deadline = time.monotonic() + timeout
        while True:
            text = log_file.read_text(errors="replace") if log_file.exists() else ""
            m = re.search(pattern, text)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in Asterisk log:\n{text[-2000:]}")
            time.sleep(0.05)


def _kill_stale(root: Path, conf: str, host_dir: Path) -> None:
    """Stop an instance left over by an earlier, interrupted run of this module."""
    pid_file = host_dir / "run" / "asterisk.pid"
    if not pid_file.exists() or not (host_dir / "etc" / "asterisk.conf").exists():
        return
    subprocess.run(
        ["chroot", str(root), "asterisk", "-C", conf, "-rx", "core stop now"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"asterisk" in cmdline and conf.encode() in cmdline:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def asterisk() -> Iterator[AsteriskInstance]:
    if not (ROOT / "usr/sbin/asterisk").exists():
        pytest.skip(f"no Asterisk chroot at {ROOT}")
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    host_dir = ROOT / INSTANCE.lstrip("/")
    conf = f"{INSTANCE}/etc/asterisk.conf"
    _kill_stale(ROOT, conf, host_dir)
    shutil.rmtree(host_dir, ignore_errors=True)
    for sub in ("etc", "run", "log", "spool", "db", "lib", "cache", "sounds"):
        (host_dir / sub).mkdir(parents=True)
    files = {
        "asterisk.conf": ASTERISK_CONF,
        "modules.conf": MODULES_CONF,
        "logger.conf": LOGGER_CONF,
        "rtp.conf": RTP_CONF,
        "pjsip.conf": PJSIP_CONF,
        "extensions.conf": EXTENSIONS_CONF,
    }
    for name, text in files.items():
        (host_dir / "etc" / name).write_text(text)
    _tone(host_dir / "sounds" / "tone1s.wav", 1.0)
    _tone(host_dir / "sounds" / "tone3s.wav", 3.0)
    out = (host_dir / "log" / "console.out").open("wb")
    proc = subprocess.Popen(
        ["chroot", str(ROOT), "asterisk", "-C", conf, "-f"],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    inst = AsteriskInstance(ROOT, conf, host_dir, proc)
    try:
        deadline = time.monotonic() + 30
        while "fully booted" not in inst.rx("core waitfullybooted", timeout=30) or (
            f"127.0.0.1:{SIP_PORT}" not in inst.rx("pjsip show transports")
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Asterisk did not start:\n" + (host_dir / "log/console.out").read_text())
            time.sleep(0.2)
        yield inst
    finally:
        inst.rx("core stop now")
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        out.close()


# --------------------------------------------------------------------------- sip_uri


def test_sip_uri_validates_number() -> None:
    assert sip_uri("600", "127.0.0.1", 5060) == "sip:600@127.0.0.1:5060"
    assert sip_uri("+4930*1#", "pbx.example", 5080) == "sip:+4930*1%23@pbx.example:5080"
    for bad in ("", "6OO", "600@evil", "1" * 33, "600\r\nX: y", "sip:600"):
        with pytest.raises(ValueError):
            sip_uri(bad, "127.0.0.1", 5060)
    with pytest.raises(ValueError):
        sip_uri("600", "127.0.0.1", 0)
    with pytest.raises(ValueError):
        sip_uri("600", "bad host", 5060)


# --------------------------------------------------------------------------- calls


async def test_call_dtmf_recording_and_remote_hangup(asterisk: AsteriskInstance, tmp_path: Path) -> None:
    trace = uuid.uuid4().hex
    rec = tmp_path / "far-end.wav"
    cfg = SoftphoneConfig(user="4155550100", display_name="Soft Phone", extra_headers={"X-IVR-Trace": trace})
    async with Softphone(cfg) as phone:
        call = await phone.dial(asterisk.uri("600"), record_to=rec)
        assert call.sip_call_id
        await call.wait_answered(timeout=10)
        assert call.state is CallState.CONFIRMED
        assert call.last_status_code == 200
        asterisk.wait_log(rf"SPTEST start trace={trace} cid=4155550100")
        await call.send_digits("42#", gap=0.2)
        started = time.monotonic()
        await call.wait_ended(timeout=10)
        # "42" makes the dialplan hang up at once; anything else would play 3 s first.
        assert time.monotonic() - started < 2.0
        assert call.ended_by_remote
        assert call.state is CallState.DISCONNECTED
        asterisk.wait_log(rf"SPTEST digits trace={trace} d=42\b")
        assert phone.calls == []

    with wave.open(str(rec), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        frames = w.readframes(w.getnframes())
        assert w.getnframes() / w.getframerate() > 0.5
    # The first 0.8 s hold the 1 s prompt tone (starts right after answer).
    assert _rms(frames[: 2 * 6400]) > 1000


async def test_play_into_echo_and_local_hangup(asterisk: AsteriskInstance, tmp_path: Path) -> None:
    tone = _tone(tmp_path / "tone.wav", 1.0, freq=700)
    rec = tmp_path / "echo.wav"
    async with Softphone() as phone:
        call = await phone.dial(asterisk.uri("601"), record_to=rec)
        await call.wait_answered()
        started = time.monotonic()
        await call.play(tone)
        assert 0.9 < time.monotonic() - started < 2.0
        await call.hangup()
        assert call.state is CallState.DISCONNECTED
        assert not call.ended_by_remote
        await call.hangup()  # idempotent
    with wave.open(str(rec), "rb") as w:
        frames = w.readframes(w.getnframes())
        assert w.getnframes() / w.getframerate() > 0.9
    assert _rms(frames) > 500  # our tone came back through Echo()


async def test_unknown_extension_fails(asterisk: AsteriskInstance) -> None:
    async with Softphone() as phone:
        call = await phone.dial(asterisk.uri("999"))
        with pytest.raises(CallFailed) as info:
            await call.wait_answered(timeout=10)
        assert info.value.status_code == 404
        await call.wait_ended(timeout=5)
        assert call.ended_by_remote
        assert call.last_status_code == 404


async def test_registered_caller_with_background_play(asterisk: AsteriskInstance, tmp_path: Path) -> None:
    tone = _tone(tmp_path / "tone.wav", 1.5, freq=500)
    rec = tmp_path / "echo.wav"
    cfg = SoftphoneConfig(
        user=REG_USER, username=REG_USER, password=REG_PASSWORD, registrar=f"sip:127.0.0.1:{SIP_PORT}"
    )
    async with Softphone(cfg) as phone:
        assert f"{REG_USER}/sip:{REG_USER}@127.0.0.1:{phone.local_port}" in asterisk.rx("pjsip show contacts")
        call = await phone.dial(asterisk.uri("601"), record_to=rec, play=tone)
        await call.wait_answered()
        await call.wait_media()
        await asyncio.sleep(1.0)
    # aclose() hung up and finalized the recording.
    assert call.state is CallState.DISCONNECTED
    assert not call.ended_by_remote
    with wave.open(str(rec), "rb") as w:
        frames = w.readframes(w.getnframes())
    assert _rms(frames) > 500


async def test_sequential_softphones_reuse_the_library(asterisk: AsteriskInstance) -> None:
    for _ in range(3):
        phone = Softphone()
        await phone.start()
        call = await phone.dial(asterisk.uri("601"))
        await call.wait_answered()
        await phone.aclose()
        await phone.aclose()  # safe twice
        assert call.state is CallState.DISCONNECTED


async def test_wrong_password_fails_registration(asterisk: AsteriskInstance) -> None:
    cfg = SoftphoneConfig(
        user=REG_USER, username=REG_USER, password="wrong", registrar=f"sip:127.0.0.1:{SIP_PORT}"
    )
    phone = Softphone(cfg)
    with pytest.raises(RegistrationFailed) as info:
        await phone.start()
    assert info.value.status_code in (401, 403)
    await phone.aclose()


async def test_timeout_then_cancel_ringing_call(asterisk: AsteriskInstance) -> None:
    async with Softphone() as phone:
        call = await phone.dial(asterisk.uri("602"))
        with pytest.raises(TimeoutError):
            await call.wait_answered(timeout=0.5)
        assert call.state is CallState.EARLY
        assert call.last_status_code == 180
        await call.hangup()  # CANCEL
        assert call.state is CallState.DISCONNECTED
        assert call.last_status_code == 487
        assert not call.ended_by_remote
        assert not call.answered
        with pytest.raises(CallFailed):
            await call.wait_answered()
