"""Several workers running the charge cycle at once against one PostgreSQL database never charge an account twice.

Four processes start `run_cycle()` together (a barrier) on ~10 accounts below their threshold, some with a
declining default card and a good backup, all against one local Stripe server that adds latency to every request
so the workers' claims, charges and credits overlap. Afterwards every account has exactly one succeeded
PaymentIntent and one ledger credit, nothing is left open after a final `recover()`, and `verify` is clean.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from datetime import datetime

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
from tests.helpers import busy_account

ACTOR = "Jane Doe"
WORKERS, ROUNDS, ACCOUNTS = 4, 3, 10
LATENCY = 0.05  # seconds the server adds to every request, so that the workers overlap
GOOD = "pm_card_visa"
DECLINING = ("pm_card_chargeDeclinedInsufficientFunds", "pm_card_chargeDeclinedLostCard", "pm_card_chargeDeclined")
FORK = multiprocessing.get_context("fork")  # workers build their own engine; they only talk HTTP to the server


@dataclass
class Due:
    """One account below its threshold: its cards, Stripe customer, balance and the net amount decided."""

    account: str
    cards: tuple[str, ...]
    customer: str
    balance_before: int
    net_amount: int


def accounts_due(db, settings, clock, stripe_client, round_: int) -> list[Due]:
    """ACCOUNTS fresh accounts below threshold; every third one has a declining default card and a good backup."""
    cards = {
        f"r{round_}-{n:02d}": (DECLINING[n // 3 % len(DECLINING)], GOOD) if n % 3 == 0 else (GOOD,)
        for n in range(ACCOUNTS)
    }
    customers = {a: busy_account(db, settings, clock, stripe_client, *c, account=a) for a, c in cards.items()}
    plans = {p.account_id: p.decision for p in plan_accounts(db, settings, clock.now(), ids=sorted(cards))}
    assert {a: d.action for a, d in plans.items()} == dict.fromkeys(cards, "charge")
    return [Due(a, cards[a], customers[a], plans[a].balance, plans[a].charge_amount) for a in sorted(cards)]


def _cycle_worker(url: str, at: str, api_base: str, start, results, worker: int) -> None:
    """Worker process: its own engine and clock; waits for the others, runs one cycle, reports what it did."""
    db = Database(url)
    clock = FixedClock(datetime.fromisoformat(at))

    def gateway() -> StripeGateway:
        return StripeGateway(
            "sk_test_recharged", api_base=api_base, timeout_seconds=30, max_retries=2, wait=wait_none(), now=clock.now
        )

    service = RechargeService(db, load_settings(None, environ={}), gateway, clock)
    start.wait(60)
    report = service.run_cycle()
    results.put((worker, [(r.account_id, r.recharge_id, r.phase) for r in report.charged], report.not_claimed))
    db.close()


def race(url: str, clock: FixedClock, server) -> tuple[dict[int, tuple[list, list]], list[int | None]]:
    """WORKERS processes run `run_cycle()` at the same moment. Returns what each worker that finished reported
    (charged, not claimed) and every worker's exit code (non-zero: its cycle raised)."""
    start, results = FORK.Barrier(WORKERS), FORK.Queue()
    args = (url, clock.now().isoformat(), server.url, start, results)
    workers = [FORK.Process(target=_cycle_worker, args=(*args, w)) for w in range(WORKERS)]
    server.latency = LATENCY
    try:
        for p in workers:
            p.start()
        for p in workers:
            p.join(120)
    finally:
        server.latency = 0.0
        for p in workers:
            if p.is_alive():
                p.kill()
                p.join()
    reports = {}
    while not results.empty():
        worker, charged, not_claimed = results.get(timeout=5)
        reports[worker] = (charged, not_claimed)
    return reports, [p.exitcode for p in workers]


def charged_twice_or_lost(db, server, due: list[Due]) -> list[str]:
    """Every departure from 'one succeeded PaymentIntent, one credit, balance up by the net amount once'."""
    found: list[str] = []
    with db.transaction() as s:
        for d in due:
            intents = [
                (pi["id"], pi["metadata"].get("recharged_recharge"), pi["amount"])
                for pi in server.payment_intents(customer=d.customer, status="succeeded")
                if pi["metadata"].get("recharged_account") == d.account
            ]
            recharges = list(s.scalars(select(Recharge).where(Recharge.account_id == d.account).order_by(Recharge.id)))
            finished = [r for r in recharges if r.phase == "finished"]
            credits = [
                (e.external_id, e.amount)
                for e in s.scalars(select(Entry).where(Entry.account_id == d.account, Entry.entry_type == "recharge"))
            ]
            balance = s.get(Account, d.account).balance
            claims = [(r.id, r.phase, r.balance_before, r.payment_intent) for r in recharges]
            summary = (
                f"{d.account} (cards {', '.join(d.cards)}): succeeded PaymentIntents {intents}, recharges "
                f"(id, phase, balance before, paid by) {claims}, credits {credits}, balance {balance} "
                f"(was {d.balance_before}, decided +{d.net_amount})"
            )
            if len(intents) != 1 or len(finished) != 1:
                found.append(summary)
                continue
            [(intent, recharge_id, minor)], [recharge] = intents, finished
            if (
                recharge_id != str(recharge.id)
                or recharge.payment_intent != intent
                or minor != to_minor_units(recharge.total, recharge.currency)
                or credits != [(intent, d.net_amount)]
                or balance != d.balance_before + d.net_amount
            ):
                found.append(summary)
        accounts = [d.account for d in due]
        still_open = list(
            s.scalars(select(Recharge).where(Recharge.account_id.in_(accounts), Recharge.phase.not_in(CLOSED_PHASES)))
        )
    if still_open:
        found.append(f"left open: {[(r.id, r.account_id, r.phase, r.lease_until) for r in still_open]}")
    report = verify(db)
    if not report.ok:
        found.append(f"verify: {report.violations}")
    return found


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite serializes writers (BEGIN IMMEDIATE)
def test_workers_charging_at_once_charge_each_account_exactly_once(
    db_url, db, settings, clock, stripe_server, stripe_client, gateway_factory, quiet_logs
):
    service = RechargeService(db, settings, gateway_factory, clock)
    problems: list[str] = []
    for round_ in range(ROUNDS):
        due = accounts_due(db, settings, clock, stripe_client, round_)

        reports, exit_codes = race(db_url, clock, stripe_server)
        service.recover()

        claims = {w: len(charged) for w, (charged, _) in sorted(reports.items())}
        refused = sum(len(not_claimed) for _, not_claimed in reports.values())
        print(f"\nround {round_}: exit codes {exit_codes}, recharges claimed per worker {claims}, refused {refused}")
        if any(code != 0 for code in exit_codes):
            problems.append(f"round {round_}: a worker's cycle failed, exit codes {exit_codes}")
        problems += [f"round {round_}: {p}" for p in charged_twice_or_lost(db, stripe_server, due)]
    for problem in problems:
        print(problem)
    assert problems == []
