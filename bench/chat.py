"""Benchmark of the visitor web chat: N concurrent websocket visitors on one process of the product's web app,
against a bare aiohttp websocket echo server under the same client load, measured in the same run.

    .venv/bin/python bench/chat.py [--visitors 2000] [--interval 5] [--duration 30] [--db URL] [--quick]
                                   [--json F]

Parts, all on loopback, started and stopped by the bench (also on Ctrl-C / SIGTERM):

* a private ``redis-server`` (no persistence) on a free port (``RedisServer`` of bench/routing.py);
* the server under test, a subprocess of this script (``bench/chat.py serve``), one event loop:
  - ``echo``: a bare aiohttp app whose ``/ws`` sends every text frame back (the same WebSocketResponse options
    as the chat: no compression, 16 KiB frames, 25 s heartbeat);
  - ``chat``: the product's web app (``online_chat.WebServer``) with the real ``ChatService``, ``Router`` and
    rate limiter on that Redis and a fresh SQLite file (``--db postgresql+asyncpg://...``: a private schema of that
    database, dropped afterwards); logging at WARNING, ``gc.freeze()`` after start as ``ivr-bridge run`` does;
* this process: the visitors (one aiohttp ``ClientSession``, one websocket each) and, in the chat phase, the
  agents' side: a second ``ChatService`` (another "process" on the same Redis and database) following every chat
  with a ``Feed``, as the agent desktop will.

Each phase: connect the visitors (a chat phase first starts their chats with ``POST /chat/start``), wait 3 s idle
and read the server's RSS (memory per idle connection = RSS delta since before connecting / visitors), then every
visitor sends a message (``{"type": "msg", "cid", "text"}``, ~60 characters) at exponential intervals of mean
``--interval`` seconds (2000 visitors / 5 s = 400 messages/s in all) for ``--duration`` seconds, then waits
3 s for answers still on their way. The first ``--warmup`` seconds are not counted.

Latencies, from ``send_str`` of the visitor's frame (one clock: this process):

* **echo**: until the same frame comes back on the visitor's socket (bare echo server);
* **relay** (the target): until the agents' side in this process gets the message from its ``Feed``: through the
  chat app (frame parsed, rate limit checked in Redis, stored with its number in a group commit), Redis pub/sub to
  the other process, and the feed. This is what an agent's screen waits for;
* **ack**: until the visitor's socket gets the ``ack`` (stored);
* **own echo**: until the visitor's socket gets the stored ``msg`` frame back (the path to every socket of the
  chat on the same process).

Target: relay p99 <= 3 x echo p99. Exit status 0 when met, 1 when missed, 3 when the bench could not run or
messages were lost (never answered).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
for folder in (PROJECT_DIR, BENCH_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from benchlib import BenchError, cpu_model, cpu_seconds, free_port, log, stop_process, wait_tcp  # noqa: E402
from routing import RedisServer, busy_since, machine_jiffies, percentile, stoppable  # noqa: E402

from bridge import db  # noqa: E402
from bridge.chat import ChatService  # noqa: E402
from bridge.config import Config, RouterConfig  # noqa: E402
from bridge.router import Router  # noqa: E402
from bridge.store import InteractionStore  # noqa: E402
from online_chat.chat import HEARTBEAT, MAX_FRAME, chat_tokens  # noqa: E402

SECRET = "bench-chat-link-secret-0123456789"
CHANNEL = "bench-chat"
TARGET_X = 3.0            # relay p99 <= 3 x echo p99
QUICK = {"visitors": 50, "interval": 1.0, "duration": 5.0, "warmup": 1.0}
TEXT = "Hello, I would like to know where my parcel is. Order 12345678"
CONNECT_AT_ONCE = 100     # connection attempts in flight (the server's listen backlog is 128)


# ------------------------------------------------------------------------------------------------ the server
def server_config(db_url: str, redis_url: str, port: int, prefix: str) -> Config:
    config = Config()
    config.database.url = db_url
    config.redis.url = redis_url
    config.links.secret = SECRET
    config.web.host = "127.0.0.1"
    config.web.port = port
    config.web.public_url = f"http://127.0.0.1:{port}"
    config.web.dev_pages = False
    config.web.chat_starts_per_hour = 10**9     # every visitor comes from 127.0.0.1
    config.web.chat_messages_per_hour = 10**9
    config.router = RouterConfig(key_prefix=prefix)
    return config


async def serve_chat(port: int, redis_url: str, db_url: str, prefix: str, stats: str) -> None:
    """The product's web app with the chat, as ``ivr-bridge run`` would build it (no IVR, no outbox dispatch)."""
    from bridge.catalogue import load_catalogue
    from bridge.followups import FollowUpService
    from bridge.links import LinkSigner
    from bridge.outbox import Outbox
    from bridge.ratelimit import RateLimiter
    from online_chat import WebServer, WebServices

    config = server_config(db_url, redis_url, port, prefix)
    catalogue, _ = load_catalogue([PROJECT_DIR / "flows"])
    store = InteractionStore(db_url)
    limiter = RateLimiter(redis_url, prefix="bench-chat:limit")
    router = Router(redis_url, config.router)
    chat = ChatService(store, redis_url, router, channel=CHANNEL, skill=config.web.chat_skill)
    signer = LinkSigner(SECRET)
    services = WebServices(config=config, store=store, outbox=Outbox(store), catalogue=lambda: catalogue,
                           followups=FollowUpService(lambda: catalogue, signer, {}, config.web.public_url,
                                                     dt.timedelta(days=1)),
                           signer=signer, limiter=limiter, router=router, chat=chat)
    server = WebServer(services)
    started = []
    try:
        for part in (store, limiter, router, chat, server):
            await part.start()
            started.append(part)
        await serve_until_stopped(stats)
    finally:
        for part in reversed(started):
            await part.aclose()


async def serve_echo(port: int, stats: str) -> None:
    """A bare aiohttp websocket echo server (the same socket options as the chat's)."""
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_FRAME, compress=False)
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await serve_until_stopped(stats)
    finally:
        await runner.cleanup()


class LoopStats:
    """How late a 10 ms sleep wakes up (the event loop's lag: what every socket waits for) and how long the
    garbage collector's passes take. In the server: reset by SIGUSR1 (the counted part of the load begins), written
    as JSON at the end; in this process: for the counted part."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.pauses: list[tuple[int, float]] = []
        self._gc_start = 0.0

    def reset(self) -> None:
        self.lags.clear()
        self.pauses.clear()

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._gc_start))

    async def sample(self) -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - began - 0.01)

    def figures(self) -> dict[str, float]:
        lags = sorted(self.lags)
        full = [d for generation, d in self.pauses if generation == 2]
        figures = {"lag_p50_ms": percentile(lags, 50) * 1000, "lag_p99_ms": percentile(lags, 99) * 1000,
                   "lag_max_ms": (lags[-1] if lags else 0) * 1000, "gc_passes": len(self.pauses),
                   "gc_full_passes": len(full), "gc_max_ms": max((d for _, d in self.pauses), default=0) * 1000,
                   "gc_full_max_ms": max(full, default=0) * 1000}
        return {name: round(value, 2) for name, value in figures.items()}

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[LoopStats]:
        gc.callbacks.append(self.on_gc)
        sampler = asyncio.create_task(self.sample())
        try:
            yield self
        finally:
            sampler.cancel()
            await asyncio.wait({sampler})
            gc.callbacks.remove(self.on_gc)


async def serve_until_stopped(stats_path: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stats = LoopStats()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, stats.reset)
    gc.freeze()   # as ``ivr-bridge run`` does after start-up
    async with stats.watching():
        print("ready", flush=True)
        await stop.wait()
    with open(stats_path, "w", encoding="utf-8") as fh:  # noqa: ASYNC230 - once, as the server stops
        json.dump(stats.figures(), fh)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_fd_limit()
    if args.mode == "echo":
        asyncio.run(serve_echo(args.port, args.stats))
    else:
        asyncio.run(serve_chat(args.port, args.redis, args.db, args.prefix, args.stats))
    return 0


class Server:
    """``bench/chat.py serve`` as a subprocess; its RSS and CPU from /proc."""

    def __init__(self, mode: str, redis_url: str, db_url: str, prefix: str, workdir: Path) -> None:
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, str(Path(__file__).resolve()), "serve", "--mode", mode, "--port",
                     str(self.port), "--redis", redis_url, "--db", db_url, "--prefix", prefix]
        self.log_path = workdir / f"server-{mode}.log"
        self.stats_path = workdir / f"server-{mode}-loop.json"
        self.args += ["--stats", str(self.stats_path)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log_file, cwd=PROJECT_DIR,
                                         start_new_session=True)
        try:
            wait_tcp(self.port, 30)
        except BenchError:
            self.stop()
            raise BenchError(f"the {self.mode} server did not start; see {self.log_path}") from None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, 15)

    def rss(self) -> int:
        """Resident memory in bytes."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise BenchError("no VmRSS")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid if self.proc else None)

    def reset_stats(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGUSR1)

    def stats(self) -> dict[str, float]:
        """The server's loop lag and GC figures since reset_stats() (written when it stopped)."""
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {}


# ------------------------------------------------------------------------------------------------ the clients
@dataclass
class Phase:
    mode: str                              # echo | chat
    visitors: int = 0
    connected: int = 0
    connect_seconds: float = 0.0
    rss_before_mb: float = 0.0
    rss_idle_mb: float = 0.0
    kib_per_idle_connection: float = 0.0
    sent: int = 0                          # counted messages (after the warm-up)
    rate: float = 0.0                      # messages/s sent while counted
    server_cpu: float = 0.0                # cores used by the server process while counted
    machine_busy: float = 0.0
    steal: float = 0.0
    lost: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    server_loop: dict[str, float] = field(default_factory=dict)   # the server's event loop lag and GC pauses
    client_loop: dict[str, float] = field(default_factory=dict)   # the same in this process (the visitors)

    def add(self, name: str, values: list[float]) -> None:
        ordered = sorted(values)
        self.latency_ms[name] = {"count": len(ordered), "p50": round(percentile(ordered, 50) * 1000, 3),
                                 "p90": round(percentile(ordered, 90) * 1000, 3),
                                 "p99": round(percentile(ordered, 99) * 1000, 3),
                                 "max": round((ordered[-1] if ordered else float("nan")) * 1000, 3)}


class Load:
    """The visitors of one phase and what they measured (timestamps of this process's monotonic clock)."""

    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args = args
        self.server = server
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.tokens: list[str] = []
        self.sent_at: dict[str, float] = {}             # cid -> when sent (counted messages only)
        self.got: dict[str, dict[str, float]] = {"echo": {}, "ack": {}, "own echo": {}, "relay": {}}
        self.counting = False
        self.readers: list[asyncio.Task[None]] = []

    async def aclose(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        await self.http.close()

    async def start_chats(self) -> None:
        gate = asyncio.Semaphore(CONNECT_AT_ONCE)

        async def one() -> str:
            async with gate, self.http.post(f"{self.server.url}/chat/start", json={"lang": "en"},
                                            headers={"Origin": self.server.url}) as response:
                if response.status != 201:
                    raise BenchError(f"/chat/start answered {response.status}: {await response.text()}")
                return str((await response.json())["token"])

        self.tokens = list(await asyncio.gather(*(one() for _ in range(self.args.visitors))))

    async def connect(self) -> None:
        gate = asyncio.Semaphore(CONNECT_AT_ONCE)
        base = self.server.url.replace("http", "ws", 1)

        async def one(i: int) -> aiohttp.ClientWebSocketResponse:
            path = f"{base}/ws" if self.server.mode == "echo" else f"{base}/chat/ws?t={self.tokens[i]}&after=0"
            async with gate:
                return await self.http.ws_connect(path, headers={"Origin": self.server.url}, heartbeat=None,
                                                  max_msg_size=MAX_FRAME)

        self.sockets = list(await asyncio.gather(*(one(i) for i in range(self.args.visitors))))
        self.readers = [asyncio.create_task(self.read(ws)) for ws in self.sockets]

    async def read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        echo = self.server.mode == "echo"
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            frame = json.loads(message.data)
            cid = frame.get("cid")
            if cid not in self.sent_at:
                continue   # not counted (warm-up) or not a message of ours
            kind = "echo" if echo else {"ack": "ack", "msg": "own echo"}.get(frame["type"])
            if kind is not None:
                self.got[kind].setdefault(cid, now)

    def relayed(self, cid: str | None) -> None:
        """The agents' side got a message (called from its feeds)."""
        if cid in self.sent_at:
            self.got["relay"].setdefault(cid, time.monotonic())

    async def visitor(self, index: int, ws: aiohttp.ClientWebSocketResponse, until: float) -> None:
        """Messages at exponential intervals (all visitors together: a Poisson stream) until ``until``."""
        rng = random.Random(index)
        n = 0
        next_at = time.monotonic() + rng.expovariate(1 / self.args.interval)
        while next_at < until:
            await asyncio.sleep(next_at - time.monotonic())
            n += 1
            cid = f"v{index}-{n}"
            data = json.dumps({"type": "msg", "cid": cid, "text": TEXT})
            if self.counting:
                self.sent_at[cid] = time.monotonic()
            await ws.send_str(data)
            next_at += rng.expovariate(1 / self.args.interval)


async def run_phase(args: argparse.Namespace, mode: str, redis_url: str, db_url: str, workdir: Path) -> Phase:
    prefix = f"bench-chat:{{router-{mode}}}:"
    server = Server(mode, redis_url, db_url, prefix, workdir)
    phase = Phase(mode, visitors=args.visitors)
    agents: ChatService | None = None
    stack = contextlib.AsyncExitStack()
    server.start()
    try:
        load = Load(args, server)
        stack.push_async_callback(load.aclose)
        if mode == "chat":
            log(f"chat: starting {args.visitors} chats (POST /chat/start)")
            await load.start_chats()
            agents = await stack.enter_async_context(agent_side(db_url, redis_url, prefix))
        await asyncio.sleep(1)
        gc.collect()
        rss_before = server.rss()
        log(f"{mode}: connecting {args.visitors} websockets")
        began = time.monotonic()
        await load.connect()
        phase.connected = len(load.sockets)
        phase.connect_seconds = round(time.monotonic() - began, 2)
        if agents is not None:   # the agents' side follows every chat
            for token in load.tokens:
                await stack.enter_async_context(follow(agents, chat_tokens(SECRET).verify(token)[0], load))
        await asyncio.sleep(3)   # idle: handshakes done, first frames sent (the chat's state and history)
        rss_idle = server.rss()
        phase.rss_before_mb = round(rss_before / 2**20, 1)
        phase.rss_idle_mb = round(rss_idle / 2**20, 1)
        phase.kib_per_idle_connection = round((rss_idle - rss_before) / 1024 / max(1, phase.connected), 1)
        log(f"{mode}: {phase.connected} connected in {phase.connect_seconds} s; RSS {phase.rss_before_mb} -> "
            f"{phase.rss_idle_mb} MiB ({phase.kib_per_idle_connection} KiB a connection); load for "
            f"{args.duration:.0f} s, a message every {args.interval:g} s per visitor")
        start = time.monotonic()
        until = start + args.duration
        visitors = [asyncio.create_task(load.visitor(i, ws, until)) for i, ws in enumerate(load.sockets)]
        await asyncio.sleep(args.warmup)
        load.counting = True
        server.reset_stats()
        counted_from, cpu_from, machine_from = time.monotonic(), server.cpu(), machine_jiffies()
        async with LoopStats().watching() as client_loop:
            await asyncio.gather(*visitors)
        phase.client_loop = client_loop.figures()
        counted = time.monotonic() - counted_from
        phase.server_cpu = round((server.cpu() - cpu_from) / counted, 3)
        phase.machine_busy, phase.steal = (round(x, 3) for x in busy_since(machine_from))
        load.counting = False
        await asyncio.sleep(3)   # answers on their way
        phase.sent = len(load.sent_at)
        phase.rate = round(phase.sent / counted, 1)
        for name, got in load.got.items():
            if (name == "echo") != (mode == "echo"):
                continue
            phase.add(name, [at - load.sent_at[cid] for cid, at in got.items()])
            phase.lost[name] = phase.sent - len(got)
    finally:
        try:
            await stack.aclose()
        finally:
            server.stop()
    phase.server_loop = server.stats()
    return phase


@contextlib.asynccontextmanager
async def agent_side(db_url: str, redis_url: str, prefix: str) -> AsyncIterator[ChatService]:
    """Another process's ChatService on the same database and Redis (the agent desktop's view)."""
    store = InteractionStore(db_url)
    await store.start()
    router = Router(redis_url, RouterConfig(key_prefix=prefix))
    chat = ChatService(store, redis_url, router, channel=CHANNEL)
    try:
        await chat.start()
        yield chat
    finally:
        await chat.aclose()
        await router.aclose()
        await store.aclose()


@contextlib.asynccontextmanager
async def follow(agents: ChatService, interaction_id: str, load: Load) -> AsyncIterator[None]:
    """One agent-side feed of one chat, consumed by a task, for the length of the phase."""
    feed = agents.feed(interaction_id)

    async def consume() -> None:
        async for event in feed:
            if event.kind == "msg" and event.message is not None:
                load.relayed(event.message.client_id)

    task = asyncio.create_task(consume())
    try:
        yield
    finally:
        feed.close()   # the task's loop ends
        await task


# ------------------------------------------------------------------------------------------------ the run
def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.asynccontextmanager
async def database(url: str, workdir: Path) -> AsyncIterator[str]:
    """A fresh SQLite file, or a private schema of the PostgreSQL database at ``url`` (dropped afterwards)."""
    if not url:
        path = workdir / "chat.db"
        yield f"sqlite+aiosqlite:///{path}"
        return
    from tests.conftest import pg_schema

    async with pg_schema(url) as schema_url:
        yield schema_url


async def run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    need = 2 * args.visitors + 200
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        raise BenchError(f"the open files limit is below {need}; raise it (ulimit -n)")
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    redis_server = RedisServer(binary, workdir)
    phases: list[Phase] = []
    try:
        redis_server.start()
        async with database(args.db, workdir) as db_url:
            await db.upgrade(db_url)
            log(f"redis-server on 127.0.0.1:{redis_server.port}; database {db_url.split('://')[0]}")
            for mode in ("echo", "chat"):
                phases.append(await run_phase(args, mode, redis_server.url, db_url, workdir))
    finally:
        redis_server.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    echo, chat = phases
    ratio = chat.latency_ms["relay"]["p99"] / echo.latency_ms["echo"]["p99"]
    report(args, echo, chat, ratio)
    if args.json:
        info = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpu": cpu_model(),
                "cpus": os.cpu_count(), "python": platform.python_version(), "args": vars(args)}
        document = {"info": info, "phases": [asdict(p) for p in phases],
                    "relay_p99_over_echo_p99": round(ratio, 2), "target": TARGET_X}
        with open(args.json, "w", encoding="utf-8") as fh:  # noqa: ASYNC230 - once, after the runs
            json.dump(document, fh, indent=2)
    if any(phase.lost.get(name) for phase in phases for name in phase.lost):
        print("bench: messages were lost (never answered): the figures are not valid", file=sys.stderr)
        return 3
    return 0 if ratio <= TARGET_X or args.quick else 1


def report(args: argparse.Namespace, echo: Phase, chat: Phase, ratio: float) -> None:
    print(f"\nchat bench: {args.visitors} visitors, a message every {args.interval:g} s each (mean), "
          f"{args.duration:g} s ({args.warmup:g} s warm-up), database {'PostgreSQL' if args.db else 'SQLite'}")
    print(f"{'phase':<6} {'latency':<9} {'count':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'lost':>5}")
    for phase in (echo, chat):
        for name, figures in phase.latency_ms.items():
            print(f"{phase.mode:<6} {name:<9} {figures['count']:>7} {figures['p50']:>8.2f} {figures['p90']:>8.2f} "
                  f"{figures['p99']:>8.2f} {figures['max']:>8.2f} {phase.lost[name]:>5}")
    for phase in (echo, chat):
        print(f"{phase.mode}: {phase.rate:.0f} messages/s, server {phase.server_cpu:.2f} cores, machine "
              f"{phase.machine_busy:.0%} busy ({phase.steal:.0%} steal); connect {phase.connect_seconds} s; "
              f"RSS {phase.rss_before_mb} -> {phase.rss_idle_mb} MiB = {phase.kib_per_idle_connection} KiB per "
              f"idle connection")
    for phase in (echo, chat):
        for where, loop in (("server", phase.server_loop), ("clients", phase.client_loop)):
            if loop:
                print(f"{phase.mode} {where}: event loop lag p50 {loop['lag_p50_ms']} / p99 {loop['lag_p99_ms']} / "
                      f"max {loop['lag_max_ms']} ms; {loop['gc_passes']} GC passes, longest {loop['gc_max_ms']} ms "
                      f"({loop['gc_full_passes']} full, longest {loop['gc_full_max_ms']} ms)")
    verdict = "met" if ratio <= TARGET_X else "NOT met"
    print(f"relay p99 / echo p99 = {chat.latency_ms['relay']['p99']:.2f} / {echo.latency_ms['echo']['p99']:.2f} ms "
          f"= {ratio:.2f}x (target <= {TARGET_X:g}x: {verdict})")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        parser = argparse.ArgumentParser(prog="bench/chat.py serve")
        parser.add_argument("serve")
        parser.add_argument("--mode", choices=("echo", "chat"), required=True)
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--redis", required=True)
        parser.add_argument("--db", required=True)
        parser.add_argument("--prefix", required=True)
        parser.add_argument("--stats", required=True)
        return serve(parser.parse_args())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, help="concurrent websocket visitors (default 2000; --quick 50)")
    parser.add_argument("--interval", type=float, help="mean seconds between one visitor's messages (default 5)")
    parser.add_argument("--duration", type=float, help="seconds of load per phase (default 30)")
    parser.add_argument("--warmup", type=float, help="seconds at the start of the load not counted (default 5)")
    parser.add_argument("--db", default="", help="PostgreSQL URL (postgresql+asyncpg://...): a private schema of "
                                                 "it; default: a fresh SQLite file")
    parser.add_argument("--quick", action="store_true", help="tiny numbers (a smoke test); the target is not judged")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (server logs, SQLite file)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    defaults = QUICK if args.quick else {"visitors": 2000, "interval": 5.0, "duration": 30.0, "warmup": 5.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.visitors < 1 or args.interval <= 0 or args.duration <= args.warmup or args.warmup < 0:
        parser.error("--visitors >= 1, --interval > 0, --duration > --warmup >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(stoppable(run(args)))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 3
    except asyncio.CancelledError:   # SIGTERM / SIGINT: the servers were stopped and the temp folder removed
        print("bench: stopped by a signal", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
