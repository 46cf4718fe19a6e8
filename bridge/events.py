"""The event bus: small domain events, delivered in-process and published on Redis pub/sub.

Events are for live views and tracing (the terminal softphone prints the prompts of its own call from them); the
record of truth is SQL. Publishing never blocks a call: events go through a bounded queue to one Redis writer,
and if Redis is away they are dropped with a counted warning rather than stalling calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]


class EventBus:
    def __init__(self, redis_url: str | None, channel: str = "ivr-bridge:events", queue_size: int = 10000) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self._listeners: list[Listener] = []
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self._redis: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    async def start(self) -> None:
        if self.redis_url:
            self._redis = aioredis.from_url(self.redis_url)
            await self._redis.ping()
            self._task = asyncio.create_task(self._writer(), name="event-bus")

    async def aclose(self) -> None:
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), 2)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def publish(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, **fields}
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", kind)
        if self._task is not None:
            try:
                self._queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1
                if self.dropped % 1000 == 1:
                    log.warning("event bus queue full: %d events not published", self.dropped)

    async def _writer(self) -> None:
        assert self._redis is not None
        while True:
            # Everything queued meanwhile goes out in one pipeline: one round trip (and one socket write) for
            # many events when calls are busy, instead of one per event.
            batch = [await self._queue.get()]
            while len(batch) < 500 and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                if len(batch) == 1:
                    await self._redis.publish(self.channel, json.dumps(batch[0], default=str))
                else:
                    pipe = self._redis.pipeline(transaction=False)
                    for event in batch:
                        pipe.publish(self.channel, json.dumps(event, default=str))
                    await pipe.execute()
            except RedisError as exc:
                self.dropped += len(batch)
                log.warning("%d event(s) not published to Redis: %s", len(batch), exc)
            finally:
                for _ in batch:
                    self._queue.task_done()


@contextlib.asynccontextmanager
async def subscription(redis_url: str, channel: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """Subscribe to ``channel``; inside the block, events published from then on can be iterated.

    Used by the terminal softphone; subscribing before the call starts means no event of the call is missed.
    """
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    with contextlib.suppress(ValueError):
                        yield json.loads(message["data"])

        yield events()
    finally:
        await pubsub.aclose()
        await client.aclose()
