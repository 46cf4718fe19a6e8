"""Signed links: what a customer receives points at ``/l/<token>``; the token names a stored link and its expiry
and carries an HMAC, so a link cannot be forged, altered or used after it expires."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import struct

TAG_BYTES = 12  # 96-bit tag: short enough for an SMS, far beyond guessing


class LinkInvalid(ValueError):
    """A token that is malformed, tampered with or expired; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"link {reason}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    """Makes and checks link tokens with one secret (``links.secret``)."""

    def __init__(self, secret: str) -> None:
        if len(secret) < 16:
            raise ValueError("the link secret must be at least 16 characters (run `ivr-bridge setup-secrets`)")
        self._key = hashlib.sha256(b"ivr-bridge link\0" + secret.encode()).digest()

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:TAG_BYTES]

    def token(self, link_id: str, expires: dt.datetime) -> str:
        body = bytes.fromhex(link_id) + struct.pack(">I", int(expires.timestamp()))
        return f"{_b64(body)}.{_b64(self._tag(body))}"

    def verify(self, token: str, now: dt.datetime | None = None) -> tuple[str, dt.datetime]:
        """Return (link id, expiry) or raise LinkInvalid."""
        if len(token) > 64 or token.count(".") != 1:
            raise LinkInvalid("malformed")
        body_text, tag_text = token.split(".")
        try:
            body, tag = _unb64(body_text), _unb64(tag_text)
        except (ValueError, TypeError) as exc:
            raise LinkInvalid("malformed") from exc
        if len(body) != 20 or len(tag) != TAG_BYTES:
            raise LinkInvalid("malformed")
        if not hmac.compare_digest(tag, self._tag(body)):
            raise LinkInvalid("signature")
        expires = dt.datetime.fromtimestamp(struct.unpack(">I", body[16:])[0], dt.UTC)
        if (now or dt.datetime.now(dt.UTC)) >= expires:
            raise LinkInvalid("expired")
        return body[:16].hex(), expires
