"""Benchmark of the unified queue (``bridge.router.Router``): one assignment against a Redis PING round trip and
against a trivial EVALSHA, all measured in the same run, on the same client and connection.

    .venv/bin/python bench/routing.py [--count 5000] [--agents 50] [--backlog 200] [--rounds 3]
                                      [--state busy|idle] [--scan-limit 200] [--warmup 1000] [--diag 1000]
                                      [--seed 1] [--quick] [--json F]

A private ``redis-server`` (no persistence) on a free loopback port, in a temp folder, stopped at the end (also
on Ctrl-C / SIGTERM). The real ``Router`` with ``RouterConfig(key_prefix=...)`` (product defaults otherwise:
``scan_limit`` 200, ``call_blocks_chats``) on a ``redis.asyncio`` client (``decode_responses=True``); the
router's loop is not started, the bench calls ``assign(most=1)`` itself. Logging at WARNING (the router's
``log.info`` per offer returns at once).

State: ``--agents`` agents logged in with 2-3 of 5 skills (voice capacity 1, chat capacity 4), all available;
``--backlog`` interactions waiting, about 1/3 voice and the rest web chat, skills at random.

  * ``--state busy`` (default; a queue with a backlog, in its steady state): first the agents are filled (assign
    until nothing more can be offered). Each iteration then ends interactions in hand, each picked at random,
    until one ends that frees room its agent can use (ends that free none - a chat of an agent on a call, with
    ``call_blocks_chats`` - are counted); not timed. Then one ``assign(most=1)`` is timed, which must make exactly
    one offer; the offered interaction is replaced by a new one with its channel and skill (not timed; the backlog
    keeps its size and mix), and, as the router's loop does (``while await self.assign(): pass``), assignments
    follow until one finds nothing: that "closing assign" looks at most at the whole scanned part of the queue,
    nothing when no agent has room (timed apart).
    The timed assignment reads the queue from its head (in growing chunks) until it meets an interaction an agent
    with room can take (the most idle one with the skill: the first of the router's sorted sets of agents with
    room; a channel and skill nobody can take is looked for once).
  * ``--state idle``: agents have room; each iteration ends the previous offer, times one assignment (the head of
    the queue goes to the most idle agent) and enqueues a replacement.

Measured in ``--rounds`` rounds, each: a PING block (``--count`` sequential ``await redis.ping()``: p50/p99), an
EVALSHA block (``--count`` sequential calls of a registered ``return 1``: calls/s), an assignment block
(``--count`` iterations as above: p50/p95/p99/max of the timed ``assign`` calls; assignments/s = count / their
summed time; cycles/s = count / the block's wall time, everything of the iteration). The targets are judged on the
medians over the rounds. CPU of redis-server and of this process per block (from /proc), and Redis's own
``INFO commandstats`` (server time a call) for the PING and EVALSHA blocks.

Diagnosis (``--diag`` more iterations after the rounds): the server time of each script call alone
(``INFO commandstats`` before and after it), how far down the queue each assignment went (the offered
interaction's place in the queue's head, read just before) and the server time of the closing assign.

Exit status: 0 when every target was met, 1 when one was missed, 3 when the bench could not run or an assignment
made no offer or more than one (a bench error). ``--quick`` (a few seconds, a smoke test) judges only that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from bridge.config import RouterConfig  # noqa: E402
from bridge.router import Offer, Router  # noqa: E402

sys.path.insert(0, str(BENCH_DIR))
from benchlib import (  # noqa: E402
    BenchError,
    cpu_fields,
    cpu_model,
    cpu_seconds,
    free_port,
    log,
    median,
    stop_process,
)

KEY_PREFIX = "bench-routing:{router}:"
SKILLS = ("billing", "sales", "support", "tech", "vip")
VOICE_SHARE = 1 / 3
VOICE_CAPACITY, CHAT_CAPACITY = 1, 4
TARGET_P99_X = 10.0     # assignment p99 <= 10 x PING p99
TARGET_RATE_X = 0.5     # assignments/s >= 0.5 x trivial EVALSHA calls/s
QUICK = {"count": 300, "rounds": 2, "diag": 100, "warmup": 100}


# ------------------------------------------------------------------------------------------------- helpers
class Stop:
    """Set by SIGTERM / SIGINT; every loop checks it. Cancelling the task alone is not enough: on Python 3.11 a
    cancellation can be lost inside redis-py (each command's send runs in ``asyncio.wait_for``, which drops a
    cancellation that arrives as the send completes: CPython gh-86296, fixed in 3.12)."""

    requested = False


def check_stop() -> None:
    if Stop.requested:
        raise asyncio.CancelledError


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest rank of sorted values (p in 0..100)."""
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def machine_jiffies() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies of all CPUs since boot (see benchlib.CpuFields)."""
    fields = cpu_fields()
    return fields.busy, fields.total, fields.steal


def busy_since(mark: tuple[int, int, int]) -> tuple[float, float]:
    """(busy, steal) fractions of all CPUs since ``mark``."""
    busy, total, steal = machine_jiffies()
    return (busy - mark[0]) / max(1, total - mark[1]), (steal - mark[2]) / max(1, total - mark[1])


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private redis-server on a free loopback port, no persistence (as tests/conftest.py's ``redis_url``)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        for _attempt in range(3):
            port = free_port()
            # A session of its own: Ctrl-C in the terminal reaches the bench, which stops the server itself.
            proc = subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.workdir / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline and not redis_ping(port):
                time.sleep(0.05)
            if proc.poll() is None and redis_ping(port):
                self.proc, self.port = proc, port
                return
            proc.kill()
            proc.wait()
        raise BenchError(f"redis-server did not start; see {self.workdir / 'redis.log'}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, 10)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


# ------------------------------------------------------------------------------------------------- results
@dataclass
class Round:
    number: int
    ping_p50_ms: float = 0.0
    ping_p99_ms: float = 0.0
    ping_server_us: float = 0.0        # INFO commandstats: usec per call
    evalsha_per_s: float = 0.0
    evalsha_p50_ms: float = 0.0
    evalsha_p99_ms: float = 0.0
    evalsha_server_us: float = 0.0
    assign_p50_ms: float = 0.0
    assign_p95_ms: float = 0.0
    assign_p99_ms: float = 0.0
    assign_max_ms: float = 0.0
    assign_per_s: float = 0.0          # count / summed time of the timed assign calls
    cycles_per_s: float = 0.0          # count / wall time of the block (everything an iteration does)
    failures: int = 0                  # assign calls that did not make exactly one offer
    scanned_p50: float = 0.0           # interactions an assignment looked at (place of the offered one)
    scanned_mean: float = 0.0
    closing_p50_ms: float = math.nan   # the loop's closing assign, nothing to offer (busy state)
    closing_p99_ms: float = math.nan
    extra_offers: int = 0              # offers the loop's assigns made after the timed one
    skipped_ends: int = 0              # ends that freed no usable room (no assignment timed after them)
    cpu_us: dict[str, dict[str, float]] = field(default_factory=dict)   # block -> {"redis", "bench"} per op
    machine_busy: float = 0.0          # all CPUs, this bench and redis-server included
    others_busy: float = 0.0           # the same without this bench and redis-server
    steal: float = 0.0                 # hypervisor steal time

    @property
    def p99_ratio(self) -> float:
        return self.assign_p99_ms / self.ping_p99_ms if self.ping_p99_ms else math.nan

    @property
    def rate_ratio(self) -> float:
        return self.assign_per_s / self.evalsha_per_s if self.evalsha_per_s else math.nan


@dataclass
class Diagnosis:
    n: int = 0
    server_us: list[float] = field(default_factory=list)      # per successful assign
    client_ms: list[float] = field(default_factory=list)
    scanned: list[int] = field(default_factory=list)          # place of the offered interaction in the queue (1 =
    #                                                           head), i.e. interactions the script looked at
    empty_server_us: list[float] = field(default_factory=list)  # assign right after, with nothing to offer
    empty_client_ms: list[float] = field(default_factory=list)
    place_mismatch: int = 0      # the bench's idea of the queue's order (Bench.place) was wrong (should be 0)
    finish_server_us: list[float] = field(default_factory=list)
    enqueue_server_us: list[float] = field(default_factory=list)
    fit_points: list[tuple[float, float]] = field(default_factory=list)   # (looked at, server us) per assign

    def summary(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, float]:
            o = sorted(values)
            return {"n": len(o), "p50": percentile(o, 50), "p95": percentile(o, 95), "p99": percentile(o, 99),
                    "max": o[-1] if o else math.nan, "mean": sum(o) / len(o) if o else math.nan}

        out: dict[str, Any] = {
            "assign_server_us": stats(self.server_us), "assign_client_ms": stats(self.client_ms),
            "scanned": stats([float(s) for s in self.scanned]),
            "empty_assign_server_us": stats(self.empty_server_us),
            "empty_assign_client_ms": stats(self.empty_client_ms),
            "finish_server_us": stats(self.finish_server_us), "enqueue_server_us": stats(self.enqueue_server_us),
            "place_mismatch": self.place_mismatch}
        # Server time against interactions looked at: a least-squares line (a + b x scanned).
        xs = [x for x, _ in self.fit_points]
        if len(set(xs)) > 1:
            ys = [y for _, y in self.fit_points]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            sxx = sum((x - mx) ** 2 for x in xs)
            b = sum((x - mx) * (y - my) for x, y in self.fit_points) / sxx
            out["fit_us"] = {"fixed": my - b * mx, "per_scanned": b}
        return out


# ------------------------------------------------------------------------------------------------- the bench
@dataclass
class Step:
    """One iteration of an assignment block."""

    elapsed: float                   # the timed assign(most=1), seconds
    offers: int                      # offers it made (must be 1)
    scanned: int                     # place of the offered interaction in the queue (1 = head)
    closing: float | None = None     # the loop's closing assign (nothing to offer), seconds
    extra: int = 0                   # offers the loop's assigns made after the timed one
    skipped: int = 0                 # ends before the one that freed usable room (they freed none)


class Bench:
    def __init__(self, args: argparse.Namespace, server: RedisServer) -> None:
        self.args = args
        self.server = server
        self.rng = random.Random(args.seed)
        # One connection is all a sequential loop uses; the same client serves PING, EVALSHA and the router.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(server.url, decode_responses=True)
        self.config = RouterConfig(key_prefix=KEY_PREFIX, scan_limit=args.scan_limit)
        self.router = Router(server.url, self.config, redis=self.redis)
        self.trivial = self.redis.register_script("return 1")
        self.seq = 0
        self.agent_skills: dict[str, frozenset[str]] = {}
        self.load: dict[str, list[int]] = {}               # agent -> [calls, chats] in hand
        self.queued: dict[str, tuple[str, str]] = {}       # iid -> (channel, skill), waiting, in the queue's order
        self.in_hand: dict[str, tuple[str, str]] = {}      # iid -> (agent, channel), offered

    async def aclose(self) -> None:
        await self.router.aclose()
        await self.redis.aclose()

    # ---------------------------------------------------------------------------------------- state
    async def enqueue(self, channel: str | None = None, skill: str | None = None) -> None:
        self.seq += 1
        iid = f"i{self.seq:08d}"     # same-millisecond scores tie; Redis then orders by name = arrival order
        channel = channel or ("voice" if self.rng.random() < VOICE_SHARE else "web")
        skill = skill or self.rng.choice(SKILLS)
        if not await self.router.enqueue(iid, channel, skill):
            raise BenchError(f"enqueue of {iid} refused")
        self.queued[iid] = (channel, skill)

    def place(self, iid: str) -> int:
        """Place of a waiting interaction in the queue, 1 = head: the interactions an assignment that offers it
        looked at. All are queued with priority 0, so the queue's order is the order of enqueueing."""
        return list(self.queued).index(iid) + 1

    async def took(self, offers: list[Offer]) -> None:
        """Book offers the router made and enqueue a replacement for each (same channel and skill: the backlog
        keeps its size and mix)."""
        for offer in offers:
            channel, skill = self.queued.pop(offer.interaction)
            self.in_hand[offer.interaction] = (offer.agent, offer.channel)
            self.load[offer.agent][0 if offer.channel == "voice" else 1] += 1
            await self.enqueue(channel, skill)

    def frees_usable_room(self, iid: str) -> bool:
        """Would the end of ``iid`` give its agent room for an interaction the router looks at (the first
        ``scan_limit`` of the queue)? The router's rule: a call needs no call in hand; a chat needs a free chat
        place and, with ``call_blocks_chats``, no call in hand."""
        agent, channel = self.in_hand[iid]
        calls, chats = self.load[agent]
        if channel == "voice":
            calls -= 1
        else:
            chats -= 1
        voice_room, chat_room = calls < VOICE_CAPACITY, chats < CHAT_CAPACITY and calls == 0
        if not voice_room and not chat_room:
            return False
        skills = self.agent_skills[agent]
        for ch, skill in itertools.islice(self.queued.values(), self.config.scan_limit):
            if skill in skills and (voice_room if ch == "voice" else chat_room):
                return True
        return False

    async def free_one(self, probe: Diagnosis | None = None) -> int:
        """End interactions in hand, each picked at random (not timed), until one of them frees room its agent
        can use now, so that exactly one offer can follow. Returns how many ended before that one: ends that
        free no usable room (a chat of an agent on a call, or nothing the agent could take within the scan),
        after which the router's loop would make an assignment that finds nothing (not timed here: the state
        is the same without it)."""
        ended = 0
        while self.in_hand:
            check_stop()
            iid = self.rng.choice(list(self.in_hand))
            usable = self.frees_usable_room(iid)
            s0 = await self.commandstats() if probe else {}
            await self.finish(iid)
            if probe:
                probe.finish_server_us.append(self.server_us(s0, await self.commandstats())[0])
            if usable:
                break
            ended += 1
        return ended

    async def finish(self, iid: str) -> None:
        agent, channel = self.in_hand.pop(iid)
        self.load[agent][0 if channel == "voice" else 1] -= 1
        state, _ = await self.router.finish(iid)
        if state != "offered":
            raise BenchError(f"finish of {iid}: the router had it {state!r}, not 'offered'")

    async def fill(self, probe: Diagnosis | None = None) -> tuple[float, int]:
        """What the router's loop does after an offer (``while await self.assign(): pass``): assign until nothing
        more can be offered. Returns the time of the last, empty, assign and the offers the others made."""
        extra = 0
        for _ in range(10 * self.args.agents + 10):
            check_stop()
            s0 = await self.commandstats() if probe else {}
            t0 = time.perf_counter()
            offers = await self.router.assign()
            elapsed = time.perf_counter() - t0
            if not offers:
                if probe:
                    usec, calls = self.server_us(s0, await self.commandstats())
                    if calls == 1:
                        probe.empty_server_us.append(usec)
                        probe.empty_client_ms.append(elapsed * 1000)
                return elapsed, extra
            extra += len(offers)
            await self.took(offers)
        raise BenchError("the agents did not fill up")

    async def setup(self) -> None:
        args = self.args
        await self.redis.flushdb()
        for i in range(args.agents):
            check_stop()
            agent = f"agent{i:04d}"
            skills = self.rng.sample(SKILLS, self.rng.choice((2, 3)))
            self.agent_skills[agent] = frozenset(skills)
            self.load[agent] = [0, 0]
            await self.router.login(agent, skills, voice=VOICE_CAPACITY, chat=CHAT_CAPACITY)
            if not await self.router.set_presence(agent, "available"):
                raise BenchError(f"cannot set {agent} available")
        while len(self.queued) < args.backlog:
            check_stop()
            await self.enqueue()
        if args.state == "busy":   # fill the agents: offer until nothing more can be offered (replacing each)
            await self.fill()

    # ---------------------------------------------------------------------------------------- blocks
    async def commandstats(self) -> dict[str, Any]:
        return dict(await self.redis.info("commandstats"))

    @staticmethod
    def server_us(before: dict[str, Any], after: dict[str, Any], command: str = "evalsha") -> tuple[float, int]:
        """(usec, calls) of one command between two ``INFO commandstats``."""
        a, b = after.get(f"cmdstat_{command}", {}), before.get(f"cmdstat_{command}", {})
        return float(a.get("usec", 0)) - float(b.get("usec", 0)), int(a.get("calls", 0)) - int(b.get("calls", 0))

    async def ping_block(self, n: int) -> list[float]:
        times = []
        ping = self.redis.ping
        for _ in range(n):
            check_stop()
            t0 = time.perf_counter()
            await ping()
            times.append(time.perf_counter() - t0)
        return times

    async def evalsha_block(self, n: int) -> tuple[list[float], float]:
        times = []
        script = self.trivial
        start = time.perf_counter()
        for _ in range(n):
            check_stop()
            t0 = time.perf_counter()
            await script()
            times.append(time.perf_counter() - t0)
        return times, time.perf_counter() - start

    async def step(self, probe: Diagnosis | None = None) -> Step:
        """Free one place (not timed), time one assignment, enqueue a replacement (not timed) and, in the busy
        state, make the loop's closing assign (timed apart). ``probe``: also read the server time of each call
        (INFO commandstats before and after, outside the timings) and the queue's head."""
        skipped = await self.free_one(probe)
        head: list[str] = []
        if probe:
            # the queue's members are "iid channel skill" (bridge/router.py)
            head = [str(m).split(" ", 1)[0]
                    for m in await self.redis.zrange(KEY_PREFIX + "queue", 0, self.config.scan_limit - 1)]
            s0 = await self.commandstats()
        t0 = time.perf_counter()
        offers = await self.router.assign(most=1)
        elapsed = time.perf_counter() - t0
        scanned = self.place(offers[0].interaction) if offers else 0
        if probe and len(offers) == 1:
            usec, calls = self.server_us(s0, await self.commandstats())
            if calls == 1:
                probe.server_us.append(usec)
                probe.client_ms.append(elapsed * 1000)
                if offers[0].interaction in head:
                    probe.scanned.append(head.index(offers[0].interaction) + 1)
                    probe.place_mismatch += probe.scanned[-1] != scanned
                    probe.fit_points.append((float(probe.scanned[-1]), usec))
        s0 = await self.commandstats() if probe else {}
        await self.took(offers)
        if probe and offers:
            probe.enqueue_server_us.append(self.server_us(s0, await self.commandstats())[0] / len(offers))
        result = Step(elapsed, len(offers), scanned, skipped=skipped)
        if self.args.state == "busy":
            result.closing, result.extra = await self.fill(probe)
        return result

    async def assign_block(self, n: int) -> tuple[list[Step], float]:
        steps = []
        start = time.perf_counter()
        for _ in range(n):
            check_stop()
            steps.append(await self.step())
        return steps, time.perf_counter() - start

    async def run_round(self, number: int) -> Round:
        n = self.args.count
        r = Round(number)
        mark = machine_jiffies()
        pid = self.server.pid
        ours0, start = cpu_seconds(pid) + time.process_time(), time.monotonic()

        def cpu() -> tuple[float, float]:
            return cpu_seconds(pid), time.process_time()

        # PING
        s0, c0 = await self.commandstats(), cpu()
        times = await self.ping_block(n)
        c1, s1 = cpu(), await self.commandstats()
        o = sorted(times)
        r.ping_p50_ms, r.ping_p99_ms = percentile(o, 50) * 1000, percentile(o, 99) * 1000
        usec, calls = self.server_us(s0, s1, "ping")
        r.ping_server_us = usec / max(1, calls)
        r.cpu_us["ping"] = {"redis": (c1[0] - c0[0]) / n * 1e6, "bench": (c1[1] - c0[1]) / n * 1e6}
        # EVALSHA return 1
        s0, c0 = await self.commandstats(), cpu()
        times, wall = await self.evalsha_block(n)
        c1, s1 = cpu(), await self.commandstats()
        o = sorted(times)
        r.evalsha_per_s = n / wall
        r.evalsha_p50_ms, r.evalsha_p99_ms = percentile(o, 50) * 1000, percentile(o, 99) * 1000
        usec, calls = self.server_us(s0, s1)
        r.evalsha_server_us = usec / max(1, calls)
        r.cpu_us["evalsha"] = {"redis": (c1[0] - c0[0]) / n * 1e6, "bench": (c1[1] - c0[1]) / n * 1e6}
        # assignments
        c0 = cpu()
        steps, wall = await self.assign_block(n)
        c1 = cpu()
        o = sorted(s.elapsed for s in steps)
        r.assign_p50_ms, r.assign_p95_ms = percentile(o, 50) * 1000, percentile(o, 95) * 1000
        r.assign_p99_ms, r.assign_max_ms = percentile(o, 99) * 1000, o[-1] * 1000
        r.assign_per_s = n / sum(o)
        r.cycles_per_s = n / wall
        r.failures = sum(s.offers != 1 for s in steps)
        scanned = sorted(s.scanned for s in steps)
        r.scanned_p50, r.scanned_mean = percentile(scanned, 50), sum(scanned) / n
        closing = sorted(s.closing for s in steps if s.closing is not None)
        if closing:
            r.closing_p50_ms, r.closing_p99_ms = percentile(closing, 50) * 1000, percentile(closing, 99) * 1000
        r.extra_offers = sum(s.extra for s in steps)
        r.skipped_ends = sum(s.skipped for s in steps)
        r.cpu_us["cycle"] = {"redis": (c1[0] - c0[0]) / n * 1e6, "bench": (c1[1] - c0[1]) / n * 1e6}
        r.machine_busy, r.steal = busy_since(mark)
        ours, wall = cpu_seconds(pid) + time.process_time() - ours0, time.monotonic() - start
        r.others_busy = max(0.0, r.machine_busy - ours / (wall * (os.cpu_count() or 1)))
        return r

    async def warm_up(self, n: int) -> None:
        await self.ping_block(min(n, 200))
        await self.evalsha_block(min(n, 200))
        await self.assign_block(n)

    async def diagnose(self, n: int) -> Diagnosis:
        """Server time of each script call alone and how far each assignment scanned."""
        d = Diagnosis(n)
        for _ in range(n):
            check_stop()
            await self.step(d)
        return d


# ------------------------------------------------------------------------------------------------- report
def machine(redis_version: str) -> dict[str, str]:
    return {"nproc": str(os.cpu_count()), "cpu": cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "redis_server": redis_version, "redis_py": redis.__version__,
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def medians(rounds: list[Round]) -> dict[str, float]:
    keys = ("ping_p50_ms", "ping_p99_ms", "ping_server_us", "evalsha_per_s", "evalsha_p50_ms", "evalsha_p99_ms",
            "evalsha_server_us", "assign_p50_ms", "assign_p95_ms", "assign_p99_ms", "assign_max_ms",
            "assign_per_s", "cycles_per_s", "scanned_p50", "scanned_mean", "closing_p50_ms", "closing_p99_ms",
            "extra_offers", "skipped_ends", "machine_busy", "others_busy", "steal")
    out = {k: median([float(getattr(r, k)) for r in rounds]) for k in keys}
    out["p99_ratio"] = out["assign_p99_ms"] / out["ping_p99_ms"] if out["ping_p99_ms"] else math.nan
    out["rate_ratio"] = out["assign_per_s"] / out["evalsha_per_s"] if out["evalsha_per_s"] else math.nan
    return out


def evaluate(rounds: list[Round], quick: bool) -> list[tuple[str, str, str, bool | None]]:
    """(what, figure, target, met); ``None`` = shown, not judged (--quick). Judged on the medians over rounds."""
    m = medians(rounds)
    failures = sum(r.failures for r in rounds)
    count = sum(1 for _ in rounds)
    return [
        ("assignment p99 vs PING p99",
         f"{m['assign_p99_ms']:.3f} ms vs {m['ping_p99_ms']:.3f} ms = {m['p99_ratio']:.1f}x"
         + (f" (median of {count} rounds)" if count > 1 else ""),
         f"<= {TARGET_P99_X:g}x", None if quick else m["p99_ratio"] <= TARGET_P99_X),
        ("assignments/s vs EVALSHA/s",
         f"{m['assign_per_s']:.0f}/s vs {m['evalsha_per_s']:.0f}/s = {m['rate_ratio']:.2f}x",
         f">= {TARGET_RATE_X:g}x", None if quick else m["rate_ratio"] >= TARGET_RATE_X),
        ("assignments that did not make exactly one offer (bench error)", str(failures), "0", failures == 0),
    ]


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def print_report(info: dict[str, Any], rounds: list[Round], diag: Diagnosis | None,
                 targets: list[tuple[str, str, str, bool | None]]) -> None:
    m = info["machine"]
    print(f"\nivr-bridge routing benchmark, {m['date']}: {m['nproc']} x {m['cpu']}, kernel {m['kernel']}, "
          f"Python {m['python']}, Redis {m['redis_server']} (redis-py {m['redis_py']})"
          + (" [--quick]" if info["quick"] else ""))
    print(f"state {info['state']}: {info['agents']} agents (2-3 of {len(SKILLS)} skills, voice 1, chat 4), "
          f"backlog {info['backlog']} ({info['queue_voice']} voice, {info['queue_web']} web), "
          f"{info['in_hand']} in hand; scan_limit {info['scan_limit']}; {info['count']} per block, "
          f"{len(rounds)} rounds; machine {info['busy_before']:.0%} busy ({info['steal_before']:.0%} steal) before, "
          "load average "
          f"{m['load_average']} at the start")
    print()
    header = ("round", "PING p50 ms", "PING p99 ms", "EVALSHA/s", "assign p50 ms", "p95", "p99", "max",
              "assigns/s", "cycles/s", "assign p99 / PING p99", "assigns/s / EVALSHA/s")
    header2 = ("round", "looked at p50 / mean", "closing assign p50 / p99 ms", "extra offers / cycle",
               "ends without offer / cycle", "fails", "machine busy", "others", "steal")
    n = info["count"]

    def row(name: str, v: dict[str, float]) -> tuple[str, ...]:
        return (name, f"{v['ping_p50_ms']:.3f}", f"{v['ping_p99_ms']:.3f}", f"{v['evalsha_per_s']:.0f}",
                f"{v['assign_p50_ms']:.3f}", f"{v['assign_p95_ms']:.3f}", f"{v['assign_p99_ms']:.3f}",
                f"{v['assign_max_ms']:.2f}", f"{v['assign_per_s']:.0f}", f"{v['cycles_per_s']:.0f}",
                f"{v['p99_ratio']:.1f}x", f"{v['rate_ratio']:.2f}x")

    def row2(name: str, v: dict[str, float]) -> tuple[str, ...]:
        return (name, f"{v['scanned_p50']:.0f} / {v['scanned_mean']:.1f}",
                "-" if math.isnan(v["closing_p50_ms"]) else f"{v['closing_p50_ms']:.3f} / {v['closing_p99_ms']:.3f}",
                f"{v['extra_offers'] / n:.2f}",
                f"{v['skipped_ends'] / n:.2f}", f"{v['failures']:.0f}", f"{v['machine_busy']:.0%}",
                f"{v['others_busy']:.0%}", f"{v['steal']:.0%}")

    rows, rows2 = [], []
    for r in rounds:
        v = {k: float(x) for k, x in asdict(r).items() if isinstance(x, int | float)}
        v["p99_ratio"], v["rate_ratio"] = r.p99_ratio, r.rate_ratio
        rows.append(row(str(r.number), v))
        rows2.append(row2(str(r.number), v))
    med = medians(rounds)
    rows.append(row("median", med))
    med["failures"] = sum(r.failures for r in rounds)
    last = list(row2("median", med))
    last[5] += " (sum)"
    rows2.append(tuple(last))
    table(header, rows)
    print()
    table(header2, rows2)
    print()
    for line in (
            "assigns/s: --count / the summed time of the timed assign calls; cycles/s: iterations / the block's",
            "  wall time (ends, the timed assign, the replacement, the closing assigns)",
            "looked at: the offered interaction's place in the queue; closing assign: the router loop's last assign,",
            "  which finds nothing; extra offers: made by the loop's assigns after the timed one",
            "machine busy: all CPUs during the round; others: the same without this bench and its redis-server;",
            "  steal: CPU time the hypervisor gave to other VMs"):
        print("  " + line)
    print(f"  Redis server time a call (INFO commandstats, median): PING {medians(rounds)['ping_server_us']:.1f} us, "
          f"EVALSHA 'return 1' {medians(rounds)['evalsha_server_us']:.1f} us")
    for block, label in (("ping", "PING"), ("evalsha", "EVALSHA"), ("cycle", "assign cycle")):
        redis_us = median([r.cpu_us[block]["redis"] for r in rounds])
        bench_us = median([r.cpu_us[block]["bench"] for r in rounds])
        print(f"  CPU a {label:<12}: redis-server {redis_us:7.1f} us, bench process {bench_us:7.1f} us "
              "(median over rounds; /proc, 10 ms ticks)")
    if diag is not None and diag.server_us:
        s = diag.summary()
        a, c, sc = s["assign_server_us"], s["assign_client_ms"], s["scanned"]
        e, ec = s["empty_assign_server_us"], s["empty_assign_client_ms"]
        print()
        print(f"  diagnosis ({diag.n} more assignments, each alone between two INFO commandstats):")
        print(f"    assign, server time us: p50 {a['p50']:.0f}  p95 {a['p95']:.0f}  p99 {a['p99']:.0f}  "
              f"max {a['max']:.0f}  (client p50 {c['p50']:.3f} ms, p99 {c['p99']:.3f} ms)")
        print(f"    interactions looked at per assignment: p50 {sc['p50']:.0f}  p95 {sc['p95']:.0f}  "
              f"p99 {sc['p99']:.0f}  max {sc['max']:.0f}  mean {sc['mean']:.1f}")
        if "fit_us" in s:
            print(f"    server time ~ {s['fit_us']['fixed']:.0f} us + {s['fit_us']['per_scanned']:.1f} us x "
                  f"interactions looked at ({info['agents']} agents)")
        if e["n"]:
            looked = min(info["scan_limit"], info["backlog"])
            print(f"    the loop's closing assign (nothing to offer; looks at most at {looked}): server p50 "
                  f"{e['p50']:.0f} us, p99 {e['p99']:.0f} us; client p50 {ec['p50']:.3f} ms, p99 {ec['p99']:.3f} ms")
        print(f"    finish server p50 {s['finish_server_us']['p50']:.0f} us, enqueue server p50 "
              f"{s['enqueue_server_us']['p50']:.0f} us"
              + (f"; WARNING: {diag.place_mismatch} places in the queue differ from the bench's count"
                 if diag.place_mismatch else ""))
    print()
    print("target                                                   figure / target / result")
    for what, figure, target, met in targets:
        mark = "PASS" if met else ("-" if met is None else "FAIL")
        print(f"  {mark:4}  {what}: {figure}  [target {target}]")


# ------------------------------------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> int:
    binary = shutil.which("redis-server")
    if binary is None:
        print("bench: redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 3
    workdir = Path(tempfile.mkdtemp(prefix="ivr-bridge-bench-routing-"))
    server = RedisServer(binary, workdir)
    bench: Bench | None = None
    rounds: list[Round] = []
    diag: Diagnosis | None = None
    try:
        await asyncio.to_thread(server.start)
        bench = Bench(args, server)
        version = (await bench.redis.info("server")).get("redis_version", "?")
        info: dict[str, Any] = {"machine": machine(str(version)), "quick": args.quick, "state": args.state,
                                "agents": args.agents, "backlog": args.backlog, "count": args.count,
                                "rounds": args.rounds, "scan_limit": args.scan_limit, "seed": args.seed}
        mark = machine_jiffies()
        await asyncio.sleep(1)
        info["busy_before"], info["steal_before"] = busy_since(mark)
        log(f"redis-server {version} on 127.0.0.1:{server.port}; {args.agents} agents, backlog {args.backlog}, "
            f"state {args.state}")
        await bench.setup()
        channels = Counter(ch for ch, _ in bench.queued.values())
        info.update(queue_voice=channels["voice"], queue_web=channels["web"], in_hand=len(bench.in_hand))
        log(f"warm-up: {args.warmup} assignments")
        await bench.warm_up(args.warmup)
        for k in range(1, args.rounds + 1):
            log(f"round {k}/{args.rounds}: {args.count} PING, {args.count} EVALSHA, {args.count} assignments")
            rounds.append(await bench.run_round(k))
        if args.diag:
            log(f"diagnosis: {args.diag} assignments, one at a time")
            diag = await bench.diagnose(args.diag)
    except (BenchError, redis.RedisError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 3
    finally:
        try:
            if bench is not None:
                with contextlib.suppress(Exception):
                    await bench.aclose()
        finally:   # not awaited: nothing can cancel it
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    targets = evaluate(rounds, args.quick)
    print_report(info, rounds, diag, targets)
    if args.json:
        document = {"info": info, "rounds": [asdict(r) | {"p99_ratio": r.p99_ratio, "rate_ratio": r.rate_ratio}
                                             for r in rounds],
                    "medians": medians(rounds), "diagnosis": diag.summary() if diag else None,
                    "targets": [dict(zip(("what", "figure", "target", "met"), t, strict=True)) for t in targets]}
        with open(args.json, "w", encoding="utf-8") as fh:  # noqa: ASYNC230 - once, after the runs
            json.dump(document, fh, indent=2, default=str)
    if sum(r.failures for r in rounds):
        print("bench: some assignments did not make exactly one offer; the figures are not valid", file=sys.stderr)
        return 3
    return 0 if all(t[3] is not False for t in targets) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=0,
                        help=f"PINGs, EVALSHAs and assignments per block (default 5000; --quick {QUICK['count']})")
    parser.add_argument("--agents", type=int, default=50, help="agents logged in and available (default 50)")
    parser.add_argument("--backlog", type=int, default=200, help="interactions waiting (default 200)")
    parser.add_argument("--rounds", type=int, default=0,
                        help=f"rounds of PING, EVALSHA and assignment blocks; judged on the medians (default 3; "
                             f"--quick {QUICK['rounds']})")
    parser.add_argument("--state", choices=("busy", "idle"), default="busy",
                        help="busy: agents at capacity, each assignment fills the one place just freed (default); "
                             "idle: agents have room, the head of the queue is offered")
    parser.add_argument("--scan-limit", type=int, default=RouterConfig().scan_limit,
                        help="router.scan_limit (queued interactions one assignment looks at)")
    parser.add_argument("--diag", type=int, default=-1,
                        help="assignments measured alone after the rounds (server time, interactions looked at); "
                             f"0: none (default 1000; --quick {QUICK['diag']})")
    parser.add_argument("--warmup", type=int, default=-1,
                        help="assignments before the rounds, not counted (default 1000; --quick 100)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of skills and interactions")
    parser.add_argument("--quick", action="store_true",
                        help="small counts (a few seconds; a smoke test): judges only that every assignment made "
                             "one offer")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not args.count:
        args.count = QUICK["count"] if args.quick else 5000
    if not args.rounds:
        args.rounds = QUICK["rounds"] if args.quick else 3
    if args.warmup < 0:
        args.warmup = QUICK["warmup"] if args.quick else 1000
    if args.diag < 0:
        args.diag = QUICK["diag"] if args.quick else 1000
    if args.count < 1 or args.agents < 1 or args.backlog < 1 or args.rounds < 1:
        parser.error("--count, --agents, --backlog and --rounds must be >= 1")
    if not 1 <= args.scan_limit <= 10000:
        parser.error("--scan-limit must be 1-10000")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(stoppable(run(args)))
    except asyncio.CancelledError:  # SIGTERM / SIGINT: redis-server was stopped and its folder removed
        print("bench: stopped by a signal", file=sys.stderr)
        return 128 + signal.SIGTERM


async def stoppable(main: Any) -> int:
    """Run ``main``; SIGTERM and SIGINT cancel it, so that its clean-up (redis-server, the temp folder) runs."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def stop() -> None:
        Stop.requested = True
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        return int(await main)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
