"""online_chat: the aiohttp web app (see DESIGN.md). Part 1: self-service pages, "email me this", signed links,
the web survey, SMS delivery reports and the development outbox page.

Wiring: build a :class:`WebServices` and run ``WebServer(services)`` (``start`` / ``aclose``), or mount
``create_app(services)`` yourself.
"""

from online_chat.app import WebServer, create_app
from online_chat.services import WebServices

__all__ = ["WebServer", "WebServices", "create_app"]
