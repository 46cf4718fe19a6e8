"""The outbox: follow-ups (SMS, email) are rows written with the change that called for them; a dispatcher sends
them through the channel's gateway with retries, backoff, a dead-letter state and no double sends.

A gateway (``sms/``, ``email_out/``) implements :class:`Gateway`. It awaits ``handing()`` right before the point
of no return (an SMTP server receiving the final dot, an HTTP request leaving for the SMS gateway), so the row
records whether a dispatcher that died mid-send may have handed the message over:

- died before ``handing``: the gateway never had it; sent again.
- died after: resolved as the gateway's ``interrupted`` says: ``sent`` (SMTP: the dot follows at once),
  ``verify`` (wait for the gateway's delivery report, send again only if none comes) or ``uncertain``
  (kept for an operator: ``ivr-bridge outbox retry``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

SendStatus = Literal["sent", "delivered", "retry", "failed", "unknown"]
Interrupted = Literal["sent", "verify", "uncertain"]


@dataclass(frozen=True)
class Outgoing:
    """One message as a gateway sees it. ``payload`` is ``{"text"}`` for SMS, ``{"subject", "text", "html"}``
    for email; ``idempotency_key`` is stable across attempts (an email's Message-ID is made from it)."""

    followup_id: str
    idempotency_key: str
    channel: str
    recipient: str
    language: str
    payload: Mapping[str, str]


@dataclass(frozen=True)
class SendResult:
    """What a gateway made of one attempt.

    ``sent``: taken (a delivery report may follow). ``delivered``: delivered. ``retry``: certainly not taken,
    try again later (gateway down, busy). ``failed``: refused for good (bad recipient). ``unknown``: it may
    have been taken (the connection broke after the request left).
    """

    status: SendStatus
    gateway_ref: str | None = None
    error: str | None = None
    retry_after: float | None = None


Handing = Callable[[], Awaitable[None]]


class Gateway(Protocol):
    """A channel's way out (one per channel: ``sms`` or ``email``)."""

    channel: str
    interrupted: Interrupted

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def send(self, message: Outgoing, handing: Handing) -> SendResult:
        """Send one message; await ``handing()`` right before the point of no return. Never raise for a
        gateway-side failure: return ``retry``, ``failed`` or ``unknown`` with the reason in ``error``."""
        ...


@dataclass(frozen=True)
class Admission:
    """A recipient check: ``recipient`` normalised (E.164, lower-cased domain) or ``reason`` why not."""

    recipient: str | None
    reason: str | None = None
    detail: str = ""
    counted: bool = field(default=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.recipient is not None


class RecipientPolicy(Protocol):
    """Validates and rate-limits the recipients of one channel (``sms/``: mobile numbers, fraud limits;
    ``email_out/``: addresses)."""

    channel: str

    async def admit(self, recipient: str, *, region: str | None = None) -> Admission:
        """Normalise ``recipient`` and count it against the limits; ``Admission.reason`` says why not.
        ``region`` (ISO 3166) reads national numbers."""
        ...
