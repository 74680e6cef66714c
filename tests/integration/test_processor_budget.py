"""`payments.max_requests_per_second` is the whole deployment's (issue 17): instances on one PostgreSQL database take
their requests' slots from one budget in the database, on its clock; on SQLite the one instance paces itself.

The budget's slots are checked where they are taken (store/budget.py), and the pacing where it matters: at the
Stripe-compatible server, which records when each request arrived, while three daemons built as `recharged run`
builds them charge due accounts at once. A budget that cannot be reached fails as a transient error: nothing is
sent, and nothing is held against the card or the customer.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from datetime import datetime, timedelta

import psycopg
import pytest
from sqlalchemy import select, text
from tenacity import wait_none

from recharged.clock import FixedClock
from recharged.config import load_settings
from recharged.daemon.process import Daemon
from recharged.errors import DatabaseError, TransientPaymentError
from recharged.payments import ChargeRequest, RateLimiter, StripeGateway
from recharged.recharge import RechargeService
from recharged.states import AttemptStatus, Phase
from recharged.store.budget import SharedBudget, spacing
from recharged.store.models import ChargeAttempt, Entry, FundingSource, OutboxMessage, Recharge
from recharged.verify import verify
from tests.helpers import busy_account, card_on_file

STRIPE_KEY = "sk_test_recharged"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/recharged"  # nothing listens on port 1: refused at once

FORK = multiprocessing.get_context("fork")  # each instance builds its own engine; the server stays in this process

postgres_only = pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


@pytest.fixture
def budget(db_url):
    taker = SharedBudget(db_url)
    yield taker
    taker.close()


# --- the budget's slots -----------------------------------------------------------------------------------------


@postgres_only
def test_slots_taken_at_once_over_several_connections_are_never_closer_than_the_rate(db_url):
    """Three instances' budgets (a pool of connections each), twelve threads taking slots as fast as they can."""
    rate, threads, each = 50.0, 12, 10
    takers = [SharedBudget(db_url) for _ in range(3)]
    start, slots, lock = threading.Barrier(threads), [], threading.Lock()

    def take(taker: SharedBudget) -> None:
        start.wait(10)
        for _ in range(each):
            slot = taker.take(rate)
            with lock:
                slots.append(slot.at)

    workers = [threading.Thread(target=take, args=(takers[n % 3],)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    for taker in takers:
        taker.close()

    assert len(slots) == threads * each
    slots.sort()
    gaps = [later - earlier for earlier, later in itertools.pairwise(slots)]
    assert min(gaps) >= timedelta(seconds=1 / rate)


@postgres_only
def test_a_missing_row_is_made_again_and_each_request_moves_the_budget_on_by_its_own_rate(db, budget):
    first = budget.take(10)  # no row yet: this request makes it
    assert first.wait == 0
    assert budget.take(10).at - first.at == timedelta(seconds=0.1)
    after_reload = budget.take(50)  # the rate was changed and reloaded: the 1/10 s taken before is kept
    assert after_reload.at - first.at == timedelta(seconds=0.2)
    assert budget.take(50).at - after_reload.at == timedelta(seconds=0.02)  # the new rate from here on

    with db.transaction() as session:
        session.execute(text("DELETE FROM processor_budgets"))  # as a crash of the database loses the UNLOGGED row
    assert budget.take(50).wait == 0


@postgres_only
def test_a_budget_far_ahead_of_the_database_clock_starts_again_from_now(db, budget):
    """Far more slots ahead than requests could wait for: the database's clock was set back. Fewer: a queue."""
    with db.transaction() as session:
        session.execute(text("INSERT INTO processor_budgets VALUES ('stripe', clock_timestamp() + interval '1 hour')"))
    assert budget.take(90).wait == 0

    with db.transaction() as session:  # 2 s at 90/s: 180 requests ahead, a queue to wait for
        session.execute(text("UPDATE processor_budgets SET next_slot = clock_timestamp() + interval '2 seconds'"))
    assert 1.9 < budget.take(90).wait <= 2.0


def test_spacing_rounds_up_to_the_databases_microseconds():
    assert spacing(90) == timedelta(microseconds=11_112)  # 11_111.1 up: never faster than the budget
    assert spacing(20) == timedelta(microseconds=50_000)


# --- when the budget cannot be reached ---------------------------------------------------------------------------


def test_an_unreachable_budget_is_a_transient_error_and_sends_nothing(stripe_server, stripe_client):
    card = card_on_file(stripe_client)
    stripe_server.clear_requests()
    unreachable = SharedBudget(UNREACHABLE)
    rated = RateLimiter(20, shared=lambda rate: unreachable.take(rate).wait)
    gateway = StripeGateway(STRIPE_KEY, api_base=stripe_server.url, max_retries=1, wait=wait_none(), rate_limiter=rated)
    request = ChargeRequest("recharged-budget-test", card.customer, card.payment_method, 1000, "USD", "test", {})

    with pytest.raises(DatabaseError, match="processor budget in postgresql"):
        unreachable.take(20)
    with pytest.raises(TransientPaymentError, match="nothing was sent") as raised:
        gateway.charge(request)
    assert isinstance(raised.value.__cause__, DatabaseError)
    assert stripe_server.requests() == []
    unreachable.close()


def test_a_charge_whose_budget_cannot_be_reached_waits_for_the_next_pass_and_blames_no_card(
    db, settings, clock, stripe_server, stripe_client
):
    """The recharge stays open with its attempt pending (the outcome is known: nothing was sent), no card or
    customer is blamed and no one is told; once the budget answers again, recovery charges it once."""
    customer = busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    unreachable = SharedBudget(UNREACHABLE)

    def gateway(shared=None) -> StripeGateway:
        limiter = RateLimiter(20, shared=shared)
        return StripeGateway(
            STRIPE_KEY, api_base=stripe_server.url, max_retries=1, wait=wait_none(), rate_limiter=limiter, now=clock.now
        )

    cut_off = gateway(lambda rate: unreachable.take(rate).wait)
    [report] = RechargeService(db, settings, lambda: cut_off, clock).run_cycle().charged
    unreachable.close()

    assert report.phase == Phase.CHARGING
    assert stripe_server.payment_intents(customer=customer) == []
    with db.reading() as session:
        assert [a.status for a in session.scalars(select(ChargeAttempt))] == [AttemptStatus.PENDING]
        assert all(source.unusable_reason is None for source in session.scalars(select(FundingSource)))
        assert [m.kind for m in session.scalars(select(OutboxMessage)) if m.kind != "settings_changed"] == []

    working = gateway()
    [recovered] = RechargeService(db, settings, lambda: working, clock).recover()
    assert recovered.phase == Phase.FINISHED
    assert len(stripe_server.payment_intents(customer=customer, status="succeeded")) == 1


@postgres_only
def test_a_connection_the_database_dropped_is_replaced_without_an_error(db_url, budget):
    """A restart of the database closes the budget's pooled connections: the next request reconnects."""
    budget.take(90)
    with psycopg.connect(db_url.split("?")[0], autocommit=True) as admin:
        dropped = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query LIKE '%INSERT INTO processor_budgets%'"
        ).fetchone()
    assert dropped is not None
    assert dropped[0] >= 1
    assert budget.take(90).wait >= 0


def _take_a_slot(url: str) -> None:
    SharedBudget(url).take(10)


@postgres_only
def test_an_instance_killed_while_it_waits_for_the_budget_holds_no_one_back(db_url, budget):
    """Killed in the middle of its statement (the row locked meanwhile, so that it is surely in the middle): the
    database finishes the statement or drops it, and the others lose at most the one slot it took."""
    budget.take(10)
    with psycopg.connect(db_url) as holder, psycopg.connect(db_url, autocommit=True) as watcher:
        holder.execute("SELECT next_slot FROM processor_budgets FOR UPDATE")  # held until the commit below
        instance = FORK.Process(target=_take_a_slot, args=(db_url,))
        instance.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = %s"
        deadline = time.monotonic() + 10
        while watcher.execute(waiting, (holder.info.dbname,)).fetchone() != (1,):
            assert time.monotonic() < deadline, "the instance never reached the budget's row"
            time.sleep(0.01)
        instance.kill()
        instance.join()
        holder.commit()
    assert budget.take(10).wait <= 0.2


# --- the test: several instances, one budget, counted at the processor -----------------------------------

BUDGET = 10  # requests per second for the whole deployment: well below what three instances ask for here
ACCOUNTS = 25  # two and a half seconds of charges at the budget
# The slots are 1/BUDGET apart, and on its way to the server a request may be delayed up to this much more than
# another (a thread waking late on a busy host): a one-second window at the server may then hold the slots of
# 1 + JITTER seconds. Instances that each paced themselves would send about three times the budget.
JITTER = 0.2


def most_in_one_second(arrivals: list[float]) -> int:
    """The most requests that arrived within any one second [t, t + 1)."""
    arrivals = sorted(arrivals)
    most, first = 0, 0
    for last, at in enumerate(arrivals):
        while arrivals[first] <= at - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_most_in_one_second_counts_a_sliding_window():
    assert most_in_one_second([]) == 0
    assert most_in_one_second([0.0, 0.5, 0.99, 1.0, 1.5]) == 3
    assert most_in_one_second([n / 16 for n in range(32)]) == 16  # exact in binary: 16 a second, [t, t + 1)


def _instance(environ: dict[str, str], at: str, start, results) -> None:
    """One instance in a process of its own: a daemon built as `recharged run` builds it (its gateway, its rate
    limiter), which runs one cycle once every instance is ready, and reports what it charged."""
    settings = load_settings(None, environ=environ)
    daemon = Daemon(None, settings, FixedClock(datetime.fromisoformat(at)))
    daemon.prepare()
    start.wait(30)
    report = daemon.runtime().recharges.run_cycle(concurrency=settings.daemon.charge_concurrency)
    results.put([(r.account_id, r.phase.value) for r in report.charged])
    daemon.stop()


def test_several_instances_charging_at_once_stay_within_the_one_budget_at_the_processor(
    db_url, db, settings, clock, stripe_server, stripe_client, monkeypatch, quiet_logs
):
    """Three daemons on PostgreSQL (one on SQLite, which allows no more), each charging eight accounts at a time,
    all due accounts at once: the processor sees the budget, not three times it, and each account is paid once."""
    instances = 3 if db.dialect == "postgresql" else 1
    accounts = [f"due-{n:02d}" for n in range(ACCOUNTS)]
    customers = {a: busy_account(db, settings, clock, stripe_client, "pm_card_visa", account=a) for a in accounts}
    monkeypatch.setenv("RECHARGED_STRIPE_API_KEY", STRIPE_KEY)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    environ = {
        "RECHARGED_DATABASE__URL": db_url,
        "RECHARGED_PAYMENTS__STRIPE_API_BASE": stripe_server.url,
        "RECHARGED_PAYMENTS__MAX_REQUESTS_PER_SECOND": str(BUDGET),
        "RECHARGED_DAEMON__CHARGE_CONCURRENCY": "8",
    }
    stripe_server.clear_requests()
    start, results = FORK.Barrier(instances), FORK.Queue()
    args = (environ, clock.now().isoformat(), start, results)
    processes = [FORK.Process(target=_instance, args=args) for _ in range(instances)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    assert [p.exitcode for p in processes] == [0] * instances
    reports = [results.get(timeout=5) for _ in processes]

    arrivals = [r.arrived for r in stripe_server.requests()]
    most = most_in_one_second(arrivals)
    rate = (len(arrivals) - 1) / (max(arrivals) - min(arrivals))
    print(f"\n{instances} instances: {len(arrivals)} requests at {rate:.1f}/s, at most {most} in one second")
    assert all(reports)  # every instance charged: they ran at once
    assert most <= BUDGET * (1 + JITTER)

    paid = {a: len(stripe_server.payment_intents(customer=c, status="succeeded")) for a, c in customers.items()}
    assert paid == dict.fromkeys(customers, 1)
    with db.reading() as session:
        credited = [e.account_id for e in session.scalars(select(Entry).where(Entry.entry_type == "recharge"))]
        phases = {r.account_id: r.phase for r in session.scalars(select(Recharge))}
    assert sorted(credited) == accounts
    assert phases == dict.fromkeys(accounts, Phase.FINISHED)
    assert sorted(account for report in reports for account, phase in report if phase == "finished") == accounts
    assert verify(db).ok
