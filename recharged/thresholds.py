"""Each account's recharge threshold as last planned today, so that usage batches plan again only the accounts they
may have brought under it.

After each usage batch the daemon (or `recharged api`) marks the accounts that fell under their threshold as due,
and charges at once those that will not last until the next cycle (`RechargeService.mark_due`). Planning an
account reads its 30-day window and its caps: about a tenth of a second for the 600 accounts of a batch of 1,000
events on PostgreSQL, more than recording the batch itself. Yet an account at or above its threshold is never due
(`balance.decide` skips it before anything else can make it a charge), and its threshold only changes with:

- the UTC day (the window is the full days before it);
- what it is computed from on the account's row: plan, currency, creation and first usage (the time the window
  covers), and the account's own window_days, threshold_days and min_threshold (`THRESHOLD_KEY_COLUMNS`);
- the configuration (a reload builds a new RechargeService, and with it a new `Thresholds`);
- usage of an earlier day recorded since (a late call record): the recorder tells `forget`.

So a batch reads the touched accounts' available money and those columns in one statement, and plans only those
under their known threshold or whose threshold is not known for today with the same columns. The rest were
planned as "skip" before and would be again. Another process's late usage (a CSV import of yesterday's calls) is
seen at the next cycle, which plans every account whatever is known here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy.orm import Session

from recharged.balance import AccountPlan
from recharged.store.ledger import available_and_threshold_keys

Key = tuple[Any, ...]  # an account's THRESHOLD_KEY_COLUMNS, as read


class Thresholds:
    """What one process knows of thresholds today: account -> (day, the row's key columns, threshold)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[date, Key, int]] = {}
        self._lock = threading.Lock()

    def to_plan(self, session: Session, ids: Sequence[str], at: datetime) -> tuple[list[str], dict[str, Key]]:
        """The accounts of `ids` that must be planned to know whether they are due, and the key of each account
        read (for `learn`)."""
        day = at.date()
        keys: dict[str, Key] = {}
        wanted = []
        rows = available_and_threshold_keys(session, ids)
        with self._lock:
            for account_id, available, *key in rows:
                keys[account_id] = tuple(key)
                known = self._known.get(account_id)
                if known is None or known[0] != day or known[1] != keys[account_id] or available < known[2]:
                    wanted.append(account_id)
        return wanted, keys

    def learn(self, plans: Iterable[AccountPlan], keys: dict[str, Key], at: datetime) -> None:
        """Keep the thresholds just planned, with the key each was read with."""
        day = at.date()
        with self._lock:
            for plan in plans:
                key = keys.get(plan.account_id)
                if key is not None:
                    self._known[plan.account_id] = (day, key, plan.decision.threshold)

    def forget(self, account_ids: Iterable[str]) -> None:
        """Usage of an earlier day was recorded for these accounts: their window, hence their threshold, changed."""
        with self._lock:
            for account_id in account_ids:
                self._known.pop(account_id, None)
