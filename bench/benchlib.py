"""What the benchmark scripts share: their error, their log line, process CPU time, waiting for a port, the CPU."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

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
