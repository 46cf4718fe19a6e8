"""Composition root of ``ivr-bridge run``: start the parts in dependency order, close them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bridge import db
from bridge.config import Config
from bridge.events import EventBus
from bridge.store import InteractionStore
from ivr.ami import AmiClient, AmiSettings
from ivr.engine import FlowRegistry, IvrEngine
from ivr.flow import FlowError, Problem
from ivr.prompts import PromptLibrary

log = logging.getLogger(__name__)


@dataclass
class App:
    """The running product. ``start`` brings it up; ``aclose`` takes it down, calls handed to the dialplan."""

    config: Config
    store: InteractionStore = field(init=False)
    bus: EventBus = field(init=False)
    prompts: PromptLibrary = field(init=False)
    flows: FlowRegistry = field(init=False)
    ami: AmiClient = field(init=False)
    engine: IvrEngine = field(init=False)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        cfg = self.config
        self.store = InteractionStore(cfg.database_url)
        self.bus = EventBus(cfg.redis.url or None, cfg.redis.events_channel)
        self.prompts = PromptLibrary(cfg.tts, cfg.asterisk)
        self.flows = FlowRegistry(cfg.flows.paths, cfg.flows.default_flow, self.prompts)
        ast = cfg.asterisk
        self.ami = AmiClient(AmiSettings(host=ast.host, port=ast.ami_port, username=ast.ami_user,
                                         secret=ast.ami_secret, timeout=ast.ami_timeout,
                                         keepalive_interval=ast.heartbeat_interval,
                                         reconnect_max_delay=ast.reconnect_max_delay))
        self.engine = IvrEngine(cfg, self.ami, self.flows, self.store, self.prompts, self.bus)

    def load_flows(self) -> list[Problem]:
        """Load flows or raise FlowError naming every error (run refuses to start on a broken flow)."""
        problems = self.flows.load()
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise FlowError(errors)
        return problems

    async def start(self, wait_for_asterisk: float | None = None) -> None:
        for problem in self.load_flows():
            log.warning("%s", problem)
        if not self.config.asterisk.ami_secret:
            raise RuntimeError("no AMI secret configured (run `ivr-bridge setup-secrets` or set "
                               "IVR_BRIDGE__ASTERISK__AMI_SECRET)")
        await db.upgrade(self.config.database_url)
        await self._start(self.store.start, self.store.aclose)
        await self._start(self.bus.start, self.bus.aclose)
        await asyncio.to_thread(self.prompts.build, self.flows.flows.values(), False)
        self._closers.append(self._close_prompts)
        await self._start(self.engine.start, self.engine.aclose)
        await self._start(self.ami.start, self.ami.aclose)
        await self._start(lambda: self.flows.start(self.config.flows.reload_interval), self.flows.aclose)
        if wait_for_asterisk:
            await self.ami.wait_connected(wait_for_asterisk)

    async def _close_prompts(self) -> None:
        await asyncio.to_thread(self.prompts.close)

    async def _start(self, start: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]) -> None:
        await start()
        self._closers.append(close)

    async def aclose(self, release_calls: bool = True) -> None:
        """Stop. Calls still in the IVR go to the dialplan fallback, or with ``release_calls=False`` (a restart)
        stay in AsyncAGI for the next ivr-bridge to resume."""
        # The engine must hand calls back while AMI is still up, so it closes before the AMI link.
        closers, self._closers = self._closers, []
        engine_close = self.engine.aclose
        if engine_close in closers:
            closers.remove(engine_close)
            await self.engine.aclose(release_calls)
        for close in reversed(closers):
            try:
                await close()
            except Exception:
                log.exception("error while closing %s", close)


async def serve(config: Config) -> None:
    """Run until SIGINT/SIGTERM; SIGHUP reloads the flows."""
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reload_tasks: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = asyncio.create_task(app.flows.reload())
        reload_tasks.add(task)
        task.add_done_callback(reload_tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await app.start()
    # Everything loaded so far (SQLAlchemy, Alembic, pydantic, flows) lives as long as the process: keep it out
    # of the garbage collector's full passes, which otherwise stall every call for ~100 ms now and then.
    gc.freeze()
    log.info("ivr-bridge running: AMI %s:%s, database %s", config.asterisk.host, config.asterisk.ami_port,
             config.database_url.split("://")[0])
    try:
        await stop.wait()
    finally:
        log.info("ivr-bridge stopping")
        for task in reload_tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await app.aclose()
