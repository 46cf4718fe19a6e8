"""Everything the web app uses from the rest of ivr-bridge, handed in by the composition root.

online_chat never imports ``ivr/``, ``sms/`` or ``email_out/``: what it needs of them (checking a delivery
report's signature, what the development sinks received, waking the dispatcher) arrives here as callables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.agents import AgentDirectory
from bridge.catalogue import Catalogue
from bridge.chat import ChatService
from bridge.config import Config
from bridge.events import EventBus
from bridge.followups import FollowUpService
from bridge.links import LinkSigner
from bridge.outbox import Outbox
from bridge.ratelimit import RateLimiter
from bridge.router import Router
from bridge.store import InteractionStore

# A delivery report's query -> (follow-up id, status, gateway reference); ValueError when bad or tampered with.
VerifyDlr = Callable[[Mapping[str, str]], tuple[str, str, str | None]]
# What the development SMS and mail sinks received, by sink name ("sms", "email"), newest first.
DevInbox = Callable[[], Awaitable[dict[str, list[dict[str, Any]]]]]


@dataclass
class WebServices:
    """The web app's view of ivr-bridge.

    ``catalogue`` is a getter (a reloaded catalogue is used at once; None while none is loaded). ``verify_dlr``
    is None when no SMS gateway sends delivery reports (``/sms/dlr`` then answers 404); ``dev_inbox`` is None
    without development sinks; ``on_enqueued`` wakes the outbox dispatcher after a follow-up was written.
    ``router``, ``bus`` and ``agents`` serve the chat and the agent desktop (None in apps without them).
    """

    config: Config
    store: InteractionStore
    outbox: Outbox
    followups: FollowUpService
    catalogue: Callable[[], Catalogue | None]
    signer: LinkSigner
    limiter: RateLimiter
    verify_dlr: VerifyDlr | None = None
    dev_inbox: DevInbox | None = None
    on_enqueued: Callable[[], None] | None = None
    router: Router | None = None
    bus: EventBus | None = None
    agents: AgentDirectory | None = None
    chat: ChatService | None = None         # the web chat (its pages answer 503 without it)
