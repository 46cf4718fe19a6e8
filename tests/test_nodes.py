"""Node behaviour, driven through a fake call: prompts played, digits scripted, variables, hours, transfers.

``FakeCall`` stands in for ``ivr.engine.CallContext`` (the same methods the nodes use). The caller's key presses
are a script: a plain string is a key pressed after the prompt (returned by ``wait_digit``), ``during("1")`` is a
key pressed while a prompt plays (returned by ``play`` when it is one of the prompt's escape digits, otherwise lost,
as Asterisk's STREAM FILE does), ``None`` is silence until the timeout. An empty script is silence.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pytest

from ivr.flow import Flow, Prompt, load_flow_text
from ivr.nodes import CollectNode, MenuNode, Node

pytestmark = pytest.mark.unit

FLOW = """\
flow: nodes
languages: [en, zh-CN]
entry: route
destinations:
  operator: {context: ivr-transfer, exten: operator}
hours:
  office:
    timezone: Asia/Shanghai
    days: [mon, tue, wed, thu, fri]
    open: "09:00"
    close: "18:00"
    closed_dates: [2024-10-01]
nodes:
  route:
    type: condition
    cases:
      - {var: dialled, equals: "102", next: lang}
      - {closed: office, next: closed}
      - {caller_country: [CN, HK], next: set_zh}
    otherwise: main
  set_zh:
    type: set
    values: {language: zh-CN, intent: chinese}
    next: check
  check:
    type: condition
    cases:
      - {var: intent, in: [billing, orders], next: main}
      - {open: office, next: jump}
    otherwise: bye
  jump:
    type: goto
    next: main
  lang:
    type: menu
    prompt:
      all_languages: true
      text: {en: "For English, press 1.", zh-CN: "普通话请按2。"}
    options:
      "1": {next: main, set: {language: en}}
      "2": {next: main, set: {language: zh-CN}}
      "0": {next: agent}
    timeout: 4
    retries: 1
    on_failure: main
  main:
    type: menu
    prompt: {en: "Main menu.", zh-CN: "主菜单。"}
    options:
      "1": {next: order, set: {intent: orders}}
      "2": {next: thanks}
      "0": {next: agent}
    timeout: 3
    retries: 2
    no_input: {en: "No input.", zh-CN: "没有输入。"}
    invalid: {en: "Invalid.", zh-CN: "无效。"}
    on_failure: agent
  order:
    type: collect
    prompt: {en: "Order number.", zh-CN: "订单号。"}
    var: order
    min_digits: 4
    max_digits: 6
    timeout: 5
    inter_digit_timeout: 2
    retries: 1
    no_input: {en: "Nothing entered.", zh-CN: "没有输入。"}
    invalid: {en: "Too short.", zh-CN: "太短。"}
    next: thanks
    on_failure: agent
  thanks:
    type: say
    prompt: {en: "Thanks.", zh-CN: "谢谢。"}
    next: bye
  bye:
    type: hangup
    prompt: {en: "Goodbye.", zh-CN: "再见。"}
  closed:
    type: say
    prompt: {en: "We are closed.", zh-CN: "已下班。"}
  agent:
    type: transfer
    destination: operator
    prompt: {en: "Connecting you.", zh-CN: "正在转接。"}
"""


@pytest.fixture(scope="module")
def flow() -> Flow:
    loaded = load_flow_text(FLOW, "nodes.yaml")
    assert loaded.warnings == []
    return loaded


@dataclass(frozen=True)
class during:  # lower case: reads as a verb in scripts, during("1")
    digit: str
    text: str | None = None  # pressed while this prompt text plays (default: the next prompt)


# 11:00 on Wednesday 15 May 2024 in Shanghai (UTC+8): the office is open
OPEN = dt.datetime(2024, 5, 15, 3, 0, tzinfo=dt.UTC)


class FakeCall:
    """The CallContext surface the nodes use, recording what they do."""

    def __init__(self, flow: Flow, script: list[str | during | None] | None = None, *, language: str = "en",
                 caller_country: str | None = "US", now: dt.datetime = OPEN,
                 variables: dict[str, str] | None = None) -> None:
        self.flow = flow
        self.language = language
        self.caller_country = caller_country
        self.script = list(script or [])
        self.vars = dict(variables or {})
        self._now = now
        self.played: list[str] = []  # prompt texts in the order they were played
        self.escapes: list[str] = []  # escape digits of each play
        self.waits: list[float] = []  # the timeout of each wait for a digit
        self.steps: list[tuple[str, str, str | None]] = []
        self.transferred: str | None = None
        self.hung_up = False

    def now(self) -> dt.datetime:
        return self._now

    async def play(self, prompt: Prompt, escape_digits: str = "") -> str | None:
        for _, text in prompt.for_language(self.language):
            self.played.append(text)
            self.escapes.append(escape_digits)
            pressed = self.script[0] if self.script else None
            if isinstance(pressed, during) and pressed.text in (None, text):
                self.script.pop(0)
                if pressed.digit in escape_digits:
                    return pressed.digit  # interrupts the prompt; the rest (other languages) is not played
        return None

    async def wait_digit(self, seconds: float) -> str | None:
        self.waits.append(seconds)
        if not self.script:
            return None
        item = self.script.pop(0)
        assert not isinstance(item, during), "the script presses a key during a prompt, but none is playing"
        return item

    def record(self, node: str, event: str, value: str | None = None) -> None:
        self.steps.append((node, event, value))

    def set_var(self, name: str, value: str, record: bool = True) -> None:
        self.vars[name] = value
        if name == "language" and value in self.flow.languages:
            self.language = value

    def get_var(self, name: str) -> str | None:
        return self.language if name == "language" else self.vars.get(name)

    async def transfer(self, destination: str) -> None:
        assert destination in self.flow.destinations
        self.transferred = destination

    async def hangup(self) -> None:
        self.hung_up = True


async def run(node: Node, call: FakeCall) -> str | None:
    return await node.run(call)  # type: ignore[arg-type]


async def run_flow(call: FakeCall, start: str | None = None) -> list[str]:
    """Run nodes from ``start`` (the entry) until the call ends; returns the nodes visited."""
    path: list[str] = []
    node_id: str | None = start or call.flow.entry
    while node_id is not None:
        assert len(path) < 50, f"runaway flow: {path}"
        path.append(node_id)
        node_id = await run(call.flow.nodes[node_id], call)
    return path


# ------------------------------------------------------------------------------------------------- menu
async def test_menu_choice_after_the_prompt(flow: Flow) -> None:
    call = FakeCall(flow, ["1"])
    assert await run(flow.nodes["main"], call) == "order"
    assert call.played == ["Main menu."]
    assert call.escapes == ["0123456789*#"]  # any key interrupts: a wrong one gets the 'invalid' answer
    assert call.waits == [3]
    assert call.steps == [("main", "chose", "1")]
    assert call.vars == {"intent": "orders"}


async def test_menu_choice_during_the_prompt_does_not_wait(flow: Flow) -> None:
    call = FakeCall(flow, [during("0")])
    assert await run(flow.nodes["main"], call) == "agent"
    assert call.waits == []
    assert call.steps == [("main", "chose", "0")]


async def test_menu_wrong_key_during_the_prompt_is_invalid(flow: Flow) -> None:
    call = FakeCall(flow, [during("7"), "2"])
    assert await run(flow.nodes["main"], call) == "thanks"
    assert call.played == ["Main menu.", "Invalid.", "Main menu."]
    assert call.steps == [("main", "invalid", "7"), ("main", "chose", "2")]


async def test_menu_no_input_reprompts_then_fails(flow: Flow) -> None:
    """retries: 2 -> three attempts; the no-input prompt after the first two, not after the last."""
    call = FakeCall(flow, [])
    assert await run(flow.nodes["main"], call) == "agent"
    assert call.played == ["Main menu.", "No input.", "Main menu.", "No input.", "Main menu."]
    assert call.waits == [3, 3, 3]
    assert call.steps == [("main", "no-input", None)] * 3 + [("main", "failed", None)]
    assert call.vars == {}


async def test_menu_no_input_then_a_choice(flow: Flow) -> None:
    call = FakeCall(flow, [None, "1"])
    assert await run(flow.nodes["main"], call) == "order"
    assert call.played == ["Main menu.", "No input.", "Main menu."]
    assert call.steps == [("main", "no-input", None), ("main", "chose", "1")]


async def test_menu_invalid_digit_plays_the_invalid_prompt(flow: Flow) -> None:
    call = FakeCall(flow, ["9", "1"])
    assert await run(flow.nodes["main"], call) == "order"
    assert call.played == ["Main menu.", "Invalid.", "Main menu."]
    assert call.steps == [("main", "invalid", "9"), ("main", "chose", "1")]


async def test_menu_invalid_every_time_fails_without_a_last_reprompt(flow: Flow) -> None:
    call = FakeCall(flow, ["9", "*", "#"])
    assert await run(flow.nodes["main"], call) == "agent"
    assert call.played == ["Main menu.", "Invalid.", "Main menu.", "Invalid.", "Main menu."]
    assert [s[1] for s in call.steps] == ["invalid", "invalid", "invalid", "failed"]


async def test_menu_without_reprompts_repeats_only_the_prompt(flow: Flow) -> None:
    """The language menu has no no_input prompt and retries: 1; its prompt plays every language."""
    call = FakeCall(flow, [])
    assert await run(flow.nodes["lang"], call) == "main"
    assert call.played == ["For English, press 1.", "普通话请按2。"] * 2
    assert call.waits == [4, 4]
    assert call.steps[-1] == ("lang", "failed", None)


async def test_menu_retries_zero_means_one_attempt() -> None:
    node = MenuNode.model_validate({"id": "m", "type": "menu", "prompt": {"en": "Menu."}, "retries": 0,
                                    "no_input": {"en": "Again?"}, "options": {"1": {"next": "x"}},
                                    "on_failure": "out"})
    call = FakeCall(_one_language_flow(), [])
    assert await run(node, call) == "out"
    assert call.played == ["Menu."]


async def test_option_set_switches_the_language(flow: Flow) -> None:
    call = FakeCall(flow, [during("2")])
    assert await run(flow.nodes["lang"], call) == "main"
    assert call.played == ["For English, press 1."]  # interrupted before the Chinese half
    assert call.language == "zh-CN"
    assert call.vars == {"language": "zh-CN"}
    call.script = ["0"]
    assert await run(flow.nodes["main"], call) == "agent"
    assert call.played[-1] == "主菜单。"


async def test_barge_in_during_the_second_language(flow: Flow) -> None:
    call = FakeCall(flow, [during("1", "普通话请按2。")])
    assert await run(flow.nodes["lang"], call) == "main"
    assert call.played == ["For English, press 1.", "普通话请按2。"]
    assert call.language == "en" and call.waits == []


# ----------------------------------------------------------------------------------------------- collect
async def test_collect_until_the_terminator(flow: Flow) -> None:
    call = FakeCall(flow, ["1", "2", "3", "4", "#"])
    assert await run(flow.nodes["order"], call) == "thanks"
    assert call.vars == {"order": "1234"}
    assert call.played == ["Order number."]
    assert call.escapes == ["0123456789*#"]
    assert call.waits == [5, 2, 2, 2, 2]  # the first digit within timeout, the others within inter_digit_timeout
    assert call.steps == [("order", "collected", "1234")]


async def test_collect_typed_during_the_prompt(flow: Flow) -> None:
    call = FakeCall(flow, [during("9"), "8", "7", "6", "#"])
    assert await run(flow.nodes["order"], call) == "thanks"
    assert call.vars == {"order": "9876"}
    assert call.waits == [2, 2, 2, 2]


async def test_collect_stops_at_max_digits(flow: Flow) -> None:
    call = FakeCall(flow, ["1", "2", "3", "4", "5", "6", "7", "#"])
    assert await run(flow.nodes["order"], call) == "thanks"
    assert call.vars == {"order": "123456"}
    assert call.script == ["7", "#"]  # not read: max_digits (6) ended the input
    assert len(call.waits) == 6


async def test_collect_ignores_the_other_star_hash_key(flow: Flow) -> None:
    call = FakeCall(flow, ["1", "*", "2", "3", "4", "#"])
    assert await run(flow.nodes["order"], call) == "thanks"
    assert call.vars == {"order": "1234"}


async def test_collect_ends_on_inter_digit_timeout(flow: Flow) -> None:
    call = FakeCall(flow, ["1", "2", "3", "4", "5", None])
    assert await run(flow.nodes["order"], call) == "thanks"
    assert call.vars == {"order": "12345"}


async def test_collect_too_few_digits_is_invalid(flow: Flow) -> None:
    call = FakeCall(flow, ["1", "2", "#", "1", "2", "3", "4", "#"])
    assert await run(flow.nodes["order"], call) == "thanks"
    assert call.played == ["Order number.", "Too short.", "Order number."]
    assert call.steps == [("order", "invalid", "12"), ("order", "collected", "1234")]
    assert call.vars == {"order": "1234"}


async def test_collect_too_few_every_time_fails(flow: Flow) -> None:
    call = FakeCall(flow, ["1", "#", "2", "#"])
    assert await run(flow.nodes["order"], call) == "agent"
    assert call.played == ["Order number.", "Too short.", "Order number."]  # retries: 1 -> two attempts
    assert call.steps == [("order", "invalid", "1"), ("order", "invalid", "2"), ("order", "failed", None)]
    assert "order" not in call.vars


async def test_collect_no_input(flow: Flow) -> None:
    call = FakeCall(flow, [])
    assert await run(flow.nodes["order"], call) == "agent"
    assert call.played == ["Order number.", "Nothing entered.", "Order number."]
    assert call.steps == [("order", "no-input", None), ("order", "no-input", None), ("order", "failed", None)]


async def test_collect_terminator_alone_is_no_input(flow: Flow) -> None:
    call = FakeCall(flow, ["#", "1", "2", "3", "4", "#"])
    assert await run(flow.nodes["order"], call) == "thanks"
    assert call.steps[0] == ("order", "no-input", None)


async def test_collect_without_terminator() -> None:
    node = CollectNode.model_validate({"id": "pin", "type": "collect", "prompt": {"en": "PIN."}, "var": "pin",
                                       "min_digits": 4, "max_digits": 4, "terminator": "", "next": "ok",
                                       "on_failure": "out"})
    call = FakeCall(_one_language_flow(), ["#", "1", "2", "3", "4"])
    assert await run(node, call) == "ok"
    assert call.vars == {"pin": "1234"}  # "#" is just ignored when there is no terminator


# --------------------------------------------------------------------------------------------- condition
@pytest.mark.parametrize(("now", "expected"), [
    (dt.datetime(2024, 5, 15, 3, 0, tzinfo=dt.UTC), "main"),       # Wed 11:00 Shanghai
    (dt.datetime(2024, 5, 15, 1, 0, tzinfo=dt.UTC), "main"),       # Wed 09:00 Shanghai: opening time is open
    (dt.datetime(2024, 5, 15, 0, 59, tzinfo=dt.UTC), "closed"),    # Wed 08:59
    (dt.datetime(2024, 5, 15, 10, 0, tzinfo=dt.UTC), "closed"),    # Wed 18:00: closing time is closed
    (dt.datetime(2024, 5, 14, 20, 30, tzinfo=dt.UTC), "closed"),   # Tue 20:30 UTC is Wed 04:30 in Shanghai
    (dt.datetime(2024, 5, 18, 3, 0, tzinfo=dt.UTC), "closed"),     # Saturday
    (dt.datetime(2024, 10, 1, 3, 0, tzinfo=dt.UTC), "closed"),     # a closed date (a Tuesday)
    (dt.datetime(2024, 5, 17, 9, 59, tzinfo=dt.timezone(dt.timedelta(hours=-5))), "closed"),  # Fri 22:59 local
    (dt.datetime(2024, 5, 16, 20, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))), "main"),    # Fri 09:00 local
])
async def test_condition_on_business_hours(flow: Flow, now: dt.datetime, expected: str) -> None:
    call = FakeCall(flow, now=now, variables={"dialled": "100"})
    assert await run(flow.nodes["route"], call) == expected
    assert call.steps == [("route", "case-1" if expected == "closed" else "otherwise", None)]


async def test_condition_open_case(flow: Flow) -> None:
    call = FakeCall(flow, now=OPEN, variables={"intent": "chinese"})
    assert await run(flow.nodes["check"], call) == "jump"
    assert call.steps == [("check", "case-1", None)]
    call = FakeCall(flow, now=OPEN.replace(hour=12), variables={"intent": "chinese"})
    assert await run(flow.nodes["check"], call) == "bye"


@pytest.mark.parametrize(("country", "expected"), [("CN", "set_zh"), ("HK", "set_zh"), ("US", "main"),
                                                    (None, "main")])
async def test_condition_on_caller_country(flow: Flow, country: str | None, expected: str) -> None:
    call = FakeCall(flow, caller_country=country, variables={"dialled": "100"})
    assert await run(flow.nodes["route"], call) == expected


@pytest.mark.parametrize(("dialled", "expected"), [("102", "lang"), ("1020", "main"), ("", "main")])
async def test_condition_var_equals(flow: Flow, dialled: str, expected: str) -> None:
    call = FakeCall(flow, variables={"dialled": dialled})
    assert await run(flow.nodes["route"], call) == expected


async def test_condition_var_equals_comes_first(flow: Flow) -> None:
    """Cases are tried in order: 102 goes to the language menu even when closed or from China."""
    call = FakeCall(flow, caller_country="CN", now=OPEN.replace(hour=15), variables={"dialled": "102"})
    assert await run(flow.nodes["route"], call) == "lang"
    assert call.steps == [("route", "case-0", None)]


async def test_condition_unset_variable_is_not_equal(flow: Flow) -> None:
    call = FakeCall(flow)
    assert await run(flow.nodes["route"], call) == "main"


@pytest.mark.parametrize(("intent", "expected"), [("billing", "main"), ("orders", "main"), ("other", "jump"),
                                                  (None, "jump")])
async def test_condition_var_in(flow: Flow, intent: str | None, expected: str) -> None:
    call = FakeCall(flow, variables={"intent": intent} if intent else {})
    assert await run(flow.nodes["check"], call) == expected


# ------------------------------------------------------------------------------------ set, say, goto, ...
async def test_set_node(flow: Flow) -> None:
    call = FakeCall(flow)
    assert await run(flow.nodes["set_zh"], call) == "check"
    assert call.vars == {"language": "zh-CN", "intent": "chinese"}
    assert call.language == "zh-CN"
    assert call.played == []


async def test_say_goes_on(flow: Flow) -> None:
    call = FakeCall(flow, language="zh-CN")
    assert await run(flow.nodes["thanks"], call) == "bye"
    assert call.played == ["谢谢。"]
    assert call.escapes == [""]  # a say prompt is not interrupted by keys


async def test_say_without_next_ends_the_call(flow: Flow) -> None:
    call = FakeCall(flow, [during("1")])
    assert await run(flow.nodes["closed"], call) is None
    assert call.played == ["We are closed."]
    assert not call.hung_up and call.transferred is None


async def test_goto(flow: Flow) -> None:
    call = FakeCall(flow)
    assert await run(flow.nodes["jump"], call) == "main"
    assert call.played == [] and call.steps == [] and call.waits == []


async def test_transfer(flow: Flow) -> None:
    call = FakeCall(flow)
    assert await run(flow.nodes["agent"], call) is None
    assert call.played == ["Connecting you."]
    assert call.transferred == "operator"
    assert not call.hung_up


async def test_hangup(flow: Flow) -> None:
    call = FakeCall(flow, language="zh-CN")
    assert await run(flow.nodes["bye"], call) is None
    assert call.played == ["再见。"]
    assert call.hung_up


async def test_hangup_without_prompt() -> None:
    flow = _one_language_flow()
    call = FakeCall(flow)
    assert await run(flow.nodes["bye"], call) is None
    assert call.played == [] and call.hung_up


# -------------------------------------------------------------------------------------------- whole calls
async def test_whole_call_order_tracking(flow: Flow) -> None:
    call = FakeCall(flow, ["1", "1", "2", "3", "4", "5", "#"], variables={"dialled": "100"})
    assert await run_flow(call) == ["route", "main", "order", "thanks", "bye"]
    assert call.vars == {"dialled": "100", "intent": "orders", "order": "12345"}
    assert call.played == ["Main menu.", "Order number.", "Thanks.", "Goodbye."]
    assert call.hung_up


async def test_whole_call_language_menu_in_chinese(flow: Flow) -> None:
    call = FakeCall(flow, [during("2"), "0"], variables={"dialled": "102"})
    assert await run_flow(call) == ["route", "lang", "main", "agent"]
    assert call.played == ["For English, press 1.", "主菜单。", "正在转接。"]
    assert call.transferred == "operator"


async def test_whole_call_from_china_when_closed(flow: Flow) -> None:
    call = FakeCall(flow, caller_country="CN", now=OPEN.replace(hour=11), variables={"dialled": "100"})
    assert await run_flow(call) == ["route", "closed"]  # 19:00 in Shanghai: the hours case comes first


async def test_whole_call_from_china_when_open(flow: Flow) -> None:
    call = FakeCall(flow, [during("2")], caller_country="CN", variables={"dialled": "100"})
    assert await run_flow(call) == ["route", "set_zh", "check", "jump", "main", "thanks", "bye"]
    assert call.played == ["主菜单。", "谢谢。", "再见。"]


async def test_whole_call_silent_caller_reaches_a_person(flow: Flow) -> None:
    call = FakeCall(flow, [], variables={"dialled": "100"})
    assert await run_flow(call) == ["route", "main", "agent"]
    assert call.transferred == "operator"


def _one_language_flow() -> Flow:
    return load_flow_text("flow: one\nlanguages: [en]\nentry: bye\nnodes:\n  bye: {type: hangup}\n", "one.yaml")


def test_fake_call_matches_the_engine_interface() -> None:
    """The fake offers every CallContext method the nodes call, with the same parameters."""
    import inspect

    from ivr.engine import CallContext

    for name in ("play", "wait_digit", "record", "set_var", "get_var", "transfer", "hangup", "now"):
        real: Any = inspect.signature(getattr(CallContext, name))
        fake: Any = inspect.signature(getattr(FakeCall, name))
        assert list(real.parameters) == list(fake.parameters), name
    assert isinstance(inspect.getattr_static(CallContext, "caller_country"), property)
