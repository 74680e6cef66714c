"""recharged's vocabulary of states and kinds, each defined once.

The models store these values (`Mapped[Phase]`), the database's CHECK constraints are generated from them
(`store/models.py`), and queries, services and the CLI compare against them. A StrEnum member is its string, so
what is stored, logged and printed is the plain value ("claimed", "topup", ...).
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """Where a recharge stands, one transaction each: claimed -> charging -> paid -> credited -> finished, or
    failed. Every phase but finished and failed is open (one open recharge per account)."""

    CLAIMED = "claimed"
    CHARGING = "charging"
    PAID = "paid"
    CREDITED = "credited"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def is_open(self) -> bool:
        return self not in CLOSED_PHASES


CLOSED_PHASES = (Phase.FINISHED, Phase.FAILED)
OPEN_PHASES = tuple(p for p in Phase if p not in CLOSED_PHASES)


class RechargeKind(StrEnum):
    """What started a recharge: the cycle's decision, or a one-time purchase."""

    AUTO = "auto"
    TOPUP = "topup"


class AttemptStatus(StrEnum):
    """One request to the processor under one idempotency key."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    ACTION_REQUIRED = "action_required"
    ABANDONED = "abandoned"
    ERROR = "error"  # the processor refused our request (an integration error): never the card's fault


class DeclineClass(StrEnum):
    """A hard decline makes the card unusable until an admin acts; a soft one may pass later."""

    HARD = "hard"
    SOFT = "soft"


class RechargeState(StrEnum):
    """Where an account's automatic recharge stands."""

    OK = "ok"
    BACKING_OFF = "backing_off"  # every card failed: wait until retry_at
    SUSPENDED = "suspended"  # the retry schedule ran out
    ACTION_REQUIRED = "action_required"  # the customer must authenticate a payment
    DISPUTED = "disputed"  # a payment was disputed: paused until an admin acts


class EntryType(StrEnum):
    """The origin of a ledger entry; (entry_type, external_id) is unique."""

    USAGE = "usage"
    OPENING = "opening"
    ADJUSTMENT = "adjustment"
    RECHARGE = "recharge"
    TOPUP = "topup"
    REFUND = "refund"  # money given back to the card (one entry per refund)
    DISPUTE = "dispute"  # funds withdrawn by a dispute
    REINSTATED = "reinstated"  # funds of a dispute given back when it was won


CREDIT_TYPES = (EntryType.RECHARGE, EntryType.TOPUP)  # credits paid for by a card
CHARGE_TYPES = (EntryType.RECHARGE,)  # what the spend caps count: automatic recharges
REVERSAL_TYPES = (EntryType.REFUND, EntryType.DISPUTE, EntryType.REINSTATED)  # movements after a charge


class Measure(StrEnum):
    """How a usage kind is rated: by time (seconds in billing increments) or by count (units)."""

    TIME = "time"
    COUNT = "count"


class OutboxStatus(StrEnum):
    """pending -> sending (claimed, leased) -> sent | pending (retry later) | failed (permanent, or gave up);
    pending or failed -> cancelled (an admin stopped it: never sent)."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EventStatus(StrEnum):
    """A processor event in the inbox: pending (stored, to be handled; again at next_attempt_at after a failure)
    -> handled (acted on once, whatever the outcome) | ignored (a type or object recharged does not act on)."""

    PENDING = "pending"
    HANDLED = "handled"
    IGNORED = "ignored"


class JobStatus(StrEnum):
    """How a daemon job run ended (running while it runs)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    STOPPED = "stopped"  # cut short by a shutdown: the next start runs it again at once
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the process died mid-run


class WebhookEventType(StrEnum):
    """What recharged tells the CRM's webhook endpoints (`[[webhooks.endpoints]]`), one event per occurrence."""

    BALANCE_LOW = "balance.low"  # below the threshold with automatic recharge off or failing, once per crossing
    BALANCE_RECOVERED = "balance.recovered"  # back at or above the threshold after balance.low
    BALANCE_DEPLETED = "balance.depleted"  # at or below zero, with automatic recharge off or failing
    RECHARGE_SUCCEEDED = "recharge.succeeded"  # an automatic recharge or a one-time purchase credited
    RECHARGE_FAILED = "recharge.failed"  # nothing was charged
    RECHARGE_ACTION_REQUIRED = "recharge.action_required"  # the card needs the customer to authenticate
    AUTO_RECHARGE_CHANGED = "auto_recharge.changed"  # an admin changed the settings
    AUTO_RECHARGE_SUSPENDED = "auto_recharge.suspended"  # the retry schedule ran out
    FUNDING_SOURCE_UNUSABLE = "funding_source.unusable"  # a hard decline, or the processor removed the card
    REFUND_CREATED = "refund.created"
    DISPUTE_CREATED = "dispute.created"
    DISPUTE_CLOSED = "dispute.closed"
    CAP_REACHED = "cap.reached"  # a spend cap stops automatic recharge
    STATEMENT_ISSUED = "statement.issued"


class WebhookStatus(StrEnum):
    """One event's delivery to one endpoint: pending -> sending (claimed, leased) -> delivered | pending (retried
    later) | failed (the retry schedule ran out); `webhooks replay` makes it pending again."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


class AuthorizationStatus(StrEnum):
    """A call's reservation: open (its money held) -> settled (the call's usage arrived), released (the dialer
    said the call was not placed) or expired (neither came within the authorized time and a grace)."""

    OPEN = "open"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"
