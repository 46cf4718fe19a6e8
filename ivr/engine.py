"""The IVR engine: one asyncio task per call running its flow over AsyncAGI.

AMI events become per-call queues (panoramisk's ``call_manager`` habit); each call's task runs nodes until the flow
ends, the caller hangs up or the call leaves for the dialplan. A lost AMI link replays the current node once the
link is back; after any (re)connect the engine asks Asterisk which channels sit in AsyncAGI and adopts those it does
not know (e.g. after an ivr-bridge restart), resuming at the node they were in.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import phonenumbers
from panoramisk.message import Message

from bridge.agents import AgentDirectory
from bridge.catalogue import Catalogue
from bridge.config import Config
from bridge.events import EventBus
from bridge.followups import FollowUpService, Prepared, followup_key
from bridge.models import Outcome
from bridge.router import Router
from bridge.store import InteractionStore, StepRecord, step_rows
from ivr import safe
from ivr.agi import AgiChannel, AgiCommandError, CallHangup, LinkLost, parse_env
from ivr.ami import AmiClient, AmiError
from ivr.callback import CallbackDialer
from ivr.flow import Flow, FlowSet, Problem, load_flow_set
from ivr.prompts import PromptLibrary, flow_texts

log = logging.getLogger(__name__)

ENTRY_CONTEXT = "ivr-entry"
FALLBACK = ("ivr-fallback", "s")
LINK_WAIT = 60.0


class CallLog(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[call {self.extra['call']}] {msg}", kwargs  # type: ignore[index]


# ------------------------------------------------------------------------------------------------- flows
class FlowRegistry:
    """The flows in service. A reload that has errors is refused and the previous version keeps serving."""

    def __init__(self, paths: list[Path], default_flow: str, prompts: PromptLibrary | None = None) -> None:
        self.paths = paths
        self.default_flow = default_flow
        self.prompts = prompts
        self.flows: dict[str, Flow] = {}
        self.catalogue: Catalogue | None = None
        self.by_number: dict[str, Flow] = {}
        self._mtimes: dict[Path, float] = {}
        self._task: asyncio.Task[None] | None = None

    def load(self) -> list[Problem]:
        """Load all flows (at start-up). Returns every problem; on errors nothing changes."""
        found = load_flow_set(self.paths)
        if not self._errors(found.flows, found.problems):
            self._install(found)
        return found.problems

    async def reload(self) -> bool:
        """Reload from disk; prompts of the new version are rendered before it goes live."""
        found = await asyncio.to_thread(load_flow_set, self.paths)
        flows = found.flows
        errors = self._errors(flows, found.problems)
        if errors:
            self._mtimes = self._scan()  # do not retry the same broken files every interval
            for problem in errors:
                log.error("flow reload refused, previous version keeps serving: %s", problem)
            return False
        if self.prompts is not None:
            for language, text in set(flow_texts(flows.values())):
                await self.prompts.ensure(text, language)
        self._install(found)
        log.info("flows reloaded: %s", ", ".join(sorted(flows)))
        return True

    def _errors(self, flows: dict[str, Flow], problems: list[Problem]) -> list[Problem]:
        errors = [p for p in problems if p.severity == "error"]
        if not errors and self.default_flow not in flows:
            errors.append(Problem(str(self.paths[0]), 1, 1, "error",
                                  f"default flow '{self.default_flow}' was not found"))
        return errors

    def _install(self, found: FlowSet) -> None:
        self.flows = found.flows
        self.catalogue = found.catalogue
        self.by_number = {number: flow for flow in found.flows.values() for number in flow.numbers}
        self._mtimes = self._scan()

    def _scan(self) -> dict[Path, float]:
        out: dict[Path, float] = {}
        for base in self.paths:
            for path in ([*base.glob("*.y*ml")] if base.is_dir() else [base]):
                with contextlib.suppress(OSError):
                    out[path] = path.stat().st_mtime
        return out

    def for_number(self, dialled: str) -> Flow:
        return self.by_number.get(dialled) or self.flows[self.default_flow]

    async def start(self, interval: float) -> None:
        self._task = asyncio.create_task(self._watch(interval), name="flow-watch")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._scan() != self._mtimes:
                await self.reload()


# ------------------------------------------------------------------------------------------------- calls
class CallContext:
    """What nodes see of a call: play prompts, read digits, variables, record steps, leave the flow."""

    def __init__(self, session: CallSession, flow: Flow, language: str, variables: dict[str, str]) -> None:
        self.session = session
        self.flow = flow
        self.language = language
        self.vars = variables
        self.outcome: Outcome | None = None
        self.destination: str | None = None

    @property
    def caller_country(self) -> str | None:
        return self.session.caller_country

    @property
    def catalogue(self) -> Catalogue | None:
        return self.session.engine.flows.catalogue

    async def send_followup(self, channel: str, recipient: str, message: str, article: str | None,
                            purpose: str) -> Prepared | None:
        """Prepare a follow-up and commit it with the call's steps so far; None when follow-ups are off."""
        s = self.session
        followups = s.engine.followups
        if followups is None or not s.call_id:
            return None
        prepared = await followups.prepare(
            channel=channel, recipient=recipient, message=message, language=self.language, purpose=purpose,
            key=followup_key(s.call_id, message, article), interaction_id=s.call_id, article_id=article,
            region=s.engine.config.flows.default_region)
        await s.commit_with_steps({"followups": [prepared.followup],
                                   "links": [prepared.link] if prepared.link else []})
        if prepared.accepted:
            s.engine.followups_written()
        s.engine.bus.publish("followup", call_id=s.call_id, id=prepared.id, channel=channel,
                             state=prepared.followup["state"], reason=prepared.reason)
        return prepared

    async def save_survey(self, question: str, score: int) -> None:
        s = self.session
        if s.call_id:
            await s.commit_with_steps({"survey_answers": [{"interaction_id": s.call_id, "question": question,
                                                           "score": score, "channel": "voice",
                                                           "at": dt.datetime.now(dt.UTC)}]})

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def play(self, prompt: Any, escape_digits: str = "") -> str | None:
        """Play a prompt in the call's language; returns the digit that interrupted it."""
        s = self.session
        for language, text in prompt.for_language(self.language):
            path = await s.engine.prompts.ensure(text, language)
            s.engine.bus.publish("prompt", call_id=s.call_id, sip_call_id=s.sip_call_id, language=language,
                                 text=text, node=s.current)
            digit = await s.agi.stream_file(path, escape_digits)
            if digit:
                return digit
        return None

    async def wait_digit(self, seconds: float) -> str | None:
        return await self.session.agi.wait_for_digit(int(seconds * 1000))

    def record(self, node: str, event: str, value: str | None = None) -> None:
        s = self.session
        s.steps.append(StepRecord(node, event, value))
        s.engine.bus.publish("input", call_id=s.call_id, node=node, event=event, value=value)
        s.log.info("%s: %s%s", node, event, f" {value}" if value else "")

    def set_var(self, name: str, value: str, record: bool = True) -> None:
        self.vars[safe.var_name(name)] = value
        if record:
            self.session.steps.append(StepRecord(self.session.current or "", "set", f"{name}={value}"))
        if name == "language" and value in self.flow.languages:
            self.language = value
        if name == "intent":
            self.session.intent = value

    def get_var(self, name: str) -> str | None:
        if name == "language":
            return self.language
        return self.vars.get(name)

    @property
    def router(self) -> Router | None:
        return self.session.engine.router

    async def agent_phone(self, agent: str) -> str | None:
        """The PJSIP endpoint that rings for ``agent`` (None: unknown, disabled or without a phone)."""
        agents = self.session.engine.agents
        record = await agents.get(agent) if agents is not None else None
        return record.phone if record is not None and not record.disabled and record.phone else None

    def callback_number(self) -> str | None:
        """The caller's number when a call back to it can be made (callbacks configured, a valid number)."""
        callbacks = self.session.engine.callbacks
        if callbacks is None or callbacks.target(self.session.caller) is None:
            return None
        return self.session.caller

    async def update_interaction(self, **fields: object) -> None:
        """Change the call's interaction row (after the steps so far, in one transaction); waits for it."""
        await self.session.commit_with_steps({"update": {"_id": self.session.call_id, **fields}})

    async def transfer(self, destination: str) -> None:
        target = self.flow.destinations[destination]
        await self.session.hand_to_dialplan(target.context, target.exten)
        self.outcome = Outcome.TRANSFERRED
        self.destination = destination
        self.record(self.session.current or "", "transfer", destination)

    async def hangup(self) -> None:
        if self.outcome is None:   # a call an agent answered stays "answered" to its end
            self.outcome = Outcome.COMPLETED
        await self.session.agi.hangup()


class CallSession:
    """One call in the IVR; ``run`` is the call's task."""

    def __init__(self, engine: IvrEngine, channel: str, env: dict[str, str], resumed: bool = False) -> None:
        self.engine = engine
        self.channel = channel
        self.env = env
        self.resumed = resumed
        self.events: asyncio.Queue[Message | Exception] = asyncio.Queue()
        self.agi = AgiChannel(engine.ami, channel, self.events)
        self.uniqueid = env.get("uniqueid", "")
        self.caller = safe.caller_number(env.get("callerid"))
        dialled = env.get("extension", "")  # [ivr-entry] runs on the dialled number's extension
        self.dialled = dialled if safe.NUMBER_RE.fullmatch(dialled or "") else ""
        self.caller_country = _country(self.caller, engine.config.flows.default_region)
        self.call_id = ""
        self.sip_call_id = ""
        self.intent: str | None = None
        self.current: str | None = None
        self.steps: list[StepRecord] = []
        self._saved = 0
        self._flush_lock = asyncio.Lock()
        self._writes: set[asyncio.Future[None]] = set()
        self.log = CallLog(log, {"call": self.uniqueid or channel})
        self.task: asyncio.Task[None] | None = None
        self.dial_answered = False  # the last Dial from this call reached an agent (from its DialEnd event)
        self.detached = False  # stopped without handing the call back: the next ivr-bridge resumes it

    def deliver(self, item: Message | Exception) -> None:
        self.events.put_nowait(item)

    async def _flush(self) -> None:
        """Save every step not saved yet, after the queued ones (the end of a call waits for this)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        async with self._flush_lock:  # one write at a time per call, in order
            pending = self.steps[self._saved:]
            if pending:
                await self.engine.store.queue_steps(self.call_id, self._saved, pending)
                self._saved += len(pending)

    async def commit_with_steps(self, rows: dict[str, object]) -> None:
        """Commit ``rows`` together with the steps not saved yet (one transaction); waits for it."""
        async with self._flush_lock:
            pending = self.steps[self._saved:]
            bundle = {**rows, "steps": step_rows(self.call_id, self._saved, pending)}
            self._saved += len(pending)
            await self.engine.store.queue_bundle(bundle)

    def _flush_soon(self) -> None:
        """Queue the steps so far for the store's group commit: the next prompt does not wait for SQL."""
        pending = self.steps[self._saved:]
        if not pending or not self.call_id or self._flush_lock.locked():
            return
        future = self.engine.store.queue_steps(self.call_id, self._saved, pending)
        self._saved += len(pending)
        self._writes.add(future)
        future.add_done_callback(self._write_done)

    def _write_done(self, future: asyncio.Future[None]) -> None:
        self._writes.discard(future)
        if not future.cancelled() and future.exception() is not None:
            self.log.warning("could not save to the database: %s", future.exception())

    async def run(self) -> None:
        engine = self.engine
        flow = engine.flows.for_number(self.dialled)
        language = flow.numbers.get(self.dialled, flow.default_language)
        ctx = CallContext(self, flow, language, {"dialled": self.dialled, "caller": self.caller})
        start_node = flow.entry
        try:
            start_node = await self._open(ctx)
            await self._run_nodes(ctx, start_node)
            if ctx.outcome is None:  # the flow ran out of nodes: end the call
                ctx.outcome = Outcome.COMPLETED
                await self.agi.hangup()
        except CallHangup:
            if ctx.outcome is None:
                ctx.outcome = Outcome.ABANDONED
                self.log.info("caller hung up at %s", self.current)
        except asyncio.CancelledError:
            if ctx.outcome is None and not self.detached:
                ctx.outcome = Outcome.FAILED
            raise
        except Exception:
            self.log.exception("flow failed at %s; handing the call to the dialplan fallback", self.current)
            ctx.outcome = Outcome.FAILED
            with contextlib.suppress(Exception):
                await self.hand_to_dialplan(*FALLBACK)
        finally:
            await self._close(ctx)

    async def _open(self, ctx: CallContext) -> str:
        """Create the interaction, or pick up the stored one of an adopted call (node, variables)."""
        store = self.engine.store
        flow, language = ctx.flow, ctx.language
        if self.resumed:
            existing = await store.find_by_uniqueid(self.uniqueid) if self.uniqueid else None
            if existing is not None and existing.outcome is None:
                self.call_id = existing.id
                self.sip_call_id = existing.sip_call_id
                self.log = CallLog(log, {"call": self.call_id[:8]})
                self.steps = [StepRecord(s.node, s.event, s.value, s.at) for s in existing.steps]
                for step in existing.steps:
                    if step.event == "set" and step.value and "=" in step.value:
                        name, _, value = step.value.partition("=")
                        ctx.set_var(name, value, record=False)
                self._saved = len(self.steps)
                entered = [s.node for s in existing.steps if s.event == "enter" and s.node in flow.nodes]
                self.log.info("resuming call %s at %s", self.call_id, entered[-1] if entered else flow.entry)
                self.steps.append(StepRecord(entered[-1] if entered else flow.entry, "resumed"))
                return entered[-1] if entered else flow.entry
        with contextlib.suppress(AgiCommandError):
            self.sip_call_id = (await self.agi.get_full_variable("${CHANNEL(pjsip,call-id)}")) or ""
        # Queued, not awaited: the first prompt does not wait for the database (steps queue up behind it).
        self.call_id, created = store.create_soon(
            channel="voice", state="ivr", caller=self.caller, dialled=self.dialled, flow=flow.name,
            language=language, asterisk_channel=self.channel, asterisk_uniqueid=self.uniqueid,
            sip_call_id=self.sip_call_id[:128])
        self._writes.add(created)
        created.add_done_callback(self._write_done)
        self.log = CallLog(log, {"call": self.call_id[:8]})
        self.log.info("call from %s to %s on %s (flow %s)", self.caller, self.dialled or "-", self.channel,
                      flow.name)
        self.engine.bus.publish("call-started", call_id=self.call_id, sip_call_id=self.sip_call_id,
                                caller=self.caller, dialled=self.dialled, flow=flow.name)
        return flow.entry

    async def _run_nodes(self, ctx: CallContext, node_id: str | None) -> None:
        while node_id is not None:
            node = ctx.flow.nodes[node_id]
            self.current = node_id
            self.steps.append(StepRecord(node_id, "enter"))
            self.engine.bus.publish("node", call_id=self.call_id, node=node_id, node_type=node.type)
            self._flush_soon()
            try:
                node_id = await node.run(ctx)
            except LinkLost:
                self.steps.append(StepRecord(node_id, "link-lost"))
                self.log.warning("AMI link lost in %s; replaying it once the link is back", node_id)
                await self.engine.ami.wait_connected(LINK_WAIT)
                self._drain()
                continue

    def _drain(self) -> None:
        while not self.events.empty():
            item = self.events.get_nowait()
            if isinstance(item, CallHangup) or (isinstance(item, Message) and
                                                item.get("Event") in ("AsyncAGIEnd", "Hangup")):
                self.events.put_nowait(item)
                break

    async def hand_to_dialplan(self, context: str, exten: str) -> None:
        """Leave AsyncAGI for an allowlisted dialplan place (names were checked when the flow loaded)."""
        await self.agi.set_variable("IVR_DEST_CONTEXT", safe.name(context))
        await self.agi.set_variable("IVR_DEST_EXTEN", safe.name(exten))
        await self.agi.leave()

    async def _close(self, ctx: CallContext) -> None:
        if self.detached and ctx.outcome is None:
            # Left in Asterisk's AsyncAGI on purpose: save the path so far, keep the interaction open.
            with contextlib.suppress(Exception):
                if self.call_id:
                    await asyncio.shield(self._flush())
            self.engine.sessions.pop(self.channel, None)
            self.log.info("left in AsyncAGI at %s for the next ivr-bridge to resume", self.current)
            return
        outcome = ctx.outcome or Outcome.FAILED
        self.steps.append(StepRecord(self.current or "", "end", outcome.value))
        with contextlib.suppress(Exception):
            if self.call_id:
                await asyncio.shield(self._finish(ctx, outcome))
        self.engine.sessions.pop(self.channel, None)
        self.engine.bus.publish("call-ended", call_id=self.call_id, sip_call_id=self.sip_call_id,
                                outcome=outcome.value, node=self.current)
        self.log.info("call ended: %s at %s", outcome.value, self.current)

    async def _finish(self, ctx: CallContext, outcome: Outcome) -> None:
        await self._flush()
        followups = await self._after_call(ctx, outcome)
        # A callback or a chat taken instead of holding on goes on in the queue: the call ended, not the
        # interaction.
        going_on = {Outcome.CALLBACK: {"state": "callback", "ended_at": None},
                    Outcome.CHAT: {"state": "queued", "channel": "web", "ended_at": None}}.get(outcome, {})
        await self.engine.store.finish(self.call_id, outcome, self.current, ctx.destination,
                                       extra={"followups": [p.followup for p in followups],
                                              "links": [p.link for p in followups if p.link]},
                                       language=ctx.language, intent=self.intent, **going_on)
        if any(p.accepted for p in followups):
            self.engine.followups_written()

    async def _after_call(self, ctx: CallContext, outcome: Outcome) -> list[Prepared]:
        """The flow's after-call rules that match this call, prepared (a broken rule costs only itself)."""
        service = self.engine.followups
        catalogue = ctx.catalogue
        out: list[Prepared] = []
        if service is None or catalogue is None:
            return out
        for rule in ctx.flow.after_call:
            if not rule.when.matches(outcome.value, self.intent):
                continue
            article = rule.article
            if rule.from_intent:
                found = catalogue.article_for_intent(self.intent)
                if found is None:
                    continue
                article = found.id
            try:
                out.append(await service.prepare(
                    channel=rule.channel, recipient=self.caller, message=rule.message, language=ctx.language,
                    purpose="after_call", key=followup_key(self.call_id, rule.message, article),
                    interaction_id=self.call_id, article_id=article,
                    region=self.engine.config.flows.default_region))
            except Exception:
                self.log.exception("after-call follow-up %s failed", rule.message)
        return out


def _country(number: str, default_region: str) -> str | None:
    if number == "anonymous":
        return None
    try:
        parsed = phonenumbers.parse(number, default_region)
    except phonenumbers.NumberParseException:
        return None
    return phonenumbers.region_code_for_number(parsed)


# ------------------------------------------------------------------------------------------------- engine
class IvrEngine:
    """Starts a CallSession for every channel entering AsyncAGI and routes AMI events to it."""

    def __init__(self, config: Config, ami: AmiClient, flows: FlowRegistry, store: InteractionStore,
                 prompts: PromptLibrary, bus: EventBus, followups: FollowUpService | None = None,
                 on_followups: Callable[[], None] | None = None, router: Router | None = None,
                 agents: AgentDirectory | None = None, callbacks: CallbackDialer | None = None) -> None:
        self.config = config
        self.router = router
        self.agents = agents
        self.callbacks = callbacks
        self.followups = followups
        self._on_followups = on_followups
        self.ami = ami
        self.flows = flows
        self.store = store
        self.prompts = prompts
        self.bus = bus
        self.sessions: dict[str, CallSession] = {}
        self._background: set[asyncio.Task[Any]] = set()

    def followups_written(self) -> None:
        if self._on_followups is not None:
            self._on_followups()

    async def start(self) -> None:
        self.ami.add_event_listener(self._on_event)
        self.ami.add_state_listener(self._on_link)

    async def aclose(self, release_calls: bool = True) -> None:
        """Hand every call still in the IVR to the dialplan fallback, then stop their tasks.

        ``release_calls=False`` (a restart) leaves the calls in AsyncAGI with their interactions open; the next
        ivr-bridge adopts them on its first resync and resumes them at their node.
        """
        sessions = list(self.sessions.values())
        # Stop the call tasks first: while one runs it keeps sending AGI commands and consuming this call's
        # AMI events, so a hand-over through AGI commands raced with it and usually timed out (dead air).
        for session in sessions:
            session.detached = not release_calls
            if session.task is not None:
                session.task.cancel()
        await asyncio.gather(*(s.task for s in sessions if s.task is not None), return_exceptions=True)
        if release_calls and self.ami.connected:
            interrupted = [s for s in sessions if s.task is not None and s.task.cancelled() and not s.agi.hung_up]
            await asyncio.gather(*(self._release(s) for s in interrupted), return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _release(self, session: CallSession) -> None:
        """Send a call to the dialplan fallback at once. AMI Redirect, not AGI commands: those would only run
        after the AGI command still in progress (the rest of a prompt, a digit wait of up to a minute)."""
        with contextlib.suppress(AmiError):
            response = await self.ami.action("Redirect", Channel=session.channel, Context=FALLBACK[0],
                                             Exten=FALLBACK[1], Priority=1)
            if response.get("Response") != "Success":
                session.log.warning("could not hand the call to the fallback: %s", response.get("Message"))

    def _spawn(self, channel: str, env: dict[str, str], resumed: bool) -> None:
        try:
            session = CallSession(self, channel, env, resumed)
        except safe.UnsafeValue:
            log.warning("ignoring AsyncAGI channel with an unexpected name: %r", channel)
            return
        self.sessions[channel] = session
        session.task = asyncio.create_task(session.run(), name=f"call-{channel}")

    def _on_event(self, message: Message) -> None:
        event = message.get("Event")
        channel = str(message.get("Channel", ""))
        if event == "AsyncAGIStart":
            if channel not in self.sessions:
                env = parse_env(str(message.get("Env", "")))
                # The event's own headers come from the channel, not from text the caller can shape.
                env["uniqueid"] = str(message.get("Uniqueid", ""))
                env["callerid"] = str(message.get("CallerIDNum", ""))
                env["extension"] = str(message.get("Exten", ""))
                self._spawn(channel, env, resumed=False)
        elif event in ("AsyncAGIExec", "AsyncAGIEnd", "Hangup"):
            session = self.sessions.get(channel)
            uniqueid = message.get("Uniqueid")
            if session is not None and (not uniqueid or not session.uniqueid or uniqueid == session.uniqueid):
                session.deliver(message)
        elif event == "DialEnd":
            session = self.sessions.get(channel)
            if session is not None:
                session.dial_answered = message.get("DialStatus") == "ANSWER"
        elif event == "FullyBooted":
            # Asterisk sends it to every new AMI session once it is up (and after its own restart):
            # the moment to rebuild call state from the source of truth.
            task = asyncio.create_task(self.resync(), name="ivr-resync")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _on_link(self, up: bool) -> None:
        if not up:
            for session in self.sessions.values():
                session.deliver(LinkLost("AMI link lost"))

    async def resync(self) -> None:
        """Rebuild call state from Asterisk: adopt channels in AsyncAGI we do not run, end those that are gone."""
        try:
            await self.ami.wait_connected(self.config.asterisk.ami_timeout)
            channels = await self.ami.list_action("CoreShowChannels", "CoreShowChannelsComplete")
        except (AmiError, TimeoutError) as exc:
            log.warning("resync after reconnect failed: %s", exc)
            return
        live = {str(c.get("Channel")): c for c in channels}
        for name, session in list(self.sessions.items()):
            if name not in live:
                session.deliver(CallHangup("channel gone after reconnect"))
        for name, info in live.items():
            if info.get("Application") == "AGI" and info.get("Context") == ENTRY_CONTEXT \
                    and name not in self.sessions:
                env = {"uniqueid": str(info.get("Uniqueid", "")), "callerid": str(info.get("CallerIDNum", "")),
                       "extension": str(info.get("Exten", ""))}
                log.info("adopting call on %s after reconnect", name)
                self._spawn(name, env, resumed=True)
