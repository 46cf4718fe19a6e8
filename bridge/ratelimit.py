"""Rate limits shared by every ivr-bridge process (Redis): several counters checked and counted atomically.

A send counts against all its limits at once (the number, its prefix, the country, the whole system) or against
none: one Lua script checks every counter and increments them only when all are under their limits, so a burst
spread over processes cannot slip past between a check and an increment.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

# KEYS: counters; ARGV: window seconds, then one limit per key. Returns 0 when counted, else the 1-based index
# of the first counter that is full (nothing is counted then).
_CHECK_AND_COUNT = """
for i, key in ipairs(KEYS) do
  local current = tonumber(redis.call('GET', key) or '0')
  if current >= tonumber(ARGV[i + 1]) then return i end
end
for i, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('EXPIRE', key, ARGV[1]) end
end
return 0
"""


@dataclass(frozen=True)
class Limit:
    """At most ``limit`` events per ``window`` seconds for ``name`` (e.g. ``number:+8613800138000``)."""

    name: str
    limit: int


class RateLimiter:
    """Fixed-window counters in Redis under ``prefix``; ``hit`` counts an event against several limits."""

    def __init__(self, redis_url: str, prefix: str = "ivr-bridge:limit", window: int = 3600) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.window = window
        self._redis: aioredis.Redis | None = None
        self._script: object | None = None

    async def start(self) -> None:
        self._redis = aioredis.from_url(self.redis_url)
        self._script = self._redis.register_script(_CHECK_AND_COUNT)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _keys(self, limits: Sequence[Limit]) -> list[str]:
        slot = int(time.time()) // self.window
        return [f"{self.prefix}:{limit.name}:{slot}" for limit in limits]

    async def hit(self, limits: Sequence[Limit]) -> Limit | None:
        """Count one event against every limit, or against none; returns the first limit that is full."""
        if self._script is None:
            raise RuntimeError("RateLimiter.start() was not called")
        if not limits:
            return None
        full = int(await self._script(keys=self._keys(limits),  # type: ignore[operator]
                                      args=[self.window, *(max(0, lim.limit) for lim in limits)]))
        return limits[full - 1] if full else None

    async def counts(self, limits: Sequence[Limit]) -> list[int]:
        """Current counts in this window (for reports and tests)."""
        if self._redis is None:
            raise RuntimeError("RateLimiter.start() was not called")
        values = await self._redis.mget(self._keys(limits))
        return [int(v or 0) for v in values]
