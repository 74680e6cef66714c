"""SQLAlchemy 2 models: the tables recharged keeps. Money columns are BIGINT Units (1/100,000)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from recharged.audit import current_via
from recharged.states import (
    CLOSED_PHASES,
    CREDIT_TYPES,
    REVERSAL_TYPES,
    AttemptStatus,
    AuthorizationStatus,
    DeclineClass,
    EntryType,
    EventStatus,
    JobStatus,
    Measure,
    OutboxStatus,
    Phase,
    RechargeKind,
    RechargeState,
    WebhookEventType,
    WebhookStatus,
)

if TYPE_CHECKING:
    from recharged.payments import CardInfo

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to a UTC column")
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class DecimalText(TypeDecorator[Decimal]):
    """An exact decimal kept as text (SQLite has no decimal type; Numeric would pass through float)."""

    impl = String(24)
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> str | None:
        return None if value is None else str(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value)


E = TypeVar("E", bound=StrEnum)


class StateText(TypeDecorator[E]):
    """A value of one of the vocabularies in `states.py`, stored as its string; an unknown value is refused
    before it reaches the database, and values read back are members of the enum. The CHECK constraints built
    with `one_of` say the same in the database (those marked `ddl_if(dialect="postgresql")` on PostgreSQL only:
    migration 0005 says why)."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


def one_of(column: str, values: Iterable[StrEnum], *, negated: bool = False) -> str:
    """SQL that holds when `column` is one of `values` (or none of them, `negated`), for CHECK constraints and
    partial indexes."""
    listed = ", ".join(f"'{v.value}'" for v in values)
    return f"{column} {'NOT IN' if negated else 'IN'} ({listed})"


BigId = BigInteger().with_variant(Integer(), "sqlite")  # INTEGER PRIMARY KEY is SQLite's rowid


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    """A customer of the dialer, with a prepaid balance in its currency."""

    __tablename__ = "accounts"
    __table_args__ = (
        # PostgreSQL only, as in migration 0005: SQLite adds a CHECK only by rebuilding the table.
        CheckConstraint("(closed_at IS NULL) = (closed_reason IS NULL)", name="closed_with_reason").ddl_if(
            dialect="postgresql"
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    email: Mapped[str] = mapped_column(String(254))
    plan: Mapped[str] = mapped_column(String(40))
    currency: Mapped[str] = mapped_column(String(3))
    vat_percent: Mapped[Decimal] = mapped_column(DecimalText())
    auto_recharge: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Per-account overrides of the [recharge] policy; NULL means "as configured".
    window_days: Mapped[int | None] = mapped_column(Integer)
    threshold_days: Mapped[int | None] = mapped_column(Integer)
    recharge_days: Mapped[int | None] = mapped_column(Integer)
    min_threshold: Mapped[int | None] = mapped_column(BigInteger)
    min_recharge: Mapped[int | None] = mapped_column(BigInteger)
    max_recharge: Mapped[int | None] = mapped_column(BigInteger)
    max_charged_per_day: Mapped[int | None] = mapped_column(BigInteger)
    max_charged_per_30_days: Mapped[int | None] = mapped_column(BigInteger)
    # Cached sum of the account's ledger entries; `recharged verify` proves it.
    balance: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    # The sum of the open call authorizations' reservations, kept with each of them (`recharged.authorizations`),
    # and how far below zero calls may be authorized (an admin's setting; 0: not at all).
    reserved: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    overdraft: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    first_usage_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Where automatic recharge stands: ok, backing_off (until retry_at), suspended, action_required.
    recharge_state: Mapped[RechargeState] = mapped_column(
        StateText(RechargeState, 20), default=RechargeState.OK, server_default=text("'ok'")
    )
    failed_cycles: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    state_reason: Mapped[str | None] = mapped_column(String(200))
    # When recorded usage first took the balance under its threshold; cleared when the balance is credited.
    due_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Closed by an admin (`accounts close`, NULL while open): never charged, no notices, no statement after the
    # month it closed in, and no usage that started after it. The balance is kept.
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    closed_reason: Mapped[str | None] = mapped_column(String(200))


class FundingSource(Base):
    """A card on file at the processor: the default one is tried first, then the backups in the order added."""

    __tablename__ = "funding_sources"
    __table_args__ = (
        UniqueConstraint("account_id", "payment_method"),
        Index(
            "uq_funding_sources_one_default",
            "account_id",
            unique=True,
            postgresql_where=text("is_default AND removed_at IS NULL"),
            sqlite_where=text("is_default AND removed_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    customer: Mapped[str] = mapped_column(String(64))  # the processor's customer id (cus_...)
    payment_method: Mapped[str] = mapped_column(String(64))  # pm_...
    brand: Mapped[str] = mapped_column(String(20))
    last4: Mapped[str] = mapped_column(String(4))
    exp_month: Mapped[int] = mapped_column(Integer)
    exp_year: Mapped[int] = mapped_column(Integer)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # A hard decline makes a card unusable until an admin updates it.
    unusable_reason: Mapped[str | None] = mapped_column(String(200))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime())
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def hold(self, card: CardInfo) -> None:
        """Take the card's processor ids and display details (a card re-added after removal or a hard decline
        is usable again)."""
        self.customer, self.payment_method = card.customer, card.payment_method
        self.brand, self.last4, self.exp_month, self.exp_year = card.brand, card.last4, card.exp_month, card.exp_year
        self.unusable_reason, self.removed_at = None, None


RECHARGE_OPEN = one_of("phase", CLOSED_PHASES, negated=True)


class Recharge(Base):
    """One recharge (automatic or a one-time purchase) moving through recorded phases, one transaction each:
    claimed -> charging -> paid -> credited -> finished, or failed. One open recharge per account."""

    __tablename__ = "recharges"
    __table_args__ = (
        Index(
            "uq_recharges_one_open_per_account",
            "account_id",
            unique=True,
            postgresql_where=text(RECHARGE_OPEN),
            sqlite_where=text(RECHARGE_OPEN),
        ),
        Index("ix_recharges_open", "phase", postgresql_where=text(RECHARGE_OPEN), sqlite_where=text(RECHARGE_OPEN)),
        Index("ix_recharges_account_created", "account_id", "created_at"),  # the spend caps, by claim time
        CheckConstraint(one_of("phase", Phase), name="known_phase"),
        CheckConstraint(one_of("kind", RechargeKind), name="known_kind").ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    kind: Mapped[RechargeKind] = mapped_column(StateText(RechargeKind, 10))
    phase: Mapped[Phase] = mapped_column(StateText(Phase, 10))
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int] = mapped_column(BigInteger)  # credited to the balance (net)
    vat: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[int] = mapped_column(BigInteger)  # charged: amount + VAT, whole minor units
    vat_percent: Mapped[Decimal] = mapped_column(DecimalText())
    # Why: the figures of the decision (for receipts) or the admin who asked for a top-up.
    balance_before: Mapped[int] = mapped_column(BigInteger)
    average_daily: Mapped[int | None] = mapped_column(BigInteger)
    threshold: Mapped[int | None] = mapped_column(BigInteger)
    # An automatic recharge's decision as it was claimed: its inputs (`balance.DecisionInputs`, which
    # `balance.recompute` decides from again) and its figures. Receipts and views read it; none re-derives it.
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    limited_by: Mapped[str | None] = mapped_column(String(40))  # the floor or cap that set the amount, if any
    actor: Mapped[str | None] = mapped_column(String(120))
    payment_intent: Mapped[str | None] = mapped_column(String(64), unique=True)
    source_id: Mapped[int | None] = mapped_column(ForeignKey("funding_sources.id"))
    outcome: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Recovery of this recharge failed this many times in a row; it is not tried again before recover_after.
    recovery_failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    recover_after: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ChargeAttempt(Base):
    """One request to the processor for a recharge on one funding source, under one idempotency key that
    is stored before the first request is sent."""

    __tablename__ = "charge_attempts"
    __table_args__ = (
        Index(
            "uq_charge_attempts_one_pending",
            "recharge_id",
            unique=True,
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index("ix_charge_attempts_source_time", "source_id", "created_at"),
        CheckConstraint(one_of("status", AttemptStatus), name="known_status").ddl_if(dialect="postgresql"),
        CheckConstraint(
            f"decline_class IS NULL OR {one_of('decline_class', DeclineClass)}", name="known_decline"
        ).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    recharge_id: Mapped[int] = mapped_column(ForeignKey("recharges.id"), index=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("funding_sources.id"))
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[AttemptStatus] = mapped_column(StateText(AttemptStatus, 16))
    payment_intent: Mapped[str | None] = mapped_column(String(64))
    decline_class: Mapped[DeclineClass | None] = mapped_column(StateText(DeclineClass, 10))
    code: Mapped[str | None] = mapped_column(String(64))
    decline_code: Mapped[str | None] = mapped_column(String(64))
    advice_code: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Rate(Base):
    """A snapshot of a price as it was applied: usage entries point at the rate that priced them."""

    __tablename__ = "rates"
    __table_args__ = (
        UniqueConstraint(
            "plan",
            "kind",
            "measure",
            "price",
            "increment_seconds",
            "minimum_seconds",
            "connect_fee",
            "unit",
            name="uq_rates_snapshot",
        ),
        CheckConstraint(one_of("measure", Measure), name="known_measure").ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    plan: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(40))
    measure: Mapped[Measure] = mapped_column(StateText(Measure, 8))
    price: Mapped[int] = mapped_column(BigInteger)  # per minute (time) or per unit (count)
    increment_seconds: Mapped[int] = mapped_column(Integer)  # 0 for count rates
    minimum_seconds: Mapped[int] = mapped_column(Integer)
    connect_fee: Mapped[int] = mapped_column(BigInteger)
    unit: Mapped[str] = mapped_column(String(40))


class Entry(Base):
    """One line of the append-only ledger: a debit (negative) or credit (positive) with a unique origin."""

    __tablename__ = "entries"
    __table_args__ = (
        UniqueConstraint("entry_type", "external_id"),
        CheckConstraint("entry_type <> 'usage' OR amount <= 0", name="usage_is_a_debit"),
        CheckConstraint(one_of("entry_type", EntryType), name="known_type"),
        # Charges by time, for the spend caps: a partial index that usage entries (the bulk) never touch.
        Index(
            "ix_entries_charges",
            "account_id",
            "occurred_at",
            postgresql_where=text(one_of("entry_type", CREDIT_TYPES)),
            sqlite_where=text(one_of("entry_type", CREDIT_TYPES)),
        ),
        # An adjustment's reference is unique per account (the same one on another account is another adjustment);
        # partial, so usage entries never touch it.
        Index(
            "uq_entries_adjustment_reference",
            "account_id",
            "reference",
            unique=True,
            postgresql_where=text("reference IS NOT NULL"),
            sqlite_where=text("reference IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # No index of its own: nothing reads entries by account alone (plans and statements read daily_usage, caps
    # the partial index below), and every usage insert would pay for one.
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    entry_type: Mapped[EntryType] = mapped_column(StateText(EntryType, 16))
    external_id: Mapped[str] = mapped_column(String(128))
    amount: Mapped[int] = mapped_column(BigInteger)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Usage details (NULL for other entry types): what was rated, and by which rate.
    kind: Mapped[str | None] = mapped_column(String(40))
    duration_seconds: Mapped[int | None] = mapped_column(Integer)
    quantity: Mapped[int | None] = mapped_column(BigInteger)
    billable_quantity: Mapped[int | None] = mapped_column(BigInteger)
    rate_id: Mapped[int | None] = mapped_column(ForeignKey("rates.id"))
    note: Mapped[str | None] = mapped_column(String(500))
    # Reversals (refund, dispute, reinstated): the PaymentIntent whose credit they reverse. NULL otherwise.
    payment_intent: Mapped[str | None] = mapped_column(String(64))
    # Adjustments: the admin's reference (`adjust --reference`, or the id made up when none was given), unique per
    # account; `reconcile` reads one that names a PaymentIntent as that payment's credit. NULL otherwise.
    reference: Mapped[str | None] = mapped_column(String(128))


class DailyUsage(Base):
    """Usage per account, UTC day and kind, kept as usage is recorded: what plans and statements read."""

    __tablename__ = "daily_usage"
    __table_args__ = (Index("ix_daily_usage_day", "day"),)

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    kind: Mapped[str] = mapped_column(String(40), primary_key=True)
    events: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(BigInteger)  # billable seconds or units
    amount: Mapped[int] = mapped_column(BigInteger)  # cost, positive


class AuditRecord(Base):
    """Who changed an account's billing settings, when, and the values before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    actor: Mapped[str] = mapped_column(String(120))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    action: Mapped[str] = mapped_column(String(40))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # the API token that made the change ("api:crm"); NULL for the CLI. Filled from `recharged.audit.via` when not
    # given, so every service writes it without knowing of the API.
    via: Mapped[str | None] = mapped_column(String(64), default=lambda: current_via())


class ApiIdempotency(Base):
    """An `Idempotency-Key` of the HTTP API: the request it first came with (a fingerprint), the recharge it
    claimed, written in the claim's transaction, and the answer once that recharge has finished."""

    __tablename__ = "api_idempotency"
    __table_args__ = (UniqueConstraint("token", "key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token: Mapped[str] = mapped_column(String(64))  # the token's name: each token has its own keys
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the method, path and body
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    recharge_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("recharges.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    response_status: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class JobRun(Base):
    """One run of a scheduled job (the recharge cycle, the completer, ...) by one daemon instance: what ops
    and `recharged status` read to see the last and next cycle, whichever instance ran it."""

    __tablename__ = "job_runs"
    __table_args__ = (
        Index("ix_job_runs_job_started", "job", "started_at"),
        CheckConstraint(one_of("status", JobStatus), name="known_status").ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(40))
    instance: Mapped[str] = mapped_column(String(120))  # host:pid
    status: Mapped[JobStatus] = mapped_column(StateText(JobStatus, 12))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(String(500))


class ProcessorEvent(Base):
    """The inbox of processor events (Stripe webhooks): stored with the object as the event carried it, in the
    transaction that answers the webhook, and handled later, once, by `recharged.events`. The object is never
    trusted for amounts or states: the handler re-reads it from the processor.

    pending -> handled | ignored; a failed attempt leaves it pending with `last_error` and `next_attempt_at`."""

    __tablename__ = "processor_events"
    __table_args__ = (
        Index("ix_processor_events_status_due", "status", "next_attempt_at"),
        CheckConstraint(one_of("status", EventStatus), name="known_status"),
    )

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # evt_...
    type: Mapped[str] = mapped_column(String(80))
    object_id: Mapped[str | None] = mapped_column(String(255))  # pi_..., ch_..., re_..., du_..., pm_..., cus_...
    payload: Mapped[Any] = mapped_column(JSON, nullable=True)  # the event's data.object, as received
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[EventStatus] = mapped_column(StateText(EventStatus, 10))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    handled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    account_id: Mapped[str | None] = mapped_column(String(64))  # the account it concerned, once known
    outcome: Mapped[str | None] = mapped_column(String(200))
    last_error: Mapped[str | None] = mapped_column(String(500))


# Reversals (refunds, disputes, reinstated funds) by time, for `reconcile`: a partial index usage never touches.
Index(
    "ix_entries_reversals",
    Entry.occurred_at,
    postgresql_where=text(one_of("entry_type", REVERSAL_TYPES)),
    sqlite_where=text(one_of("entry_type", REVERSAL_TYPES)),
)

# --- receipts, the outbox, notices and statements -------------------------------------------------------------

# Statements read an account's credits and adjustments by time: a partial index the usage entries never touch.
Index(
    "ix_entries_non_usage",
    Entry.account_id,
    Entry.occurred_at,
    postgresql_where=text(f"entry_type <> '{EntryType.USAGE.value}'"),
    sqlite_where=text(f"entry_type <> '{EntryType.USAGE.value}'"),
)


class ReceiptCounter(Base):
    """The last receipt number of an issuer, locked and raised in the transaction that issues a receipt: a
    rolled-back credit takes its number back with it, so numbers have no gaps."""

    __tablename__ = "receipt_counters"

    issuer: Mapped[str] = mapped_column(String(20), primary_key=True)
    last_number: Mapped[int] = mapped_column(BigInteger)


class ProcessorBudget(Base):
    """The next free slot of a budget of requests to the processor, on the database's clock: every instance on
    one PostgreSQL database takes its requests' slots from it (store/budget.py). UNLOGGED there (migration 0015):
    a pacing hint that a crash may lose, and the next request makes again. Unused on SQLite."""

    __tablename__ = "processor_budgets"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    next_slot: Mapped[datetime] = mapped_column(UTCDateTime())


class Receipt(Base):
    """The receipt of one credit of a balance (an automatic recharge or a one-time purchase), as issued."""

    __tablename__ = "receipts"
    __table_args__ = (
        UniqueConstraint("issuer", "seq"),
        CheckConstraint("seq > 0", name="positive_seq"),
        CheckConstraint(one_of("kind", RechargeKind), name="known_kind").ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    number: Mapped[str] = mapped_column(String(32), unique=True)  # ISSUER-000042
    issuer: Mapped[str] = mapped_column(String(20))
    seq: Mapped[int] = mapped_column(BigInteger)
    recharge_id: Mapped[int] = mapped_column(ForeignKey("recharges.id"), unique=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    kind: Mapped[RechargeKind] = mapped_column(StateText(RechargeKind, 10))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int] = mapped_column(BigInteger)  # credited (net)
    vat: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[int] = mapped_column(BigInteger)  # charged
    balance_after: Mapped[int] = mapped_column(BigInteger)
    payment_reference: Mapped[str] = mapped_column(String(64))
    # Everything the receipt shows (business details, card, reason, ...) as it was when issued.
    content: Mapped[dict[str, Any]] = mapped_column(JSON)


class OutboxMessage(Base):
    """An email to deliver, written in the same transaction as what it reports. Its key says what it is about
    (one message per key); its Message-ID and bytes are fixed when it is first sent, so a re-send is identical.

    pending -> sending (claimed, leased) -> sent | pending (retry later) | failed (permanent, or gave up); a
    message not sent yet (pending, failed) -> cancelled by an admin."""

    __tablename__ = "outbox"
    __table_args__ = (
        CheckConstraint(one_of("status", OutboxStatus), name="known_status"),
        Index("ix_outbox_status_due", "status", "next_attempt_at"),
        Index("ix_outbox_last_attempt", "last_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)  # e.g. receipt:R-000042
    kind: Mapped[str] = mapped_column(String(40))  # the template: receipt, payment_declined, statement, ...
    account_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"), index=True)
    to_address: Mapped[str] = mapped_column(String(254))
    context: Mapped[dict[str, Any]] = mapped_column(JSON)  # what the template renders
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[OutboxStatus] = mapped_column(
        StateText(OutboxStatus, 10), default=OutboxStatus.PENDING, server_default=text("'pending'")
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str | None] = mapped_column(String(120))  # host:pid of the sender holding it
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    message_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    subject: Mapped[str | None] = mapped_column(String(255))
    raw: Mapped[str | None] = mapped_column(Text)  # the RFC 5322 message, fixed at the first send
    last_error: Mapped[str | None] = mapped_column(String(500))


class NoticeEpisode(Base):
    """A condition an account is in that the customer has been told about (balance low, spend cap reached):
    one notice per episode, and the row is removed when the condition ends."""

    __tablename__ = "notice_episodes"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40), primary_key=True)
    since: Mapped[datetime] = mapped_column(UTCDateTime())


class Statement(Base):
    """The monthly statement of one account, as issued (one per account and calendar month, UTC)."""

    __tablename__ = "statements"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)  # the first day of the month
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    currency: Mapped[str] = mapped_column(String(3))
    opening_balance: Mapped[int] = mapped_column(BigInteger)
    closing_balance: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[dict[str, Any]] = mapped_column(JSON)


# --- events out: webhooks to the CRM ---------------------------------------------------------------------------


class WebhookEvent(Base):
    """An event for the CRM's webhook endpoints, written in the same transaction as what it reports (the outbox of
    events): a rolled-back cause takes its event with it. Its body is fixed when written, so every delivery and
    every retry sends the same bytes under the same id. The sender routes it to the endpoints that take its type
    (`routed_at`), one delivery each."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index(
            "ix_webhook_events_unrouted",
            "created_at",
            postgresql_where=text("routed_at IS NULL"),
            sqlite_where=text("routed_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # evt_..., the webhook-id of every delivery
    key: Mapped[str] = mapped_column(String(200), unique=True)  # what it is about: one event per key
    type: Mapped[WebhookEventType] = mapped_column(StateText(WebhookEventType, 40))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    body: Mapped[str] = mapped_column(Text)  # the JSON sent, as signed
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """One event to one endpoint (by its configured name): pending -> sending (claimed, leased) -> delivered |
    pending (retried at next_attempt_at) | failed (the retry schedule ran out)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint"),
        Index("ix_webhook_deliveries_due", "endpoint", "status", "next_attempt_at"),
        CheckConstraint(one_of("status", WebhookStatus), name="known_status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"))
    endpoint: Mapped[str] = mapped_column(String(40))
    status: Mapped[WebhookStatus] = mapped_column(StateText(WebhookStatus, 10))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str | None] = mapped_column(String(120))  # host:pid of the sender holding it
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)  # the endpoint's answer; NULL: none came
    last_error: Mapped[str | None] = mapped_column(String(500))


class Authorization(Base):
    """A call the dialer asked to place: how long the available balance lets it last at the account's rate, and
    the money held for it until the call's usage settles it, the dialer releases it, or it expires. One per call
    (account, call_id); `accounts.reserved` is the sum of the open ones."""

    __tablename__ = "authorizations"
    __table_args__ = (
        UniqueConstraint("account_id", "call_id"),
        CheckConstraint(one_of("status", AuthorizationStatus), name="known_status"),
        CheckConstraint("reserved_amount >= 0", name="reserved_not_negative"),
        Index(
            "ix_authorizations_open_expiry",
            "expires_at",
            postgresql_where=text("status = 'open'"),
            sqlite_where=text("status = 'open'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    call_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(40))
    requested_seconds: Mapped[int | None] = mapped_column(Integer)
    authorized_seconds: Mapped[int] = mapped_column(Integer)
    reserved_amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[AuthorizationStatus] = mapped_column(StateText(AuthorizationStatus, 10))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    usage_event_id: Mapped[str | None] = mapped_column(String(128), unique=True)  # the usage that settled it


class AuthorizationRefusal(Base):
    """Calls refused (402), counted per account, hour and reason (`insufficient_balance`, `account_closed`): what
    `recharged status` tells of the last 24 hours. One row per account and hour, so refusals of different accounts
    never wait for each other."""

    __tablename__ = "authorization_refusals"
    __table_args__ = (Index("ix_authorization_refusals_hour", "hour"),)

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)  # the refusals' hour, UTC
    reason: Mapped[str] = mapped_column(String(40), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
