"""SMS through Kannel's smsbox (``/cgi-bin/sendsms``), and the delivery reports Kannel calls back with.

Every SMS asks for all delivery reports (``dlr-mask=31``) at ``{public_url}/sms/dlr?id=..&sig=..&type=%d&ref=%F``;
Kannel fills in ``%d`` (the report type) and ``%F`` (the SMSC's message id). ``sig`` is an HMAC of the follow-up
id, so the endpoint only believes reports for messages we sent. Reports for one SMS may arrive in any order
(Kannel's fake SMSC often reports "delivered" before "accepted by the SMSC"): never let a later report lower a
state ("accepted" after "delivered" changes nothing).

``interrupted = "verify"``: a send cut off after the request left is settled by its delivery report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from bridge.config import SmsConfig
from bridge.outbox import Handing, Interrupted, Outgoing, SendResult
from sms import _transport

log = logging.getLogger(__name__)

DLR_PATH = "/sms/dlr"
DLR_MASK = 31  # 1 delivered, 2 undeliverable, 4 buffered at the SMSC, 8 accepted by the SMSC, 16 rejected by it
AUTH_RETRY_AFTER = 300.0
UCS2_SINGLE = 70   # characters (UTF-16 units) in one UCS-2 SMS
UCS2_PART = 67     # ... in each part of a concatenated one (the UDH takes 6 of 140 bytes)

DlrStatus = Literal["delivered", "failed", "accepted", "buffered"]
DLR_TYPES: dict[int, DlrStatus] = {1: "delivered", 2: "failed", 4: "buffered", 8: "accepted", 16: "failed"}

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")      # follow-up ids (uuid hex); nothing Kannel's %-codes could hit
_SIG_RE = re.compile(r"[0-9a-f]{32}")
_REF_RE = re.compile(r"[\x21-\x7e]{1,128}")        # an SMSC message id: printable ASCII, no spaces
_E164_RE = re.compile(r"\+[1-9][0-9]{6,14}")


@dataclass(frozen=True)
class DeliveryReport:
    """One Kannel delivery report for follow-up ``followup_id``; ``gateway_ref`` is the SMSC's message id."""

    followup_id: str
    status: DlrStatus
    gateway_ref: str | None
    dlr_type: int = 0


def sign_dlr(secret: str, followup_id: str) -> str:
    """The ``sig`` of a delivery-report URL: HMAC-SHA256 of the follow-up id, 128 bits in hex."""
    if not secret:
        raise ValueError("no secret for delivery-report signatures (links.secret)")
    # The purpose is part of the message so the same secret can sign links without the two being exchangeable.
    mac = hmac.new(secret.encode(), b"ivr-bridge/sms-dlr/" + followup_id.encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def verify_dlr(secret: str, followup_id: str, sig: str) -> bool:
    """Whether ``sig`` is the signature of ``followup_id`` (constant-time)."""
    if not secret or not isinstance(sig, str) or not isinstance(followup_id, str):
        return False
    return hmac.compare_digest(sign_dlr(secret, followup_id).encode(), sig.encode("utf-8", "replace"))


def parse_dlr(query: Mapping[str, str], *, secret: str) -> DeliveryReport:
    """Read a delivery-report callback's query (``id``, ``sig``, ``type``, ``ref``); ``ValueError`` if it is
    malformed, of an unknown type or not signed with ``secret``."""
    followup_id = query.get("id", "")
    sig = query.get("sig", "")
    kind = query.get("type", "")
    ref = query.get("ref", "").strip()
    if not _ID_RE.fullmatch(followup_id):
        raise ValueError("delivery report: bad id")
    if not _SIG_RE.fullmatch(sig) or not verify_dlr(secret, followup_id, sig):
        raise ValueError("delivery report: bad signature")
    if not kind.isascii() or not kind.isdigit() or int(kind) not in DLR_TYPES:
        raise ValueError(f"delivery report: unknown type {kind[:10]!r}")
    if ref and not _REF_RE.fullmatch(ref):
        raise ValueError("delivery report: bad ref")
    return DeliveryReport(followup_id, DLR_TYPES[int(kind)], ref or None, int(kind))


class KannelGateway:
    """The :class:`bridge.outbox.Gateway` of the ``sms`` channel through Kannel's sendsms interface."""

    channel: str = "sms"
    interrupted: Interrupted = "verify"

    def __init__(self, config: SmsConfig, public_url: str, dlr_secret: str) -> None:
        if "%" in public_url:
            # Kannel reads every % in a dlr-url as one of its escapes (%d, %F, ...).
            raise ValueError(f"web.public_url must not contain '%': {public_url!r}")
        self.config = config
        self.public_url = public_url.rstrip("/")
        self.dlr_secret = dlr_secret
        self._session: aiohttp.ClientSession | None = None

    @property
    def sendsms_url(self) -> str:
        kannel = self.config.kannel
        return f"http://{kannel.host}:{kannel.sendsms_port}/cgi-bin/sendsms"

    async def start(self) -> None:
        if not self.dlr_secret:
            raise ValueError("KannelGateway needs a secret to sign delivery-report URLs (links.secret)")
        if not self.config.kannel.password:
            raise ValueError("sms.kannel.password is not set (run `ivr-bridge setup-secrets`)")
        if self._session is None:
            self._session = _transport.make_session(self.config.kannel.timeout)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def dlr_url(self, followup_id: str) -> str:
        """Where Kannel reports on this follow-up (``%d`` and ``%F`` are Kannel's to fill in)."""
        sig = sign_dlr(self.dlr_secret, followup_id)
        return f"{self.public_url}{DLR_PATH}?id={followup_id}&sig={sig}&type=%d&ref=%F"

    def request_url(self, message: Outgoing) -> URL:
        """The sendsms URL for ``message``, every value percent-encoded.

        Encoded by hand: Kannel decodes ``+`` as a space (the number's ``+`` must be ``%2B``) and the dlr-url
        must travel encoded so that its own ``&`` and ``%d`` reach Kannel intact.
        """
        kannel = self.config.kannel
        params = {
            "username": kannel.username,
            "password": kannel.password,
            "from": self.config.sender,
            "to": message.recipient,
            "text": message.payload["text"],
            "charset": "UTF-8",
            "coding": "2",              # UCS-2: Chinese, Korean and every other script arrive as written
            "dlr-mask": str(DLR_MASK),
            "dlr-url": self.dlr_url(message.followup_id),
        }
        return URL(f"{self.sendsms_url}?{urlencode(params, quote_via=quote, safe='')}", encoded=True)

    async def send(self, message: Outgoing, handing: Handing) -> SendResult:
        """Hand one SMS to Kannel: ``sent`` once smsbox accepted or queued it."""
        if self._session is None:
            raise RuntimeError("KannelGateway.start() was not called")
        problem = _check(message) or self._too_long(message.payload["text"])
        if problem:
            return SendResult("failed", error=f"kannel: {problem}")
        kannel = self.config.kannel
        reply = await _transport.request(self._session, "GET", self.request_url(message), handing, name="kannel",
                                         deadline=3 * kannel.timeout)
        if isinstance(reply, SendResult):
            # The password travels in the URL; keep it out of error texts whatever a library puts in them.
            if reply.error and kannel.password in reply.error:
                return dataclasses.replace(reply, error=reply.error.replace(kannel.password, "***"))
            return reply
        body = reply.body.strip()
        if 200 <= reply.status < 300:
            # "0: Accepted for delivery", "3: Queued for later delivery" (no SMSC connected: bearerbox keeps it)
            if body.startswith(("0:", "3:")):
                return SendResult("sent")
            return SendResult("unknown", error=f"kannel: unexpected answer: HTTP {reply.status}: "
                                               f"{_transport.reply_text(reply)}")
        if reply.status in (401, 403):
            # Our credentials (or our address) are wrong, not the message: retry, so every queued SMS is not
            # failed for good by a configuration slip; out of attempts they go dead and `outbox retry` resends.
            log.error("Kannel refused our credentials (sms.kannel.username/password): %s", body[:200])
            return SendResult("retry", error=f"kannel: authorization failed: {_transport.reply_text(reply)}",
                              retry_after=AUTH_RETRY_AFTER)
        return _transport.http_status_result(reply, "kannel")


    def _too_long(self, text: str) -> str:
        # Kannel cuts a text longer than max-messages parts short and still answers "0: Accepted".
        units = len(text.encode("utf-16-be")) // 2
        capacity = UCS2_SINGLE if units <= UCS2_SINGLE else UCS2_PART * self.config.kannel.max_messages
        if units > capacity:
            return (f"text of {units} UCS-2 units does not fit {self.config.kannel.max_messages} parts "
                    f"({capacity}); Kannel would cut it short")
        return ""


def _check(message: Outgoing) -> str:
    """Why ``message`` cannot go to Kannel at all ("" if it can)."""
    if message.channel != "sms":
        return f"not an SMS (channel {message.channel!r})"
    if not _E164_RE.fullmatch(message.recipient):
        return f"recipient {message.recipient!r} is not E.164"
    if not _ID_RE.fullmatch(message.followup_id):
        return f"follow-up id {message.followup_id!r} is not usable in a delivery-report URL"
    text = message.payload.get("text", "")
    if not text.strip():
        return "empty text"
    if "\x00" in text:
        return "NUL in text"
    return ""
