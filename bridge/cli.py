"""``ivr-bridge``: the command line (run, call, flows check, prompts build, asterisk, kannel, db, interactions,
outbox, report, queue, agents, dev-mail)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from bridge.config import Config, ConfigError, ensure_secrets, load_config
from ivr.pbx import AsteriskInstance


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=args.set or [])


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from bridge.app import serve
    from ivr.flow import FlowError

    config = _config(args)
    _setup_logging(config.general.log_level)
    try:
        asyncio.run(serve(config))
    except FlowError as exc:
        print("ivr-bridge will not start: the flows have errors:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    return 0


def cmd_flows_check(args: argparse.Namespace) -> int:
    from ivr.flow import count_errors, flow_files, load_flows

    paths = [Path(p) for p in args.paths] or _config(args).flows.paths
    files = flow_files(paths)
    if not files:
        print("no flow files found in " + ", ".join(str(p) for p in paths), file=sys.stderr)
        return 2
    flows, problems = load_flows(paths)
    for problem in problems:
        print(problem)
    errors = count_errors(problems)
    warnings = len(problems) - errors
    print(f"{len(files)} file(s), {len(flows)} flow(s) ok, {errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


def cmd_prompts_build(args: argparse.Namespace) -> int:
    from ivr.flow import count_errors, load_flows
    from ivr.prompts import PromptLibrary

    config = _config(args)
    flows, problems = load_flows(config.flows.paths)
    if count_errors(problems):
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    library = PromptLibrary(config.tts, config.asterisk)
    try:
        rendered, cached = library.build(flows.values(), progress=True)
    finally:
        library.close()
    print(f"prompts: {rendered} rendered, {cached} cached, in {library.dir}")
    return 0


def cmd_setup_secrets(args: argparse.Namespace) -> int:
    config = _config(args)
    ensure_secrets(config)
    return 0


def _pbx(config: Config) -> AsteriskInstance:
    from ivr.engine import FlowRegistry

    registry = FlowRegistry(config.flows.paths, config.flows.default_flow)
    problems = registry.load()
    numbers = sorted(registry.by_number) if registry.flows else []
    if not numbers:
        for problem in problems:
            print(problem, file=sys.stderr)
    return AsteriskInstance(config.asterisk, numbers)


def cmd_asterisk(args: argparse.Namespace) -> int:
    from ivr.pbx import PbxError

    config = _config(args)
    ensure_secrets(config)
    pbx = _pbx(config)
    try:
        if args.action == "start":
            pbx.start()
            print(f"Asterisk instance '{config.asterisk.instance}' up: SIP {config.asterisk.sip_bind}:"
                  f"{config.asterisk.sip_port}, AMI 127.0.0.1:{config.asterisk.ami_port}")
        elif args.action == "stop":
            pbx.stop()
        elif args.action == "status":
            print("running" if pbx.running() else "stopped")
        elif args.action == "render":
            pbx.render()
    except PbxError as exc:
        print(f"asterisk: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from bridge import db

    config = _config(args)
    asyncio.run(db.upgrade(config.database_url))
    print(f"database at newest schema ({config.database_url.split('://')[0]})")
    return 0


def cmd_interactions(args: argparse.Namespace) -> int:
    from bridge.store import InteractionStore

    config = _config(args)

    async def show() -> None:
        store = InteractionStore(config.database_url)
        await store.start()
        try:
            for item in await store.recent(args.limit):
                path = _path(item.steps)
                print(f"{item.started_at:%Y-%m-%d %H:%M:%S} {item.id[:8]} {item.caller:>14} -> {item.dialled:<5} "
                      f"{item.outcome or 'in progress':<11} at {item.outcome_node or '-'}  {path}")
        finally:
            await store.aclose()

    asyncio.run(show())
    return 0


def _path(steps: list[Any]) -> str:
    """``main[2] > orders[1] > order_number[12345] > goodbye``: nodes entered, with what the caller pressed."""
    parts: list[str] = []
    for step in steps:
        if step.event == "enter":
            parts.append(step.node)
        elif step.event == "resumed":
            parts.append("(ivr-bridge restarted)")
        elif step.event in ("chose", "collected", "invalid") and parts:
            parts[-1] += f"[{step.value}]"
        elif step.event in ("no-input", "link-lost", "transfer") and parts:
            parts[-1] += f"[{step.event}{'=' + step.value if step.value else ''}]"
    return " > ".join(parts)


async def _with_store(config: Config, work: Any) -> Any:
    from bridge.store import InteractionStore

    store = InteractionStore(config.database_url)
    await store.start()
    try:
        return await work(store)
    finally:
        await store.aclose()


def cmd_outbox(args: argparse.Namespace) -> int:
    from bridge.outbox import Outbox

    config = _config(args)

    async def list_rows(store: Any) -> int:
        outbox = Outbox(store)
        counts = await outbox.counts()
        print("follow-ups: " + (", ".join(f"{state} {n}" for state, n in sorted(counts.items())) or "none"))
        blocked = await outbox.blocked_reasons()
        if blocked:
            print("blocked by reason: " + ", ".join(f"{r} {n}" for r, n in sorted(blocked.items())))
        for f in await outbox.list(args.state, args.limit, args.channel):
            print(f"{f.created_at:%Y-%m-%d %H:%M:%S} {f.id} {f.channel:<5} {f.recipient[:24]:<24} {f.state:<9} "
                  f"try {f.attempts} {f.template}{'/' + f.article_id if f.article_id else ''}"
                  f"{'  ' + f.reason if f.reason else ''}")
        return 0

    async def retry(store: Any) -> int:
        outbox = Outbox(store)
        ids = list(args.ids)
        if args.state:
            ids += [f.id for f in await outbox.list(args.state, limit=100000)]
        if not ids:
            print("nothing to retry (give ids or --state dead|failed|uncertain)", file=sys.stderr)
            return 2
        n = await outbox.retry(ids)
        print(f"{n} follow-up(s) queued again")
        return 0

    if args.action == "list":
        return int(asyncio.run(_with_store(config, list_rows)))
    if args.action == "retry":
        return int(asyncio.run(_with_store(config, retry)))
    _setup_logging(config.general.log_level)
    return int(asyncio.run(_dispatch(config)))


async def _dispatch(config: Config) -> int:
    """Run only the outbox dispatcher (a process of its own, e.g. next to several web processes)."""
    import signal

    from bridge import db
    from bridge.app import gateways
    from bridge.events import EventBus
    from bridge.outbox import Dispatcher, Outbox
    from bridge.store import InteractionStore

    await db.upgrade(config.database_url)
    store = InteractionStore(config.database_url)
    bus = EventBus(config.redis.url or None, config.redis.events_channel)
    await store.start()
    await bus.start()
    dispatcher = Dispatcher(Outbox(store, bus), gateways(config), config.outbox)
    await dispatcher.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger(__name__).info("outbox dispatcher running: %s", ", ".join(dispatcher.gateways) or "no gateways")
    try:
        await stop.wait()
    finally:
        await dispatcher.aclose()
        await bus.aclose()
        await store.aclose()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import datetime as dt

    from bridge.reports import deflection, format_deflection

    config = _config(args)
    window = dt.timedelta(hours=args.window_hours or config.reports.deflection_window_hours)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=args.days)

    async def report(store: Any) -> int:
        rows = await deflection(store.sessions, since, window)
        print(f"Deflection to self-service, last {args.days} day(s), window {window.total_seconds() / 3600:g} h")
        print(format_deflection(rows))
        return 0

    return int(asyncio.run(_with_store(config, report)))


def cmd_queue(args: argparse.Namespace) -> int:
    """The live queue per skill and the agents' states and loads (what a supervisor sees)."""
    import time

    from bridge.router import Router

    config = _config(args)

    async def show() -> int:
        router = Router(config.redis.url, config.router)
        try:
            snap = await router.snapshot()
        finally:
            await router.aclose()
        skills = snap.per_skill()
        print(f"{'skill':<16} {'waiting':>7} {'longest wait':>13}")
        for skill, entry in sorted(skills.items()) or [("-", {"waiting": 0, "longest_wait": 0.0})]:
            print(f"{skill:<16} {int(entry['waiting']):>7} {entry['longest_wait']:>12.0f}s")
        print(f"\n{'agent':<16} {'presence':<12} {'voice':>5} {'chats':>5}  skills")
        for name, agent in sorted(snap.agents.items()):
            presence = agent.presence
            if agent.wrapup_until:
                presence += f" {max(0, agent.wrapup_until - time.time()):.0f}s"
            print(f"{name:<16} {presence:<12} {agent.voice:>2}/{agent.cap_voice:<2} {agent.chat:>2}/{agent.cap_chat:<2}"
                  f"  {', '.join(agent.skills)}")
        return 0

    return int(asyncio.run(show()))


def _read_password(from_stdin: bool) -> str:
    """One line from stdin (scripts), or typed twice at a prompt; never from the command line."""
    import getpass

    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def cmd_agents(args: argparse.Namespace) -> int:
    """Agents, supervisors and admins of the desktop: add, list, passwd, disable, enable."""
    from bridge import db
    from bridge.agents import AgentDirectory, AgentError

    config = _config(args)

    async def work(store: Any) -> int:
        directory = AgentDirectory(store)
        if args.agents_command == "list":
            print(f"{'agent':<20} {'role':<11} {'voice':>5} {'chats':>5}  {'phone':<12} {'state':<8} skills")
            for a in await directory.list():
                print(f"{a.id:<20} {a.role:<11} {a.voice_capacity:>5} {a.chat_capacity:>5}  {a.phone or '-':<12} "
                      f"{'disabled' if a.disabled else 'active':<8} {a.skills.replace(',', ', ') or '-'}")
        elif args.agents_command == "add":
            skills = [s for s in (args.skills or "").split(",") if s]
            await directory.add(args.agent, _read_password(args.password_stdin), role=args.role,
                                display_name=args.name or "", skills=skills, voice=args.voice, chat=args.chat,
                                phone=args.phone, language=args.language)
            print(f"added {args.role} {args.agent}")
        elif args.agents_command == "passwd":
            await directory.set_password(args.agent, _read_password(args.password_stdin))
            print(f"password of {args.agent} changed")
        else:
            await directory.set_disabled(args.agent, args.agents_command == "disable")
            print(f"{args.agent} {args.agents_command}d")
        return 0

    try:
        asyncio.run(db.upgrade(config.database_url))
        return int(asyncio.run(_with_store(config, work)))
    except (AgentError, ValueError) as exc:
        print(f"ivr-bridge agents: {exc}", file=sys.stderr)
        return 1


def cmd_phone_password(args: argparse.Namespace) -> int:
    """Print the SIP credentials of one agent desk phone (for provisioning the phone)."""
    from bridge.config import ensure_secrets

    config = _config(args)
    ast = config.asterisk
    if args.phone not in ast.agent_phones:
        print(f"ivr-bridge agents: {args.phone!r:.60} is not in asterisk.agent_phones "
              f"({', '.join(ast.agent_phones) or 'none'})", file=sys.stderr)
        return 1
    ensure_secrets(config)
    print(f"user {args.phone}  password {ast.agent_phone_password(args.phone)}  realm ivr-bridge  "
          f"registrar sip:{ast.sip_bind}:{ast.sip_port}")
    return 0


def cmd_dev_mail(args: argparse.Namespace) -> int:
    from email_out.devsink import main as sink_main

    config = _config(args)
    directory = config.email.dev_sink_dir or config.general.var_dir / "dev-mail"
    return sink_main(["--dir", str(directory), "--host", config.email.host, "--port", str(config.email.port)])


def cmd_kannel(args: argparse.Namespace) -> int:
    from sms.kannel_proc import KannelInstance

    config = _config(args)
    ensure_secrets(config)
    kannel = KannelInstance(config)
    if args.action == "start":
        kannel.start()
        k = config.sms.kannel
        print(f"Kannel '{k.instance}' up: sendsms http://{k.host}:{k.sendsms_port}, fake SMSC port {k.smsc_port}")
    elif args.action == "stop":
        kannel.stop()
    elif args.action == "status":
        print(kannel.status())
    else:
        for sender, to, text in kannel.received():
            print(f"{sender} -> {to}: {text}")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    from ivr.softphone_cli import run_call

    config = _config(args)
    _setup_logging("WARNING")
    return asyncio.run(run_call(config, args))


# --------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML config file (default: ./ivr-bridge.yaml if present)")
    common.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a setting")

    parser = argparse.ArgumentParser(prog="ivr-bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("run", parents=[common], help="run the bridge").set_defaults(func=cmd_run)

    call = sub.add_parser("call", parents=[common], help="call the hotline from a terminal softphone")
    call.add_argument("number", help="hotline number to dial, e.g. 100")
    call.add_argument("--digits", help="digits to send, comma separated steps, e.g. 1,0 (else typed)")
    call.add_argument("--say", type=Path, help="wav file to play into the call")
    call.add_argument("--record", type=Path, help="write what the caller heard to this wav")
    call.add_argument("--caller", default="13800138000", help="caller ID number to present")
    call.add_argument("--gap", type=float, default=None,
                      help="seconds between digit steps (default: after each prompt ends)")
    call.add_argument("--timeout", type=float, default=120, help="give up after this many seconds")
    call.set_defaults(func=cmd_call)

    flows = sub.add_parser("flows", help="work with call flows")
    flows_sub = flows.add_subparsers(dest="flows_command", required=True)
    check = flows_sub.add_parser("check", parents=[common], help="validate flow files (file:line:column errors)")
    check.add_argument("paths", nargs="*", help="flow files or folders (default: the configured flows)")
    check.set_defaults(func=cmd_flows_check)

    prompts = sub.add_parser("prompts", help="work with prompts")
    prompts_sub = prompts.add_subparsers(dest="prompts_command", required=True)
    prompts_sub.add_parser("build", parents=[common], help="render every prompt of the flows to wav") \
        .set_defaults(func=cmd_prompts_build)

    ast = sub.add_parser("asterisk", parents=[common], help="control the local Asterisk instance")
    ast.add_argument("action", choices=["start", "stop", "status", "render"])
    ast.set_defaults(func=cmd_asterisk)

    dbp = sub.add_parser("db", help="database")
    db_sub = dbp.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", parents=[common], help="migrate to the newest schema") \
        .set_defaults(func=cmd_db_upgrade)

    inter = sub.add_parser("interactions", parents=[common], help="list recent interactions with their path")
    inter.add_argument("--limit", type=int, default=20)
    inter.set_defaults(func=cmd_interactions)

    outbox = sub.add_parser("outbox", parents=[common], help="follow-ups (SMS, email): list, retry, dispatch")
    outbox.add_argument("action", choices=["list", "retry", "dispatch"])
    outbox.add_argument("ids", nargs="*", help="follow-up ids (retry)")
    outbox.add_argument("--state", help="only this state (list), or retry every follow-up in it (dead, failed, "
                                        "uncertain)")
    outbox.add_argument("--channel", choices=["sms", "email"])
    outbox.add_argument("--limit", type=int, default=30)
    outbox.set_defaults(func=cmd_outbox)

    report = sub.add_parser("report", parents=[common], help="reports")
    report.add_argument("name", choices=["deflection"])
    report.add_argument("--days", type=int, default=14, help="calls of the last N days")
    report.add_argument("--window-hours", type=float, help="no new call this long after the link was opened")
    report.set_defaults(func=cmd_report)

    sub.add_parser("queue", parents=[common], help="the live queue per skill and the agents (supervisor view)") \
        .set_defaults(func=cmd_queue)

    agents = sub.add_parser("agents", help="agents, supervisors and admins of the desktop")
    agents_sub = agents.add_subparsers(dest="agents_command", required=True)
    agents_sub.add_parser("list", parents=[common], help="everyone with role, capacities, phone and skills") \
        .set_defaults(func=cmd_agents)
    add = agents_sub.add_parser("add", parents=[common], help="add someone (the password is asked for)")
    add.add_argument("agent", help="login name: letters, digits, _.@-")
    add.add_argument("--name", help="display name")
    add.add_argument("--role", choices=["agent", "supervisor", "admin"], default="agent")
    add.add_argument("--skills", help="comma-separated, e.g. billing,tech")
    add.add_argument("--voice", type=int, default=1, help="calls at once (0 or 1)")
    add.add_argument("--chat", type=int, default=4, help="chats at once (0-10)")
    add.add_argument("--phone", help="the PJSIP endpoint that rings for this agent")
    add.add_argument("--language", choices=["en", "zh-CN"], default="en")
    add.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")
    add.set_defaults(func=cmd_agents)
    for name, what in (("passwd", "set a new password"), ("disable", "refuse their logins"),
                       ("enable", "allow their logins again")):
        one = agents_sub.add_parser(name, parents=[common], help=what)
        one.add_argument("agent")
        if name == "passwd":
            one.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        one.set_defaults(func=cmd_agents)
    phone = agents_sub.add_parser("phone-password", parents=[common],
                                  help="the SIP user and password of an agent desk phone (asterisk.agent_phones)")
    phone.add_argument("phone")
    phone.set_defaults(func=cmd_phone_password)
    sub.add_parser("dev-mail", parents=[common], help="run the dev mail sink (SMTP on email.host:email.port)") \
        .set_defaults(func=cmd_dev_mail)

    kannel = sub.add_parser("kannel", parents=[common], help="control the local Kannel with its fake SMSC (dev)")
    kannel.add_argument("action", choices=["start", "stop", "status", "received"])
    kannel.set_defaults(func=cmd_kannel)

    sub.add_parser("setup-secrets", parents=[common], help="generate missing secrets into var/secrets.yaml") \
        .set_defaults(func=cmd_setup_secrets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"ivr-bridge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
