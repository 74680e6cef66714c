"""Several processes recording usage into the same accounts at once lose no update (PostgreSQL)."""

from __future__ import annotations

import multiprocessing

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
