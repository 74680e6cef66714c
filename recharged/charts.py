"""PNG charts of an account's balance over time: the balance, its threshold, and the recharges that lifted it.

Drawn with matplotlib's Agg backend (no screen needed). Amounts become floats only here, for drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from recharged.money import Units, format_customer, to_decimal


@dataclass(frozen=True, slots=True)
class BalancePoint:
    at: datetime
    balance: Units
    threshold: Units | None = None  # the minimum reserve at that moment, when known


def _major(amount: Units) -> float:
    """An amount as matplotlib plots it: scaled by money.py, turned into a float only to be drawn."""
    return float(to_decimal(amount))


def balance_chart(
    path: Path,
    *,
    title: str,
    currency: str,
    points: Sequence[BalancePoint],
    recharges: Sequence[tuple[datetime, Units]] = (),
) -> Path:
    """Draw the balance as a step line, the threshold as a dashed line, and each recharge as a marker with
    its amount; write a PNG to `path` and return it."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError("a balance chart needs at least one point")
    figure, subplot = plt.subplots(figsize=(10, 4.5), dpi=100)
    axes: Any = subplot  # matplotlib's stubs take dates only as numbers; it plots datetimes all the same
    try:
        times = [p.at for p in points]
        axes.step(times, [_major(p.balance) for p in points], where="post", label="balance", color="#1f77b4")
        with_threshold = [p for p in points if p.threshold is not None]
        if with_threshold:
            axes.step(
                [p.at for p in with_threshold],
                [_major(p.threshold) for p in with_threshold if p.threshold is not None],
                where="post",
                linestyle="--",
                color="#d62728",
                label="threshold (minimum reserve)",
            )
        if recharges:
            balance_at = {p.at: p.balance for p in points}
            ys = [_major(balance_at.get(at, amount)) for at, amount in recharges]
            axes.scatter([at for at, _ in recharges], ys, marker="^", color="#2ca02c", zorder=3, label="recharge")
            for (at, amount), y in zip(recharges, ys, strict=True):
                axes.annotate(
                    "+" + format_customer(amount, currency),
                    (at, y),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=7,
                    color="#2ca02c",
                )
        axes.axhline(0, color="#888888", linewidth=0.8)
        axes.set_title(title)
        axes.set_ylabel(currency)
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))  # type: ignore[no-untyped-call]
        figure.autofmt_xdate()
        axes.grid(True, alpha=0.3)
        axes.margins(y=0.12)  # room above the highest recharge for its label
        axes.legend(loc="lower left", fontsize=8)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
