"""The DATA body the SMTP gateway writes is byte for byte what aiosmtplib's own ``data()`` writes.

The gateway splits DATA to await ``handing()`` before the final dot, so it cannot call ``SMTP.data()``; these
tests hold its encoding to aiosmtplib's by running ``SMTPProtocol.execute_data_command`` on a transport that
records what it is given.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtplib.protocol import SMTPProtocol

from email_out.smtp import END_OF_DATA, encode_data, queue_id

pytestmark = pytest.mark.unit


class RecordingTransport(asyncio.WriteTransport):
    """Takes writes and answers DATA with 354 and the body with 250, as a server would."""

    def __init__(self, protocol: SMTPProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        reply = b"354 go ahead\r\n" if data == b"DATA\r\n" else b"250 ok\r\n"
        asyncio.get_running_loop().call_soon(self.protocol.data_received, reply)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        pass


async def aiosmtplib_data(message: bytes) -> bytes:
    protocol = SMTPProtocol(loop=asyncio.get_running_loop())
    transport = RecordingTransport(protocol)
    protocol.connection_made(transport)
    protocol.data_received(b"220 ready\r\n")
    await protocol.read_response(timeout=1)  # the greeting
    await protocol.execute_data_command(message, timeout=1)
    assert transport.writes[0] == b"DATA\r\n"
    return b"".join(transport.writes[1:])


@pytest.mark.parametrize("message", [
    b"Subject: x\r\n\r\nplain\r\n",
    b"Subject: x\n\nbare LF line ends\nand no final newline",
    b"Subject: x\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nlone dot\r\n",
    b"Subject: x\r\r\n\r\nlone CR\rinside\r\n.",
    b"Subject: x\r\n\r\n" + b"x" * 5000 + b"\r\n" + "长".encode() * 900,
    b"",
])
async def test_gateway_encodes_data_exactly_as_aiosmtplib(message: bytes) -> None:
    assert encode_data(message) + END_OF_DATA == await aiosmtplib_data(message)


@pytest.mark.parametrize(("reply", "expected"), [
    ("2.0.0 Ok: queued as 4Ft1Zb2kqBz9sWH", "4Ft1Zb2kqBz9sWH"),
    ("OK id=1nXYZ-0001Ab-Cd", "1nXYZ-0001Ab-Cd"),
    ("OK queued as 20240101T000000Z-0001", "20240101T000000Z-0001"),
    ("OK", None),
    ("2.0.0 Message accepted", None),
])
def test_queue_id_is_read_from_the_reply_to_the_dot(reply: str, expected: str | None) -> None:
    assert queue_id(reply) == expected
