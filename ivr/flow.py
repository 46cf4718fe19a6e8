"""Call flows as YAML: loading with file:line positions, validation and lint.

A flow file is a mapping with a ``flow:`` name, the languages it speaks, the dialled numbers it answers, allowlisted
transfer destinations, business hours and ``nodes``. Node types are registered by their YAML ``type:`` in
``ivr.nodes``; this module checks the graph they form (dangling ``next``, unreachable nodes, cycles with no exit)
and lints it (menu depth, the "0 = a person" escape, prompt length).
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bridge.catalogue import Catalogue, load_catalogue
from bridge.yamldoc import DocumentError, Positions, Problem, Reporter, Severity, count_errors, parse_yaml, plain
from ivr.safe import NAME_RE, NUMBER_RE, check_text

MAX_MENU_DEPTH = 3
MAX_PROMPT_SECONDS = 15.0
DIGITS = frozenset("0123456789*#")


class FlowError(DocumentError):
    """A flow file that cannot be used; ``problems`` names every error with its position."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class Prompt(Strict):
    """Text per language; ``all_languages`` plays every language in turn (used by the language menu)."""

    text: dict[str, str]
    all_languages: bool = False

    def for_language(self, language: str) -> list[tuple[str, str]]:
        if self.all_languages:
            return list(self.text.items())
        return [(language, self.text[language])]

    def estimated_seconds(self) -> float:
        return sum(estimate_speech_seconds(t, lang) for lang, t in self.text.items()) if self.all_languages \
            else max((estimate_speech_seconds(t, lang) for lang, t in self.text.items()), default=0.0)


def estimate_speech_seconds(text: str, language: str) -> float:
    """Rough spoken length: ~4.5 Han characters or ~2.5 words a second, as TTS voices speak."""
    han = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    words = len(re.findall(r"[A-Za-z0-9']+", text))
    return han / 4.5 + words / 2.5


class Hours(Strict):
    """Opening hours: weekdays (mon..sun) and a daily window in a time zone."""

    timezone: str = "UTC"
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = ["mon", "tue", "wed", "thu", "fri"]
    open: dt.time = dt.time(9, 0)
    close: dt.time = dt.time(18, 0)
    closed_dates: list[dt.date] = []

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:  # the shape check first: ZoneInfo("a/a/a/...") overflows the stack instead of raising ValueError
            if len(value) > 64 or not re.fullmatch(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*", value):
                raise ValueError(value)
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("open", "close")
    @classmethod
    def _local_time(cls, value: dt.time) -> dt.time:  # 0 or "09:00Z" parse to aware times that is_open can't compare
        if value.tzinfo is not None:
            raise ValueError("must be a time of day like 09:00, without an offset (the zone is 'timezone')")
        return value

    @model_validator(mode="after")
    def _window(self) -> Hours:
        if self.close <= self.open:  # is_open() has no windows over midnight: they would never be open
            raise ValueError(f"close {self.close:%H:%M} is not after open {self.open:%H:%M}")
        return self

    def is_open(self, now: dt.datetime) -> bool:
        local = now.astimezone(zoneinfo.ZoneInfo(self.timezone))
        day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[local.weekday()]
        if day not in self.days or local.date() in self.closed_dates:
            return False
        return self.open <= local.time().replace(tzinfo=None) < self.close


class Destination(Strict):
    """A dialplan place a flow may transfer to; only these names reach Asterisk."""

    context: str
    exten: str

    @field_validator("context", "exten")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a plain dialplan name (letters, digits, _ - +)")
        return value


class AfterCallWhen(Strict):
    """Which ended calls a rule applies to; an unset test matches every call."""

    outcome: list[Literal["completed", "transferred", "abandoned", "failed", "answered", "callback", "chat",
                          "callback_failed"]] | None = None
    intent: list[str] | None = None
    has_intent: bool | None = None

    def matches(self, outcome: str, intent: str | None) -> bool:
        if self.outcome is not None and outcome not in self.outcome:
            return False
        if self.intent is not None and intent not in self.intent:
            return False
        return self.has_intent is None or self.has_intent == bool(intent)


class AfterCallRule(Strict):
    """A follow-up sent when a call ends: a message (about an article, the call's intent's article, or none)."""

    when: AfterCallWhen = AfterCallWhen()
    channel: Literal["sms", "email"] = "sms"
    message: str
    article: str | None = None
    from_intent: bool = False

    @model_validator(mode="after")
    def _what(self) -> AfterCallRule:
        if self.article is not None and self.from_intent:
            raise ValueError("give 'article' or 'from_intent', not both")
        return self


@dataclass
class Flow:
    """A validated flow; immutable once loaded so running calls keep the version they started with."""

    name: str
    path: str
    languages: list[str]
    default_language: str
    entry: str
    numbers: dict[str, str]
    destinations: dict[str, Destination]
    hours: dict[str, Hours]
    nodes: dict[str, Any]  # node id -> ivr.nodes.Node
    after_call: list[AfterCallRule] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- loading
def _dialled_number(number: str) -> str:
    if not NUMBER_RE.fullmatch(number):
        raise ValueError(f"dialled number {number!r} must be digits, optionally with a leading +")
    return number


class FlowHeader(Strict):
    flow: str
    description: str = ""
    languages: list[str] = Field(min_length=1)
    default_language: str | None = None
    entry: str
    numbers: dict[Annotated[str, AfterValidator(_dialled_number)], str] = {}  # per key: errors point at it
    destinations: dict[str, Destination] = {}
    hours: dict[str, Hours] = {}
    after_call: list[AfterCallRule] = []
    nodes: dict[str, Any] = Field(min_length=1)

    @field_validator("flow", "entry")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a plain name (letters, digits, _ - +)")
        return value

    @field_validator("languages")
    @classmethod
    def _languages(cls, value: list[str]) -> list[str]:
        for lang in value:
            if not re.fullmatch(r"[a-z]{2}(-[A-Z]{2})?", lang):
                raise ValueError(f"{lang!r} is not a language tag like en or zh-CN")
        return value



class Loader(Reporter):
    """Parses one flow document; collects every problem instead of stopping at the first."""

    def __init__(self, path: str, text: str, catalogue: Catalogue | None = None) -> None:
        super().__init__(path)
        self.text = text
        self.catalogue = catalogue

    def positions_keys(self, path: Iterable[Any]) -> list[Any]:
        return self.positions.keys(path)

    def parse_yaml(self) -> Any:
        doc, problems = parse_yaml(self.path, self.text)
        self.problems.extend(problems)
        return doc

    def load(self) -> Flow | None:
        from ivr.nodes import parse_node  # node types register themselves there

        doc = self.parse_yaml()
        if self.problems:
            return None
        self.positions = Positions(doc)
        if not isinstance(doc, Mapping):
            self.problem((), "a flow file must be a mapping with 'flow', 'languages', 'entry' and 'nodes'")
            return None
        raw = plain(doc)
        try:
            header = FlowHeader.model_validate(raw)
        except ValidationError as exc:
            self.validation_errors(exc, (), "flow")
            return None
        default_language = header.default_language or header.languages[0]
        if default_language not in header.languages:
            self.problem(("default_language",), f"default_language {default_language!r} is not in languages")
        for number, lang in header.numbers.items():
            if lang not in header.languages:
                self.problem(("numbers", number), f"number {number} speaks {lang!r}, which is not in languages")
        self.check_after_call(header)
        ctx = FlowContext(self, header)
        nodes: dict[str, Any] = {}
        for node_id, body in header.nodes.items():
            if not isinstance(node_id, str) or not NAME_RE.fullmatch(node_id):
                self.problem(("nodes", node_id), f"node id {node_id!r} must be a plain name (letters, digits, _ - +)")
                continue
            node = parse_node(ctx, node_id, body)
            if node is not None:
                nodes[node_id] = node
        flow = Flow(name=header.flow, path=self.path, languages=header.languages,
                    default_language=default_language, entry=header.entry, numbers=header.numbers,
                    destinations=header.destinations, hours=header.hours, nodes=nodes,
                    after_call=header.after_call)
        self.check_graph(flow, set(header.nodes))
        if any(p.severity == "error" for p in self.problems):
            return None
        flow.warnings = [p for p in self.problems if p.severity == "warning"]
        return flow

    def check_after_call(self, header: FlowHeader) -> None:
        for i, rule in enumerate(header.after_call):
            where = ("after_call", i)
            if self.catalogue is None:
                self.problem(where, "after_call needs the FAQ catalogue (flows/faq.yaml), which is missing or has "
                                    "errors")
                return
            message = self.catalogue.messages.get(rule.message)
            if message is None:
                self.problem((*where, "message"), f"after_call: message '{rule.message}' is not in the catalogue")
            elif rule.channel not in message.channels:
                self.problem((*where, "channel"), f"after_call: message '{rule.message}' has no {rule.channel} text")
            elif rule.article is not None and rule.article not in self.catalogue.articles:
                self.problem((*where, "article"), f"after_call: article '{rule.article}' is not in the catalogue")
            elif message.needs_article and rule.article is None and not rule.from_intent:
                self.problem(where, f"after_call: message '{rule.message}' is about an article: give 'article' or "
                                    "'from_intent: true'")

    # ---------------------------------------------------------------------------------------------- graph
    def check_graph(self, flow: Flow, all_ids: set[str]) -> None:
        """Graph checks over the nodes that parsed; ``all_ids`` also holds nodes that had errors of their own."""
        if flow.entry not in all_ids:
            self.problem(("entry",), f"entry node '{flow.entry}' does not exist")
            return
        broken = all_ids - set(flow.nodes)
        edges: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}
        for node_id, node in flow.nodes.items():
            edges[node_id] = []
            for target, path in node.edges():
                if target in broken:
                    edges[node_id].append((target, path))
                elif target not in flow.nodes:
                    self.problem(("nodes", node_id, *path), f"node '{node_id}': {path[-1]} '{target}' does not exist")
                else:
                    edges[node_id].append((target, path))
        for node_id in broken:
            edges[node_id] = []
        reachable = _reachable(flow.entry, edges)
        for node_id in flow.nodes if not reachable & broken else ():  # a reachable broken node's edges are unknown
            if node_id not in reachable:
                self.problem(("nodes", node_id), f"node '{node_id}' is unreachable from entry '{flow.entry}'")
        for component in _strongly_connected(edges):
            if len(component) == 1:
                (only,) = component
                if not any(t == only for t, _ in edges[only]):
                    continue
            leaves = any(t not in component for n in component for t, _ in edges[n])
            ends = any(n in broken or flow.nodes[n].terminal for n in component)
            if not leaves and not ends:
                first = min(component, key=lambda n: self.positions.of(("nodes", n)))
                names = ", ".join(sorted(component))
                self.problem(("nodes", first), f"cycle with no exit: {names} (no way to hang up or leave)")
        if not broken:
            self.lint(flow, edges)

    def lint(self, flow: Flow, edges: Mapping[str, list[tuple[str, tuple[Any, ...]]]]) -> None:
        depth = {flow.entry: 1 if flow.nodes[flow.entry].is_menu else 0}
        queue = [flow.entry]
        while queue:  # shortest menu depth from the entry, breadth first
            current = queue.pop(0)
            for target, _ in edges.get(current, []):
                d = depth[current] + (1 if flow.nodes[target].is_menu else 0)
                if target not in depth or d < depth[target]:
                    depth[target] = d
                    queue.append(target)
        for node_id, node in flow.nodes.items():
            where = ("nodes", node_id)
            if node.is_menu and depth.get(node_id, 0) > MAX_MENU_DEPTH:
                self.problem(where, f"menu '{node_id}' is {depth[node_id]} levels deep (keep menus to "
                                    f"{MAX_MENU_DEPTH}: callers give up)", "warning")
            if node.is_menu and "0" not in node.options:
                self.problem(where, f"menu '{node_id}' has no '0' option: callers need '0 = a person' "
                                    "at every level", "warning")
            for key, prompt in node.prompts():
                seconds = prompt.estimated_seconds()
                if seconds > MAX_PROMPT_SECONDS:
                    self.problem((*where, key), f"node '{node_id}': prompt '{key}' runs about "
                                                f"{seconds:.0f} s (over {MAX_PROMPT_SECONDS:.0f} s)", "warning")


class FlowContext:
    """What a node parser needs: the flow header and a way to report problems at positions."""

    def __init__(self, loader: Loader, header: FlowHeader) -> None:
        self.loader = loader
        self.header = header
        self.catalogue = loader.catalogue

    def problem(self, path: Iterable[Any], message: str, severity: Severity = "error") -> None:
        self.loader.problem(path, message, severity)

    def validation_errors(self, exc: ValidationError, prefix: tuple[Any, ...], what: str) -> None:
        self.loader.validation_errors(exc, prefix, what)

    def check_prompt(self, path: tuple[Any, ...], prompt: Prompt) -> bool:
        """A prompt must have text for every flow language and none for others; no control characters."""
        ok = True
        languages = self.header.languages
        for lang in languages:
            if lang not in prompt.text:
                self.problem(path, f"prompt has no {lang} text")
                ok = False
        for lang, text in prompt.text.items():
            where = (*path, lang) if lang in self.loader.positions_keys(path) else (*path, "text", lang)
            if lang not in languages:
                self.problem(where, f"prompt language {lang!r} is not in the flow's languages")
                ok = False
            elif not text.strip():
                self.problem(where, "prompt text is empty")
                ok = False
            else:
                try:
                    check_text(text, "prompt text")
                except ValueError as exc:
                    self.problem(where, str(exc))
                    ok = False
        return ok


def _reachable(start: str, edges: Mapping[str, list[tuple[str, Any]]]) -> set[str]:
    seen = {start}
    stack = [start]
    while stack:
        for target, _ in edges.get(stack.pop(), []):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def _strongly_connected(edges: Mapping[str, list[tuple[str, Any]]]) -> Iterator[set[str]]:
    """Tarjan's algorithm, iterative so a long chain of nodes cannot overflow the stack."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for target, _ in it:
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(edges.get(target, []))))
                    advanced = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                yield component


# --------------------------------------------------------------------------------------------------- API
def load_flow_text(text: str, path: str = "<flow>", catalogue: Catalogue | None = None) -> Flow:
    """Load one flow from text; raises FlowError naming every problem with file:line:column."""
    loader = Loader(path, text, catalogue)
    flow = loader.load()
    if flow is None:
        raise FlowError([p for p in loader.problems if p.severity == "error"] or
                        [Problem(path, 1, 1, "error", "flow could not be loaded")])
    return flow


def load_flow(path: Path, catalogue: Catalogue | None = None) -> Flow:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FlowError([Problem(str(path), 1, 1, "error", f"cannot read file: {exc}")]) from exc
    return load_flow_text(text, str(path), catalogue)


def flow_files(paths: Iterable[Path]) -> list[Path]:
    """Expand directories to the flow files in them (``*.yaml`` with a top-level ``flow:`` key)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for candidate in sorted(path.glob("*.y*ml")):
                if _looks_like_flow(candidate):
                    found.append(candidate)
        else:
            found.append(path)
    return found


def _looks_like_flow(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"(?m)^flow\s*:", head) is not None


@dataclass
class FlowSet:
    """The flows and the FAQ catalogue found in the flow paths, and every problem across them."""

    flows: dict[str, Flow]
    catalogue: Catalogue | None
    problems: list[Problem]


def load_flows(paths: Iterable[Path]) -> tuple[dict[str, Flow], list[Problem]]:
    """Load many flow files; returns the good flows and every problem (errors and warnings) across them."""
    found = load_flow_set(paths)
    return found.flows, found.problems


def load_flow_set(paths: Iterable[Path]) -> FlowSet:
    """Load the catalogue, then the flows (checked against it)."""
    paths = list(paths)
    catalogue, problems = load_catalogue(paths)
    flows: dict[str, Flow] = {}
    owners: dict[str, str] = {}
    for path in flow_files(paths):
        try:
            flow = load_flow(path, catalogue)
        except FlowError as exc:
            problems.extend(exc.problems)
            continue
        problems.extend(flow.warnings)
        if flow.name in flows:
            problems.append(Problem(str(path), 1, 1, "error",
                                    f"flow name '{flow.name}' is also used by {flows[flow.name].path}"))
            continue
        clash = [n for n in flow.numbers if n in owners]
        if clash:
            problems.append(Problem(str(path), 1, 1, "error",
                                    f"number {clash[0]} is already answered by flow '{owners[clash[0]]}'"))
            continue
        flows[flow.name] = flow
        owners.update(dict.fromkeys(flow.numbers, flow.name))
    return FlowSet(flows, catalogue, sorted(problems))


__all__ = [
    "AfterCallRule",
    "Destination",
    "Flow",
    "FlowContext",
    "FlowError",
    "FlowSet",
    "Hours",
    "Problem",
    "Prompt",
    "count_errors",
    "estimate_speech_seconds",
    "flow_files",
    "load_flow",
    "load_flow_set",
    "load_flow_text",
    "load_flows",
]
