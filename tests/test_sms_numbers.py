"""Mobile numbers: what may be texted, as E.164, and why the rest is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sms.numbers import NumberRefused, normalise_mobile

pytestmark = pytest.mark.unit

ALLOWED = ["CN", "US", "GB", "KR"]


@pytest.mark.parametrize(("raw", "region", "e164"), [
    ("+8613800138000", None, "+8613800138000"),
    ("138 0013 8000", "CN", "+8613800138000"),
    ("+86 138-0013-8000", None, "+8613800138000"),
    ("(202) 555-0123", "US", "+12025550123"),        # US numbers are "fixed line or mobile"
    ("+1 415 555 2671", "GB", "+14155552671"),       # an international number ignores the region
    ("07400 123456", "GB", "+447400123456"),
    ("+44 7400 123456", None, "+447400123456"),
    ("010-1234-5678", "KR", "+821012345678"),
    ("+82 10 1234 5678", None, "+821012345678"),
    ("  +8613800138000 ", None, "+8613800138000"),
])
def test_valid_mobiles_become_e164(raw: str, region: str | None, e164: str) -> None:
    assert normalise_mobile(raw, region=region, allowed=ALLOWED) == e164


def test_allowlist_is_case_insensitive() -> None:
    assert normalise_mobile("+8613800138000", region=None, allowed=["cn"]) == "+8613800138000"


@pytest.mark.parametrize(("raw", "region"), [
    ("+861065529988", None),       # Beijing landline
    ("+442079460000", None),       # London landline
    ("02-312-3456", "KR"),         # Seoul landline
    ("+1 800 555 0199", None),     # toll free
])
def test_fixed_lines_are_refused_as_not_mobile(raw: str, region: str | None) -> None:
    with pytest.raises(NumberRefused) as refused:
        normalise_mobile(raw, region=region, allowed=ALLOWED)
    assert refused.value.reason == "not_mobile"


@pytest.mark.parametrize("raw", ["+4915123456789", "+79123456789", "+447911123456"])  # DE, RU, Guernsey
def test_countries_outside_the_allowlist_are_refused(raw: str) -> None:
    with pytest.raises(NumberRefused) as refused:
        normalise_mobile(raw, region=None, allowed=ALLOWED)
    assert refused.value.reason == "country"


@pytest.mark.parametrize("raw", ["", "anonymous", "Anonymous", "restricted", "unknown", "  "])
def test_withheld_numbers_are_anonymous(raw: str) -> None:
    with pytest.raises(NumberRefused) as refused:
        normalise_mobile(raw, region="CN", allowed=ALLOWED)
    assert refused.value.reason == "anonymous"


@pytest.mark.parametrize(("raw", "region"), [
    ("13800138000", None),                 # national number without a region
    ("13800138000", "XX"),                 # unknown region
    ("+86 138 0013 8000\r\nX-Evil: 1", None),
    ("+8613800138000\n", None),
    ("+86138\x0000138000", None),
    ("+1-800-FLOWERS", None),
    ("+86 138.0013.8000", None),
    ("+86１３８００１３８０００", None),       # full-width digits are not ASCII digits
    ("12345", "CN"),
    ("+999 1234 5678", None),
    ("+" + "1" * 40, None),
    ("'; DROP TABLE followups; --", None),
    ("++8613800138000", None),
])
def test_junk_is_invalid(raw: str, region: str | None) -> None:
    with pytest.raises(NumberRefused) as refused:
        normalise_mobile(raw, region=region, allowed=ALLOWED)
    assert refused.value.reason == "invalid"


def test_refusal_carries_reason_and_detail() -> None:
    with pytest.raises(NumberRefused) as refused:
        normalise_mobile("+4915123456789", region=None, allowed=ALLOWED)
    assert refused.value.reason == "country"
    assert "DE" in refused.value.detail
    assert isinstance(refused.value, ValueError)


@settings(max_examples=400, deadline=None)
@given(raw=st.one_of(st.text(max_size=40),
                     st.text(alphabet="0123456789 +-()", max_size=25),
                     st.from_regex(r"\+?[0-9 ()\-]{0,20}", fullmatch=True)),
       region=st.sampled_from([None, "CN", "US", "GB", "KR", "XX", "cn", ""]))
def test_nothing_but_number_refused_escapes(raw: str, region: str | None) -> None:
    try:
        result = normalise_mobile(raw, region=region, allowed=ALLOWED)
    except NumberRefused as exc:
        assert exc.reason in {"invalid", "not_mobile", "country", "anonymous"}
    else:
        assert result.startswith("+") and result[1:].isdigit()
