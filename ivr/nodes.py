"""Node types of a call flow, registered by their YAML ``type:``.

Each type is a pydantic model (validated when the flow loads, not when a caller reaches it) with ``edges()`` for
the graph checks and ``run()`` for the call. ``run`` returns the id of the next node, or None when the call ends.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ivr import safe
from ivr.flow import FlowContext, Prompt

if TYPE_CHECKING:
    from ivr.engine import CallContext

NODE_TYPES: dict[str, type[Node]] = {}
Edge = tuple[str, tuple[Any, ...]]


def register(type_name: str) -> Any:
    def wrap(cls: type[Node]) -> type[Node]:
        NODE_TYPES[type_name] = cls
        return cls
    return wrap


def _as_prompt(value: Any) -> Any:
    if isinstance(value, Mapping) and "text" not in value:
        return {"text": dict(value)}
    return value


PromptField = Annotated[Prompt, BeforeValidator(_as_prompt)]


class Node(BaseModel):
    """Fields every node has. ``terminal`` nodes end the call (hang up or leave for the dialplan)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    is_menu: ClassVar[bool] = False

    id: str
    type: str
    description: str = ""

    @property
    def terminal(self) -> bool:
        return False

    def edges(self) -> list[Edge]:
        return []

    def prompts(self) -> list[tuple[str, Prompt]]:
        return [(name, value) for name, value in self if isinstance(value, Prompt)]

    async def run(self, call: CallContext) -> str | None:
        raise NotImplementedError


def _safe_value(value: str) -> str:
    safe.var_value(value, "value")
    return value


def _var_name(value: str) -> str:
    return safe.var_name(value)


# validated entry by entry, so an error names (and points at) the offending variable
VarName = Annotated[str, AfterValidator(_var_name)]
VarValue = Annotated[str, BeforeValidator(str), AfterValidator(_safe_value)]


class _Next(Node):
    next: str | None = None

    def edges(self) -> list[Edge]:
        return [(self.next, ("next",))] if self.next else []

    @property
    def terminal(self) -> bool:
        return self.next is None


@register("say")
class SayNode(_Next):
    """Play a prompt, then go on."""

    prompt: PromptField

    async def run(self, call: CallContext) -> str | None:
        await call.play(self.prompt)
        return self.next


class MenuOption(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    next: str
    set: dict[VarName, VarValue] = {}


class _Retrying(Node):
    timeout: float = Field(5.0, gt=0, le=60)
    retries: int = Field(2, ge=0, le=5)
    no_input: PromptField | None = None
    invalid: PromptField | None = None
    on_failure: str


def _skill(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", value):  # the router's names
        raise ValueError(f"skill {value!r:.70} must be 1-64 letters, digits or _.@-")
    return value


def _digit_key(key: str) -> str:
    if len(key) != 1 or key not in "0123456789*#":
        raise ValueError(f"option {key!r} is not a single key 0-9, * or #")
    return key


@register("menu")
class MenuNode(_Retrying):
    """DTMF menu: a prompt, options by digit, reprompts on no input / invalid input, then ``on_failure``."""

    is_menu: ClassVar[bool] = True
    prompt: PromptField
    # validated key by key so an error names (and points at) the bad digit
    options: dict[Annotated[str, AfterValidator(_digit_key)], MenuOption] = Field(min_length=1)

    def edges(self) -> list[Edge]:
        out = [(opt.next, ("options", key, "next")) for key, opt in self.options.items()]
        return [*out, (self.on_failure, ("on_failure",))]

    async def run(self, call: CallContext) -> str | None:
        # Any key interrupts the prompt: a key that is not an option must get the 'invalid' answer, not be lost.
        keys = "0123456789*#"
        for attempt in range(self.retries + 1):
            digit = await call.play(self.prompt, escape_digits=keys)
            if digit is None:
                digit = await call.wait_digit(self.timeout)
            if digit is None:
                call.record(self.id, "no-input")
                if self.no_input and attempt < self.retries:
                    await call.play(self.no_input)
                continue
            option = self.options.get(digit)
            if option is None:
                call.record(self.id, "invalid", digit)
                if self.invalid and attempt < self.retries:
                    await call.play(self.invalid)
                continue
            call.record(self.id, "chose", digit)
            for name, value in option.set.items():
                call.set_var(name, value)
            return option.next
        call.record(self.id, "failed")
        return self.on_failure


@register("collect")
class CollectNode(_Retrying):
    """Collect several digits into a variable, ended by the terminator or by ``max_digits``."""

    prompt: PromptField
    var: str
    min_digits: int = Field(1, ge=1, le=32)
    max_digits: int = Field(16, ge=1, le=32)
    terminator: Literal["#", "*", ""] = "#"
    inter_digit_timeout: float = Field(3.0, gt=0, le=30)
    next: str

    @field_validator("var")
    @classmethod
    def _var(cls, value: str) -> str:
        return safe.var_name(value)

    @field_validator("max_digits")
    @classmethod
    def _range(cls, value: int, info: ValidationInfo) -> int:  # a field validator, so the error points at it
        if value < info.data.get("min_digits", 1):
            raise ValueError(f"{value} is smaller than min_digits {info.data['min_digits']}")
        return value

    def edges(self) -> list[Edge]:
        return [(self.next, ("next",)), (self.on_failure, ("on_failure",))]

    async def run(self, call: CallContext) -> str | None:
        for attempt in range(self.retries + 1):
            digits = await self._read(call)
            if not digits:
                call.record(self.id, "no-input")
                if self.no_input and attempt < self.retries:
                    await call.play(self.no_input)
                continue
            if len(digits) < self.min_digits:
                call.record(self.id, "invalid", digits)
                if self.invalid and attempt < self.retries:
                    await call.play(self.invalid)
                continue
            call.record(self.id, "collected", digits)
            call.set_var(self.var, digits)
            return self.next
        call.record(self.id, "failed")
        return self.on_failure

    async def _read(self, call: CallContext) -> str:
        escape = "0123456789*#"
        digit = await call.play(self.prompt, escape_digits=escape)
        if digit is None:
            digit = await call.wait_digit(self.timeout)
        digits = ""
        while digit is not None:
            if digit == self.terminator:
                break
            if digit in "0123456789":
                digits += digit
            if len(digits) >= self.max_digits:
                break
            digit = await call.wait_digit(self.inter_digit_timeout)
        return digits


@register("set")
class SetNode(Node):
    """Set call variables (``language`` switches the prompts' language)."""

    values: dict[VarName, VarValue] = Field(min_length=1)
    next: str

    def edges(self) -> list[Edge]:
        return [(self.next, ("next",))]

    async def run(self, call: CallContext) -> str | None:
        for name, value in self.values.items():
            call.set_var(name, value)
        return self.next


class Case(BaseModel):
    """One branch of a condition: exactly one test, and where to go when it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    open: str | None = None            # name of business hours in the flow's ``hours``
    closed: str | None = None
    caller_country: list[str] | None = None   # ISO 3166 region codes, from the caller's number
    var: str | None = None
    equals: str | None = None
    in_: list[str] | None = Field(None, alias="in")
    next: str

    @model_validator(mode="after")
    def _one_test(self) -> Case:
        tests = [self.open, self.closed, self.caller_country, self.var]
        if sum(t is not None for t in tests) != 1:
            raise ValueError("a case needs exactly one of open, closed, caller_country, var")
        if self.var is not None and (self.equals is None) == (self.in_ is None):
            raise ValueError("a 'var' case needs exactly one of equals, in")
        if self.var is None and (self.equals is not None or self.in_ is not None):
            raise ValueError("equals / in only go with var")
        return self

    def holds(self, call: CallContext) -> bool:
        if self.open is not None:
            return call.flow.hours[self.open].is_open(call.now())
        if self.closed is not None:
            return not call.flow.hours[self.closed].is_open(call.now())
        if self.caller_country is not None:
            return call.caller_country in self.caller_country
        value = call.get_var(self.var or "")
        return value == self.equals if self.equals is not None else value in (self.in_ or [])


@register("condition")
class ConditionNode(Node):
    """Branch on business hours, the caller's country or a variable; the first case that holds wins."""

    cases: list[Case] = Field(min_length=1)
    otherwise: str

    def edges(self) -> list[Edge]:
        out = [(case.next, ("cases", i, "next")) for i, case in enumerate(self.cases)]
        return [*out, (self.otherwise, ("otherwise",))]

    async def run(self, call: CallContext) -> str | None:
        for i, case in enumerate(self.cases):
            if case.holds(call):
                call.record(self.id, f"case-{i}")
                return case.next
        call.record(self.id, "otherwise")
        return self.otherwise


@register("goto")
class GotoNode(Node):
    next: str

    def edges(self) -> list[Edge]:
        return [(self.next, ("next",))]

    async def run(self, call: CallContext) -> str | None:
        return self.next


@register("transfer")
class TransferNode(Node):
    """Leave the flow for an allowlisted dialplan destination (an operator, a queue, voicemail)."""

    destination: str
    prompt: PromptField | None = None

    @property
    def terminal(self) -> bool:
        return True

    async def run(self, call: CallContext) -> str | None:
        if self.prompt:
            await call.play(self.prompt)
        await call.transfer(self.destination)
        return None


@register("send_link")
class SendLinkNode(Node):
    """Text (or mail) the caller a signed link: an article, the article for the call's intent, or the help centre.

    The recipient is the caller's number (normalised to E.164, mobile only, allowed countries, fraud limits);
    ``to_var`` names a variable holding it instead. When it cannot be used the caller hears ``unavailable``
    and the flow goes to ``on_unavailable``.
    """

    channel: Literal["sms", "email"] = "sms"
    message: str = "article_link"
    article: str | None = None
    from_intent: bool = False
    to_var: str | None = None
    sent: PromptField
    next: str
    unavailable: PromptField | None = None
    on_unavailable: str

    @model_validator(mode="after")
    def _what(self) -> SendLinkNode:
        if self.article is not None and self.from_intent:
            raise ValueError("give 'article' or 'from_intent', not both")
        if self.channel == "email" and self.to_var is None:
            raise ValueError("an email link needs 'to_var' (the variable holding the address)")
        return self

    def edges(self) -> list[Edge]:
        return [(self.next, ("next",)), (self.on_unavailable, ("on_unavailable",))]

    async def run(self, call: CallContext) -> str | None:
        catalogue = call.catalogue
        article = self.article
        if self.from_intent:
            found = catalogue.article_for_intent(call.get_var("intent")) if catalogue else None
            article = found.id if found else None
        recipient = call.get_var(self.to_var) if self.to_var else call.session.caller
        prepared = None
        if catalogue is not None and (article or not catalogue.messages[self.message].needs_article):
            prepared = await call.send_followup(self.channel, recipient or "", self.message, article,
                                                purpose="in_call")
        if prepared is not None and prepared.accepted:
            call.record(self.id, "link-sent", f"{self.channel}:{article or self.message}")
            await call.play(self.sent)
            return self.next
        call.record(self.id, "link-refused", prepared.reason if prepared is not None else "no-article")
        if self.unavailable:
            await call.play(self.unavailable)
        return self.on_unavailable


@register("survey")
class SurveyNode(Node):
    """One question answered with a key from 1 to 5, stored with the call; no answer is fine."""

    question: str = "call"
    prompt: PromptField
    thanks: PromptField | None = None
    timeout: float = Field(default=6.0, gt=0, le=30)
    retries: int = Field(default=1, ge=0, le=3)
    next: str | None = None

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        return safe.var_name(value)

    @property
    def terminal(self) -> bool:
        return self.next is None

    def edges(self) -> list[Edge]:
        return [(self.next, ("next",))] if self.next else []

    async def run(self, call: CallContext) -> str | None:
        for _ in range(self.retries + 1):
            digit = await call.play(self.prompt, escape_digits="0123456789*#")
            if digit is None:
                digit = await call.wait_digit(self.timeout)
            if digit is None:
                call.record(self.id, "no-input")
                continue
            if digit in "12345":
                call.record(self.id, "survey", digit)
                await call.save_survey(self.question, int(digit))
                if self.thanks:
                    await call.play(self.thanks)
                break
            call.record(self.id, "invalid", digit)
        if self.next is None:
            await call.hangup()
        return self.next


def _template(allowed: tuple[str, ...]) -> Any:
    """A prompt whose texts may name only ``allowed`` placeholders ({place}, {minutes})."""
    def check(prompt: Prompt) -> Prompt:
        for language, text in prompt.text.items():
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
            except ValueError as exc:
                raise ValueError(f"{language}: {exc} (write {{{{ and }}}} for braces)") from None
            unknown = names - set(allowed)
            if unknown:
                raise ValueError(f"{language}: unknown placeholder {{{sorted(unknown)[0]}}} "
                                 f"(known: {', '.join('{' + a + '}' for a in allowed)})")
        return prompt
    return Annotated[Prompt, BeforeValidator(_as_prompt), AfterValidator(check)]


@register("queue")
class QueueNode(Node):
    """Wait for a person in the unified queue (ivr/queueing.py): music on hold, the place and expected wait
    every ``announce_every`` seconds, keys for a chat link or a callback that keep the place; when an agent
    takes the call their phone rings and is bridged to the caller. ``after`` is where the caller goes when the
    agent hangs up first (none: the call ends); ``on_timeout`` after ``max_wait`` seconds without an agent."""

    skill: Annotated[str, AfterValidator(_skill)] = "general"
    priority: int = Field(0, ge=0, le=9)
    prompt: PromptField | None = None
    announce_every: float = Field(30.0, ge=5, le=600)
    position: _template(("place",)) | None = None          # type: ignore[valid-type]
    expected_wait: _template(("minutes",)) | None = None   # type: ignore[valid-type]
    choices: PromptField | None = None        # says the keys; played after each announcement
    chat_key: Annotated[str, AfterValidator(_digit_key)] | None = None
    chat_message: str = "chat_link"
    chat_sent: PromptField | None = None
    callback_key: Annotated[str, AfterValidator(_digit_key)] | None = None
    callback_confirm: PromptField | None = None
    unavailable: PromptField | None = None    # the chat link or callback cannot be done for this caller
    max_wait: float = Field(600.0, ge=10, le=4 * 3600)
    on_timeout: str
    ring_seconds: int = Field(20, ge=5, le=120)
    after: str | None = None

    @model_validator(mode="after")
    def _keys(self) -> QueueNode:
        if self.chat_key is not None and self.chat_sent is None:
            raise ValueError("'chat_key' needs 'chat_sent' (what the caller hears once the link is sent)")
        if self.callback_key is not None and self.callback_confirm is None:
            raise ValueError("'callback_key' needs 'callback_confirm' (what the caller hears before hanging up)")
        if self.chat_key is not None and self.chat_key == self.callback_key:
            raise ValueError("'chat_key' and 'callback_key' must differ")
        return self

    def edges(self) -> list[Edge]:
        out: list[Edge] = [(self.on_timeout, ("on_timeout",))]
        if self.after:
            out.append((self.after, ("after",)))
        return out

    def prompts(self) -> list[tuple[str, Prompt]]:
        # the announcements are rendered with their numbers when they are said
        return [(name, p) for name, p in super().prompts() if name not in ("position", "expected_wait")]

    async def run(self, call: CallContext) -> str | None:
        from ivr.queueing import QueueWait

        return await QueueWait(self, call).run()


@register("hangup")
class HangupNode(Node):
    prompt: PromptField | None = None

    @property
    def terminal(self) -> bool:
        return True

    async def run(self, call: CallContext) -> str | None:
        if self.prompt:
            await call.play(self.prompt)
        await call.hangup()
        return None


def parse_node(ctx: FlowContext, node_id: str, body: Any) -> Node | None:
    """Validate one node's YAML mapping against its registered type; report problems with positions."""
    where = ("nodes", node_id)
    if not isinstance(body, Mapping):
        ctx.problem(where, f"node '{node_id}' must be a mapping with a 'type'")
        return None
    type_name = body.get("type")
    if type_name is None:
        ctx.problem(where, f"node '{node_id}': missing field 'type'")
        return None
    cls = NODE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        known = ", ".join(sorted(NODE_TYPES))
        ctx.problem((*where, "type"), f"node '{node_id}': unknown node type {type_name!r} (known: {known})")
        return None
    if "id" in body:
        ctx.problem((*where, "id"), f"node '{node_id}': unknown field 'id' (the key names the node)")
        return None
    try:
        node = cls.model_validate({**body, "id": node_id})
    except ValidationError as exc:
        ctx.validation_errors(exc, where, f"node '{node_id}' ({type_name})")
        return None
    ok = True
    for key, prompt in node.prompts():
        ok = ctx.check_prompt((*where, key), prompt) and ok
    header = ctx.header
    if isinstance(node, SendLinkNode):
        ok = _check_send_link(ctx, where, node) and ok
    if isinstance(node, QueueNode) and node.chat_key is not None:
        ok = _check_message(ctx, where, node.id, node.chat_message, "sms", "chat_message") and ok
    if isinstance(node, TransferNode) and node.destination not in header.destinations:
        names = ", ".join(sorted(header.destinations)) or "none defined"
        ctx.problem((*where, "destination"), f"node '{node_id}': destination '{node.destination}' is not in the "
                                              f"flow's destinations ({names})")
        ok = False
    if isinstance(node, ConditionNode):
        for i, case in enumerate(node.cases):
            hours = case.open or case.closed
            if hours is not None and hours not in header.hours:
                test = "open" if case.open is not None else "closed"
                ctx.problem((*where, "cases", i, test), f"node '{node_id}': hours '{hours}' are not defined in 'hours'")
                ok = False
    for path, name, value in _assignments(node):
        if name == "language" and value not in header.languages:
            ctx.problem((*where, *path, name), f"node '{node_id}': language {value!r} is not in the flow's languages")
            ok = False
    return node if ok else None


def _check_message(ctx: FlowContext, where: tuple[Any, ...], node_id: str, name: str, channel: str,
                   field: str) -> bool:
    """The catalogue has message ``name`` with a ``channel`` text in every language of the flow."""
    catalogue = ctx.catalogue
    if catalogue is None:
        ctx.problem((*where, "type"), f"node '{node_id}': sending a message needs the FAQ catalogue "
                                      "(flows/faq.yaml), which is missing or has errors")
        return False
    message = catalogue.messages.get(name)
    if message is None:
        ctx.problem((*where, field), f"node '{node_id}': message '{name}' is not in the catalogue "
                                     f"({', '.join(sorted(catalogue.messages))})")
        return False
    if channel not in message.channels:
        ctx.problem((*where, "channel" if field == "message" else field),
                    f"node '{node_id}': message '{name}' has no {channel} text")
        return False
    missing = [lang for lang in ctx.header.languages if lang not in catalogue.languages]
    if missing:
        ctx.problem((*where, "type"), f"node '{node_id}': the catalogue has no {', '.join(missing)} texts")
        return False
    return True


def _check_send_link(ctx: FlowContext, where: tuple[Any, ...], node: SendLinkNode) -> bool:
    if not _check_message(ctx, where, node.id, node.message, node.channel, "message"):
        return False
    catalogue = ctx.catalogue
    assert catalogue is not None
    if node.article is not None and node.article not in catalogue.articles:
        ctx.problem((*where, "article"), f"node '{node.id}': article '{node.article}' is not in the catalogue")
        return False
    if catalogue.messages[node.message].needs_article and node.article is None and not node.from_intent:
        ctx.problem(where, f"node '{node.id}': message '{node.message}' is about an article: give 'article' "
                           "or 'from_intent: true'")
        return False
    return True


def _assignments(node: Node) -> list[tuple[tuple[Any, ...], str, str]]:
    """(path of the mapping in the node, name, value) of each variable the node sets."""
    if isinstance(node, SetNode):
        return [(("values",), name, value) for name, value in node.values.items()]
    if isinstance(node, MenuNode):
        return [(("options", key, "set"), name, value)
                for key, opt in node.options.items() for name, value in opt.set.items()]
    return []


__all__ = ["NODE_TYPES", "Node", "parse_node", "register"]
