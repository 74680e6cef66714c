"""What recharged's logs look like once rendered: JSON lines, journald priorities, redaction, library loggers."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from recharged.config import LoggingSettings
from recharged.logs import configure


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test configures logging its own way; put back what was there before."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = {name: logging.getLogger(name).level for name in ("recharged", "stripe")}
    configured, config = structlog.is_configured(), structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in ours.items():
        logging.getLogger(name).setLevel(old)
    if configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()


def json_logs(level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    configure(LoggingSettings(level=level, format="json"), stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def one_line(stream: io.StringIO) -> dict[str, Any]:
    [line] = lines(stream)
    return line


def test_json_line_has_event_level_logger_and_utc_timestamp() -> None:
    stream = json_logs()
    structlog.get_logger("recharged.recharge").info("charge", account="acme", amount="12.00000")
    line = one_line(stream)
    assert line["event"] == "charge"
    assert (line["account"], line["amount"]) == ("acme", "12.00000")
    assert (line["level"], line["logger"]) == ("info", "recharged.recharge")
    assert line["timestamp"].endswith("Z")


def journal_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> io.TextIOWrapper:
    """A real file standing in for the journal's stream: $JOURNAL_STREAM names its device and inode."""
    handle = (tmp_path / "journal").open("w+", encoding="utf-8")
    stat = os.fstat(handle.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    return handle


@pytest.mark.parametrize("log_format", ["auto", "json"])
def test_journald_lines_start_with_their_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_format: str
) -> None:
    with journal_file(tmp_path, monkeypatch) as journal:
        configure(LoggingSettings(level="debug", format=log_format), stream=journal)
        log = structlog.get_logger("recharged.daemon")
        log.error("database unreachable")
        log.warning("cycle late")
        log.info("cycle finished")
        log.debug("claimed")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("job failed")
        logging.getLogger("apscheduler.scheduler").warning("missed run")
        journal.seek(0)
        rendered = journal.read().splitlines()
    prefixes = [line[:3] for line in rendered if line.startswith("<")]
    assert prefixes == ["<3>", "<4>", "<6>", "<7>", "<3>", "<4>"]
    first = json.loads(rendered[0][3:])
    assert (first["event"], first["level"]) == ("database unreachable", "error")


def test_no_priority_prefix_when_stderr_is_not_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with journal_file(tmp_path, monkeypatch), (tmp_path / "other").open("w+", encoding="utf-8") as other:
        configure(LoggingSettings(format="json"), stream=other)
        structlog.get_logger("recharged.daemon").warning("cycle late")
        other.seek(0)
        assert json.loads(other.read())["event"] == "cycle late"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("key sk_live_51HqLyjWDarjtT1zdp7dcXm2 rejected", "key sk_live_[redacted] rejected"),
        ("key sk_test_4eC39HqLyjWDarjtT1zdp7dc", "key sk_test_[redacted]"),
        ("restricted rk_live_51HqLyjWDarjtT1zd", "restricted rk_live_[redacted]"),
        ("bad signature for whsec_5a3b9f00e1c2d3", "bad signature for whsec_[redacted]"),
        ("card 4242424242424242 declined", "card [card ****4242] declined"),
        ("card 4000 0566 5566 5556 declined", "card [card ****5556] declined"),
        ("amex 3782-822463-10005", "amex [card ****0005]"),
        ("order 1234567890123456 kept", "order 1234567890123456 kept"),  # not Luhn-valid: not a card
        ("receipt sent to jane.doe@acme-law.example", "receipt sent to j***@acme-law.example"),
        ("idempotency key rc-17-1-a1b2c3", "idempotency key rc-17-1-a1b2c3"),
    ],
)
def test_redaction_in_messages(text: str, shown: str) -> None:
    stream = json_logs()
    structlog.get_logger("recharged.recharge").info(text)
    assert one_line(stream)["event"] == shown


def test_redaction_by_key_and_in_nested_values() -> None:
    stream = json_logs()
    structlog.get_logger("recharged.http").info(
        "request",
        authorization="Bearer abc.def",
        api_tokens=["t1", "t2"],
        stripe_webhook_secret="whsec_x",
        idempotency_key="rc-17-1-a1b2c3",
        payload={
            "customer": {"email": "bob@example.org", "smtp_password": "hunter2"},
            "cards": ["4242 4242 4242 4242", {"number": "5555555555554444", "cvc": "123"}],
            "notes": ("key sk_live_abcdefgh",),
        },
    )
    line = one_line(stream)
    assert line["authorization"] == line["api_tokens"] == line["stripe_webhook_secret"] == "[redacted]"
    assert line["idempotency_key"] == "rc-17-1-a1b2c3"
    assert line["payload"] == {
        "customer": {"email": "b***@example.org", "smtp_password": "[redacted]"},
        "cards": ["[card ****4242]", {"number": "[card ****4444]", "cvc": "[redacted]"}],
        "notes": ["key sk_live_[redacted]"],
    }
    assert "hunter2" not in stream.getvalue()
    assert "abc.def" not in stream.getvalue()


def test_message_ids_and_eml_files_stay_readable_and_addresses_are_still_masked() -> None:
    """Issue 13 item 13: Message-IDs and .eml names were masked as if they were addresses (`<r***@example.com>`),
    so a receipt could not be followed through the logs."""
    stream = json_logs()
    structlog.get_logger("recharged.mail.outbox").info(
        "outbox.sent",
        message_id="<receipt-42.abc@recharged.example>",
        answer="written to outbox/recharged.receipt.R-000042@recharged.example.eml",
        to="alice@example.com",
        error="550 5.1.1 <alice@example.com>: Recipient address rejected",
    )
    structlog.get_logger("recharged.mail.outbox").info(
        "resent Message-ID: <receipt-42.abc@recharged.example> to alice@example.com as receipt-42.abc@recharged.EML"
    )
    sent, resent = lines(stream)
    assert sent["message_id"] == "<receipt-42.abc@recharged.example>"
    assert sent["answer"] == "written to outbox/recharged.receipt.R-000042@recharged.example.eml"
    assert sent["to"] == "a***@example.com"
    assert sent["error"] == "550 5.1.1 <a***@example.com>: Recipient address rejected"
    assert resent["event"] == (
        "resent Message-ID: <receipt-42.abc@recharged.example> to a***@example.com as receipt-42.abc@recharged.EML"
    )
    assert "alice@" not in stream.getvalue()


def test_redaction_in_exception_text() -> None:
    stream = json_logs()
    log = structlog.get_logger("recharged.payments")
    try:
        raise ValueError("Stripe said no to sk_live_abcdefgh for card 4242424242424242, owner ann@example.com")
    except ValueError as exc:
        log.exception("charge failed", error=exc)
    line = one_line(stream)
    expected = "Stripe said no to sk_live_[redacted] for card [card ****4242], owner a***@example.com"
    assert line["error"] == f"ValueError: {expected}"
    assert line["exception"].splitlines()[-1] == f"ValueError: {expected}"
    assert "abcdefgh" not in stream.getvalue()
    assert "ann@" not in stream.getvalue()


def test_other_values_are_rendered_as_text_and_redacted() -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    class Customer:
        def __str__(self) -> str:
            return "Customer(carol@example.net)"

    stream = json_logs()
    structlog.get_logger("recharged.recharge").info(
        "x", amount=Decimal("12.50000"), at=datetime(2026, 11, 22, 12, tzinfo=UTC), who=Customer()
    )
    line = one_line(stream)
    assert (line["amount"], line["at"], line["who"]) == (
        "12.50000",
        "2026-11-22T12:00:00+00:00",
        "Customer(c***@example.net)",
    )


def test_standard_library_loggers_come_out_as_redacted_json() -> None:
    stream = json_logs()
    logging.getLogger("uvicorn.error").warning("client %s sent a bad request", "dave@example.com")
    try:
        raise ConnectionError("lost connection while charging 4242424242424242")
    except ConnectionError:
        logging.getLogger("apscheduler.executors.default").exception("Job raised an exception")
    warning, error = lines(stream)
    assert warning["event"] == "client d***@example.com sent a bad request"
    assert (warning["logger"], warning["level"]) == ("uvicorn.error", "warning")
    assert (error["logger"], error["level"]) == ("apscheduler.executors.default", "error")
    assert error["exception"].splitlines()[-1] == "ConnectionError: lost connection while charging [card ****4242]"


def test_libraries_log_warnings_only_while_recharged_logs_at_its_level() -> None:
    stream = json_logs("debug")
    logging.getLogger("apscheduler.executors.default").info("Running job")
    logging.getLogger("uvicorn.access").info("GET /healthz 200")
    structlog.get_logger("recharged.scheduler").debug("next run")
    assert [line["event"] for line in lines(stream)] == ["next run"]


def test_stripe_sdk_stays_quiet_whatever_the_level_and_stripe_log(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import stripe
    from stripe import _util

    monkeypatch.setattr(stripe, "log", "debug")
    monkeypatch.setattr(_util, "STRIPE_LOG", "debug")  # what STRIPE_LOG=debug in the environment sets at import
    configure(LoggingSettings(level="debug", format="json"))
    _util.log_info("Request to Stripe api", method="post", path="/v1/payment_intents")
    _util.log_debug("Post details", post_data="amount=1200&customer=cus_123")
    assert capsys.readouterr().err == ""
    assert logging.getLogger("stripe").getEffectiveLevel() == logging.WARNING
    logging.getLogger("stripe").warning("retrying request")
    assert json.loads(capsys.readouterr().err)["event"] == "retrying request"


def test_console_format_is_readable_and_redacted() -> None:
    stream = io.StringIO()
    configure(LoggingSettings(format="console"), stream=stream)
    structlog.get_logger("recharged.cli").info("account created", email="erin@example.com")
    rendered = stream.getvalue()
    assert rendered.startswith("20")
    assert "[info" in rendered
    assert "account created" in rendered
    assert "email=e***@example.com" in rendered
    with pytest.raises(json.JSONDecodeError):
        json.loads(rendered)


def test_auto_format_is_json_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure(LoggingSettings(format="auto"), stream=stream)
    structlog.get_logger("recharged.cli").info("hello")
    assert one_line(stream)["event"] == "hello"


def test_configure_again_changes_the_level_without_duplicating_lines() -> None:
    stream = json_logs("info")
    log = structlog.get_logger("recharged.daemon")
    log.debug("hidden")
    log.info("first")
    configure(LoggingSettings(level="debug", format="json"), stream=stream)
    log.debug("shown after reload")
    configure(LoggingSettings(level="warning", format="json"), stream=stream)
    log.info("hidden again")
    log.warning("last")
    assert [line["event"] for line in lines(stream)] == ["first", "shown after reload", "last"]


def test_default_stream_follows_the_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LoggingSettings(format="json"))
    structlog.get_logger("recharged.daemon").warning("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "to stderr"
