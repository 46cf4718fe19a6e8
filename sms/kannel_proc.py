"""Local Kannel instances for development, tests and benchmarks: bearerbox, smsbox and the fake SMSC.

Each instance (``dev`` for ``make run``, ``test`` and ``bench`` for the suites) has its own folder
``<var_dir>/kannel/<instance>/`` (rendered ``kannel.conf``, logs, the message store, pid files) and its own ports
(:data:`INSTANCES`), so they can run side by side. The fake SMSC is Kannel's ``fakesmsc`` in receive-only mode
(``-m 0``): it prints every SMS it gets to ``fakesmsc.log``, which :meth:`KannelInstance.received` reads back.

Kannel's own ways worth knowing: stopping bearerbox tells smsbox to exit, and ``fakesmsc`` exits when its
bearerbox goes (so :meth:`KannelInstance.start` brings back whatever is missing); a bearerbox that vanishes
without a word makes smsbox restart itself 10 s later as a new process of the same process group (so parts are
tracked and stopped by process group).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import signal
import string
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from bridge.config import Config, KannelConfig

log = logging.getLogger(__name__)

BEARERBOX = Path("/usr/sbin/bearerbox")
SMSBOX = Path("/usr/sbin/smsbox")
FAKESMSC = Path("/usr/lib/kannel/test/fakesmsc")
TEMPLATE = Path(__file__).resolve().parent / "kannel_conf" / "kannel.conf.in"
PARTS = ("bearerbox", "smsbox", "fakesmsc")

_SAFE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # what may go between quotes in kannel.conf and on a command line


@dataclass(frozen=True)
class Ports:
    """One instance's TCP ports (all on 127.0.0.1)."""

    admin: int
    smsbox: int
    sendsms: int
    smsc: int


INSTANCES: dict[str, Ports] = {
    "dev": Ports(admin=13000, smsbox=13001, sendsms=13013, smsc=10000),
    "test": Ports(admin=23000, smsbox=23001, sendsms=23013, smsc=20000),
    "bench": Ports(admin=33000, smsbox=33001, sendsms=33013, smsc=30000),
}


def instance_config(instance: str, base: KannelConfig | None = None) -> KannelConfig:
    """``base`` (default: the defaults) with the instance name and the ports of a known instance."""
    ports = INSTANCES[instance]
    return (base or KannelConfig()).model_copy(update={
        "instance": instance, "host": "127.0.0.1", "admin_port": ports.admin, "smsbox_port": ports.smsbox,
        "sendsms_port": ports.sendsms, "smsc_port": ports.smsc})


class KannelError(RuntimeError):
    """A Kannel instance could not be rendered, started or stopped."""


@dataclass(frozen=True)
class KannelStatus:
    """Which parts run (their process group id) and whether Kannel takes and routes SMS."""

    bearerbox: int | None
    smsbox: int | None
    fakesmsc: int | None
    sendsms: bool        # smsbox answers HTTP on the sendsms port
    smsc_online: bool    # bearerbox has the fake SMSC connected

    @property
    def running(self) -> bool:
        return all((self.bearerbox, self.smsbox, self.fakesmsc, self.sendsms, self.smsc_online))


class ReceivedSms(NamedTuple):
    """One SMS as the fake SMSC got it (concatenated parts joined)."""

    sender: str
    receiver: str
    text: str


class KannelInstance:
    """One local Kannel (bearerbox, smsbox, fakesmsc) with its own folder and ports."""

    def __init__(self, config: Config) -> None:
        self.kannel = config.sms.kannel
        self.dir = config.general.var_dir / "kannel" / self.kannel.instance
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # parts this object started (reaped on stop)

    # ------------------------------------------------------------------------------------------ paths
    @property
    def conf_file(self) -> Path:
        return self.dir / "kannel.conf"

    @property
    def fakesmsc_log(self) -> Path:
        return self.dir / "fakesmsc.log"

    def log_file(self, part: str) -> Path:
        """Kannel's own log of ``bearerbox`` or ``smsbox``; ``fakesmsc.log`` for the fake SMSC."""
        return self.fakesmsc_log if part == "fakesmsc" else self.dir / f"{part}.log"

    def _pidfile(self, part: str) -> Path:
        return self.dir / f"{part}.pid"

    @property
    def admin_password(self) -> str:
        """Derived from the sendsms password, so there is no second secret to keep."""
        return hmac.new(self.kannel.password.encode(), b"kannel-admin", hashlib.sha256).hexdigest()[:24]

    # ------------------------------------------------------------------------------------------ render
    def variables(self) -> dict[str, str]:
        k = self.kannel
        if not k.password:
            raise KannelError("sms.kannel.password is not set (run `ivr-bridge setup-secrets`)")
        for what, value in (("instance", k.instance), ("username", k.username), ("password", k.password)):
            if not _SAFE_RE.fullmatch(value):
                raise KannelError(f"sms.kannel.{what} may contain only letters, digits, '.', '-' and '_'")
        ports = [k.admin_port, k.smsbox_port, k.sendsms_port, k.smsc_port]
        if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
            raise KannelError(f"sms.kannel ports must be distinct and valid: {ports}")
        return {
            "DOLLAR": "$",
            "INSTANCE": k.instance,
            "DIR": str(self.dir),
            "ADMIN_PORT": str(k.admin_port),
            "ADMIN_PASSWORD": self.admin_password,
            "SMSBOX_PORT": str(k.smsbox_port),
            "SENDSMS_PORT": str(k.sendsms_port),
            "SMSC_PORT": str(k.smsc_port),
            "USERNAME": k.username,
            "PASSWORD": k.password,
            "MAX_MESSAGES": str(k.max_messages),
            "DLR_RETRIES": str(k.dlr_retries),
            "DLR_RETRY_DELAY": str(k.dlr_retry_delay),
            "LOG_LEVEL": "1",  # info: one line per SMS and per delivery report; 0 (debug) logs every byte
        }

    def render(self) -> Path:
        """Write ``kannel.conf`` from the template (mode 0600: it holds the passwords); returns its path."""
        if '"' in str(self.dir) or "\n" in str(self.dir):
            raise KannelError(f"unusable instance folder {self.dir}")
        try:
            text = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(self.variables())
        except (KeyError, ValueError) as exc:
            raise KannelError(f"{TEMPLATE}: bad placeholder {exc}") from exc
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o750)
        if not self.conf_file.exists() or self.conf_file.read_text(encoding="utf-8") != text:
            tmp = self.conf_file.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            tmp.replace(self.conf_file)
        return self.conf_file

    # ------------------------------------------------------------------------------------------ control
    def _command(self, part: str) -> list[str]:
        conf = str(self.conf_file)
        if part == "bearerbox":
            return [str(BEARERBOX), "-v", "2", conf]   # console: warnings and worse; the rest is in the log file
        if part == "smsbox":
            return [str(SMSBOX), "-v", "2", conf]
        if part == "fakesmsc":
            # -m 0: send nothing, only print what arrives ("Got message N: <from to type data>"). The message
            # argument is never sent but keeps fakesmsc out of its interactive (stdin) mode.
            return [str(FAKESMSC), "-H", "127.0.0.1", "-r", str(self.kannel.smsc_port), "-i", "0.1", "-m", "0",
                    "ivr-bridge fakesmsc text unused"]
        raise KannelError(f"unknown Kannel part {part!r} (one of {', '.join(PARTS)})")

    def _owns(self, pid: int, part: str) -> bool:
        """Whether live process ``pid`` is this instance's ``part`` (pids are reused)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        expected = self._command(part)
        return len(argv) > 1 and Path(os.fsdecode(argv[0])).name == Path(expected[0]).name \
            and [os.fsdecode(a) for a in argv[1:len(expected)]] == expected[1:]

    def pid(self, part: str) -> int | None:
        """The process group of ``part`` if any process of it is alive."""
        try:
            pgid = int(self._pidfile(part).read_text().strip())
        except (OSError, ValueError):
            return None
        members = _group_members(pgid)
        return pgid if any(self._owns(pid, part) for pid in members) else None

    def start(self, timeout: float = 20) -> None:
        """Start whatever part is not running and wait until sendsms answers and the fake SMSC is connected.

        A no-op when everything runs (the config is re-rendered; restart to apply a changed one).
        """
        for binary in (BEARERBOX, SMSBOX, FAKESMSC):
            if not binary.exists():
                raise KannelError(f"{binary} is missing (apt-get install kannel kannel-extras)")
        self.render()
        deadline = time.monotonic() + timeout
        k = self.kannel
        if self.pid("bearerbox") is None:
            # Its boxes cannot outlive it for long: clear them so they start fresh against the new bearerbox.
            for part in ("fakesmsc", "smsbox"):
                self.stop_part(part)
            self._spawn("bearerbox")
            self._wait(lambda: _listening(k.smsc_port) and _listening(k.smsbox_port), deadline, "bearerbox")
        if self.pid("fakesmsc") is None:
            self._spawn("fakesmsc")
        if self.pid("smsbox") is None:
            self._spawn("smsbox")
        self._wait(lambda: self._sendsms_answers() and self._smsc_online(), deadline, "sendsms and the fake SMSC")

    def start_part(self, part: str, timeout: float = 20) -> None:
        """Start one part if it is not running (``fakesmsc``: the SMSC comes back; bearerbox queues until then)."""
        if part not in PARTS:
            raise KannelError(f"unknown Kannel part {part!r}")
        if part != "bearerbox" and self.pid("bearerbox") is None:
            raise KannelError(f"{part} needs bearerbox: use start()")
        if self.pid(part) is not None:
            return
        self.render()
        self._spawn(part)
        deadline = time.monotonic() + timeout
        check = {"bearerbox": lambda: _listening(self.kannel.smsbox_port), "smsbox": self._sendsms_answers,
                 "fakesmsc": self._smsc_online}[part]
        self._wait(check, deadline, part)

    def _spawn(self, part: str) -> None:
        old = self._procs.pop(part, None)
        if old is not None:  # an earlier run of this part that ended by itself: reap it
            try:
                old.wait(timeout=5)
            except subprocess.TimeoutExpired:
                old.kill()
                old.wait()
        console = self.dir / ("fakesmsc.log" if part == "fakesmsc" else f"{part}.console.log")
        with open(console, "ab") as out:
            # A session of its own: the part and anything it forks (smsbox restarting itself) share one process
            # group, whose id is the pid file's content.
            proc = subprocess.Popen(self._command(part), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[part] = proc
        self._pidfile(part).write_text(f"{proc.pid}\n")

    def _wait(self, check: Callable[[], bool], deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            if check():
                return
            for part, proc in list(self._procs.items()):
                if proc.poll() is not None:
                    self._procs.pop(part)
                    raise KannelError(f"Kannel {part} ({self.kannel.instance}) exited with {proc.returncode}: "
                                      f"{_tail(self.dir / f'{part}.console.log')}{_tail(self.log_file(part))}")
            time.sleep(0.05)
        raise KannelError(f"Kannel instance {self.kannel.instance}: {what} not ready in time; see {self.dir}")

    def stop(self, timeout: float = 15) -> None:
        """Stop every part (fake SMSC, smsbox, then bearerbox, which saves its store)."""
        for part in ("fakesmsc", "smsbox", "bearerbox"):
            self.stop_part(part, timeout)

    def stop_part(self, part: str, timeout: float = 15) -> None:
        """Stop one part: SIGTERM to its process group, SIGKILL if it is still there after ``timeout``.

        Stopping ``bearerbox`` takes smsbox and the fake SMSC with it (Kannel's own behaviour; they are waited
        for here): sendsms is then refused until :meth:`start`.
        """
        if part not in PARTS:
            raise KannelError(f"unknown Kannel part {part!r}")
        pgid = self.pid(part)
        if pgid is not None:
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _group_members(pgid) and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.05)
            if _group_members(pgid):
                log.warning("Kannel %s (%s) did not stop in %.0f s: killed", part, self.kannel.instance, timeout)
                _signal_group(pgid, signal.SIGKILL)
        proc = self._procs.pop(part, None)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._pidfile(part).unlink(missing_ok=True)
        if part == "bearerbox":
            for follower in ("smsbox", "fakesmsc"):
                self.stop_part(follower, timeout)

    def _reap(self) -> None:
        for proc in self._procs.values():
            proc.poll()

    def status(self) -> KannelStatus:
        self._reap()
        return KannelStatus(bearerbox=self.pid("bearerbox"), smsbox=self.pid("smsbox"),
                            fakesmsc=self.pid("fakesmsc"), sendsms=self._sendsms_answers(),
                            smsc_online=self._smsc_online())

    # ------------------------------------------------------------------------------------------ probes
    def _sendsms_answers(self) -> bool:
        # Without credentials smsbox answers 403 "Authorization failed": up, and nothing is sent.
        url = f"http://127.0.0.1:{self.kannel.sendsms_port}/cgi-bin/sendsms"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError as exc:
            exc.close()
            return True
        except (OSError, ValueError):
            return False

    def admin_status(self) -> str:
        """bearerbox's ``status.txt`` ("" if it does not answer)."""
        url = f"http://127.0.0.1:{self.kannel.admin_port}/status.txt?password={self.admin_password}"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bytes(resp.read()).decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def _smsc_online(self) -> bool:
        return f"FAKE:{self.kannel.smsc_port} (online" in self.admin_status()

    # ------------------------------------------------------------------------------------------ the fake SMSC
    def received(self) -> list[ReceivedSms]:
        """Every SMS the fake SMSC got (all runs of this instance, oldest first)."""
        try:
            text = self.fakesmsc_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        return parse_fakesmsc_log(text)


# ---------------------------------------------------------------------------------------------- fakesmsc.log
_GOT_RE = re.compile(r"Got message \d+: <(.*)>\s*$")


def _url_bytes(data: str) -> bytes:
    # Kannel's URL encoding writes a space as '+' (and a '+' as %2B).
    return unquote_to_bytes(data.replace("+", " "))


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _concat(udh: bytes) -> tuple[int, int, int] | None:
    """(reference, total, sequence) from a concatenation element of a UDH, if there is one."""
    pos, end = 1, min(len(udh), 1 + (udh[0] if udh else 0))
    while pos + 2 <= end:
        iei, length = udh[pos], udh[pos + 1]
        value = udh[pos + 2:pos + 2 + length]
        if iei == 0x00 and length == 3 and len(value) == 3:
            return value[0], value[1], value[2]
        if iei == 0x08 and length == 4 and len(value) == 4:
            return value[0] << 8 | value[1], value[2], value[3]
        pos += 2 + length
    return None


def parse_fakesmsc_log(text: str, udh_coding: str = "utf-16-be") -> list[ReceivedSms]:
    """The SMS in fakesmsc's output, parts of concatenated SMS joined.

    fakesmsc prints ``from to text <raw>``, ``from to data <url-encoded 8-bit>``, ``from to ucs-2 <url-encoded
    UCS-2>`` or, for a part of a long SMS, ``from to udh <url-encoded UDH> data <url-encoded part>``, which does
    not say how the part is coded: ``udh_coding`` (ivr-bridge always sends UCS-2).
    """
    out: list[ReceivedSms | None] = []
    pending: dict[tuple[str, str, int, int], tuple[int, dict[int, bytes]]] = {}
    for line in text.splitlines():
        match = _GOT_RE.search(line)
        if not match:
            continue
        fields = match.group(1).split(" ", 3)
        if len(fields) < 4:
            continue
        sender, receiver, kind, rest = fields
        if kind == "text":
            out.append(ReceivedSms(sender, receiver, rest))
        elif kind == "data":
            out.append(ReceivedSms(sender, receiver, _text(_url_bytes(rest))))
        elif kind in ("ucs-2", "ucs2"):
            out.append(ReceivedSms(sender, receiver, _url_bytes(rest).decode("utf-16-be", "replace")))
        elif kind == "udh":
            udh_part, _, data_part = rest.partition(" data ")
            udh, data = _url_bytes(udh_part), _url_bytes(data_part)
            concat = _concat(udh)
            if concat is None:
                out.append(ReceivedSms(sender, receiver, data.decode(udh_coding, "replace")))
                continue
            ref, total, seq = concat
            key = (sender, receiver, ref, total)
            if key not in pending:
                pending[key] = (len(out), {})
                out.append(None)  # the joined SMS takes its first part's place
            slot, parts = pending[key]
            parts[seq] = data
            if len(parts) == total:
                del pending[key]
                joined = b"".join(parts[i] for i in sorted(parts))
                out[slot] = ReceivedSms(sender, receiver, joined.decode(udh_coding, "replace"))
    return [sms for sms in out if sms is not None]


# ---------------------------------------------------------------------------------------------- processes
def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _listening(port: int) -> bool:
    """Whether something listens on TCP ``port``, read from /proc/net: connecting to find out is no good here,
    as bearerbox takes any connection to the fake SMSC port for the SMSC and sends it the queued messages."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh, None)
                for row in fh:
                    fields = row.split()
                    # local_address is HEXIP:HEXPORT; state 0A is LISTEN
                    if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n  " + "\n  ".join(text.splitlines()[-lines:])
