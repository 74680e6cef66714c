"""Regenerate the sample in examples/ (deterministic): `python examples/make_sample.py`.

Six customers with different habits over the 35 days before 2026-11-16, as a CRM would export them.
"""

from __future__ import annotations

import csv
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).parent
END = datetime(2026, 11, 16, tzinfo=UTC)

ACCOUNTS = [
    # id, email, vat, created_at, opening balance, auto-recharge, calls per day (day index -> count)
    ("acme-law", "billing@acme-law.example", "20", "2026-06-01T09:00:00Z", "150.00", "true", lambda d: 40),
    ("birch-dental", "office@birch-dental.example", "0", "2026-05-12T14:30:00Z", "40.00", "true", lambda d: 5 + d),
    (
        "cedar-realty",
        "accounts@cedar-realty.example",
        "8.875",
        "2026-07-20T00:00:00Z",
        "25.00",
        "true",
        lambda d: 120 if d % 7 == 3 else 4,
    ),
    ("delta-startup", "founder@delta-startup.example", "20", "2026-11-12T16:00:00Z", "12.00", "true", lambda d: 30),
    ("elm-insurance", "ap@elm-insurance.example", "19", "2026-03-02T08:00:00Z", "3.10", "false", lambda d: 15),
    ("fir-clinic", "admin@fir-clinic.example", "0", "2026-08-15T12:00:00Z", "80.00", "true", lambda d: 2),
]

MESSAGES = [
    "Your appointment is confirmed for tomorrow at 10:00.",
    "Hi! Following up on the documents we discussed; please reply with a good time to call back this week. "
    "We are available Monday to Friday from 9am to 6pm, and Saturday mornings by appointment.",
    "Rappel : votre rendez-vous est confirmé. Merci de répondre OUI pour confirmer ou NON pour annuler.",
]


def main() -> None:
    rng = random.Random(2026)
    with (HERE / "accounts.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        columns = "id email plan vat_percent created_at opening_balance auto_recharge"
        card_columns = "stripe_customer payment_method card_brand card_last4 card_exp"
        writer.writerow([*columns.split(), *card_columns.split()])
        for n, (account_id, email, vat, created, opening, auto, _) in enumerate(ACCOUNTS):
            card = [f"cus_Sample{n:04d}", f"pm_Sample{n:04d}", "visa", f"{4242 + n}", "12/2029"]
            if account_id == "fir-clinic":
                card = ["", "", "", "", ""]  # no card on file yet
            writer.writerow([account_id, email, "standard", vat, created, opening, auto, *card])

    rows = []
    for account_id, _, _, created, _, _, calls_per_day in ACCOUNTS:
        start = max(END - timedelta(days=35), datetime.fromisoformat(created))
        day = 0
        while start + timedelta(days=day) < END:
            base = (start + timedelta(days=day)).replace(hour=0, minute=0, second=0)
            for n in range(calls_per_day(day)):
                at = base + timedelta(seconds=rng.randint(8 * 3600, 19 * 3600))
                if at < start or at >= END:
                    continue
                stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
                leg = rng.choice(["dialer"] * 6 + ["outbound"] * 2 + ["inbound"])
                seconds = max(0, int(rng.expovariate(1 / 150))) if rng.random() > 0.2 else 0
                rows.append([f"{account_id}-{day}-{n}", account_id, leg, stamp, seconds, "", "", ""])
                if n % 5 == 0:
                    rows.append(
                        [f"{account_id}-{day}-{n}-sms", account_id, "sms_out", stamp, "", "", rng.choice(MESSAGES), ""]
                    )
                if leg == "inbound":
                    rows.append([f"{account_id}-{day}-{n}-cnam", account_id, "lookup", stamp, "", 1, "", ""])
            day += 1
    rows.sort(key=lambda r: r[3])
    # Two rows a real export tends to have: a kind the plan does not price, and a call with no duration.
    rows.append(["bad-1", "acme-law", "fax", "2026-11-15T10:00:00Z", 30, "", "", ""])
    rows.append(["bad-2", "birch-dental", "dialer", "2026-11-15T10:05:00Z", "", "", "", ""])
    with (HERE / "usage.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["event_id", "account_id", "kind", "started_at", "duration_seconds", "quantity", "text", "cost"]
        )
        writer.writerows(rows)


if __name__ == "__main__":
    main()
