"""Where the sender hands messages over: an SMTP server (SmtpTransport, which journals each accepted message), or,
with no SMTP host, a folder of .eml files (FolderTransport). Both sort failures into TransientSmtpError (try
again) and PermanentSmtpError (refused for good)."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
from pathlib import Path

from recharged.config import SmtpSettings
from recharged.errors import PermanentSmtpError, TransientSmtpError
from recharged.faults import crashpoint
from recharged.mail.journal import Journal


class Transport:
    """Where accepted messages go: an SMTP server, or a folder of .eml files."""

    def deliver(self, message_id: str, sender: str, recipient: str, raw: str) -> str:
        """Hand one message over; returns the server's answer. Raises TransientSmtpError or PermanentSmtpError."""
        raise NotImplementedError

    def accepted(self, message_ids: set[str]) -> set[str]:
        """Which of these messages were accepted before (recovery after a crash)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release any connection."""


def _eml_name(message_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", message_id.strip("<>")) + ".eml"


class FolderTransport(Transport):
    """With no SMTP host: each message becomes FOLDER/<message-id>.eml, written atomically (temporary name,
    fsync, rename). The file is its own proof of delivery, so a message is never written twice."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def deliver(self, message_id: str, sender: str, recipient: str, raw: str) -> str:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            target = self.folder / _eml_name(message_id)
            if target.exists():
                return f"already written to {target}"
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with temporary.open("wb") as handle:
                handle.write(raw.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            crashpoint("outbox_before_eml_rename")
            os.replace(temporary, target)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise TransientSmtpError(f"cannot write to {self.folder}: {exc.strerror}", connection=True) from exc
        return f"written to {target}"

    def accepted(self, message_ids: set[str]) -> set[str]:
        return {m for m in message_ids if (self.folder / _eml_name(m)).exists()}


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class SmtpTransport(Transport):
    """One SMTP connection, reused for a run's messages and reopened after an error. STARTTLS or implicit
    TLS with the system's trusted CAs (or the given context), and a login when a user is configured."""

    def __init__(
        self, settings: SmtpSettings, journal: Journal, password: str | None, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.settings = settings
        self.journal = journal
        self._password = password
        self._ssl_context = ssl_context
        self._smtp: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        context = self._ssl_context or ssl.create_default_context()
        smtp: smtplib.SMTP
        try:
            if s.security == "tls":
                smtp = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_seconds, context=context)
            else:
                smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
            smtp.ehlo()
            if s.security == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
            if s.user:
                if self._password is None:
                    smtp.close()
                    raise TransientSmtpError(
                        f"smtp.user is {s.user!r} but no password: set RECHARGED_SMTP_PASSWORD or the credential "
                        "smtp_password",
                        connection=True,
                    )
                smtp.login(s.user, self._password)
        except smtplib.SMTPNotSupportedError as exc:
            raise TransientSmtpError(f"{s.host}:{s.port}: {exc}", connection=True) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise TransientSmtpError(f"{s.host}:{s.port}: {_describe(exc)}", connection=True) from exc
        return smtp

    def deliver(self, message_id: str, sender: str, recipient: str, raw: str) -> str:
        if self._smtp is None:
            self._smtp = self._connect()
        smtp = self._smtp
        data = raw.encode("utf-8")
        options = ["SMTPUTF8"] if not raw.isascii() or not recipient.isascii() else []
        try:
            code, answer = smtp.mail(sender, options)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, answer, sender)
            code, answer = smtp.rcpt(recipient)
            if code not in (250, 251):
                raise smtplib.SMTPRecipientsRefused({recipient: (code, answer)})
            crashpoint("outbox_before_data")
            code, answer = smtp.data(data)
            if code != 250:
                raise smtplib.SMTPDataError(code, answer)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPResponseException) as exc:
            self._reset()
            code, text = _code_of(exc)
            if 400 <= code < 500:
                raise TransientSmtpError(f"{code} {text}", connection=False) from exc
            raise PermanentSmtpError(f"{code} {text}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise TransientSmtpError(_describe(exc), connection=True) from exc
        # Accepted. The journal line is the proof a restart relies on: write it before anything else can fail.
        self.journal.record(message_id)
        crashpoint("outbox_after_journal")
        return f"{code} {answer.decode('utf-8', 'replace')}"

    def accepted(self, message_ids: set[str]) -> set[str]:
        return message_ids & self.journal.accepted()

    def _reset(self) -> None:
        try:
            if self._smtp is not None:
                self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                self._smtp.close()
            self._smtp = None


def _code_of(exc: Exception) -> tuple[int, str]:
    answer: bytes | str
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, answer = next(iter(exc.recipients.values()))
    else:
        assert isinstance(exc, smtplib.SMTPResponseException)
        code, answer = exc.smtp_code, exc.smtp_error
    return int(code), answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        code, text = _code_of(exc)
        return f"{code} {text}"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
