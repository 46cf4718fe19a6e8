"""Composition root of ``ivr-bridge run``: start the parts in dependency order, close them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bridge import db
from bridge.agents import AgentDirectory
from bridge.chat import ChatService
from bridge.config import Config
from bridge.events import EventBus
from bridge.followups import FollowUpService
from bridge.links import LinkSigner
from bridge.outbox import Dispatcher, Gateway, Outbox, RecipientPolicy
from bridge.queue_log import QueueLog
from bridge.ratelimit import RateLimiter
from bridge.router import Router
from bridge.store import InteractionStore
from ivr.ami import AmiClient, AmiSettings
from ivr.callback import CallbackDialer
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
    limiter: RateLimiter = field(init=False)
    followups: FollowUpService = field(init=False)
    outbox: Outbox = field(init=False)
    dispatcher: Dispatcher | None = field(init=False, default=None)
    web: Any = field(init=False, default=None)
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
        self.limiter = RateLimiter(cfg.redis.url)
        self.router = Router(cfg.redis.url, cfg.router, self.bus)
        self.queue_log = QueueLog(cfg.redis.url, cfg.router, self.store)
        self.chat = ChatService(self.store, cfg.redis.url, self.router, channel=cfg.redis.events_channel + ":chat",
                                skill=cfg.web.chat_skill)
        if len(cfg.links.secret) < 16:
            raise RuntimeError("no link secret configured (run `ivr-bridge setup-secrets` or set "
                               "IVR_BRIDGE__LINKS__SECRET)")
        self.followups = FollowUpService(lambda: self.flows.catalogue, LinkSigner(cfg.links.secret),
                                         self._policies(), cfg.web.public_url, dt.timedelta(days=cfg.links.ttl_days))
        self.outbox = Outbox(self.store, self.bus)
        if cfg.outbox.enabled:
            self.dispatcher = Dispatcher(self.outbox, self._gateways(), cfg.outbox)
        self.agents = AgentDirectory(self.store)
        self.callbacks = CallbackDialer(self.ami, self.router, self.agents, self.store, cfg.asterisk,
                                        cfg.flows.default_region)
        self.engine = IvrEngine(cfg, self.ami, self.flows, self.store, self.prompts, self.bus, self.followups,
                                self.wake_dispatcher, self.router, self.agents, self.callbacks)

    def wake_dispatcher(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def _policies(self) -> dict[str, RecipientPolicy]:
        cfg = self.config
        out: dict[str, RecipientPolicy] = {}
        if cfg.sms.gateway != "none":
            from sms.policy import SmsPolicy

            out["sms"] = SmsPolicy(cfg.sms, self.limiter)
        if cfg.email.gateway != "none":
            from email_out.address import EmailPolicy

            out["email"] = EmailPolicy(cfg.email, self.limiter)
        return out

    def _gateways(self) -> list[Gateway]:
        return gateways(self.config)

    def _web(self) -> Any:
        from online_chat import WebServer, WebServices

        verify = None
        if self.config.sms.gateway == "kannel":
            from sms.kannel import parse_dlr

            secret = self.config.links.secret

            def verify(query: Any) -> tuple[str, str, str | None]:
                report = parse_dlr(query, secret=secret)  # ValueError unless signed by us
                return report.followup_id, report.status, report.gateway_ref

        return WebServer(WebServices(config=self.config, store=self.store, outbox=self.outbox,
                                     followups=self.followups, catalogue=lambda: self.flows.catalogue,
                                     signer=self.followups.signer, limiter=self.limiter, verify_dlr=verify,
                                     dev_inbox=self.dev_inbox if self.config.web.dev_pages else None,
                                     on_enqueued=self.wake_dispatcher, router=self.router, bus=self.bus,
                                     agents=self.agents, chat=self.chat))

    async def dev_inbox(self) -> dict[str, list[dict[str, Any]]]:
        """What the dev sinks received: the fake SMSC's messages and the dev mail sink's files."""
        return await asyncio.to_thread(dev_inbox, self.config)

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
        await self._start(self.limiter.start, self.limiter.aclose)
        await self._start(self.router.start, self.router.aclose)
        await self._start(self.queue_log.start, self.queue_log.aclose)
        await self._start(self.chat.start, self.chat.aclose)
        await asyncio.to_thread(self.prompts.build, self.flows.flows.values(), False)
        self._closers.append(self._close_prompts)
        await self._start(self.engine.start, self.engine.aclose)
        await self._start(self.ami.start, self.ami.aclose)
        await self._start(self.callbacks.start, self.callbacks.aclose)
        await self._start(lambda: self.flows.start(self.config.flows.reload_interval), self.flows.aclose)
        if self.dispatcher is not None:
            await self._start(self.dispatcher.start, self.dispatcher.aclose)
        if self.config.web.port:
            self.web = self._web()
            await self._start(self.web.start, self.web.aclose)
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


def gateways(config: Config) -> list[Gateway]:
    """The gateways the configuration asks for (``ivr-bridge run`` and ``ivr-bridge outbox dispatch``)."""
    out: list[Gateway] = []
    if config.sms.gateway == "kannel":
        from sms.kannel import KannelGateway

        out.append(KannelGateway(config.sms, config.web.public_url, config.links.secret))
    elif config.sms.gateway == "http":
        from sms.http_gateway import HttpSmsGateway

        out.append(HttpSmsGateway(config.sms))
    if config.email.gateway == "smtp":
        from email_out.smtp import SmtpGateway

        out.append(SmtpGateway(config.email))
    return out


def dev_inbox(config: Config) -> dict[str, list[dict[str, Any]]]:
    from email_out.devsink import read_mailbox
    from sms.kannel_proc import KannelInstance

    sms = [{"from": m[0], "to": m[1], "text": m[2]} for m in KannelInstance(config).received()]
    mail_dir = config.email.dev_sink_dir or config.general.var_dir / "dev-mail"
    mails = [{"to": m.to, "subject": m.subject, "text": m.text, "message_id": m.message_id}
             for m in read_mailbox(mail_dir)] if mail_dir.exists() else []
    return {"sms": sms[-50:], "mail": mails[-50:]}


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
