"""A card on file at the processor, and how it is named to admins: plain values, apart from the Stripe adapter
(`payments`) so that showing or importing an account does not load the Stripe SDK."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CardInfo:
    customer: str
    payment_method: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int


class CardDetails(Protocol):
    """What is known of a card for display: a CardInfo from the processor or a stored FundingSource."""

    @property
    def brand(self) -> str: ...
    @property
    def last4(self) -> str: ...
    @property
    def exp_month(self) -> int: ...
    @property
    def exp_year(self) -> int: ...


def card_label(card: CardDetails, *, expiry: bool = True) -> str:
    """How a card is named to admins and in logs: 'visa ...4242 exp 12/2030' (never more of the number)."""
    label = f"{card.brand} ...{card.last4}"
    return f"{label} exp {card.exp_month:02d}/{card.exp_year}" if expiry else label
