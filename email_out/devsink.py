"""The dev mail sink: a real SMTP server (aiosmtpd) that keeps every message it receives as an ``.eml`` file.

``make run`` points the SMTP gateway at it and the tests send through it. It runs in the caller's event loop
(aiosmtpd's ``SMTP`` protocol under ``loop.create_server``; no ``Controller`` thread), writes each message
atomically as ``<dir>/<timestamp>-<n>.eml`` with the envelope prepended as ``X-Envelope-From`` /
``X-Envelope-To`` headers, and answers ``250 OK queued as <file stem>``. It can require AUTH, offer STARTTLS,
and refuse (550) or defer (451) chosen recipients, so the gateway's error paths can be exercised against it.

Standalone: ``python -m email_out.devsink --dir var/dev-mail --port 8025`` (one line per mail on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import hmac
import logging
import os
import signal
import ssl
import sys
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedMail:
    """One stored message: ``to`` is the envelope recipients (comma-separated), the parts decoded."""

    message_id: str
    to: str
    subject: str
    text: str
    html: str
    path: Path
    mail_from: str = ""
    message: EmailMessage = field(default_factory=EmailMessage, repr=False, compare=False)


def read_mail(path: Path) -> ReceivedMail:
    """Parse one file the sink wrote."""
    with open(path, "rb") as fh:
        message = BytesParser(policy=email.policy.default).parse(fh)
    assert isinstance(message, EmailMessage)

    def part(subtype: str) -> str:
        body = message.get_body((subtype,))
        # Base64 and quoted-printable parts decode to MIME's canonical CRLF line ends; 8-bit ones do not.
        return str(body.get_content()).replace("\r\n", "\n") if body is not None else ""

    return ReceivedMail(message_id=str(message.get("Message-ID", "")),
                        to=str(message.get("X-Envelope-To", "") or message.get("To", "")),
                        subject=str(message.get("Subject", "")), text=part("plain"), html=part("html"), path=path,
                        mail_from=str(message.get("X-Envelope-From", "")).strip("<>"), message=message)


def read_mailbox(directory: Path) -> list[ReceivedMail]:
    """Every message in ``directory``, oldest first (temporary files of writes in progress are skipped)."""
    if not directory.is_dir():
        return []
    return [read_mail(path) for path in sorted(directory.glob("*.eml")) if not path.name.startswith(".")]


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol, counted by the sink so that ``aclose()`` can close the connections still open."""

    def __init__(self, sink: DevMailSink, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._raw_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again with the TLS transport after STARTTLS; the socket's own transport is the first one.
        if self._raw_transport is None:
            self._raw_transport = transport
            self._sink._live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._live.discard(self)
        super().connection_lost(error)

    def abort(self) -> asyncio.Task[None] | None:
        if self._raw_transport is not None:
            self._raw_transport.close()
        return self._handler_coroutine


class _Handler:
    def __init__(self, sink: DevMailSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self.sink.refuse_recipients:
            return f"550 5.1.1 <{address}>: mailbox unavailable"
        if address.lower() in self.sink.defer_recipients:
            return f"451 4.3.0 <{address}>: try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # A real MTA keeps a message once its final dot arrived, even if the client leaves before the reply
        # (RFC 1047). aiosmtpd cancels this handler when the client's EOF comes, so storing runs in a task of
        # its own that the cancellation does not reach.
        task = asyncio.create_task(self.sink._store(envelope), name="dev-mail-store")
        self.sink._storing.add(task)
        task.add_done_callback(self.sink._storing.discard)
        mail = await asyncio.shield(task)
        return f"250 OK queued as {mail.path.stem}"


class DevMailSink:
    """An SMTP server on ``host:port`` (0: a free port, see :attr:`port`) that stores mail under ``directory``.

    ``auth`` (user -> password) makes AUTH mandatory; ``tls_context`` offers STARTTLS (AUTH then only over TLS);
    ``refuse_recipients`` / ``defer_recipients`` get 550 / 451 at RCPT; ``eight_bit=False`` stops advertising
    8BITMIME and refuses non-ASCII message data; ``on_mail`` is called for each stored message.
    """

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 8025, *,
                 tls_context: ssl.SSLContext | None = None, auth: Mapping[str, str] | None = None,
                 refuse_recipients: Collection[str] = (), defer_recipients: Collection[str] = (),
                 eight_bit: bool = True, on_mail: Callable[[ReceivedMail], None] | None = None,
                 hostname: str = "dev-mail.ivr-bridge.invalid") -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.auth = dict(auth or {})
        self.refuse_recipients = {a.lower() for a in refuse_recipients}
        self.defer_recipients = {a.lower() for a in defer_recipients}
        self.eight_bit = eight_bit
        self.on_mail = on_mail
        self.hostname = hostname
        self.connections = 0  # connections accepted so far
        self.received = 0     # messages stored so far
        self._handler = _Handler(self)
        self._server: asyncio.Server | None = None
        self._live: set[_SinkSMTP] = set()
        self._storing: set[asyncio.Task[ReceivedMail]] = set()

    @property
    def open_connections(self) -> int:
        """Client connections open right now."""
        return len(self._live)

    async def start(self) -> None:
        """Listen (in the running loop); creates ``directory``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is None:
            return
        self._server.close()
        tasks = [task for task in (conn.abort() for conn in list(self._live)) if task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._server.wait_closed()
        if self._storing:  # messages whose final dot arrived are kept
            await asyncio.wait(list(self._storing), timeout=5)
        self._server = None

    def _protocol(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {
            "hostname": self.hostname, "loop": asyncio.get_running_loop(), "decode_data": not self.eight_bit,
            "tls_context": self.tls_context, "auth_require_tls": self.tls_context is not None,
        }
        if not self.auth:
            return _SinkSMTP(self, self._handler, **kwargs)
        with warnings.catch_warnings():
            # Without TLS, AUTH in the clear is what a loopback dev sink asks for; aiosmtpd warns about it.
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS", category=UserWarning)
            return _SinkSMTP(self, self._handler, auth_required=True, authenticator=self._authenticate, **kwargs)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            expected = self.auth.get(user)
            if expected is not None and hmac.compare_digest(expected.encode(), auth_data.password):
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    async def _store(self, envelope: Envelope) -> ReceivedMail:
        self.received += 1
        now = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.directory / f"{now}-{self.received:04d}.eml"
        recipients = ", ".join(envelope.rcpt_tos)
        head = f"X-Envelope-From: <{envelope.mail_from or ''}>\r\nX-Envelope-To: {recipients}\r\n"
        content = envelope.original_content or b""
        await asyncio.to_thread(_write_atomically, path, head.encode("utf-8", "replace") + content)
        mail = await asyncio.to_thread(read_mail, path)
        log.info("mail from %s to %s: %s", mail.mail_from or "<>", recipients, mail.subject)
        if self.on_mail is not None:
            self.on_mail(mail)
        return mail


def _write_atomically(path: Path, data: bytes) -> None:
    # A reader (read_mailbox, the dev outbox page) never sees half a message: it only globs finished names.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- main
async def _serve(directory: Path, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def show(mail: ReceivedMail) -> None:
        print(f"mail from {mail.mail_from or '<>'} to {mail.to}: {mail.subject}  [{mail.path.name}]", flush=True)

    sink = DevMailSink(directory, host, port, on_mail=show)
    await sink.start()
    print(f"dev mail sink on {host}:{sink.port}, writing to {directory}", flush=True)
    try:
        await stop.wait()
    finally:
        await sink.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m email_out.devsink [--dir DIR] [--host HOST] [--port PORT]``: run until SIGINT / SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m email_out.devsink",
                                     description="The dev mail sink: keeps every message it receives as a file.")
    parser.add_argument("--dir", type=Path, default=Path("var/dev-mail"), help="where messages are written")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args.dir, args.host, args.port))
    except OSError as exc:
        print(f"dev mail sink: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
