"""The configuration checked against the data: every plan, currency and usage kind the accounts in the database
use must be in the configuration, or their usage would be refused and their recharges undecidable. Run by
`check-config`, at the daemon's start (which refuses to start) and on its reload (which keeps the running
configuration)."""

from __future__ import annotations

from datetime import date, timedelta

from recharged.config import Settings
from recharged.store.engine import Database
from recharged.store.reads import kinds_in_use, plans_in_use
from recharged.words import plural


def data_problems(db: Database, settings: Settings, today: date) -> list[str]:
    """What the database's accounts use that the configuration lacks, one line each, naming an account."""
    problems = []
    with db.reading() as session:
        used = plans_in_use(session)
        kinds = kinds_in_use(session, today - timedelta(days=settings.usage.max_age_days))
    for plan, currency, count, first in used:
        accounts = f"{plural(count, 'account')} (e.g. {first})"
        configured = settings.plans.get(plan)
        if configured is None:
            defined = ", ".join(sorted(settings.plans))
            problems.append(f"plans.{plan}: used by {accounts}, but the configuration lacks it (it has: {defined})")
        elif configured.currency != currency:
            problems.append(f"plans.{plan}: priced in {configured.currency}, but {accounts} on it are in {currency}")
    for plan, kind, account in kinds:
        configured = settings.plans.get(plan)
        if configured is not None and kind not in configured.rates:
            problems.append(
                f"plans.{plan}.rates.{kind}: usage of this kind was recorded (e.g. for {account}) within "
                f"usage.max_age_days, but the plan has no rate for it: more would be refused"
            )
    return problems
