"""Balance charts are real PNG files with the balance, threshold and recharges drawn."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from recharged.charts import BalancePoint, balance_chart

START = datetime(2026, 9, 1, tzinfo=UTC)


def test_a_balance_chart_is_a_png_file(tmp_path):
    points = [BalancePoint(START + timedelta(days=d), (50 - d) * 100_000, 20 * 100_000) for d in range(40)]
    path = balance_chart(
        tmp_path / "acme.png",
        title="acme",
        currency="USD",
        points=points,
        recharges=[(START + timedelta(days=31), 42 * 100_000)],
    )
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000  # axes, lines and labels, not an empty canvas


def test_a_chart_without_points_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one point"):
        balance_chart(tmp_path / "x.png", title="x", currency="USD", points=[])
    assert not (tmp_path / "x.png").exists()
