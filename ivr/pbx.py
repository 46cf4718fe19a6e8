"""The local Asterisk: render ``asterisk_conf/`` into an instance folder, start, reload and stop it.

Asterisk runs from a Debian sid chroot (see PLATFORM.md) or natively (``asterisk.root: null``). Each instance
(``dev`` for ``make run``, ``test`` and ``bench`` for the suites) has its own folder, ports and prompts, so they
can run side by side.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import string
import subprocess
import time
from pathlib import Path

from bridge.config import PROJECT_DIR, AsteriskConfig
from ivr import moh, safe

log = logging.getLogger(__name__)

CONF_DIR = PROJECT_DIR / "asterisk_conf"
AGENT_REALM = "ivr-bridge"


class PbxError(RuntimeError):
    """Asterisk could not be rendered, started or stopped."""


class AsteriskInstance:
    """One Asterisk process with its own config folder and ports."""

    def __init__(self, config: AsteriskConfig, hotline_numbers: list[str]) -> None:
        self.config = config
        self.hotline_numbers = [safe.digits(n.lstrip("+"), "hotline number") for n in hotline_numbers]
        self.host_dir = config.host_path(config.instance_dir)
        self.process: subprocess.Popen[bytes] | None = None  # the Asterisk this object started, if any

    # ------------------------------------------------------------------------------------------ paths
    @property
    def conf_path(self) -> str:
        return f"{self.config.instance_dir}/etc/asterisk.conf"

    @property
    def log_file(self) -> Path:
        return self.host_dir / "log" / "messages.log"

    def _cmd(self, *args: str) -> list[str]:
        base = ["asterisk", "-C", self.conf_path, *args]
        if self.config.root:
            return ["chroot", str(self.config.root), *base]
        return base

    # ------------------------------------------------------------------------------------------ render
    def variables(self) -> dict[str, str]:
        cfg = self.config
        if not cfg.ami_secret or not cfg.softphone_password or not cfg.agent_phone_secret:
            raise PbxError("AMI secret, softphone password or agent phone secret not set "
                           "(run `ivr-bridge setup-secrets`)")
        for value in (cfg.ami_secret, cfg.softphone_password):
            if not safe.NAME_RE.fullmatch(value.replace("-", "").replace("_", "") or "x"):
                raise PbxError("secrets may contain only letters, digits, '-' and '_'")
        safe.name(cfg.ami_user, "AMI user")
        # First thing, keep only digits and '+' of the caller's number: Asterisk URI-decodes the SIP From user
        # into CALLERID(num) and writes it unescaped into AMI events, so CR/LF in it could forge AMI events.
        extensions = "\n".join(
            f"exten => {n},1,Set(CALLERID(num)=${{FILTER(0-9+,${{CALLERID(num)}})}})\n"
            f" same => n,Goto(ivr-entry,{n},1)" for n in self.hotline_numbers)
        return {
            "AGENT_PHONES": self._agent_phones(),
            "DOLLAR": "$",
            "INSTANCE_DIR": cfg.instance_dir,
            "AMI_PORT": str(cfg.ami_port),
            "AMI_USER": cfg.ami_user,
            "AMI_SECRET": cfg.ami_secret,
            "SIP_BIND": cfg.sip_bind,
            "SIP_PORT": str(cfg.sip_port),
            "MEDIA_ADDRESS": cfg.media_address,
            "RTP_START": str(cfg.rtp_start),
            "RTP_END": str(cfg.rtp_end),
            "TRUNK_MATCH": cfg.trunk_match,
            "SOFTPHONE_PASSWORD": cfg.softphone_password,
            "PROMPT_DIR": cfg.prompt_dir,
            "MOH_DIR": f"{cfg.instance_dir}/moh",
            "HEARTBEAT_MAX": str(cfg.heartbeat_max),
            "HOTLINE_EXTENSIONS": extensions,
        }

    def _agent_phones(self) -> str:
        """One PJSIP endpoint per agent phone, md5 digest credentials (no password in the file)."""
        cfg = self.config
        blocks = []
        for phone in cfg.agent_phones:
            safe.name(phone.replace(".", "-"), "agent phone")
            ha1 = hashlib.md5(f"{phone}:{AGENT_REALM}:{cfg.agent_phone_password(phone)}".encode(),
                              usedforsecurity=False).hexdigest()
            blocks.append(f"[{phone}](agent-phone)\nauth = {phone}-auth\naors = {phone}\n\n"
                          f"[{phone}-auth]\ntype = auth\nauth_type = md5\nrealm = {AGENT_REALM}\n"
                          f"username = {phone}\nmd5_cred = {ha1}\n\n"
                          f"[{phone}](agent-phone-aor)\n")
        return "\n".join(blocks)

    def render(self) -> None:
        """Write the instance's config from ``asterisk_conf/`` templates (only files that changed)."""
        variables = self.variables()
        etc = self.host_dir / "etc"
        for sub in ("etc", "log", "run", "spool", "db", "cache", "prompts"):
            (self.host_dir / sub).mkdir(parents=True, exist_ok=True)
        moh.install(self.host_dir / "moh")
        for template in sorted(CONF_DIR.glob("*.conf")):
            try:
                text = string.Template(template.read_text(encoding="utf-8")).substitute(variables)
            except (KeyError, ValueError) as exc:
                raise PbxError(f"{template}: bad placeholder {exc}") from exc
            target = etc / template.name
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                tmp = target.with_suffix(".tmp")
                tmp.write_text(text, encoding="utf-8")
                os.chmod(tmp, 0o640)
                tmp.replace(target)

    # ------------------------------------------------------------------------------------------ control
    def running(self) -> bool:
        return self.rx("core show uptime", check=False, timeout=5) is not None

    def rx(self, command: str, *, check: bool = True, timeout: float = 15) -> str | None:
        """Run a CLI command on the running instance (``asterisk -rx``)."""
        safe.check_text(command, "CLI command")
        if not (self.host_dir / "etc" / "asterisk.conf").exists():
            # `asterisk -C <missing>` silently talks to the chroot's default instance: never do that.
            if check:
                raise PbxError(f"instance {self.config.instance} is not rendered")
            return None
        try:
            out = subprocess.run(self._cmd("-rx", command), capture_output=True, text=True, timeout=timeout)
        except (subprocess.TimeoutExpired, OSError) as exc:
            if check:
                raise PbxError(f"asterisk -rx {command!r}: {exc}") from exc
            return None
        if out.returncode != 0 or "Unable to connect" in out.stdout + out.stderr:
            if check:
                raise PbxError(f"asterisk -rx {command!r} failed: {out.stderr.strip() or out.stdout.strip()}")
            return None
        return out.stdout

    def start(self, timeout: float = 30) -> None:
        """Start Asterisk (or reload it if it is already running) and wait until it is fully booted."""
        self.render()
        if self.running():
            self.rx("core reload")
            return
        self._clear_stale()
        log_path = self.host_dir / "log" / "console.log"
        with open(log_path, "ab") as out:
            # Kept so stop() can reap it (an unreaped child is a zombie and a ResourceWarning at exit).
            self.process = subprocess.Popen(self._cmd("-f"), stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.rx("core waitfullybooted", check=False, timeout=10)
            if status is not None:
                self._wait_port(self.config.ami_port, deadline)
                return
            time.sleep(0.2)
        raise PbxError(f"Asterisk instance {self.config.instance} did not boot in {timeout:.0f} s; "
                       f"see {log_path}")

    def _wait_port(self, port: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((self.config.host, port)) == 0:
                    return
            time.sleep(0.1)
        raise PbxError(f"AMI port {port} did not open")

    def _pid(self) -> int | None:
        pidfile = self.host_dir / "run" / "asterisk.pid"
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _clear_stale(self) -> None:
        pid = self._pid()
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        for leftover in (self.host_dir / "run").glob("*"):
            leftover.unlink(missing_ok=True)

    def stop(self, timeout: float = 15) -> None:
        """Stop now (calls are hung up); kill if it does not go."""
        pid = self._pid()
        self.rx("core stop now", check=False, timeout=timeout)
        deadline = time.monotonic() + timeout
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:  # reap the child we started
            try:
                self.process.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
