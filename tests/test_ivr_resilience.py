"""The IVR core when things go wrong: no ivr-bridge, a cut AMI link, a restart, a shutdown, a flow reload.

Real Asterisk (``test`` instance), real pjsua2 caller, Redis and SQLite; flows from ``tests/flows_it``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bridge.app import App
from bridge.store import InteractionStore

if TYPE_CHECKING:
    from conftest import Harness, LogCapture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def steps_of(record: object) -> list[tuple[str, str, str | None]]:
    """The stored path as (node, event, value), without variable assignments ('set' steps)."""
    return [(s.node, s.event, s.value) for s in record.steps if s.event != "set"]  # type: ignore[attr-defined]


async def stored(url: str, interaction_id: str) -> object:
    """Read an interaction with a store of our own (the App that wrote it may be closed)."""
    store = InteractionStore(url)
    await store.start()
    try:
        record = await store.get(interaction_id)
        assert record is not None
        return record
    finally:
        await store.aclose()


async def test_without_ivr_bridge_the_dialplan_answers_and_ends_the_call(ivr: Harness) -> None:
    # No App runs. The heartbeat global outlives Apps of earlier tests: make it stale.
    ivr.asterisk.rx("dialplan set global IVR_BRIDGE_HEARTBEAT 0")
    call, _ = await ivr.dial("200")
    assert call.answered
    prompts = ivr.asterisk.config.prompt_dir
    match = await ivr.wait_log(rf'Executing \[s@ivr-fallback:\d+\] Playback\("([^"]+)", "{prompts}/fallback,noanswer"')
    channel = match.group(1)

    # Announcement, Dial(PJSIP/operator) fails (nobody registered as operator), 'nobody', hang-up by Asterisk.
    await call.wait_ended(timeout=45)
    assert call.ended_by_remote
    assert ivr.log_match(ivr.executed("ivr-transfer", "operator", "Dial", channel, "PJSIP/operator"))
    assert ivr.log_match(ivr.executed("ivr-transfer", "operator", "Playback", channel, f"{prompts}/nobody,noanswer"))
    assert ivr.log_match(ivr.executed("ivr-transfer", "operator", "Hangup", channel))
    assert f'AGI("{channel}"' not in ivr.asterisk_log()  # it never waited in AsyncAGI for a bridge that is not there
    assert await ivr.heard(call, 0.5, 3.0) > ivr.SILENCE_RMS  # the fallback announcement is audible


async def test_ami_link_cut_during_a_menu_replays_the_node(ivr: Harness, app: App) -> None:
    agi = ivr.agi_watch(app)
    call, watch = await ivr.dial("200", app=app)
    assert watch is not None
    await watch.next("prompt", node="main")
    channel = next(iter(app.engine.sessions))
    seen = len(agi.of(channel))
    await agi.completion(channel, seen)  # the menu prompt finished: the engine now waits for a digit (2 s)
    await asyncio.sleep(0.3)  # well inside that wait

    assert app.ami.connects == 1
    app.ami.drop_link()
    await ivr.wait_until(lambda: app.ami.connects == 2 and app.ami.connected, 10, "the AMI client to reconnect")
    # The engine replays the menu. Its new prompt queues behind the WAIT FOR DIGIT still running in Asterisk,
    # whose completion is the first AsyncAGIExec after the reconnect; press once the replayed prompt plays.
    await watch.next("prompt", node="main")
    await agi.completion(channel, seen + 1)
    await asyncio.sleep(ivr.BARGE_IN)
    await call.send_digits("1")
    await watch.next("input", node="main", event="chose", value="1")
    await ivr.press(call, watch, "account", "4242#")
    ended = await watch.next("call-ended")
    assert (ended["outcome"], ended["node"]) == ("completed", "thanks")

    record = await app.store.get(watch.call_id)
    assert record is not None
    assert steps_of(record) == [
        ("welcome", "enter", None),
        ("main", "enter", None),
        ("main", "link-lost", None),
        ("main", "enter", None),
        ("main", "chose", "1"),
        ("account", "enter", None),
        ("account", "collected", "4242"),
        ("thanks", "enter", None),
        ("thanks", "end", "completed"),
    ]
    assert [r.id for r in await app.store.recent(5)] == [record.id]


async def test_restart_adopts_the_call_and_resumes_at_its_node(ivr: Harness) -> None:
    config = ivr.config()
    first = await ivr.start_app(config)
    agi = ivr.agi_watch(first)
    call, watch = await ivr.dial("200", app=first)
    assert watch is not None
    await watch.next("prompt", node="main")
    channel = next(iter(first.engine.sessions))
    await agi.completion(channel, len(agi.of(channel)))  # the menu prompt finished; WAIT FOR DIGIT runs
    interaction_id = watch.call_id

    # Stop ivr-bridge without handing the call back (as a crash or a restart would), then start a new one.
    await ivr.close_app(first, release_calls=False)
    assert not call.ended
    record = await stored(config.database_url, interaction_id)
    assert record.outcome is None  # type: ignore[attr-defined]

    second = ivr.make_app(config)
    resumed = ivr.watch(second, call_id=interaction_id)
    agi2 = ivr.agi_watch(second)
    await ivr.start(second)
    node = await resumed.next("node", timeout=10)
    assert node["node"] == "main"
    await resumed.next("prompt", node="main")
    assert list(second.engine.sessions) == [channel]
    # Whatever AGI command of the first App still ran has ended once one completion was reported: the resumed
    # prompt (or its digit wait) is playing now.
    await agi2.completion(channel, 0)
    await asyncio.sleep(ivr.BARGE_IN)
    await call.send_digits("1")
    await resumed.next("input", node="main", event="chose", value="1")
    await ivr.press(call, resumed, "account", "777#")
    ended = await resumed.next("call-ended")
    assert (ended["outcome"], ended["node"]) == ("completed", "thanks")

    record = await second.store.get(interaction_id)
    assert record is not None
    assert steps_of(record) == [
        ("welcome", "enter", None),
        ("main", "enter", None),
        ("main", "resumed", None),
        ("main", "enter", None),
        ("main", "chose", "1"),
        ("account", "enter", None),
        ("account", "collected", "777"),
        ("thanks", "enter", None),
        ("thanks", "end", "completed"),
    ]
    assert record.sip_call_id == call.sip_call_id
    assert record.caller == ivr.CALLER and record.dialled == "200"
    assert [r.id for r in await second.store.recent(5)] == [interaction_id]  # the same interaction, no new one


async def test_graceful_shutdown_hands_the_call_to_the_dialplan(ivr: Harness, app: App) -> None:
    loop_time = asyncio.get_running_loop().time
    call, watch = await ivr.dial("200", app=app)
    media_at = loop_time()
    assert watch is not None
    await watch.next("prompt", node="main")
    channel = next(iter(app.engine.sessions))

    await ivr.close_app(app)
    handed_at = loop_time() - media_at
    assert not call.ended
    prompts = ivr.asterisk.config.prompt_dir
    await ivr.wait_log(ivr.executed("ivr-fallback", "s", "Playback", channel, f"{prompts}/fallback,noanswer"))
    assert not call.ended  # the caller is not dropped: the announcement plays
    record = await stored(app.config.database_url, watch.call_id)
    assert (record.outcome, record.outcome_node) == ("failed", "main")  # type: ignore[attr-defined]
    await asyncio.sleep(2.5)  # the caller listens to the announcement for a while
    assert not call.ended
    await call.hangup()
    assert await ivr.heard(call, handed_at + 0.5, handed_at + 2.5) > ivr.SILENCE_RMS


def replace_file(path: Path, text: str) -> None:
    """Write the whole new version at once (the watcher must never read half a file)."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


async def test_flow_reload_refuses_errors_and_keeps_calls_on_their_version(
        ivr: Harness, flows_copy: Callable[[str], Path], engine_log: LogCapture) -> None:
    folder = flows_copy("it_reload.yaml")
    path = folder / "it_reload.yaml"
    app = await ivr.start_app(ivr.config(flows=[folder], default_flow="it_reload", reload_interval=0.2))
    original = path.read_text(encoding="utf-8")

    # A broken version is refused with its position; the running version keeps serving.
    broken = original.replace("on_failure: done", "on_failure: nowhere")
    line = broken.splitlines().index("    on_failure: nowhere") + 1
    replace_file(path, broken)
    refused = await ivr.wait_until(lambda: engine_log.matching(logging.ERROR, "flow reload refused"), 10,
                                   "the refused reload")
    message = refused[0].getMessage()
    assert f"{path}:{line}:5: error: " in message and "'nowhere' does not exist" in message, message

    old_call, old_watch = await ivr.dial("205", app=app)
    assert old_watch is not None
    await old_watch.next("prompt", node="menu", text="Version one.")

    # A valid version goes live for new calls; the call in progress stays on the version it started with.
    replace_file(path, original.replace("Version one.", "Version two.").replace("Old goodbye.", "New goodbye."))
    await ivr.wait_until(lambda: engine_log.matching(logging.INFO, "flows reloaded"), 15, "the reload")
    new_call, new_watch = await ivr.dial("205", app=app)
    assert new_watch is not None
    await new_watch.next("prompt", node="menu", text="Version two.")

    await ivr.press(old_call, old_watch, "menu", "1")  # at its next menu prompt (after a no-input)
    await old_watch.next("prompt", node="done", text="Old goodbye.")
    assert (await old_watch.next("call-ended"))["outcome"] == "completed"
    assert [e["text"] for e in old_watch.events("prompt") if e["node"] == "menu"] == ["Version one."] * 2

    await ivr.press(new_call, new_watch, "menu", "1")
    await new_watch.next("prompt", node="done", text="New goodbye.")
    assert (await new_watch.next("call-ended"))["outcome"] == "completed"
    assert len(engine_log.matching(logging.ERROR, "flow reload refused")) == 1
