"""Smoke test of the IVR benchmark (bench/ivr_sipp.py --quick): SIPp callers through the bench menu, both ways.

Runs the benchmark as a subprocess, as a user would: its own Asterisk instance ``bench`` (SIP 35060, AMI 35038,
RTP 30000-31999), its own Redis and ``ivr-bridge run``, ten calls per phase. Asserts the script succeeds and
reports no failed call; the figures themselves are for docs/benchmarks.md, not for CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROJECT = Path(__file__).resolve().parent.parent
BENCH = PROJECT / "bench" / "ivr_sipp.py"
ROOT = Path(os.environ.get("IVR_ASTERISK_ROOT", "/var/cache/ivr-bridge/asterisk-root"))


def _unavailable(reason: str) -> None:
    """Missing infrastructure fails the run in CI and skips the test elsewhere (as in conftest.py)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)", pytrace=False)
    pytest.skip(reason)


def test_quick_bench_places_calls_without_failures() -> None:
    if os.geteuid() != 0:
        _unavailable("the benchmark needs root (Asterisk chroot, SIPp pcap play)")
    if shutil.which("sipp") is None:
        _unavailable("sipp is not installed (Debian package sip-tester)")
    if not (ROOT / "usr" / "sbin" / "asterisk").exists():
        _unavailable(f"no Asterisk root at {ROOT}")
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed")

    env = {k: v for k, v in os.environ.items() if not k.startswith("IVR_BRIDGE")}
    try:
        proc = subprocess.run([sys.executable, str(BENCH), "--quick"], cwd=PROJECT, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench --quick did not finish in 120 s; its output so far:\n{exc.stdout}\n{exc.stderr}")
    output = f"{proc.stdout}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"bench --quick exited {proc.returncode}:\n{output}"
    found = re.search(r"^failed calls: (\d+)$", proc.stdout, re.MULTILINE)
    assert found is not None, f"no 'failed calls' line in the output:\n{output}"
    assert found.group(1) == "0", output
    # Every phase placed its ten calls and all of them reached the goodbye prompt.
    phases = re.findall(r"^(baseline|ivr)-\d+\s+(\d+)\s+(\d+)\s+(\d+)\s", proc.stdout, re.MULTILINE)
    assert len(phases) == 4, output
    for _mode, calls, completed, failed in phases:
        assert (int(calls), int(completed), int(failed)) == (10, 10, 0), output
