"""The charge flow: decide, claim, charge, credit, finish; and recovery of whatever a crash left half-way.

A recharge is a row that moves through recorded phases, in the spirit of Stripe's idempotency keys with
recovery points:

    claimed  --(attempt + idempotency key stored, lease taken)-->  charging  --(processor answered)-->  paid
    paid  --(ledger credit, unique per PaymentIntent, and its receipt)-->  credited  -->  finished
    charging --(declined)--> claimed (next funding source)      any phase --> failed (nothing was charged)

Each arrow is one transaction, but for a payment: its answer is recorded and credited in one, so paid is a phase
a recharge stays in only when its credit failed (recorded again without it, recovery credits it without asking
the processor again) or when a payment turns up after it had failed. A charge takes four transactions: claim,
attempt, answer with its credit, finish.

`process` drives one recharge from whatever phase it is in, so the same code finishes a fresh recharge and
one found half-done after `kill -9`. Exactly once comes from the database: one open recharge per account
(partial unique index), one pending attempt per recharge, the idempotency key stored before the request,
an attempt's outcome recorded only while it is pending, and a ledger credit unique per PaymentIntent.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Protocol

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from recharged.balance import AccountPlan, Decision, runs_out_within, stored_decision
from recharged.clock import Clock
from recharged.config import Settings
from recharged.errors import (
    ConflictError,
    InputError,
    NotFoundError,
    PaymentError,
    ProcessorFault,
    TransientPaymentError,
)
from recharged.faults import crashpoint
from recharged.mail import notices, webhooks
from recharged.mail.receipts import issue_receipt
from recharged.money import Units, check_amount, check_balance, check_charge, format_ledger, percent_of, to_minor_units
from recharged.payments import NOT_HELD, ChargeRequest, PaymentGateway, PaymentResult, card_label
from recharged.planning import plan_accounts, plans_in
from recharged.states import AttemptStatus, DeclineClass, EntryType, JobStatus, Phase, RechargeKind, RechargeState
from recharged.store.charging import (
    LockedRecharge,
    abandoned_attempts,
    accounts_with_open_recharge,
    attempts_of,
    candidate_sources,
    finish_recharge,
    insert_recharge,
    last_attempt_with,
    lock_recharge,
    lock_recharge_with,
    open_recharge_ids,
    pending_attempt,
    settle_attempt,
    take_lease,
    try_claim_lock,
)
from recharged.store.engine import Database
from recharged.store.ledger import lock_account, mark_due, post_entry
from recharged.store.models import Account, AuditRecord, ChargeAttempt, FundingSource, Receipt, Recharge
from recharged.store.runs import finish_job_run, instance_name, start_job_run
from recharged.thresholds import Thresholds
from recharged.words import plural

log = structlog.get_logger("recharged.recharge")

RECOVERY_BACKOFF = timedelta(minutes=5)  # after a recovery failure, doubling each time
RECOVERY_BACKOFF_MAX = timedelta(hours=6)
RECOVERY_ALERT_AFTER = 3  # failures in a row logged as errors from here on

Step = Phase | None  # where a step left a recharge; None: waiting on the processor, to be resumed later


@dataclass(frozen=True, slots=True)
class Claim:
    """What `claim_due` found: the recharge it claimed (None when the account is no longer due), or that another
    worker was claiming the account at that moment (`busy`, only when not waiting for its lock)."""

    recharge_id: int | None
    busy: bool = False


@dataclass(frozen=True, slots=True)
class RechargeReport:
    """Where one recharge ended up after processing."""

    recharge_id: int
    account_id: str
    kind: RechargeKind
    phase: Phase
    currency: str
    amount: Units
    total: Units
    outcome: str
    source: str | None
    integration_error: bool = False  # failed because the processor refused our request (never the card's fault)
    receipt: str | None = None  # the receipt's number, once credited
    balance_after: Units | None = None  # the balance the credit left, as the receipt shows it


@dataclass(frozen=True, slots=True)
class _Attempt:
    """An attempt about to be sent, as the transaction that stored it (or took its lease) read it."""

    id: int
    started: datetime
    payment_intent: str | None  # the processor's id of the payment, once it said the payment was processing
    request: ChargeRequest


@dataclass(slots=True)
class _Progress:
    """What one `process` call learned of its recharge on the way: the recharge as its credit left it, so that
    the report at the end needs no read."""

    report: RechargeReport | None = None


class Breaker:
    """Counts integration errors in a row across a cycle's charges (threads included); open after `limit` of them,
    until the cycle ends. A charge that reached the card (paid, declined) closes the run of errors."""

    def __init__(self, limit: int) -> None:
        self._limit, self._run, self._lock = limit, 0, threading.Lock()
        self.opened_by: str | None = None

    @property
    def open(self) -> bool:
        return self.opened_by is not None

    def record(self, integration_error: str | None) -> None:
        with self._lock:
            if integration_error is None:
                self._run = 0
                return
            self._run += 1
            if self._run >= self._limit and self.opened_by is None:
                self.opened_by = f"{self._run} integration errors in a row, the last: {integration_error}"[:300]
                log.error("cycle.breaker_open", reason=self.opened_by)


@dataclass
class CycleReport:
    at: datetime
    recovered: list[RechargeReport] = field(default_factory=list)
    charged: list[RechargeReport] = field(default_factory=list)
    not_claimed: list[str] = field(default_factory=list)  # no longer due when re-decided under the lock
    errors: dict[str, str] = field(default_factory=dict)  # account -> what went wrong (the cycle goes on)
    left_for_next: list[str] = field(default_factory=list)  # due, but the daemon was stopping or the breaker open
    accounts: int = 0
    halted: str | None = None  # why the circuit breaker stopped charging

    def summary(self) -> dict[str, object]:
        """Counts and amounts (per currency, in the ledger's 5-decimal form) for logs, status and job runs."""
        charged: dict[str, int] = {}
        for r in self.charged:
            if r.phase == Phase.FINISHED:
                charged[r.currency] = charged.get(r.currency, 0) + r.total
        return {
            "accounts": self.accounts,
            "due": len(self.charged) + len(self.not_claimed) + len(self.errors) + len(self.left_for_next),
            "charged": sum(1 for r in self.charged if r.phase == Phase.FINISHED),
            "failed": sum(1 for r in self.charged if r.phase == Phase.FAILED),
            "waiting": sum(1 for r in self.charged if r.phase.is_open),
            "not_claimed": len(self.not_claimed),
            "errors": len(self.errors),
            "left_for_next": len(self.left_for_next),
            "recovered": len(self.recovered),
            "integration_errors": sum(1 for r in self.charged if r.integration_error),
            "halted": self.halted,
            "charged_total": {currency: format_ledger(total) for currency, total in sorted(charged.items())},
        }


class Observer(Protocol):
    """Hears what the charge flow decides and does (the daemon's metrics)."""

    def decided(self, plan: AccountPlan) -> None: ...

    def attempted(self, status: str, decline_class: str | None) -> None: ...

    def credited(self, kind: str, amount: Units, currency: str) -> None: ...

    def recovery_failed(self, recharge_id: int) -> None: ...


class _Unobserved:
    def decided(self, plan: AccountPlan) -> None:
        pass

    def attempted(self, status: str, decline_class: str | None) -> None:
        pass

    def credited(self, kind: str, amount: Units, currency: str) -> None:
        pass

    def recovery_failed(self, recharge_id: int) -> None:
        pass


class RechargeService:
    """Runs recharges for one database, configuration, processor and clock."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        gateway: Callable[[], PaymentGateway],
        clock: Clock,
        observer: Observer | None = None,
    ) -> None:
        self._db = db
        self._settings = settings
        self._payments = settings.payments
        self._gateway_factory = gateway
        self._gateway: PaymentGateway | None = None
        self._gateway_lock = threading.Lock()
        self._clock = clock
        self._observer: Observer = observer or _Unobserved()
        self.thresholds = Thresholds()  # what `mark_due` knows of thresholds today; the usage recorder tells it

    @property
    def gateway(self) -> PaymentGateway:
        with self._gateway_lock:
            if self._gateway is None:
                self._gateway = self._gateway_factory()
            return self._gateway

    # --- the cycle -----------------------------------------------------------------------------------------

    def run_cycle(
        self,
        at: datetime | None = None,
        *,
        concurrency: int = 1,
        stop: threading.Event | None = None,
        plans_seen: Callable[[Sequence[AccountPlan]], object] | None = None,
    ) -> CycleReport:
        """Recover what was left open, then charge every account the plan says to charge, `concurrency` at
        a time. Once `stop` is set no new account is claimed; charges already claimed are finished.

        Several instances may run cycles at once against one PostgreSQL: each account is claimed under a
        transaction-level advisory lock and re-decided under its row lock, so each due account is charged once,
        by whichever instance gets to it first. Each instance walks the due accounts in its own random order."""
        at = at or self._clock.now()
        report = CycleReport(at)
        report.recovered = self.recover()
        plans = list(plan_accounts(self._db, self._settings, at))
        report.accounts = len(plans)
        for plan in plans:
            self._observer.decided(plan)
        if plans_seen is not None:
            plans_seen(plans)
        due = [p.account_id for p in plans if p.decision.action == "charge"]
        random.shuffle(due)
        skewed = self.clock_skew_problem() if due else None
        if skewed is not None:
            log.error("cycle.clock_skew", problem=skewed)
            report.halted, report.left_for_next = skewed, due
            return report

        breaker = Breaker(self._payments.max_integration_errors)

        def charge(account_id: str, wait_for_lock: bool) -> str | None:
            """The account id again when another instance was claiming it at that moment."""
            if (stop is not None and stop.is_set()) or breaker.open:
                report.left_for_next.append(account_id)
                return None
            try:
                claim = self.claim_due(account_id, at, wait_for_lock=wait_for_lock)
                if claim.busy:
                    return account_id
                if claim.recharge_id is None:
                    report.not_claimed.append(account_id)
                else:
                    result = self.process(claim.recharge_id, Phase.CLAIMED)
                    report.charged.append(result)
                    breaker.record(result.outcome if result.integration_error else None)
            except PaymentError as exc:  # the processor refused our key or our request: ours, not the card's
                log.error("cycle.account_failed", account=account_id, error=str(exc))
                report.errors[account_id] = str(exc)[:300]
                breaker.record(str(exc))
            except Exception as exc:  # one account's trouble never stops the others' charges
                log.exception("cycle.account_failed", account=account_id, error=str(exc))
                report.errors[account_id] = str(exc)[:300]
            return None

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="charge") as pool:
            busy = [a for a in pool.map(lambda a: charge(a, False), due) if a is not None]
            # Claimed by another instance a moment ago: decide again now, when its claim is visible.
            list(pool.map(lambda a: charge(a, True), busy))
        report.halted = breaker.opened_by
        return report

    def run_recorded_cycle(
        self,
        at: datetime | None = None,
        *,
        concurrency: int = 1,
        plans_seen: Callable[[Sequence[AccountPlan]], object] | None = None,
    ) -> CycleReport:
        """`run_cycle` recorded as a run of the job "cycle" by this process (`recharged cycle`), as the daemon
        records its own: `status` and /healthz see it as the last cycle."""
        with self._db.transaction() as session:
            run_id = start_job_run(session, "cycle", f"cli:{instance_name()}", self._clock.now())
        try:
            report = self.run_cycle(at, concurrency=concurrency, plans_seen=plans_seen)
        except Exception as exc:
            with self._db.transaction() as session:
                finish_job_run(session, run_id, JobStatus.FAILED, self._clock.now(), None, str(exc)[:500])
            raise
        with self._db.transaction() as session:
            finish_job_run(session, run_id, JobStatus.SUCCEEDED, self._clock.now(), report.summary(), None)
        return report

    def charge_now(self, account_id: str) -> RechargeReport | None:
        """Charge one account at once if it is due (usage made its runway too short to wait for the cycle)."""
        if self.clock_skew_problem() is not None:
            return None  # the cycle reports it
        claim = self.claim_due(account_id, self._clock.now(), wait_for_lock=True)
        if claim.recharge_id is None:
            return None
        return self.process(claim.recharge_id, Phase.CLAIMED)

    def mark_due(self, account_ids: Iterable[str], next_cycle: datetime | None, margin: timedelta) -> list[str]:
        """After usage was recorded: note when each account fell under its threshold (it is charged in the next
        cycle), and return the ones whose balance will not last until that cycle plus `margin`, to charge now."""
        at = self._clock.now()
        ids = sorted(set(account_ids))
        if not ids:
            return []
        urgent: list[str] = []
        with self._db.transaction() as session:
            due = []
            # only the accounts that may be under their threshold (`thresholds`): most are not, and planning is costly
            wanted, keys = self.thresholds.to_plan(session, ids, at)
            plans = list(plans_in(session, self._settings, at, wanted)) if wanted else []
            self.thresholds.learn(plans, keys, at)
            for plan in plans:
                if plan.decision.action != "charge":
                    continue
                due.append(plan.account_id)
                if next_cycle is not None and runs_out_within(plan.decision.runway_days, next_cycle - at + margin):
                    urgent.append(plan.account_id)
            if due:
                mark_due(session, due, at)
        return urgent

    def recover(self, *, idle_for: timedelta | None = None) -> list[RechargeReport]:
        """Finish every recharge left in an intermediate phase (at start-up and every few minutes); with
        `idle_for`, only those untouched for that long (the completer leaves a running cycle's work alone)."""
        now = self._clock.now()
        with self._db.transaction() as session:
            ids = open_recharge_ids(session, now, idle_since=None if idle_for is None else now - idle_for)
        reports = []
        for recharge_id, failures in ids:  # each on its own: one broken recharge never stops the others, nor the cycle
            try:
                report = self.process(recharge_id)
            except Exception as exc:
                reports.append(self._recovery_failed(recharge_id, exc))
                continue
            if failures:  # a write only for a recharge that had failed before
                self._recovery_succeeded(recharge_id)
            reports.append(report)
        return reports

    def _recovery_failed(self, recharge_id: int, exc: Exception) -> RechargeReport:
        """Record the failure on the recharge and back off (5 minutes, doubling up to 6 hours); repeated failures
        are logged as errors, and `recharged status` and /healthz show the recharge."""
        now = self._clock.now()
        with self._db.transaction() as session:
            recharge = session.get(Recharge, recharge_id)
            assert recharge is not None
            recharge.recovery_failures += 1
            wait = min(RECOVERY_BACKOFF * 2 ** (recharge.recovery_failures - 1), RECOVERY_BACKOFF_MAX)
            recharge.recover_after = now + wait
            recharge.lease_until = None
            recharge.outcome = f"recovery failed ({recharge.recovery_failures}x): {exc}"[:200]
            failures = recharge.recovery_failures
        (log.error if failures >= RECOVERY_ALERT_AFTER else log.warning)(
            "recover.failed", recharge=recharge_id, failures=failures, retry_in=str(wait), error=str(exc)
        )
        self._observer.recovery_failed(recharge_id)
        return self.report(recharge_id)

    def _recovery_succeeded(self, recharge_id: int) -> None:
        with self._db.transaction() as session:
            recharge = session.get(Recharge, recharge_id)
            if recharge is not None and recharge.recovery_failures:
                recharge.recovery_failures, recharge.recover_after = 0, None

    def reclaim(self, recharge_id: int) -> RechargeReport:
        """A recharge that failed after its attempt was abandoned ("no payment found") while the processor does hold
        a payment under that attempt's key (`reconcile` names it): mark it paid by that payment and credit it. The
        same recharge, so the credit stays unique per PaymentIntent; nothing is charged."""
        with self._db.reading() as session:
            recharge = session.get(Recharge, recharge_id)
            if recharge is None:
                raise NotFoundError(f"no recharge {recharge_id}")
            if recharge.phase != Phase.FAILED:
                raise ConflictError(
                    f"recharge {recharge_id} is {recharge.phase}, not failed: `recharged recover` finishes it"
                )
            abandoned = [
                (a.id, a.idempotency_key, a.created_at, source.customer)
                for a, source in abandoned_attempts(session, recharge_id)
            ]
        for attempt_id, key, started, customer in abandoned:
            found = self.gateway.find(customer, key, started)
            if found is None or found.outcome != AttemptStatus.SUCCEEDED or found.payment_intent is None:
                continue
            outcome = f"paid by {found.payment_intent}, found after the attempt was abandoned"
            if not self._paid_after_failure(recharge_id, attempt_id, found.payment_intent, outcome, "reclaim it"):
                break  # another worker got there first
            log.warning("recharge.reclaimed", recharge=recharge_id, payment_intent=found.payment_intent)
            return self.process(recharge_id, Phase.PAID)
        return self.report(recharge_id)

    def authenticated(self, recharge_id: int, payment_intent: str) -> RechargeReport | None:
        """A payment the customer authenticated after its recharge failed waiting for them (its attempt ended
        action_required, and the CRM let the customer confirm it with Stripe.js), which the caller has just read
        from the processor as succeeded: the same recharge is marked paid by it and credited, once (the credit is
        unique per PaymentIntent), and an automatic recharge paused for the customer resumes. None when the
        recharge did not fail that way; ConflictError while another recharge of the account is open (the event is
        handled again later)."""
        with self._db.reading() as session:
            recharge = session.get(Recharge, recharge_id)
            if recharge is None or recharge.phase != Phase.FAILED:
                return None
            waited = session.scalars(
                select(ChargeAttempt.id).where(
                    ChargeAttempt.recharge_id == recharge_id,
                    ChargeAttempt.status == AttemptStatus.ACTION_REQUIRED,
                    ChargeAttempt.payment_intent == payment_intent,
                )
            ).first()
        if waited is None:
            return None
        outcome = f"paid by {payment_intent} once the customer authenticated it"
        if not self._paid_after_failure(recharge_id, waited, payment_intent, outcome, "it is credited", resume=True):
            return self.report(recharge_id)  # another worker credited it meanwhile
        log.info("recharge.authenticated", recharge=recharge_id, payment_intent=payment_intent)
        return self.process(recharge_id, Phase.PAID)

    def _paid_after_failure(
        self, recharge_id: int, attempt_id: int, payment_intent: str, outcome: str, then: str, *, resume: bool = False
    ) -> bool:
        """A failed recharge turns out paid by `payment_intent` under its attempt `attempt_id`: mark the attempt
        succeeded and the recharge paid by it (by that attempt's card), for `process` to credit; with `resume`, an
        automatic recharge paused waiting for the customer resumes. False when it is no longer failed (another
        worker got there first); ConflictError while another recharge of the account is open (`then`: what to do
        after it)."""
        with self._db.transaction() as session:
            locked = lock_recharge_with(session, recharge_id)
            recharge = locked.recharge
            if recharge.phase != Phase.FAILED:
                return False
            if recharge.account_id in accounts_with_open_recharge(session, [recharge.account_id]):
                raise ConflictError(
                    f"account {recharge.account_id} has another recharge in progress; recharge {recharge_id} was "
                    f"paid by {payment_intent} after all: {then} when the other has finished"
                )
            attempt = session.get(ChargeAttempt, attempt_id)
            assert attempt is not None
            now = self._clock.now()
            attempt.status, attempt.payment_intent = AttemptStatus.SUCCEEDED, payment_intent
            attempt.finished_at = attempt.finished_at or now
            recharge.phase, recharge.payment_intent, recharge.source_id = Phase.PAID, payment_intent, attempt.source_id
            recharge.outcome, recharge.updated_at = outcome, now
            account = locked.account
            if resume and account.recharge_state == RechargeState.ACTION_REQUIRED:
                account.recharge_state, account.state_reason = RechargeState.OK, None
        return True

    def clock_skew_problem(self) -> str | None:
        """Why no charge may start now because our clock is too far from the processor's, or None. Recovery looks
        payments up around times we recorded, so it must not run on a clock the processor does not share."""
        skew = self.gateway.skew
        limit = self._payments.max_clock_skew
        if skew is None or abs(skew) <= limit:
            return None
        side = "ahead of" if skew > timedelta(0) else "behind"
        return f"our clock is {abs(skew)} {side} the processor's (over {limit}): no charge is started; fix the clock"

    def topup(
        self, account_id: str, amount: Units, actor: str, *, on_claim: Callable[[Session, int], None] | None = None
    ) -> RechargeReport:
        """A one-time purchase charged now through the same flow. `on_claim` writes what belongs with the claim
        (the API's idempotency key) in the claim's own transaction."""
        with self._db.transaction() as session:
            account = session.get(Account, account_id)
            if account is None:
                raise NotFoundError(f"no account {account_id!r}")
            try:  # the ledger's bounds (money.MAX_AMOUNT, MAX_BALANCE): nothing is charged that could not be credited
                check_amount(amount, account.currency, what="top-up")
                check_balance(account.balance, amount, account.currency, what="top-up")
            except ValueError as exc:
                raise InputError(f"account {account_id}: {exc}; nothing was charged") from None
            # Refused before any request: off the charge step, or outside the processor's limits on one charge
            # (which apply to the amount plus VAT, computed as the claim will).
            vat = percent_of(amount, Decimal(account.vat_percent), account.currency)
            try:
                check_charge(amount, vat, account.currency, what="top-up")
            except ValueError as exc:
                raise InputError(str(exc)) from None
        skewed = self.clock_skew_problem()
        if skewed is not None:
            raise PaymentError(skewed)
        recharge_id = self.claim(account_id, amount, kind=RechargeKind.TOPUP, actor=actor, on_claim=on_claim)
        if recharge_id is None:
            raise ConflictError(f"account {account_id} has a recharge in progress; try again when it has finished")
        return self.process(recharge_id)

    # --- phases --------------------------------------------------------------------------------------------

    def claim_due(self, account_id: str, at: datetime, *, wait_for_lock: bool = True) -> Claim:
        """Claim an automatic recharge if the account is still due, decided afresh under its lock: a plan made
        moments ago may be stale (another worker may have charged it since)."""
        with self._db.transaction() as session:
            if not try_claim_lock(session, account_id, wait=wait_for_lock):
                return Claim(None, busy=True)
            account = lock_account(session, account_id)
            if account is None:
                return Claim(None)
            decision = next(plans_in(session, self._settings, at, [account_id])).decision
            if decision.action != "charge":
                return Claim(None)
            recharge_id = self._insert_claim(
                session, account, decision.charge_amount, kind=RechargeKind.AUTO, decision=(decision, at)
            )
            crashpoint("before_claim_commit")
        if recharge_id is not None:
            crashpoint("after_claim")
        return Claim(recharge_id)

    def claim(
        self,
        account_id: str,
        amount: Units,
        *,
        kind: RechargeKind,
        actor: str | None = None,
        on_claim: Callable[[Session, int], None] | None = None,
    ) -> int | None:
        """Record a recharge of a given amount as open; None if the account already has an open one."""
        with self._db.transaction() as session:
            account = lock_account(session, account_id)
            if account is None:
                raise NotFoundError(f"no account {account_id!r}")
            if account.closed_at is not None:  # a closed account is never charged (`accounts close`)
                raise ConflictError(f"account {account_id} is closed; nothing was charged (reopen it first)")
            recharge_id = self._insert_claim(session, account, amount, kind=kind, actor=actor)
            if recharge_id is not None and actor is not None:  # an admin's top-up is in the audit trail
                vat = percent_of(amount, Decimal(account.vat_percent), account.currency)
                session.add(
                    AuditRecord(
                        account_id=account_id,
                        actor=actor,
                        at=self._clock.now(),
                        action=f"{kind}.requested",
                        before=None,
                        after={
                            "recharge": recharge_id,
                            "amount": format_ledger(amount),
                            "vat": format_ledger(vat),
                            "total": format_ledger(amount + vat),
                        },
                    )
                )
            if recharge_id is not None and on_claim is not None:
                on_claim(session, recharge_id)
            crashpoint("before_claim_commit")
        if recharge_id is not None:
            crashpoint("after_claim")
        return recharge_id

    def _insert_claim(
        self,
        session: Session,
        account: Account,
        amount: Units,
        *,
        kind: RechargeKind,
        decision: tuple[Decision, datetime] | None = None,
        actor: str | None = None,
    ) -> int | None:
        """Insert the claim; an automatic one keeps the decision it was made on (and when it was decided)."""
        now = self._clock.now()
        taken = None if decision is None else decision[0]
        vat = percent_of(amount, Decimal(account.vat_percent), account.currency)
        return insert_recharge(
            session,
            {
                "account_id": account.id,
                "kind": kind,
                "phase": Phase.CLAIMED,
                "currency": account.currency,
                "amount": amount,
                "vat": vat,
                "total": amount + vat,
                "vat_percent": account.vat_percent,
                "balance_before": account.balance,
                "average_daily": None if taken is None else taken.average_daily,
                "threshold": None if taken is None else taken.threshold,
                "decision": None if decision is None else stored_decision(*decision),
                "limited_by": None if taken is None else taken.limited_by,
                "actor": actor,
                "created_at": now,
                "updated_at": now,
            },
        )

    def process(self, recharge_id: int, phase: Phase | None = None) -> RechargeReport:
        """Advance a recharge until it is finished, failed, or waiting on the processor. Each step re-checks
        the phase under the recharge's lock and returns the phase it left the recharge in; `phase` is where
        the caller knows it stands (a claim it just made), else it is read."""
        if phase is None:
            with self._db.reading() as session:
                phase = session.get(Recharge, recharge_id).phase  # type: ignore[union-attr]
        steps: dict[Phase | None, Callable[[int, _Progress], Step]] = {
            Phase.CLAIMED: self._choose_source,
            Phase.CHARGING: self._charge,
            Phase.PAID: self._credit,
            Phase.CREDITED: self._finish,
        }
        progress = _Progress()
        while phase in steps:
            phase = steps[phase](recharge_id, progress)
        if progress.report is not None and progress.report.phase == phase:
            return progress.report  # as this call credited and finished it: nothing to read again
        return self.report(recharge_id)

    def _choose_source(self, recharge_id: int, progress: _Progress) -> Step:
        """claimed -> charging: store a new attempt and its idempotency key before any request, then send it."""
        now = self._clock.now()
        with self._db.transaction() as session:
            locked = lock_recharge_with(session, recharge_id)  # held: `_fail` finds the account in the session
            recharge = locked.recharge
            if recharge.phase != Phase.CLAIMED:
                return recharge.phase
            sources = candidate_sources(
                session,
                recharge.account_id,
                recharge.id,
                now,
                timedelta(hours=self._payments.card_retry_after_decline_hours),
                self._payments.max_declines_per_card_30_days,
            )
            if not sources:
                self._fail(session, recharge, now)
                return Phase.FAILED
            source = sources[0]
            attempt = ChargeAttempt(
                recharge_id=recharge.id,
                source_id=source.id,
                idempotency_key=f"recharged-{uuid.uuid4()}",
                status=AttemptStatus.PENDING,
                created_at=now,
            )
            session.add(attempt)
            # The lease comes with the attempt (`_charge` takes it for one recovered): sent at once, below, while
            # recovery leaves it alone.
            recharge.phase, recharge.source_id, recharge.updated_at = Phase.CHARGING, source.id, now
            recharge.lease_until = now + timedelta(seconds=self._payments.lease_seconds)
            session.flush()  # the attempt's id
            sending = _Attempt(attempt.id, now, None, self._request(recharge, attempt, source))
        crashpoint("after_attempt_stored")
        return self._send(recharge_id, sending, now, progress)

    def _charge(self, recharge_id: int, progress: _Progress) -> Step:
        """charging, found so (recovery, a webhook): take the lease, then re-send with the same key, or look up."""
        now = self._clock.now()
        with self._db.transaction() as session:
            locked = lock_recharge_with(session, recharge_id)
            if not take_lease(session, recharge_id, now, now + timedelta(seconds=self._payments.lease_seconds)):
                return None
            attempt = pending_attempt(session, recharge_id)
            assert attempt is not None, f"recharge {recharge_id} charging without attempt"
            source = session.get(FundingSource, attempt.source_id)  # the recharge's card, held by `locked`
            assert source is not None
            sending = _Attempt(
                attempt.id, attempt.created_at, attempt.payment_intent, self._request(locked.recharge, attempt, source)
            )
        return self._send(recharge_id, sending, now, progress)

    @staticmethod
    def _request(recharge: Recharge, attempt: ChargeAttempt, source: FundingSource) -> ChargeRequest:
        return ChargeRequest(
            idempotency_key=attempt.idempotency_key,
            customer=source.customer,
            payment_method=source.payment_method,
            amount_minor=to_minor_units(recharge.total, recharge.currency),
            currency=recharge.currency,
            description=f"recharged {recharge.kind} recharge {recharge.id} for {recharge.account_id}",
            metadata={
                "recharged_account": recharge.account_id,
                "recharged_recharge": str(recharge.id),
                "recharged_attempt": attempt.idempotency_key,
            },
        )

    def _send(self, recharge_id: int, attempt: _Attempt, now: datetime, progress: _Progress) -> Step:
        """charging -> paid (credited at once) | claimed (declined) | failed: send, or re-send with the same key, or
        look up; the recharge's lease is held."""
        request = attempt.request
        crashpoint("before_request")
        try:
            result = self._ask(request, attempt.started, attempt.payment_intent, now)
        except ProcessorFault as exc:
            # The processor may have stored its 5xx against the key and would replay it: never send the key again.
            # Look the payment up by what we sent; without one, set the attempt aside and try afresh later.
            log.warning("charge.processor_fault", recharge=recharge_id, error=str(exc))
            try:
                result = self.gateway.find(request.customer, request.idempotency_key, attempt.started)
            except TransientPaymentError as lookup:
                self._release(recharge_id, f"{exc}; the payment could not be looked up yet: {lookup}")
                return None
            if result is None:
                why = f"{exc}; no payment was made under its key, a new attempt will follow"
                return self._settle(recharge_id, attempt.id, None, progress, set_aside=why)
        except TransientPaymentError as exc:
            log.warning("charge.unknown", recharge=recharge_id, error=str(exc))
            self._release(recharge_id, f"processor unreachable, will retry: {exc}")
            return None
        except PaymentError as exc:
            log.error("charge.refused", recharge=recharge_id, error=str(exc))
            self._release(recharge_id, f"processor refused the request: {exc}")
            raise
        crashpoint("after_response")
        if result is None and (skewed := self.clock_skew_problem()) is not None:
            # "No payment" is concluded only when the processor positively has none for the key; with our clock
            # this far off its own, the lookup's window cannot be trusted: keep the recharge open and alert.
            log.error("charge.lookup_untrusted", recharge=recharge_id, problem=skewed)
            self._release(recharge_id, f"no payment found, but not concluded: {skewed}")
            return None
        return self._settle(recharge_id, attempt.id, result, progress)

    def _ask(
        self, request: ChargeRequest, started: datetime, known_intent: str | None, now: datetime
    ) -> PaymentResult | None:
        """The processor's answer for this attempt; None when the key has expired and no payment exists."""
        if known_intent is not None:  # the processor told us the payment id already (it was still processing)
            return self.gateway.retrieve(known_intent)
        if now - started < timedelta(hours=self._payments.idempotency_window_hours):
            return self.gateway.charge(request)
        # Past the processor's idempotency window: never send again, only look for what the key did.
        return self.gateway.find(request.customer, request.idempotency_key, started)

    def _settle(
        self,
        recharge_id: int,
        attempt_id: int,
        result: PaymentResult | None,
        progress: _Progress,
        *,
        set_aside: str | None = None,
    ) -> Step:
        """Record the processor's answer for an attempt and move the recharge on; a payment is credited in the same
        transaction (paid -> credited). `result` None: no payment exists for the attempt; with `set_aside`, because
        the processor failed (the recharge waits for a new attempt), else because the key's window passed without
        one (the recharge fails)."""
        try:
            return self._record(recharge_id, attempt_id, result, progress, set_aside, credit=True)
        except Exception:
            if result is None or result.outcome != AttemptStatus.SUCCEEDED:
                raise
            # The credit failed (the ledger's bounds, the database): the payment is recorded without it, so that
            # recovery credits it as paid without asking the processor again; then this fails as the credit did.
            self._record(recharge_id, attempt_id, result, progress, set_aside, credit=False)
            raise

    def _record(
        self,
        recharge_id: int,
        attempt_id: int,
        result: PaymentResult | None,
        progress: _Progress,
        set_aside: str | None,
        *,
        credit: bool,
    ) -> Step:
        """`_settle` in one transaction; a payment is credited in it only with `credit`."""
        now = self._clock.now()
        with self._db.transaction() as session:
            locked = lock_recharge_with(session, recharge_id)
            recharge = locked.recharge
            if result is not None and result.outcome == AttemptStatus.PENDING:
                session.get(ChargeAttempt, attempt_id).payment_intent = result.payment_intent  # type: ignore[union-attr]
                recharge.lease_until, recharge.outcome = None, "payment processing at the processor"
                return None
            status = AttemptStatus.ABANDONED if result is None else result.outcome
            values: dict[str, object] = {"status": status, "finished_at": now}
            if set_aside is not None:
                values["message"] = set_aside[:500]
            if result is not None:
                values |= {
                    "payment_intent": result.payment_intent,
                    "decline_class": result.decline_class,
                    "code": result.code,
                    "decline_code": result.decline_code,
                    "advice_code": result.advice_code,
                    "message": (result.message or "")[:500] or None,
                }
            if not settle_attempt(session, attempt_id, values):
                return recharge.phase  # another worker recorded this outcome first
            recharge.lease_until, recharge.updated_at = None, now
            source = locked.source
            assert source is not None
            card = card_label(source, expiry=False)
            if set_aside is not None:
                recharge.phase, recharge.outcome = Phase.CLAIMED, set_aside[:200]
                log.warning("charge.set_aside", recharge=recharge_id, account=recharge.account_id, why=set_aside)
                self._observer.attempted(status, None)
                return None  # a new attempt (new key) when recovery next takes it up, not in a loop now
            if result is None:
                recharge.phase = Phase.FAILED
                recharge.outcome = "no payment found for the attempt after the processor's idempotency window"
            elif result.outcome == AttemptStatus.ERROR:
                # Our request was refused: the recharge ends, and neither the card nor the customer hears of it.
                recharge.phase, recharge.outcome = Phase.FAILED, f"integration error: {result.message}"[:200]
                if result.code in NOT_HELD:  # ids we hold wrong: set the card aside (the next cycle tries the next)
                    source.unusable_reason = (
                        f"{result.code} on {now:%Y-%m-%d}: the processor does not hold this card for this customer; "
                        "our record of the card is wrong, not the customer's card: check its ids and add it again"
                    )[:200]
                    webhooks.funding_source_unusable(session, source, now)
                log.error(
                    "charge.integration_error",
                    recharge=recharge_id,
                    account=recharge.account_id,
                    code=result.code,
                    error=result.message,
                )
            elif result.outcome == AttemptStatus.SUCCEEDED:
                recharge.phase, recharge.payment_intent, recharge.outcome = (
                    Phase.PAID,
                    result.payment_intent,
                    f"paid by {card}",
                )
            elif result.outcome == AttemptStatus.ACTION_REQUIRED:
                # Set aside for this recharge only: the next card is tried (see `_fail` when none is left).
                recharge.phase = Phase.CLAIMED
                recharge.outcome = f"{card} needs the customer to authenticate; trying the next source"
            else:
                why = result.decline_code or result.code or "declined"
                recharge.phase, recharge.outcome = Phase.CLAIMED, f"{card} declined ({why}); trying the next source"
                if result.decline_class == DeclineClass.HARD:
                    source.unusable_reason = f"{why} on {now:%Y-%m-%d}"
                    webhooks.funding_source_unusable(session, source, now)
                notices.declined_attempt(session, recharge, attempt_id, source, now, self._payments)
            log.info(
                "charge.attempt",
                recharge=recharge_id,
                account=recharge.account_id,
                amount=format_ledger(recharge.total),
                currency=recharge.currency,
                card=card,
                outcome=status,
                decline=None if result is None else result.decline_code or result.code,
            )
            if recharge.phase == Phase.FAILED:  # no payment found, or our request refused
                webhooks.recharge_failed(session, recharge, now)
            if credit:  # else counted when it was first recorded, with its credit
                self._observer.attempted(status, None if result is None else result.decline_class)
            if recharge.phase != Phase.PAID or not credit:
                return recharge.phase
            credited = self._post_credit(session, locked, now)
        return self._credited(credited, progress)

    def _credit(self, recharge_id: int, progress: _Progress) -> Step:
        """paid -> credited, for a recharge found paid: its credit failed when its payment was recorded, or its payment
        turned up after it had failed."""
        now = self._clock.now()
        with self._db.transaction() as session:
            locked = lock_recharge_with(session, recharge_id)
            if locked.recharge.phase != Phase.PAID:
                return locked.recharge.phase
            credited = self._post_credit(session, locked, now)
        return self._credited(credited, progress)

    def _post_credit(self, session: Session, locked: LockedRecharge, now: datetime) -> RechargeReport:
        """paid -> credited in the caller's transaction, which holds the recharge's locks: the ledger credit (unique
        per PaymentIntent), the account no longer due nor backing off, and the receipt, numbered last. Returns the
        recharge as it then is."""
        recharge, account, source = locked.recharge, locked.account, locked.source  # the account's balance as locked
        assert source is not None
        assert recharge.payment_intent is not None
        entry_type = EntryType.RECHARGE if recharge.kind == RechargeKind.AUTO else EntryType.TOPUP
        balance = account.balance
        with session.no_autoflush:  # the recharge's changes are written once, with its new phase
            posted = post_entry(
                session, account.id, entry_type, recharge.payment_intent, recharge.amount, now, locked=account
            )
        balance_after = balance + recharge.amount if posted else balance
        account.due_since = None
        if account.recharge_state == RechargeState.BACKING_OFF:
            account.recharge_state, account.failed_cycles, account.retry_at, account.state_reason = (
                RechargeState.OK,
                0,
                None,
                None,
            )
        recharge.phase, recharge.updated_at = Phase.CREDITED, now
        receipt = issue_receipt(session, self._settings, recharge, now, balance_after=balance_after)
        return RechargeReport(
            recharge.id,
            recharge.account_id,
            recharge.kind,
            Phase.CREDITED,
            recharge.currency,
            recharge.amount,
            recharge.total,
            recharge.outcome or "",
            card_label(source, expiry=False),
            receipt=receipt.number,
            balance_after=balance_after,
        )

    def _credited(self, credited: RechargeReport, progress: _Progress) -> Step:
        """After the commit of a credit."""
        crashpoint("after_credit")
        self._observer.credited(credited.kind, credited.amount, credited.currency)
        progress.report = credited
        return Phase.CREDITED

    def _finish(self, recharge_id: int, progress: _Progress) -> Step:
        """credited -> finished."""
        with self._db.transaction() as session:
            finished = finish_recharge(session, recharge_id, self._clock.now())
            if finished is None:  # another worker finished it
                phase: Phase = session.scalars(select(Recharge.phase).where(Recharge.id == recharge_id)).one()
                return phase
        log.info(
            "recharge.finished",
            recharge=recharge_id,
            account=finished.account_id,
            kind=finished.kind,
            amount=format_ledger(finished.amount),
            total=format_ledger(finished.total),
            currency=finished.currency,
            payment_intent=finished.payment_intent,
        )
        if progress.report is not None:
            progress.report = replace(progress.report, phase=Phase.FINISHED)
        return Phase.FINISHED

    def _fail(self, session: Session, recharge: Recharge, now: datetime) -> None:
        """No funding source is left to try: the recharge fails. When a card needed the customer to authenticate,
        the customer is asked to, and only automatic recharge waits for it (a top-up pauses nothing). Otherwise an
        automatic recharge backs the account off one step of the retry schedule (suspended after the last)."""
        tried = attempts_of(session, recharge.id)
        recharge.phase, recharge.updated_at = Phase.FAILED, now
        recharge.outcome = "every funding source declined" if tried else "no funding source can be charged now"
        account = session.get(Account, recharge.account_id)
        assert account is not None
        needs_customer = last_attempt_with(session, recharge.id, AttemptStatus.ACTION_REQUIRED)
        if needs_customer is not None:
            source = session.get(FundingSource, needs_customer.source_id)
            assert source is not None
            card = card_label(source, expiry=False)
            recharge.outcome = f"{card} needs the customer to authenticate; no other card could pay"
            if recharge.kind == RechargeKind.AUTO:
                account.recharge_state = RechargeState.ACTION_REQUIRED
                account.state_reason = f"{card} needs the customer to authenticate; automatic recharge paused"
            notices.action_required(session, recharge, needs_customer.id, source, now)
            webhooks.recharge_action_required(session, recharge, needs_customer.id, now)
            return
        if recharge.kind != RechargeKind.AUTO or not tried:
            notices.recharge_failed(session, recharge, now)
            webhooks.recharge_failed(session, recharge, now)
            return
        schedule = self._payments.retry_schedule_hours
        account.failed_cycles += 1
        if account.failed_cycles > len(schedule):
            account.recharge_state, account.retry_at = RechargeState.SUSPENDED, None
            account.state_reason = f"suspended after {account.failed_cycles} failed recharge cycles"
        else:
            account.recharge_state = RechargeState.BACKING_OFF
            account.retry_at = now + timedelta(hours=schedule[account.failed_cycles - 1])
            account.state_reason = (
                f"{plural(account.failed_cycles, 'failed recharge cycle')}; "
                f"next try {account.retry_at:%Y-%m-%d %H:%M} UTC"
            )
        notices.recharge_failed(session, recharge, now)
        webhooks.recharge_failed(session, recharge, now)
        if account.recharge_state == RechargeState.SUSPENDED:
            webhooks.auto_recharge_suspended(session, recharge, now)

    def _release(self, recharge_id: int, outcome: str) -> None:
        with self._db.transaction() as session:
            recharge = lock_recharge(session, recharge_id)
            recharge.lease_until, recharge.outcome = None, outcome[:200]

    def report(self, recharge_id: int) -> RechargeReport:
        with self._db.reading() as session:
            r = session.get(Recharge, recharge_id)
            assert r is not None
            source = session.get(FundingSource, r.source_id) if r.source_id is not None else None
            refused = r.phase == Phase.FAILED and last_attempt_with(session, r.id, AttemptStatus.ERROR) is not None
            receipt = session.scalars(select(Receipt).where(Receipt.recharge_id == r.id)).one_or_none()
            return RechargeReport(
                r.id,
                r.account_id,
                r.kind,
                r.phase,
                r.currency,
                r.amount,
                r.total,
                r.outcome or "",
                card_label(source, expiry=False) if source else None,
                refused,
                None if receipt is None else receipt.number,
                None if receipt is None else receipt.balance_after,
            )
