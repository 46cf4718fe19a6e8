"""One ivr-bridge-like process for the router stress test: random queue traffic against a shared Redis.

Run as ``python tests/router_stress_worker.py REDIS_URL PREFIX NAME SEED SECONDS OUT.json``. Agents ``a0..`` are
logged in by the test; this process enqueues its own interactions (``NAME-n``) and, like any process would, assigns,
accepts, declines, finishes and changes presence for any of them. It writes every offer its ``assign`` calls made.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from bridge.config import RouterConfig
from bridge.router import Router


async def main(url: str, prefix: str, name: str, seed: int, seconds: float) -> list[list[object]]:
    rng = random.Random(seed)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    router = Router(url, RouterConfig(key_prefix=prefix, offer_timeout=0.3, wrapup_seconds=0.05), redis=client)
    offers: list[list[object]] = []
    counter = 0
    deadline = time.monotonic() + seconds
    snapshot_ids: list[str] = []
    held: list[str] = []
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.3:
            counter += 1
            await router.enqueue(f"{name}-{counter}", rng.choice(["voice", "web", "web", "wechat"]),
                                 rng.choice(["billing", "tech", "sales"]), rng.choice([0, 0, 0, 5]))
        elif roll < 0.55:
            for offer in await router.assign(most=rng.choice([1, 4, 32])):
                offers.append([offer.interaction, offer.number, offer.agent, offer.channel])
                held.append(offer.interaction)
        elif roll < 0.75 and snapshot_ids:
            iid = rng.choice(snapshot_ids)
            record = await router.interaction(iid)
            if record.get("state") == "offered" and rng.random() < 0.8:
                await router.accept(iid, record["agent"])
            elif record.get("state") in ("offered", "active") and rng.random() < 0.2:
                await router.requeue(iid, record["agent"], away=rng.random() < 0.1)
        elif roll < 0.85 and (held or snapshot_ids):
            # mostly what agents hold (the call or chat ends); sometimes anything (a caller hangs up waiting)
            await router.finish(held.pop(rng.randrange(len(held))) if held and rng.random() < 0.8
                                else rng.choice(snapshot_ids or held))
        elif roll < 0.95:
            await router.set_presence(f"a{rng.randrange(12)}", "away" if rng.random() < 0.15 else "available")
        else:
            await router.tick()
            snapshot_ids = list((await router.snapshot()).interactions)
    await client.aclose()
    return offers


if __name__ == "__main__":
    url, prefix, name, seed, seconds, out = sys.argv[1:7]
    Path(out).write_text(json.dumps(asyncio.run(main(url, prefix, name, int(seed), float(seconds)))))
