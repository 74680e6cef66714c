"""Logging set-up: structlog and the standard library's loggers, rendered one way, redacted, on stderr.

JSON lines in production, readable console output on a terminal. Under systemd, when stderr is the journal
(`$JOURNAL_STREAM`), each line starts with its sd-daemon(3) priority (`<3>` error ... `<7>` debug), so
`journalctl -p warning` works. Every event, from recharged or from a library (uvicorn, APScheduler, ...),
goes through the same redaction: secrets, Stripe keys, card numbers and email addresses never reach the log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from recharged.config import LoggingSettings

# Python's own names for priorities, as sd-daemon(3) defines them.
_PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}

REDACTED = "[redacted]"
_SECRET_KEY = re.compile(
    r"pass(word|wd)|secret|token|api[_-]?key|authorization|cookie|credential|cvc|cvv", re.IGNORECASE
)
_STRIPE_KEY = re.compile(r"(?<![A-Za-z0-9])((?:sk|rk)_(?:live|test)_|whsec_)[A-Za-z0-9*]{4,}")
_CARD_CANDIDATE = re.compile(r"(?<!\d)(?:\d{13,19}|\d{4}(?:[ -]\d{3,6}){2,4})(?!\d)")
_EMAIL = re.compile(r"(?<![\w.%+-])([\w%+-])[\w.%+-]*@((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})")
# Identifiers shaped like addresses stay readable, so that ops can follow a message through the logs: the values
# of keys naming a Message-ID, a Message-ID labelled as one in text ("Message-ID: <...>"), and the .eml files
# named after Message-IDs. An address in angle brackets anywhere else (a mail server's "<ann@example.com>:
# Recipient address rejected") is still an address.
_IDENTIFIER_KEY = re.compile(r"message[_-]?id|msg[_-]?id", re.IGNORECASE)
_MESSAGE_ID_LABEL = re.compile(r"message[-_ ]?id[\"']?\s*[:=]\s*[\"']?<$", re.IGNORECASE)


def configure(settings: LoggingSettings, *, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library's loggers from settings; call again to change them.

    `stream` is where lines go (default: whatever `sys.stderr` is when a line is written). Safe to call on
    every reload: it replaces its own handler and never touches handlers others installed.
    """
    level: int = getattr(logging, settings.level.upper())
    target = sys.stderr if stream is None else stream
    journal = is_journal(target)
    terminal = _isatty(target)
    use_json = settings.format == "json" or (settings.format == "auto" and not terminal)
    renderer: Processor = (
        structlog.processors.JSONRenderer(default=_json_default)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=terminal and not journal)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_common_processors(), structlog.processors.format_exc_info],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact,
            _with_priority(renderer) if journal else renderer,
        ],
    )
    handler = _Handler(stream)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # recharged logs at the level configured; libraries (uvicorn's access log, APScheduler's every job run,
    # alembic, the stripe SDK) only their warnings and errors.
    root.setLevel(max(level, logging.WARNING))
    logging.getLogger("recharged").setLevel(level)
    _quiet_stripe()

    # structlog hands its events to the standard library, so one handler renders and redacts both, and the
    # levels live on the standard library's loggers: cached structlog loggers follow a changed level on reload.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            *_common_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is systemd's journal: `$JOURNAL_STREAM` names its device and inode."""
    env = os.environ if environ is None else environ
    expected = env.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor behind it (a test's capture, StringIO)
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets, Stripe keys, card numbers and email addresses in every value."""
    return {key: _redact_value(key, value) for key, value in event_dict.items()}


def redact_text(text: str, *, addresses: bool = True) -> str:
    """`text` with Stripe keys, card numbers (Luhn-valid runs of 13-19 digits) and email addresses masked, but not
    Message-IDs or .eml file names; `addresses=False` masks no address (for a value that is an identifier)."""
    text = _STRIPE_KEY.sub(lambda m: m.group(1) + REDACTED, text)
    text = _CARD_CANDIDATE.sub(_mask_card, text)
    return _EMAIL.sub(_mask_address, text) if addresses else text


def _mask_address(match: re.Match[str]) -> str:
    domain = match.group(2)
    if domain.lower().endswith(".eml"):  # a file named after a Message-ID: no address is at a domain .eml
        return match.group(0)
    if _MESSAGE_ID_LABEL.search(match.string, max(0, match.start() - 20), match.start()):
        return match.group(0)
    return f"{match.group(1)}***@{domain}"


def _redact_value(key: object, value: Any) -> Any:
    if isinstance(key, str) and _SECRET_KEY.search(key) and value is not None:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value, addresses=not (isinstance(key, str) and _IDENTIFIER_KEY.fullmatch(key)))
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {k: _redact_value(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(None, item) for item in value]
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    # Anything else is rendered as text by the renderer anyway: render it here, where it can be redacted.
    return redact_text(_json_default(value))


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    if not 13 <= len(digits) <= 19 or not _luhn(digits):
        return match.group(0)
    return f"[card ****{digits[-4:]}]"


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _common_processors() -> list[Processor]:
    return [
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _with_priority(renderer: Processor) -> Processor:
    """Prefix each rendered line with its journald priority, `<N>` (sd-daemon(3))."""

    def render(logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        priority = _PRIORITIES.get(str(event_dict.get("level", method)).lower(), 6)
        rendered = renderer(logger, method, event_dict)
        assert isinstance(rendered, str), "the renderer must return text"
        return f"<{priority}>{rendered}"

    return render


def _json_default(value: object) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)  # Decimal amounts as "10.00000", not Decimal('10.00000')


def _quiet_stripe() -> None:
    """The stripe SDK logs request details at info and debug, and prints them when STRIPE_LOG is set: never.
    It reads STRIPE_LOG when it is imported; without it, a later import is quiet already and is not made now
    (it takes a while, and most commands never talk to the processor)."""
    logging.getLogger("stripe").setLevel(logging.WARNING)
    if "stripe" not in sys.modules and not os.environ.get("STRIPE_LOG"):
        return
    import stripe
    from stripe import _util

    stripe.log = None
    _util.STRIPE_LOG = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Handler(logging.StreamHandler[TextIO]):
    """Writes to the stream given, or to whatever `sys.stderr` is at the time (tests and click swap it)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream)
        self._follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow_stderr:
            self.stream = sys.stderr
        super().emit(record)


__all__ = ["REDACTED", "configure", "is_journal", "redact", "redact_text"]
