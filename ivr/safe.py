"""Allowlists for anything that reaches AMI, AGI or the dialplan.

Values from callers (caller ID, digits) and from flow files are checked here before they are written into an AMI
header or an AGI command: CR, LF and NUL are refused everywhere, and each kind of value has its own allowlist.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[A-Za-z0-9_+\-]{1,64}")
NUMBER_RE = re.compile(r"\+?[0-9]{1,20}")
DIGITS_RE = re.compile(r"[0-9*#]{0,64}")
VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
CHANNEL_RE = re.compile(r"[A-Za-z0-9_/\-.@:;]{1,128}")
SOUND_PATH_RE = re.compile(r"[A-Za-z0-9_/\-.]{1,255}")
_CONTROL = re.compile(r"[\r\n\x00]")


class UnsafeValue(ValueError):
    """A value that must not reach Asterisk as it is."""


def check_text(value: str, what: str = "value") -> str:
    """Refuse CR, LF and NUL, the characters that split AMI headers and AGI commands."""
    if _CONTROL.search(value):
        raise UnsafeValue(f"{what} contains a line break or NUL character")
    return value


def _match(regex: re.Pattern[str], value: str, what: str) -> str:
    if not isinstance(value, str) or not regex.fullmatch(value):
        raise UnsafeValue(f"{what} {value!r} is not allowed (must match {regex.pattern})")
    return value


def name(value: str, what: str = "name") -> str:
    return _match(NAME_RE, value, what)


def digits(value: str, what: str = "digits") -> str:
    return _match(DIGITS_RE, value, what)


def var_name(value: str, what: str = "variable name") -> str:
    return _match(VAR_NAME_RE, value, what)


def channel(value: str, what: str = "channel") -> str:
    return _match(CHANNEL_RE, value, what)


def sound_path(value: str, what: str = "sound path") -> str:
    if ".." in value:
        raise UnsafeValue(f"{what} {value!r} may not contain '..'")
    return _match(SOUND_PATH_RE, value, what)


def var_value(value: str, what: str = "variable value") -> str:
    """Values for SET VARIABLE: printable text without quotes, backslashes or dialplan expressions."""
    check_text(value, what)
    if re.search(r'["\\]|\$\{|\$\[', value) or len(value) > 256:
        raise UnsafeValue(f"{what} {value!r} may not contain quotes, backslashes or ${{...}} / $[...]")
    return value


def caller_number(value: str | None) -> str:
    """Caller ID number as the flow sees it: digits with an optional leading '+', else 'anonymous'.

    Caller ID comes from the far end and can hold anything; it never reaches AMI or the dialplan unless it
    passed this allowlist.
    """
    if value and NUMBER_RE.fullmatch(value):
        return value
    return "anonymous"
