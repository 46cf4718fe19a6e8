"""Who may be texted and how often: E.164 mobiles of allowed countries, under fraud limits (SMS pumping).

Pumping fraud sends many texts to premium numbers that share a prefix, so a send counts against the number, its
prefix (all but the last ``prefix_tail`` digits), its country and the whole system, atomically across every
ivr-bridge process (:class:`bridge.ratelimit.RateLimiter`). A refused send counts against nothing.
"""

from __future__ import annotations

from bridge.config import SmsConfig
from bridge.outbox import Admission
from bridge.ratelimit import Limit, RateLimiter
from sms.numbers import NumberRefused, country_of, normalise_mobile


class SmsPolicy:
    """The :class:`bridge.outbox.RecipientPolicy` of the ``sms`` channel."""

    channel = "sms"

    def __init__(self, config: SmsConfig, limiter: RateLimiter) -> None:
        self.config = config
        self.limiter = limiter

    def limits(self, e164: str) -> list[Limit]:
        """The counters one SMS to ``e164`` counts against, in the order a refusal names them."""
        lim = self.config.limits
        tail = max(lim.prefix_tail, 0)
        prefix = e164[:-tail] if tail else e164
        return [
            Limit(f"sms:number:{e164}", lim.per_number),
            Limit(f"sms:prefix:{prefix}", lim.per_prefix),
            Limit(f"sms:country:{country_of(e164) or '?'}", lim.per_country),
            Limit("sms:global", lim.global_),
        ]

    async def admit(self, recipient: str, *, region: str | None = None) -> Admission:
        """Normalise ``recipient`` and count it; refusals: ``invalid``, ``not_mobile``, ``country``,
        ``anonymous``, ``limit:number``, ``limit:prefix``, ``limit:country``, ``limit:global``."""
        try:
            e164 = normalise_mobile(recipient, region=region, allowed=self.config.countries)
        except NumberRefused as exc:
            return Admission(None, reason=exc.reason, detail=exc.detail)
        limits = self.limits(e164)
        full = await self.limiter.hit(limits)
        if full is not None:
            kind = full.name.split(":")[1]
            return Admission(None, reason=f"limit:{kind}",
                             detail=f"{full.name} reached its limit of {full.limit} per {self.limiter.window} s")
        return Admission(e164, counted=True)
