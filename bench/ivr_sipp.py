"""Benchmark of the IVR core: SIPp callers with RFC 2833 DTMF through the same two-level menu, run two ways.

    .venv/bin/python bench/ivr_sipp.py [--calls 200] [--quick] [--silent-caller] [--profile] [--json F] [--keep]

(a) ivr-bridge over AsyncAGI (flow ``bench/flows/bench.yaml``, number 900) and (b) the same menu in pure dialplan
(Background/WaitExten, number 901, written into the bench instance's ``extensions_local.conf``) as the baseline,
both on a private Asterisk instance ``bench`` (SIP 35060, AMI 35038, RTP 30000-31999), both playing the same wav
files. ``ivr-bridge run`` runs as a subprocess with a private Redis and a temporary SQLite database.
Phases: baseline at calls/2 concurrent, ivr at calls/2 (latency), baseline at calls, ivr at calls (failures, CPU);
each phase places 2x its concurrency in calls (``--quick``: 5 and 10 concurrent, 10 calls a phase).

The caller (``bench/sipp/ivr_menu_uac_audio.xml``) sends RTP as a phone does: PCMU every 20 ms with the digits as
RFC 2833 events in the middle of each menu prompt (one pcap built by ``bench/rtp_pcap.py`` from SIPp's stock
DTMF pcaps). ``--silent-caller`` uses ``ivr_menu_uac.xml`` instead: only the stock DTMF pcaps, no audio.

Measured per phase, all on this machine over loopback:
  * failed calls: calls SIPp counted as failed or that never reached the goodbye prompt (AMI path check);
  * CPU seconds per call: utime+stime from /proc/<pid>/stat of Asterisk (and of the ``ivr-bridge run``
    subprocess for the ivr phases), before and after the phase;
  * DTMF-to-next-prompt latency from Asterisk's own event timestamps (``timestampevents``): ``DTMFEnd`` to the
    ``AGIExecStart`` of the next STREAM FILE (ivr) or the ``Newexten`` of the next Background/Playback (baseline);
  * AMI Ping round trip: bursts of back-to-back Pings; the Asterisk-side round trip is the difference of the
    ``Timestamp`` headers of consecutive Ping responses (Asterisk -> client -> Asterisk, the same loop a DTMF
    event and the next AGI command make), the client-side round trip is send-to-response on the client.

Exit status: 0 when every call of every phase completed, 1 when any call failed, 2 with ``--strict`` when a
target was missed, 3 when the bench could not run. Needs root (Asterisk's chroot, SIPp's pcap play).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import datetime as dt
import fcntl
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from panoramisk.message import Message  # noqa: E402

from bridge.config import AsteriskConfig, TtsConfig  # noqa: E402
from ivr.ami import AmiClient, AmiError, AmiSettings  # noqa: E402
from ivr.flow import count_errors, load_flows  # noqa: E402
from ivr.pbx import AsteriskInstance  # noqa: E402
from ivr.prompts import PromptLibrary  # noqa: E402

sys.path.insert(0, str(BENCH_DIR))
import rtp_pcap  # noqa: E402
from benchlib import BenchError, cpu_model, cpu_seconds, log, stat_cpu_seconds, wait_tcp  # noqa: E402

FLOW_DIR = BENCH_DIR / "flows"
SCENARIO_AUDIO = BENCH_DIR / "sipp" / "ivr_menu_uac_audio.xml"    # caller RTP all through the call + DTMF
SCENARIO_SILENT = BENCH_DIR / "sipp" / "ivr_menu_uac.xml"          # DTMF packets only (--silent-caller)
CALLER_PCAP = "caller_1_2.pcap"   # what ivr_menu_uac_audio.xml plays, written into SIPp's working folder
DIGITS = [("1", 2.5), ("2", 5.16)]  # the same moments as the pauses of ivr_menu_uac.xml
IVR_NUMBER, BASELINE_NUMBER = "900", "901"
INSTANCE, SIP_PORT, AMI_PORT, RTP_START, RTP_END = "bench", 35060, 35038, 30000, 31999
OTHER_INSTANCE_PORTS = {5060: "dev", 5038: "dev", 15060: "test", 15038: "test", 25060: "softphone-test"}
MONITOR_USER = "bench-monitor"
BUS_CHANNEL = "ivr-bridge:events"
# Seconds of one call as the scenario runs it: 2.5 s + DTMF + 2.5 s + DTMF + goodbye (~1.3 s) + timewait.
CALL_SECONDS = 7.0

TARGET_CPU_RATIO = 1.5
TARGET_LAT_RTT_FACTOR, TARGET_LAT_EXTRA_MS = 3.0, 20.0



# ------------------------------------------------------------------------------------------------- helpers

def thread_cpu_seconds(pid: int | None, tid: int | None) -> float:
    """CPU seconds of one thread of a process."""
    return stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat") if pid and tid else 0.0


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def free_port(kind: int = socket.SOCK_DGRAM, avoid: tuple[int, int] = (RTP_START, RTP_END)) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not avoid[0] <= port <= avoid[1] and port not in OTHER_INSTANCE_PORTS:
            return port
    raise BenchError("no free port")


def port_in_use(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False



def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop one process we started, by its pid (SIGTERM, then SIGKILL)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


# ------------------------------------------------------------------------------------------------- AMI monitor
@dataclasses.dataclass
class ChannelTrace:
    number: str = ""
    created: float = 0.0
    ended: float | None = None
    dtmf: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    prompts: list[tuple[float, str]] = dataclasses.field(default_factory=list)   # (timestamp, sound path)
    agi_results: list[float] = dataclasses.field(default_factory=list)           # AsyncAGIExec timestamps
    agi_commands: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # AGIExecStart: verb
    agi_start: float | None = None                                               # AsyncAGIStart


class Monitor:
    """The read-only bench AMI user: collects timestamped call events and measures Ping round trips."""

    def __init__(self, secret: str) -> None:
        self.client = AmiClient(AmiSettings(host="127.0.0.1", port=AMI_PORT, username=MONITOR_USER, secret=secret,
                                            timeout=10, keepalive_interval=30, heartbeat_variable=None))
        self.client.add_event_listener(self._on_event)
        self.channels: dict[str, ChannelTrace] = {}
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.events = 0

    async def start(self) -> None:
        await self.client.start()
        await self.client.wait_connected(30)

    async def aclose(self) -> None:
        await self.client.aclose()

    def reset(self) -> None:
        self.channels = {}
        self.live = defaultdict(int)
        self.peak = defaultdict(int)

    def _on_event(self, msg: Message) -> None:
        self.events += 1
        event = msg.get("Event")
        channel = str(msg.get("Channel", ""))
        try:
            ts = float(msg.get("Timestamp", "0"))
        except ValueError:
            ts = 0.0
        if event == "Newchannel":
            number = str(msg.get("Exten", ""))
            self.channels[channel] = ChannelTrace(number=number, created=ts)
            self.live[number] += 1
            self.peak[number] = max(self.peak[number], self.live[number])
            return
        trace = self.channels.get(channel)
        if trace is None:
            return
        if event == "DTMFEnd" and msg.get("Direction") == "Received":
            trace.dtmf.append((ts, str(msg.get("Digit", ""))))
        elif event == "AsyncAGIStart":
            trace.agi_start = ts
        elif event == "AGIExecStart":
            command = str(msg.get("Command", ""))
            trace.agi_commands.append((ts, command.split('"')[0].strip()))
            if command.upper().startswith("STREAM FILE"):
                trace.prompts.append((ts, command.split('"')[1] if '"' in command else command))
        elif event == "AsyncAGIExec":
            trace.agi_results.append(ts)
        elif event == "Newexten" and str(msg.get("Application", "")).lower() in ("background", "playback"):
            trace.prompts.append((ts, str(msg.get("AppData", "")).split(",")[0]))
        elif event == "Hangup" and trace.ended is None:
            trace.ended = ts
            self.live[trace.number] -= 1

    def open_calls(self, number: str) -> int:
        return self.live.get(number, 0)

    async def ping_burst(self, count: int = 4) -> list[tuple[float, float, float]]:
        """Back-to-back Pings: (client send, client receive, Asterisk Timestamp) per Ping."""
        out = []
        for _ in range(count):
            sent = time.time()
            response = await self.client.action("Ping")
            received = time.time()
            out.append((sent, received, float(response.get("Timestamp", "0"))))
        return out


@dataclasses.dataclass
class PingStats:
    server_rtt_ms: list[float] = dataclasses.field(default_factory=list)
    client_rtt_ms: list[float] = dataclasses.field(default_factory=list)
    one_way_ms: list[float] = dataclasses.field(default_factory=list)   # client send -> Asterisk Timestamp

    def add(self, burst: list[tuple[float, float, float]]) -> None:
        for i, (sent, received, ts) in enumerate(burst):
            self.client_rtt_ms.append((received - sent) * 1000)
            self.one_way_ms.append((ts - sent) * 1000)
            if i:
                self.server_rtt_ms.append((ts - burst[i - 1][2]) * 1000)


async def ping_loop(monitor: Monitor, stats: PingStats, interval: float = 0.25) -> None:
    while True:
        with contextlib.suppress(AmiError):
            stats.add(await monitor.ping_burst())
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------------------------- the bench
@dataclasses.dataclass
class PhaseResult:
    name: str
    mode: str            # "ivr" or "baseline"
    number: str
    concurrency: int
    calls: int
    rate: float
    wall_s: float = 0.0
    sipp_exit: int | None = None
    sipp_successful: int | None = None
    sipp_failed: int | None = None
    sipp_peak: int | None = None
    channels: int = 0
    completed: int = 0
    path_failed: int = 0
    peak_concurrent: int = 0
    asterisk_cpu_s: float = 0.0
    bridge_cpu_s: float = 0.0
    bridge_main_cpu_s: float = 0.0   # the event loop thread (the rest: SQLite worker threads, TTS, ...)
    sipp_cpu_s: float = 0.0          # SIPp (and py-spy with --profile): the bench's waited-for children
    bench_cpu_s: float = 0.0         # this script (AMI monitor, Redis follower)
    machine_busy: float = 0.0        # all CPUs, all processes (also other work on this machine), 0..1
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    result_to_prompt_ms: list[float] = dataclasses.field(default_factory=list)
    ping: PingStats = dataclasses.field(default_factory=PingStats)
    node_to_prompt_ms: list[float] = dataclasses.field(default_factory=list)
    first_prompt_ms: list[float] = dataclasses.field(default_factory=list)   # channel created -> first prompt

    @property
    def failed(self) -> int:
        """Calls SIPp counted as failed or that never reached the goodbye prompt (the larger of the two)."""
        return max(self.sipp_failed or 0, self.calls - self.completed)

    @property
    def cpu_s(self) -> float:
        return self.asterisk_cpu_s + (self.bridge_cpu_s if self.mode == "ivr" else 0.0)

    @property
    def cpu_per_call_ms(self) -> float | None:
        return self.cpu_s / self.calls * 1000 if self.calls else None

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if k not in ("latencies_ms", "result_to_prompt_ms", "ping", "node_to_prompt_ms", "first_prompt_ms")}
        out.update(
            failed=self.failed, cpu_s=round(self.cpu_s, 3), cpu_per_call_ms=self.cpu_per_call_ms,
            latency_ms={"n": len(self.latencies_ms), "p50": percentile(self.latencies_ms, 50),
                        "p95": percentile(self.latencies_ms, 95), "max": percentile(self.latencies_ms, 100)},
            agi_result_to_next_prompt_ms={"p50": percentile(self.result_to_prompt_ms, 50),
                                          "p95": percentile(self.result_to_prompt_ms, 95)},
            ping_server_rtt_ms={"n": len(self.ping.server_rtt_ms), "p50": percentile(self.ping.server_rtt_ms, 50),
                                "p95": percentile(self.ping.server_rtt_ms, 95)},
            ping_client_rtt_ms={"p50": percentile(self.ping.client_rtt_ms, 50),
                                "p95": percentile(self.ping.client_rtt_ms, 95)},
            ping_one_way_ms={"p50": percentile(self.ping.one_way_ms, 50)},
            node_to_prompt_ms={"n": len(self.node_to_prompt_ms), "p50": percentile(self.node_to_prompt_ms, 50),
                               "p95": percentile(self.node_to_prompt_ms, 95)},
            first_prompt_ms={"p50": percentile(self.first_prompt_ms, 50), "p95": percentile(self.first_prompt_ms, 95),
                             "max": percentile(self.first_prompt_ms, 100)},
        )
        return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="ivr-bench-"))
        self.ami_secret = secrets.token_hex(16)
        self.monitor_secret = secrets.token_hex(16)
        self.asterisk = AsteriskConfig(instance=INSTANCE, ami_port=AMI_PORT, sip_port=SIP_PORT,
                                       rtp_start=RTP_START, rtp_end=RTP_END, ami_secret=self.ami_secret,
                                       softphone_password=secrets.token_hex(16),
                                       agent_phone_secret=secrets.token_hex(16))
        self.pbx = AsteriskInstance(self.asterisk, [IVR_NUMBER])
        self.redis: subprocess.Popen[bytes] | None = None
        self.bridge: subprocess.Popen[bytes] | None = None
        self.redis_port = 0
        self.prompts: dict[str, str] = {}
        self.monitor: Monitor | None = None
        self.bus_events: list[tuple[float, dict[str, Any]]] = []
        self.db_path = self.tmp / "ivr-bridge.db"
        self.bridge_log = self.tmp / "ivr-bridge.log"
        self.results: list[PhaseResult] = []
        self._lock: Any = None
        self.py_spy = shutil.which("py-spy") or args.py_spy
        self.profiles: dict[str, Path] = {}

    # ------------------------------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        # One bench at a time on this machine: the instance, its ports and its folder are shared.
        self.pbx.host_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.pbx.host_dir / "bench.lock", "w")  # noqa: SIM115 - held until teardown
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock.close()
            raise BenchError(f"another bench run is using instance '{INSTANCE}' "
                             f"({self.pbx.host_dir / 'bench.lock'})") from exc
        self._lock = lock
        for port, kind in ((SIP_PORT, socket.SOCK_DGRAM), (AMI_PORT, socket.SOCK_STREAM)):
            if port_in_use(port, kind):
                if self.pbx.running():
                    log("a bench Asterisk from an earlier run is still up: stopping it")
                    self.pbx.stop()
                if port_in_use(port, kind):
                    raise BenchError(f"port {port} is in use by something else")
        if shutil.which("sipp") is None:
            raise BenchError("sipp is not installed (apt-get install sip-tester)")
        flows, problems = load_flows([FLOW_DIR])
        if count_errors(problems) or "bench" not in flows:
            raise BenchError("bench flow has errors: " + "; ".join(map(str, problems)))
        flow = flows["bench"]
        log("rendering prompts for the bench instance (cached after the first run)")
        library = PromptLibrary(TtsConfig(), self.asterisk)
        try:
            library.build(flows.values(), progress=False)
        finally:
            library.close()
        for node_id in ("menu1", "menu2", "done"):
            prompt = flow.nodes[node_id].prompt
            self.prompts[node_id] = library.path(prompt.text["en"], "en")
        self.pbx.render()
        etc = self.pbx.host_dir / "etc"
        self._write_conf(etc / "extensions_local.conf", self._baseline_dialplan())
        self._write_conf(etc / "manager_local.conf", self._monitor_user())
        log(f"starting Asterisk instance '{INSTANCE}' (SIP 127.0.0.1:{SIP_PORT}, AMI {AMI_PORT})")
        self.pbx.start()
        out = self.pbx.rx(f"dialplan show {BASELINE_NUMBER}@from-hotline") or ""
        if "bench-baseline" not in out:
            raise BenchError(f"baseline number {BASELINE_NUMBER} is not routed in [from-hotline]:\n{out}")

    @staticmethod
    def _write_conf(path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        os.chmod(path, 0o640)

    def _baseline_dialplan(self) -> str:
        p = self.prompts
        return f"""; Written by bench/ivr_sipp.py into the bench instance only: the bench menu in pure dialplan.
; {BASELINE_NUMBER} is added to [from-hotline] itself (an exact extension wins over the context's catch-all
; pattern, which an included context would not).
[from-hotline]
exten => {BASELINE_NUMBER},1,Goto(bench-baseline,s,1)

[bench-baseline]
exten => s,1,NoOp(bench baseline: the bench menu in dialplan)
 same => n,Answer()
 same => n,Goto(bench-menu1,s,1)

[bench-menu1]
exten => s,1,Background({p['menu1']})
 same => n,WaitExten(10)
exten => 1,1,Goto(bench-menu2,s,1)
exten => 0,1,Hangup()
exten => i,1,Hangup()
exten => t,1,Hangup()

[bench-menu2]
exten => s,1,Background({p['menu2']})
 same => n,WaitExten(10)
exten => 2,1,Playback({p['done']})
 same => n,Hangup()
exten => 0,1,Hangup()
exten => i,1,Hangup()
exten => t,1,Hangup()
"""

    def _monitor_user(self) -> str:
        filters = "".join(f"eventfilter(action(include),name({name})) =\n" for name in
                          ("FullyBooted", "Newchannel", "Hangup", "DTMFEnd", "AGIExecStart", "AsyncAGIStart",
                           "AsyncAGIExec", "Newexten"))
        return f"""; Written by bench/ivr_sipp.py into the bench instance only: a read-only monitoring user.
[{MONITOR_USER}]
secret = {self.monitor_secret}
deny = 0.0.0.0/0.0.0.0
permit = 127.0.0.1/255.255.255.255
read = dtmf,agi,dialplan,call,system
writetimeout = 1000
{filters}"""

    def start_redis(self) -> None:
        self.redis_port = free_port(socket.SOCK_STREAM)
        redis_dir = self.tmp / "redis"
        redis_dir.mkdir()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(redis_dir), "--logfile", str(redis_dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_tcp(self.redis_port, 10)
        log(f"private redis-server on 127.0.0.1:{self.redis_port}")

    def start_bridge(self) -> None:
        config = {
            "general": {"var_dir": str(self.tmp / "var"), "log_level": "INFO"},
            "database": {"url": f"sqlite+aiosqlite:///{self.db_path}"},
            "redis": {"url": f"redis://127.0.0.1:{self.redis_port}/0", "events_channel": BUS_CHANNEL},
            "asterisk": {"instance": INSTANCE, "ami_port": AMI_PORT, "sip_port": SIP_PORT,
                         "rtp_start": RTP_START, "rtp_end": RTP_END, "ami_secret": self.ami_secret,
                         "softphone_password": self.asterisk.softphone_password,
                         "root": str(self.asterisk.root) if self.asterisk.root else None},
            "flows": {"paths": [str(FLOW_DIR)], "default_flow": "bench", "reload_interval": 3600},
            "links": {"secret": secrets.token_urlsafe(24)},
            "web": {"port": 0},
            "outbox": {"enabled": False},
        }
        path = self.tmp / "ivr-bridge.yaml"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if not k.startswith("IVR_BRIDGE")}
        exe = [str(Path(sys.executable).parent / "ivr-bridge")]
        if self.args.profile and not self.py_spy:
            exe = [sys.executable, "-m", "cProfile", "-o", str(self.tmp / "ivr-bridge.prof"), exe[0]]
        log("starting `ivr-bridge run` (private SQLite DB and Redis)")
        with open(self.bridge_log, "ab") as out:
            self.bridge = subprocess.Popen([*exe, "run", "--config", str(path)], cwd=self.tmp, env=env,
                                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.bridge.poll() is not None:
                raise BenchError(f"ivr-bridge exited ({self.bridge.returncode}): "
                                 f"{self.bridge_log.read_text(errors='replace')[-2000:]}")
            if "AMI logged in" in self.bridge_log.read_text(errors="replace"):
                time.sleep(0.5)  # first heartbeat is written right after login
                return
            time.sleep(0.1)
        raise BenchError("ivr-bridge did not log in to AMI in 90 s")

    async def start_observers(self) -> None:
        self.monitor = Monitor(self.monitor_secret)
        await self.monitor.start()
        self._bus_task = asyncio.create_task(self._follow_bus())

    async def _follow_bus(self) -> None:
        """ivr-bridge's event stream on Redis pub/sub, each event stamped with its arrival time."""
        import redis.asyncio as aioredis

        client = aioredis.from_url(f"redis://127.0.0.1:{self.redis_port}/0")
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(BUS_CHANNEL)
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    with contextlib.suppress(ValueError):
                        self.bus_events.append((time.monotonic(), json.loads(message["data"])))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()

    # ------------------------------------------------------------------------------------------ phases
    async def run_phase(self, name: str, mode: str, concurrency: int, calls: int) -> PhaseResult:
        assert self.monitor is not None
        self.check_bridge()
        number = IVR_NUMBER if mode == "ivr" else BASELINE_NUMBER
        # Calls last about CALL_SECONDS: this rate reaches the concurrency limit (SIPp -l) within one call length.
        rate = max(1.0, math.ceil(concurrency * 1.25 / CALL_SECONDS))
        if self.args.quick:  # a smoke test: all calls at once
            rate = float(concurrency)
        result = PhaseResult(name, mode, number, concurrency, calls, rate)
        phase_dir = self.tmp / name
        phase_dir.mkdir()
        self.monitor.reset()
        self.bus_events.clear()
        before = self._snapshot()
        pinger = asyncio.create_task(ping_loop(self.monitor, result.ping))
        spy = self._start_py_spy(name, phase_dir) if mode == "ivr" else None
        budget = calls / rate + CALL_SECONDS + 60
        cmd = self._sipp_command(phase_dir, number, concurrency, calls, rate, budget)
        log(f"{name}: {calls} calls to {number}, up to {concurrency} at once, {rate:g} calls/s")
        out = _open_for_writing(phase_dir / "sipp.out")
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, cwd=phase_dir, stdin=subprocess.DEVNULL,
                                                        stdout=out, stderr=subprocess.STDOUT)
            try:
                result.sipp_exit = await asyncio.wait_for(proc.wait(), budget + 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                result.sipp_exit = -9
        finally:
            out.close()
        # Let the last hang-ups reach Asterisk and ivr-bridge finish its writes before reading CPU.
        deadline = time.monotonic() + 15
        while self.monitor.open_calls(number) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        self._fill_cpu(result, before, self._snapshot())
        stop_process(spy, signal.SIGINT, 30)
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinger
        self._read_sipp_stats(result, phase_dir / "stats.csv")
        self._analyse(result)
        if self.args.keep:
            self._dump_traces(phase_dir / "traces.json")
        self.check_bridge()
        log(f"{name}: {result.completed}/{calls} completed, {result.failed} failed, "
            f"peak {result.peak_concurrent} concurrent, CPU {result.cpu_s:.2f} s")
        self.results.append(result)
        return result

    def _snapshot(self) -> dict[str, float]:
        """CPU seconds so far: Asterisk, ivr-bridge (all threads, event-loop thread), this script, SIPp."""
        ast_pid = self._asterisk_pid()
        bridge_pid = self.bridge.pid if self.bridge else None
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, total = machine_jiffies()
        return {"asterisk": cpu_seconds(ast_pid), "bridge": cpu_seconds(bridge_pid),
                "bridge_main": thread_cpu_seconds(bridge_pid, bridge_pid), "bench": me.ru_utime + me.ru_stime,
                "children": children.ru_utime + children.ru_stime, "busy": busy, "total": total,
                "wall": time.monotonic()}

    @staticmethod
    def _fill_cpu(result: PhaseResult, before: dict[str, float], after: dict[str, float]) -> None:
        delta = {key: after[key] - before[key] for key in before}
        result.asterisk_cpu_s = delta["asterisk"]
        result.bridge_cpu_s = delta["bridge"]
        result.bridge_main_cpu_s = delta["bridge_main"]
        result.bench_cpu_s = delta["bench"]
        result.sipp_cpu_s = delta["children"]   # SIPp (and py-spy): the children this script waited for
        result.machine_busy = delta["busy"] / max(1.0, delta["total"])
        result.wall_s = delta["wall"]

    def _start_py_spy(self, name: str, phase_dir: Path) -> subprocess.Popen[bytes] | None:
        bridge_pid = self.bridge.pid if self.bridge else None
        if not (self.args.profile and self.py_spy and bridge_pid):
            return None
        self.profiles[name] = phase_dir / "py-spy.txt"
        return subprocess.Popen([self.py_spy, "record", "--pid", str(bridge_pid), "--rate", "200", "--threads",
                                 "--nonblocking", "--format", "raw", "--output", str(self.profiles[name])],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _sipp_command(self, phase_dir: Path, number: str, concurrency: int, calls: int, rate: float,
                      budget: float) -> list[str]:
        scenario = SCENARIO_SILENT if self.args.silent_caller else SCENARIO_AUDIO
        rtp_pcap.build(phase_dir / CALLER_PCAP, DIGITS, seconds=9.0)
        return ["sipp", f"127.0.0.1:{SIP_PORT}", "-sf", str(scenario), "-s", number,
                "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1", "-mp", str(self._media_port()),
                "-m", str(calls), "-l", str(concurrency), "-r", f"{rate:g}", "-rp", "1000",
                "-nostdin", "-timeout", f"{int(budget)}s", "-timeout_error",
                "-trace_stat", "-stf", str(phase_dir / "stats.csv"), "-fd", "1",
                "-trace_err", "-error_file", str(phase_dir / "errors.log"),
                "-trace_screen", "-screen_file", str(phase_dir / "screen.log")]

    def _dump_traces(self, path: Path) -> None:
        assert self.monitor is not None
        path.write_text(json.dumps({name: dataclasses.asdict(t) for name, t in self.monitor.channels.items()},
                                   indent=1))

    def check_bridge(self) -> None:
        if self.bridge is None or self.bridge.poll() is not None:
            tail = self.bridge_log.read_text(errors="replace")[-1500:] if self.bridge_log.exists() else ""
            raise BenchError(f"ivr-bridge is not running any more (exit {self.bridge and self.bridge.returncode}; "
                             f"a signal from outside?); its log ends:\n{tail}")
        if self._asterisk_pid() is None or cpu_seconds(self._asterisk_pid()) == 0.0:
            raise BenchError("the bench Asterisk is not running any more")

    def _asterisk_pid(self) -> int | None:
        try:
            return int((self.pbx.host_dir / "run" / "asterisk.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _media_port() -> int:
        for _ in range(50):
            port = free_port() & ~1
            if not (port_in_use(port, socket.SOCK_DGRAM) or port_in_use(port + 2, socket.SOCK_DGRAM)):
                return port
        raise BenchError("no free media port")

    @staticmethod
    def _read_sipp_stats(result: PhaseResult, path: Path) -> None:
        try:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter=";"))
        except OSError:
            return
        if not rows:
            return
        last = rows[-1]
        with contextlib.suppress(KeyError, ValueError):
            result.sipp_successful = int(last["SuccessfulCall(C)"])
            result.sipp_failed = int(last["FailedCall(C)"])
        with contextlib.suppress(KeyError, ValueError):
            result.sipp_peak = max(int(r["CurrentCall"]) for r in rows)

    def _analyse(self, result: PhaseResult) -> None:
        assert self.monitor is not None
        done_prompt = self.prompts["done"]
        traces = [t for t in self.monitor.channels.values() if t.number == result.number]
        result.channels = len(traces)
        result.peak_concurrent = self.monitor.peak.get(result.number, 0)
        for trace in traces:
            prompts = sorted(trace.prompts)
            if prompts:
                result.first_prompt_ms.append((prompts[0][0] - trace.created) * 1000)
            if any(path == done_prompt for _, path in prompts):
                result.completed += 1
            for ts, digit in trace.dtmf:
                if digit not in "12":
                    continue
                following = [p for p in prompts if p[0] >= ts]
                if following:
                    result.latencies_ms.append((following[0][0] - ts) * 1000)
                    agi = [r for r in trace.agi_results if ts <= r <= following[0][0]]
                    if agi:
                        result.result_to_prompt_ms.append((following[0][0] - agi[-1]) * 1000)
        result.path_failed = max(0, result.calls - result.completed)
        # ivr-bridge's own events (Redis): time from entering a node to asking for its prompt, i.e. what the engine
        # does in between. It used to write the node's step rows to SQLite there (now queued, see docs).
        entered: dict[str, float] = {}
        for at, event in self.bus_events:
            call_id = str(event.get("call_id", ""))
            if event.get("type") == "node" and event.get("node") in ("menu1", "menu2", "done"):
                entered[call_id] = at
            elif event.get("type") == "prompt" and call_id in entered:
                result.node_to_prompt_ms.append((at - entered.pop(call_id)) * 1000)

    # ------------------------------------------------------------------------------------------ teardown
    async def stop_observers(self) -> None:
        if self.monitor is not None:
            await self.monitor.aclose()
        task = getattr(self, "_bus_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def teardown(self) -> None:
        stop_process(self.bridge, signal.SIGTERM, 30)
        if self._lock is not None:  # only the run that holds the instance stops it
            with contextlib.suppress(Exception):
                self.pbx.stop()
            self._lock.close()
            self._lock = None
        stop_process(self.redis)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept {self.tmp}")

    def db_summary(self) -> dict[str, Any]:
        try:
            with contextlib.closing(sqlite3.connect(self.db_path)) as db:
                rows = db.execute("SELECT dialled, outcome, COUNT(*) FROM interactions GROUP BY 1, 2").fetchall()
                steps = db.execute("SELECT COUNT(*) FROM interaction_steps").fetchone()[0]
        except sqlite3.Error as exc:
            return {"error": str(exc)}
        return {"interactions": {f"{d}:{o}": n for d, o, n in rows}, "steps": steps}

    def profile_summary(self, limit: int = 25) -> str:
        import io
        import pstats

        if self.profiles:
            return "\n".join(py_spy_summary(name, path, limit) for name, path in self.profiles.items())
        path = self.tmp / "ivr-bridge.prof"
        if not path.exists():
            return "(no profile written)"
        out = io.StringIO()
        stats = pstats.Stats(str(path), stream=out)
        stats.sort_stats("tottime").print_stats(limit)
        return out.getvalue()


def py_spy_summary(name: str, path: Path, limit: int) -> str:
    """Where ivr-bridge spent its samples (py-spy raw format: 'thread;frame;...;frame count')."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"{name}: no py-spy output"
    own: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    threads: dict[str, int] = defaultdict(int)
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):
            inclusive[frame] += count
    out = [f"py-spy, {name}: {total} samples at 200 Hz (active threads only)"]
    out += [f"  thread {t}: {n / total:.0%}" for t, n in sorted(threads.items(), key=lambda kv: -kv[1])[:6]]
    out.append("  own time:")
    out += [f"    {n / total:6.1%}  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:limit]]
    out.append("  inclusive:")
    picked = [(f, n) for f, n in inclusive.items() if not f.startswith(("thread ", "<module>"))]
    out += [f"    {n / total:6.1%}  {f}" for f, n in sorted(picked, key=lambda kv: -kv[1])[:limit]]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- SQLite probe
async def sqlite_probe(tmp: Path, rounds: int = 200) -> dict[str, float | None]:
    """Latency of one step write (InteractionStore.add_steps, one transaction) on the bench's filesystem."""
    from bridge import db
    from bridge.store import InteractionStore, StepRecord

    url = f"sqlite+aiosqlite:///{tmp / 'probe.db'}"
    await db.upgrade(url)
    store = InteractionStore(url)
    await store.start()
    try:
        record = await store.create(channel="voice", state="ivr", caller="1", dialled="900", flow="bench")
        samples = []
        for i in range(rounds):
            started = time.perf_counter()
            await store.add_steps(record.id, i, [StepRecord("menu1", "enter")])
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await store.aclose()
    return {"p50": percentile(samples, 50), "p95": percentile(samples, 95), "max": max(samples)}


# ------------------------------------------------------------------------------------------------- report
def machine() -> dict[str, str]:
    model = cpu_model()
    sipp = subprocess.run(["sipp", "-v"], capture_output=True, text=True, check=False).stdout.strip()
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "sipp": sipp.split("\n")[0].strip(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def evaluate(results: list[PhaseResult], low: int, high: int) -> list[tuple[str, str, str, bool | None]]:
    """(what, figure, target, met) rows."""
    by = {(r.mode, r.concurrency): r for r in results}
    rows: list[tuple[str, str, str, bool | None]] = []
    ivr_hi, base_hi, ivr_lo = by.get(("ivr", high)), by.get(("baseline", high)), by.get(("ivr", low))
    if ivr_hi:
        rows.append((f"ivr-bridge at {high} concurrent: failed calls",
                     f"{ivr_hi.failed} failed of {ivr_hi.calls} (peak {ivr_hi.peak_concurrent} concurrent)",
                     f"0 failed, {high} concurrent", ivr_hi.failed == 0 and ivr_hi.peak_concurrent >= high))
    if ivr_hi and base_hi and ivr_hi.cpu_per_call_ms and base_hi.cpu_per_call_ms:
        ratio = ivr_hi.cpu_per_call_ms / base_hi.cpu_per_call_ms
        rows.append((f"CPU per call at {high} (Asterisk+ivr-bridge vs dialplan)",
                     f"{ivr_hi.cpu_per_call_ms:.1f} ms vs {base_hi.cpu_per_call_ms:.1f} ms = {ratio:.2f}x",
                     f"<= {TARGET_CPU_RATIO}x", ratio <= TARGET_CPU_RATIO))
    if ivr_lo:
        p95 = percentile(ivr_lo.latencies_ms, 95)
        rtt = percentile(ivr_lo.ping.server_rtt_ms, 50)
        if p95 is not None and rtt is not None:
            limit = TARGET_LAT_RTT_FACTOR * rtt + TARGET_LAT_EXTRA_MS
            rows.append((f"DTMF -> next prompt p95 at {low} (ivr-bridge)",
                         f"{p95:.1f} ms (AMI Ping RTT p50 {rtt:.2f} ms)",
                         f"<= 3 x RTT + 20 = {limit:.1f} ms", p95 <= limit))
        else:
            rows.append((f"DTMF -> next prompt p95 at {low} (ivr-bridge)", "no samples", "", False))
    for r in results:
        if r.mode == "baseline" and r.failed:
            rows.append((f"baseline at {r.concurrency}: failed calls", str(r.failed), "0 (sanity)", False))
    return rows


def write_json(path: Path, info: dict[str, Any], results: list[PhaseResult],
               targets: list[tuple[str, str, str, bool | None]]) -> None:
    path.write_text(json.dumps({"info": info, "phases": [r.summary() for r in results],
                                "targets": [dict(zip(("what", "figure", "target", "met"), t, strict=True))
                                            for t in targets]}, indent=2, default=str), encoding="utf-8")


def _open_for_writing(path: Path) -> Any:
    return open(path, "wb")  # the caller closes it


def print_report(results: list[PhaseResult], targets: list[tuple[str, str, str, bool | None]],
                 info: dict[str, Any], silent_caller: bool = False) -> None:
    header = ("phase", "calls", "ok", "failed", "peak", "CPU s", "ast ms/call", "bridge ms/call", "total ms/call",
              "DTMF->prompt p50", "p95", "max", "Ping RTT ast p50/p95", "client p50/p95")
    rows = []
    for r in results:
        lat = r.latencies_ms
        rows.append((
            r.name, str(r.calls), str(r.completed), str(r.failed), str(r.peak_concurrent), f"{r.cpu_s:.2f}",
            fmt(r.asterisk_cpu_s / r.calls * 1000), fmt(r.bridge_cpu_s / r.calls * 1000) if r.mode == "ivr" else "-",
            fmt(r.cpu_per_call_ms), fmt(percentile(lat, 50), " ms"), fmt(percentile(lat, 95), " ms"),
            fmt(percentile(lat, 100), " ms"),
            f"{fmt(percentile(r.ping.server_rtt_ms, 50), '', 2)}/{fmt(percentile(r.ping.server_rtt_ms, 95), ' ms', 2)}",
            f"{fmt(percentile(r.ping.client_rtt_ms, 50), '', 2)}/{fmt(percentile(r.ping.client_rtt_ms, 95), ' ms', 2)}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)] if rows else []
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    for r in results:
        if r.mode == "ivr":
            first = sum(1 for v in r.latencies_ms if v < 30) / len(r.latencies_ms) if r.latencies_ms else 0.0
            if not silent_caller:
                print(f"  {r.name}: {first:.0%} of digits got their next prompt within 30 ms")
            extra = (f"  {r.name}: ivr-bridge CPU {r.bridge_cpu_s / r.calls * 1000:.1f} ms/call, event-loop "
                     f"thread {r.bridge_main_cpu_s / r.calls * 1000:.1f} ms/call; AsyncAGIExec (digit) -> next "
                     f"STREAM FILE p50 "
                     f"{fmt(percentile(r.result_to_prompt_ms, 50), ' ms')} p95 "
                     f"{fmt(percentile(r.result_to_prompt_ms, 95), ' ms')}; node -> prompt (Redis events, "
                     f"includes the step write) p50 {fmt(percentile(r.node_to_prompt_ms, 50), ' ms')} p95 "
                     f"{fmt(percentile(r.node_to_prompt_ms, 95), ' ms')}; SIPp exit {r.sipp_exit}, "
                     f"SIPp failed {r.sipp_failed}")
        else:
            extra = f"  {r.name}: SIPp exit {r.sipp_exit}, SIPp failed {r.sipp_failed}"
        print(extra)
        print(f"      wall {r.wall_s:.1f} s, machine {r.machine_busy:.0%} busy; CPU: Asterisk "
              f"{r.asterisk_cpu_s:.1f} s, ivr-bridge {r.bridge_cpu_s:.1f} s, "
              f"SIPp {r.sipp_cpu_s:.1f} s, bench {r.bench_cpu_s:.1f} s; first prompt after answer p50 "
              f"{fmt(percentile(r.first_prompt_ms, 50), ' ms')} p95 {fmt(percentile(r.first_prompt_ms, 95), ' ms')}")
    probe = info.get("sqlite_probe")
    if probe:
        print(f"  SQLite step write (one add_steps transaction, idle): p50 {fmt(probe['p50'], ' ms', 2)} "
              f"p95 {fmt(probe['p95'], ' ms', 2)}")
    print(f"  DB after the run: {info.get('db')}")
    print()
    print("target                                                   figure / target / met")
    for what, figure, target, met in targets:
        mark = "met" if met else "NOT MET"
        print(f"  {what}: {figure}  [target {target}]  {mark}")
    total_failed = sum(r.failed for r in results)
    print(f"\nfailed calls: {total_failed}")


# ------------------------------------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    info: dict[str, Any] = {"machine": machine()}
    high = args.calls
    low = max(1, high // 2)
    if args.quick:
        low, high = 5, 10

    def per_phase(concurrency: int) -> int:
        if args.quick:
            return 10
        return args.per_phase or 2 * concurrency

    try:
        await asyncio.to_thread(bench.prepare)
        await asyncio.to_thread(bench.start_redis)
        await asyncio.to_thread(bench.start_bridge)
        await bench.start_observers()
        assert bench.monitor is not None
        idle = PingStats()
        busy0, total0 = machine_jiffies()
        for _ in range(20):
            idle.add(await bench.monitor.ping_burst())
            await asyncio.sleep(0.1)
        busy1, total1 = machine_jiffies()
        info["background_busy"] = (busy1 - busy0) / max(1, total1 - total0)
        info["idle_ping"] = {"server_rtt_p50": percentile(idle.server_rtt_ms, 50),
                             "client_rtt_p50": percentile(idle.client_rtt_ms, 50)}
        log(f"idle AMI Ping RTT: Asterisk timestamps p50 {fmt(info['idle_ping']['server_rtt_p50'], ' ms', 2)}, "
            f"client p50 {fmt(info['idle_ping']['client_rtt_p50'], ' ms', 2)}")
        phases = [("baseline", low), ("ivr", low), ("baseline", high), ("ivr", high)]
        for mode, conc in phases:
            await bench.run_phase(f"{mode}-{conc}", mode, conc, per_phase(conc))
            await asyncio.sleep(0.5 if args.quick else 2)
        await bench.stop_observers()
        info["sqlite_probe"] = await sqlite_probe(bench.tmp)
        info["db"] = bench.db_summary()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        await bench.stop_observers()
        await asyncio.to_thread(bench.teardown)
        return 3
    except BaseException:
        await bench.stop_observers()
        await asyncio.to_thread(bench.teardown)
        raise
    await asyncio.to_thread(bench.teardown)
    targets = evaluate(bench.results, low, high)
    m = info["machine"]
    print(f"\nivr-bridge IVR benchmark, {m['date']}: {m['nproc']} x {m['cpu']}, kernel {m['kernel']}, "
          f"Python {m['python']}, {m['sipp']}" + (" [--quick]" if args.quick else ""))
    print(f"idle AMI Ping RTT: Asterisk timestamps p50 {fmt(info['idle_ping']['server_rtt_p50'], ' ms', 2)}, "
          f"client p50 {fmt(info['idle_ping']['client_rtt_p50'], ' ms', 2)}; machine {info['background_busy']:.0%} "
          f"busy before the phases (other work on this machine)")
    print_report(bench.results, targets, info, args.silent_caller)
    if args.profile:
        print(bench.profile_summary())
    if args.json:
        write_json(Path(args.json), info, bench.results, targets)
    if any(r.failed or r.sipp_exit not in (0, None) for r in bench.results):
        return 1
    if args.strict and not args.quick and not all(t[3] for t in targets):
        return 2
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200,
                        help="concurrency of the big phases (the latency phases run at half of it)")
    parser.add_argument("--per-phase", type=int, default=0, help="calls per phase (default: 2 x concurrency)")
    parser.add_argument("--quick", action="store_true", help="tiny phases (10 calls) for a CI smoke test")
    parser.add_argument("--profile", action="store_true",
                        help="profile ivr-bridge in the ivr phases (py-spy if found, else cProfile) and print the top")
    parser.add_argument("--py-spy", help="path of the py-spy binary (default: py-spy on PATH)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, SIPp traces, DB)")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is not met")
    parser.add_argument("--silent-caller", action="store_true",
                        help="callers send only the DTMF packets, no audio (AsyncAGI then polls every 100 ms)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (Asterisk runs in its chroot; SIPp plays pcap audio)", file=sys.stderr)
        return 3
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
