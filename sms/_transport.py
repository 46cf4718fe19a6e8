"""HTTP requests that know whether they left: the one place where aiohttp's errors become outbox results.

``handing()`` is awaited from an aiohttp trace hook once the connection to the gateway is open and before the
request is written, so "could not connect" is a clean ``retry`` (the gateway never saw it, ``handing`` was not
awaited) and only a failure after that point is ``unknown``.

Two aiohttp defaults would blur that line and are switched off: keep-alive (a request written onto a pooled
connection the server is just closing fails ambiguously) and the silent second attempt aiohttp makes for
"idempotent" methods such as GET when a connection breaks (a Kannel sendsms GET is not idempotent: it would
send the SMS twice). The trace hook refuses any second connection for one request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from bridge.outbox import Handing, SendResult

MAX_BODY = 64 * 1024      # a gateway's answer is a line or a small JSON document
MAX_RETRY_AFTER = 86400.0


class _SecondAttempt(Exception):
    """aiohttp wanted to send the request again on a new connection (refused: it may have been taken)."""


class _Attempt:
    """One request's progress, carried to the trace hook as ``trace_request_ctx``."""

    def __init__(self, handing: Handing) -> None:
        self.handing = handing
        self.handed = False
        self.handing_error: BaseException | None = None


async def _on_connection_start(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: object) -> None:
    # Refused before connecting, so nothing is opened (and leaked) for the attempt that must not happen.
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, _Attempt) and attempt.handed:
        raise _SecondAttempt


async def _on_connection(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: object) -> None:
    attempt = ctx.trace_request_ctx
    if not isinstance(attempt, _Attempt):
        return
    if attempt.handed:
        raise _SecondAttempt
    try:
        await attempt.handing()
    except BaseException as exc:
        attempt.handing_error = exc
        raise
    attempt.handed = True


def make_session(timeout: float) -> aiohttp.ClientSession:
    """A session for one gateway: no keep-alive, ``timeout`` for connecting and for each read."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(_on_connection_start)
    trace.on_connection_create_end.append(_on_connection)
    trace.on_connection_reuseconn.append(_on_connection)
    # connect=None: the pool wait and handing() must not run under the connect timeout (handing() writes to the
    # database and must not be cancelled half-way); sock_connect bounds the TCP connect itself.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=timeout, sock_read=timeout),
        trace_configs=[trace])


@dataclass(frozen=True)
class Reply:
    """A gateway's HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: str


async def request(session: aiohttp.ClientSession, method: str, url: URL, handing: Handing, *, name: str,
                  deadline: float, data: bytes | None = None,
                  headers: Mapping[str, str] | None = None) -> Reply | SendResult:
    """Send one request; a :class:`SendResult` (``retry`` or ``unknown``) when no answer came back.

    ``deadline`` bounds the whole exchange (DNS included); ``name`` prefixes error texts.
    """
    attempt = _Attempt(handing)
    try:
        async with asyncio.timeout(deadline):
            async with session.request(method, url, data=data, headers=headers, allow_redirects=False,
                                       trace_request_ctx=attempt) as resp:
                body = await resp.content.read(MAX_BODY)
                return Reply(resp.status, CIMultiDict(resp.headers), body.decode("utf-8", "replace"))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if attempt.handing_error is not None and not isinstance(attempt.handing_error, asyncio.CancelledError):
            raise attempt.handing_error from None  # the outbox's own failure, not the gateway's
        return _failure(exc, attempt.handed, name)


def _failure(exc: BaseException, handed: bool, name: str) -> SendResult:
    what = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, _SecondAttempt):
        return SendResult("unknown", error=f"{name}: the connection broke after the request was sent")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return SendResult("retry", error=f"{name}: cannot connect ({what})")
    if isinstance(exc, TimeoutError | aiohttp.ClientError | OSError):
        if not handed:
            return SendResult("retry", error=f"{name}: no connection ({what})")
        return SendResult("unknown", error=f"{name}: no answer after the request was sent ({what})")
    raise exc


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def reply_text(reply: Reply, limit: int = 200) -> str:
    """The start of an answer's body on one line, for error texts."""
    text = " ".join(reply.body.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def http_status_result(reply: Reply, name: str) -> SendResult:
    """``retry`` for 429, 5xx (honouring Retry-After) and redirects (the gateway did not take a redirected
    request; the URL needs fixing), ``failed`` for other 4xx, ``unknown`` for anything else."""
    error = f"{name}: HTTP {reply.status}: {reply_text(reply)}"
    if reply.status == 429 or 500 <= reply.status < 600:
        return SendResult("retry", error=error, retry_after=retry_after(reply.headers.get("Retry-After")))
    if 300 <= reply.status < 400:
        return SendResult("retry", error=f"{error} (redirected to {reply.headers.get('Location', '?')})")
    if 400 <= reply.status < 500:
        return SendResult("failed", error=error)
    return SendResult("unknown", error=error)
