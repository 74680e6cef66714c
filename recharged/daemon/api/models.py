"""The HTTP API's request and response bodies: they make the OpenAPI document at /openapi.json.

Amounts are decimal strings in the currency's units (the ledger keeps five decimals); every object that holds
amounts names its currency. Times are ISO 8601 in UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ACTOR = Field(
    description="The signer: the admin's or customer's first and last name (audited with the token's name)",
    examples=["Jane Doe"],
    max_length=120,
)
AMOUNT = Field(description="A decimal string in the account's currency units", examples=["25.00"], max_length=40)
Number = str | int


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "acme",
                    "email": "billing@acme.example",
                    "plan": "standard",
                    "vat_percent": "20",
                    "actor": "Jane Doe",
                }
            ]
        },
    )

    id: str = Field(description="The account's id in the CRM", examples=["acme"], max_length=64)
    email: str = Field(examples=["billing@acme.example"], max_length=254)
    plan: str = Field(examples=["standard"], max_length=64)
    vat_percent: Number = Field(examples=["20"])
    currency: str | None = Field(default=None, description="The plan's currency when not given", max_length=3)
    created_at: datetime | None = Field(default=None, description="When the customer started (now when not given)")
    opening_balance: str | None = Field(default=None, description="A balance brought over", max_length=40)
    actor: str = ACTOR


class AccountChange(Strict):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"email": "finance@acme.example", "actor": "Jane Doe"}]}
    )

    email: str | None = Field(default=None, max_length=254)
    plan: str | None = Field(default=None, max_length=64)
    vat_percent: Number | None = None
    overdraft: str | None = Field(
        default=None, description="how far below zero calls may be authorized (0: not at all)", max_length=40
    )
    actor: str = ACTOR


class AutoRecharge(Strict):
    """Automatic recharge on or off, and the account's own policy: a setting left out is unchanged, null puts it
    back to config.toml's value."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"enabled": True, "min_recharge": "50.00", "actor": "Jane Doe"}]},
    )

    enabled: bool
    window_days: int | None = None
    threshold_days: int | None = None
    recharge_days: int | None = None
    min_threshold: str | None = Field(default=None, max_length=40)
    min_recharge: str | None = Field(default=None, max_length=40)
    max_recharge: str | None = Field(default=None, max_length=40)
    max_charged_per_day: str | None = Field(default=None, max_length=40)
    max_charged_per_30_days: str | None = Field(default=None, max_length=40)
    actor: str = ACTOR


class TopupRequest(Strict):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"amount": "25.00", "actor": "Jane Doe"}]}
    )

    amount: str = AMOUNT
    actor: str = ACTOR


class SourceAdd(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"customer": "cus_Q1a2b3", "payment_method": "pm_1Nx2y3", "default": True, "actor": "Jane Doe"}
            ]
        },
    )

    customer: str = Field(description="The Stripe customer (cus_...)", max_length=255)
    payment_method: str = Field(description="A card attached to that customer (pm_...)", max_length=255)
    default: bool = False
    actor: str = ACTOR


class Signed(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"actor": "Jane Doe"}]})

    actor: str = ACTOR


class AdjustmentRequest(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "credit": "5.00",
                    "reason": "goodwill after an outage",
                    "reference": "TICKET-4411",
                    "actor": "Jane Doe",
                }
            ]
        },
    )

    credit: str | None = Field(default=None, description="An amount to add (give credit or debit)", max_length=40)
    debit: str | None = Field(default=None, description="An amount to take", max_length=40)
    reason: str = Field(min_length=1, max_length=500)
    reference: str | None = Field(
        default=None, description="Your id for it: the same again changes nothing", max_length=128
    )
    actor: str = ACTOR


class AccountView(BaseModel):
    account_id: str
    currency: str
    as_of: datetime
    balance: str = Field(description="in currency units with 5 decimals, as the ledger keeps it")
    reserved: str = Field(description="held for calls in progress (open authorizations); counts as spent")
    overdraft: str = Field(description="how far below zero calls may be authorized")
    available: str = Field(description="what calls may still spend: balance - reserved + overdraft")
    threshold: str
    recharge_amount: str
    average_daily: str
    runway_days: str | None = Field(description="null when there is no usage to wear the balance down")
    auto_recharge: bool
    recharge_state: str
    state_reason: str | None
    retry_at: datetime | None
    due_since: datetime | None
    next_cycle_at: datetime | None
    decision: str = Field(description="what the next cycle would do: charge or skip")
    decision_reason: str
    dialer_rate_per_minute: str | None
    longest_call_seconds: int | None = Field(
        description="the longest call the available money pays for now at the account's dialer rate (null: no dialer "
        "rate)"
    )
    email: str
    plan: str
    vat_percent: str
    status: Literal["open", "closed"]
    created_at: datetime
    first_usage_at: datetime | None
    closed_at: datetime | None
    closed_reason: str | None
    overrides: dict[str, int | str | None] = Field(
        description="the account's own policy settings; null where config.toml's value applies"
    )


class AccountSummary(BaseModel):
    id: str
    email: str
    plan: str
    currency: str
    balance: str
    auto_recharge: bool
    recharge_state: str
    status: Literal["open", "closed"]
    below_threshold: bool | None = Field(default=None, description="given when the list was filtered by it")


class AccountList(BaseModel):
    data: list[AccountSummary]
    has_more: bool


class RechargeView(BaseModel):
    id: int
    account_id: str
    kind: Literal["auto", "topup"]
    phase: Literal["claimed", "charging", "paid", "credited", "finished", "failed"]
    currency: str
    amount: str = Field(description="credited to the balance (net)")
    vat: str
    total: str = Field(description="charged: amount plus VAT")
    vat_percent: str
    card: str | None
    funding_source: int | None
    payment_intent: str | None
    receipt: str | None
    outcome: str | None
    actor: str | None
    requires_action: bool = Field(description="the customer must authenticate the payment (client_secret)")
    decision: dict[str, Any] | None = Field(
        description="an automatic recharge's decision as it was claimed: when, its inputs and its figures"
    )
    limited_by: str | None
    created_at: datetime
    updated_at: datetime
    client_secret: str | None = Field(default=None, description="for Stripe.js, while requires_action")
    next_action: dict[str, Any] | None = None


class RechargeList(BaseModel):
    data: list[RechargeView]
    has_more: bool


class FundingSourceView(BaseModel):
    source: int
    card: str
    customer: str
    payment_method: str
    default: bool
    unusable: str | None


class FundingSourceList(BaseModel):
    data: list[FundingSourceView]
    has_more: bool


class ReceiptSummary(BaseModel):
    number: str
    issued_at: datetime
    kind: str
    currency: str
    amount: str
    vat: str
    vat_percent: str
    total: str
    card: str
    payment_reference: str
    email_status: str | None


class ReceiptList(BaseModel):
    data: list[ReceiptSummary]
    has_more: bool


class ReceiptView(BaseModel):
    number: str
    account_id: str
    recharge_id: int
    issued_at: datetime
    kind: str
    currency: str
    amount: str
    vat: str
    total: str
    balance_after: str
    payment_reference: str
    content: dict[str, Any] = Field(description="every line of the receipt as it was issued")


class EntryView(BaseModel):
    id: int
    type: str
    external_id: str
    amount: str
    occurred_at: datetime
    recorded_at: datetime
    kind: str | None
    duration_seconds: int | None
    quantity: int | None
    note: str | None
    reference: str | None


class EntryList(BaseModel):
    currency: str
    data: list[EntryView]
    has_more: bool


class AuditView(BaseModel):
    id: int
    account_id: str
    at: datetime
    actor: str
    via: str | None = Field(description="the API token that made the change (api:NAME); null for the CLI")
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class AuditList(BaseModel):
    data: list[AuditView]
    has_more: bool


class AdjustmentResult(BaseModel):
    account_id: str
    currency: str
    amount: str
    reference: str | None
    recorded: bool = Field(description="false: this adjustment (same reference and amount) was recorded before")
    balance: str


class StatusChange(BaseModel):
    account_id: str
    status: Literal["open", "closed"]
    at: datetime
    balance: str
    currency: str
    reason: str | None


class StatementMoney(BaseModel):
    amount: str = Field(description="rounded to the currency's minor unit, as the statement shows it")
    amount_exact: str = Field(description="with the ledger's five decimals")


class StatementView(BaseModel):
    """A monthly statement as JSON; `Accept: text/csv` gives one row per line instead."""

    model_config = ConfigDict(extra="allow")

    account: str
    email: str
    currency: str
    month: str
    start: str
    last_day: str
    issued_at: str | None
    partial: bool = Field(description="the month is not over: the statement as it stands")
    opening_balance: StatementMoney
    products: list[dict[str, Any]]
    usage_total: StatementMoney
    credits: list[dict[str, Any]]
    credits_total: StatementMoney
    reversals: list[dict[str, Any]]
    reversals_total: StatementMoney
    closing_balance: StatementMoney
    note: str | None


class UsageOfKind(BaseModel):
    events: int
    quantity: int
    unit: str
    amount: str


class RechargeOfDay(BaseModel):
    recharge: int
    kind: str
    at: datetime
    amount: str
    charged: str
    phase: str
    outcome: str | None


class UsageDay(BaseModel):
    day: str
    usage: dict[str, UsageOfKind] = Field(description="by kind of usage")
    usage_total: str
    credits_and_adjustments: str
    balance: str = Field(description="at the end of the day")
    threshold: str
    average_daily: str
    recharges: list[RechargeOfDay]


class DailyUsage(BaseModel):
    account: str
    currency: str
    since: str
    until: str
    opening_balance: str
    days: list[UsageDay]


class CycleSummary(BaseModel):
    """What one recharge cycle did, as `recharged cycle` prints it and the job runs record it."""

    at: datetime
    accounts: int = Field(description="accounts planned")
    due: int
    charged: int
    failed: int
    waiting: int = Field(description="waiting on the processor: the completer (or the next cycle) finishes them")
    not_claimed: int = Field(description="no longer due when decided again under the account's lock")
    errors: int
    left_for_next: int
    recovered: int = Field(description="recharges left half-way before, finished first")
    integration_errors: int
    halted: str | None = Field(description="why the circuit breaker stopped charging, if it did")
    charged_total: dict[str, str] = Field(description="charged (VAT included), per currency")
    notices: int = Field(description="customer notices and CRM events the plans gave (balance low, caps reached)")


class AuthorizationRequest(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"account_id": "acme", "kind": "dialer", "call_id": "call-7781"}]},
    )

    account_id: str = Field(max_length=64)
    kind: str = Field(description="a kind billed by time (the dialer's calls)", max_length=40)
    call_id: str = Field(description="the dialer's id of the call: the same call again answers its first authorization")
    requested_seconds: int | None = Field(default=None, description="at most this long (default: [authorizations])")


class ExtendRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"requested_seconds": 1800}]})

    requested_seconds: int | None = Field(default=None, description="the call's whole length wanted now")


class AuthorizationView(BaseModel):
    id: int
    account_id: str
    call_id: str
    kind: str
    requested_seconds: int | None
    authorized_seconds: int = Field(description="the longest the call may last: the available money pays for it")
    reserved_amount: str = Field(description="held until the call's usage (with authorization_id) settles it")
    currency: str
    status: Literal["open", "settled", "released", "expired"]
    created_at: datetime
    expires_at: datetime = Field(description="an unsettled reservation is released then")
    ended_at: datetime | None
    usage_event_id: str | None


class RefusalBody(BaseModel):
    status: int
    message: str
    reason: Literal["insufficient_balance", "account_closed"]


class Refusal(BaseModel):
    error: RefusalBody


class BalanceView(BaseModel):
    """The account's money as a dialer reads it before a call: one row, no usage window."""

    account_id: str
    currency: str
    balance: str
    reserved: str = Field(description="held for calls in progress")
    overdraft: str
    available: str = Field(description="balance - reserved + overdraft")
    kind: str
    longest_call_seconds: int | None = Field(
        description="of this kind, at the account's rate (null: not billed by time)"
    )
    status: Literal["open", "closed"]
