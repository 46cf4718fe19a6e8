"""Calls through the IVR core against the real Asterisk, a real pjsua2 caller, Redis and SQLite/PostgreSQL.

The flow is ``tests/flows_it/it_main.yaml`` (number 200): welcome -> main menu (1 account, 2 transfer to
voicemail, 3 a long announcement, 0 operator) with 2 s timeouts and one retry.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from typing import TYPE_CHECKING

import pytest

from bridge.app import App
from ivr.softphone import Softphone, SoftphoneConfig, sip_uri

if TYPE_CHECKING:
    from conftest import Harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def steps_of(record: object, sets: bool = False) -> list[tuple[str, str, str | None]]:
    """The stored path as (node, event, value); variable assignments ('set' steps) only when asked for."""
    return [(s.node, s.event, s.value) for s in record.steps  # type: ignore[attr-defined]
            if sets or s.event != "set"]


async def test_happy_path_reaches_the_end_and_stores_the_path(ivr: Harness, db_url: str) -> None:
    app = await ivr.start_app(ivr.config(database_url=db_url))
    async with ivr.redis_events(app) as on_redis:
        call, watch = await ivr.dial("200", app=app)
        assert watch is not None

        started = await watch.next("call-started")
        assert (started["caller"], started["dialled"], started["flow"]) == (ivr.CALLER, "200", "it_main")
        await watch.next("prompt", node="welcome", text="Welcome.", language="en")
        await ivr.press(call, watch, "main", "1")
        await watch.next("input", node="main", event="chose", value="1")
        await ivr.press(call, watch, "account", "12345#")
        await watch.next("input", node="account", event="collected", value="12345")
        await watch.next("prompt", node="thanks", text="Thanks.")
        ended = await watch.next("call-ended")
        assert (ended["outcome"], ended["node"]) == ("completed", "thanks")
        await call.wait_ended(timeout=10)
        assert call.ended_by_remote  # the hangup node hung up
        # The same events reached Redis (what `ivr-bridge call` follows), in order.
        mine = [e for e in watch.events() if e["type"] in ("call-started", "prompt", "call-ended")]
        await ivr.wait_until(lambda: [e for e in on_redis if e.get("call_id") == watch.call_id
                                      and e["type"] in ("call-started", "prompt", "call-ended")] == mine,
                             5, "the call's events on Redis")

    # What the caller heard: the welcome prompt right after the answer (TTS speech, not silence).
    assert await ivr.heard(call, 0.0, 2.0) > ivr.SILENCE_RMS, ivr.loudness(call)

    record = await app.store.get(watch.call_id)
    assert record is not None
    assert steps_of(record) == [
        ("welcome", "enter", None),
        ("main", "enter", None),
        ("main", "chose", "1"),
        ("account", "enter", None),
        ("account", "collected", "12345"),
        ("thanks", "enter", None),
        ("thanks", "end", "completed"),
    ]
    assert [s.seq for s in record.steps] == list(range(len(record.steps)))
    assert ("main", "set", "intent=billing") in steps_of(record, sets=True)
    assert (record.outcome, record.outcome_node, record.destination) == ("completed", "thanks", None)
    assert (record.caller, record.dialled, record.flow, record.language) == (ivr.CALLER, "200", "it_main", "en")
    assert record.intent == "billing"
    assert record.sip_call_id == call.sip_call_id != ""
    assert record.asterisk_channel.startswith("PJSIP/hotline-trunk-")
    assert record.asterisk_uniqueid
    assert record.state == "ended" and record.ended_at is not None and record.ended_at >= record.started_at
    assert [r.id for r in await app.store.recent(5)] == [record.id]
    assert (await app.store.find_by_uniqueid(record.asterisk_uniqueid)).id == record.id  # type: ignore[union-attr]


async def test_no_input_reprompts_then_fails_over(ivr: Harness, app: App) -> None:
    call, watch = await ivr.dial("200", app=app)
    assert watch is not None
    await watch.next("prompt", node="main", text="Main menu.")
    await watch.next("input", node="main", event="no-input")
    await watch.next("prompt", node="main", text="No input.")
    await watch.next("prompt", node="main", text="Main menu.")
    await watch.next("input", node="main", event="no-input")
    await watch.next("input", node="main", event="failed")
    await watch.next("prompt", node="failed_end", text="Goodbye.")
    ended = await watch.next("call-ended")
    assert (ended["outcome"], ended["node"]) == ("completed", "failed_end")
    await call.wait_ended(timeout=10)

    # After the failure only one more prompt: the retry budget (retries: 1) is not exceeded.
    assert [e["text"] for e in watch.events("prompt")] == ["Welcome.", "Main menu.", "No input.", "Main menu.",
                                                            "Goodbye."]
    record = await app.store.get(watch.call_id)
    assert record is not None
    assert steps_of(record) == [
        ("welcome", "enter", None),
        ("main", "enter", None),
        ("main", "no-input", None),
        ("main", "no-input", None),
        ("main", "failed", None),
        ("failed_end", "enter", None),
        ("failed_end", "end", "completed"),
    ]
    assert sum(1 for s in record.steps if s.event == "no-input") == 2
    assert (record.outcome, record.outcome_node) == ("completed", "failed_end")


async def test_invalid_digit_then_a_valid_one(ivr: Harness, app: App) -> None:
    call, watch = await ivr.dial("200", app=app)
    assert watch is not None
    await ivr.press(call, watch, "main", "7")
    await watch.next("input", node="main", event="invalid", value="7")
    await watch.next("prompt", node="main", text="Invalid.")
    await ivr.press(call, watch, "main", "1", text="Main menu.")  # the menu prompt again, then a valid choice
    await watch.next("input", node="main", event="chose", value="1")
    await watch.next("prompt", node="account", text="Account number.")
    await call.hangup()
    ended = await watch.next("call-ended")
    assert (ended["outcome"], ended["node"]) == ("abandoned", "account")

    record = await app.store.get(watch.call_id)
    assert record is not None
    assert steps_of(record) == [
        ("welcome", "enter", None),
        ("main", "enter", None),
        ("main", "invalid", "7"),
        ("main", "chose", "1"),
        ("account", "enter", None),
        ("account", "end", "abandoned"),
    ]


async def test_caller_hangs_up_during_a_prompt(ivr: Harness, app: App) -> None:
    call, watch = await ivr.dial("200", app=app)
    assert watch is not None
    await ivr.press(call, watch, "main", "3")
    await watch.next("prompt", node="long_info")
    channel = next(iter(app.engine.sessions))
    assert ivr.call_tasks(channel) == [f"call-{channel}"]
    await ivr.wait_until(lambda: app.engine.sessions, 1, "the session")  # still in the call
    await call.hangup()  # well inside the ~7 s announcement

    ended = await watch.next("call-ended", timeout=5)
    assert (ended["outcome"], ended["node"]) == ("abandoned", "long_info")
    await ivr.wait_until(lambda: not app.engine.sessions, 2, "the session to end")
    await ivr.wait_until(lambda: not ivr.call_tasks(channel), 2, "the call task to finish")
    record = await app.store.get(watch.call_id)
    assert record is not None
    assert (record.outcome, record.outcome_node, record.state) == ("abandoned", "long_info", "ended")
    assert steps_of(record)[-2:] == [("long_info", "enter", None), ("long_info", "end", "abandoned")]
    assert not any(e["text"] == "Thanks." for e in watch.events("prompt"))  # the flow did not go on


async def test_transfer_leaves_asyncagi_for_the_dialplan(ivr: Harness, app: App) -> None:
    call, watch = await ivr.dial("200", app=app)
    assert watch is not None
    loop_time = asyncio.get_running_loop().time
    media_at = loop_time()
    await ivr.press(call, watch, "main", "2")
    await watch.next("prompt", node="leave", text="Transferring.")
    ended = await watch.next("call-ended")
    transferred_at = loop_time() - media_at
    assert (ended["outcome"], ended["node"]) == ("transferred", "leave")
    record = await app.store.get(watch.call_id)
    assert record is not None
    assert (record.outcome, record.outcome_node, record.destination) == ("transferred", "leave", "voicemail")
    assert steps_of(record)[-3:] == [("leave", "enter", None), ("leave", "transfer", "voicemail"),
                                     ("leave", "end", "transferred")]
    channel = record.asterisk_channel

    # The dialplan went on after AGI(agi:async) to ivr-transfer,voicemail: 'nobody', then Asterisk hangs up.
    prompts = ivr.asterisk.config.prompt_dir
    await ivr.wait_log(ivr.executed("ivr-transfer", "voicemail", "Playback", channel, f"{prompts}/nobody,noanswer"))
    assert not app.engine.sessions  # the engine let go of the channel
    await call.wait_ended(timeout=30)
    assert call.ended_by_remote
    assert ivr.log_match(ivr.executed("ivr-transfer", "voicemail", "Hangup", channel))
    # The announcement after the transfer is audible to the caller.
    assert await ivr.heard(call, transferred_at + 1.0, transferred_at + 4.0) > ivr.SILENCE_RMS


@pytest.mark.parametrize("user,display_name", [
    ("%24%7BEPOCH%7D%26%2C1", None),            # From user decodes to ${EPOCH}&,1
    ("5550100", '${EPOCH}&,"x" $[1+1]'),        # a clean number with a hostile display name
])
async def test_hostile_caller_id_never_reaches_asterisk(ivr: Harness, app: App, user: str,
                                                        display_name: str | None) -> None:
    await ivr.softphone(user=user, display_name=display_name)
    actions = ivr.spy_actions(app)
    call, watch = await ivr.dial("200", app=app)
    assert watch is not None
    started = await watch.next("call-started")
    # [from-hotline] keeps only the digits and '+' of a caller's number; ivr-bridge takes digits or 'anonymous'.
    expected = user if user.isdigit() else "1"
    assert started["caller"] == expected
    channels = await ivr.channels()
    assert len(channels) == 1, channels  # nothing was originated or redirected on the caller's behalf
    await ivr.press(call, watch, "main", "1")  # the call works normally
    await watch.next("input", node="main", event="chose", value="1")
    await ivr.press(call, watch, "account", "999#")
    ended = await watch.next("call-ended")
    assert ended["outcome"] == "completed"
    await call.wait_ended(timeout=10)

    records = await app.store.recent(10)
    assert len(records) == 1
    assert records[0].caller == expected
    assert [s.value for s in records[0].steps if s.event in ("chose", "collected")] == ["1", "999"]
    # Only the AGI commands of the flow went to Asterisk, none carrying the caller ID.
    assert {name for name, _ in actions} <= {"AGI", "Setvar"}
    commands = [headers["Command"].split('"')[0].strip() for name, headers in actions if name == "AGI"]
    assert set(commands) <= {"GET FULL VARIABLE", "STREAM FILE", "WAIT FOR DIGIT", "HANGUP"}, commands
    assert not any("EPOCH" in str(headers) or "$[" in str(headers) for _, headers in actions)


async def test_caller_id_cannot_forge_ami_events_for_another_call(ivr: Harness, app: App) -> None:
    """Asterisk URI-decodes the From user into CALLERID(num) and writes it raw into AMI events (it escapes names,
    not numbers): CR LF in it would end the event and start a forged one, e.g. a Hangup for another caller."""
    victim, watch = await ivr.dial("200", app=app)
    assert watch is not None
    await watch.next("prompt", node="main")
    victim_channel = next(iter(app.engine.sessions))

    attacker = Softphone(SoftphoneConfig(user="1"))
    payload = f"1\r\n\r\nEvent: Hangup\r\nChannel: {victim_channel}\r\nCause: 16\r\nX: "
    attacker.config.user = urllib.parse.quote(payload, safe="")  # past the softphone's own check, on purpose
    await attacker.start()
    try:
        evil = await attacker.dial(sip_uri("200", "127.0.0.1", ivr.asterisk.config.sip_port))
        evil_watch = ivr.watch(app, sip_call_id=evil.sip_call_id)
        await evil.wait_answered(timeout=10)
        started = await evil_watch.next("call-started")
        assert started["caller"] == "anonymous" or re.fullmatch(r"\+?[0-9]{1,20}", started["caller"])
        await evil_watch.next("prompt", node="welcome")
        await evil.hangup()
        await evil_watch.next("call-ended")
    finally:
        await attacker.aclose()

    # The victim's call was not touched: it goes on and completes.
    assert not [e for e in watch.events("call-ended")], watch.events("call-ended")
    await ivr.press(victim, watch, "main", "1", text="Main menu.")
    await watch.next("input", node="main", event="chose", value="1")
    await ivr.press(victim, watch, "account", "5678#")
    ended = await watch.next("call-ended")
    assert (ended["outcome"], ended["node"]) == ("completed", "thanks")
