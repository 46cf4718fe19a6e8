"""What the benchmark scripts share: their error, their log line, process and machine CPU time, ports, the CPU."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stat_cpu_seconds(path: str) -> float:
    """utime + stime from a /proc stat file, in seconds (0 if the process or thread is gone)."""
    try:
        with open(path) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds of a process (all its threads), 0 if it is gone."""
    return stat_cpu_seconds(f"/proc/{pid}/stat") if pid else 0.0


def wait_tcp(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


class CpuFields(NamedTuple):
    """Jiffies of all CPUs since boot (/proc/stat)."""

    busy: int          # user, nice, system, irq, softirq (not steal)
    total: int
    processes: int     # user, nice, system
    kernel: int        # irq, softirq, steal
    steal: int         # time the hypervisor gave the VM's CPUs to others


def cpu_fields() -> CpuFields:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]] + [0] * 10
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    busy = user + nice + system + irq + softirq
    return CpuFields(busy, busy + idle + iowait + steal, user + nice + system, irq + softirq + steal, steal)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Terminate a child and reap it; killed if it has not gone within ``timeout`` seconds."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan
