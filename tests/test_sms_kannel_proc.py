"""The local Kannel's pieces that need no Kannel: the rendered config, the instance table, reading fakesmsc's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import Config, KannelConfig
from sms.kannel_proc import INSTANCES, KannelError, KannelInstance, ReceivedSms, instance_config, parse_fakesmsc_log

pytestmark = pytest.mark.unit

PREFIX = "2026-11-22 21:52:31 [10024] [0] DEBUG: "


def log(*bodies: str) -> str:
    lines = [f"{PREFIX}Got message {n}: <{body}>" for n, body in enumerate(bodies, 1)]
    return "\n".join(["2026-11-22 21:52:29 [10024] [0] INFO: fakesmsc starting", *lines, ""])


def test_plain_text_line_is_read_as_is() -> None:
    assert parse_fakesmsc_log(log("IVR +8613800138001 text queued1 and more")) == \
        [ReceivedSms("IVR", "+8613800138001", "queued1 and more")]


def test_ucs2_line_is_decoded() -> None:
    # What fakesmsc printed for "你好 hello + & % ü" sent with coding=2.
    body = "IVRBridge +8613800138000 ucs-2 O%60Y%7D%00+%00h%00e%00l%00l%00o%00+%00%2B%00+%00%26%00+%00%25%00+%00%FC"
    assert parse_fakesmsc_log(log(body)) == [ReceivedSms("IVRBridge", "+8613800138000", "你好 hello + & % ü")]


def test_8bit_data_line_is_decoded() -> None:
    assert parse_fakesmsc_log(log("a b data caf%C3%A9+ok")) == [ReceivedSms("a", "b", "café ok")]


def _part(ref: int, total: int, seq: int, text: str, sixteen_bit: bool = False) -> str:
    udh = (f"%06%08%04%00%{ref:02X}%{total:02X}%{seq:02X}" if sixteen_bit
           else f"%05%00%03%{ref:02X}%{total:02X}%{seq:02X}")
    data = "".join(f"%{b:02X}" for b in text.encode("utf-16-be"))
    return f"S +861 udh {udh} data {data}"


def test_concatenated_parts_are_joined_in_order_at_the_first_parts_place() -> None:
    text = log(_part(3, 3, 2, "第二"), "S +862 text between", _part(3, 3, 1, "第一"), _part(3, 3, 3, "第三😀"))
    assert parse_fakesmsc_log(text) == [ReceivedSms("S", "+861", "第一第二第三😀"),
                                        ReceivedSms("S", "+862", "between")]


def test_sixteen_bit_references_and_interleaved_messages_are_kept_apart() -> None:
    text = log(_part(1, 2, 1, "A1", True), _part(2, 2, 1, "B1"), _part(2, 2, 2, "B2"), _part(1, 2, 2, "A2", True))
    assert [sms.text for sms in parse_fakesmsc_log(text)] == ["A1A2", "B1B2"]


def test_incomplete_concatenated_message_is_left_out() -> None:
    assert parse_fakesmsc_log(log(_part(9, 2, 1, "half"))) == []


def test_other_lines_are_ignored() -> None:
    noise = "\n".join([f"{PREFIX}Connecting to <127.0.0.1>", "garbage", f"{PREFIX}Got message 1: <too short>"])
    assert parse_fakesmsc_log(noise) == []


# ---------------------------------------------------------------------------------------------- instances
def test_instances_have_distinct_ports() -> None:
    ports = [p for inst in INSTANCES.values() for p in (inst.admin, inst.smsbox, inst.sendsms, inst.smsc)]
    assert len(ports) == len(set(ports))
    test = instance_config("test", KannelConfig(password="x"))
    assert (test.instance, test.sendsms_port, test.admin_port, test.smsc_port, test.password) == \
        ("test", 23013, 23000, 20000, "x")


def instance(tmp_path: Path, **changes: object) -> KannelInstance:
    config = Config()
    config.general.var_dir = tmp_path
    config.sms.kannel = instance_config("test", KannelConfig(password="s3cret-pw_1")).model_copy(update=changes)
    return KannelInstance(config)


def test_render_writes_a_private_config_for_the_instance(tmp_path: Path) -> None:
    kannel = instance(tmp_path, dlr_retries=7, dlr_retry_delay=2, max_messages=4)
    path = kannel.render()
    assert path == tmp_path / "kannel" / "test" / "kannel.conf"
    assert path.stat().st_mode & 0o777 == 0o600
    conf = path.read_text()
    for line in ("admin-port = 23000", "smsbox-port = 23001", "sendsms-port = 23013", "port = 20000",
                 'password = "s3cret-pw_1"', "max-messages = 4", "http-request-retry = 7",
                 "http-queue-delay = 2", "store-type = file", "concatenation = true", 'user-allow-ip = "127.0.0.1"',
                 f'store-location = "{tmp_path}/kannel/test/kannel.store"'):
        assert line in conf.splitlines(), line
    assert "$" not in conf
    assert f'admin-password = "{kannel.admin_password}"' in conf and "s3cret" not in kannel.admin_password


@pytest.mark.parametrize("password", ["", 'pw"\ninclude = "/etc/passwd', "pw with space"])
def test_render_refuses_passwords_that_could_break_the_config(tmp_path: Path, password: str) -> None:
    with pytest.raises(KannelError, match="password"):
        instance(tmp_path, password=password).render()
