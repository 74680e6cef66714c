"""`recharged demo`: sixty days of a handful of customers in well under a minute, on the embedded default.

Everything is local and made up: a fresh SQLite database, the Stripe-compatible test server started in this
process (Stripe's test cards, a key like `sk_test_demo`, no network), receipts and notices written as .eml
files, all in one output folder. A `FixedClock` moves through the 60 days in steps of 4 hours; at each step
the usage of the past 4 hours is recorded (calls billed per minute, some SMS), then the recharge cycle runs
as the daemon runs it (with the notices the plans call for) and the outbox is delivered. Usage comes from a
seeded random generator, so every run charges the same amounts. At the end: a chart per account, a summary,
and `verify` on the database.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests
import stripe
from tenacity import wait_none

from recharged.accounts import NewAccount, adjust_balance, create_accounts
from recharged.balance import SECONDS_PER_DAY, AccountPlan, runway_days
from recharged.charts import BalancePoint, balance_chart
from recharged.clock import FixedClock, SystemClock, start_of_day
from recharged.config import Settings
from recharged.errors import InputError, RechargedError
from recharged.mail.notices import notify_from_plans
from recharged.mail.outbox import OutboxSender
from recharged.money import Units, format_ledger, parse_amount
from recharged.payments import StripeGateway
from recharged.recharge import RechargeService
from recharged.sms import count_segments
from recharged.store.engine import Database
from recharged.store.reads import account_activity, balances
from recharged.testing import StripeTestServer
from recharged.usage import UsageRecorder
from recharged.verify import Report, verify

MARKER = ".recharged-demo"  # in an output folder: it is a demo's, and a new demo may replace it
DAYS = 60
HISTORY_DAYS = 30  # usage the established accounts bring from before the demo, so their averages are real
STEP = timedelta(hours=4)  # the daemon's default cycle interval
STEPS_PER_DAY = 6
# Share of a day's usage in each 4-hour slot from 00:00 UTC: a dialer is busy in office hours.
SLOT_SHARE = (0.02, 0.08, 0.30, 0.32, 0.23, 0.05)
SEED = "recharged-demo-1"
STRIPE_KEY = "sk_test_demo"
ACTOR = "Demo Admin"
CURRENCY = "USD"
# The standard plan's prices, to size a day's calls and messages (the ledger rates them itself).
CALL_PRICE_PER_MINUTE = 0.02
SMS_PRICE = 0.0079
SMS_TEXTS = (
    "Reminder: your appointment is tomorrow at 10:00. Reply STOP to opt out.",
    "Thanks for your call today! Your reference is 48213. Our team will get back to you within one business "
    "day with a quote for the work we discussed, including parts and labour.",
    "Votre rendez-vous est confirmé pour jeudi à 14h.",
    "We tried to reach you 📞 call us back at your convenience.",
)


@dataclass(frozen=True, slots=True)
class Customer:
    """One demo account and its habit."""

    id: str
    habit: str
    story: str
    card: str  # one of Stripe's test payment methods
    balance: str  # balance when the demo starts (or when the account joins)
    daily: Callable[[int, random.Random], float]  # dollars of usage on a day (negative: before the demo)
    joins_on_day: int | None = None  # None: an established account with HISTORY_DAYS of usage before day 0


def _steady(day: int, rng: random.Random) -> float:
    return 6.0 * rng.uniform(0.9, 1.1)


def _growing(day: int, rng: random.Random) -> float:
    return (2.0 + 12.0 * (day + HISTORY_DAYS) / (DAYS + HISTORY_DAYS)) * rng.uniform(0.9, 1.1)


def _spiky(day: int, rng: random.Random) -> float:
    campaign = rng.random() < 0.12
    return 3.0 * (rng.uniform(3.5, 5.0) if campaign else rng.uniform(0.7, 1.3))


def _modest(day: int, rng: random.Random) -> float:
    return 4.0 * rng.uniform(0.85, 1.15)


def _new(day: int, rng: random.Random) -> float:
    return 5.0 * rng.uniform(0.8, 1.2)


CUSTOMERS = (
    Customer("steady", "steady", "about $6 a day, every day", "pm_card_visa", "72.00", _steady),
    Customer("growing", "growing", "from $2 to $14 a day over 90 days", "pm_card_mastercard", "70.00", _growing),
    Customer("spiky", "spiky", "about $3 a day, with campaign days of 4-5 times that", "pm_card_visa", "55.00", _spiky),
    Customer("newcomer", "new", "joins a week before the end with no balance", "pm_card_visa", "0.00", _new, 53),
    Customer(
        "declining",
        "card declines",
        "its only card is declined (insufficient funds)",
        "pm_card_chargeDeclinedInsufficientFunds",
        "40.00",
        _modest,
    ),
    Customer(
        "needs-auth",
        "needs authentication",
        "its bank wants the customer to authenticate the card",
        "pm_card_authenticationRequired",
        "36.00",
        _modest,
    ),
)


@dataclass
class AccountResult:
    """What happened to one account over the demo."""

    account_id: str
    habit: str
    story: str
    charges: int
    charged: Units
    declines: int
    receipts: int
    notices: int
    balance_start: Units
    balance_end: Units
    lowest_balance: Units
    reserve_days: tuple[Decimal, Decimal] | None  # lowest before a cycle, highest after one
    state: str
    chart: Path

    def as_json(self) -> dict[str, Any]:
        return {
            "account": self.account_id,
            "habit": self.habit,
            "story": self.story,
            "charges": self.charges,
            "charged": format_ledger(self.charged),
            "declines": self.declines,
            "receipts": self.receipts,
            "notices": self.notices,
            "balance_start": format_ledger(self.balance_start),
            "balance_end": format_ledger(self.balance_end),
            "lowest_balance": format_ledger(self.lowest_balance),
            "reserve_days": None if self.reserve_days is None else [str(d) for d in self.reserve_days],
            "state": self.state,
            "chart": str(self.chart),
        }


@dataclass
class DemoResult:
    """The demo's summary: per account, totals, and where everything is."""

    out: Path
    database: Path
    emails: Path
    charts: Path
    config: Path
    start: datetime
    end: datetime
    currency: str
    accounts: list[AccountResult]
    usage_events: int
    cycles: int
    emails_written: int
    verify: Report
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "currency": self.currency,
            "usage_events": self.usage_events,
            "cycles": self.cycles,
            "emails_written": self.emails_written,
            "accounts": [a.as_json() for a in self.accounts],
            "database": str(self.database),
            "emails": str(self.emails),
            "charts": str(self.charts),
            "config": str(self.config),
            "verify": {"ok": self.verify.ok, "violations": self.verify.violations},
            "seconds": round(self.seconds, 1),
        }


def prepare_folder(out: Path) -> Path:
    """An empty output folder: created, or a previous demo's output replaced. A folder that holds anything
    else is refused and left as it is."""
    out = out.expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise InputError(f"{out} exists and is not a folder; give --out a new or empty folder")
        if (out / MARKER).is_file():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise InputError(
                f"{out} is not empty and is not the output of an earlier `recharged demo` (no {MARKER} file in it); "
                "nothing was changed: give --out a new or empty folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("Written by `recharged demo`; a new demo run replaces this whole folder.\n")
    return out


def demo_settings(out: Path, stripe_api_base: str) -> Settings:
    """The built-in defaults with the database, outbox and processor in the demo's folder and process."""
    return Settings.model_validate(
        {
            "database": {"url": f"sqlite:///{out / 'recharged.db'}"},
            "payments": {"stripe_api_base": stripe_api_base},
            "business": {"name": "Demo Dialer Co", "address": "1 Example Street\nSpringfield"},
            "smtp": {"from_address": "billing@dialer.example"},
            "outbox": {"folder": str(out / "emails"), "journal": str(out / "outbox.journal")},
            "logging": {"level": "warning"},
        }
    )


def _write_config(out: Path, settings: Settings) -> Path:
    """A config.toml that points recharged at the demo's database and outbox, to look around afterwards, and at
    `recharged testserver` for commands that talk to the processor (the demo's own server ends with the demo)."""
    # lazy: the command module is only needed for these few names
    from recharged.cli.testserver import DEFAULT_PORT, SANDBOX_API_KEY, SANDBOX_CUSTOMER, sandbox_payment_method

    path = out / "config.toml"
    toml = json.dumps  # a JSON string is a valid TOML basic string
    card = sandbox_payment_method(CUSTOMERS[0].card)
    path.write_text(
        "# Written by `recharged demo`: the built-in defaults with the demo's database and outbox. Look around with\n"
        f"#   recharged --config {path} receipts steady\n"
        "#\n"
        "# The demo charged through a Stripe-compatible server inside its own process, which ended with it. To run\n"
        "# the commands that talk to the processor (sources add, topup, cycle --once, reconcile) on this database,\n"
        "# start the bundled one (stripe_api_base below points at it) and, in another shell, set its test key:\n"
        f"#   recharged testserver --port {DEFAULT_PORT}\n"
        f"#   export RECHARGED_STRIPE_API_KEY={SANDBOX_API_KEY}\n"
        "# It does not know the demo's customers and cards: a charge on one of them is refused as a missing payment\n"
        "# method, and the card is marked unusable. Give an account one of the testserver's cards first, e.g.\n"
        f"#   recharged --config {path} sources add steady --customer {SANDBOX_CUSTOMER} --payment-method {card} \\\n"
        f'#       --default --actor "{ACTOR}"\n\n'
        f"[database]\nurl = {toml(settings.database.url)}\n\n"
        f"[payments]\nstripe_api_base = {toml(f'http://127.0.0.1:{DEFAULT_PORT}')}\n\n"
        f"[business]\nname = {toml(settings.business.name)}\naddress = {toml(settings.business.address)}\n\n"
        f"[smtp]\nfrom_address = {toml(settings.smtp.from_address)}\n\n"
        f"[outbox]\nfolder = {toml(settings.outbox.folder)}\njournal = {toml(settings.outbox.journal)}\n",
        encoding="utf-8",
    )
    return path


@dataclass
class _Track:
    """An account's samples over the demo, for its chart and its figures."""

    customer: Customer
    rng: random.Random
    days: list[float]  # dollars of usage per day, index 0 = HISTORY_DAYS before the demo
    points: list[BalancePoint] = field(default_factory=list)
    low_days: Decimal | None = None
    high_days: Decimal | None = None
    events: int = 0
    balance: Units = 0  # after the last cycle


def _slot_events(track: _Track, day: int, slot: int, slot_start: datetime) -> list[dict[str, str]]:
    """The calls and messages of one account in one 4-hour slot: about its day's dollars times the slot's share."""
    rng, account = track.rng, track.customer.id
    budget = track.days[day + HISTORY_DAYS] * SLOT_SHARE[slot]
    events: list[dict[str, str]] = []
    spent = 0.0
    while spent < budget:
        started = slot_start + timedelta(seconds=rng.randrange(0, int(STEP.total_seconds())))
        event_id = f"{account}-{started:%Y%m%d}-{track.events + len(events):06d}"
        if rng.random() < 0.15:
            text = rng.choice(SMS_TEXTS)
            sms = {"event_id": event_id, "account_id": account, "kind": "sms_out", "text": text}
            events.append(sms | {"started_at": started.isoformat()})
            spent += SMS_PRICE * count_segments(text)
        else:
            seconds = min(3600, 5 + int(rng.expovariate(1 / 200)))
            call = {"event_id": event_id, "account_id": account, "kind": "dialer", "duration_seconds": str(seconds)}
            events.append(call | {"started_at": started.isoformat()})
            spent += CALL_PRICE_PER_MINUTE * math.ceil(seconds / 60)
    track.events += len(events)
    return events


class _Simulation:
    """The demo's accounts and the services that run them, on one database, clock and processor."""

    def __init__(self, db: Database, settings: Settings, clock: FixedClock, server: StripeTestServer) -> None:
        self.db, self.settings, self.clock = db, settings, clock
        self.gateway = StripeGateway(
            STRIPE_KEY, api_base=server.url, timeout_seconds=10, max_retries=2, wait=wait_none(), now=clock.now
        )
        session = requests.Session()
        session.trust_env = False  # the local server is never reached through a proxy
        self.stripe = stripe.StripeClient(
            STRIPE_KEY, base_addresses={"api": server.url}, http_client=stripe.RequestsClient(session=session)
        )
        self.recharges = RechargeService(db, settings, lambda: self.gateway, clock)
        self.usage = UsageRecorder(db, settings, clock)
        self.sender = OutboxSender(db, settings, clock, wait=wait_none())
        self.tracks: dict[str, _Track] = {}
        self.joined: set[str] = set()
        self.cycles = 0

    def add(self, customer: Customer) -> None:
        rng = random.Random(f"{SEED}:{customer.id}")  # noqa: S311 - a seeded, reproducible simulation
        days = [customer.daily(day, rng) for day in range(-HISTORY_DAYS, DAYS)]
        self.tracks[customer.id] = _Track(customer, rng, days)

    def join(self, customer: Customer, *, history: bool) -> None:
        """Create the account with its card on file and automatic recharge on; an established one brings its
        last HISTORY_DAYS of usage and its prepaid balance from before."""
        now = self.clock.now()
        stripe_customer = self.stripe.v1.customers.create(params={"email": f"billing@{customer.id}.example"}).id
        method = self.stripe.v1.payment_methods.attach(customer.card, params={"customer": stripe_customer})
        card = self.gateway.card(stripe_customer, method.id)
        created_at = now - timedelta(days=HISTORY_DAYS) if history else now
        email, vat = f"billing@{customer.id}.example", Decimal(0)
        account = NewAccount(customer.id, email, "standard", CURRENCY, vat, created_at, auto_recharge=True, card=card)
        create_accounts(self.db, [account], ACTOR, self.clock)
        track = self.tracks[customer.id]
        if history:
            for day in range(-HISTORY_DAYS, 0):
                day_start = now + timedelta(days=day)
                events = [
                    e for slot in range(STEPS_PER_DAY) for e in _slot_events(track, day, slot, day_start + slot * STEP)
                ]
                self._record(events)
        target = parse_amount(customer.balance)
        with self.db.reading() as session:
            current = balances(session, [customer.id])[customer.id]
        if target != current:
            adjust_balance(
                self.db,
                customer.id,
                target - current,
                reason="prepaid balance brought over from before recharged",
                actor=ACTOR,
                clock=self.clock,
                reference=f"demo-opening-{customer.id}",
            )
        track.balance = target
        self.joined.add(customer.id)

    def _record(self, events: Sequence[dict[str, str]]) -> None:
        if not events:
            return
        refused = [o for o in self.usage.record(events) if o.status != "accepted"]
        if refused:
            raise RechargedError(f"the demo's usage was not recorded: {refused[0].event_id}: {refused[0].reason}")

    def record_slot(self, day: int, slot: int) -> None:
        """The usage of every account in the 4 hours that just ended."""
        now = self.clock.now()
        events: list[dict[str, str]] = []
        for account_id in sorted(self.joined):
            track = self.tracks[account_id]
            if track.balance > 0:  # the dialer stops an account's calls while it has no balance
                events += _slot_events(track, day, slot, now - STEP)
        self._record(events)

    def cycle(self) -> None:
        """A recharge cycle at the clock's time, as the daemon runs it, then a delivery run; and the samples."""
        now = self.clock.now()
        before: dict[str, AccountPlan] = {}

        def seen(plans: Sequence[AccountPlan]) -> None:
            before.update((p.account_id, p) for p in plans)
            notify_from_plans(self.db, now, plans)

        report = self.recharges.run_cycle(at=now, plans_seen=seen)
        if report.errors:
            problems = "; ".join(f"{a}: {e}" for a, e in sorted(report.errors.items()))
            raise RechargedError(f"the recharge cycle at {now.isoformat()} failed: {problems}")
        delivery = self.sender.send_pending()
        if not delivery.ok:
            raise RechargedError(f"delivering the outbox at {now.isoformat()} failed: {delivery.error}")
        self.cycles += 1
        with self.db.reading() as session:
            after = balances(session)
        for account_id, plan in before.items():
            track = self.tracks[account_id]
            d = plan.decision
            track.points.append(BalancePoint(now, d.balance, d.threshold))
            if after[account_id] != d.balance:
                track.points.append(BalancePoint(now, after[account_id], d.threshold))
            track.balance = after[account_id]
            low, high = d.runway_days, runway_days(after[account_id], d.average_daily, SECONDS_PER_DAY)
            if low is not None and (track.low_days is None or low < track.low_days):
                track.low_days = low
            if high is not None and (track.high_days is None or high > track.high_days):
                track.high_days = high


def run(out: Path, *, end: datetime | None = None, progress: Callable[[int, int], None] | None = None) -> DemoResult:
    """Run the demo into `out` (created, or a previous demo's output replaced): the 60 days end at the start
    of `end`'s UTC day (default: today). `progress(days_done, DAYS)` hears each simulated day."""
    started = time.monotonic()
    out = prepare_folder(out)
    end_at = start_of_day(end or SystemClock().now())
    start = end_at - timedelta(days=DAYS)
    clock = FixedClock(start)
    with StripeTestServer(clock=lambda: clock.now().timestamp()) as server:
        settings = demo_settings(out, server.url)
        config = _write_config(out, settings)
        db = Database(settings.database.url)
        try:
            db.upgrade()
            sim = _Simulation(db, settings, clock, server)
            for customer in CUSTOMERS:
                sim.add(customer)
                if customer.joins_on_day is None:
                    sim.join(customer, history=True)
            sim.cycle()
            for step in range(1, DAYS * STEPS_PER_DAY + 1):
                clock.set(start + step * STEP)
                day, slot = divmod(step - 1, STEPS_PER_DAY)
                sim.record_slot(day, slot)
                for customer in CUSTOMERS:
                    if customer.joins_on_day is not None and step == customer.joins_on_day * STEPS_PER_DAY:
                        sim.join(customer, history=False)  # at 00:00 UTC on its day
                sim.cycle()
                if progress is not None and slot == STEPS_PER_DAY - 1:
                    progress(day + 1, DAYS)
            accounts = _results(db, sim, out / "charts")
            report = verify(db)
        finally:
            db.close()
    emails = Path(settings.outbox.folder)
    result = DemoResult(
        out=out,
        database=out / "recharged.db",
        emails=emails,
        charts=out / "charts",
        config=config,
        start=start,
        end=end_at,
        currency=CURRENCY,
        accounts=accounts,
        usage_events=sum(t.events for t in sim.tracks.values()),
        cycles=sim.cycles,
        emails_written=len(list(emails.glob("*.eml"))),
        verify=report,
        seconds=time.monotonic() - started,
    )
    (out / "summary.json").write_text(json.dumps(result.as_json(), indent=2) + "\n", encoding="utf-8")
    return result


def _results(db: Database, sim: _Simulation, charts: Path) -> list[AccountResult]:
    """Each account's figures from the database, and its chart."""
    with db.reading() as session:
        activity = account_activity(session)
    charges, charged, declines = activity.charges, activity.charged, activity.declines
    receipts, notices, states, lifts = activity.receipts, activity.notices, activity.states, activity.lifts
    results = []
    for customer in CUSTOMERS:
        track = sim.tracks[customer.id]
        points = track.points
        chart = balance_chart(
            charts / f"{customer.id}.png",
            title=f"{customer.id} ({customer.habit}): balance, threshold and recharges",
            currency=CURRENCY,
            points=points,
            recharges=[(at, amount) for account, at, amount in lifts if account == customer.id],
        )
        reserve = None
        if track.low_days is not None and track.high_days is not None:
            reserve = (track.low_days, track.high_days)
        results.append(
            AccountResult(
                account_id=customer.id,
                habit=customer.habit,
                story=customer.story,
                charges=charges.get(customer.id, 0),
                charged=int(charged.get(customer.id) or 0),
                declines=declines.get(customer.id, 0),
                receipts=receipts.get(customer.id, 0),
                notices=notices.get(customer.id, 0),
                balance_start=points[0].balance,
                balance_end=points[-1].balance,
                lowest_balance=min(p.balance for p in points),
                reserve_days=reserve,
                state=states[customer.id],
                chart=chart,
            )
        )
    return results
