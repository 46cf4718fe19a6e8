"""Email recipients: one normal form for an address, and the per-address and global hourly limits.

Only plain ``local@domain`` addresses are taken: no display names, comments, quoted local parts or IP-literal
domains. Such forms are legal but nobody types them into a call-back form, and every one of them is a way to
smuggle something past a naive parser further down. The domain is lower-cased and IDNA-encoded (UTS 46), so
``用户@例子.中国`` style domains work over plain SMTP; a non-ASCII *local* part would need SMTPUTF8 end to end and
is refused.
"""

from __future__ import annotations

import re

import idna

from bridge.config import EmailConfig
from bridge.outbox import Admission
from bridge.ratelimit import Limit, RateLimiter

MAX_ADDRESS = 254   # RFC 5321 4.5.3.1.3 (path) minus the angle brackets
MAX_LOCAL = 64      # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 253
_MAX_INPUT = 1024   # longer input is refused before any parsing (IDNA work grows with length)

# RFC 5322 dot-atom: atext runs separated by single dots.
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\x85\u2028\u2029,<>\"()\[\]\\;:]")


class AddressRefused(ValueError):
    """An address that cannot be used; ``reason`` is a short code (``invalid``), ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _invalid(detail: str) -> AddressRefused:
    return AddressRefused("invalid", detail)


def normalise_address(raw: str) -> str:
    """``raw`` as ``local@domain`` with the domain lower-cased and IDNA-encoded, or :class:`AddressRefused`."""
    if not isinstance(raw, str):
        raise _invalid("not text")
    if len(raw) > _MAX_INPUT:
        raise _invalid("too long")
    text = raw.strip()
    if not text:
        raise _invalid("empty")
    bad = _FORBIDDEN.search(text)
    if bad:
        raise _invalid(f"contains {bad.group()!r}")
    if text.count("@") != 1:
        raise _invalid("needs exactly one @")
    local, domain = text.split("@")
    if not local.isascii():
        raise _invalid("non-ASCII local part (SMTPUTF8) is not supported")
    if not _LOCAL.fullmatch(local):
        raise _invalid("malformed local part")
    if len(local) > MAX_LOCAL:
        raise _invalid(f"local part longer than {MAX_LOCAL}")
    ascii_domain = _normalise_domain(domain)
    address = f"{local}@{ascii_domain}"
    if len(address) > MAX_ADDRESS:
        raise _invalid(f"longer than {MAX_ADDRESS}")
    return address


def _normalise_domain(domain: str) -> str:
    if not domain:
        raise _invalid("no domain")
    if domain.endswith("."):
        raise _invalid("domain ends with a dot")
    try:
        encoded = idna.encode(domain, uts46=True).decode("ascii")
    except (UnicodeError, ValueError) as exc:  # idna.IDNAError is a UnicodeError
        raise _invalid(f"domain is not a valid IDNA name ({exc})") from None
    encoded = encoded.lower()
    labels = encoded.split(".")
    if len(labels) < 2:
        raise _invalid("domain needs at least two labels")
    if len(encoded) > MAX_DOMAIN:
        raise _invalid(f"domain longer than {MAX_DOMAIN}")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise _invalid(f"malformed domain label {label!r}")
    if labels[-1].isdigit():
        raise _invalid("numeric top-level domain (IP literals are not taken)")
    return encoded


class EmailPolicy:
    """The email :class:`~bridge.outbox.RecipientPolicy`: a valid address, under its own and the global limit.

    Reasons: ``invalid``, ``limit:address``, ``limit:global`` (counts per ``limiter.window``, an hour by default).
    """

    channel = "email"

    def __init__(self, config: EmailConfig, limiter: RateLimiter) -> None:
        self.config = config
        self.limiter = limiter

    @staticmethod
    def address_limit_name(address: str) -> str:
        # Mailbox names are case-insensitive in practice; counting case variants apart would let
        # ``Bob@`` and ``bob@`` each take the full allowance.
        return f"email:address:{address.lower()}"

    def limits(self, address: str) -> list[Limit]:
        """The limits one send to ``address`` (normalised) counts against, the address first."""
        return [Limit(self.address_limit_name(address), self.config.limits.per_address),
                Limit("email:global", self.config.limits.global_)]

    async def admit(self, recipient: str, *, region: str | None = None) -> Admission:
        """Normalise ``recipient`` and count it; ``region`` is not used for email."""
        try:
            address = normalise_address(recipient)
        except AddressRefused as exc:
            return Admission(None, exc.reason, exc.detail)
        limits = self.limits(address)
        full = await self.limiter.hit(limits)
        if full is None:
            return Admission(address, counted=True)
        scope = "address" if full is limits[0] else "global"
        return Admission(None, f"limit:{scope}", f"{full.limit} an hour")
