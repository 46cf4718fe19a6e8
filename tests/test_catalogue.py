"""The FAQ catalogue and message templates, signed links, and flows that send links: checked at load with
file:line:column problems; rendering autoescapes HTML; tampered or expired links are refused."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.catalogue import load_catalogue, load_catalogue_text
from bridge.links import LinkInvalid, LinkSigner
from bridge.models import new_id
from bridge.yamldoc import DocumentError
from ivr.flow import FlowError, load_flow_text

pytestmark = pytest.mark.unit
FLOWS = Path(__file__).resolve().parent.parent / "flows"
FAQ = (FLOWS / "faq.yaml").read_text(encoding="utf-8")
CATALOGUE = load_catalogue([FLOWS])[0]


def problems_of(text: str) -> list[str]:
    with pytest.raises(DocumentError) as info:
        load_catalogue_text(text, "faq.yaml")
    return [str(p) for p in info.value.problems]


def test_the_shipped_catalogue_loads_with_every_language() -> None:
    assert CATALOGUE is not None
    assert CATALOGUE.languages == ["en", "zh-CN"]
    assert CATALOGUE.article_for_intent("returns") is CATALOGUE.articles["returns"]
    assert CATALOGUE.messages["article_link"].needs_article
    assert not CATALOGUE.messages["survey"].needs_article
    assert CATALOGUE.messages["survey"].channels == {"sms"}


def test_a_misspelt_template_variable_is_a_load_error_at_its_line() -> None:
    text = FAQ.replace('en: "{{ company }}: {{ title }} {{ link }}"', 'en: "{{ company }}: {{ titel }} {{ link }}"')
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "titel" in row)
    found = problems_of(text)
    assert len(found) == 1
    assert re.match(rf"faq\.yaml:{line}:\d+: error: template uses unknown variable\(s\) titel \(known: ", found[0])


def test_a_broken_template_and_a_missing_language_are_both_reported() -> None:
    text = FAQ.replace('en: "{{ company }} help centre, open day and night: {{ link }}"', 'en: "{{ link "')
    text = text.replace("title: {en: Track your delivery, zh-CN: 查询配送进度}", "title: {en: Track your delivery}")
    found = problems_of(text)
    assert any("template: unexpected" in p or "template: expected token" in p for p in found), found
    assert any("no zh-CN text" in p for p in found), found


def test_an_article_with_an_unknown_topic_points_at_the_topic() -> None:
    text = FAQ.replace("    topic: orders\n    intents: [returns]", "    topic: shipping\n    intents: [returns]")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "topic: shipping" in row)
    assert problems_of(text) == [f"faq.yaml:{line}:5: error: article 'returns': topic 'shipping' is not in 'topics'"]


def test_one_intent_cannot_lead_to_two_articles() -> None:
    text = FAQ.replace("intents: [returns]", "intents: [returns, billing]")
    assert any("intent 'billing' already leads to article 'billing_balance'" in p for p in problems_of(text))


def test_yaml_syntax_errors_name_the_line() -> None:
    found = problems_of("catalogue: faq\nlanguages: [en\n")
    assert found[0].startswith("faq.yaml:3:1: error: YAML:")


def test_html_email_parts_escape_what_they_insert_and_sms_stays_plain() -> None:
    assert CATALOGUE is not None
    article = CATALOGUE.articles["returns"]
    html = CATALOGUE.render("article_link", "email", "en", 'http://x/l/a"><script>', article).payload["html"]
    assert "<script>" not in html and "&#34;&gt;&lt;script&gt;" in html
    sms = CATALOGUE.render("article_link", "sms", "zh-CN", "http://x/l/abc", article).payload["text"]
    assert sms == "示例公司：30 天内免费退货 http://x/l/abc"


def test_markdown_bodies_cannot_carry_raw_html_or_script_links() -> None:
    text = FAQ.replace("Returns are free within **30 days**.",
                       "<img src=x onerror=alert(1)> [x](javascript:alert(1)) Returns are free within **30 days**.")
    catalogue = load_catalogue_text(text, "faq.yaml")
    html = catalogue.body_html(catalogue.articles["returns"], "en")
    assert "<img" not in html and 'href="javascript' not in html and "&lt;img" in html


def test_search_finds_articles_in_both_languages() -> None:
    assert CATALOGUE is not None
    assert [a.id for a in CATALOGUE.search("退货", "zh-CN")][:1] == ["returns"]
    assert [a.id for a in CATALOGUE.search("track my parcel", "en")][:1] == ["order_tracking"]
    assert CATALOGUE.search("", "en") == []


# ------------------------------------------------------------------------------------------------ links
def test_a_signed_link_verifies_and_names_its_record() -> None:
    signer = LinkSigner("s" * 32)
    link_id = new_id()
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    token = signer.token(link_id, expires)
    assert len(token) <= 44
    assert signer.verify(token)[0] == link_id


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # tag changed
    lambda t: ("A" if t[0] != "A" else "B") + t[1:],    # link id changed
    lambda t: t.replace(".", ""),
    lambda t: t + "\r\nX-Evil: 1",
    lambda t: "",
])
def test_a_tampered_link_is_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    signer = LinkSigner("s" * 32)
    token = signer.token(new_id(), dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    with pytest.raises(LinkInvalid) as info:
        signer.verify(mutate(token))
    assert info.value.reason in ("malformed", "signature")


def test_an_expired_link_or_another_key_is_refused() -> None:
    signer = LinkSigner("s" * 32)
    token = signer.token(new_id(), dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    with pytest.raises(LinkInvalid, match="expired"):
        signer.verify(token)
    fresh = signer.token(new_id(), dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    with pytest.raises(LinkInvalid, match="signature"):
        LinkSigner("t" * 32).verify(fresh)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_as_a_token_is_refused_cleanly(text: str) -> None:
    with pytest.raises(LinkInvalid):
        LinkSigner("s" * 32).verify(text)


# ------------------------------------------------------------------------------------------------ flows
FLOW = """\
flow: t
languages: [en, zh-CN]
entry: link
after_call:
  - when: {{outcome: [abandoned]}}
    message: {after_message}
nodes:
  link:
    type: send_link
    {what}
    sent: {{en: Sent., zh-CN: 已发送。}}
    next: bye
    on_unavailable: bye
  bye: {{type: hangup}}
"""


def flow_problems(what: str, after_message: str = "survey") -> list[str]:
    with pytest.raises(FlowError) as info:
        load_flow_text(FLOW.format(what=what, after_message=after_message), "t.yaml", CATALOGUE)
    return [str(p) for p in info.value.problems]


def test_a_send_link_node_is_checked_against_the_catalogue() -> None:
    assert load_flow_text(FLOW.format(what="article: returns", after_message="survey"), "t.yaml", CATALOGUE)
    assert flow_problems("article: refunds") == [
        "t.yaml:10:5: error: node 'link': article 'refunds' is not in the catalogue"]
    assert flow_problems("message: nope") == [
        "t.yaml:10:5: error: node 'link': message 'nope' is not in the catalogue "
        "(article_link, chat_link, help_link, survey)"]
    assert flow_problems("message: article_link") == [
        "t.yaml:8:3: error: node 'link': message 'article_link' is about an article: give 'article' or "
        "'from_intent: true'"]
    assert flow_problems("{channel: email, message: survey, to_var: x}".strip("{}").replace(", ", "\n    ")) == [
        "t.yaml:10:5: error: node 'link': message 'survey' has no email text"]


def test_after_call_rules_are_checked_against_the_catalogue() -> None:
    assert flow_problems("article: returns", after_message="goodbye") == [
        "t.yaml:6:5: error: after_call: message 'goodbye' is not in the catalogue"]


def test_a_flow_that_sends_links_needs_a_catalogue() -> None:
    with pytest.raises(FlowError) as info:
        load_flow_text(FLOW.format(what="article: returns", after_message="survey"), "t.yaml", None)
    messages = [p.message for p in info.value.problems]
    assert any("after_call needs the FAQ catalogue" in m for m in messages)
    assert any("sending a message needs the FAQ catalogue" in m for m in messages)
