"""The web app, part 1: self-service pages, "email me this", signed links, the web survey, SMS delivery reports
and the development outbox page.

Pages are rendered on the server (jinja2, autoescaped) in the visitor's language (see :mod:`online_chat.i18n`),
with one stylesheet and no script. Every POST carries a CSRF token and is checked against the public origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from markupsafe import Markup
from sqlalchemy import exists, insert, literal, select, text

from bridge.catalogue import Article, Catalogue
from bridge.links import LinkInvalid
from bridge.models import FollowUp, Interaction, Link, SurveyAnswer
from bridge.ratelimit import Limit
from online_chat import i18n
from online_chat.assets import asset
from online_chat.chat import CHAT, add_chat_routes
from online_chat.desk import add_desk_routes
from online_chat.security import AccessLogger, ClientAddress, Csrf, add_security_headers, same_origin
from online_chat.services import WebServices

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_BODY = 64 * 1024          # request bodies (forms) larger than this are refused with 413
MAX_FIELDS = 20
MAX_QUERY = 200               # characters of a search that are used
SURVEY_QUESTION = "call"
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")

SITE: web.AppKey[Site] = web.AppKey("online_chat.site")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(services: WebServices) -> web.Application:
    """The aiohttp application over ``services`` (settings are read from ``services.config`` per request where
    they may change, e.g. ``web.public_url``)."""
    site = Site(services)
    app = web.Application(client_max_size=MAX_BODY, client_max_fields=MAX_FIELDS, middlewares=[site.errors])
    app[SITE] = site
    app.on_response_prepare.append(add_security_headers)
    r = app.router
    r.add_get("/", site.root)
    r.add_get("/healthz", site.healthz)
    r.add_get("/static/style.css", site.stylesheet)
    r.add_get("/static/icon.svg", site.icon)
    r.add_get("/favicon.ico", site.icon)
    r.add_get("/help", site.help_index)
    r.add_get("/help/search", site.search)
    r.add_get("/help/a/{article_id}", site.article)
    r.add_post("/help/a/{article_id}/email", site.email_article)
    r.add_get("/help/a/{article_id}/sent", site.email_sent)
    r.add_get("/l/{token}", site.open_link, allow_head=False)  # a HEAD (link preview) is not an open
    r.add_post("/l/{token}/survey", site.survey_answer)
    r.add_get("/l/{token}/thanks", site.survey_thanks)
    r.add_get("/sms/dlr", site.delivery_report, allow_head=False)
    r.add_get("/dev/outbox", site.dev_outbox)
    add_desk_routes(app, services)
    add_chat_routes(app, site)
    return app


class WebServer:
    """The web app on ``config.web.host:port``; ``port`` is the bound port once started (0 picks a free one)."""

    def __init__(self, services: WebServices) -> None:
        self.services = services
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        web_config = self.services.config.web
        runner = web.AppRunner(create_app(self.services), access_log_class=AccessLogger,
                               access_log=logging.getLogger("online_chat.access"), shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, web_config.host, web_config.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0] if runner.addresses else None
        self.port = int(address[1]) if isinstance(address, tuple) else web_config.port
        log.info("web: listening on http://%s:%s (public %s)", web_config.host, self.port, web_config.public_url)

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# ------------------------------------------------------------------------------------------------ helpers
def _when(moment: dt.datetime) -> str:
    """A call's start as the contact centre's local date and time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)  # SQLite gives back naive UTC
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _by_topic(catalogue: Catalogue, lang: str) -> list[tuple[str, list[Article]]]:
    content = catalogue.language(lang)
    groups = []
    for topic, names in catalogue.topics.items():
        articles = [a for a in catalogue.articles.values() if a.topic == topic]
        if articles:
            groups.append((names[content], articles))
    return groups


_REFUSED = {"invalid": "refused_invalid", "limit:address": "refused_limit_address",
            "limit:global": "refused_limit_global", "channel_off": "refused_unavailable",
            "no_template": "refused_unavailable"}


class Site:
    """Handlers and what they share (templates, CSRF, the client's address)."""

    def __init__(self, services: WebServices) -> None:
        secret = services.config.links.secret
        if len(secret) < 16:
            raise ValueError("links.secret must be at least 16 characters (run `ivr-bridge setup-secrets`)")
        self.s = services
        self.csrf = Csrf(secret, services.config.web.secure_cookies)
        self.clients = ClientAddress(services.config.web.trusted_proxies)
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                      undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.css = (HERE / "static" / "style.css").read_bytes()
        self.css_url = f"/static/style.css?v={hashlib.sha256(self.css).hexdigest()[:10]}"
        self.icon_svg = (HERE / "static" / "icon.svg").read_bytes()
        self._survey_lock = asyncio.Lock()
        self._form_locks = KeyedLocks()

    # ---- rendering
    def lang(self, request: web.Request, hint: str | None = None) -> str:
        return i18n.pick(request.query, request.cookies, request.headers.get("Accept-Language"), hint)

    def render(self, request: web.Request, template: str, lang: str, *, status: int = 200, form: bool = False,
               switch_url: str | None = None, **context: Any) -> web.Response:
        """A page in ``lang``; ``form`` pages get a CSRF token (and cookie) and are never cached."""
        catalogue = self.s.catalogue()
        other = i18n.other(lang)
        if switch_url is None:
            switch_url = str(request.rel_url.update_query(lang=other)) if request.method == "GET" \
                else f"/help?lang={other}"
        new_cookie = None
        if form:
            context["csrf"], new_cookie = self.csrf.issue(request)
        body = self.env.get_template(template).render(
            lang=lang, t=i18n.UI[lang], other_lang=other, other_name=i18n.UI[other]["language_name"],
            switch_url=switch_url, css_url=self.css_url, company=catalogue.company[catalogue.language(lang)]
            if catalogue else "", banner=context.pop("banner", None), noindex=context.pop("noindex", False),
            **context)
        response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
        if new_cookie is not None:
            self.csrf.set_cookie(response, new_cookie)
        if i18n.normalise(request.query.get("lang")) == lang and request.cookies.get("lang") != lang:
            response.set_cookie("lang", lang, path="/", max_age=365 * 86400, httponly=True, samesite="Lax",
                                secure=self.s.config.web.secure_cookies)
        response.headers["Cache-Control"] = "no-store" if form or context.get("private") else "private, no-cache"
        response.headers["Vary"] = "Accept-Language, Cookie"
        return response

    def message(self, request: web.Request, lang: str, title: str, body: str, *, status: int = 200,
                back: tuple[str, str] | None = None, **context: Any) -> web.Response:
        """A page with a heading and a paragraph (confirmations, refusals, errors)."""
        t = i18n.UI[lang]
        if back is None:
            back = (f"/help?lang={lang}", t["back_to_help"])
        return self.render(request, "message.html", lang, status=status, title=title, body=body, back=back,
                           **context)

    def not_found(self, request: web.Request, lang: str | None = None) -> web.Response:
        lang = lang or self.lang(request)
        t = i18n.UI[lang]
        return self.message(request, lang, t["not_found_title"], t["not_found_body"], status=404)

    def unavailable(self, request: web.Request, lang: str) -> web.Response:
        t = i18n.UI[lang]
        return self.message(request, lang, t["unavailable_title"], t["unavailable_body"], status=503)

    def forbidden(self, request: web.Request, lang: str, why: str, back: tuple[str, str] | None) -> web.Response:
        t = i18n.UI[lang]
        return self.message(request, lang, t["forbidden_title"], t[why], status=403, back=back, private=True)

    def list_page(self, request: web.Request, catalogue: Catalogue, lang: str, **context: Any) -> web.Response:
        return self.render(request, "help.html", lang, topics=_by_topic(catalogue, lang),
                           content_lang=catalogue.language(lang), query="", **context)

    def banner(self, interaction: Interaction | None, catalogue: Catalogue, lang: str) -> dict[str, str] | None:
        """Which call a link came from: when it started and what it was about (never the caller's number)."""
        if interaction is None:
            return None
        t = i18n.UI[lang]
        article = catalogue.article_for_intent(interaction.intent)
        topic = article.title[catalogue.language(lang)] if article else (interaction.intent or "").replace("_", " ")
        return {"call": t["banner_call"].format(when=_when(interaction.started_at)),
                "topic": t["banner_topic"].format(topic=topic) if topic else ""}

    # ---- middleware
    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Unknown pages get the 404 page; a failure is logged and shown as a plain 500 page (no traceback)."""
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return self.not_found(request)
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("web: %s %s failed", request.method, request.path if not request.path.startswith("/l/")
                          else "/l/<token>")
            try:
                lang = self.lang(request)
                t = i18n.UI[lang]
                return self.message(request, lang, t["error_title"], t["error_body"], status=500)
            except Exception:
                log.exception("web: the error page failed too")
                return web.Response(status=500, text="Internal server error", content_type="text/plain")

    # ---- small routes
    async def root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/help")

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", content_type="text/plain")

    async def stylesheet(self, request: web.Request) -> web.StreamResponse:
        return asset(self.css, "text/css")

    async def icon(self, request: web.Request) -> web.StreamResponse:
        return asset(self.icon_svg, "image/svg+xml")

    # ---- self-service
    async def help_index(self, request: web.Request) -> web.StreamResponse:
        lang = self.lang(request)
        catalogue = self.s.catalogue()
        if catalogue is None:
            return self.unavailable(request, lang)
        return self.list_page(request, catalogue, lang)

    async def search(self, request: web.Request) -> web.StreamResponse:
        lang = self.lang(request)
        catalogue = self.s.catalogue()
        if catalogue is None:
            return self.unavailable(request, lang)
        raw = " ".join(request.query.get("q", "").split())
        query = raw[:MAX_QUERY]
        if not query:
            return self.list_page(request, catalogue, lang)
        results = catalogue.search(query, lang)
        if not results:  # Chinese typed on the English page (or the other way round) still finds the article
            for other in catalogue.languages:
                results = results or catalogue.search(query, other)
        return self.render(request, "search.html", lang, query=query, results=results,
                           truncated=len(raw) > MAX_QUERY, max_query=MAX_QUERY, topics=_by_topic(catalogue, lang),
                           content_lang=catalogue.language(lang))

    def article_page(self, request: web.Request, catalogue: Catalogue, article: Article, lang: str,
                     **context: Any) -> web.Response:
        content = catalogue.language(lang)
        return self.render(request, "article.html", lang, form=True, article=article, content_lang=content,
                           title=article.title[content], body=Markup(catalogue.body_html(article, content)),
                           nonce=secrets.token_urlsafe(18), **context)

    def _article(self, request: web.Request, lang: str) -> tuple[Catalogue, Article] | web.Response:
        """The catalogue and the article the URL names, or the page saying why not."""
        catalogue = self.s.catalogue()
        if catalogue is None:
            return self.unavailable(request, lang)
        article = catalogue.articles.get(request.match_info["article_id"])
        if article is None:
            return self.not_found(request, lang)
        return catalogue, article

    async def article(self, request: web.Request) -> web.StreamResponse:
        lang = self.lang(request)
        found = self._article(request, lang)
        if isinstance(found, web.Response):
            return found
        return self.article_page(request, *found, lang)

    async def email_article(self, request: web.Request) -> web.StreamResponse:
        """"Email me this": checks, the per-client limit, then one follow-up per form (a resubmitted form is not
        sent twice), and a redirect to the confirmation."""
        lang = self.lang(request)
        found = self._article(request, lang)
        if isinstance(found, web.Response):
            return found
        _, article = found
        article_id = article.id
        t = i18n.UI[lang]
        back = (f"/help/a/{article_id}?lang={lang}", t["back_to_article"])
        form = await request.post()
        if not self.csrf.valid(request, form.get("csrf")):
            return self.forbidden(request, lang, "csrf_body", back)
        if not same_origin(request, self.s.config.web.public_url):
            log.warning("web: refused a form posted from another origin (public_url is %s)",
                        self.s.config.web.public_url)
            return self.forbidden(request, lang, "origin_body", back)
        nonce, address = form.get("nonce"), form.get("address")
        if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce) or not isinstance(address, str):
            return self.message(request, lang, t["bad_form_title"], t["bad_form_body"], status=400, back=back)
        # One follow-up per form and address: a double submit or a reload of the POST finds the first one.
        key = "web:" + hashlib.sha256(f"{nonce}\0{article_id}\0{address.strip().lower()}".encode()).hexdigest()[:40]
        sent_url = f"/help/a/{article_id}/sent?lang={lang}"
        async with self._form_locks.hold(key):  # concurrent copies of one form wait for the first
            earlier = await self._followup_by_key(f"email:{key}")
            if earlier is not None:
                if earlier.state == "blocked":
                    return self.refused(request, lang, earlier.reason, back)
                raise web.HTTPSeeOther(sent_url)
            client = self.clients.of(request)
            if await self.s.limiter.hit([Limit(f"web-email:{client}", self.s.config.email.limits.per_client)]):
                return self.message(request, lang, t["rate_limited_title"], t["rate_limited_body"], status=429,
                                    back=back)
            prepared = await self.s.followups.prepare(channel="email", recipient=address, message="article_link",
                                                      language=lang, purpose="web", key=key, article_id=article_id)
            await self.s.outbox.enqueue([prepared])
        if not prepared.accepted:
            return self.refused(request, lang, prepared.reason, back)
        if self.s.on_enqueued is not None:
            self.s.on_enqueued()
        raise web.HTTPSeeOther(sent_url)

    def refused(self, request: web.Request, lang: str, reason: str | None, back: tuple[str, str]) -> web.Response:
        t = i18n.UI[lang]
        return self.message(request, lang, t["refused_title"], t[_REFUSED.get(reason or "", "refused_other")],
                            status=400, back=back)

    async def email_sent(self, request: web.Request) -> web.StreamResponse:
        lang = self.lang(request)
        found = self._article(request, lang)
        if isinstance(found, web.Response):
            return found
        catalogue, article = found
        article_id = article.id
        t = i18n.UI[lang]
        return self.message(request, lang, t["sent_heading"],
                            t["sent_body"].format(title=article.title[catalogue.language(lang)]),
                            back=(f"/help/a/{article_id}?lang={lang}", t["back_to_article"]))

    # ---- signed links
    def _verify(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        """The link id of the request's token, or the page saying why not (nothing is recorded then)."""
        try:
            link_id, _ = self.s.signer.verify(request.match_info["token"])
        except LinkInvalid as exc:
            lang = self.lang(request)
            t = i18n.UI[lang]
            if exc.reason == "expired":
                return None, self.message(request, lang, t["link_expired_title"], t["link_expired_body"],
                                          status=410, noindex=True, private=True)
            return None, self.message(request, lang, t["link_invalid_title"], t["link_invalid_body"], status=400,
                                      noindex=True, private=True)
        return link_id, None

    async def open_link(self, request: web.Request) -> web.StreamResponse:
        """A link from an SMS or email: recorded as opened, then its page at this address (reloads work)."""
        link_id, refusal = self._verify(request)
        if refusal is not None or link_id is None:
            return refusal or self.not_found(request)
        opened = await self.s.outbox.open_link(link_id)
        if opened is None:
            return self.not_found(request)
        link, interaction = opened
        lang = self.lang(request, hint=link.language)
        catalogue = self.s.catalogue()
        if catalogue is None:
            return self.unavailable(request, lang)
        banner = self.banner(interaction, catalogue, lang)
        if link.kind == "survey":
            return await self.survey_page(request, link, lang, banner)
        if link.kind == "chat":
            return await request.app[CHAT].open_link(request, link, lang, banner)
        article = catalogue.articles.get(link.target) if link.kind == "article" else None
        if article is not None:
            return self.article_page(request, catalogue, article, lang, banner=banner, noindex=True)
        return self.list_page(request, catalogue, lang, banner=banner, noindex=True, private=True)

    async def survey_page(self, request: web.Request, link: Link, lang: str,
                          banner: dict[str, str] | None) -> web.Response:
        t = i18n.UI[lang]
        if not link.interaction_id:
            return self.message(request, lang, t["survey_title"], t["survey_unavailable_body"], status=404,
                                noindex=True)
        if await self._answered(link.interaction_id):
            return self.message(request, lang, t["survey_already_title"], t["survey_already_body"], banner=banner,
                                noindex=True, private=True)
        return self.render(request, "survey.html", lang, form=True, banner=banner, noindex=True,
                           action=f"/l/{request.match_info['token']}/survey?lang={lang}")

    async def survey_answer(self, request: web.Request) -> web.StreamResponse:
        """One web answer per call: a second one changes nothing and says so."""
        link_id, refusal = self._verify(request)
        if refusal is not None or link_id is None:
            return refusal or self.not_found(request)
        link = await self._link(link_id)
        if link is None or link.kind != "survey" or not link.interaction_id:
            return self.not_found(request)
        lang = self.lang(request, hint=link.language)
        t = i18n.UI[lang]
        token = request.match_info["token"]
        back = (f"/l/{token}?lang={lang}", t["survey_title"])
        form = await request.post()
        if not self.csrf.valid(request, form.get("csrf")):
            return self.forbidden(request, lang, "csrf_body", back)
        if not same_origin(request, self.s.config.web.public_url):
            return self.forbidden(request, lang, "origin_body", back)
        score = form.get("score")
        if not isinstance(score, str) or score not in {"1", "2", "3", "4", "5"}:
            return self.message(request, lang, t["bad_form_title"], t["bad_form_body"], status=400, back=back)
        if not await self._store_answer(link.interaction_id, int(score)):
            return self.message(request, lang, t["survey_already_title"], t["survey_already_body"], status=409,
                                noindex=True, private=True)
        raise web.HTTPSeeOther(f"/l/{token}/thanks?lang={lang}")

    async def survey_thanks(self, request: web.Request) -> web.StreamResponse:
        link_id, refusal = self._verify(request)
        if refusal is not None or link_id is None:
            return refusal or self.not_found(request)
        link = await self._link(link_id)
        if link is None:
            return self.not_found(request)
        lang = self.lang(request, hint=link.language)
        t = i18n.UI[lang]
        return self.message(request, lang, t["survey_thanks_title"], t["survey_thanks_body"], noindex=True,
                            private=True)

    # ---- delivery reports and the development page
    async def delivery_report(self, request: web.Request) -> web.StreamResponse:
        """Kannel's dlr-url: 200 "ok" for every authentic report (Kannel retries anything else), 403 otherwise."""
        verify = self.s.verify_dlr
        if verify is None:
            raise web.HTTPNotFound()
        try:
            followup_id, status, gateway_ref = verify(request.query)
        except ValueError as exc:
            log.warning("web: refused a delivery report: %s", exc)
            return web.Response(status=403, text="forbidden", content_type="text/plain")
        try:
            changed = await self.s.outbox.delivery_report(followup_id, status, gateway_ref)
        except ValueError as exc:  # authentic but not understood: retrying would not help
            log.warning("web: delivery report for %s ignored: %s", followup_id[:8], exc)
            changed = False
        log.debug("web: delivery report %s for %s (changed: %s)", status, followup_id[:8], changed)
        return web.Response(text="ok", content_type="text/plain")

    async def dev_outbox(self, request: web.Request) -> web.StreamResponse:
        if not self.s.config.web.dev_pages or not self.clients.is_loopback(request):
            return self.not_found(request)
        lang = self.lang(request)
        followups = await self.s.outbox.list(limit=50)
        counts = await self.s.outbox.counts()
        inbox = await self.s.dev_inbox() if self.s.dev_inbox is not None else None
        return self.render(request, "dev_outbox.html", lang, followups=followups, counts=sorted(counts.items()),
                           inbox=inbox, when=_when, noindex=True, private=True, shorten=_shorten)

    # ---- storage the outbox does not offer
    def _sessions(self) -> Any:
        if self.s.store.sessions is None:
            raise RuntimeError("the store is not started")
        return self.s.store.sessions

    async def _followup_by_key(self, idempotency_key: str) -> FollowUp | None:
        async with self._sessions()() as session:
            return (await session.execute(select(FollowUp).where(FollowUp.idempotency_key == idempotency_key)
                                          .limit(1))).scalar_one_or_none()

    async def _link(self, link_id: str) -> Link | None:
        async with self._sessions()() as session:
            return await session.get(Link, link_id)

    async def _answered(self, interaction_id: str) -> bool:
        async with self._sessions()() as session:
            found = await session.execute(select(SurveyAnswer.id).where(
                SurveyAnswer.interaction_id == interaction_id, SurveyAnswer.question == SURVEY_QUESTION).limit(1))
            return found.first() is not None

    async def _store_answer(self, interaction_id: str, score: int) -> bool:
        """Store the answer unless the call has one; True when stored.

        There is no unique index on survey answers, so the guard is here: one asyncio lock for this process, a
        transaction-scoped advisory lock on PostgreSQL for other processes, and an INSERT ... SELECT WHERE NOT
        EXISTS, which SQLite runs under its single write lock.
        """
        exists_already = exists().where(SurveyAnswer.interaction_id == interaction_id,
                                        SurveyAnswer.question == SURVEY_QUESTION)
        rows = select(literal(interaction_id), literal(SURVEY_QUESTION), literal(score), literal("web"),
                      literal(dt.datetime.now(dt.UTC))).where(~exists_already)
        statement = insert(SurveyAnswer).from_select(["interaction_id", "question", "score", "channel", "at"], rows)
        async with self._survey_lock, self._sessions().begin() as session:
            if session.get_bind().dialect.name == "postgresql":
                await session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                                      {"key": f"ivr-bridge survey {interaction_id} {SURVEY_QUESTION}"})
            result = await session.execute(statement)
        return bool(result.rowcount)


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _shorten(value: object, limit: int = 300) -> str:
    text_value = value if isinstance(value, str) else repr(value)
    return text_value if len(text_value) <= limit else text_value[:limit] + "…"
