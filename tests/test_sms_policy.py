"""SMS fraud limits against a real Redis: per number, per prefix, per country, global; refusals count nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from bridge.config import SmsConfig, SmsLimits
from bridge.ratelimit import RateLimiter
from sms.policy import SmsPolicy

pytestmark = pytest.mark.integration

# One window for the whole run: a fixed hour window could roll over mid-test and reset the counters.
WINDOW = 10**9


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[RateLimiter]:
    limiter = RateLimiter(redis_url, prefix=f"test-sms:{uuid.uuid4().hex}", window=WINDOW)
    await limiter.start()
    try:
        yield limiter
    finally:
        await limiter.aclose()


def policy(limiter: RateLimiter, **limits: int) -> SmsPolicy:
    values = {"per_number": 100, "per_prefix": 100, "prefix_tail": 3, "per_country": 100, "global": 100} | limits
    return SmsPolicy(SmsConfig(countries=["CN", "US", "GB", "KR"], limits=SmsLimits.model_validate(values)),
                     limiter)


async def test_admitted_number_is_normalised_and_counted(limiter: RateLimiter) -> None:
    sms = policy(limiter)
    admission = await sms.admit("138 0013 8000", region="CN")
    assert admission.ok and admission.recipient == "+8613800138000" and admission.counted
    assert await limiter.counts(sms.limits("+8613800138000")) == [1, 1, 1, 1]


async def test_one_number_is_capped_at_per_number(limiter: RateLimiter) -> None:
    sms = policy(limiter, per_number=3)
    results = [await sms.admit("+8613800138000") for _ in range(5)]
    assert [a.ok for a in results] == [True, True, True, False, False]
    assert results[3].reason == "limit:number" and results[3].recipient is None
    assert (await sms.admit("+8613800138001")).ok  # its neighbour is another number


async def test_burst_of_sequential_numbers_in_one_prefix_is_capped_at_per_prefix(limiter: RateLimiter) -> None:
    sms = policy(limiter, per_prefix=20)
    results = [await sms.admit(f"+8613800138{n:03d}") for n in range(30)]
    assert sum(a.ok for a in results) == 20
    assert all(a.reason == "limit:prefix" for a in results[20:])
    # Another prefix of the same country is not affected.
    assert (await sms.admit("+8613900139000")).ok


async def test_country_cap_spans_prefixes(limiter: RateLimiter) -> None:
    sms = policy(limiter, per_country=5)
    results = [await sms.admit(f"+86139{n:02d}000000") for n in range(7)]
    assert [a.ok for a in results] == [True] * 5 + [False] * 2
    assert results[5].reason == "limit:country"
    assert (await sms.admit("+12025550123")).ok  # the US has its own count


async def test_global_cap_spans_countries(limiter: RateLimiter) -> None:
    sms = policy(limiter, **{"global": 4})
    numbers = ["+8613800138000", "+12025550123", "+447400123456", "+821012345678", "+8613900139000"]
    results = [await sms.admit(n) for n in numbers]
    assert [a.ok for a in results] == [True] * 4 + [False]
    assert results[4].reason == "limit:global"


async def test_refusal_counts_nothing(limiter: RateLimiter) -> None:
    sms = policy(limiter, per_number=1, per_prefix=2)
    assert (await sms.admit("+8613800138000")).ok
    assert (await sms.admit("+8613800138000")).reason == "limit:number"
    # The refused second send did not count against the prefix: a neighbour still gets the last prefix slot.
    assert await limiter.counts(sms.limits("+8613800138000")) == [1, 1, 1, 1]
    assert (await sms.admit("+8613800138001")).ok
    assert (await sms.admit("+8613800138002")).reason == "limit:prefix"
    counts = await limiter.counts(sms.limits("+8613800138002"))
    assert counts == [0, 2, 2, 2]


@pytest.mark.parametrize(("raw", "reason"), [
    ("+861065529988", "not_mobile"),
    ("+4915123456789", "country"),
    ("call me maybe", "invalid"),
    ("+86138\r\n00138000", "invalid"),
    ("anonymous", "anonymous"),
])
async def test_unusable_numbers_are_refused_before_counting(limiter: RateLimiter, raw: str, reason: str) -> None:
    sms = policy(limiter)
    admission = await sms.admit(raw)
    assert not admission.ok and admission.reason == reason and admission.detail
    assert await limiter.counts(sms.limits("+8613800138000")) == [0, 0, 0, 0]
