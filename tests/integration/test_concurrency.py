"""Several processes recording usage into the same accounts at once lose no update (PostgreSQL)."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import pytest
from sqlalchemy import select

from recharged.clock import FixedClock
from recharged.config import load_settings
from recharged.store.engine import Database
from recharged.store.models import Account
from recharged.usage import UsageRecorder
from recharged.verify import verify
from tests.helpers import NOW, add_account, call

ACCOUNTS = ["a1", "a2", "a3"]


def _worker(url: str, worker: int, rounds: int) -> None:
    db = Database(url)
    recorder = UsageRecorder(db, load_settings(None, environ={}), FixedClock(NOW))
    for r in range(rounds):
        batch = []
        for account in ACCOUNTS:
            batch.append(call(f"w{worker}-r{r}-{account}", account=account, seconds=60))
            batch.append(call(f"shared-r{r}-{account}", account=account, seconds=60))  # every worker sends this
        recorder.record(batch)
    db.close()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite serializes writers (BEGIN IMMEDIATE)
def test_concurrent_writers_lose_no_update(db_url, settings, clock):
    db = Database(db_url)
    for account in ACCOUNTS:
        add_account(db, settings, clock, account)
    workers, rounds = 4, 25
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(db_url, w, rounds)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    with db.transaction() as s:
        balances = {row.id: row.balance for row in s.execute(select(Account.id, Account.balance))}
    # per account: each worker's own call each round, plus the shared call once per round; $0.02 each
    expected = -(workers * rounds + rounds) * 2_000
    assert balances == dict.fromkeys(ACCOUNTS, expected)
    assert verify(db).ok
    db.close()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_an_account_closed_while_a_batch_waits_for_its_lock_bills_only_what_came_before(db_url, settings, clock):
    """On PostgreSQL a batch rates its events from the accounts as it first reads them, unlocked, writes its
    entries, then locks the accounts for their balances: an account closed in between (here by a transaction that
    holds its row meanwhile) undoes the batch, which is written again with the account as it is once locked, so the
    call that started after the closing is not billed."""
    import threading
    import time

    from sqlalchemy import text

    from recharged.store.ledger import lock_account

    db = Database(db_url)
    add_account(db, settings, clock, "acme")
    closing = NOW - timedelta(minutes=30)
    recorder = UsageRecorder(db, settings, clock)
    other = Database(db_url)
    outcomes: list = []
    with other.transaction() as session:
        lock_account(session, "acme")
        session.execute(
            text("UPDATE accounts SET closed_at = :at, closed_reason = 'moved away' WHERE id = 'acme'"), {"at": closing}
        )
        batch = [
            call("before", seconds=60, at=(closing - timedelta(minutes=5)).isoformat()),
            call("after", seconds=60, at=(closing + timedelta(minutes=5)).isoformat()),
        ]
        worker = threading.Thread(target=lambda: outcomes.extend(recorder.record(batch)))
        worker.start()
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FOR NO KEY UPDATE'"
        )
        deadline = time.monotonic() + 30
        with other.engine.connect() as watcher:  # outside the transaction: pg_stat_activity is read afresh
            while watcher.exec_driver_sql(waiting.replace("%", "%%")).scalar() == 0:  # the batch waits for acme
                watcher.rollback()
                assert worker.is_alive(), outcomes
                assert time.monotonic() < deadline
                time.sleep(0.02)
    worker.join(30)
    assert [(o.event_id, o.status) for o in outcomes] == [("before", "accepted"), ("after", "rejected")]
    assert "was closed" in outcomes[1].reason
    with db.transaction() as session:
        assert session.get(Account, "acme").balance == -2_000  # one minute at $0.02
    assert verify(db).ok
    other.close()
    db.close()
