"""Smoke test of the chat benchmark (bench/chat.py --quick): its own redis-server, the bare echo server and the
product's chat app as subprocesses, 50 visitors for a few seconds; every message answered on every path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

PROJECT = Path(__file__).resolve().parent.parent


def test_quick_chat_bench_answers_every_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IVR_BRIDGE")}
    out = tmp_path / "chat.json"
    run = subprocess.run([sys.executable, str(PROJECT / "bench" / "chat.py"), "--quick", "--json", str(out)],
                         cwd=PROJECT, env=env, capture_output=True, text=True, timeout=140)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "relay p99 / echo p99" in run.stdout
    document = json.loads(out.read_text())
    echo, chat = document["phases"]
    assert (echo["mode"], chat["mode"]) == ("echo", "chat")
    assert echo["connected"] == chat["connected"] == 50
    assert set(chat["latency_ms"]) == {"ack", "own echo", "relay"} and set(echo["latency_ms"]) == {"echo"}
    for phase in (echo, chat):
        assert phase["sent"] > 0 and not any(phase["lost"].values()), phase
        assert all(figures["count"] == phase["sent"] for figures in phase["latency_ms"].values())
        assert phase["server_loop"] and phase["kib_per_idle_connection"] > 0
