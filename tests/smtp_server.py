"""A real SMTP server on loopback for the tests: aiosmtpd on an ephemeral port, in a thread.

It records every message it accepted (envelope and parsed message), counts them by Message-ID, and can be told
to answer the next commands with an error (`refuse`), e.g. `451` (try later) or `550` (no such user). It can
require STARTTLS or speak implicit TLS, and require a login.
"""

from __future__ import annotations

import email
import socket
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import default
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage

    def part(self, subtype: str) -> str:
        """The decoded text of the text/plain or text/html part."""
        found = self.message.get_body(preferencelist=(subtype,))
        assert found is not None, f"no text/{subtype} part"
        assert found.get_content_subtype() == subtype, f"no text/{subtype} part"
        return found.get_content().replace("\r\n", "\n")


class _Handler:
    def __init__(self, server: SmtpTestServer) -> None:
        self.server = server

    async def handle_RCPT(self, smtp: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        fault = self.server._take("RCPT")
        if fault:
            return fault
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: Any, session: Any, envelope: Any) -> str:
        fault = self.server._take("DATA")
        if fault:
            return fault
        raw = envelope.original_content or envelope.content
        parsed = email.message_from_bytes(raw, policy=default)
        with self.server._lock:
            self.server.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), raw, parsed))
        return "250 2.0.0 Ok: queued"


class _Controller(Controller):
    """aiosmtpd's Controller on a socket bound beforehand, so the port is free and known (no races)."""

    def __init__(self, handler: Any, sock: socket.socket, **kwargs: Any) -> None:
        self._sock = sock
        super().__init__(handler, hostname="127.0.0.1", port=sock.getsockname()[1], **kwargs)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock, ssl=self.ssl_context)


class SmtpTestServer:
    """`with SmtpTestServer() as server:` ... `server.port`, `server.received`, `server.refuse(...)`."""

    def __init__(
        self,
        *,
        implicit_tls: ssl.SSLContext | None = None,
        starttls: ssl.SSLContext | None = None,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.received: list[Received] = []
        self.logins: list[str] = []
        self._faults: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._login = login
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.host, self.port = sock.getsockname()
        kwargs: dict[str, Any] = {"ssl_context": implicit_tls, "tls_context": starttls}
        if starttls is not None:
            kwargs["require_starttls"] = True
        if login is not None:
            kwargs |= {"authenticator": self._authenticate, "auth_require_tls": implicit_tls is None}
        self._controller = _Controller(_Handler(self), sock, **kwargs)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == self._login
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok, handled=False)

    def refuse(self, reply: str, *, at: str = "DATA", times: int = 1) -> None:
        """Answer the next `times` RCPT or DATA commands with `reply` (e.g. '451 4.3.0 try later')."""
        with self._lock:
            self._faults += [(at, reply)] * times

    def _take(self, stage: str) -> str | None:
        with self._lock:
            for i, (at, reply) in enumerate(self._faults):
                if at == stage:
                    del self._faults[i]
                    return reply
        return None

    def message_ids(self) -> Counter[str]:
        """How many times each Message-ID was accepted."""
        with self._lock:
            return Counter(str(r.message["Message-ID"]) for r in self.received)

    def __enter__(self) -> SmtpTestServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()
