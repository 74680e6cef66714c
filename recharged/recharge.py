"""The charge flow: decide, claim, charge, credit, finish; and recovery of whatever a crash left half-way.

A recharge is a row that moves through recorded phases, each one transaction, in the spirit of Stripe's
idempotency keys with recovery points:

    claimed  --(attempt + idempotency key stored)-->  charging  --(processor answered)-->  paid
    paid  --(ledger credit, unique per PaymentIntent)-->  credited  -->  finished
    charging --(declined)--> claimed (next funding source)      any phase --> failed (nothing was charged)

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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Protocol

import structlog
from sqlalchemy.orm import Session

from recharged.balance import runs_out_within
from recharged.clock import Clock
from recharged.config import Settings
from recharged.errors import ConflictError, InputError, NotFoundError
from recharged.faults import crashpoint
from recharged.mail import notices
from recharged.mail.receipts import issue_receipt
from recharged.money import Units, format_ledger, minor_step, percent_of, to_minor_units
from recharged.payments import (
    ChargeRequest,
    PaymentError,
    PaymentGateway,
    PaymentResult,
    TransientPaymentError,
    card_label,
)
from recharged.planning import AccountPlan, plan_accounts, plans_in
from recharged.store.charging import (
    attempts_of,
    candidate_sources,
    insert_recharge,
    lock_recharge,
    open_recharge_ids,
    pending_attempt,
    settle_attempt,
    take_lease,
    try_claim_lock,
)
from recharged.store.engine import Database
from recharged.store.ledger import lock_account, mark_due, post_entry
from recharged.store.models import Account, ChargeAttempt, FundingSource, Recharge

log = structlog.get_logger("recharged.recharge")
TERMINAL = ("finished", "failed")
_BUSY = -1  # claim_due: another worker holds the account's claim lock


@dataclass(frozen=True, slots=True)
class RechargeReport:
    """Where one recharge ended up after processing."""

    recharge_id: int
    account_id: str
    kind: str
    phase: str
    currency: str
    amount: Units
    total: Units
    outcome: str
    source: str | None


@dataclass
class CycleReport:
    at: datetime
    recovered: list[RechargeReport] = field(default_factory=list)
    charged: list[RechargeReport] = field(default_factory=list)
    not_claimed: list[str] = field(default_factory=list)  # no longer due when re-decided under the lock
    errors: dict[str, str] = field(default_factory=dict)  # account -> what went wrong (the cycle goes on)
    left_for_next: list[str] = field(default_factory=list)  # due, but the daemon was stopping
    accounts: int = 0

    def summary(self) -> dict[str, object]:
        """Counts and amounts (per currency, in the ledger's 5-decimal form) for logs, status and job runs."""
        charged: dict[str, int] = {}
        for r in self.charged:
            if r.phase == "finished":
                charged[r.currency] = charged.get(r.currency, 0) + r.total
        return {
            "accounts": self.accounts,
            "due": len(self.charged) + len(self.not_claimed) + len(self.errors) + len(self.left_for_next),
            "charged": sum(1 for r in self.charged if r.phase == "finished"),
            "failed": sum(1 for r in self.charged if r.phase == "failed"),
            "waiting": sum(1 for r in self.charged if r.phase not in TERMINAL),
            "not_claimed": len(self.not_claimed),
            "errors": len(self.errors),
            "left_for_next": len(self.left_for_next),
            "recovered": len(self.recovered),
            "charged_total": {currency: format_ledger(total) for currency, total in sorted(charged.items())},
        }


class Observer(Protocol):
    """Hears what the charge flow decides and does (the daemon's metrics)."""

    def decided(self, plan: AccountPlan) -> None: ...

    def attempted(self, status: str, decline_class: str | None) -> None: ...

    def credited(self, kind: str, amount: Units, currency: str) -> None: ...


class _Unobserved:
    def decided(self, plan: AccountPlan) -> None:
        pass

    def attempted(self, status: str, decline_class: str | None) -> None:
        pass

    def credited(self, kind: str, amount: Units, currency: str) -> None:
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
        self._account_of: dict[int, str] = {}  # recharge -> account, while a recharge is being processed

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

        def charge(account_id: str, wait_for_lock: bool) -> str | None:
            """The account id again when another instance was claiming it at that moment."""
            if stop is not None and stop.is_set():
                report.left_for_next.append(account_id)
                return None
            try:
                recharge_id = self.claim_due(account_id, at, wait_for_lock=wait_for_lock)
                if recharge_id == _BUSY:
                    return account_id
                if recharge_id is None:
                    report.not_claimed.append(account_id)
                else:
                    report.charged.append(self.process(recharge_id, "claimed"))
            except Exception as exc:  # one account's trouble never stops the others' charges
                log.exception("cycle.account_failed", account=account_id, error=str(exc))
                report.errors[account_id] = str(exc)[:300]
            return None

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="charge") as pool:
            busy = [a for a in pool.map(lambda a: charge(a, False), due) if a is not None]
            # Claimed by another instance a moment ago: decide again now, when its claim is visible.
            list(pool.map(lambda a: charge(a, True), busy))
        return report

    def charge_now(self, account_id: str) -> RechargeReport | None:
        """Charge one account at once if it is due (usage made its runway too short to wait for the cycle)."""
        recharge_id = self.claim_due(account_id, self._clock.now(), wait_for_lock=True)
        if recharge_id is None or recharge_id == _BUSY:
            return None
        return self.process(recharge_id, "claimed")

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
            for plan in plans_in(session, self._settings, at, ids):
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
        return [self.process(recharge_id) for recharge_id in ids]

    def topup(self, account_id: str, amount: Units, actor: str) -> RechargeReport:
        """A one-time purchase charged now through the same flow."""
        with self._db.transaction() as session:
            account = session.get(Account, account_id)
            if account is None:
                raise NotFoundError(f"no account {account_id!r}")
            step = minor_step(account.currency)
            if amount <= 0 or amount % step:
                whole = f"whole {account.currency} minor units"
                raise InputError(f"top-up amount {format_ledger(amount)} must be positive and in {whole}")
        recharge_id = self.claim(account_id, amount, kind="topup", actor=actor)
        if recharge_id is None:
            raise ConflictError(f"account {account_id} has a recharge in progress; try again when it has finished")
        return self.process(recharge_id)

    # --- phases --------------------------------------------------------------------------------------------

    def claim_due(self, account_id: str, at: datetime, *, wait_for_lock: bool = True) -> int | None:
        """Claim an automatic recharge if the account is still due, decided afresh under its lock: a plan made
        moments ago may be stale (another worker may have charged it since). None when not due any more;
        `_BUSY` when `wait_for_lock` is false and another worker is claiming the account right now."""
        with self._db.transaction() as session:
            if not try_claim_lock(session, account_id, wait=wait_for_lock):
                return _BUSY
            account = lock_account(session, account_id)
            if account is None:
                return None
            decision = next(plans_in(session, self._settings, at, [account_id])).decision
            if decision.action != "charge":
                return None
            recharge_id = self._insert_claim(
                session,
                account,
                decision.charge_amount,
                kind="auto",
                average_daily=decision.average_daily,
                threshold=decision.threshold,
            )
            crashpoint("before_claim_commit")
        if recharge_id is not None:
            crashpoint("after_claim")
        return recharge_id

    def claim(self, account_id: str, amount: Units, *, kind: str, actor: str | None = None) -> int | None:
        """Record a recharge of a given amount as open; None if the account already has an open one."""
        with self._db.transaction() as session:
            account = lock_account(session, account_id)
            if account is None:
                raise NotFoundError(f"no account {account_id!r}")
            recharge_id = self._insert_claim(session, account, amount, kind=kind, actor=actor)
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
        kind: str,
        average_daily: Units | None = None,
        threshold: Units | None = None,
        actor: str | None = None,
    ) -> int | None:
        now = self._clock.now()
        vat = percent_of(amount, Decimal(account.vat_percent), account.currency)
        return insert_recharge(
            session,
            {
                "account_id": account.id,
                "kind": kind,
                "phase": "claimed",
                "currency": account.currency,
                "amount": amount,
                "vat": vat,
                "total": amount + vat,
                "vat_percent": account.vat_percent,
                "balance_before": account.balance,
                "average_daily": average_daily,
                "threshold": threshold,
                "actor": actor,
                "created_at": now,
                "updated_at": now,
            },
        )

    def process(self, recharge_id: int, phase: str | None = None) -> RechargeReport:
        """Advance a recharge until it is finished, failed, or waiting on the processor. Each step re-checks
        the phase under the recharge's lock and returns the phase it left the recharge in; `phase` is where
        the caller knows it stands (a claim it just made), else it is read."""
        if phase is None:
            with self._db.reading() as session:
                phase = session.get(Recharge, recharge_id).phase  # type: ignore[union-attr]
        steps = {
            "claimed": self._choose_source,
            "charging": self._charge,
            "paid": self._credit,
            "credited": self._finish,
        }
        try:
            while phase in steps:
                phase = steps[phase](recharge_id)
        finally:
            self._account_of.pop(recharge_id, None)
        return self.report(recharge_id)

    def _lock(self, session: Session, recharge_id: int) -> Recharge:
        """`lock_recharge`, remembering the recharge's account (it never changes) for the next step's lock."""
        recharge = lock_recharge(session, recharge_id, self._account_of.get(recharge_id))
        self._account_of[recharge_id] = recharge.account_id
        return recharge

    def _choose_source(self, recharge_id: int) -> str:
        """claimed -> charging: store a new attempt and its idempotency key before any request."""
        now = self._clock.now()
        with self._db.transaction() as session:
            recharge = self._lock(session, recharge_id)
            if recharge.phase != "claimed":
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
                return "failed"
            source = sources[0]
            session.add(
                ChargeAttempt(
                    recharge_id=recharge.id,
                    source_id=source.id,
                    idempotency_key=f"recharged-{uuid.uuid4()}",
                    status="pending",
                    created_at=now,
                )
            )
            recharge.phase, recharge.source_id, recharge.updated_at = "charging", source.id, now
        crashpoint("after_attempt_stored")
        return "charging"

    def _charge(self, recharge_id: int) -> str:
        """charging -> paid | claimed (declined) | failed: send, or re-send with the same key, or look up."""
        now = self._clock.now()
        with self._db.transaction() as session:
            self._lock(session, recharge_id)
            if not take_lease(session, recharge_id, now, now + timedelta(seconds=self._payments.lease_seconds)):
                return "waiting"
            recharge = session.get(Recharge, recharge_id)
            attempt = pending_attempt(session, recharge_id)
            assert recharge is not None and attempt is not None, f"recharge {recharge_id} charging without attempt"
            source = session.get(FundingSource, attempt.source_id)
            assert source is not None
            request = ChargeRequest(
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
            attempt_id, attempt_started, known_intent = attempt.id, attempt.created_at, attempt.payment_intent

        crashpoint("before_request")
        try:
            result = self._ask(request, attempt_started, known_intent, now)
        except TransientPaymentError as exc:
            log.warning("charge.unknown", recharge=recharge_id, error=str(exc))
            self._release(recharge_id, f"processor unreachable, will retry: {exc}")
            return "waiting"
        except PaymentError as exc:
            log.error("charge.refused", recharge=recharge_id, error=str(exc))
            self._release(recharge_id, f"processor refused the request: {exc}")
            raise
        crashpoint("after_response")
        return self._settle(recharge_id, attempt_id, result)

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

    def _settle(self, recharge_id: int, attempt_id: int, result: PaymentResult | None) -> str:
        now = self._clock.now()
        with self._db.transaction() as session:
            recharge = self._lock(session, recharge_id)
            if result is not None and result.outcome == "pending":
                session.get(ChargeAttempt, attempt_id).payment_intent = result.payment_intent  # type: ignore[union-attr]
                recharge.lease_until, recharge.outcome = None, "payment processing at the processor"
                return "waiting"
            status = "abandoned" if result is None else result.outcome
            values: dict[str, object] = {"status": status, "finished_at": now}
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
            source = session.get(FundingSource, recharge.source_id)
            assert source is not None
            card = card_label(source, expiry=False)
            if result is None:
                recharge.phase = "failed"
                recharge.outcome = "no payment found for the attempt after the processor's idempotency window"
            elif result.outcome == "succeeded":
                recharge.phase, recharge.payment_intent, recharge.outcome = (
                    "paid",
                    result.payment_intent,
                    f"paid by {card}",
                )
            elif result.outcome == "action_required":
                recharge.phase, recharge.outcome = "failed", f"{card} needs the customer to authenticate"
                account = session.get(Account, recharge.account_id)
                assert account is not None
                account.recharge_state, account.state_reason = "action_required", recharge.outcome
                notices.action_required(session, recharge, attempt_id, source, now)
            else:
                why = result.decline_code or result.code or "declined"
                recharge.phase, recharge.outcome = "claimed", f"{card} declined ({why}); trying the next source"
                if result.decline_class == "hard":
                    source.unusable_reason = f"{why} on {now:%Y-%m-%d}"
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
            self._observer.attempted(status, None if result is None else result.decline_class)
            return recharge.phase

    def _credit(self, recharge_id: int) -> str:
        """paid -> credited: the ledger credit, unique per PaymentIntent."""
        now = self._clock.now()
        with self._db.transaction() as session:
            recharge = self._lock(session, recharge_id)
            if recharge.phase != "paid":
                return recharge.phase
            assert recharge.payment_intent is not None
            entry_type = "recharge" if recharge.kind == "auto" else "topup"
            post_entry(session, recharge.account_id, entry_type, recharge.payment_intent, recharge.amount, now)
            account = session.get(Account, recharge.account_id)
            assert account is not None
            account.due_since = None
            if account.recharge_state == "backing_off":
                account.recharge_state, account.failed_cycles, account.retry_at, account.state_reason = (
                    "ok",
                    0,
                    None,
                    None,
                )
            recharge.phase, recharge.updated_at = "credited", now
            issue_receipt(session, self._settings, recharge, now)  # numbered and queued with the credit
            kind, amount, currency = recharge.kind, recharge.amount, recharge.currency
        crashpoint("after_credit")
        self._observer.credited(kind, amount, currency)
        return "credited"

    def _finish(self, recharge_id: int) -> str:
        with self._db.transaction() as session:
            recharge = self._lock(session, recharge_id)
            if recharge.phase == "credited":
                recharge.phase, recharge.updated_at = "finished", self._clock.now()
                log.info(
                    "recharge.finished",
                    recharge=recharge_id,
                    account=recharge.account_id,
                    kind=recharge.kind,
                    amount=format_ledger(recharge.amount),
                    total=format_ledger(recharge.total),
                    currency=recharge.currency,
                    payment_intent=recharge.payment_intent,
                )
            return recharge.phase

    def _fail(self, session: Session, recharge: Recharge, now: datetime) -> None:
        """No funding source is left to try: the recharge fails and, for an automatic one, the account backs
        off one step of the retry schedule (suspended after the last)."""
        tried = attempts_of(session, recharge.id)
        recharge.phase, recharge.updated_at = "failed", now
        recharge.outcome = "every funding source declined" if tried else "no funding source can be charged now"
        if recharge.kind != "auto" or not tried:
            notices.recharge_failed(session, recharge, now)
            return
        account = session.get(Account, recharge.account_id)
        assert account is not None
        schedule = self._payments.retry_schedule_hours
        account.failed_cycles += 1
        if account.failed_cycles > len(schedule):
            account.recharge_state, account.retry_at = "suspended", None
            account.state_reason = f"suspended after {account.failed_cycles} failed recharge cycles"
        else:
            account.recharge_state = "backing_off"
            account.retry_at = now + timedelta(hours=schedule[account.failed_cycles - 1])
            account.state_reason = (
                f"{account.failed_cycles} failed recharge cycle(s); next try {account.retry_at:%Y-%m-%d %H:%M} UTC"
            )
        notices.recharge_failed(session, recharge, now)

    def _release(self, recharge_id: int, outcome: str) -> None:
        with self._db.transaction() as session:
            recharge = self._lock(session, recharge_id)
            recharge.lease_until, recharge.outcome = None, outcome[:200]

    def report(self, recharge_id: int) -> RechargeReport:
        with self._db.reading() as session:
            r = session.get(Recharge, recharge_id)
            assert r is not None
            source = session.get(FundingSource, r.source_id) if r.source_id is not None else None
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
            )
