"""SMS through a provider's HTTP API, described in configuration (``sms.http``) instead of code.

The request body is a jinja2 template over ``to`` (E.164), ``sender``, ``text``, ``id`` (the follow-up id) and
``key`` (the idempotency key, for providers that deduplicate). Every ``{{ value }}`` is escaped for the body's
content type: JSON string escaping for ``application/json`` (write ``"text": "{{ text }}"``, or
``"text": {{ text|tojson }}`` for a whole JSON value), form encoding otherwise (``to={{ to }}&text={{ text }}``).
Header values may name environment variables as ``${NAME}`` (API keys stay out of the config file); they are
read once, at ``start()``.

``interrupted = "uncertain"``: a provider sends no report we could wait for, so a send cut off after the
request left is kept for an operator.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup
from yarl import URL

from bridge.config import SmsConfig
from bridge.outbox import Handing, Interrupted, Outgoing, SendResult
from sms import _transport

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")   # an HTTP header name (RFC 9110 token)
_E164_RE = re.compile(r"\+[1-9][0-9]{6,14}")
_METHODS = ("POST", "PUT", "PATCH", "GET")
_SAMPLE = {"to": "+8613800138000", "sender": "Sender", "text": "Sample \"text\" & 中文\n", "id": "0" * 32,
           "key": "sample-key"}


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _json_value(value: Any) -> Any:
    # tojson already made a complete JSON value (and marked it safe): leave it alone.
    return value if isinstance(value, Markup) else json.dumps(str(value), ensure_ascii=False)[1:-1]


def _form_value(value: Any) -> Any:
    return value if isinstance(value, Markup) else quote_plus(str(value))


def substitute_env(value: str, environ: Mapping[str, str]) -> str:
    """``value`` with every ``${NAME}`` replaced from ``environ``; ``ValueError`` names a missing variable."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ValueError(f"sms.http.headers: environment variable {name} is not set")
        return environ[name]
    return _ENV_RE.sub(one, value)


def build_headers(config: Mapping[str, str], content_type: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The request headers: configured ones with ``${NAME}`` filled in, checked for header injection."""
    headers: dict[str, str] = {}
    for name, raw in config.items():
        if not _TOKEN_RE.fullmatch(name):
            raise ValueError(f"sms.http.headers: bad header name {name!r}")
        value = substitute_env(str(raw), environ)
        if any(c in value for c in "\r\n\x00"):
            # A CR/LF would end the header and let the value (perhaps from the environment) forge others.
            raise ValueError(f"sms.http.headers: the value of {name} contains CR, LF or NUL")
        headers[name] = value
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = content_type
    return headers


class HttpSmsGateway:
    """The :class:`bridge.outbox.Gateway` of the ``sms`` channel through a generic HTTP SMS API."""

    channel: str = "sms"
    interrupted: Interrupted = "uncertain"

    def __init__(self, config: SmsConfig, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = environ
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {}
        self._template: jinja2.Template | None = None
        self._ref: re.Pattern[str] | None = None

    async def start(self) -> None:
        """Check the configuration (URL, method, headers, template, pattern) and open the session."""
        http = self.config.http
        url = URL(http.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"sms.http.url must be an http(s) URL, not {http.url!r}")
        method = http.method.upper()
        if method not in _METHODS:
            raise ValueError(f"sms.http.method must be one of {', '.join(_METHODS)}")
        json_body = is_json(http.content_type)
        if method == "GET" and json_body:
            raise ValueError("sms.http: a GET request carries its parameters in the URL, not as JSON")
        self._headers = build_headers(http.headers, http.content_type, os.environ if self.environ is None
                                      else self.environ)
        env = ImmutableSandboxedEnvironment(autoescape=False, undefined=jinja2.StrictUndefined,
                                            finalize=_json_value if json_body else _form_value)
        try:
            self._template = env.from_string(http.body)
            sample = self._template.render(_SAMPLE)
        except jinja2.TemplateError as exc:
            raise ValueError(f"sms.http.body: {exc}") from exc
        if json_body:
            try:
                json.loads(sample)
            except ValueError as exc:
                raise ValueError(f"sms.http.body does not render to JSON ({exc}): {sample[:200]!r}") from exc
        if http.ref_pattern:
            try:
                self._ref = re.compile(http.ref_pattern)
            except re.error as exc:
                raise ValueError(f"sms.http.ref_pattern: {exc}") from exc
            if self._ref.groups < 1:
                raise ValueError("sms.http.ref_pattern needs a group around the message id")
        if self._session is None:
            self._session = _transport.make_session(http.timeout)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def render_body(self, message: Outgoing) -> str:
        """The request body (or query, for GET) for ``message``."""
        if self._template is None:
            raise RuntimeError("HttpSmsGateway.start() was not called")
        return self._template.render(to=message.recipient, sender=self.config.sender,
                                     text=message.payload.get("text", ""), id=message.followup_id,
                                     key=message.idempotency_key)

    async def send(self, message: Outgoing, handing: Handing) -> SendResult:
        """Send one SMS; ``sent`` for a configured success status, with the provider's id if found."""
        if self._session is None:
            raise RuntimeError("HttpSmsGateway.start() was not called")
        if message.channel != "sms" or not _E164_RE.fullmatch(message.recipient):
            return SendResult("failed", error=f"http-sms: recipient {message.recipient!r} is not E.164")
        if not message.payload.get("text", "").strip():
            return SendResult("failed", error="http-sms: empty text")
        http = self.config.http
        method = http.method.upper()
        try:
            body = self.render_body(message)
        except jinja2.TemplateError as exc:
            return SendResult("failed", error=f"http-sms: sms.http.body: {exc}")
        url = URL(http.url)
        data: bytes | None = body.encode()
        if method == "GET":
            url = URL(f"{http.url}{'&' if url.query_string else '?'}{body}", encoded=True)
            data = None
        reply = await _transport.request(self._session, method, url, handing, name="http-sms",
                                         deadline=3 * http.timeout, data=data, headers=self._headers)
        if isinstance(reply, SendResult):
            return reply
        if reply.status in http.success_status:
            ref = None
            if self._ref is not None and (match := self._ref.search(reply.body)):
                ref = (match.group(1) or "")[:128] or None
            return SendResult("sent", gateway_ref=ref)
        return _transport.http_status_result(reply, "http-sms")
