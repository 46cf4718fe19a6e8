"""The email a follow-up becomes (email_out.message) and the addresses it may go to (email_out.address)."""

from __future__ import annotations

import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.outbox import Outgoing
from email_out.address import AddressRefused, normalise_address
from email_out.message import HeaderInjection, build_message, flatten, message_id

pytestmark = pytest.mark.unit

SUBJECT_ZH = "您的查询：如何修改账单地址？"
TEXT_ZH = "您好！\n\n请点击链接查看答案：https://help.example.com/a/42\n\n——客服中心"
HTML_ZH = "<p>您好！</p><p><a href=\"https://help.example.com/a/42\">查看答案</a></p>"
BREAKS = ["\r", "\n", "\r\n", "\x00", "\u2028", "\x0b"]


def outgoing(key: str = "followup-1:attempt-key", recipient: str = "caller@example.com",
             **payload: str) -> Outgoing:
    body = {"subject": SUBJECT_ZH, "text": TEXT_ZH, "html": HTML_ZH} | payload
    return Outgoing(followup_id="f-1", idempotency_key=key, channel="email", recipient=recipient,
                    language="zh-CN", payload=body)


def build(item: Outgoing | None = None, *, from_addr: str = "help@example.com", from_name: str = "客服中心",
          domain: str = "example.com") -> Message:
    return build_message(item or outgoing(), from_addr=from_addr, from_name=from_name, domain=domain)


def wire(message: Message) -> bytes:
    """The message as the gateway flattens it."""
    return flatten(message)


def parse(data: bytes) -> EmailMessage:
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    return parsed


# ------------------------------------------------------------------------------------------------ message
def test_message_has_decodable_text_and_html_alternatives() -> None:
    received = parse(wire(build()))
    assert received.get_content_type() == "multipart/alternative"
    plain, html = received.get_body(("plain",)), received.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content_charset() == html.get_content_charset() == "utf-8"
    assert plain.get_content().replace("\r\n", "\n").rstrip("\n") == TEXT_ZH
    assert html.get_content().rstrip("\r\n") == HTML_ZH


def test_message_has_only_ascii_bytes_and_short_crlf_lines() -> None:
    data = wire(build(outgoing(subject="长" * 100, text="长" * 400 + "\n.line starting with a dot")))
    assert data.isascii()
    assert max(len(line) for line in data.split(b"\r\n")) <= 78


def test_chinese_subject_and_sender_name_are_rfc2047_encoded_and_round_trip() -> None:
    data = wire(build())
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert b"=?utf-8?" in head
    received = parse(data)
    assert received["Subject"] == SUBJECT_ZH
    assert received["From"].addresses[0].display_name == "客服中心"
    assert received["From"].addresses[0].addr_spec == "help@example.com"
    assert received["To"].addresses[0].addr_spec == "caller@example.com"


def test_message_id_is_stable_for_a_key_and_differs_between_keys() -> None:
    first, again = build(outgoing(key="k-1")), build(outgoing(key="k-1"))
    other = build(outgoing(key="k-2"))
    assert first["Message-ID"] == again["Message-ID"] == message_id("k-1", "example.com")
    assert first["Message-ID"] != other["Message-ID"]
    assert str(first["Message-ID"]).startswith("<") and str(first["Message-ID"]).endswith("@example.com>")
    assert "k-1" not in str(first["Message-ID"])


def test_message_is_dated_and_marked_automatic() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    received = parse(wire(build_message(outgoing(), from_addr="help@example.com", from_name="Help",
                                        domain="example.com", now=when)))
    assert received["Date"].datetime == when
    assert received["Auto-Submitted"] == "auto-generated"
    assert received["Content-Language"] == "zh-CN"


def test_html_part_is_made_from_escaped_text_when_the_payload_has_none() -> None:
    item = Outgoing("f", "k", "email", "a@example.com", "en", {"subject": "s", "text": "a <b> & c\nnext"})
    html = parse(wire(build(item))).get_body(("html",))
    assert html is not None
    assert "a &lt;b&gt; &amp; c<br>next" in html.get_content()


@pytest.mark.parametrize("brk", BREAKS)
@pytest.mark.parametrize("where", ["subject", "from_name", "recipient", "from_addr"])
def test_line_breaks_and_nul_in_header_values_raise_header_injection(where: str, brk: str) -> None:
    value = f"evil{brk}Bcc: victim@example.net"
    with pytest.raises(HeaderInjection):
        if where == "subject":
            build(outgoing(subject=value))
        elif where == "recipient":
            build(outgoing(recipient=f"a@example.com{brk}Bcc: victim@example.net"))
        elif where == "from_name":
            build(from_name=value)
        else:
            build(from_addr=value)


def test_header_injection_is_a_value_error_naming_the_header() -> None:
    with pytest.raises(ValueError, match="Subject"):
        build(outgoing(subject="a\r\nb"))


@settings(max_examples=100, deadline=None)
@given(subject=st.text(max_size=200), name=st.text(max_size=40), text=st.text(max_size=400),
       html=st.text(max_size=200))
def test_any_payload_builds_a_message_that_flattens_or_is_refused_as_value_error(subject: str, name: str,
                                                                                  text: str, html: str) -> None:
    try:
        message = build(outgoing(subject=subject, text=text, html=html), from_name=name)
    except ValueError:
        return
    data = wire(message)
    assert data.isascii()
    received = parse(data)
    assert received["Subject"] == subject
    assert received["Message-ID"] == message["Message-ID"]
    plain = received.get_body(("plain",))
    assert plain is not None and plain.get_content() == text


# ------------------------------------------------------------------------------------------------ addresses
@pytest.mark.parametrize(("raw", "expected"), [
    ("caller@example.com", "caller@example.com"),
    ("  Caller.Name+tag@Example.COM \n", "Caller.Name+tag@example.com"),
    ("o'brien@mail.example.ie", "o'brien@mail.example.ie"),
    ("user@例子.中国", "user@xn--fsqu00a.xn--fiqs8s"),
    ("user@例子。中国", "user@xn--fsqu00a.xn--fiqs8s"),
    ("user@BÜCHER.de", "user@xn--bcher-kva.de"),
    ("user@xn--bcher-kva.de", "user@xn--bcher-kva.de"),
])
def test_addresses_are_normalised(raw: str, expected: str) -> None:
    assert normalise_address(raw) == expected


@pytest.mark.parametrize("raw", [
    "", "   ", "plain", "a@b@example.com", "@example.com", "user@", "user@localhost", "user@1.2.3.4",
    "user@[127.0.0.1]", "a b@example.com", "a,b@example.com", "<a@example.com>", "Name <a@example.com>",
    "a@example.com\r\nRCPT TO:<x@evil.com>", "a\x00@example.com", "a@exam\nple.com", ".a@example.com",
    "a.@example.com", "a..b@example.com", "\"quoted\"@example.com", "用户@example.com", "a@-example.com",
    "a@example-.com", "a@ex_ample.com", "a@example.com.", "a@example..com", f"{'x' * 65}@example.com",
    f"a@{'x' * 64}.com", f"{'x' * 60}@{'.'.join(['y' * 60] * 4)}.com", "a@example.123",
])
def test_malformed_addresses_are_refused_as_invalid(raw: str) -> None:
    with pytest.raises(AddressRefused) as caught:
        normalise_address(raw)
    assert caught.value.reason == "invalid"
    assert caught.value.detail


_ATOM = st.text(alphabet="abcXYZ019.+-_@[]<>,;: \"\\\r\n\x00例ü。", max_size=40)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=300), _ATOM, st.builds(lambda a, b: f"{a}@{b}", _ATOM, _ATOM)))
def test_any_text_is_either_normalised_idempotently_or_refused(raw: str) -> None:
    try:
        address = normalise_address(raw)
    except AddressRefused:
        return
    assert normalise_address(address) == address
    assert len(address) <= 254
    assert address.isascii()
    assert not any(c in address for c in "\r\n\x00 ,<>")
