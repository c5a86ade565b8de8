"""A fake SMTP relay on 127.0.0.1: a real TCP server speaking just enough SMTP for ``smtplib``.

Why it exists: the e-mail ops channel (``HLF_OPS_EMAIL_*``) must be tested through the real ``smtplib``, without a
mail server. Replies follow RFC 5321 ("Simple Mail Transfer Protocol", https://www.rfc-editor.org/rfc/rfc5321):
220 greeting, 250 to EHLO/HELO, MAIL, RCPT and the end of DATA, 354 to DATA, 221 to QUIT, 502 to commands it does
not implement (so smtplib sees no STARTTLS or AUTH extension advertised), and, when told to ``fail(code)``, that
code (e.g. 451 "Requested action aborted: local error in processing", a transient failure) to MAIL. Messages
accepted are kept, parsed, for assertions.
"""

from __future__ import annotations

import socketserver
from email import message_from_bytes
from email.message import Message

from .http_server import LocalServer

__all__ = ["FakeSMTP"]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeSMTP


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        fake = self.server.fake
        self._reply("220 fake-smtp ESMTP ready")
        sender, recipients = "", list[str]()
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            command = raw.decode(errors="replace").strip()
            verb = command.split(" ", 1)[0].upper()
            if verb in {"EHLO", "HELO"}:
                self._reply("250 fake-smtp")
            elif verb == "MAIL":
                code = fake.failing()
                if code is not None:
                    self._reply(f"{code} Requested action aborted: local error in processing")
                    continue
                sender, recipients = command[len("MAIL FROM:") :].strip(), []
                self._reply("250 OK")
            elif verb == "RCPT":
                recipients.append(command[len("RCPT TO:") :].strip())
                self._reply("250 OK")
            elif verb == "DATA":
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                lines: list[bytes] = []
                while (line := self.rfile.readline()) not in (b".\r\n", b""):
                    lines.append(line[1:] if line.startswith(b"..") else line)
                fake._accept(sender, recipients, message_from_bytes(b"".join(lines)))
                self._reply("250 OK: queued")
            elif verb == "RSET":
                sender, recipients = "", []
                self._reply("250 OK")
            elif verb == "NOOP":
                self._reply("250 OK")
            elif verb == "QUIT":
                self._reply("221 Bye")
                return
            else:
                self._reply("502 Command not implemented")


class FakeSMTP(LocalServer):
    _name = "fake-smtp"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self._messages: list[tuple[str, list[str], Message]] = []
        self._failing: int | None = None

    def _bind(self) -> _Server:
        server = _Server((self._host, self._port), _Handler)
        server.fake = self
        return server

    def env(self, to: str = "ops@hlf.example", sender: str = "hlf-actors@hlf.example") -> dict[str, str]:
        return {
            "HLF_OPS_EMAIL_TO": to,
            "HLF_OPS_EMAIL_FROM": sender,
            "HLF_OPS_EMAIL_SMTP_HOST": self._host,
            "HLF_OPS_EMAIL_SMTP_PORT": str(self._port),
        }

    def fail(self, code: int | None = 451) -> None:
        """Answer MAIL with ``code`` until called with None."""
        with self._lock:
            self._failing = code

    def failing(self) -> int | None:
        with self._lock:
            return self._failing

    def messages(self) -> list[tuple[str, list[str], Message]]:
        """(envelope sender, envelope recipients, parsed message) of each accepted message."""
        with self._lock:
            return list(self._messages)

    def _accept(self, sender: str, recipients: list[str], message: Message) -> None:
        with self._lock:
            self._messages.append((sender, recipients, message))
