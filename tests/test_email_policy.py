"""EmailPolicy: email recipients checked and counted against the per-address and global limits in real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from bridge.config import EmailConfig, EmailLimits
from bridge.outbox import Admission
from bridge.ratelimit import RateLimiter
from email_out.address import EmailPolicy

pytestmark = pytest.mark.integration


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[RateLimiter]:
    """A limiter on the session's Redis under a prefix of its own, so tests never share counters."""
    limiter = RateLimiter(redis_url, prefix=f"test:{uuid.uuid4().hex}")
    await limiter.start()
    yield limiter
    await limiter.aclose()


def policy(limiter: RateLimiter, per_address: int = 2, global_: int = 100) -> EmailPolicy:
    limits = EmailLimits.model_validate({"per_address": per_address, "global": global_})
    return EmailPolicy(EmailConfig(limits=limits), limiter)


async def test_a_valid_address_is_admitted_normalised_and_counted(limiter: RateLimiter) -> None:
    emails = policy(limiter)
    admission = await emails.admit("  Caller@Example.COM ")
    assert admission == Admission("Caller@example.com", counted=True)
    assert admission.ok and admission.counted
    assert await limiter.counts(emails.limits("Caller@example.com")) == [1, 1]


async def test_an_invalid_address_is_refused_and_not_counted(limiter: RateLimiter) -> None:
    emails = policy(limiter)
    admission = await emails.admit("caller@example.com\r\nRCPT TO:<x@evil.example>")
    assert not admission.ok
    assert admission.reason == "invalid"
    assert admission.detail
    assert await limiter.counts(emails.limits("caller@example.com")) == [0, 0]


async def test_the_per_address_limit_refuses_further_mail_to_that_address(limiter: RateLimiter) -> None:
    emails = policy(limiter, per_address=2)
    assert [(await emails.admit("a@example.com")).ok for _ in range(2)] == [True, True]
    refused = await emails.admit("a@example.com")
    assert (refused.ok, refused.reason) == (False, "limit:address")
    # Case variants of one mailbox share its allowance ...
    assert (await emails.admit("A@EXAMPLE.com")).reason == "limit:address"
    # ... other addresses do not, and a refused send counted nowhere.
    assert (await emails.admit("b@example.com")).ok
    assert await limiter.counts(emails.limits("a@example.com")) == [2, 3]


async def test_the_global_limit_refuses_every_address(limiter: RateLimiter) -> None:
    emails = policy(limiter, per_address=10, global_=3)
    assert all([(await emails.admit(f"user{n}@example.com")).ok for n in range(3)])
    refused = await emails.admit("someone-new@example.com")
    assert (refused.ok, refused.reason) == (False, "limit:global")
    assert await limiter.counts(emails.limits("someone-new@example.com")) == [0, 3]


async def test_policy_serves_the_email_channel(limiter: RateLimiter) -> None:
    assert policy(limiter).channel == "email"
