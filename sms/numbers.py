"""Mobile numbers: read what a caller or a web form gave us, keep only numbers we may text, as E.164.

Refusals carry a reason code (``invalid``, ``not_mobile``, ``country``, ``anonymous``) for the outbox's
``blocked`` state and for reports; ``detail`` is for people.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType

# Only what people write in a phone number. Anything else (letters, CR/LF, NUL, other punctuation) is refused
# before the parser sees it: phonenumbers is lenient (it reads "1-800-FLOWERS" and skips junk), and the number
# ends up in URLs, logs and Kannel requests.
_CHARS_RE = re.compile(r"[0-9 +\-()]+")
_MAX_LEN = 32  # E.164 has at most 15 digits; leave room for spaces and punctuation, refuse novels

# What Asterisk and SIP devices put in place of a withheld caller number.
ANONYMOUS = frozenset({"", "anonymous", "restricted", "private", "unknown", "unavailable", "withheld"})

_MOBILE_TYPES = (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE)


class NumberRefused(ValueError):
    """A number we will not text; ``reason`` is a stable code, ``detail`` a human explanation."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def normalise_mobile(raw: str, *, region: str | None, allowed: Collection[str]) -> str:
    """``raw`` as E.164 if it is a valid mobile number of an allowed country, else raise :class:`NumberRefused`.

    ``region`` (ISO 3166, e.g. ``CN``) reads national numbers; without it only ``+``-prefixed numbers parse.
    ``allowed`` is the country allowlist (ISO 3166 codes, any case).
    """
    if not isinstance(raw, str):
        raise NumberRefused("invalid", f"not text: {type(raw).__name__}")
    text = raw.strip(" ")
    if text.lower() in ANONYMOUS:
        raise NumberRefused("anonymous", "no caller number (withheld or unknown)")
    if len(text) > _MAX_LEN:
        raise NumberRefused("invalid", f"longer than {_MAX_LEN} characters")
    if not _CHARS_RE.fullmatch(text):
        raise NumberRefused("invalid", "may contain only digits, spaces and + - ( )")
    if "+" in text[1:]:
        raise NumberRefused("invalid", "'+' may only start the number")
    try:
        number = phonenumbers.parse(text, region.upper() if region else None)
    except NumberParseException as exc:
        raise NumberRefused("invalid", f"cannot read {text!r}: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise NumberRefused("invalid", f"{text!r} is not a valid number")
    country = phonenumbers.region_code_for_number(number) or ""
    if country.upper() not in {c.upper() for c in allowed}:
        raise NumberRefused("country", f"country {country or '?'} is not in sms.countries")
    if phonenumbers.number_type(number) not in _MOBILE_TYPES:
        raise NumberRefused("not_mobile", f"{text!r} is not a mobile number")
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def country_of(e164: str) -> str:
    """The ISO 3166 region of an E.164 number (``""`` if unknown)."""
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(e164, None)) or ""
    except NumberParseException:
        return ""
