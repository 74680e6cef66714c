"""Accounts and their billing settings. Every change is signed by an admin (first and last name) and audited
with the values before and after, in the same transaction as the change."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from recharged.balance import AccountPlan
from recharged.clock import Clock, parse_instant
from recharged.config import RechargeSettings, Settings
from recharged.csvfiles import check_header, open_csv, shape_problem
from recharged.errors import ActorError, ConflictError, InputError, NotFoundError
from recharged.mail import notices
from recharged.money import Units, check_currency, format_ledger, parse_amount
from recharged.payments import CardInfo, card_label
from recharged.planning import plans_in
from recharged.states import EntryType, RechargeState
from recharged.store.engine import Database
from recharged.store.ledger import post_entry
from recharged.store.models import Account, AuditRecord, FundingSource

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
_ACCOUNT_ID = re.compile(r"^[\x21-\x7e]{1,64}$")
_NAME_PART = re.compile(r"^[^\W\d_][^\W\d_'’.\-]*(?:['’.\-][^\W\d_]+)*\.?$")
OVERRIDE_DAYS = ("window_days", "threshold_days", "recharge_days")
OVERRIDE_AMOUNTS = ("min_threshold", "min_recharge", "max_recharge", "max_charged_per_day", "max_charged_per_30_days")
OVERRIDES = OVERRIDE_DAYS + OVERRIDE_AMOUNTS
CREATION_SKEW = timedelta(minutes=5)


def parse_actor(text: str | None) -> str:
    """The signing admin's name: at least a first and a last name, letters only (hyphens and apostrophes ok)."""
    parts = (text or "").split()
    if len(parts) < 2 or not all(_NAME_PART.match(part) for part in parts):
        raise ActorError(
            f"billing changes must be signed with the admin's first and last name (--actor 'Jane Doe'), got {text!r}"
        )
    if len(" ".join(parts)) > 120:
        raise ActorError("the actor's name is longer than 120 characters")
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class NewAccount:
    """A validated account to create."""

    id: str
    email: str
    plan: str
    currency: str
    vat_percent: Decimal
    created_at: datetime | None = None
    opening_balance: Units | None = None
    auto_recharge: bool = False
    card: CardInfo | None = None  # a card already on file at the processor, brought over as the default source


def _bool(value: str, what: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{what} must be true or false, got {value!r}")


def parse_vat(value: str | Decimal) -> Decimal:
    try:
        vat = Decimal(str(value).strip().rstrip("%"))
    except InvalidOperation:
        raise ValueError(f"vat_percent {value!r} is not a number (e.g. 20 or 8.875)") from None
    if not vat.is_finite() or vat < 0 or vat > 100 or vat != vat.quantize(Decimal("0.0001")):
        raise ValueError(f"vat_percent {value!r} must be between 0 and 100 with at most 4 decimals")
    return Decimal(format(vat.normalize(), "f"))  # 20.00 -> 20, never 2E+1


def new_account(fields: Mapping[str, str | None], settings: Settings, now: datetime) -> NewAccount:
    """Validate one account's fields (from the CLI or a CSV row); ValueError names the first bad field."""

    def get(name: str) -> str:
        return (fields.get(name) or "").strip()

    account_id = get("id")
    if not _ACCOUNT_ID.match(account_id):
        raise ValueError(f"id {account_id!r} must be 1-64 printable characters without spaces")
    email = get("email")
    if not _EMAIL.match(email) or len(email) > 254:
        raise ValueError(f"email {email!r} is not an email address")
    plan = get("plan")
    if plan not in settings.plans:
        raise ValueError(f"plan {plan!r} is not defined in config.toml (defined: {', '.join(sorted(settings.plans))})")
    plan_currency = settings.plans[plan].currency
    currency = check_currency(get("currency")) if get("currency") else plan_currency
    if currency != plan_currency:
        raise ValueError(f"currency {currency} does not match plan {plan!r}, which is priced in {plan_currency}")
    if not get("vat_percent"):
        raise ValueError("vat_percent is missing (use 0 for no VAT)")
    vat = parse_vat(get("vat_percent"))
    created_at = None
    if get("created_at"):
        created_at = parse_instant(get("created_at"))
        if created_at > now + CREATION_SKEW:
            raise ValueError(f"created_at {created_at.isoformat()} is in the future")
    opening = parse_amount(get("opening_balance"), what="opening_balance") if get("opening_balance") else None
    auto = _bool(get("auto_recharge"), "auto_recharge")
    return NewAccount(account_id, email, plan, currency, vat, created_at, opening, auto, _card(get))


CARD_COLUMNS = ("stripe_customer", "payment_method", "card_brand", "card_last4", "card_exp")


def _card(get: Any) -> CardInfo | None:
    given = {name: get(name) for name in CARD_COLUMNS}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise ValueError(f"a card on file needs all of {', '.join(CARD_COLUMNS)}; missing {', '.join(missing)}")
    match = re.fullmatch(r"(\d{1,2})/(\d{4})", given["card_exp"])
    if not match or not 1 <= int(match[1]) <= 12:
        raise ValueError(f"card_exp {given['card_exp']!r} must be MM/YYYY")
    if not re.fullmatch(r"\d{4}", given["card_last4"]):
        raise ValueError(f"card_last4 {given['card_last4']!r} must be 4 digits")
    if not given["stripe_customer"].startswith("cus_") or not given["payment_method"].startswith(("pm_", "card_")):
        raise ValueError("stripe_customer must be a cus_... id and payment_method a pm_... id")
    return CardInfo(
        given["stripe_customer"],
        given["payment_method"],
        given["card_brand"].lower(),
        given["card_last4"],
        int(match[1]),
        int(match[2]),
    )


ACCOUNT_COLUMNS = (
    "id",
    "email",
    "plan",
    "currency",
    "vat_percent",
    "created_at",
    "opening_balance",
    "auto_recharge",
    *CARD_COLUMNS,
)
REQUIRED_COLUMNS = ("id", "email", "plan", "vat_percent")
MAX_LISTED_PROBLEMS = 50


def read_csv(path: Path, settings: Settings, now: datetime, *, created_at: str | None = None) -> list[NewAccount]:
    """The accounts of a CSV file (header: ACCOUNT_COLUMNS), each validated as `new_account` does; `created_at`
    is used for rows that do not give one. Any bad row refuses the whole file: InputError lists the bad rows."""
    new: list[NewAccount] = []
    problems: list[str] = []
    with open_csv(path) as (reader, rows, _):
        check_header(path, reader.fieldnames, required=REQUIRED_COLUMNS, known=ACCOUNT_COLUMNS)
        for line, row in rows:
            shape = shape_problem(row)
            if shape:
                problems.append(f"{path}:{line}: {shape}")
                continue
            if created_at and not (row.get("created_at") or "").strip():
                row["created_at"] = created_at
            try:
                new.append(new_account(row, settings, now))
            except ValueError as exc:
                problems.append(f"{path}:{line}: {exc}")
    if problems:
        listing = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        if len(problems) > MAX_LISTED_PROBLEMS:
            listing += f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"
        raise InputError(f"{len(problems)} bad rows, nothing imported:\n  {listing}")
    return new


def settings_of(account: Account) -> dict[str, Any]:
    """The billing settings of an account as audit-friendly JSON values."""
    values: dict[str, Any] = {
        "email": account.email,
        "plan": account.plan,
        "currency": account.currency,
        "vat_percent": str(account.vat_percent),
        "auto_recharge": account.auto_recharge,
        "recharge_state": account.recharge_state,
    }
    for name in OVERRIDE_DAYS:
        values[name] = getattr(account, name)
    for name in OVERRIDE_AMOUNTS:
        amount = getattr(account, name)
        values[name] = None if amount is None else format_ledger(amount)
    return values


def audit_change(
    session: Session, account_id: str, actor: str, at: datetime, action: str, before: Any, after: Any
) -> AuditRecord:
    record = AuditRecord(account_id=account_id, actor=actor, at=at, action=action, before=before, after=after)
    session.add(record)
    return record


@dataclass
class CreateResult:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def create_accounts(db: Database, accounts: Sequence[NewAccount], actor: str, clock: Clock) -> CreateResult:
    """Create accounts all together or not at all. An identical existing account is left as it is (so an
    import can be re-run); an existing account with other settings is a conflict."""
    actor = parse_actor(actor)
    now = clock.now()
    result = CreateResult()
    ids = [a.id for a in accounts]
    repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if repeated:
        raise InputError(f"account ids appear more than once: {', '.join(repeated[:10])}")
    try:
        with db.transaction() as session:
            existing = {a.id: a for a in session.scalars(select(Account).where(Account.id.in_(ids)))} if ids else {}
            conflicts = []
            for new in accounts:
                old = existing.get(new.id)
                if old is None:
                    continue
                wanted = {
                    "email": new.email,
                    "plan": new.plan,
                    "currency": new.currency,
                    "vat_percent": new.vat_percent,
                }
                differing = [k for k, v in wanted.items() if getattr(old, k) != v]
                if differing:
                    conflicts.append(f"{new.id} ({', '.join(differing)})")
            if conflicts:
                raise ConflictError(
                    "accounts already exist with other settings, change them with `recharged accounts update`: "
                    + "; ".join(conflicts[:20])
                )
            for new in accounts:
                if new.id in existing:
                    result.unchanged.append(new.id)
                    continue
                created_at = new.created_at or now
                account = Account(
                    id=new.id,
                    email=new.email,
                    plan=new.plan,
                    currency=new.currency,
                    vat_percent=new.vat_percent,
                    auto_recharge=new.auto_recharge,
                    balance=0,
                    created_at=created_at,
                    updated_at=now,
                )
                session.add(account)
                session.flush()
                after = settings_of(account)
                if new.opening_balance:
                    post_entry(
                        session,
                        new.id,
                        EntryType.OPENING,
                        new.id,
                        new.opening_balance,
                        created_at,
                        "opening balance brought over",
                        recorded_at=now,
                    )
                    after["opening_balance"] = format_ledger(new.opening_balance)
                if new.card is not None:
                    source = FundingSource(account_id=new.id, added_at=now, is_default=True)
                    source.hold(new.card)
                    session.add(source)
                    after["card"] = card_label(new.card)
                audit_change(session, new.id, actor, now, "account.created", None, after)
                result.created.append(new.id)
    except IntegrityError as exc:  # a concurrent creation of the same id won the race
        raise ConflictError(f"account creation conflicted with a concurrent change: {exc.orig}") from None
    return result


def load_account(session: Session, account_id: str, *, lock: bool = False) -> Account:
    account = session.get(Account, account_id, with_for_update=lock)
    if account is None:
        raise NotFoundError(f"no account {account_id!r}")
    return account


def validate_overrides(overrides: Mapping[str, str | None], settings: Settings) -> dict[str, int | None]:
    """Per-account policy overrides, checked by the same rules as [recharge] in config.toml.

    A value of "default" clears an override (back to config.toml)."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise InputError(f"unknown policy settings: {', '.join(unknown)} (known: {', '.join(OVERRIDES)})")
    given = {k: v for k, v in overrides.items() if v is not None and v.strip().lower() != "default"}
    switched_off = sorted(k for k, v in given.items() if v.strip().lower() == "off")
    if switched_off:
        raise InputError(
            f"{', '.join(switched_off)}: a cap cannot be switched off for one account; give an amount, or 'default'"
        )
    try:
        checked = RechargeSettings.model_validate({**settings.recharge.model_dump(), **given})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))} = {e['input']!r}: {e['msg']}" for e in exc.errors())
        raise InputError(f"invalid policy override: {problems}") from None
    result: dict[str, int | None] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in given:
            result[name] = None
        elif name in OVERRIDE_DAYS:
            result[name] = getattr(checked, name)
        else:
            amount = getattr(checked, name)
            result[name] = None if amount is None else parse_amount(amount)
    return result


def change_account(
    db: Database,
    account_id: str,
    *,
    actor: str,
    clock: Clock,
    settings: Settings,
    email: str | None = None,
    plan: str | None = None,
    vat_percent: str | None = None,
    auto_recharge: bool | None = None,
    overrides: Mapping[str, str | None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Change an account's billing settings; returns (before, after). A change that changes nothing is not audited."""
    actor = parse_actor(actor)
    checked_overrides = validate_overrides(overrides or {}, settings)
    now = clock.now()
    with db.transaction() as session:
        account = load_account(session, account_id)
        before = settings_of(account)
        if email is not None:
            if not _EMAIL.match(email.strip()):
                raise InputError(f"email {email!r} is not an email address")
            account.email = email.strip()
        if plan is not None:
            if plan not in settings.plans:
                raise InputError(f"plan {plan!r} is not defined in config.toml")
            if settings.plans[plan].currency != account.currency:
                raise InputError(
                    f"plan {plan!r} is priced in {settings.plans[plan].currency}, account is in {account.currency}"
                )
            account.plan = plan
        if vat_percent is not None:
            try:
                account.vat_percent = parse_vat(vat_percent)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        if auto_recharge is not None:
            account.auto_recharge = auto_recharge
        if auto_recharge and account.recharge_state in (
            RechargeState.SUSPENDED,
            RechargeState.BACKING_OFF,
            RechargeState.DISPUTED,
        ):
            # An admin enabling auto-recharge lifts a suspension or a dispute's pause, and starts the retry
            # schedule afresh.
            account.recharge_state, account.failed_cycles, account.retry_at, account.state_reason = (
                RechargeState.OK,
                0,
                None,
                None,
            )
        for name, value in checked_overrides.items():
            setattr(account, name, value)
        after = settings_of(account)
        if after != before:
            account.updated_at = now
            changed = [k for k in after if after[k] != before[k]]
            auto_settings = {"auto_recharge", "recharge_state", *OVERRIDES}
            action = "auto_recharge.changed" if set(changed) <= auto_settings else "account.changed"
            record = audit_change(
                session,
                account_id,
                actor,
                now,
                action,
                {k: before[k] for k in changed},
                {k: after[k] for k in changed},
            )
            notices.settings_changed(session, record)  # tells the customer about automatic recharge changes
    return before, after


def audit_trail(db: Database, account_id: str | None = None, limit: int = 200) -> list[AuditRecord]:
    """The newest audit records first, for one account or all."""
    with db.reading() as session:
        query = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
        if account_id is not None:
            load_account(session, account_id)
            query = query.where(AuditRecord.account_id == account_id)
        return list(session.scalars(query))


def get_account(db: Database, account_id: str) -> Account:
    with db.reading() as session:
        return load_account(session, account_id)


@dataclass(frozen=True, slots=True)
class AccountView:
    """One account as of `at`, read in one snapshot: the account (loaded, detached from its session) and the
    decision the next recharge cycle would take for it."""

    at: datetime
    account: Account
    plan: AccountPlan

    @property
    def settings(self) -> dict[str, Any]:
        """The account's billing settings (`settings_of`) with when it started and first used the service."""
        values = settings_of(self.account)
        values["created_at"] = self.account.created_at.isoformat()
        values["first_usage_at"] = self.account.first_usage_at.isoformat() if self.account.first_usage_at else None
        return values


def account_view(db: Database, settings: Settings, account_id: str, at: datetime) -> AccountView:
    """The account and its plan at `at`, both from one read snapshot; NotFoundError when there is no such account."""
    with db.reading() as session:
        account = load_account(session, account_id)
        plan = next(plans_in(session, settings, at, [account_id]))
    return AccountView(at, account, plan)


def adjust_balance(
    db: Database, account_id: str, amount: Units, *, reason: str, actor: str, clock: Clock, reference: str | None = None
) -> bool:
    """A manual credit (positive) or debit (negative), audited. With a `reference`, recording the same
    adjustment twice changes nothing (returns False the second time)."""
    actor = parse_actor(actor)
    if amount == 0:
        raise InputError("an adjustment of 0 changes nothing")
    if not reason.strip():
        raise InputError("an adjustment needs a reason (--reason)")
    now = clock.now()
    external_id = reference or f"adj-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    with db.transaction() as session:
        account = load_account(session, account_id, lock=True)
        before = format_ledger(account.balance)
        if not post_entry(session, account_id, "adjustment", external_id, amount, now, reason.strip()[:500]):
            return False
        audit_change(
            session,
            account_id,
            actor,
            now,
            "balance.adjusted",
            {"balance": before},
            {
                "balance": format_ledger(account.balance + amount),
                "amount": format_ledger(amount),
                "reason": reason,
                "reference": external_id,
            },
        )
    return True
