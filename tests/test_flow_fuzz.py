"""Property tests: no input makes the flow loader fail with anything but FlowError, and what it accepts is sound.

Inputs: arbitrary text, YAML documents built from random dicts/lists/scalars (shapeless, and shaped like a flow),
and mutations of the shipped hotline flow. A flow the loader returns must have an entry that exists, every edge
pointing at a node, transfers only to allowlisted destinations, hours that exist and a prompt text for every
language; a FlowError must name only errors, each at a position inside the file.
"""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from bridge.catalogue import load_catalogue
from ivr.flow import Flow, FlowError, Prompt, load_flow_text
from ivr.nodes import NODE_TYPES, ConditionNode, TransferNode

pytestmark = pytest.mark.unit

HOTLINE = Path(__file__).resolve().parent.parent / "flows" / "hotline.yaml"
CATALOGUE = load_catalogue([HOTLINE.parent])[0]
HOTLINE_TEXT = HOTLINE.read_text(encoding="utf-8")
HOTLINE_DOC: dict[str, Any] = YAML(typ="safe", pure=True).load(HOTLINE_TEXT)

# derandomize: the same examples every run (and no example database written into the tree)
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# the pure-Python round-trip parser takes ~35 ms for the hotline flow: fewer examples keep these near 5 s
HOTLINE_FUZZ = settings(FUZZ, max_examples=150)
LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")


def check(text: str) -> Flow | None:
    """Load ``text``; only FlowError may escape, and whatever comes back must be sound."""
    try:
        flow = load_flow_text(text, "fuzz.yaml", CATALOGUE)
    except FlowError as exc:
        assert exc.problems
        last_line = len(LINE_BREAK.findall(text)) + 2
        for problem in exc.problems:
            assert problem.severity == "error"
            assert problem.file == "fuzz.yaml"
            assert 1 <= problem.line <= last_line, problem
            assert problem.column >= 1, problem
            assert str(problem).startswith(f"fuzz.yaml:{problem.line}:{problem.column}: error: ")
        return None
    assert_sound(flow)
    return flow


def assert_sound(flow: Flow) -> None:
    assert flow.entry in flow.nodes
    assert flow.languages and flow.default_language in flow.languages
    assert set(flow.numbers.values()) <= set(flow.languages)
    assert all(w.severity == "warning" for w in flow.warnings)
    for node_id, node in flow.nodes.items():
        assert node.id == node_id
        for target, _ in node.edges():
            assert target in flow.nodes, f"{node_id} -> {target}"
        if isinstance(node, TransferNode):
            assert node.destination in flow.destinations
        if isinstance(node, ConditionNode):
            for case in node.cases:
                for hours in (case.open, case.closed):
                    assert hours is None or hours in flow.hours
        for _, prompt in node.prompts():
            assert isinstance(prompt, Prompt)
            assert set(prompt.text) == set(flow.languages)
            assert all("\n" not in t and "\r" not in t and "\x00" not in t for t in prompt.text.values())
    # no trap: from every node some node that ends the call (hang up, transfer, the last say) can be reached
    ends = {node_id for node_id, node in flow.nodes.items() if node.terminal}
    changed = True
    while changed:
        before = len(ends)
        ends |= {node_id for node_id, node in flow.nodes.items() if any(t in ends for t, _ in node.edges())}
        changed = len(ends) != before
    assert ends == set(flow.nodes), f"no way out from {sorted(set(flow.nodes) - ends)}"
    # and every node is reachable from the entry
    seen, todo = {flow.entry}, [flow.entry]
    while todo:
        for target, _ in flow.nodes[todo.pop()].edges():
            if target not in seen:
                seen.add(target)
                todo.append(target)
    assert seen == set(flow.nodes)


def dump(doc: Any) -> str:
    yaml = YAML(typ="safe", pure=True)
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------ (a) text
YAML_CHARS = st.sampled_from([*":-?[]{},#&*!|>'\"%@`\t\r\n\x00 \\", "  ", "\n  ", "\n- ", ": ", "${", "\ufeff"])
TEXT = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Lu", "Ll", "Nd", "P", "S", "Zs"])),
    st.lists(st.one_of(YAML_CHARS, st.text(max_size=5)), max_size=60).map("".join),
)


@settings(FUZZ, max_examples=300)
@given(TEXT)
def test_arbitrary_text(text: str) -> None:
    check(text)


@HOTLINE_FUZZ
@given(st.data())
def test_hotline_text_with_characters_spliced_in(data: st.DataObject) -> None:
    """Byte-level damage to a real flow: the parser's errors must keep their positions inside the file."""
    text = HOTLINE_TEXT
    for _ in range(data.draw(st.integers(1, 3))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 20)))
        text = text[:start] + data.draw(st.one_of(YAML_CHARS, st.text(max_size=4))) + text[end:]
    check(text)


# ------------------------------------------------------------------------------------------- (b) documents
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.sampled_from(["", "0", "1", "12", "#", "*", "en", "zh-CN", "00:00", "23:59", "UTC", "${EPOCH}", "a,b"]),
)
KEYS = st.one_of(st.text(max_size=12), st.integers(-5, 20), st.booleans())
DOCUMENTS = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=25)


@settings(FUZZ, max_examples=300)
@given(DOCUMENTS)
def test_random_documents(doc: Any) -> None:
    check(dump(doc))


NODE_IDS = st.sampled_from(["start", "main", "bye", "agent", "loop"])
LANGS = st.sampled_from(["en", "zh-CN", "fr"])
PROMPTS = st.one_of(
    st.dictionaries(LANGS, st.sampled_from(["Hello.", "", "a\r\nb", "你好"]), max_size=3),
    st.fixed_dictionaries({"all_languages": st.booleans(),
                           "text": st.dictionaries(LANGS, st.just("Hi."), max_size=3)}),
    SCALARS,
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": PROMPTS, "no_input": PROMPTS, "invalid": PROMPTS,
    "next": NODE_IDS, "on_failure": NODE_IDS, "otherwise": NODE_IDS,
    "options": st.dictionaries(st.sampled_from(["0", "1", "2", "#", "12", "a"]),
                               st.fixed_dictionaries({"next": NODE_IDS},
                                                     optional={"set": st.dictionaries(
                                                         st.sampled_from(["language", "intent", "bad name"]),
                                                         st.sampled_from(["en", "zh-CN", "fr", "x", "${X}"]),
                                                         max_size=2)}),
                               max_size=3),
    "cases": st.lists(st.fixed_dictionaries(
        {"next": NODE_IDS},
        optional={"open": st.sampled_from(["office", "nope"]), "closed": st.sampled_from(["office", "nope"]),
                  "caller_country": st.lists(st.sampled_from(["CN", "US"]), max_size=2),
                  "var": st.sampled_from(["dialled", "language"]), "equals": st.just("102"),
                  "in": st.lists(st.just("en"), max_size=2)}), max_size=3),
    "values": st.dictionaries(st.sampled_from(["language", "intent"]), st.sampled_from(["en", "fr", "x"]),
                              min_size=1, max_size=2),
    "destination": st.sampled_from(["operator", "sales"]),
    "var": st.sampled_from(["order", "bad-name"]),
    "min_digits": st.integers(0, 40), "max_digits": st.integers(0, 40),
    "terminator": st.sampled_from(["#", "*", "", "1"]),
    "timeout": st.one_of(st.integers(-1, 100), st.floats(allow_nan=True)),
    "retries": st.integers(-1, 9),
}
NODE_BODIES = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(sorted(NODE_TYPES)), SCALARS)},
    optional={name: strategy for name, strategy in FIELD_VALUES.items()},
)
FLOW_DOCUMENTS = st.fixed_dictionaries(
    {"flow": st.sampled_from(["t", "bad name"]), "entry": NODE_IDS,
     "languages": st.lists(LANGS, min_size=1, max_size=2, unique=True),
     "nodes": st.dictionaries(NODE_IDS, NODE_BODIES, min_size=1, max_size=5)},
    optional={"numbers": st.dictionaries(st.sampled_from(["100", "+86100", "1a"]), LANGS, max_size=2),
              "destinations": st.just({"operator": {"context": "ivr-transfer", "exten": "operator"}}),
              "hours": st.dictionaries(st.just("office"), st.fixed_dictionaries(
                  {}, optional={"timezone": st.sampled_from(["UTC", "Asia/Shanghai", "Nowhere/Else", "a/" * 40]),
                                "open": st.sampled_from(["09:00", "25:00", 9]),
                                "close": st.sampled_from(["18:00", "08:00"]),
                                "days": st.lists(st.sampled_from(["mon", "sun", "xyz"]), max_size=2)}),
                  max_size=1),
              "default_language": LANGS, "unknown": SCALARS},
)


# Well-formed nodes n0..nk wired at random, with one edge of each node leading on to the next one (so most are
# reachable) and the others anywhere (so there are loops, some with no exit): many of these flows load, which
# exercises the soundness of what the loader accepts, not only its refusals.
GOOD_PROMPT = st.sampled_from([{"en": "Hello."}, {"all_languages": True, "text": {"en": "Press 1."}}])


def well_formed_node(onward: st.SearchStrategy[str], anywhere: st.SearchStrategy[str],
                     last: bool) -> st.SearchStrategy[dict[str, Any]]:
    option = st.fixed_dictionaries({"next": anywhere},
                                   optional={"set": st.sampled_from([{"language": "en"}, {"intent": "billing"}])})
    case = st.one_of(
        st.fixed_dictionaries({"open": st.just("office"), "next": anywhere}),
        st.fixed_dictionaries({"closed": st.just("office"), "next": anywhere}),
        st.fixed_dictionaries({"caller_country": st.just(["CN"]), "next": anywhere}),
        st.fixed_dictionaries({"var": st.just("dialled"), "equals": st.just("102"), "next": anywhere}),
        st.fixed_dictionaries({"var": st.just("language"), "in": st.just(["en"]), "next": anywhere}),
    )
    going_on = [
        st.fixed_dictionaries({"type": st.just("say"), "prompt": GOOD_PROMPT, "next": onward}),
        st.fixed_dictionaries({"type": st.just("menu"), "prompt": GOOD_PROMPT, "on_failure": onward,
                               "options": st.dictionaries(st.sampled_from("0129#"), option, min_size=1, max_size=3)},
                              optional={"no_input": GOOD_PROMPT, "retries": st.integers(0, 5)}),
        st.fixed_dictionaries({"type": st.just("collect"), "prompt": GOOD_PROMPT, "var": st.just("order"),
                               "next": anywhere, "on_failure": onward},
                              optional={"min_digits": st.integers(1, 4), "max_digits": st.integers(4, 32)}),
        st.fixed_dictionaries({"type": st.just("set"), "next": onward,
                               "values": st.sampled_from([{"language": "en"}, {"intent": "billing"}])}),
        st.fixed_dictionaries({"type": st.just("condition"), "cases": st.lists(case, min_size=1, max_size=2),
                               "otherwise": onward}),
        st.fixed_dictionaries({"type": st.just("goto"), "next": onward}),
    ]
    ending = [
        st.fixed_dictionaries({"type": st.just("say"), "prompt": GOOD_PROMPT}),
        st.fixed_dictionaries({"type": st.just("transfer"), "destination": st.just("operator")}),
        st.fixed_dictionaries({"type": st.just("hangup")}, optional={"prompt": GOOD_PROMPT}),
    ]
    return st.one_of(*ending, *going_on) if last else st.one_of(*going_on)


@st.composite
def wired_flows(draw: st.DrawFn) -> dict[str, Any]:
    ids = [f"n{i}" for i in range(draw(st.integers(1, 6)))]
    anywhere = st.sampled_from(ids)
    nodes = {node_id: draw(well_formed_node(st.just(ids[i + 1]) if i + 1 < len(ids) else anywhere, anywhere,
                                            last=i + 1 == len(ids)))
             for i, node_id in enumerate(ids)}
    return {"flow": "t", "languages": ["en"], "entry": "n0",
            "destinations": {"operator": {"context": "ivr-transfer", "exten": "operator"}},
            "hours": {"office": {"timezone": "Asia/Shanghai"}}, "nodes": nodes}


@FUZZ
@given(st.one_of(FLOW_DOCUMENTS, wired_flows()))
def test_flow_shaped_documents(doc: dict[str, Any]) -> None:
    check(dump(doc))


def test_flow_shaped_documents_do_load_sometimes() -> None:
    """The flow-shaped strategy is not wasted: valid documents from it exist and load."""
    doc = {"flow": "t", "entry": "start", "languages": ["en"],
           "nodes": {"start": {"type": "say", "prompt": {"en": "Hello."}, "next": "bye"}, "bye": {"type": "hangup"}}}
    assert check(dump(doc)) is not None


# ------------------------------------------------------------------------------------------- (c) mutations
def locations(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in the document."""
    out = [path] if path else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += locations(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += locations(value, (*path, i))
    return out


def container(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


REFERENCES = ("next", "on_failure", "otherwise", "entry", "on_unavailable", "on_timeout", "after")


def rename(doc: dict[str, Any], old: str, new: Any) -> dict[str, Any]:
    """Rename a node and every reference to it (next, on_failure, otherwise, entry)."""
    def refs(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: new if k in REFERENCES and v == old else refs(v) for k, v in value.items()}
        if isinstance(value, list):
            return [refs(v) for v in value]
        return value

    out = refs(doc)
    out["nodes"] = {(new if k == old else k): v for k, v in out["nodes"].items()}
    return out


VALUES = st.one_of(SCALARS, NODE_IDS, st.sampled_from(list(HOTLINE_DOC["nodes"])),
                   st.lists(SCALARS, max_size=3), st.dictionaries(KEYS, SCALARS, max_size=3))


@st.composite
def mutated_hotline(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(HOTLINE_DOC)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "replace", "rename_node", "rename_node_everywhere", "add_field"]))
        if op in ("rename_node", "rename_node_everywhere"):
            nodes = doc.get("nodes") if isinstance(doc, dict) else None
            if not isinstance(nodes, dict) or not nodes:
                continue
            old = draw(st.sampled_from(sorted(nodes, key=str)))
            new = draw(st.one_of(st.sampled_from(["renamed", "main", "bad name", "x${y}"]), KEYS))
            if op == "rename_node":
                doc["nodes"] = {(new if k == old else k): v for k, v in nodes.items()}
            else:
                doc = rename(doc, old, new)
            continue
        paths = locations(doc)
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        parent = container(doc, path)
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = draw(VALUES)
        elif isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return doc


@HOTLINE_FUZZ
@given(mutated_hotline())
def test_mutated_hotline(doc: Any) -> None:
    check(json.dumps(doc, ensure_ascii=False, indent=1))  # JSON is YAML, and dumps 50 times faster than ruamel


@settings(FUZZ, max_examples=20)
@given(st.sampled_from(sorted(HOTLINE_DOC["nodes"])), st.sampled_from(["renamed", "n-1", "X_2", "007"]))
def test_renaming_a_node_everywhere_keeps_the_flow_valid(old: str, new: str) -> None:
    flow = check(json.dumps(rename(copy.deepcopy(HOTLINE_DOC), old, new), ensure_ascii=False))
    assert flow is not None
    assert new in flow.nodes and old not in flow.nodes
    assert flow.warnings == []


def test_unmutated_hotline_round_trips() -> None:
    flow = check(dump(HOTLINE_DOC))
    assert flow is not None and flow.warnings == []


# ------------------------------------------------------------------------------------------------ found ones
@pytest.mark.parametrize("text", [
    "flow: t\nlanguages: [en]\nentry: s\nhours: {h: {timezone: " + "a/" * 3000 + "a}}\nnodes: {s: {type: hangup}}\n",
    "[" * 600,  # ruamel's scanner is quadratic in flow nesting: 2000 "[" take seconds to refuse
    "{a: " * 600,
    "- " * 1000 + "x",
    "&a [*a]",
    "? {a: b}\n: c\n",
    "? [a, [b]]\n: c\n",
    "%YAML 1.1\n---\nflow: t\n",
    "--- a\n--- b\n",
    "flow: !!python/object:os.system {}\n",
    "a: !!binary ====\n",
    "a: !!timestamp nonsense\n",
    "a: !!int zz\n",
    "<<: *x\n",
    "\ufeffflow: t\n",
])
def test_nasty_documents(text: str) -> None:
    check(text)
