"""The self-service web pages, "email me this", signed links, the web survey, delivery reports and the dev page,
through aiohttp's test client over a real store (SQLite; PostgreSQL too where marked), the real Redis rate limiter
and the real FAQ catalogue (flows/faq.yaml). The email and SMS recipient policies are small stubs written here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import html
import logging
import re
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select, update

from bridge import db
from bridge.catalogue import Catalogue, load_catalogue
from bridge.config import Config
from bridge.followups import FollowUpService
from bridge.links import LinkSigner
from bridge.models import FollowUp, Interaction, Link, SurveyAnswer, utcnow
from bridge.outbox import Admission, Outbox
from bridge.ratelimit import Limit, RateLimiter
from bridge.store import InteractionStore
from online_chat import WebServer, WebServices, create_app
from online_chat.i18n import LANGUAGES, UI

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PROJECT = Path(__file__).resolve().parent.parent
SECRET = "test-link-secret-0123456789abcdef"
DLR_SIGNATURE = "kannel-says-hi"
EVIL = "https://evil.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_catalogue_cache: list[Catalogue] = []


def faq() -> Catalogue:
    if not _catalogue_cache:
        catalogue, problems = load_catalogue([PROJECT / "flows"])
        assert catalogue is not None, problems
        _catalogue_cache.append(catalogue)
    return _catalogue_cache[0]


class StubPolicy:
    """A recipient policy for tests: email addresses by a strict pattern (so CR/LF and spaces are refused),
    phone numbers as +digits, and ``per_recipient`` sends an hour per recipient (counted in memory)."""

    def __init__(self, channel: str, per_recipient: int = 3) -> None:
        self.channel = channel
        self.per_recipient = per_recipient
        self.counts: Counter[str] = Counter()

    async def admit(self, recipient: str, *, region: str | None = None) -> Admission:
        pattern = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}" if self.channel == "email" else r"\+[0-9]{8,15}"
        if not re.fullmatch(pattern, recipient):
            return Admission(None, "invalid", "not a plain address" if self.channel == "email" else "not E.164")
        normalised = recipient.lower()
        if self.counts[normalised] >= self.per_recipient:
            return Admission(None, "limit:address", f"{self.per_recipient} an hour")
        self.counts[normalised] += 1
        return Admission(normalised, counted=True)


def fake_verify_dlr(query: Mapping[str, str]) -> tuple[str, str, str | None]:
    """A delivery report verifier that accepts one fixed signature."""
    if query.get("sig") != DLR_SIGNATURE or "id" not in query or "status" not in query:
        raise ValueError("bad signature")
    return query["id"], query["status"], query.get("ref")


@dataclass
class WebHarness:
    """One web app over a fresh database; helpers to read its pages and its rows."""

    services: WebServices
    client: TestClient
    public_url: str
    woken: list[int] = field(default_factory=list)
    inbox: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def store(self) -> InteractionStore:
        return self.services.store

    # ---- pages
    async def page(self, path: str, status: int = 200, **kwargs: Any) -> str:
        async with self.client.get(path, **kwargs) as response:
            body = await response.text()
            assert response.status == status, f"GET {path}: {response.status}\n{body[:2000]}"
            return body

    async def form(self, path: str) -> dict[str, str]:
        """The hidden fields of the form on a page (csrf, nonce), with the CSRF cookie now in the jar."""
        body = await self.page(path)
        return dict(re.findall(r'<input type="hidden" name="(csrf|nonce)" value="([^"]*)"', body))

    async def email(self, article_id: str, address: str, fields: dict[str, str] | None = None,
                    headers: dict[str, str] | None = None, lang: str = "en") -> aiohttp.ClientResponse:
        """Submit "email me this" (a fresh form unless ``fields`` are given), from the site's own origin."""
        fields = fields or await self.form(f"/help/a/{article_id}?lang={lang}")
        headers = {"Origin": self.public_url} if headers is None else headers
        response = await self.client.post(f"/help/a/{article_id}/email?lang={lang}",
                                          data={**fields, "address": address}, headers=headers,
                                          allow_redirects=False)
        await response.read()
        return response

    # ---- rows
    async def rows(self, model: Any) -> list[Any]:
        assert self.store.sessions is not None
        async with self.store.sessions() as session:
            return list((await session.execute(select(model))).scalars())

    async def link(self, link_id: str) -> Link:
        assert self.store.sessions is not None
        async with self.store.sessions() as session:
            link = await session.get(Link, link_id)
        assert link is not None
        return link

    async def call(self, **fields: Any) -> Interaction:
        values = {"caller": "+8613800138000", "dialled": "100", "flow": "hotline", "language": "en",
                  "intent": "billing", "started_at": dt.datetime(2025, 3, 4, 9, 30, tzinfo=dt.UTC), **fields}
        return await self.store.create(**values)

    async def sms_link(self, message: str, interaction: Interaction | None,
                       article_id: str | None = None, language: str = "en") -> tuple[str, str]:
        """Queue an SMS the way a call does; returns the path of its link and the link id."""
        prepared = await self.services.followups.prepare(
            channel="sms", recipient="+8613800138000", message=message, language=language, purpose="after_call",
            key=uuid.uuid4().hex, interaction_id=interaction.id if interaction else None, article_id=article_id)
        assert prepared.accepted and prepared.link is not None, prepared.reason
        await self.services.outbox.enqueue([prepared])
        url = re.search(r"https?://\S+", prepared.followup["payload"]["text"])
        assert url is not None
        assert url.group().startswith(f"{self.public_url}/l/")
        return url.group()[len(self.public_url):], str(prepared.link["id"])


@contextlib.asynccontextmanager
async def web_services(db_url: str, redis_url: str, port: int, tweak: Callable[[Config], None] | None = None,
                       ) -> AsyncIterator[tuple[WebServices, WebHarness]]:
    """Started services for a web app on ``port`` (the harness has no client yet)."""
    config = Config()
    config.database.url = db_url
    config.redis.url = redis_url
    config.links.secret = SECRET
    config.web.host = "127.0.0.1"
    config.web.port = port
    config.web.public_url = f"http://127.0.0.1:{port}"
    if tweak is not None:
        tweak(config)
    await db.upgrade(db_url)
    store = InteractionStore(db_url)
    limiter = RateLimiter(redis_url, prefix=f"test-web:{uuid.uuid4().hex}")
    await store.start()
    await limiter.start()
    try:
        catalogue = faq()
        signer = LinkSigner(SECRET)
        followups = FollowUpService(lambda: catalogue, signer,
                                    {"email": StubPolicy("email", per_recipient=2), "sms": StubPolicy("sms")},
                                    config.web.public_url, dt.timedelta(days=config.links.ttl_days))
        holder: dict[str, WebHarness] = {}

        async def dev_inbox() -> dict[str, list[dict[str, Any]]]:
            return holder["h"].inbox

        services = WebServices(config=config, store=store, outbox=Outbox(store), followups=followups,
                               catalogue=lambda: catalogue, signer=signer, limiter=limiter,
                               verify_dlr=fake_verify_dlr, dev_inbox=dev_inbox,
                               on_enqueued=lambda: holder["h"].woken.append(1))
        harness = WebHarness(services, None, config.web.public_url)  # type: ignore[arg-type]
        holder["h"] = harness
        yield services, harness
    finally:
        await limiter.aclose()
        await store.aclose()


MakeWeb = Callable[..., Awaitable[WebHarness]]


@pytest.fixture
async def make_web(redis_url: str, tmp_path: Path) -> AsyncIterator[MakeWeb]:
    """Start a web app (aiohttp test client) over a database URL (default: a fresh SQLite file)."""
    stack = contextlib.AsyncExitStack()

    async def make(db_url: str = "", tweak: Callable[[Config], None] | None = None) -> WebHarness:
        url = db_url or f"sqlite+aiosqlite:///{tmp_path / f'web-{uuid.uuid4().hex[:6]}.db'}"
        port = free_port()
        services, harness = await stack.enter_async_context(web_services(url, redis_url, port, tweak))
        client = TestClient(TestServer(create_app(services), host="127.0.0.1", port=port))
        await client.start_server()
        stack.push_async_callback(client.close)
        harness.client = client
        return harness

    async with stack:
        yield make


@pytest.fixture
async def web(make_web: MakeWeb) -> WebHarness:
    return await make_web()


def text_of(body: str) -> str:
    """A page's visible text, roughly: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


# ------------------------------------------------------------------------------------------------ pages
def test_every_ui_string_exists_in_every_language() -> None:
    assert set(UI) == set(LANGUAGES)
    for language, strings in UI.items():
        assert set(strings) == set(UI["en"]), language
        assert all(text.strip() for text in strings.values()), language


async def test_help_lists_articles_by_topic_in_english_and_chinese(web: WebHarness) -> None:
    english = await web.page("/help", headers={"Accept-Language": "en-GB,en;q=0.9"})
    assert '<html lang="en">' in english
    assert "Orders and delivery" in english and "Track your delivery" in english
    assert 'href="/help/a/order_tracking?lang=en"' in english
    assert re.search(r'<a class="switch" href="/help\?lang=zh-CN"[^>]*>中文</a>', english)

    chinese = await web.page("/help?lang=zh-CN")
    assert '<html lang="zh-CN">' in chinese
    assert "订单与配送" in chinese and "查询配送进度" in chinese and "有什么可以帮您？" in chinese
    assert re.search(r'<a class="switch" href="/help\?lang=en"[^>]*>English</a>', chinese)
    # ?lang= is remembered in a cookie, which beats Accept-Language afterwards
    assert "查询配送进度" in await web.page("/help", headers={"Accept-Language": "en"})


async def test_language_follows_accept_language_when_nothing_else_says(web: WebHarness) -> None:
    body = await web.page("/help", headers={"Accept-Language": "fr;q=1, zh-Hans-CN;q=0.8, en;q=0.5"})
    assert '<html lang="zh-CN">' in body
    assert '<html lang="en">' in await web.page("/help", headers={"Accept-Language": "de"})


async def test_search_finds_articles_in_chinese_and_english(web: WebHarness) -> None:
    chinese = text_of(await web.page("/help/search?q=退货&lang=zh-CN"))
    assert "30 天内免费退货" in chinese and "找到 1 篇文章" in chinese
    english = text_of(await web.page("/help/search?q=track+my+parcel&lang=en"))
    assert "Track your delivery" in english
    # Chinese typed on the English page still finds the article (shown in English)
    assert "Free returns within 30 days" in text_of(await web.page("/help/search?q=退货&lang=en"))
    nothing = text_of(await web.page("/help/search?q=xylophone&lang=en"))
    assert "Nothing found" in nothing and "Browse by topic" in nothing


async def test_empty_search_shows_the_list(web: WebHarness) -> None:
    body = text_of(await web.page("/help/search?q=+++&lang=en"))
    assert "How can we help?" in body and "Browse by topic" in body and "Your account" in body


async def test_search_query_is_reflected_as_text_and_bounded(web: WebHarness) -> None:
    payload = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    body = await web.page("/help/search", params={"q": payload, "lang": "en"})
    assert "<script>" not in body and "<img" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert 'value="&#34;&gt;&lt;script&gt;' in body  # inside the search box's value, quotes escaped

    long_query = "退货" * 200  # 400 characters (a URL over 8 KiB is refused by aiohttp itself)
    body = await web.page("/help/search", params={"q": long_query, "lang": "zh-CN"})
    value = re.search(r'name="q" type="search" value="([^"]*)"', body)
    assert value is not None and len(html.unescape(value.group(1))) == 200
    assert "只使用了搜索内容的前 200 个字符" in body


async def test_article_page_renders_the_article_and_offers_the_email_form(web: WebHarness) -> None:
    async with web.client.get("/help/a/billing_balance?lang=en") as response:
        body = await response.text()
        assert response.status == 200
        cookie = response.headers["Set-Cookie"]
        assert response.headers["Cache-Control"] == "no-store"
    assert "<h1>See your balance and pay online</h1>" in body
    assert "<strong>My Account</strong>" in body and "<ol>" in body
    assert 'action="/help/a/billing_balance/email?lang=en" method="post"' in body
    assert re.search(r'name="csrf" value="[0-9a-f]{64}"', body)
    assert re.search(r'name="nonce" value="[A-Za-z0-9_-]{24}"', body)
    assert cookie.startswith("csrf=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # web.secure_cookies is off on plain-HTTP loopback

    chinese = await web.page("/help/a/returns?lang=zh-CN")
    assert "30 天内免费退货" in chinese and "通过邮件发给我" in chinese


async def test_secure_cookies_setting_marks_the_csrf_cookie_secure(make_web: MakeWeb) -> None:
    def secure(config: Config) -> None:
        config.web.secure_cookies = True

    web = await make_web(tweak=secure)
    async with web.client.get("/help/a/returns") as response:
        assert "Secure" in response.headers["Set-Cookie"]


async def test_unknown_article_and_unknown_page_give_404_in_the_visitors_language(web: WebHarness) -> None:
    chinese = await web.page("/help/a/no_such_article?lang=zh-CN", status=404)
    assert '<html lang="zh-CN">' in chinese and "找不到页面" in chinese
    english = await web.page("/nowhere?lang=en", status=404)
    assert "Page not found" in english
    assert "Traceback" not in english


async def test_every_response_carries_the_security_headers(web: WebHarness) -> None:
    for method, path in [("GET", "/help"), ("GET", "/healthz"), ("GET", "/nowhere"), ("GET", "/static/style.css"),
                         ("POST", "/help"), ("GET", "/help/a/returns")]:
        async with web.client.request(method, path) as response:
            headers = response.headers
            assert "default-src 'self'" in headers["Content-Security-Policy"], path
            assert "unsafe-inline" not in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Referrer-Policy"] == "same-origin"
            assert headers["X-Frame-Options"] == "DENY"
            if method == "POST":
                assert response.status == 405
    body = await web.page("/help")
    assert "<script" not in body and "style=" not in body  # nothing inline for the CSP to block


async def test_healthz_and_root(web: WebHarness) -> None:
    assert await web.page("/healthz") == "ok"
    async with web.client.get("/", allow_redirects=False) as response:
        assert response.status == 302 and response.headers["Location"] == "/help"


async def test_oversized_request_bodies_are_refused(web: WebHarness) -> None:
    fields = await web.form("/help/a/returns")
    async with web.client.post("/help/a/returns/email", data={**fields, "address": "a" * 100_000 + "@x.com"},
                               headers={"Origin": web.public_url}) as response:
        assert response.status == 413
    assert await web.rows(FollowUp) == []


# ------------------------------------------------------------------------------------------------ email me this
async def test_email_form_without_a_valid_csrf_token_is_refused_and_stores_nothing(
        web: WebHarness, make_web: MakeWeb) -> None:
    fields = await web.form("/help/a/returns")
    missing = await web.email("returns", "ann@example.com", fields={"nonce": fields["nonce"]})
    assert missing.status == 403
    forged = await web.email("returns", "ann@example.com", fields={**fields, "csrf": "0" * 64})
    assert forged.status == 403
    # a valid-looking token without the cookie it belongs to (another browser)
    other = await make_web()
    stolen = await other.email("returns", "ann@example.com", fields=fields)
    assert stolen.status == 403
    page = await web.client.post("/help/a/returns/email?lang=zh-CN", data={"address": "ann@example.com"},
                                 headers={"Origin": web.public_url})
    assert page.status == 403 and "表单已过期" in await page.text()
    assert await web.rows(FollowUp) == [] and await other.rows(FollowUp) == []


async def test_email_form_from_another_origin_is_refused(web: WebHarness) -> None:
    cross = await web.email("returns", "ann@example.com", headers={"Origin": EVIL})
    assert cross.status == 403
    referred = await web.email("returns", "ann@example.com", headers={"Referer": f"{EVIL}/page"})
    assert referred.status == 403
    opaque = await web.email("returns", "ann@example.com", headers={"Origin": "null"})
    assert opaque.status == 403
    assert await web.rows(FollowUp) == []
    assert web.woken == []


async def test_email_form_queues_one_followup_with_a_signed_link(web: WebHarness) -> None:
    response = await web.email("returns", "Ann@Example.com",
                               headers={"Origin": web.public_url, "Referer": f"{web.public_url}/help/a/returns"})
    assert response.status == 303
    assert response.headers["Location"] == "/help/a/returns/sent?lang=en"
    confirmation = text_of(await web.page(response.headers["Location"]))
    assert "check your inbox" in confirmation and "Free returns within 30 days" in confirmation
    assert "ann@example.com" not in confirmation.lower()

    [followup] = await web.rows(FollowUp)
    assert (followup.state, followup.channel, followup.recipient, followup.purpose, followup.article_id,
            followup.template, followup.language) == ("pending", "email", "ann@example.com", "web", "returns",
                                                      "article_link", "en")
    assert followup.payload["subject"] == "Free returns within 30 days"
    match = re.search(rf"{re.escape(web.public_url)}/l/([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)", followup.payload["text"])
    assert match is not None, followup.payload
    link_id, _ = web.services.signer.verify(match.group(1))
    link = await web.link(link_id)
    assert (link.kind, link.target, link.followup_id, link.opens) == ("article", "returns", followup.id, 0)
    assert web.woken == [1]


async def test_email_form_in_chinese_sends_the_chinese_message(web: WebHarness) -> None:
    response = await web.email("returns", "li@example.cn", lang="zh-CN")
    assert response.status == 303
    assert "请查收邮件" in await web.page(response.headers["Location"])
    [followup] = await web.rows(FollowUp)
    assert followup.language == "zh-CN" and followup.payload["subject"] == "30 天内免费退货"


async def test_resubmitting_the_same_form_sends_once(web: WebHarness) -> None:
    fields = await web.form("/help/a/returns")
    first = await web.email("returns", "ann@example.com", fields=fields)
    again = await web.email("returns", "ann@example.com", fields=fields)
    both = await asyncio.gather(*(web.email("returns", "ann@example.com", fields=fields) for _ in range(3)))
    assert [r.status for r in (first, again, *both)] == [303] * 5
    assert len(await web.rows(FollowUp)) == 1 and len(await web.rows(Link)) == 1
    # the repeats did not count against the client's hourly allowance either
    assert await web.services.limiter.counts([web_email_limit()]) == [1]
    # the same form with another address is another request
    other = await web.email("returns", "bob@example.com", fields=fields)
    assert other.status == 303
    assert sorted(f.recipient for f in await web.rows(FollowUp)) == ["ann@example.com", "bob@example.com"]


def web_email_limit() -> Limit:
    return Limit("web-email:127.0.0.1", 0)


@pytest.mark.parametrize("address", ["ann@example.com\r\nBcc: victim@example.org", "not an address",
                                     "ann@example.com\nX-Injected: 1"])
async def test_a_refused_address_says_why_and_stores_only_the_blocked_row(web: WebHarness, address: str) -> None:
    response = await web.email("returns", address)
    assert response.status == 400
    body = await response.text()
    assert "does not look like an email address" in text_of(body)
    assert "victim" not in body and "X-Injected" not in body  # the address is never echoed
    [followup] = await web.rows(FollowUp)
    assert followup.state == "blocked" and followup.reason == "invalid"
    assert "\r" not in followup.recipient and "\n" not in followup.recipient
    assert await web.rows(Link) == []
    assert web.woken == []


async def test_too_many_emails_to_one_address_are_refused_with_the_reason(web: WebHarness) -> None:
    for _ in range(2):  # the stub policy allows two an hour per address
        assert (await web.email("returns", "ann@example.com")).status == 303
    refused = await web.email("returns", "ann@example.com", lang="zh-CN")
    assert refused.status == 400
    assert "过去一小时内我们已向这个邮箱发送了多封邮件" in await refused.text()
    states = Counter(f.state for f in await web.rows(FollowUp))
    assert states == {"pending": 2, "blocked": 1}


async def test_email_requests_over_the_per_client_limit_get_429(make_web: MakeWeb) -> None:
    def two_per_client(config: Config) -> None:
        config.email.limits.per_client = 2

    web = await make_web(tweak=two_per_client)
    assert (await web.email("returns", "a@example.com")).status == 303
    assert (await web.email("returns", "b@example.com")).status == 303
    limited = await web.email("returns", "c@example.com")
    assert limited.status == 429
    assert "try again later" in text_of(await limited.text())
    assert sorted(f.recipient for f in await web.rows(FollowUp)) == ["a@example.com", "b@example.com"]


# ------------------------------------------------------------------------------------------------ signed links
async def test_an_article_link_shows_its_call_and_counts_every_open(web: WebHarness) -> None:
    call = await web.call(intent="billing", caller="+8613912345678")
    path, link_id = await web.sms_link("article_link", call, article_id="payment_problem")

    body = await web.page(path)
    when = dt.datetime(2025, 3, 4, 9, 30, tzinfo=dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M")
    visible = text_of(body)
    assert f"About your call on {when}" in visible
    assert "You asked about: See your balance and pay online" in visible  # the call's intent
    assert "<h1>A payment went wrong</h1>" in body  # the linked article
    assert "13912345678" not in body  # never the caller's number
    assert 'name="robots" content="noindex' in body
    link = await web.link(link_id)
    assert link.opens == 1 and link.first_opened_at is not None

    again = await web.page(path + "?lang=zh-CN")  # a reload (here in the other language) keeps working
    assert "关于您在" in again and "付款出现问题" in again
    assert (await web.link(link_id)).opens == 2


async def test_a_help_link_shows_the_list_with_the_banner(web: WebHarness) -> None:
    call = await web.call(intent="self_service")
    path, link_id = await web.sms_link("help_link", call, language="zh-CN")
    body = await web.page(path)  # the link's language is the page's language when the visitor sets none
    assert '<html lang="zh-CN">' in body and "关于您在" in body and "按主题浏览" in body
    assert (await web.link(link_id)).opens == 1


async def test_tampered_or_malformed_tokens_give_400_and_record_nothing(web: WebHarness) -> None:
    path, link_id = await web.sms_link("article_link", None, article_id="returns")
    body, tag = path[len("/l/"):].split(".")
    tampered = f"/l/{body}.{'A' if tag[0] != 'A' else 'B'}{tag[1:]}"
    for bad in (tampered, "/l/nonsense", f"/l/{body}", f"/l/{'x' * 300}"):
        page = await web.page(bad, status=400, headers={"Accept-Language": "en"})
        assert "This link is not valid" in page
    assert "链接无效" in await web.page(tampered + "?lang=zh-CN", status=400)
    assert (await web.link(link_id)).opens == 0


async def test_an_expired_link_gives_410(web: WebHarness) -> None:
    _, link_id = await web.sms_link("article_link", None, article_id="returns")
    expired = web.services.signer.token(link_id, utcnow() - dt.timedelta(minutes=1))
    assert "This link has expired" in await web.page(f"/l/{expired}?lang=en", status=410)
    assert (await web.link(link_id)).opens == 0


async def test_a_signed_link_with_no_stored_row_gives_404(web: WebHarness) -> None:
    token = web.services.signer.token(uuid.uuid4().hex, utcnow() + dt.timedelta(days=1))
    assert "Page not found" in await web.page(f"/l/{token}?lang=en", status=404)


async def test_a_link_preview_head_request_does_not_count_as_an_open(web: WebHarness) -> None:
    path, link_id = await web.sms_link("article_link", None, article_id="returns")
    async with web.client.head(path) as response:
        assert response.status == 405
    assert (await web.link(link_id)).opens == 0


# ------------------------------------------------------------------------------------------------ survey
async def answer(web: WebHarness, path: str, score: str, fields: dict[str, str]) -> aiohttp.ClientResponse:
    response = await web.client.post(f"{path}/survey", data={**fields, "score": score},
                                     headers={"Origin": web.public_url}, allow_redirects=False)
    await response.read()
    return response


async def test_a_survey_answer_is_stored_once(make_web: MakeWeb, db_url: str) -> None:
    web = await make_web(db_url)
    call = await web.call()
    path, _ = await web.sms_link("survey", call)
    body = await web.page(path + "?lang=en")
    assert "How happy are you with your call?" in body
    assert len(re.findall(r'<button type="submit" name="score" value="[1-5]"', body)) == 5
    fields = dict(re.findall(r'<input type="hidden" name="(csrf)" value="([^"]*)"', body))

    first = await answer(web, path, "4", fields)
    assert first.status == 303 and first.headers["Location"] == f"{path}/thanks?lang=en"
    assert "Thank you!" in await web.page(first.headers["Location"])
    second = await answer(web, path, "1", fields)
    assert second.status == 409 and "already been answered" in await second.text()
    [stored] = await web.rows(SurveyAnswer)
    assert (stored.interaction_id, stored.question, stored.score, stored.channel) == (call.id, "call", 4, "web")
    assert "already been answered" in await web.page(path + "?lang=en")  # no form any more


async def test_concurrent_survey_answers_store_one(make_web: MakeWeb, db_url: str) -> None:
    web = await make_web(db_url)
    call = await web.call()
    path, _ = await web.sms_link("survey", call)
    body = await web.page(path)
    fields = dict(re.findall(r'<input type="hidden" name="(csrf)" value="([^"]*)"', body))
    results = await asyncio.gather(*(answer(web, path, str(n), fields) for n in range(1, 6)))
    assert sorted(r.status for r in results) == [303, 409, 409, 409, 409]
    assert len(await web.rows(SurveyAnswer)) == 1


async def test_a_survey_answer_needs_the_csrf_token_and_a_score(web: WebHarness) -> None:
    call = await web.call()
    path, _ = await web.sms_link("survey", call)
    body = await web.page(path)
    fields = dict(re.findall(r'<input type="hidden" name="(csrf)" value="([^"]*)"', body))
    assert (await answer(web, path, "5", {"csrf": "f" * 64})).status == 403
    assert (await answer(web, path, "6", fields)).status == 400
    assert (await answer(web, path, "five", fields)).status == 400
    assert await web.rows(SurveyAnswer) == []


async def test_a_survey_answer_through_a_tampered_or_non_survey_link_is_refused(web: WebHarness) -> None:
    article_path, _ = await web.sms_link("article_link", await web.call(), article_id="returns")
    fields = await web.form(article_path)
    assert (await answer(web, article_path, "5", {"csrf": fields["csrf"]})).status == 404
    assert (await answer(web, "/l/nonsense", "5", {"csrf": fields["csrf"]})).status == 400
    assert await web.rows(SurveyAnswer) == []


# ------------------------------------------------------------------------------------------------ delivery reports
async def sent_followup(web: WebHarness) -> str:
    _, link_id = await web.sms_link("article_link", None, article_id="returns")
    followup_id = (await web.link(link_id)).followup_id
    assert followup_id is not None and web.store.sessions is not None
    async with web.store.sessions.begin() as session:
        await session.execute(update(FollowUp).where(FollowUp.id == followup_id).values(state="sent"))
    return followup_id


async def state_of(web: WebHarness, followup_id: str) -> tuple[str, str | None]:
    followup = await web.services.outbox.get(followup_id)
    assert followup is not None
    return followup.state, followup.gateway_ref


async def test_a_delivery_report_with_a_bad_signature_is_refused_and_changes_nothing(web: WebHarness) -> None:
    followup_id = await sent_followup(web)
    async with web.client.get("/sms/dlr", params={"id": followup_id, "status": "delivered",
                                                  "sig": "forged"}) as response:
        assert response.status == 403
    assert await state_of(web, followup_id) == ("sent", None)


async def test_a_good_delivery_report_changes_the_state_and_answers_ok(web: WebHarness) -> None:
    followup_id = await sent_followup(web)
    query = {"id": followup_id, "status": "delivered", "ref": "smsc-42", "sig": DLR_SIGNATURE}
    for _ in range(2):  # Kannel may repeat a report: still "ok"
        async with web.client.get("/sms/dlr", params=query) as response:
            assert response.status == 200 and await response.text() == "ok"
    assert await state_of(web, followup_id) == ("delivered", "smsc-42")
    async with web.client.get("/sms/dlr", params={**query, "status": "exploded"}) as response:
        assert response.status == 200  # authentic but not understood: not worth a retry
    async with web.client.post("/sms/dlr", params=query) as response:
        assert response.status == 405


async def test_delivery_reports_are_not_served_without_a_verifier(web: WebHarness) -> None:
    web.services.verify_dlr = None
    async with web.client.get("/sms/dlr", params={"id": "x", "status": "delivered", "sig": DLR_SIGNATURE}) as r:
        assert r.status == 404


# ------------------------------------------------------------------------------------------------ dev page
async def test_the_dev_outbox_shows_followups_counts_and_sinks_on_loopback(web: WebHarness) -> None:
    assert (await web.email("returns", "ann@example.com")).status == 303
    assert (await web.email("returns", "broken address")).status == 400
    web.inbox["email"] = [{"to": "ann@example.com", "subject": "<b>Free returns</b>"}]
    body = await web.page("/dev/outbox?lang=en")
    visible = text_of(body)
    assert '<meta http-equiv="refresh" content="5">' in body
    assert "ann@example.com" in visible and "pending" in visible and "blocked" in visible and "invalid" in visible
    assert "&lt;b&gt;Free returns&lt;/b&gt;" in body
    assert "发件箱（开发用）" in await web.page("/dev/outbox?lang=zh-CN")


@pytest.mark.parametrize("trusted, forwarded, status", [
    ([], "203.0.113.9", 404),             # a proxy on this machine we were not told about
    (["127.0.0.1"], "203.0.113.9", 404),  # a trusted proxy relaying a remote client
    (["127.0.0.1"], "127.0.0.1", 200),    # a trusted proxy relaying a local client
])
async def test_the_dev_outbox_is_only_for_clients_on_this_machine(make_web: MakeWeb, trusted: list[str],
                                                                  forwarded: str, status: int) -> None:
    def proxies(config: Config) -> None:
        config.web.trusted_proxies = trusted

    web = await make_web(tweak=proxies)
    await web.page("/dev/outbox", status=status, headers={"X-Forwarded-For": forwarded})


async def test_the_dev_outbox_is_404_without_dev_pages(make_web: MakeWeb) -> None:
    def off(config: Config) -> None:
        config.web.dev_pages = False

    web = await make_web(tweak=off)
    assert "Page not found" in await web.page("/dev/outbox?lang=en", status=404)


async def test_a_failing_handler_shows_a_plain_500_page(web: WebHarness, caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> dict[str, list[dict[str, Any]]]:
        raise RuntimeError("secret internals")

    web.services.dev_inbox = broken
    body = await web.page("/dev/outbox?lang=en", status=500)
    assert "Something went wrong" in body and "secret internals" not in body and "Traceback" not in body
    assert any("secret internals" in r.getMessage() or (r.exc_info and "secret internals" in str(r.exc_info[1]))
               for r in caplog.records)


async def test_web_server_serves_on_its_port_logs_without_tokens_and_closes(
        redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="online_chat.access")
    async with web_services(f"sqlite+aiosqlite:///{tmp_path / 'srv.db'}", redis_url, 0) as (services, harness):
        path, _ = await harness.sms_link("article_link", None, article_id="returns")
        server = WebServer(services)
        await server.start()
        try:
            assert server.port
            base = f"http://127.0.0.1:{server.port}"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/healthz") as response:
                    assert response.status == 200 and await response.text() == "ok"
                async with session.get(f"{base}{path}?lang=en") as response:
                    assert response.status == 200
        finally:
            await server.aclose()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as session:
                await session.get(f"{base}/healthz")
    logged = [r.getMessage() for r in caplog.records if r.name == "online_chat.access"]
    assert any("GET /l/<token> 200" in line for line in logged), logged
    assert not any(path[len("/l/"):] in line or "lang=" in line for line in logged)


async def test_a_new_nonce_per_page_view(web: WebHarness) -> None:
    first, second = await web.form("/help/a/returns"), await web.form("/help/a/returns")
    assert first["nonce"] != second["nonce"] and first["csrf"] == second["csrf"]
