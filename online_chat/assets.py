"""The web app's own static files (stylesheets, scripts, the icon), served from memory with a cache lifetime."""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

DAY = 86400
STATIC = Path(__file__).resolve().parent / "static"


def load(name: str) -> tuple[bytes, str]:
    """A file of ``static/`` and its URL with a content hash (a new version is fetched, never a stale cache)."""
    body = (STATIC / name).read_bytes()
    return body, f"/static/{name}?v={hashlib.sha256(body).hexdigest()[:10]}"


def asset(body: bytes, content_type: str, *, max_age: int = DAY, **headers: str) -> web.Response:
    """A static file as a response; text types are UTF-8."""
    text = content_type.startswith("text/")
    return web.Response(body=body, content_type=content_type, charset="utf-8" if text else None,
                        headers={"Cache-Control": f"public, max-age={max_age}", **headers})
