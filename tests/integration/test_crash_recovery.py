"""`kill -9` anywhere in the charge flow, then recover: every recharge decision is charged and credited exactly once.

The charge flow runs in a forked child process that dies by SIGKILL at a crash point (`RECHARGED_CRASH_AT`,
see recharged/faults.py) or, for a kill during the HTTP request, is killed by the parent while the local Stripe
server sleeps on the request. The parent then recovers as a restarted worker would (a few minutes later, past
any lease the dead child held) and checks, against the Stripe server and the ledger, that each account below
its threshold got exactly one succeeded PaymentIntent, exactly one ledger credit for it, and its balance
raised by the net amount once, with nothing left open and `verify` clean. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote

import pytest
from sqlalchemy import select
from tenacity import wait_none

from recharged.clock import FixedClock
from recharged.config import load_settings
from recharged.money import to_minor_units
from recharged.payments import StripeGateway
from recharged.planning import plan_accounts
from recharged.recharge import RechargeService
from recharged.states import CLOSED_PHASES
from recharged.store.engine import Database
from recharged.store.models import Account, Entry, Recharge
from recharged.verify import verify
from tests.helpers import NOW, busy_account

ACTOR = "Jane Doe"
CRASH_ENV = "RECHARGED_CRASH_AT"
# Crash points in the order the flow reaches them, and the kill the parent delivers during the charge request.
CRASH_POINTS = (
    "before_claim_commit",
    "after_claim",
    "after_attempt_stored",
    "before_request",
    "after_response",
    "after_credit",
)
DURING_REQUEST = "during_request"
KILL_POINTS = (*CRASH_POINTS, DURING_REQUEST)
# Default cards that decline (soft, hard, generic, processing error), each backed by a card that succeeds.
DECLINING = (
    "pm_card_chargeDeclinedInsufficientFunds",
    "pm_card_chargeDeclinedLostCard",
    "pm_card_chargeDeclined",
    "pm_card_chargeDeclinedProcessingError",
)
GOOD = "pm_card_visa"
PAYMENT_INTENTS = "/v1/payment_intents"
FORK = multiprocessing.get_context("fork")  # the child only talks HTTP to the server threads living in the parent


# --- scenario ------------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """Accounts below their threshold, what each should be credited, and what they held before."""

    cards: dict[str, tuple[str, ...]]  # account -> its cards, default first
    customer: dict[str, str]
    balance_before: dict[str, int]
    net_amount: dict[str, int]  # the charge the plan decided, credited net of VAT

    @property
    def attempts(self) -> int:
        """Charge attempts the flow makes without a crash: one per account, plus one per declining default."""
        return sum(1 if cards[0] == GOOD else 2 for cards in self.cards.values())

    def times_reached(self, point: str) -> int:
        """How often an uninterrupted cycle reaches `point` (each account is claimed and credited once)."""
        per_attempt = ("after_attempt_stored", "before_request", "after_response", DURING_REQUEST)
        return self.attempts if point in per_attempt else len(self.cards)


def set_up(db, settings, clock, stripe_client, cards: dict[str, tuple[str, ...]]) -> Scenario:
    """Create the accounts and record the plan's decision for each: all must be due for a charge."""
    customer = {
        account: busy_account(db, settings, clock, stripe_client, *c, account=account) for account, c in cards.items()
    }
    plans = {p.account_id: p.decision for p in plan_accounts(db, settings, clock.now(), ids=sorted(cards))}
    assert {account: d.action for account, d in plans.items()} == dict.fromkeys(cards, "charge")
    return Scenario(
        cards,
        customer,
        {account: d.balance for account, d in plans.items()},
        {account: d.charge_amount for account, d in plans.items()},
    )


# --- the child that dies ---------------------------------------------------------------------------------------


def _charge_flow(url: str, at: str, api_base: str, crash_at: str | None) -> None:
    """Child process: one `run_cycle` on its own engine and clock, dying at `crash_at` if given."""
    if crash_at:
        os.environ[CRASH_ENV] = crash_at
    db = Database(url)  # never an engine inherited across fork
    clock = FixedClock(datetime.fromisoformat(at))

    def gateway() -> StripeGateway:
        return StripeGateway(
            "sk_test_recharged", api_base=api_base, timeout_seconds=30, max_retries=2, wait=wait_none(), now=clock.now
        )

    RechargeService(db, load_settings(None, environ={}), gateway, clock).run_cycle()
    db.close()


def charge_posts(server) -> list:
    """The charge requests (PaymentIntent creations) the server has received so far."""
    return [r for r in server.requests() if r.method == "POST" and r.path == PAYMENT_INTENTS]


def kill_charge_flow(url: str, clock: FixedClock, server, point: str, nth: int, slow_seconds: float = 0.5) -> None:
    """Run the charge flow in a child and have it die by SIGKILL the `nth` time it reaches `point`.

    For DURING_REQUEST the `nth` charge request is held `slow_seconds` by the server and the parent kills the
    child while it waits for the answer; the server finishes the request afterwards, as Stripe would."""
    crash_at = None if point == DURING_REQUEST else f"{point}:{nth}"
    sent_before = len(charge_posts(server))
    if point == DURING_REQUEST:
        if nth > 1:
            server.inject("slow", seconds=0, times=nth - 1)  # the first nth-1 charges go through at once
        server.inject("slow", seconds=slow_seconds)
    child = FORK.Process(target=_charge_flow, args=(url, clock.now().isoformat(), server.url, crash_at))
    child.start()
    try:
        if point == DURING_REQUEST:
            deadline = time.monotonic() + 20
            while not any(r.fault == "slow" for r in charge_posts(server)[sent_before + nth - 1 :]):
                assert child.is_alive(), f"child ended (exit code {child.exitcode}) before charge request {nth}"
                assert time.monotonic() < deadline, f"charge request {nth} never arrived"
                time.sleep(0.002)
            os.kill(child.pid, signal.SIGKILL)
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        server.clear_faults()
    assert child.exitcode == -signal.SIGKILL, f"child was not killed at {point}:{nth} (exit code {child.exitcode})"


# --- recovery and the checks ---------------------------------------------------------------------------------


def open_recharges(db) -> list[Recharge]:
    with db.transaction() as s:
        return list(s.scalars(select(Recharge).where(Recharge.phase.not_in(CLOSED_PHASES)).order_by(Recharge.id)))


def recover_until_settled(db, settings, clock: FixedClock, gateway_factory, timeout: float = 20.0) -> int:
    """Restart as a worker would, once any lease of the dead child has run out: recover and run cycles until no
    recharge is open (a request the server still holds answers 409, so it can take a few rounds). Returns
    the number of cycles it took."""
    clock.advance(timedelta(seconds=settings.payments.lease_seconds + 1))
    service = RechargeService(db, settings, gateway_factory, clock)
    deadline, cycles = time.monotonic() + timeout, 0
    while True:
        service.run_cycle()
        cycles += 1
        if not open_recharges(db) or time.monotonic() > deadline:
            return cycles
        time.sleep(0.05)


def exactly_once_violations(db, server, scenario: Scenario) -> list[str]:
    """Everything that is not 'charged once, credited once' for the scenario's accounts; empty when all is well."""
    found: list[str] = []
    with db.transaction() as s:
        for account in sorted(scenario.cards):
            tag = f"{account} (cards {', '.join(scenario.cards[account])})"
            intents = [
                pi
                for pi in server.payment_intents(customer=scenario.customer[account], status="succeeded")
                if pi["metadata"].get("recharged_account") == account
            ]
            recharges = list(s.scalars(select(Recharge).where(Recharge.account_id == account).order_by(Recharge.id)))
            credits = list(s.scalars(select(Entry).where(Entry.account_id == account, Entry.entry_type == "recharge")))
            balance = s.get(Account, account).balance
            finished = [r for r in recharges if r.phase == "finished"]
            still_open = [f"{r.id}:{r.phase}" for r in recharges if r.phase not in CLOSED_PHASES]
            if still_open:
                found.append(f"{tag}: recharges left open {still_open}")
            if len(intents) != 1 or len(finished) != 1:
                pis = [(pi["id"], pi["metadata"].get("recharged_recharge")) for pi in intents]
                found.append(f"{tag}: succeeded PaymentIntents {pis}, finished recharges {[r.id for r in finished]}")
                continue
            [intent], [recharge] = intents, finished
            if (
                intent["metadata"].get("recharged_recharge") != str(recharge.id)
                or recharge.payment_intent != intent["id"]
            ):
                found.append(
                    f"{tag}: PaymentIntent {intent['id']} {intent['metadata']} vs recharge {recharge.id} "
                    f"paid by {recharge.payment_intent}"
                )
            if intent["amount"] != to_minor_units(recharge.total, recharge.currency):
                found.append(f"{tag}: charged {intent['amount']} minor units for a total of {recharge.total}")
            if [(e.external_id, e.amount) for e in credits] != [(intent["id"], scenario.net_amount[account])]:
                found.append(f"{tag}: credits {[(e.external_id, e.amount) for e in credits]} for {intent['id']}")
            if recharge.amount != scenario.net_amount[account]:
                found.append(f"{tag}: recharge amount {recharge.amount} != decided {scenario.net_amount[account]}")
            if balance != scenario.balance_before[account] + scenario.net_amount[account]:
                found.append(
                    f"{tag}: balance {balance}, expected {scenario.balance_before[account]} + "
                    f"{scenario.net_amount[account]}"
                )
    if still := open_recharges(db):
        found.append(f"recharges left open: {[(r.id, r.account_id, r.phase) for r in still]}")
    report = verify(db)
    if not report.ok:
        found.append(f"verify: {report.violations}")
    return found


def phase_of(db, account: str) -> str | None:
    """The phase of the account's latest recharge (None when nothing was claimed)."""
    with db.transaction() as s:
        return s.scalars(
            select(Recharge.phase).where(Recharge.account_id == account).order_by(Recharge.id.desc())
        ).first()


def balance_of(db, account: str) -> int:
    with db.transaction() as s:
        return s.get(Account, account).balance


# --- one kill at each point --------------------------------------------------------------------------------------

# (point, nth time reached, cards, phase of the recharge right after the kill, charged already at the kill)
KILLS = [
    pytest.param("before_claim_commit", 1, (GOOD,), None, False, id="before_claim_commit"),
    pytest.param("after_claim", 1, (GOOD,), "claimed", False, id="after_claim"),
    pytest.param("after_attempt_stored", 1, (GOOD,), "charging", False, id="after_attempt_stored"),
    pytest.param("before_request", 1, (GOOD,), "charging", False, id="before_request"),
    pytest.param(DURING_REQUEST, 1, (GOOD,), "charging", None, id="during_request"),
    pytest.param("after_response", 1, (GOOD,), "charging", True, id="after_response"),
    pytest.param("after_credit", 1, (GOOD,), "credited", True, id="after_credit"),
    pytest.param("after_response", 1, (DECLINING[0], GOOD), "charging", False, id="after_response-soft_decline"),
    pytest.param(
        "after_attempt_stored", 2, (DECLINING[1], GOOD), "charging", False, id="after_attempt_stored-2nd-hard_decline"
    ),
    pytest.param("after_response", 2, (DECLINING[0], GOOD), "charging", True, id="after_response-2nd-backup_card"),
    pytest.param(DURING_REQUEST, 2, (DECLINING[1], GOOD), "charging", None, id="during_request-2nd-backup_card"),
]


@pytest.mark.parametrize(("point", "nth", "cards", "phase_after_kill", "charged_at_kill"), KILLS)
def test_kill_at_each_point_then_recovery_charges_and_credits_exactly_once(
    db_url,
    db,
    settings,
    clock,
    stripe_server,
    stripe_client,
    gateway_factory,
    point,
    nth,
    cards,
    phase_after_kill,
    charged_at_kill,
):
    scenario = set_up(db, settings, clock, stripe_client, {"acme": cards})

    kill_charge_flow(db_url, clock, stripe_server, point, nth)

    assert phase_of(db, "acme") == phase_after_kill  # the child died where it was meant to
    charged = bool(stripe_server.payment_intents(status="succeeded"))
    if charged_at_kill is not None:
        assert charged == charged_at_kill
    credited = point == "after_credit"
    assert balance_of(db, "acme") == scenario.balance_before["acme"] + (scenario.net_amount["acme"] if credited else 0)

    recover_until_settled(db, settings, clock, gateway_factory)

    assert exactly_once_violations(db, stripe_server, scenario) == []
    if len(cards) == 1:  # a recovered attempt re-sends its stored key: one key, whatever was sent before the kill
        assert len({r.idempotency_key for r in charge_posts(stripe_server)}) == 1


# --- many random kills ---------------------------------------------------------------------------------------------

RUNS_PER_DATABASE = 25  # verify reads the whole ledger: a fresh database now and then keeps each run's checks cheap


def random_cards(rng: random.Random) -> tuple[str, ...]:
    """A good card alone, or a declining default with a good backup, half and half."""
    return (GOOD,) if rng.random() < 0.5 else (rng.choice(DECLINING), GOOD)


def crash_runs(db_url: str) -> int:
    """RECHARGED_CRASH_RUNS (default 200) on SQLite; on PostgreSQL, slower per run, RECHARGED_CRASH_RUNS_POSTGRES
    (default a quarter of RECHARGED_CRASH_RUNS, so 50)."""
    runs = int(os.environ.get("RECHARGED_CRASH_RUNS", "200"))
    if db_url.startswith("postgresql"):
        runs = int(os.environ.get("RECHARGED_CRASH_RUNS_POSTGRES", runs // 4))
    return runs


def fresh_database(request: pytest.FixtureRequest, db_url: str, name: str) -> str:
    """Another empty, migrated database of the same kind as `db_url`, made as the db_url fixture makes one and
    dropped at the end of the test."""
    if db_url.startswith("sqlite"):
        path = request.getfixturevalue("tmp_path") / f"{name}.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    import psycopg

    database_url = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

    request.addfinalizer(drop)
    url = f"{database_url}?options={quote(f'-csearch_path={schema}')}"
    db = Database(url)
    db.upgrade()
    db.close()
    return url


@pytest.mark.slow
def test_random_kills_then_recovery_never_charge_twice_or_lose_a_credit(
    request, db_url, settings, clock, stripe_server, stripe_client, gateway_factory, quiet_logs
):
    """Each run: 3 fresh accounts below threshold (some with a declining default card), a child killed at a
    random point the random N-th time it gets there, recovery, and the exactly-once checks. The accounts are new
    each run, so the checks stay exact per account while a database serves RUNS_PER_DATABASE runs."""
    runs = crash_runs(db_url)
    seed = int(os.environ.get("RECHARGED_CRASH_SEED", "20261122"))
    rng = random.Random(seed)
    print(f"\ncrash seed: {seed}, runs: {runs}, database: {db_url.split(':')[0]}")
    executed, violations, kills = 0, [], Counter()
    spent = dict.fromkeys(("set-up", "child", "recovery", "checks"), 0.0)
    started = time.monotonic()
    db = None
    for run in range(runs):
        if run % RUNS_PER_DATABASE == 0:
            if db is not None:
                db.close()
            url = db_url if run == 0 else fresh_database(request, db_url, f"crash-{run}")
            db = Database(url)
        clock.set(NOW)
        stripe_server.clear_requests()  # the server copies every recorded request on each look
        lap = time.monotonic()
        accounts = {f"k{run:04d}-{n}": random_cards(rng) for n in range(3)}
        scenario = set_up(db, settings, clock, stripe_client, accounts)
        point = rng.choice(KILL_POINTS)
        nth = rng.randint(1, scenario.times_reached(point))
        lap = _lap(spent, "set-up", lap)

        kill_charge_flow(url, clock, stripe_server, point, nth, slow_seconds=0.3)
        lap = _lap(spent, "child", lap)
        recover_until_settled(db, settings, clock, gateway_factory)
        lap = _lap(spent, "recovery", lap)

        executed += 1
        kills[point] += 1
        found = exactly_once_violations(db, stripe_server, scenario)
        violations += [f"run {run}, killed at {point}:{nth}: {v}" for v in found]
        _lap(spent, "checks", lap)
    assert db is not None
    db.close()
    elapsed = time.monotonic() - started
    print(f"crash runs: {executed}, violations: {len(violations)} ({db_url.split(':')[0]}, {elapsed:.1f} s)")
    print("  kills per point: " + ", ".join(f"{p} {kills[p]}" for p in KILL_POINTS))
    print("  time: " + ", ".join(f"{what} {seconds:.1f} s" for what, seconds in spent.items()))
    for violation in violations:
        print("  " + violation)
    assert executed >= runs
    assert violations == []


def _lap(spent: dict[str, float], what: str, since: float) -> float:
    """Add the time since `since` to `spent[what]`; returns now."""
    now = time.monotonic()
    spent[what] += now - since
    return now
