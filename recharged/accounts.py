"""Accounts and their billing settings. Every change is signed by an admin (first and last name) and audited
with the values before and after, in the same transaction as the change."""

from __future__ import annotations

import csv
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from recharged.balance import AccountPlan, contradictions
from recharged.cards import CardInfo, card_label
from recharged.clock import Clock, parse_instant
from recharged.config import PlanPolicySettings, Settings
from recharged.csvfiles import check_header, open_csv, shape_problem
from recharged.errors import (
    ActorError,
    ConflictError,
    InputError,
    NoSuchCardError,
    NotFoundError,
    PaymentError,
    TransientPaymentError,
)
from recharged.money import Units, check_amount, check_currency, format_ledger, parse_amount
from recharged.planning import plans_in
from recharged.states import EntryType, RechargeState
from recharged.store.engine import Database
from recharged.store.ledger import POLICY_COLUMNS, post_entry
from recharged.store.models import Account, AuditRecord, Entry, FundingSource
from recharged.store.reads import account_listing, accounts_to_export, open_recharge_of
from recharged.words import plural

if TYPE_CHECKING:
    from recharged.payments import PaymentGateway

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
# Account ids appear in URLs (/v1/accounts/{id}), file names and CSVs: a small alphabet that needs no escaping
# anywhere, never `.` or `..` alone. Accounts created before this rule keep their ids.
ACCOUNT_ID_RULE = "1 to 64 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit"
_ACCOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
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
            f"billing changes must be signed with the admin's first and last name (the actor, e.g. 'Jane Doe'), "
            f"got {text!r}"
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
    source: str | None = field(default=None, compare=False)  # where it was read, e.g. "customers.csv:3"
    # auto_recharge was given (true or false), not left out: only then is an existing account's compared with it
    auto_recharge_given: bool = field(default=True, compare=False)
    card_checked: bool = field(default=False, compare=False)  # the processor holds `card` as given (`import_accounts`)


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
    if not _ACCOUNT_ID.fullmatch(account_id):
        raise ValueError(f"id {account_id!r} is not a valid account id: use {ACCOUNT_ID_RULE}")
    email = get("email")
    if not _EMAIL.match(email) or len(email) > 254:
        raise ValueError(f"email {email!r} is not an email address")
    plan = get("plan")
    if plan not in settings.plans:
        defined = ", ".join(sorted(settings.plans))
        raise ValueError(f"plan {plan!r} is not defined in {settings.source} (defined: {defined})")
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
    if opening is not None:
        check_amount(opening, currency, what="opening_balance")
    auto = _bool(get("auto_recharge"), "auto_recharge")
    return NewAccount(
        account_id,
        email,
        plan,
        currency,
        vat,
        created_at,
        opening,
        auto,
        _card(get),
        auto_recharge_given=bool(get("auto_recharge")),
    )


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
    rows, problems = _read_rows(path, settings, now, created_at)
    if problems:
        raise InputError(f"{plural(len(problems), 'bad row')}, nothing imported:\n  {_listing(problems)}")
    return [new for _, new in rows]


def _read_rows(
    path: Path, settings: Settings, now: datetime, created_at: str | None
) -> tuple[list[tuple[int, NewAccount]], list[tuple[int, str]]]:
    """The good rows of an accounts CSV and the problems of the bad ones, each with its line number."""
    new: list[tuple[int, NewAccount]] = []
    problems: list[tuple[int, str]] = []
    with open_csv(path) as (reader, rows, _):
        check_header(path, reader.fieldnames, required=REQUIRED_COLUMNS, known=ACCOUNT_COLUMNS)
        for line, row in rows:
            shape = shape_problem(row)
            if shape:
                problems.append((line, f"{path}:{line}: {shape}"))
                continue
            if created_at and not (row.get("created_at") or "").strip():
                row["created_at"] = created_at
            try:
                new.append((line, replace(new_account(row, settings, now), source=f"{path}:{line}")))
            except ValueError as exc:
                problems.append((line, f"{path}:{line}: {exc}"))
    return new, problems


def _listing(problems: Sequence[tuple[int, str]]) -> str:
    """Problems in line order, at most MAX_LISTED_PROBLEMS of them."""
    ordered = [text for _, text in sorted(problems, key=lambda problem: problem[0])]
    listing = "\n  ".join(ordered[:MAX_LISTED_PROBLEMS])
    if len(ordered) > MAX_LISTED_PROBLEMS:
        listing += f"\n  ... and {len(ordered) - MAX_LISTED_PROBLEMS} more"
    return listing


def settings_of(account: Account) -> dict[str, Any]:
    """The billing settings of an account as audit-friendly JSON values."""
    values: dict[str, Any] = {
        "email": account.email,
        "plan": account.plan,
        "currency": account.currency,
        "vat_percent": str(account.vat_percent),
        "auto_recharge": account.auto_recharge,
        "recharge_state": account.recharge_state,
        "overdraft": format_ledger(account.overdraft or 0),
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


def _columns(
    account: Account | NewAccount, opening: Units | None, card: CardInfo | FundingSource | None
) -> dict[str, str]:
    """An account's import columns as text, the same way for a recorded account and a row to import ("" = none)."""
    return {
        "email": account.email,
        "plan": account.plan,
        "currency": account.currency,
        "vat_percent": format(account.vat_percent.normalize(), "f"),
        "created_at": account.created_at.isoformat() if account.created_at else "",
        "opening_balance": format_ledger(opening or 0),
        "auto_recharge": "true" if account.auto_recharge else "false",
        "stripe_customer": card.customer if card else "",
        "payment_method": card.payment_method if card else "",
        "card_brand": card.brand if card else "",
        "card_last4": card.last4 if card else "",
        "card_exp": f"{card.exp_month:02d}/{card.exp_year}" if card else "",
    }


def _conflicts(session: Session, pairs: Sequence[tuple[NewAccount, Account]]) -> list[tuple[NewAccount, str]]:
    """Each account to create that exists with other settings: where it was given, and every column that differs
    with its recorded and given values. A row without created_at compares only the rest (it meant "now"); a row
    without a card, all but the card (cards are managed with `sources` once the account exists); a row without
    auto_recharge, all but it (turned on later with `auto-recharge`)."""
    ids = [old.id for _, old in pairs]
    if not ids:
        return []
    openings = dict(
        session.execute(
            select(Entry.external_id, Entry.amount).where(
                Entry.entry_type == EntryType.OPENING, Entry.external_id.in_(ids)
            )
        ).all()
    )
    cards = {
        source.account_id: source
        for source in session.scalars(
            select(FundingSource).where(
                FundingSource.account_id.in_(ids), FundingSource.is_default, FundingSource.removed_at.is_(None)
            )
        )
    }
    conflicts = []
    for new, old in pairs:
        recorded = _columns(old, openings.get(old.id), cards.get(old.id))
        given = _columns(new, new.opening_balance, new.card)
        if new.created_at is None:
            del given["created_at"]
        if not new.auto_recharge_given:  # left out: says nothing of automatic recharge turned on since
            del given["auto_recharge"]
        if new.card is None:  # no card in the row says nothing of the cards added since (`sources add`)
            for name in CARD_COLUMNS:
                given.pop(name, None)
        differing = [
            f"{name}: recorded {recorded[name] or '(none)'}, given {value or '(none)'}"
            for name, value in given.items()
            if recorded[name] != value
        ]
        if differing:
            where = f"{new.source}: " if new.source else ""
            conflicts.append((new, f"{where}account {new.id}: {'; '.join(differing)}"))
    return conflicts


@dataclass
class CreateResult:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    unchecked_cards: list[str] = field(default_factory=list)  # where each card created unchecked was given


def _conflict_error(conflicts: Sequence[str]) -> ConflictError:
    listing = "\n  ".join(conflicts[:MAX_LISTED_PROBLEMS])
    if len(conflicts) > MAX_LISTED_PROBLEMS:
        listing += f"\n  ... and {len(conflicts) - MAX_LISTED_PROBLEMS} more"
    return ConflictError(
        f"{plural(len(conflicts), 'account')} already {'exists' if len(conflicts) == 1 else 'exist'} "
        "with other settings; nothing was written. Change them (`recharged accounts update`, `auto-recharge`, "
        "`sources`; over HTTP PATCH /v1/accounts/{id}, PUT .../auto-recharge, .../funding-sources), or correct the "
        "input:\n  " + listing
    )


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
    malformed = [repr(i) for i in ids if not _ACCOUNT_ID.fullmatch(i)]
    if malformed:
        raise InputError(f"not valid account ids ({ACCOUNT_ID_RULE}): {', '.join(malformed[:10])}")
    try:
        with db.transaction() as session:
            existing = {a.id: a for a in session.scalars(select(Account).where(Account.id.in_(ids)))} if ids else {}
            conflicts = _conflicts(session, [(new, existing[new.id]) for new in accounts if new.id in existing])
            if conflicts:
                raise _conflict_error([text for _, text in conflicts])
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
                    after["card_checked"] = new.card_checked  # with the processor, before it was written
                    if not new.card_checked:
                        result.unchecked_cards.append(new.source or new.id)
                audit_change(session, new.id, actor, now, "account.created", None, after)
                result.created.append(new.id)
    except IntegrityError as exc:  # a concurrent creation of the same id won the race
        raise ConflictError(f"account creation conflicted with a concurrent change: {exc.orig}") from None
    return result


def import_accounts(
    db: Database,
    settings: Settings,
    path: Path,
    *,
    actor: str,
    clock: Clock,
    created_at: str | None = None,
    gateway: Callable[[], PaymentGateway] | None = None,
) -> CreateResult:
    """Import the accounts of a CSV file (see `read_csv`) all together or not at all, with every problem of the
    file found in one pass and listed by line: bad rows, an id given twice, a card the processor does not hold as
    given (each checked through `gateway` as `sources add` checks one), and accounts that exist with other
    settings. Any bad row is an InputError (exit 2) that lists the conflicts too; conflicts alone are a
    ConflictError (exit 4); either way nothing is written. Without a `gateway` (no processor key), cards are
    created unchecked (`unchecked_cards`); a card the processor does not hold is then found at its first charge,
    and set aside as our error, never as the customer's decline."""
    actor = parse_actor(actor)
    rows, bad = _read_rows(path, settings, clock.now(), created_at)
    first_line: dict[str, int] = {}
    for line, new in rows:
        if new.id in first_line:
            bad.append((line, f"{new.source}: account id {new.id} is on line {first_line[new.id]} too"))
        else:
            first_line[new.id] = line
    unique = [new for line, new in rows if first_line[new.id] == line]
    ids = [new.id for new in unique]
    with db.reading() as session:
        existing = {a.id: a for a in session.scalars(select(Account).where(Account.id.in_(ids)))} if ids else {}
        conflicts = [
            (first_line[new.id], text)
            for new, text in _conflicts(session, [(new, existing[new.id]) for new in unique if new.id in existing])
        ]
    to_create = [new for new in unique if new.id not in existing]
    if gateway is not None and any(new.card is not None for new in to_create):
        processor = gateway()
        for i, new in enumerate(to_create):
            if new.card is not None:
                problem = _card_problem(processor, new.card, new.source)
                if problem is None:
                    to_create[i] = replace(new, card_checked=True)
                else:
                    bad.append((first_line[new.id], f"{new.source}: {problem}"))
    if bad:
        found = plural(len(bad), "bad row")
        if conflicts:
            found += f" and {plural(len(conflicts), 'conflict')} with existing accounts"
        raise InputError(f"{found}; nothing was imported:\n  {_listing(bad + conflicts)}")
    if conflicts:
        raise _conflict_error([text for _, text in sorted(conflicts)])
    checked = {new.id: new for new in to_create}
    return create_accounts(db, [checked.get(new.id, new) for new in unique], actor, clock)


def _card_problem(gateway: PaymentGateway, card: CardInfo, where: str | None) -> str | None:
    """What is wrong with a card to import, as the processor holds it (None: it holds it as given)."""
    try:
        held = gateway.card(card.customer, card.payment_method)
    except NoSuchCardError as exc:
        return f"stripe_customer/payment_method: {exc}"
    except (PaymentError, TransientPaymentError) as exc:  # not about this card (our key, the network): stop here
        raise type(exc)(f"{where}: checking the card with the processor: {exc}; nothing was imported") from exc
    differing = [
        f"{column}: {theirs} at the processor, {ours} in the file"
        for column, theirs, ours in (
            ("card_brand", held.brand.lower(), card.brand),
            ("card_last4", held.last4, card.last4),
            ("card_exp", f"{held.exp_month:02d}/{held.exp_year}", f"{card.exp_month:02d}/{card.exp_year}"),
        )
        if theirs != ours
    ]
    return "; ".join(differing) or None


def load_account(session: Session, account_id: str, *, lock: bool = False) -> Account:
    account = session.get(Account, account_id, with_for_update=lock)
    if account is None:
        raise NotFoundError(f"no account {account_id!r}")
    return account


def validate_overrides(overrides: Mapping[str, str | None], settings: Settings) -> dict[str, int | None]:
    """Per-account policy overrides, checked by the same rules as a plan's own recharge settings in config.toml.

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
        checked = PlanPolicySettings.model_validate(given)
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
    overdraft: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Change an account's billing settings; returns (before, after). A change that changes nothing is not audited."""
    actor = parse_actor(actor)
    checked_overrides = validate_overrides(overrides or {}, settings)
    now = clock.now()
    with db.transaction() as session:
        account = load_account(session, account_id)
        before = settings_of(account)
        if auto_recharge and account.closed_at is not None:
            raise ConflictError(f"account {account_id} is closed: reopen it before enabling automatic recharge")
        if email is not None:
            if not _EMAIL.match(email.strip()):
                raise InputError(f"email {email!r} is not an email address")
            account.email = email.strip()
        if plan is not None:
            if plan not in settings.plans:
                raise InputError(f"plan {plan!r} is not defined in {settings.source}")
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
        if overdraft is not None:  # how far below zero calls may be authorized (`recharged.authorizations`)
            try:
                units = parse_amount(overdraft, what="overdraft")
                if units < 0:
                    raise ValueError(f"overdraft {overdraft!r} must not be negative (0: no overdraft)")
                check_amount(units, account.currency, what="overdraft")
            except ValueError as exc:
                raise InputError(f"account {account_id}: {exc}") from None
            account.overdraft = units
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
        policy = settings.policy_of(account.plan).overridden({n: getattr(account, n) for n in POLICY_COLUMNS})
        problems = contradictions(policy, account.currency)
        if problems:  # the transaction rolls back: nothing is changed
            raise InputError(f"account {account_id}: " + "; ".join(problems))
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
            from recharged.mail import notices, webhooks  # lazy: the outbox and its templates, only for a change

            # tells the customer about automatic recharge changes, gathered with the account's next ones
            notices.settings_changed(session, record, settings.outbox.admin_notice_delay)
            # and the CRM, when an automatic recharge setting changed
            webhooks.auto_recharge_changed(session, record)
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
        values["status"] = status_of(self.account.closed_at)
        values["closed_at"] = self.account.closed_at.isoformat() if self.account.closed_at else None
        values["closed_reason"] = self.account.closed_reason
        return values


def account_view(
    db: Database, settings: Settings, account_id: str, at: datetime, *, as_of: bool = False
) -> AccountView:
    """The account and its plan at `at`, both from one read snapshot (with `as_of`, the plan as it stood then:
    the ledger as of `at`); NotFoundError when there is no such account, or there was none yet at `at`."""
    with db.reading() as session:
        account = load_account(session, account_id)
        plan = next(plans_in(session, settings, at, [account_id], as_of=as_of), None)
    if plan is None:
        raise NotFoundError(f"account {account_id!r} was created at {account.created_at.isoformat()}, after {at}")
    return AccountView(at, account, plan)


MAX_REFERENCE = 128


def _signed(amount: Units) -> str:
    return f"a credit of {format_ledger(amount)}" if amount > 0 else f"a debit of {format_ledger(-amount)}"


def adjust_balance(
    db: Database, account_id: str, amount: Units, *, reason: str, actor: str, clock: Clock, reference: str | None = None
) -> bool:
    """A manual credit (positive) or debit (negative), audited. A `reference` is the admin's own id for it, unique
    per account: recording the same adjustment again changes nothing (returns False), while the same reference
    with another amount or direction is a ConflictError. Without one, a reference is made up."""
    actor = parse_actor(actor)
    if amount == 0:
        raise InputError("an adjustment of 0 changes nothing")
    if not reason.strip():
        raise InputError("an adjustment needs a reason (--reason)")
    if reference is not None:
        reference = reference.strip()
        if not reference or len(reference) > MAX_REFERENCE or not reference.isprintable():
            raise InputError(f"--reference {reference!r} must be 1 to {MAX_REFERENCE} printable characters")
    now = clock.now()
    # The ledger's own id for the entry, unique over all accounts; the reference is unique per account.
    external_id = f"adj-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex}"
    reference = reference or external_id
    try:
        with db.transaction() as session:
            account = load_account(session, account_id, lock=True)
            earlier = session.scalars(
                select(Entry).where(
                    Entry.account_id == account_id,
                    Entry.entry_type == EntryType.ADJUSTMENT,
                    Entry.reference == reference,
                )
            ).one_or_none()
            if earlier is not None:
                if earlier.amount != amount:
                    raise ConflictError(
                        f"account {account_id}: adjustment {reference!r} was recorded on "
                        f"{earlier.occurred_at:%Y-%m-%d %H:%M} UTC as {_signed(earlier.amount)} ({earlier.note}); "
                        f"this one is {_signed(amount)}. Nothing was changed: give another --reference for another "
                        "adjustment, or record the difference under its own reference"
                    )
                return False  # the same adjustment again
            before = format_ledger(account.balance)
            if not post_entry(
                session, account_id, EntryType.ADJUSTMENT, external_id, amount, now, reason.strip()[:500]
            ):
                raise ConflictError(f"ledger entry {external_id} exists already; run the adjustment again")
            session.execute(
                update(Entry)
                .where(Entry.entry_type == EntryType.ADJUSTMENT, Entry.external_id == external_id)
                .values(reference=reference)
                .execution_options(synchronize_session=False)
            )
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
                    "reference": reference,
                },
            )
    except IntegrityError:  # the same reference recorded at the same moment by another admin
        raise ConflictError(
            f"account {account_id}: adjustment {reference!r} was recorded at the same time by someone else; "
            "nothing was changed by this one (run it again to compare)"
        ) from None
    return True


# --- the life cycle: list, search, export, close, reopen ------------------------------------------------------

STATUSES = ("open", "closed", "all")
MAX_CLOSE_REASON = 200
MAX_SEARCH = 254


def status_of(closed_at: datetime | None) -> str:
    return "open" if closed_at is None else "closed"


@dataclass(frozen=True, slots=True)
class AccountSummary:
    """One account as `accounts list` and `accounts search` show it."""

    id: str
    email: str
    plan: str
    currency: str
    balance: Units
    auto_recharge: bool
    recharge_state: RechargeState
    closed_at: datetime | None
    closed_reason: str | None

    @property
    def status(self) -> str:
        return status_of(self.closed_at)


def _summaries(db: Database, **filters: Any) -> Iterator[AccountSummary]:
    with db.reading() as session:
        for row in account_listing(session, **filters):
            yield AccountSummary(*row)


def list_accounts(
    db: Database, *, status: str = "all", plan: str | None = None, currency: str | None = None
) -> Iterator[AccountSummary]:
    """The accounts (open, closed or all; on one plan; in one currency), streamed in id order."""
    if status not in STATUSES:
        raise InputError(f"--status {status!r} must be one of {', '.join(STATUSES)}")
    if currency is not None:
        try:
            currency = check_currency(currency)
        except ValueError as exc:
            raise InputError(f"--currency: {exc}") from None
    closed = None if status == "all" else status == "closed"
    return _summaries(db, closed=closed, plan=plan, currency=currency)


def search_accounts(db: Database, text: str) -> Iterator[AccountSummary]:
    """The accounts whose id or email contains `text` in any case (`%` and `_` are themselves), in id order."""
    text = text.strip()
    if not text or len(text) > MAX_SEARCH or not text.isprintable():
        raise InputError(f"search text {text!r} must be 1 to {MAX_SEARCH} printable characters")
    return _summaries(db, containing=text)


def export_csv(db: Database, handle: IO[str]) -> int:
    """Write every account to `handle` as the CSV `accounts import` reads (ACCOUNT_COLUMNS: the settings, the
    opening balance brought over, the default card on file), in id order; returns how many. Importing it into an
    empty database makes the same accounts; importing it again here finds every one unchanged. It does not hold
    what the import does not take: the balance since, the backup cards, per-account policy, whether it is closed."""
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(ACCOUNT_COLUMNS)
    count = 0
    with db.reading() as session:
        for account, opening, card in accounts_to_export(session):
            columns = {"id": account.id, **_columns(account, opening, card)}
            if opening is None:
                columns["opening_balance"] = ""
            writer.writerow([columns[name] for name in ACCOUNT_COLUMNS])
            count += 1
    return count


@dataclass(frozen=True, slots=True)
class StatusChange:
    """An account closed or reopened: when, why, and the balance it keeps."""

    account_id: str
    status: str
    at: datetime
    balance: Units
    currency: str
    reason: str | None = None


def close_account(db: Database, account_id: str, *, reason: str, actor: str, clock: Clock) -> StatusChange:
    """Close an account (signed and audited): it is never charged again and its automatic recharge is turned off,
    it gets no notices and no statement after the one of this month, and usage that starts from now on is refused
    (late records of earlier calls are still billed). Its balance is kept. Refused while a recharge of it is open."""
    actor = parse_actor(actor)
    reason = " ".join(reason.split())
    if not reason or len(reason) > MAX_CLOSE_REASON or not reason.isprintable():
        raise InputError(f"--reason must be 1 to {MAX_CLOSE_REASON} printable characters, got {reason!r}")
    now = clock.now()
    with db.transaction() as session:
        account = load_account(session, account_id, lock=True)  # the lock every claim of a recharge takes
        if account.closed_at is not None:
            raise ConflictError(
                f"account {account_id} was closed already, at {account.closed_at.isoformat()} "
                f"({account.closed_reason}); nothing was changed"
            )
        recharge = open_recharge_of(session, account_id)
        if recharge is not None:
            raise ConflictError(
                f"account {account_id} has recharge #{recharge.id} open ({recharge.phase}); nothing was changed: wait "
                "for it to finish, or complete it with `recharged recover`, then close the account"
            )
        balance = format_ledger(account.balance)
        before = {"status": "open", "auto_recharge": account.auto_recharge, "balance": balance}
        account.closed_at, account.closed_reason, account.auto_recharge, account.updated_at = now, reason, False, now
        after = {"status": "closed", "closed_at": now.isoformat(), "reason": reason, "auto_recharge": False}
        audit_change(session, account_id, actor, now, "account.closed", before, after | {"balance": balance})
        return StatusChange(account_id, "closed", now, account.balance, account.currency, reason)


def reopen_account(db: Database, account_id: str, *, actor: str, clock: Clock) -> StatusChange:
    """Reopen a closed account (signed and audited): charged, told, billed and sent statements again, with its
    automatic recharge off until an admin turns it on."""
    actor = parse_actor(actor)
    now = clock.now()
    with db.transaction() as session:
        account = load_account(session, account_id, lock=True)
        if account.closed_at is None:
            raise ConflictError(f"account {account_id} is open; nothing was changed")
        before = {
            "status": "closed",
            "closed_at": account.closed_at.isoformat(),
            "reason": account.closed_reason,
            "auto_recharge": account.auto_recharge,
        }
        account.closed_at, account.closed_reason, account.auto_recharge, account.updated_at = None, None, False, now
        audit_change(
            session, account_id, actor, now, "account.reopened", before, {"status": "open", "auto_recharge": False}
        )
        return StatusChange(account_id, "open", now, account.balance, account.currency)
