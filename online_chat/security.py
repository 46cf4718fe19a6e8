"""Request checks of the web app: CSRF tokens, the Origin/Referer check, the client's address, response headers
and an access log that never writes link tokens or query strings."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import Iterable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from yarl import URL

CSRF_COOKIE = "csrf"
CSRF_FIELD = "csrf"
_COOKIE_RE = re.compile(r"[A-Za-z0-9_-]{32,64}")
_FORWARDING = ("X-Forwarded-For", "Forwarded", "X-Real-IP")

SECURITY_HEADERS = {
    # No inline script or style anywhere: one stylesheet from this origin, forms post back to it.
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
                               "object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class Csrf:
    """Double-submit tokens: a random ``csrf`` cookie, and in each form an HMAC of it under a key derived from
    the link secret, so a page on another site can neither read nor make a valid pair."""

    def __init__(self, secret: str, secure: bool) -> None:
        self._key = hashlib.sha256(b"ivr-bridge csrf\0" + secret.encode()).digest()
        self.secure = secure

    def _token(self, cookie: str) -> str:
        return hmac.new(self._key, cookie.encode(), hashlib.sha256).hexdigest()

    def issue(self, request: web.Request) -> tuple[str, str | None]:
        """The form token for this request, and a new cookie value to set when the browser has none."""
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if _COOKIE_RE.fullmatch(cookie):
            return self._token(cookie), None
        cookie = secrets.token_urlsafe(32)
        return self._token(cookie), cookie

    def set_cookie(self, response: web.StreamResponse, cookie: str) -> None:
        response.set_cookie(CSRF_COOKIE, cookie, path="/", httponly=True, samesite="Strict", secure=self.secure)

    def valid(self, request: web.Request, token: object) -> bool:
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not isinstance(token, str) or not _COOKIE_RE.fullmatch(cookie) or len(token) != 64:
            return False
        return hmac.compare_digest(token, self._token(cookie))


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL (default ports dropped), or None when it has none."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return None
    if not parsed.scheme or not parsed.host:
        return None
    port = "" if parsed.port is None or parsed.is_default_port() else f":{parsed.port}"
    return f"{parsed.scheme.lower()}://{parsed.host.lower()}{port}"


def same_origin(request: web.Request, public_url: str) -> bool:
    """False when the request names an Origin (or, without one, a Referer) other than ``public_url``'s."""
    expected = origin_of(public_url)
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin_of(origin) == expected  # "null" (sandboxed, privacy) has no origin: refused
    referer = request.headers.get("Referer")
    if referer is not None:
        return origin_of(referer) == expected
    return True  # neither (some privacy settings): the CSRF token still guards the form


def _networks(items: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            logging.getLogger(__name__).warning("web.trusted_proxies: %r is not an address or network", item)
    return out


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class ClientAddress:
    """The client's address: the peer's, or behind trusted proxies the rightmost X-Forwarded-For entry that
    is not one of them (what a client writes into the header itself is never believed)."""

    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self.trusted = _networks(trusted_proxies)

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return address is not None and any(address in net for net in self.trusted)

    def of(self, request: web.Request) -> str:
        peer = _ip(request.remote)
        if peer is None:
            return request.remote or "unknown"
        if not self._is_trusted(peer):
            return str(peer)
        hops = [h for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
        for hop in reversed(hops):
            address = _ip(hop)
            if address is None:
                return str(peer)  # garbage in the chain: count against the proxy rather than believe it
            if not self._is_trusted(address):
                return str(address)
        return str(peer)

    def is_loopback(self, request: web.Request) -> bool:
        """A client on this machine, not a request relayed by a proxy on this machine."""
        peer = _ip(request.remote)
        if peer is None or not peer.is_loopback:
            return False
        if not any(name in request.headers for name in _FORWARDING):
            return True
        if not self._is_trusted(peer) or "X-Forwarded-For" not in request.headers:
            return False  # relayed by a proxy on this machine that we were not told about
        client = _ip(self.of(request))
        return client is not None and client.is_loopback


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the same headers on every answer, errors included."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


_TOKEN_PATH = re.compile(r"^/l/[^/]+")


def log_path(path: str) -> str:
    """A request path as logged: link tokens are bearer secrets and stay out of logs."""
    return _TOKEN_PATH.sub("/l/<token>", path)[:200]


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path (tokens redacted, no query string), status, time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d %.1fms", request.remote, request.method, log_path(request.path),
                         response.status, time * 1000)
