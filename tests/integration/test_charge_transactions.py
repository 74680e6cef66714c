"""What one charge asks of the database (issue 17): four transactions, the receipt number taken after every other
write of the credit, a recharge's account locked before the recharge, and a payment kept when its credit fails."""

from __future__ import annotations

import contextlib
import threading
import time

import psycopg
import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError

from recharged.recharge import RechargeService
from recharged.states import AttemptStatus, Phase
from recharged.store.charging import lock_recharge_with
from recharged.store.models import ChargeAttempt, Entry, Receipt, Recharge
from recharged.verify import verify
from tests.helpers import busy_account, commit_fails_once


@pytest.fixture
def service(db, settings, gateway_factory, clock):
    return RechargeService(db, settings, gateway_factory, clock)


@contextlib.contextmanager
def transactions(engine):
    """The statements the engine sends meanwhile, one list per transaction (BEGIN not included)."""
    seen: list[list[str]] = []

    def begin(_conn) -> None:
        seen.append([])

    def statement(_conn, _cursor, sql: str, *_args) -> None:
        if not sql.startswith("BEGIN"):
            seen[-1].append(" ".join(sql.split()))

    event.listen(engine, "begin", begin)
    event.listen(engine, "before_cursor_execute", statement)
    try:
        yield seen
    finally:
        event.remove(engine, "begin", begin)
        event.remove(engine, "before_cursor_execute", statement)


def charge(service, clock):
    claim = service.claim_due("acme", clock.now())
    assert claim.recharge_id is not None
    return service.process(claim.recharge_id, Phase.CLAIMED)


def test_a_charge_takes_four_transactions_and_reads_nothing_again_for_its_report(
    db, settings, service, clock, stripe_client
):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    service.gateway  # noqa: B018 (built outside the count)
    with transactions(db.engine) as seen:
        report = charge(service, clock)
    # claim; attempt stored with its lease; answer recorded and credited with the receipt; finished
    assert len(seen) == 4, seen
    assert (report.phase, report.receipt, report.source) == ("finished", "R-000001", "visa ...4242")
    assert report == service.report(report.recharge_id)  # what a read of the database says
    assert verify(db).ok


def test_the_receipt_number_is_taken_after_every_other_write_of_the_credit(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    with transactions(db.engine) as seen:
        charge(service, clock)
    [credit] = [t for t in seen if any("INSERT INTO entries" in s for s in t)]
    counter = next(n for n, s in enumerate(credit) if "receipt_counters" in s)  # the first receipt makes the row
    before, after = credit[:counter], credit[counter:]
    for write in ("UPDATE charge_attempts", "INSERT INTO entries", "UPDATE accounts", "UPDATE recharges"):
        assert any(s.startswith(write) for s in before), (write, credit)
    # from then on, only what carries the number (the webhook's data reads it back), until the commit
    carriers = ("INSERT INTO receipts", "INSERT INTO outbox", "INSERT INTO webhook_events", "SELECT receipts.number")
    assert [s for s in after if "receipt_counters" not in s and not s.startswith(carriers)] == [], credit


def account_locked(db, account_id: str) -> bool:
    """Whether another transaction holds the account's row (PostgreSQL)."""
    try:
        with db.engine.connect() as probe:
            probe.execute(text("SELECT id FROM accounts WHERE id = :id FOR UPDATE NOWAIT"), {"id": account_id})
            probe.rollback()
    except OperationalError as exc:
        if isinstance(exc.orig, psycopg.errors.LockNotAvailable):
            return True
        raise
    return False


def test_locking_a_recharge_takes_its_account_first(db, settings, service, clock, stripe_client):
    if db.dialect != "postgresql":
        pytest.skip("SQLite has one writer at a time: no row locks")
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    recharge_id = service.claim_due("acme", clock.now()).recharge_id
    with db.engine.connect() as holder:  # holds the recharge's row alone
        holder.execute(text("SELECT id FROM recharges WHERE id = :id FOR UPDATE"), {"id": recharge_id})
        locked: list[int] = []

        def lock() -> None:
            with db.transaction() as session:
                locked.append(lock_recharge_with(session, recharge_id).recharge.id)

        waiting = threading.Thread(target=lock)
        waiting.start()
        deadline = time.monotonic() + 10
        while not account_locked(db, "acme"):  # the waiting transaction holds the account while it waits
            assert time.monotonic() < deadline, "the account was never locked while the recharge was waited for"
            time.sleep(0.01)
        assert locked == []
        holder.rollback()
    waiting.join(10)
    assert locked == [recharge_id]


def test_a_payment_whose_credit_fails_is_kept_paid_and_credited_later_without_asking_the_processor(
    db, settings, service, clock, stripe_client, stripe_server
):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    with commit_fails_once(Receipt) as fired, pytest.raises(RuntimeError, match="went away"):
        charge(service, clock)
    assert fired
    with db.transaction() as s:
        recharge = s.scalars(select(Recharge)).one()
        attempt = s.scalars(select(ChargeAttempt)).one()
        assert (recharge.phase, recharge.lease_until, attempt.status) == ("paid", None, AttemptStatus.SUCCEEDED)
        assert s.scalars(select(Entry).where(Entry.entry_type == "recharge")).all() == []
    asked = len(stripe_server.requests())

    [report] = service.recover()

    assert (report.phase, report.receipt) == ("finished", "R-000001")
    assert len(stripe_server.requests()) == asked
    assert len(stripe_client.intents(status="succeeded")) == 1
    assert verify(db).ok
