"""One-time purchases asked for with an idempotency key (the HTTP API's `POST /v1/accounts/{id}/topups`).

The key is written in the same transaction as the recharge it claims, so however often a client retries, and
whenever we crash, a key has exactly one recharge and the purchase is charged once:

- a new key claims a recharge and charges it; the answer is kept with the key once the recharge has finished;
- the same key with the same request gets the kept answer (or, while its recharge is still open, InFlight: the
  client retries later and meanwhile the recharge is finished here or by recovery);
- the same key with another request (another account, amount or signer) is refused: KeyReused.

Keys belong to the token that sent them: two tokens never share one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from recharged.clock import Clock
from recharged.errors import ConflictError, InputError
from recharged.money import Units, format_ledger
from recharged.payments import PaymentGateway
from recharged.recharge import RechargeService
from recharged.states import CLOSED_PHASES
from recharged.store.engine import Database
from recharged.store.models import ApiIdempotency, Recharge
from recharged.views import recharge_json

MAX_KEY = 255


class InFlight(ConflictError):
    """The first request with this key is still being charged."""


class KeyReused(InputError):
    """The key came before with another request."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]
    replayed: bool  # the kept answer of an earlier request with the same key


def fingerprint(account_id: str, amount: Units, actor: str) -> str:
    """What makes two requests the same request."""
    canonical = json.dumps({"account": account_id, "amount": format_ledger(amount), "actor": actor}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str | None) -> str:
    if key is None or not key.strip():
        raise InputError("the Idempotency-Key header is required: a unique value per purchase, e.g. a UUID")
    key = key.strip()
    if len(key) > MAX_KEY or not key.isprintable():
        raise InputError(f"the Idempotency-Key must be 1 to {MAX_KEY} printable characters")
    return key


def with_authentication(body: dict[str, Any], gateway: PaymentGateway | None) -> dict[str, Any]:
    """A recharge's view (`views.recharge_json`) with the client secret and next action of the payment it waits
    for the customer to authenticate, asked of the processor now (never kept here)."""
    body = {**body, "client_secret": None, "next_action": None}
    if body["requires_action"] and gateway is not None and body["payment_intent"]:
        found = gateway.authentication(body["payment_intent"])
        if found is not None:
            body["client_secret"], body["next_action"] = found.client_secret, found.next_action
        else:  # authenticated (or given up) since: the payment's webhook settles it
            body["requires_action"] = False
    return body


def _kept_form(body: dict[str, Any]) -> dict[str, Any]:
    """An answer as it is kept with its key: the shape the client gets, without what Stripe.js needs (asked of the
    processor at each answer, never kept)."""
    return {**body, "client_secret": None, "next_action": None}


class Topups:
    def __init__(self, db: Database, recharges: RechargeService, clock: Clock) -> None:
        self._db, self._recharges, self._clock = db, recharges, clock

    def _kept(self, token: str, key: str, print_: str) -> Answer | None:
        """The answer for a key seen before (None when it is new)."""
        with self._db.transaction() as session:
            row = session.scalars(
                select(ApiIdempotency).where(ApiIdempotency.token == token, ApiIdempotency.key == key).with_for_update()
            ).one_or_none()
            if row is None:
                return None
            if row.fingerprint != print_:
                raise KeyReused(
                    f"the Idempotency-Key {key!r} was used for another request (account {row.account_id}, recharge "
                    f"{row.recharge_id}); use a new key for a new purchase"
                )
            if row.response is not None and row.response_status is not None:
                status, body = row.response_status, dict(row.response)
                if body.get("requires_action"):  # waiting for the customer when kept: it may be paid since
                    recharge = session.get(Recharge, row.recharge_id)
                    assert recharge is not None
                    body = _kept_form(recharge_json(session, recharge))
            else:  # the first request ended before it could keep its answer (a crash, a lost connection)
                recharge = session.get(Recharge, row.recharge_id)
                assert recharge is not None
                if recharge.phase not in CLOSED_PHASES:
                    raise InFlight(
                        f"the purchase with Idempotency-Key {key!r} (recharge {recharge.id}) is still being charged "
                        f"({recharge.phase}); ask again in a few seconds"
                    )
                status, body = 201, _kept_form(recharge_json(session, recharge))
                row.response_status, row.response = status, body
        return Answer(status, self._shown(body), replayed=True)

    def _shown(self, kept: dict[str, Any]) -> dict[str, Any]:
        """A kept answer as the client gets it: what Stripe.js needs, asked of the processor now, outside any
        transaction (the client secret is never kept)."""
        return with_authentication(kept, self._recharges.gateway)

    def buy(self, *, token: str, key: str, account_id: str, amount: Units, actor: str) -> Answer:
        """Charge a one-time purchase once per (token, key)."""
        print_ = fingerprint(account_id, amount, actor)
        kept = self._kept(token, key, print_)
        if kept is not None:
            return kept
        now = self._clock.now()

        def remember(session: Session, recharge_id: int) -> None:
            session.add(
                ApiIdempotency(
                    token=token,
                    key=key,
                    fingerprint=print_,
                    account_id=account_id,
                    recharge_id=recharge_id,
                    created_at=now,
                )
            )
            session.flush()  # a key taken meanwhile by the same request fails here, and the claim with it

        try:
            report = self._recharges.topup(account_id, amount, actor, on_claim=remember)
        except IntegrityError:  # the same key, at the same moment: that request charges, this one reads its answer
            kept = self._kept(token, key, print_)
            if kept is None:
                raise
            return kept
        with self._db.transaction() as session:
            recharge = session.get(Recharge, report.recharge_id)
            assert recharge is not None
            body = _kept_form(recharge_json(session, recharge))
            if recharge.phase in CLOSED_PHASES:
                row = session.scalars(
                    select(ApiIdempotency).where(ApiIdempotency.token == token, ApiIdempotency.key == key)
                ).one()
                row.response_status, row.response = 201, body
        return Answer(201, self._shown(body), replayed=False)
