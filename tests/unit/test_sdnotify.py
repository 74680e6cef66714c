"""sd_notify over a real AF_UNIX datagram socket, as systemd would listen on it."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from recharged.daemon import sdnotify
from recharged.daemon.sdnotify import Watchdog, notify, watchdog_interval

RECEIVE_TIMEOUT = 5.0


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a path, named by NOTIFY_SOCKET, as systemd sets it up."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECEIVE_TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on the socket, without waiting."""
    found = []
    sock.setblocking(False)
    try:
        while True:
            found.append(sock.recv(4096))
    except BlockingIOError:
        return found
    finally:
        sock.settimeout(RECEIVE_TIMEOUT)


def test_ready_with_status_is_one_datagram(listener: socket.socket) -> None:
    assert sdnotify.ready("cycle 3 done: 12 charged") is True
    assert received(listener) == b"READY=1\nSTATUS=cycle 3 done: 12 charged"


def test_notify_sends_the_fields_given(listener: socket.socket) -> None:
    assert notify("STATUS=idle", "EXTEND_TIMEOUT_USEC=5000000") is True
    assert received(listener) == b"STATUS=idle\nEXTEND_TIMEOUT_USEC=5000000"


def test_status_is_folded_onto_one_line(listener: socket.socket) -> None:
    sdnotify.status("charged 3\naccounts,  1 declined")
    assert received(listener) == b"STATUS=charged 3 accounts, 1 declined"


def test_stopping_and_watchdog_ping(listener: socket.socket) -> None:
    sdnotify.stopping("finishing 2 charges")
    sdnotify.watchdog_ping()
    assert received(listener) == b"STOPPING=1\nSTATUS=finishing 2 charges"
    assert received(listener) == b"WATCHDOG=1"


def test_reloading_carries_the_monotonic_clock(listener: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(listener).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"recharged-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECEIVE_TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert received(sock) == b"READY=1"


def test_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert sdnotify.stopping() is False


def test_unreachable_socket_is_logged_once_and_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "gone")
    monkeypatch.setenv("NOTIFY_SOCKET", missing)
    with structlog.testing.capture_logs() as logs:
        assert notify("READY=1") is False
        assert notify("WATCHDOG=1") is False
    assert [(entry["log_level"], entry["notify_socket"]) for entry in logs] == [("warning", missing)]


def test_a_field_must_be_one_key_value_line() -> None:
    with pytest.raises(ValueError, match="not a KEY=VALUE notification field on one line"):
        notify("READY=1\nSTATUS=x")
    with pytest.raises(ValueError, match="not a KEY=VALUE notification field on one line"):
        notify("READY")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "sixty"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected


def test_watchdog_from_environment_pings_at_half_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    watchdog = Watchdog.from_environment(lambda: True)
    assert watchdog is not None
    assert watchdog.period == 30.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert Watchdog.from_environment(lambda: True) is None


class ScriptedHealth:
    """Answers health checks from a script and tells the test each time it was asked."""

    def __init__(self, answers: list[bool | Exception]) -> None:
        self.answers = answers
        self.asked: queue.Queue[int] = queue.Queue()
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self) -> bool:
        with self.lock:
            answer = self.answers[min(self.count, len(self.answers) - 1)]
            self.count += 1
            self.asked.put(self.count)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def wait_until_asked(self, times: int) -> None:
        while True:
            if self.asked.get(timeout=RECEIVE_TIMEOUT) >= times:
                return


def test_watchdog_pings_only_while_healthy(listener: socket.socket) -> None:
    health = ScriptedHealth([True, True, False, RuntimeError("scheduler wedged"), False])
    watchdog = Watchdog(0.02, health)
    with structlog.testing.capture_logs():
        watchdog.start()
        assert received(listener) == b"WATCHDOG=1"
        assert received(listener) == b"WATCHDOG=1"
        health.wait_until_asked(5)  # three unhealthy answers in a row, each followed by the next wait
        watchdog.stop()
    assert pending(listener) == []
    assert health.count >= 5


def test_watchdog_resumes_when_healthy_again(listener: socket.socket) -> None:
    health = ScriptedHealth([False, False, True])
    watchdog = Watchdog(0.02, health)
    with structlog.testing.capture_logs() as logs:
        watchdog.start()
        assert received(listener) == b"WATCHDOG=1"
        watchdog.stop()
    assert health.count >= 3
    events = [entry["event"] for entry in logs]
    assert events[0].startswith("unhealthy: watchdog pings stopped")
    assert events[1].startswith("healthy again")


def test_stopped_watchdog_sends_nothing_more(listener: socket.socket) -> None:
    health = ScriptedHealth([True])
    watchdog = Watchdog(3600, health)  # one ping at start, the next one would be half an hour later
    watchdog.start()
    assert received(listener) == b"WATCHDOG=1"
    watchdog.stop()
    assert pending(listener) == []
    assert health.count == 1
