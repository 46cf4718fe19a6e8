"""The MIME message for one outgoing email: text and HTML alternatives, UTF-8, a Message-ID stable across attempts.

Header values are checked, not cleaned: a subject or name with a line break in it is a bug or an attack upstream
and must surface as :class:`HeaderInjection`, not be folded into something that looks harmless.
"""

from __future__ import annotations

import email.policy
import hashlib
import html
import re
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from bridge.outbox import Outgoing

# CR, LF and NUL, plus everything else str.splitlines() treats as a line boundary (\v, \f, \x1c-\x1e, NEL,
# U+2028/9) and the other C0 controls and DEL: none has a place in a header, and some mail software splits
# lines on them.
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_LANGUAGE = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")  # a BCP 47 tag, loosely


class HeaderInjection(ValueError):
    """A header value holding a line break, NUL or other control character."""

    def __init__(self, header: str, value: str) -> None:
        super().__init__(f"{header}: control character or line break in {value!r}")
        self.header = header
        self.value = value


def check_header(header: str, value: str) -> str:
    """``value`` unchanged; :class:`HeaderInjection` when it holds a line break, NUL or control character,
    ``ValueError`` when it is not valid Unicode."""
    if _UNSAFE.search(value):
        raise HeaderInjection(header, value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: would only fail later, while the message is flattened
        raise ValueError(f"{header}: not valid Unicode: {value!r}") from None
    return value


def message_id(idempotency_key: str, domain: str) -> str:
    """``<token@domain>``: the same for every attempt of one follow-up, so a resend is recognisably the same mail.

    The token is a hash, so nothing of the key (which may name internal ids) shows in the mail.
    """
    check_header("Message-ID", domain)
    if not _DOMAIN.fullmatch(domain):
        raise ValueError(f"Message-ID domain {domain!r} is not a host name")
    token = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    return f"<{token}@{domain.lower()}>"


def _html_from_text(text: str) -> str:
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    body = "\n".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs)
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n{body}\n</body></html>\n'


def build_message(outgoing: Outgoing, *, from_addr: str, from_name: str, domain: str,
                  now: datetime | None = None) -> EmailMessage:
    """The ``multipart/alternative`` message for ``outgoing`` (payload ``subject``, ``text``, ``html``).

    Without ``html`` an HTML part is made from the escaped text. Raises :class:`HeaderInjection` for a control
    character in any header value and ``ValueError`` for an address the email package cannot parse.
    """
    payload = outgoing.payload
    subject = check_header("Subject", payload.get("subject", ""))
    check_header("To", outgoing.recipient)
    check_header("From", from_addr)
    check_header("From", from_name)
    text = payload.get("text")
    if text is None:
        raise ValueError("email payload has no text")
    body_html = payload.get("html") or _html_from_text(text)

    message = EmailMessage(policy=email.policy.SMTP)
    message["Subject"] = subject
    message["From"] = Address(display_name=from_name, addr_spec=from_addr)
    message["To"] = Address(addr_spec=outgoing.recipient)
    message["Date"] = format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = message_id(outgoing.idempotency_key, domain)
    # RFC 3834: marks the mail as automatic so well-behaved auto-responders (vacation replies) stay quiet;
    # X-Auto-Response-Suppress is Exchange's spelling of the same wish.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Auto-Response-Suppress"] = "All"
    message.set_content(text, subtype="plain", charset="utf-8")
    message.add_alternative(body_html, subtype="html", charset="utf-8")
    # After the content: setting content clears Content-* headers (and add_alternative moves them down).
    if outgoing.language and _LANGUAGE.fullmatch(outgoing.language):
        message["Content-Language"] = outgoing.language
    return message
