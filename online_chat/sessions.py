"""Sessions of the agent desktop, kept in Redis so every ivr-bridge process sees the same ones.

A session id is 256 random bits given to the browser once, in an HttpOnly, SameSite=Strict cookie; Redis keeps
only its SHA-256, so a copy of the keys cannot be replayed as cookies. A session ends after ``idle`` seconds
without use (an open desktop uses it: its socket pings), ``lifetime`` seconds after login however busy, or at
logout, which deletes it. Every login makes a new id (no fixation).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiohttp import web

COOKIE = "desk"
COOKIE_PATH = "/desk"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32)


@dataclass(frozen=True)
class Session:
    """Who is logged in; ``key`` names the session in Redis (never the cookie's value)."""

    key: str
    agent: str
    created: float


class SessionStore:
    """Create, look up (and keep alive) and delete sessions under ``prefix`` in Redis (a client made with
    ``decode_responses=True``)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, idle: float, lifetime: float, secure: bool) -> None:
        self.redis = redis
        self.prefix = prefix
        self.idle = idle
        self.lifetime = lifetime
        self.secure = secure

    def _key(self, token: str) -> str:
        return self.prefix + hashlib.sha256(token.encode()).hexdigest()

    async def create(self, agent: str) -> str:
        """A new session for ``agent``; returns the token for the cookie."""
        token = secrets.token_urlsafe(32)
        key = self._key(token)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"agent": agent, "created": repr(time.time())})
            pipe.pexpire(key, int(min(self.idle, self.lifetime) * 1000))
            await pipe.execute()
        return token

    async def get(self, token: str | None) -> Session | None:
        """The live session of a token, its idle time restarted; None when unknown, expired or malformed."""
        if not token or not _TOKEN_RE.fullmatch(token):
            return None
        key = self._key(token)
        fields = await self.redis.hgetall(key)
        if not fields:
            return None
        created = float(fields.get("created", 0))
        left = created + self.lifetime - time.time()
        if left <= 0:
            await self.redis.delete(key)
            return None
        await self.redis.pexpire(key, max(1, int(min(self.idle, left) * 1000)))
        return Session(key, str(fields.get("agent", "")), created)

    async def alive(self, session: Session) -> bool:
        """Whether a session still exists (not logged out or expired), restarting its idle time."""
        left = session.created + self.lifetime - time.time()
        if left <= 0:
            await self.redis.delete(session.key)
            return False
        return bool(await self.redis.pexpire(session.key, max(1, int(min(self.idle, left) * 1000))))

    async def delete(self, token: str | None) -> None:
        if token and _TOKEN_RE.fullmatch(token):
            await self.redis.delete(self._key(token))

    # ---- the cookie
    def token(self, request: web.Request) -> str | None:
        return request.cookies.get(COOKIE)

    def set_cookie(self, response: web.StreamResponse, token: str) -> None:
        """The session cookie: no Max-Age (it ends with the browser; the server ends it sooner), only sent to
        the desktop's paths, never readable by script, never sent by another site's request."""
        response.set_cookie(COOKIE, token, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=self.secure)

    def clear_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(COOKIE, path=COOKIE_PATH)
