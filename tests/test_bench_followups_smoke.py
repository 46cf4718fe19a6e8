"""Smoke test of the follow-ups benchmark (bench/followups.py --quick): 200 follow-ups, half SMS through Kannel,
half email to the dev mail sink, sent by a raw loop and by the outbox dispatcher.

Runs the benchmark as a subprocess, as a user would: its own Kannel instance ``bench`` (admin 33000, smsbox 33001,
sendsms 33013, fake SMSC 30000) in a temp folder, its own mail sink process, a temporary SQLite database. Asserts
the script succeeds and that the outbox lost and duplicated nothing; the figures are for docs/benchmarks.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sms.kannel_proc import BEARERBOX, FAKESMSC, SMSBOX

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PROJECT = Path(__file__).resolve().parent.parent
BENCH = PROJECT / "bench" / "followups.py"


def _unavailable(reason: str) -> None:
    """Missing infrastructure fails the run in CI and skips the test elsewhere (as in conftest.py)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)", pytrace=False)
    pytest.skip(reason)


def test_quick_bench_loses_and_duplicates_nothing() -> None:
    missing = [str(b) for b in (BEARERBOX, SMSBOX, FAKESMSC) if not b.exists()]
    if missing:
        _unavailable(f"Kannel is not installed ({', '.join(missing)}; apt-get install kannel kannel-extras)")

    env = {k: v for k, v in os.environ.items() if not k.startswith("IVR_BRIDGE")}
    try:
        proc = subprocess.run([sys.executable, str(BENCH), "--quick"], cwd=PROJECT, env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench --quick did not finish in 60 s; its output so far:\n{exc.stdout}\n{exc.stderr}")
    output = f"{proc.stdout}\n--- stderr ---\n{proc.stderr[-3000:]}"
    if proc.returncode == 3 and "another followups bench is running" in proc.stderr:
        _unavailable("another run of bench/followups.py holds the Kannel 'bench' instance")
    assert proc.returncode == 0, f"bench --quick exited {proc.returncode}:\n{output}"
    figures = dict(re.findall(r"^(lost|duplicated|not final): (\d+)$", proc.stdout, re.MULTILINE))
    assert figures == {"lost": "0", "duplicated": "0", "not final": "0"}, output
    # Both runs sent all 200 (100 SMS, 100 mails) and the receivers got every one of them.
    runs = re.findall(r"^(baseline|outbox)\s+(\d+)\s+(\d+)\s+(\d+)\s", proc.stdout, re.MULTILINE)
    assert runs == [("baseline", "200", "100", "100"), ("outbox", "200", "100", "100")], output
    received = re.findall(r"^  (baseline|outbox): received (\d+) SMS, (\d+) mails", proc.stdout, re.MULTILINE)
    assert received == [("baseline", "100", "100"), ("outbox", "100", "100")], output
