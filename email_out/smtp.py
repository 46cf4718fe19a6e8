"""The SMTP gateway: a few aiosmtplib connections, kept open and reused, and a DATA phase split at the final dot.

An SMTP server takes responsibility for a message when it receives the line holding only ``.`` that ends DATA.
``aiosmtplib.SMTP.data()`` writes body and dot in one go, so :meth:`SmtpGateway.send` does DATA itself, through
the same pieces aiosmtplib uses (``SMTP.execute_command``, ``SMTPProtocol.write`` / ``read_response``, and its
``normalize_message_line_endings`` and ``PERIOD_REGEX`` for line ends and dot-stuffing)::

    MAIL FROM, RCPT TO, DATA -> 354, the body (flushed)   refusals: 5xx failed, 4xx / broken connection retry
    await handing(write_dot)                              the outbox writes "handed over" and, right before
                                                          committing it, calls write_dot: ".\\r\\n"
    read the reply                                        2xx sent, 4xx retry, 5xx failed, no reply unknown

A committed hand-over therefore means the dot was written, hence ``interrupted = "sent"``; a dispatcher killed
between the dot and the commit (microseconds) sends the mail again.

Decisions worth knowing:

- An authentication failure (535, or 530 / 538 "authentication / encryption required" at MAIL) is a
  ``retry``, not ``failed``: it is the gateway's configuration that is wrong, not the message, and the message
  should go once the password is fixed (535 is logged as an error). TLS and connection failures are ``retry``
  for the same reason.
- A reused connection the server closed while it sat idle is reopened once, transparently, before anything of
  the message was sent.
- A transaction refused at MAIL, RCPT or DATA is followed by RSET so the connection can be reused; a reply to the
  final dot ends the transaction by itself (RFC 5321 4.1.1.4), so none is needed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from email.message import Message
from typing import cast

import aiosmtplib
from aiosmtplib.errors import (
    SMTPAuthenticationError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.protocol import PERIOD_REGEX, SMTPProtocol, normalize_message_line_endings

from bridge.config import EmailConfig
from bridge.outbox import Handing, Interrupted, Outgoing, SendResult, SendStatus
from email_out.address import normalise_address
from email_out.message import build_message, flatten

log = logging.getLogger(__name__)

END_OF_DATA = b".\r\n"  # follows the body, which always ends with CRLF
# Queue ids as Postfix ("250 2.0.0 Ok: queued as 4Ft1Zb2kqBz9sWH") and Exim ("250 OK id=1nXYZ-0001Ab-Cd")
# report them.
_QUEUE_ID = re.compile(r"(?:\bqueued as|\bid=)\s*<?([A-Za-z0-9][A-Za-z0-9._@:-]*)", re.IGNORECASE)
_FLUSH_POLL = 0.005
# "Authentication required" / "Encryption required" (RFC 4954): our configuration is at fault, not the message.
_CONFIG_REFUSALS = frozenset({530, 538})


def encode_data(flat: bytes) -> bytes:
    """The DATA body exactly as ``aiosmtplib`` sends it, without the final dot: CRLF line ends, dots doubled."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(flat))


def queue_id(reply: str) -> str | None:
    """The server's queue id in its reply to the final dot, if it names one."""
    match = _QUEUE_ID.search(reply)
    return match.group(1) if match else None


class _Flat:
    """A message flattened for DATA: the body as sent (CRLF, dots doubled, no final dot) and its SIZE."""

    def __init__(self, mail: Message) -> None:
        self.mail = mail
        flat = flatten(mail)
        self.size = len(flat)
        self.body = encode_data(flat)


class _Connection:
    """One pooled SMTP connection; ``in_transaction`` while a mail transaction on it has not ended cleanly."""

    def __init__(self) -> None:
        self.smtp: aiosmtplib.SMTP | None = None
        self.in_transaction = False
        self.sent = 0

    @property
    def connected(self) -> bool:
        return self.smtp is not None and self.smtp.is_connected

    def drop(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
        self.smtp = None
        self.in_transaction = False


class SmtpGateway:
    """The email :class:`~bridge.outbox.Gateway`: up to ``config.connections`` SMTP connections, opened on
    demand, reused across messages and reopened when broken; STARTTLS, implicit TLS and AUTH as configured."""

    channel = "email"
    interrupted: Interrupted = "sent"

    def __init__(self, config: EmailConfig) -> None:
        self.config = config
        try:
            self.from_addr = normalise_address(config.from_addr)
        except ValueError as exc:
            raise ValueError(f"email.from_addr {config.from_addr!r}: {exc}") from None
        self.domain = self.from_addr.rsplit("@", 1)[1]
        self.opened = 0  # connections opened so far
        self._slots = asyncio.Semaphore(max(1, config.connections))
        self._idle: list[_Connection] = []
        self._helo = config.helo_name or None
        self._closed = False

    async def start(self) -> None:
        """Nothing connects yet (connections open with the first messages); finds the EHLO name."""
        self._closed = False
        if self._helo is None:
            self._helo = await asyncio.to_thread(socket.getfqdn)

    async def aclose(self) -> None:
        """QUIT the idle connections; connections still sending close when their message is done."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn) for conn in idle))

    async def _quit(self, conn: _Connection) -> None:
        if conn.smtp is not None and conn.connected:
            with contextlib.suppress(SMTPException, OSError):
                await conn.smtp.quit(timeout=min(self.config.timeout, 5.0))
        conn.drop()

    # ---------------------------------------------------------------------------------------------- sending
    async def send(self, message: Outgoing, handing: Handing) -> SendResult:
        """Send ``message``; ``handing()`` is awaited once, after the body went out and before the final dot."""
        try:
            recipient = normalise_address(message.recipient)
            mail = build_message(message, from_addr=self.from_addr, from_name=self.config.from_name,
                                 domain=self.domain)
        except ValueError as exc:  # AddressRefused, HeaderInjection: this message can never be sent
            return SendResult("failed", error=str(exc))
        if self._closed:
            return SendResult("retry", error="the SMTP gateway is closed")
        flat = _Flat(mail)  # before taking a connection, which would sit idle meanwhile
        async with self._slots:
            conn = self._idle.pop() if self._idle else _Connection()
            try:
                return await self._deliver(conn, flat, recipient, handing)
            finally:
                # Interrupted mid-transaction (cancelled, handing() raised): nothing but closing the connection
                # ends a DATA phase without the dot, so the half-sent message is dropped, never delivered.
                if conn.in_transaction or self._closed or not conn.connected:
                    conn.drop()
                else:
                    self._idle.append(conn)

    async def _deliver(self, conn: _Connection, flat: _Flat, recipient: str, handing: Handing) -> SendResult:
        reused = conn.connected
        if not reused:
            conn.drop()
            failure = await self._open(conn)
            if failure is not None:
                return failure
        result = await self._transaction(conn, flat, recipient, handing, reused=reused)
        if result is None:  # the idle connection was gone; nothing of this message was sent yet
            log.debug("SMTP connection closed while idle; reconnecting")
            conn.drop()
            failure = await self._open(conn)
            if failure is not None:
                return failure
            result = await self._transaction(conn, flat, recipient, handing, reused=False)
        assert result is not None
        return result

    async def _open(self, conn: _Connection) -> SendResult | None:
        """Connect (TLS, AUTH, EHLO) into ``conn``; a ``retry`` result when that fails."""
        c = self.config
        smtp = aiosmtplib.SMTP(hostname=c.host, port=c.port, username=c.username or None,
                               password=c.password or None, use_tls=c.tls, start_tls=c.starttls and not c.tls,
                               validate_certs=c.validate_certs, timeout=c.timeout, local_hostname=self._helo)
        try:
            await smtp.connect()
            # EHLO before MAIL FROM: whether the server takes SIZE.
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except SMTPHeloError:
                    await smtp.helo()
        except SMTPAuthenticationError as exc:
            smtp.close()
            log.error("SMTP server %s:%s refused our credentials: %s %s", c.host, c.port, exc.code, exc.message)
            return SendResult("retry", error=f"SMTP authentication refused: {exc.code} {exc.message}")
        except (SMTPException, OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            smtp.close()
            return SendResult("retry", error=f"cannot connect to SMTP server {c.host}:{c.port}: {exc}")
        except BaseException:
            smtp.close()
            raise
        conn.smtp = smtp
        self.opened += 1
        return None

    async def _transaction(self, conn: _Connection, flat: _Flat, recipient: str, handing: Handing,
                           *, reused: bool) -> SendResult | None:
        """One mail transaction on an open connection; ``None`` when a reused connection turned out closed."""
        smtp = conn.smtp
        assert smtp is not None
        timeout = self.config.timeout
        options = [f"SIZE={flat.size}"] if smtp.supports_extension("size") else []
        body = flat.body

        stage = "MAIL FROM"
        conn.in_transaction = True
        try:
            await smtp.mail(self.from_addr, options=options, timeout=timeout)
            stage = "RCPT TO"
            await smtp.rcpt(recipient, timeout=timeout)
            stage = "DATA"
            reply = await smtp.execute_command(b"DATA", timeout=timeout)
            if reply.code != 354:
                raise SMTPDataError(reply.code, reply.message)
            stage = "the message body"
            protocol = smtp.protocol
            if protocol is None:
                raise SMTPServerDisconnected("Connection lost")
            protocol.write(body)
            await self._flushed(protocol, timeout)
        except SMTPResponseException as exc:
            if reused and stage == "MAIL FROM" and exc.code == 421:
                return None
            return await self._refused(conn, stage, exc.code, exc.message)
        except (SMTPException, OSError) as exc:  # disconnected, timed out (both OSErrors via their bases)
            conn.drop()
            if reused and stage == "MAIL FROM" and isinstance(exc, SMTPServerDisconnected):
                return None
            return SendResult("retry", error=f"{stage}: {exc or type(exc).__name__}")

        dot = False

        def write_dot() -> None:
            # Runs right before the outbox commits the hand-over (no other task in between); the reply is marked
            # as expected first, so aiosmtplib keeps it even if it arrives before read_response().
            nonlocal dot
            if smtp.protocol is protocol and protocol.is_connected:
                protocol._response_pending = True
                protocol.write(END_OF_DATA)
                dot = True

        await handing(write_dot)

        # The server cannot have taken a message whose dot it never got: a connection lost while handing()
        # ran is a plain retry.
        if not dot:
            conn.drop()
            return SendResult("retry", error="connection lost before the final dot")
        try:
            reply = await protocol.read_response(timeout=timeout)
        except SMTPException as exc:  # disconnected, timed out, garbled reply
            conn.drop()
            return SendResult("unknown", error=f"no reply to the final dot: {exc or type(exc).__name__}")
        conn.in_transaction = False
        code, text = reply.code, reply.message
        if 200 <= code < 300:
            conn.sent += 1
            return SendResult("sent", gateway_ref=queue_id(text) or str(flat.mail["Message-ID"]))
        error = f"message refused after the final dot: {code} {text}"
        if code == 421:  # the server is closing this connection
            conn.drop()
        if 400 <= code < 500:
            return SendResult("retry", error=error)
        if 500 <= code < 600:
            return SendResult("failed", error=error)
        conn.drop()
        return SendResult("unknown", error=f"unexpected reply to the final dot: {code} {text}")

    async def _flushed(self, protocol: SMTPProtocol, timeout: float) -> None:
        """Wait until the transport's write buffer is empty: the body left before ``handing()``, so that only
        the dot is left to send after it (with TLS, this is the TLS layer's buffer)."""
        async with asyncio.timeout(timeout):
            while True:
                transport = cast(asyncio.WriteTransport | None, protocol.transport)
                if transport is None or transport.is_closing():
                    raise SMTPServerDisconnected("Connection lost")
                if not transport.get_write_buffer_size():
                    return
                await asyncio.sleep(_FLUSH_POLL)

    async def _refused(self, conn: _Connection, stage: str, code: int, text: str) -> SendResult:
        """A refusal before the dot: ``failed`` for 5xx (but 530 / 538), ``retry`` otherwise; then RSET so the
        connection can be reused."""
        status: SendStatus = "failed" if 500 <= code < 600 and code not in _CONFIG_REFUSALS else "retry"
        if conn.smtp is not None and conn.connected and 400 <= code < 600 and code != 421:
            try:
                await conn.smtp.rset(timeout=self.config.timeout)
                conn.in_transaction = False
            except (SMTPException, OSError):
                conn.drop()
        else:  # 421 (closing) or a garbled reply: the connection cannot be trusted
            conn.drop()
        return SendResult(status, error=f"{stage} refused: {code} {text}")
