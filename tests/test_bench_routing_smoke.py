"""Smoke test of the routing benchmark (bench/routing.py --quick): its own redis-server, the real Router, every
timed assignment making exactly one offer; the figures are for docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROJECT = Path(__file__).resolve().parent.parent


def test_quick_routing_bench_makes_one_offer_per_timed_assignment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IVR_BRIDGE")}
    out = tmp_path / "routing.json"
    run = subprocess.run([sys.executable, str(PROJECT / "bench" / "routing.py"), "--quick", "--json", str(out)],
                         cwd=PROJECT, env=env, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "assignment p99 vs PING p99" in run.stdout
    rounds = json.loads(out.read_text())["rounds"]
    assert rounds and all(r["failures"] == 0 for r in rounds), rounds
