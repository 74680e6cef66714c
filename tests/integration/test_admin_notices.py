"""Notices of admin changes are coalesced (issue 14 item 5): the first change of an account queues its notice to be
sent `[outbox] admin_notice_delay_minutes` later; the changes made before then join that message (each setting
from its value before the first change to its value now, oldest first), a setting changed back drops out, and a
message left with nothing to say is withdrawn. And `outbox cancel`: mail not sent yet can be cancelled, signed and
audited; mail sent or being sent cannot. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from tenacity import wait_none

from recharged.accounts import change_account, parse_actor
from recharged.errors import ConflictError, InputError, NotFoundError
from recharged.funding import add_source, remove_source
from recharged.mail.admin import cancel_message, list_messages, outbox_health, retry_failed
from recharged.mail.outbox import OutboxSender
from recharged.mail.templating import render
from recharged.payments import CardInfo
from recharged.states import OutboxStatus
from recharged.store.models import AuditRecord, OutboxMessage
from tests.helpers import add_account, mail_settings

ACTOR = "Jane Doe"
WINDOW = timedelta(minutes=10)
VISA = CardInfo("cus_1", "pm_1", "visa", "4242", 12, 2030)


@pytest.fixture
def mail(tmp_path):
    return mail_settings(tmp_path)


@pytest.fixture
def acme(db, mail, clock):
    add_account(db, mail, clock)


def messages(db) -> list[OutboxMessage]:
    with db.reading() as s:
        return list(s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def text_of(settings, message: OutboxMessage) -> str:
    rendered = render(settings, message.kind, message.context)
    return rendered.subject + "\n" + " ".join(rendered.text.split())


def change(db, mail, clock, actor: str = ACTOR, **overrides: str):
    auto = overrides.pop("auto_recharge", None)
    return change_account(
        db, "acme", actor=actor, clock=clock, settings=mail, auto_recharge=auto, overrides=overrides or None
    )


def test_changes_within_the_window_join_one_message_sent_when_the_window_ends(db, mail, clock, acme):
    first = clock.now()
    change(db, mail, clock, auto_recharge=True)
    clock.advance(timedelta(minutes=3))
    change(db, mail, clock, threshold_days="5")
    clock.advance(timedelta(minutes=4))
    add_source(db, "acme", VISA, actor="John Smith", clock=clock)
    change(db, mail, clock, actor="John Smith", threshold_days="4", max_recharge="250")
    [message] = messages(db)
    assert (message.status, message.created_at, message.next_attempt_at) == ("pending", first, first + WINDOW)

    sender = OutboxSender(db, mail, clock, wait=wait_none())
    assert sender.send_pending().sent == []  # 7 minutes in: not due
    text = text_of(mail, message)
    assert text.startswith("Your automatic recharge settings and cards on file for account acme changed\n")
    assert (
        "Jane Doe and John Smith changed the automatic recharge settings and cards on file of account acme between "
        f"{first:%d %b %Y, %H:%M} UTC and {clock.now():%d %b %Y, %H:%M} UTC:"
    ) in text
    assert (
        "- Automatic recharge: off -> on "
        "- Minimum reserve, in days of usage: standard setting -> 4 "
        "- Card added: - -> Visa ending in 4242 (your default card) "
        "- Largest single recharge: standard setting -> $250.00"
    ) in text

    clock.advance(timedelta(minutes=3))
    assert sender.send_pending().sent == [message.id]
    change(db, mail, clock, threshold_days="3")  # after the window: a message of its own
    assert [(m.status, m.next_attempt_at) for m in messages(db)] == [
        ("sent", first + WINDOW),
        ("pending", clock.now() + WINDOW),
    ]


def test_a_change_undone_within_the_window_sends_nothing_and_the_audit_keeps_both(db, mail, clock, acme):
    change(db, mail, clock, threshold_days="5", max_recharge="250")
    clock.advance(timedelta(minutes=2))
    change(db, mail, clock, actor="John Smith", threshold_days="default")
    [message] = messages(db)
    text = text_of(mail, message)
    assert "- Largest single recharge: standard setting -> $250.00" in text
    assert "Minimum reserve" not in text  # back where it was: nothing to tell of it
    assert "John Smith" not in text  # nor of who put it back

    change(db, mail, clock, max_recharge="default")
    assert messages(db) == []  # nothing changed overall: no email
    with db.reading() as s:
        assert len(s.scalars(select(AuditRecord).where(AuditRecord.action == "auto_recharge.changed")).all()) == 3


def test_a_message_already_claimed_by_the_sender_is_never_changed(db, mail, clock, acme):
    change(db, mail, clock, threshold_days="5")
    [message] = messages(db)
    with db.transaction() as s:  # a sender took it (its bytes are fixed) and the server answered 4xx
        s.execute(update(OutboxMessage).values(raw="fixed bytes", attempts=1, next_attempt_at=clock.now()))
    change(db, mail, clock, threshold_days="default")
    first, second = messages(db)
    assert (first.id, first.raw, first.context["changes"][0]["after"]) == (message.id, "fixed bytes", "5")
    assert [c["after"] for c in second.context["changes"]] == ["standard setting"]


def test_each_account_has_its_own_message(db, mail, clock, acme):
    add_account(db, mail, clock, "birch")
    change(db, mail, clock, threshold_days="5")
    change_account(db, "birch", actor=ACTOR, clock=clock, settings=mail, overrides={"threshold_days": "5"})
    assert sorted(m.account_id for m in messages(db)) == ["acme", "birch"]


def test_a_card_removed_at_once_is_told_apart_from_the_change_that_added_it(db, mail, clock, acme):
    """Cards are told as events (added, removed), not netted as settings are: the customer sees both."""
    source = add_source(db, "acme", VISA, actor=ACTOR, clock=clock)
    remove_source(db, "acme", source.id, actor=ACTOR, clock=clock)
    [message] = messages(db)
    assert [c["what"] for c in message.context["changes"]] == ["Card added", "Card removed"]


def test_a_window_of_zero_queues_every_change_at_once(db, clock, acme, tmp_path):
    mail = mail_settings(tmp_path, RECHARGED_OUTBOX__ADMIN_NOTICE_DELAY_MINUTES="0")
    change(db, mail, clock, threshold_days="5")
    change(db, mail, clock, threshold_days="6")
    assert [(m.next_attempt_at, m.context["changes"][0]["after"]) for m in messages(db)] == [
        (clock.now(), "5"),
        (clock.now(), "6"),
    ]


# --- outbox cancel --------------------------------------------------------------------------------------------


def test_a_pending_or_failed_message_is_cancelled_signed_and_audited(db, mail, clock, acme):
    change(db, mail, clock, threshold_days="5")
    add_account(db, mail, clock, "birch")
    change_account(db, "birch", actor=ACTOR, clock=clock, settings=mail, overrides={"threshold_days": "5"})
    pending, failed = messages(db)
    with db.transaction() as s:
        s.execute(
            update(OutboxMessage).where(OutboxMessage.id == failed.id).values(status="failed", last_error="550 no")
        )
    clock.advance(timedelta(minutes=1))
    for message, reason in ((pending, "customer asked by phone"), (failed, "address is gone")):
        cancelled, now = cancel_message(db, clock, message.id, reason=reason, actor=parse_actor("John  Smith"))
        assert (cancelled.status, cancelled.last_error, now) == (
            "cancelled",
            f"cancelled by John Smith: {reason}",
            True,
        )
    again, now = cancel_message(db, clock, pending.id, reason="twice", actor=ACTOR)
    assert (again.last_error, now) == ("cancelled by John Smith: customer asked by phone", False)
    assert [m.status for m in messages(db)] == ["cancelled", "cancelled"]
    assert [m.id for m in list_messages(db, status="cancelled")] == [failed.id, pending.id]
    with db.reading() as s:
        health = outbox_health(s)
        [audit] = s.scalars(
            select(AuditRecord).where(AuditRecord.action == "outbox.cancelled", AuditRecord.account_id == "acme")
        )
    assert (health["pending"], health["failed"]) == (0, 0)  # cancelled is neither waiting nor failed for good
    assert (audit.actor, audit.at, audit.before["status"], audit.after) == (
        "John Smith",
        clock.now(),
        "pending",
        {"status": "cancelled", "reason": "customer asked by phone", "message": pending.id, "key": pending.key},
    )
    assert retry_failed(db, clock) == 0  # `outbox send --retry-failed` never brings a cancelled message back
    assert OutboxSender(db, mail, clock, wait=wait_none()).send_pending(due_only=False).sent == []
    change(db, mail, clock, threshold_days="6")  # the next change is a message of its own
    assert [m.status for m in messages(db)] == ["cancelled", "cancelled", "pending"]


@pytest.mark.parametrize("status", [OutboxStatus.SENT, OutboxStatus.SENDING])
def test_a_message_sent_or_being_sent_is_not_cancelled(db, mail, clock, acme, status):
    change(db, mail, clock, threshold_days="5")
    [message] = messages(db)
    with db.transaction() as s:
        s.execute(update(OutboxMessage).values(status=status, lease_until=clock.now() + WINDOW, raw="bytes"))
    with pytest.raises(
        ConflictError, match=f"outbox message {message.id} was {'sent' if status == 'sent' else 'being sent'}"
    ):
        cancel_message(db, clock, message.id, reason="too late", actor=ACTOR)
    assert [m.status for m in messages(db)] == [status]
    with db.reading() as s:
        assert s.scalars(select(AuditRecord).where(AuditRecord.action == "outbox.cancelled")).all() == []


def test_cancelling_needs_a_known_message_and_a_reason(db, mail, clock, acme):
    with pytest.raises(NotFoundError, match="no outbox message 42"):
        cancel_message(db, clock, 42, reason="x", actor=ACTOR)
    change(db, mail, clock, threshold_days="5")
    [message] = messages(db)
    with pytest.raises(InputError, match="--reason"):
        cancel_message(db, clock, message.id, reason="  ", actor=ACTOR)
    assert messages(db)[0].status == "pending"
