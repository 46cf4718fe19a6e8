"""The FAQ catalogue (``flows/faq.yaml``): articles per language, the intents and phrases that lead to them, and
the message templates that carry their links by SMS and email.

Checked like flows, with file:line:column problems: every article and message must have text for every catalogue
language; templates are jinja2 (HTML autoescaped) and may only use the variables a message gets, so a misspelt
variable is a load error, not a broken message in a customer's phone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment
from markdown_it import MarkdownIt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bridge.yamldoc import DocumentError, Problem, Reporter, parse_yaml, plain

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}")
# What every message template may use. ``title``/``summary`` only exist for messages about an article.
ARTICLE_VARIABLES = frozenset({"title", "summary"})
MESSAGE_VARIABLES = frozenset({"link", "company", "language"}) | ARTICLE_VARIABLES
SMS_MAX_CHARS = 280  # two UCS-2 segments' worth of a Chinese SMS is 134; longer SMS cost more and fail more


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Texts = dict[str, str]


class ArticleModel(_Strict):
    topic: str
    title: Texts
    summary: Texts
    body: Texts
    intents: list[str] = []
    phrases: dict[str, list[str]] = {}
    url: str | None = None  # the article's public page elsewhere (optional); links always open our page first

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s<>\"'\x00-\x1f]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class EmailTemplate(_Strict):
    subject: Texts
    text: Texts
    html: Texts


class MessageModel(_Strict):
    description: str = ""
    # default: the article if it names one, else help; "chat" opens a web chat on the interaction it was sent in
    links_to: Literal["article", "help", "survey", "chat"] | None = None
    sms: Texts | None = None
    email: EmailTemplate | None = None


class CatalogueModel(_Strict):
    catalogue: str
    languages: list[str] = Field(min_length=1)
    company: Texts
    topics: dict[str, Texts] = Field(min_length=1)
    articles: dict[str, ArticleModel] = Field(min_length=1)
    messages: dict[str, MessageModel] = Field(min_length=1)


@dataclass(frozen=True)
class Article:
    id: str
    topic: str
    title: Mapping[str, str]
    summary: Mapping[str, str]
    body: Mapping[str, str]
    intents: tuple[str, ...]
    phrases: Mapping[str, tuple[str, ...]]
    url: str | None


@dataclass(frozen=True)
class Rendered:
    """A message ready for the outbox payload."""

    channel: str
    payload: dict[str, str]


@dataclass
class Message:
    """A message template; ``needs_article`` when it uses the article's title or summary; its link opens
    ``links_to`` (the article it is sent about, the help centre, the survey or a chat on the same interaction)."""

    name: str
    sms: dict[str, jinja2.Template]
    email: dict[str, dict[str, jinja2.Template]]  # language -> subject/text/html
    needs_article: bool
    links_to: str = "help"

    @property
    def channels(self) -> set[str]:
        return ({"sms"} if self.sms else set()) | ({"email"} if self.email else set())


_text_env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
_html_env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=True)
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})


@dataclass
class Catalogue:
    """A loaded, validated catalogue."""

    name: str
    path: str
    languages: list[str]
    company: dict[str, str]
    topics: dict[str, dict[str, str]]
    articles: dict[str, Article]
    messages: dict[str, Message]
    warnings: list[Problem] = field(default_factory=list)

    def article_for_intent(self, intent: str | None) -> Article | None:
        if not intent:
            return None
        return next((a for a in self.articles.values() if intent in a.intents), None)

    def language(self, language: str) -> str:
        return language if language in self.languages else self.languages[0]

    def render(self, message: str, channel: str, language: str, link: str, article: Article | None) -> Rendered:
        """Render a message for one channel; raises KeyError/ValueError for what the loader let through."""
        msg = self.messages[message]
        lang = self.language(language)
        if msg.needs_article and article is None:
            raise ValueError(f"message '{message}' needs an article")
        context = {"link": link, "company": self.company[lang], "language": lang,
                   "title": article.title[lang] if article else "", "summary": article.summary[lang] if article else ""}
        if channel == "sms":
            return Rendered("sms", {"text": msg.sms[lang].render(context).strip()})
        parts = msg.email[lang]
        return Rendered("email", {"subject": parts["subject"].render(context).strip(),
                                  "text": parts["text"].render(context), "html": parts["html"].render(context)})

    def body_html(self, article: Article, language: str) -> str:
        """The article's Markdown as HTML (raw HTML in the Markdown is escaped, unsafe link schemes dropped)."""
        return _markdown.render(article.body[self.language(language)])

    @cached_property
    def _index(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        for lang in self.languages:
            out[lang] = [(a.id, " ".join([a.title[lang], a.summary[lang], *a.phrases.get(lang, ()),
                                          a.body[lang]]).lower()) for a in self.articles.values()]
        return out

    def search(self, query: str, language: str, limit: int = 20) -> list[Article]:
        """Articles matching a query: words (and, for Chinese, two-character pieces) found in the text."""
        lang = self.language(language)
        terms = _terms(query)
        if not terms:
            return []
        scored = []
        for article_id, text in self._index[lang]:
            article = self.articles[article_id]
            title = article.title[lang].lower()
            score = sum((3 if term in title else 0) + (1 if term in text else 0) for term in terms)
            if score:
                scored.append((-score, article_id))
        return [self.articles[a] for _, a in sorted(scored)[:limit]]


def _terms(query: str) -> list[str]:
    query = query.lower()[:200]
    words = re.findall(r"[a-z0-9]{3,}", query)
    han = "".join(re.findall(r"[\u4e00-\u9fff]+", query))
    pieces = [han[i:i + 2] for i in range(len(han) - 1)] or ([han] if han else [])
    return list(dict.fromkeys(words + pieces))


# ------------------------------------------------------------------------------------------------- loading
class _Loader(Reporter):
    def __init__(self, path: str, text: str) -> None:
        super().__init__(path)
        self.text = text

    def load(self) -> Catalogue | None:
        doc, problems = parse_yaml(self.path, self.text)
        self.problems.extend(problems)
        if problems:
            return None
        self.positions.root = doc
        if not isinstance(doc, Mapping):
            self.problem((), "a catalogue file must be a mapping with 'catalogue', 'languages', 'articles'")
            return None
        try:
            model = CatalogueModel.model_validate(plain(doc))
        except ValidationError as exc:
            self.validation_errors(exc, (), "catalogue")
            return None
        langs = model.languages
        self._texts(("company",), model.company, langs)
        for topic, names in model.topics.items():
            self._name(("topics", topic), topic)
            self._texts(("topics", topic), names, langs)
        articles: dict[str, Article] = {}
        owners: dict[str, str] = {}
        for article_id, art in model.articles.items():
            where = ("articles", article_id)
            self._name(where, article_id)
            if art.topic not in model.topics:
                self.problem((*where, "topic"), f"article '{article_id}': topic '{art.topic}' is not in 'topics'")
            for key in ("title", "summary", "body"):
                self._texts((*where, key), getattr(art, key), langs)
            for lang in art.phrases:
                if lang not in langs:
                    self.problem((*where, "phrases", lang), f"phrases language {lang!r} is not in languages")
            for intent in art.intents:
                self._name((*where, "intents"), intent)
                if intent in owners:
                    self.problem((*where, "intents"), f"intent '{intent}' already leads to article '{owners[intent]}'")
                owners[intent] = article_id
            articles[article_id] = Article(article_id, art.topic, art.title, art.summary, art.body, tuple(art.intents),
                                           {k: tuple(v) for k, v in art.phrases.items()}, art.url)
        messages = {name: msg for name, body in model.messages.items()
                    if (msg := self._message(name, body, langs)) is not None}
        if self.errors:
            return None
        return Catalogue(model.catalogue, self.path, langs, dict(model.company),
                         {k: dict(v) for k, v in model.topics.items()}, articles, messages,
                         [p for p in self.problems if p.severity == "warning"])

    def _name(self, where: tuple[Any, ...], name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            self.problem(where, f"{name!r} must be a plain name (letters, digits, _ -)")

    def _texts(self, where: tuple[Any, ...], texts: Mapping[str, str], langs: list[str]) -> bool:
        ok = True
        for lang in langs:
            if not texts.get(lang, "").strip():
                self.problem(where, f"no {lang} text" if lang not in texts else f"{lang} text is empty")
                ok = False
        for lang in texts:
            if lang not in langs:
                self.problem((*where, lang), f"language {lang!r} is not in the catalogue's languages")
                ok = False
        return ok

    def _template(self, where: tuple[Any, ...], source: str, html: bool, used: set[str]) -> jinja2.Template | None:
        env = _html_env if html else _text_env
        try:
            tree = env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            self.problem(where, f"template: {exc.message} (template line {exc.lineno})")
            return None
        unknown = meta.find_undeclared_variables(tree) - MESSAGE_VARIABLES
        if unknown:
            known = ", ".join(sorted(MESSAGE_VARIABLES))
            self.problem(where, f"template uses unknown variable(s) {', '.join(sorted(unknown))} (known: {known})")
            return None
        used |= meta.find_undeclared_variables(tree)
        if not html and re.search(r"[\r\x00]", source):
            self.problem(where, "template contains CR or NUL")
            return None
        return env.from_string(source)

    def _message(self, name: str, body: MessageModel, langs: list[str]) -> Message | None:
        where = ("messages", name)
        self._name(where, name)
        if body.sms is None and body.email is None:
            self.problem(where, f"message '{name}' has neither 'sms' nor 'email'")
            return None
        used: set[str] = set()
        sms: dict[str, jinja2.Template] = {}
        email: dict[str, dict[str, jinja2.Template]] = {}
        ok = True
        if body.sms is not None:
            ok = self._texts((*where, "sms"), body.sms, langs) and ok
            for lang, source in body.sms.items():
                template = self._template((*where, "sms", lang), source, False, used)
                if template is not None:
                    sms[lang] = template
                if "link" not in source:
                    self.problem((*where, "sms", lang), "SMS text has no {{ link }}", "warning")
        if body.email is not None:
            for part in ("subject", "text", "html"):
                texts = getattr(body.email, part)
                ok = self._texts((*where, "email", part), texts, langs) and ok
                for lang, source in texts.items():
                    if part == "subject" and "\n" in source.strip():
                        self.problem((*where, "email", part, lang), "a subject must be one line")
                        continue
                    template = self._template((*where, "email", part, lang), source, part == "html", used)
                    if template is not None:
                        email.setdefault(lang, {})[part] = template
        if not ok or self.errors:
            return None
        needs_article = bool(used & ARTICLE_VARIABLES)
        links_to = body.links_to or ("article" if needs_article else "help")
        if links_to == "article" and not needs_article:
            self.problem((*where, "links_to"), f"message '{name}' links to an article but never names it "
                                               "(use {{ title }} or {{ summary }})")
            return None
        return Message(name, sms, email, needs_article=needs_article, links_to=links_to)


def load_catalogue_text(text: str, path: str = "<catalogue>") -> Catalogue:
    loader = _Loader(path, text)
    catalogue = loader.load()
    if catalogue is None:
        raise DocumentError(loader.errors or [Problem(path, 1, 1, "error", "catalogue could not be loaded")])
    return catalogue


def catalogue_files(paths: Iterable[Path]) -> list[Path]:
    """Catalogue files among ``paths`` (``*.yaml`` with a top-level ``catalogue:`` key)."""
    found = []
    for base in paths:
        for path in sorted(base.glob("*.y*ml")) if base.is_dir() else [base]:
            try:
                head = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if re.search(r"(?m)^catalogue\s*:", head):
                found.append(path)
    return found


def load_catalogue(paths: Iterable[Path]) -> tuple[Catalogue | None, list[Problem]]:
    """Load the one catalogue found in ``paths``; returns it (or None) and every problem."""
    files = catalogue_files(paths)
    if not files:
        return None, []
    if len(files) > 1:
        return None, [Problem(str(f), 1, 1, "error", f"only one catalogue is supported (also {files[0]})")
                      for f in files[1:]]
    path = files[0]
    try:
        catalogue = load_catalogue_text(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(str(path), 1, 1, "error", f"cannot read file: {exc}")]
    except DocumentError as exc:
        return None, exc.problems
    return catalogue, catalogue.warnings
