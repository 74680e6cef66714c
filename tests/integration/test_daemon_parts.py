"""The daemon's parts in-process: when jobs run, how missed runs are counted, how a reload swaps the
configuration (or keeps it), the single-instance lock, and the job-run record that health and status read."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from recharged.config import DaemonSettings, load_settings
from recharged.daemon.jobs import JobRecorder, close_interrupted_runs
from recharged.daemon.metrics import Metrics
from recharged.daemon.process import Daemon, single_instance
from recharged.daemon.scheduler import JobSpec, Scheduler, job_specs
from recharged.errors import InstanceError
from recharged.store.runs import finish_job_run, last_job_run, start_job_run
from tests.helpers import NOW

HOUR = timedelta(hours=1)


def test_the_first_cycle_runs_at_once_when_none_ever_succeeded_or_the_last_is_an_interval_old():
    settings = DaemonSettings()
    assert job_specs(settings, NOW, None)["cycle"].first_run == NOW
    assert job_specs(settings, NOW, NOW - 5 * HOUR)["cycle"].first_run == NOW


def test_after_a_restart_the_next_cycle_keeps_the_rhythm_of_the_last_one():
    specs = job_specs(DaemonSettings(), NOW, NOW - HOUR)
    assert specs["cycle"].first_run == NOW + 3 * HOUR  # 4-hour interval, the last one an hour ago
    assert specs["completer"].first_run == NOW  # recovery runs right at start


def test_the_cycle_trigger_follows_the_settings():
    settings = DaemonSettings(cycle_interval_hours=2, cycle_jitter_seconds=60, misfire_grace_seconds=900)
    spec = job_specs(settings, NOW, None)["cycle"]
    assert spec.trigger.interval == timedelta(hours=2)
    assert spec.trigger.jitter == 60
    assert spec.misfire_grace_seconds == 900


def test_the_scheduler_reports_its_next_runs_reschedules_and_pauses():
    far = datetime.now(UTC) + timedelta(days=1)
    specs = {"cycle": JobSpec(job_specs(DaemonSettings(), far, None)["cycle"].trigger, 60, far)}
    scheduler = Scheduler(on_missed=lambda job: None)
    scheduler.start({"cycle": lambda: None}, specs)
    try:
        assert scheduler.running
        assert scheduler.next_run("cycle") == far
        faster = job_specs(DaemonSettings(cycle_interval_hours=0.5, cycle_jitter_seconds=0), far, None)
        scheduler.reschedule(faster, ("cycle",))
        next_run = scheduler.next_run("cycle")
        assert next_run is not None
        assert next_run <= datetime.now(UTC) + timedelta(minutes=30, seconds=1)
        scheduler.pause()
        assert not scheduler.running
    finally:
        scheduler.shutdown()
    assert scheduler.next_run("unknown") is None


def test_a_run_missed_beyond_its_grace_time_is_counted_not_run():
    missed = threading.Event()
    ran = threading.Event()
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    specs = {"cycle": JobSpec(job_specs(DaemonSettings(), long_ago, None)["cycle"].trigger, 60, long_ago)}
    scheduler = Scheduler(on_missed=lambda job: missed.set())
    scheduler.start({"cycle": ran.set}, specs)
    try:
        assert missed.wait(10), "the missed run was not reported"
        assert not ran.is_set()
    finally:
        scheduler.shutdown()


def test_a_run_refused_because_the_last_is_still_going_is_counted(caplog):
    """APScheduler tells this with a JobSubmissionEvent, which has no `scheduled_run_time`: the listener raised,
    so the warning and recharged_jobs_missed were lost (found by bench/authorize.py on a saturated daemon)."""
    missed = threading.Event()
    release = threading.Event()
    now = datetime.now(UTC)
    specs = {"cycle": JobSpec(IntervalTrigger(seconds=1, timezone=UTC), 60, now)}
    scheduler = Scheduler(on_missed=lambda job: missed.set())
    scheduler.start({"cycle": lambda: release.wait(10)}, specs)  # still running when the next run comes
    try:
        assert missed.wait(10), "the refused run was not reported"
        assert "Error notifying listener" not in caplog.text
    finally:
        release.set()
        scheduler.shutdown()


def test_job_runs_are_recorded_and_a_failing_job_is_recorded_as_failed(db, clock):
    metrics = Metrics()
    recorder = JobRecorder(db, clock, metrics, "host:1")
    recorder.run("cycle", lambda: {"charged": 3})

    def broken() -> dict[str, int]:
        raise RuntimeError("processor on fire")

    with pytest.raises(RuntimeError):
        recorder.run("cycle", broken)
    with db.transaction() as session:
        last = last_job_run(session, "cycle")
        good = last_job_run(session, "cycle", "succeeded")
        assert last is not None
        assert last.status == "failed"
        assert last.error == "processor on fire"
        assert good is not None
        assert good.summary == {"charged": 3}
    assert metrics.job_runs.labels("cycle", "failed")._value.get() == 1


def test_a_cycle_cut_short_by_a_shutdown_is_recorded_as_stopped(db, clock):
    recorder = JobRecorder(db, clock, Metrics(), "host:1")
    recorder.run("cycle", lambda: {"left_for_next": 4}, stopped=lambda s: bool(s["left_for_next"]))
    with db.transaction() as session:
        assert last_job_run(session, "cycle", "succeeded") is None
        assert last_job_run(session, "cycle").status == "stopped"


def test_runs_of_a_dead_process_on_this_host_are_closed_as_interrupted(db, clock):
    import socket

    with db.transaction() as session:
        dead = start_job_run(session, "cycle", f"{socket.gethostname()}:999999", NOW)
        other_host = start_job_run(session, "cycle", "elsewhere:999999", NOW)
        mine = start_job_run(session, "cycle", f"{socket.gethostname()}:{os.getpid()}", NOW)
        finish_job_run(session, mine, "succeeded", NOW, None, None)
    assert close_interrupted_runs(db, clock) == 1
    with db.transaction() as session:
        from recharged.store.models import JobRun

        assert session.get(JobRun, dead).status == "interrupted"
        assert session.get(JobRun, other_host).status == "running"  # maybe alive on its own host


def test_only_one_daemon_holds_a_sqlite_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    with (
        single_instance(url),
        pytest.raises(InstanceError, match=r"another recharged daemon \(pid"),
        single_instance(url),
    ):
        pass
    with single_instance(url):  # released when the first one ended
        pass


def test_postgresql_allows_several_instances():
    url = "postgresql://postgres@127.0.0.1:5432/whatever"
    with single_instance(url), single_instance(url):
        pass


@pytest.fixture
def daemon_with_config(tmp_path, db_url, clock, gateway_factory, monkeypatch):
    monkeypatch.setenv("RECHARGED_API_TOKENS", "reload-token-0123456789")
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "{db_url}"\n[recharge]\nthreshold_days = 7\n')
    daemon = Daemon(path, load_settings(path, environ={}), clock, gateway=lambda s: gateway_factory())
    daemon.prepare()
    yield daemon, path
    daemon.db.close()


def test_a_reload_swaps_the_new_configuration_in_whole(daemon_with_config, db_url):
    daemon, path = daemon_with_config
    before = daemon.runtime()
    path.write_text(f'[database]\nurl = "{db_url}"\n[recharge]\nthreshold_days = 5\n')
    assert daemon.reload()
    after = daemon.runtime()
    assert after is not before
    assert after.settings.recharge.threshold_days == 5
    assert before.settings.recharge.threshold_days == 7  # work that began before the reload keeps its settings


def test_a_reload_of_a_broken_file_keeps_the_running_configuration(daemon_with_config, db_url):
    daemon, path = daemon_with_config
    before = daemon.runtime()
    path.write_text(f'[database]\nurl = "{db_url}"\n[recharge]\nthreshold_days = "soon"\n')
    assert not daemon.reload()
    assert daemon.runtime() is before


def test_a_reload_cannot_move_the_daemon_to_another_database(daemon_with_config, tmp_path):
    daemon, path = daemon_with_config
    before = daemon.runtime()
    path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "other.db"}"\n')
    assert not daemon.reload()
    assert daemon.runtime() is before
