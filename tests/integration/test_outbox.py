"""The outbox and its sender against a real SMTP server on loopback (aiosmtpd), on SQLite and PostgreSQL: what
the server receives, retries, permanent failures, an unreachable server, the .eml folder, and `kill -9` of the
sender at every step between claiming a message and recording it as sent: never twice, never lost."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import ssl
import subprocess
import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from tenacity import wait_none

from recharged.clock import FixedClock
from recharged.mail.admin import outbox_health, outbox_problems, retry_failed
from recharged.mail.outbox import OutboxSender, enqueue
from recharged.store.engine import Database
from recharged.store.models import OutboxMessage
from tests.helpers import add_account, mail_settings
from tests.smtp_server import SmtpTestServer

FORK = multiprocessing.get_context("fork")  # the child talks SMTP to the server thread living in the parent


def queue(db, clock, count: int = 1, account: str = "acme", to: str | None = None) -> list[int]:
    """Put `count` low-balance notices in the outbox; returns their ids."""
    with db.transaction() as s:
        for i in range(count):
            enqueue(
                s,
                key=f"test:{account}:{i}",
                kind="balance_low",
                to=to or f"billing@{account}.example",
                context={
                    "account": {"id": account, "email": to or f"billing@{account}.example"},
                    "currency": "USD",
                    "at": clock.now().isoformat(),
                    "balance": 123_456 + i,
                    "threshold": 4_200_000,
                    "average_daily": 600_000,
                    "runway_days": "0.2",
                },
                at=clock.now(),
                account_id=account,
            )
        return list(s.scalars(select(OutboxMessage.id).where(OutboxMessage.key.like("test:%")).order_by("id")))


def rows(db) -> list[OutboxMessage]:
    with db.transaction() as s:
        return list(s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def health(db) -> dict:
    with db.transaction() as s:
        return outbox_health(s)


@pytest.fixture
def account(db, settings, clock):
    add_account(db, settings, clock)


def sender(db, settings, clock, **kwargs) -> OutboxSender:
    return OutboxSender(db, settings, clock, wait=wait_none(), **kwargs)


def test_a_message_reaches_the_server_with_its_headers_and_both_parts(db, clock, account, smtp_server, tmp_path):
    settings = mail_settings(tmp_path, smtp_server, RECHARGED_SMTP__REPLY_TO="help@dialer.example")
    [message_id] = queue(db, clock)
    report = sender(db, settings, clock).send_pending()
    assert (report.sent, report.failed, report.error) == ([message_id], [], None)
    [received] = smtp_server.received
    assert (received.mail_from, received.rcpt_tos) == ("billing@dialer.example", ["billing@acme.example"])
    headers = received.message
    assert headers["Message-ID"] == "<recharged.test.acme.0@dialer.example>"
    assert str(headers["From"]) == "Dialer Co Ltd <billing@dialer.example>"
    assert (headers["To"], headers["Reply-To"]) == ("billing@acme.example", "help@dialer.example")
    assert headers["Subject"] == "Low balance on account acme: $1.23"
    assert headers["Auto-Submitted"] == "auto-generated"
    assert "The balance of account acme is $1.23, about 0.2 days" in received.part("plain")
    assert "<strong>$1.23</strong>" in received.part("html")
    [row] = rows(db)
    assert (row.status, row.attempts, row.message_id, row.sent_at) == ("sent", 1, headers["Message-ID"], clock.now())
    assert sender(db, settings, clock).send_pending().sent == []  # nothing twice
    assert len(smtp_server.received) == 1
    assert health(db) | {"oldest_pending_at": None} == {
        "pending": 0,
        "sending": 0,
        "failed": 0,
        "oldest_pending_at": None,
        "last_attempt_at": clock.now().isoformat(),
        "last_outcome": "sent",
    }


def test_without_an_smtp_host_messages_become_eml_files(db, clock, account, tmp_path):
    settings = mail_settings(tmp_path)
    ids = queue(db, clock, 2)
    assert sender(db, settings, clock).send_pending().sent == ids
    files = sorted((tmp_path / "eml").glob("*.eml"))
    assert [f.name for f in files] == [
        "recharged.test.acme.0@dialer.example.eml",
        "recharged.test.acme.1@dialer.example.eml",
    ]
    assert b"Subject: Low balance on account acme: $1.23" in files[0].read_bytes()
    assert not (tmp_path / "outbox.journal").exists()  # the files are their own evidence


def test_a_transient_4xx_is_retried_at_once_and_sent(db, clock, account, smtp_server, tmp_path):
    settings = mail_settings(tmp_path, smtp_server)
    [message_id] = queue(db, clock)
    smtp_server.refuse("451 4.3.0 try again later", at="RCPT", times=2)
    assert sender(db, settings, clock).send_pending().sent == [message_id]
    assert len(smtp_server.received) == 1
    assert rows(db)[0].attempts == 1  # one delivery run; the inline retries are within it


def test_a_server_that_keeps_answering_4xx_is_tried_on_schedule_then_given_up(
    db, clock, account, smtp_server, tmp_path
):
    settings = mail_settings(tmp_path, smtp_server, RECHARGED_OUTBOX__MAX_RETRIES="0")
    settings = settings.model_copy(update={"outbox": settings.outbox.model_copy(update={"retry_after_minutes": [5]})})
    [message_id] = queue(db, clock)
    smtp_server.refuse("452 4.2.2 mailbox full", times=2)
    first = sender(db, settings, clock).send_pending()
    assert first.retrying == [message_id]
    [row] = rows(db)
    assert (row.status, row.next_attempt_at, row.last_error) == (
        "pending",
        clock.now() + timedelta(minutes=5),
        "452 4.2.2 mailbox full",
    )
    assert sender(db, settings, clock).send_pending().retrying == []  # not due yet
    clock.advance(timedelta(minutes=5))
    assert sender(db, settings, clock).send_pending().failed == [message_id]
    assert rows(db)[0].last_error == "gave up after 2 attempts: 452 4.2.2 mailbox full"
    assert health(db)["failed"] == 1
    assert smtp_server.received == []
    assert retry_failed(db, clock) == 1  # an admin fixed it: queued again, delivered
    assert sender(db, settings, clock).send_pending().sent == [message_id]


def test_a_permanent_5xx_fails_at_once_and_is_visible(db, clock, account, smtp_server, tmp_path):
    settings = mail_settings(tmp_path, smtp_server)
    bad, good = queue(db, clock, 2)
    smtp_server.refuse("550 5.1.1 no such user", at="RCPT")
    report = sender(db, settings, clock).send_pending()
    assert (report.failed, report.sent, report.ok) == ([bad], [good], False)
    assert rows(db)[0].last_error == "refused: 550 5.1.1 no such user"
    status = health(db)
    assert (status["failed"], status["pending"]) == (1, 0)
    assert len(smtp_server.received) == 1


def test_an_unreachable_server_leaves_messages_pending_and_never_fails_them(db, clock, account, tmp_path):
    with SmtpTestServer() as gone:
        pass  # a port nothing listens on any more
    settings = mail_settings(tmp_path, gone)
    ids = queue(db, clock, 3)
    report = sender(db, settings, clock).send_pending()
    assert report.error is not None
    assert "mail server unreachable" in report.error
    assert report.sent == report.failed == []
    assert [r.status for r in rows(db)] == ["pending"] * 3  # the run stopped after the first message
    assert health(db)["pending"] == 3
    assert health(db)["last_outcome"].startswith("will retry: 127.0.0.1:")
    assert rows(db)[0].next_attempt_at == clock.now() + timedelta(minutes=1)
    assert len(ids) == 3


def test_a_broken_template_fails_the_message_not_the_transaction(db, clock, account, smtp_server, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "balance_low.txt").write_text("{% block subject %}{{ nope.nothing }}{% endblock %}")
    settings = mail_settings(tmp_path, smtp_server, RECHARGED_OUTBOX__TEMPLATES_DIR=str(templates))
    [message_id] = queue(db, clock)
    assert sender(db, settings, clock).send_pending().failed == [message_id]
    assert rows(db)[0].last_error.startswith("cannot render: template balance_low")
    (templates / "balance_low.txt").unlink()  # fixed
    retry_failed(db, clock, [message_id])
    assert sender(db, settings, clock).send_pending().sent == [message_id]


def test_two_senders_at_once_send_each_message_once(db, clock, account, smtp_server, tmp_path):
    settings = mail_settings(tmp_path, smtp_server)
    ids = queue(db, clock, 12)
    reports = []
    threads = [
        threading.Thread(target=lambda: reports.append(sender(db, settings, clock).send_pending())) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(reports[0].sent + reports[1].sent) == ids
    assert set(smtp_server.message_ids().values()) == {1}
    assert len(smtp_server.received) == 12


# --- TLS and login ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl), and a client context that trusts it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_login_over_starttls_or_implicit_tls(db, clock, account, tmp_path, certificate, security, monkeypatch):
    server_context, client_context = certificate
    tls = {"starttls": server_context} if security == "starttls" else {"implicit_tls": server_context}
    monkeypatch.setenv("RECHARGED_SMTP_PASSWORD", "s3cret")
    with SmtpTestServer(login=("mailer", "s3cret"), **tls) as server:
        settings = mail_settings(tmp_path, server, RECHARGED_SMTP__SECURITY=security, RECHARGED_SMTP__USER="mailer")
        [message_id] = queue(db, clock)
        report = sender(db, settings, clock, ssl_context=client_context).send_pending()
        assert report.sent == [message_id], report.error
        assert server.logins == ["mailer"]
        assert len(server.received) == 1


def test_a_wrong_password_keeps_the_message_pending(db, clock, account, tmp_path, certificate, monkeypatch):
    server_context, client_context = certificate
    monkeypatch.setenv("RECHARGED_SMTP_PASSWORD", "wrong")
    with SmtpTestServer(login=("mailer", "s3cret"), starttls=server_context) as server:
        settings = mail_settings(tmp_path, server, RECHARGED_SMTP__SECURITY="starttls", RECHARGED_SMTP__USER="mailer")
        queue(db, clock)
        report = sender(db, settings, clock, ssl_context=client_context).send_pending()
        assert "535" in (report.error or "")
        assert rows(db)[0].status == "pending"
        assert server.received == []


# --- kill -9 between claiming and recording ---------------------------------------------------------------------


def _sender_child(url: str, settings, at: str, crash_at: str) -> None:
    os.environ["RECHARGED_CRASH_AT"] = crash_at
    database = Database(url)  # never an engine inherited across fork
    OutboxSender(database, settings, FixedClock(datetime.fromisoformat(at)), wait=wait_none()).send_pending()
    database.close()


def kill_sender_at(db_url: str, settings, clock: FixedClock, point: str) -> None:
    child = FORK.Process(target=_sender_child, args=(db_url, settings, clock.now().isoformat(), point))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL, f"the sender was not killed at {point} (exit {child.exitcode})"


@pytest.mark.parametrize(
    ("point", "accepted_before_the_crash"),
    [
        ("outbox_after_claim", False),  # claimed and leased, nothing sent yet
        ("outbox_before_data", False),  # MAIL and RCPT done, DATA never sent: the server did not accept it
        ("outbox_after_journal", True),  # the server answered 250 and the journal has it; the database does not
        ("outbox_before_commit", True),  # the same, just before the commit
    ],
)
def test_a_sender_killed_between_the_answer_and_the_commit_sends_nothing_twice_and_loses_nothing(
    db, db_url, clock, account, smtp_server, tmp_path, point, accepted_before_the_crash
):
    settings = mail_settings(tmp_path, smtp_server)
    ids = queue(db, clock, 3)
    kill_sender_at(db_url, settings, clock, f"{point}:2")  # dies on the second message
    assert len(smtp_server.received) == 1 + accepted_before_the_crash
    assert [r.status for r in rows(db)] == ["sent", "sending", "pending"]

    assert sender(db, settings, clock).send_pending().sent == [ids[2]]  # the lease still holds the second one
    clock.advance(timedelta(seconds=settings.outbox.lease_seconds + 1))  # the dead sender's lease runs out
    report = sender(db, settings, clock).send_pending()
    if accepted_before_the_crash:
        assert (report.recovered, report.sent) == ([ids[1]], [])
    else:
        assert (report.recovered, report.sent) == ([], [ids[1]])
    assert [r.status for r in rows(db)] == ["sent"] * 3
    received = smtp_server.message_ids()
    assert sorted(received) == sorted(r.message_id for r in rows(db))
    assert set(received.values()) == {1}, f"sent twice: {received}"
    with db.transaction() as s:
        assert outbox_problems(s) == []
    assert not (tmp_path / "outbox.journal").read_text()  # compacted: everything in it is recorded as sent


@pytest.mark.parametrize("point", ["outbox_before_eml_rename", "outbox_before_commit"])
def test_a_sender_killed_while_writing_eml_files_writes_each_once(db, db_url, clock, account, tmp_path, point):
    settings = mail_settings(tmp_path)
    queue(db, clock, 2)
    kill_sender_at(db_url, settings, clock, f"{point}:1")
    clock.advance(timedelta(seconds=settings.outbox.lease_seconds + 1))
    sender(db, settings, clock).send_pending()
    assert [r.status for r in rows(db)] == ["sent", "sent"]
    assert len(list((tmp_path / "eml").glob("*.eml"))) == 2
