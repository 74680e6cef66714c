"""End-to-end tests end with `verify`: whatever a test did through the real commands and the real daemon, every
invariant recharged keeps must still hold in its database afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from recharged.store.engine import Database
from recharged.verify import verify


@pytest.fixture
def processor_clock() -> Callable[[], float]:
    """The commands under test run on the real clock; so does the processor they talk to (its `Date` header tells
    them how far apart the two clocks are, and they refuse to charge past a tolerance)."""
    return time.time


@pytest.fixture(autouse=True)
def verified_afterwards(request: pytest.FixtureRequest) -> Iterator[None]:
    # Asked for before the test runs, so the database outlives this fixture's check.
    url = request.getfixturevalue("db_url") if "db_url" in request.fixturenames else None
    yield
    if url is None or getattr(request.node, "rep_call_failed", True):
        return
    db = Database(url)
    try:
        if db.current_revision() != db.head_revision():
            return  # the test left no migrated database (it checked a refusal)
        report = verify(db)
    finally:
        db.close()
    assert report.ok, "verify after the test: " + "; ".join(report.violations[:10])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if call.when == "call":
        item.rep_call_failed = report.failed  # type: ignore[attr-defined]
    return report
