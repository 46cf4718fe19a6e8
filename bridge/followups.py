"""Follow-ups as the domain sees them: "send this caller the link to that article by SMS".

The service checks the recipient (the channel's policy: a mobile number in an allowed country under the fraud
limits, a sane email address), makes a signed link, renders the message and returns the rows to write. The caller
writes them in the same transaction as the change that called for them (a call's step, the end of a call, a web
request); the outbox dispatcher sends them. A refused recipient still gives a row, in state ``blocked`` with the
reason, so every refusal is recorded and counted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.catalogue import Catalogue
from bridge.links import LinkSigner
from bridge.models import FollowUpState, new_id, utcnow
from bridge.outbox import RecipientPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Rows for one follow-up: the outbox row (pending or blocked) and its link row (if any)."""

    followup: dict[str, Any]
    link: dict[str, Any] | None

    @property
    def accepted(self) -> bool:
        return self.followup["state"] == FollowUpState.PENDING.value

    @property
    def reason(self) -> str | None:
        return self.followup.get("reason")

    @property
    def id(self) -> str:
        return str(self.followup["id"])


class FollowUpService:
    """Prepares follow-ups; ``catalogue`` is a getter so a reloaded catalogue is used at once."""

    def __init__(self, catalogue: Callable[[], Catalogue | None], signer: LinkSigner,
                 policies: Mapping[str, RecipientPolicy], public_url: str, link_ttl: dt.timedelta) -> None:
        self.catalogue = catalogue
        self.signer = signer
        self.policies = dict(policies)
        self.public_url = public_url.rstrip("/")
        self.link_ttl = link_ttl

    def channels(self) -> set[str]:
        return set(self.policies)

    def link_url(self, link_id: str, expires: dt.datetime) -> str:
        return f"{self.public_url}/l/{self.signer.token(link_id, expires)}"

    async def prepare(self, *, channel: str, recipient: str, message: str, language: str, purpose: str, key: str,
                      interaction_id: str | None = None, article_id: str | None = None,
                      region: str | None = None) -> Prepared:
        """Check the recipient, render the message and return its rows.

        ``key`` makes the follow-up idempotent (the same key never gives a second message); the message's
        ``links_to`` says what its link opens (the article ``article_id``, the help centre, the survey).
        """
        catalogue = self.catalogue()
        if catalogue is None:
            raise LookupError("no FAQ catalogue is loaded")
        if message not in catalogue.messages:
            raise KeyError(f"unknown message '{message}'")
        article = catalogue.articles[article_id] if article_id else None
        row: dict[str, Any] = {
            "id": new_id(), "idempotency_key": _key(channel, key), "interaction_id": interaction_id,
            "channel": channel, "purpose": purpose, "template": message, "article_id": article_id,
            "language": catalogue.language(language), "attempts": 0, "created_at": utcnow(),
            "next_attempt_at": utcnow(), "payload": {},
        }
        policy = self.policies.get(channel)
        if policy is None or channel not in catalogue.messages[message].channels:
            why = "channel_off" if policy is None else "no_template"
            return Prepared({**row, "recipient": _printable(recipient), "state": FollowUpState.BLOCKED.value,
                             "reason": why}, None)
        admission = await policy.admit(recipient, region=region)
        if not admission.ok or admission.recipient is None:
            log.info("follow-up by %s refused: %s %s", channel, admission.reason, admission.detail)
            return Prepared({**row, "recipient": _printable(recipient), "state": FollowUpState.BLOCKED.value,
                             "reason": admission.reason}, None)
        now = utcnow()
        expires = now + self.link_ttl
        kind = catalogue.messages[message].links_to
        if kind == "article" and article is None:
            raise ValueError(f"message '{message}' needs an article")
        link = {"id": new_id(), "interaction_id": interaction_id, "followup_id": row["id"], "kind": kind,
                "target": article_id if kind == "article" else kind, "language": row["language"], "created_at": now,
                "expires_at": expires, "opens": 0}
        rendered = catalogue.render(message, channel, language, self.link_url(link["id"], expires), article)
        row.update(recipient=admission.recipient, state=FollowUpState.PENDING.value, reason=None,
                   payload=rendered.payload)
        return Prepared(row, link)


def followup_key(interaction_id: str, message: str, article: str | None) -> str:
    """One message about one article per interaction, whoever sends it (the call, its end, an agent)."""
    return f"{interaction_id}:{message}:{article or '-'}"


def _key(channel: str, key: str) -> str:
    raw = f"{channel}:{key}"
    return raw if len(raw) <= 128 else f"{channel}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def _printable(value: str) -> str:
    """A refused recipient as stored: never raw control characters, never unbounded."""
    return "".join(ch if ch.isprintable() else "?" for ch in value)[:64]
