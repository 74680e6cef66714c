"""sd_notify: tell systemd that the daemon is ready, reloading, stopping or still alive.

The short standalone implementation sd_notify(3) documents: one datagram of newline-separated `KEY=VALUE`
fields to the AF_UNIX socket named by `$NOTIFY_SOCKET` (an abstract socket when it starts with `@`). Outside
systemd `$NOTIFY_SOCKET` is unset and every call is a silent no-op.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

_warned: set[str] = set()
_warned_lock = threading.Lock()


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") in one datagram; True when systemd got it.

    Never raises for a missing or unreachable socket: without `$NOTIFY_SOCKET` it does nothing, and a socket
    that cannot be reached is logged once per address.
    """
    for field in fields:
        if "\n" in field or "=" not in field:
            raise ValueError(f"not a KEY=VALUE notification field on one line: {field!r}")
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        _warn_once(address, "unsupported NOTIFY_SOCKET address (only AF_UNIX paths and @abstract names)")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        _warn_once(address, f"cannot notify systemd: {exc.strerror or exc}")
        return False
    return True


def ready(status: str | None = None) -> bool:
    """READY=1: start-up (or a reload) is complete."""
    return notify("READY=1", *_status_field(status))


def status(text: str) -> bool:
    """STATUS=: one line shown by `systemctl status`."""
    return notify(*_status_field(text))


def reloading(status: str | None = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC (systemd 253+ wants both); send ready() when the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status_field(status))


def stopping(status: str | None = None) -> bool:
    """STOPPING=1: shutdown has begun."""
    return notify("STOPPING=1", *_status_field(status))


def watchdog_ping() -> bool:
    """WATCHDOG=1: the service is alive."""
    return notify("WATCHDOG=1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds from `$WATCHDOG_USEC`, or None when the watchdog is off or not ours.

    `$WATCHDOG_PID`, when set, must be this process. Ping at half the interval (`Watchdog` does).
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


class Watchdog:
    """A thread that sends WATCHDOG=1 every `interval / 2` seconds, but only while `healthy()` is True.

    When `healthy()` says False (a hung scheduler) or raises, the pings stop, and systemd restarts the
    service once `WatchdogSec=` passes without one.
    """

    def __init__(self, interval: float, healthy: Callable[[], bool]) -> None:
        if interval <= 0:
            raise ValueError("the watchdog interval must be positive")
        self.period = interval / 2
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)

    @classmethod
    def from_environment(cls, healthy: Callable[[], bool]) -> Watchdog | None:
        """A watchdog for `$WATCHDOG_USEC`, or None when systemd expects no pings from this process."""
        interval = watchdog_interval()
        return None if interval is None else cls(interval, healthy)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging and wait for the thread to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        log = structlog.get_logger("recharged.sdnotify")
        was_healthy = True
        while not self._stop.is_set():
            try:
                healthy = bool(self._healthy())
            except Exception:
                log.exception("watchdog health check failed")
                healthy = False
            if healthy:
                watchdog_ping()
            elif was_healthy:
                log.warning("unhealthy: watchdog pings stopped; systemd restarts the service if this persists")
            if healthy and not was_healthy:
                log.info("healthy again: watchdog pings resumed")
            was_healthy = healthy
            self._stop.wait(self.period)


def _status_field(text: str | None) -> tuple[str, ...]:
    return () if text is None else ("STATUS=" + " ".join(text.split()),)


def _warn_once(address: str, message: str) -> None:
    with _warned_lock:
        if address in _warned:
            return
        _warned.add(address)
    structlog.get_logger("recharged.sdnotify").warning(message, notify_socket=address)


__all__ = ["Watchdog", "notify", "ready", "reloading", "status", "stopping", "watchdog_interval", "watchdog_ping"]
