"""The SMTP sender's journal: the Message-IDs a server accepted, appended and fsync'ed right after its 250 and
before the database records the message as sent. Recovery reads it to tell an accepted message (mark it sent)
from one that never got its 250 (send it again)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class Journal:
    """The Message-IDs an SMTP server accepted, one a line, each fsync'ed before the database records it.

    A lock file serializes writers and the compaction that drops what the database already shows as sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as lock:
            fcntl.flock(lock.fileno(), mode)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def record(self, message_id: str) -> None:
        with self._locked(fcntl.LOCK_EX):
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, f"{message_id}\n".encode())
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def accepted(self) -> set[str]:
        with self._locked(fcntl.LOCK_SH):
            return self._read()

    def _read(self) -> set[str]:
        try:
            return {line.strip() for line in self.path.read_text("utf-8").splitlines() if line.strip()}
        except FileNotFoundError:
            return set()

    def compact(self, still_needed: Callable[[set[str]], set[str]]) -> None:
        """Rewrite the journal with only the ids `still_needed` keeps (those not yet recorded as sent)."""
        with self._locked(fcntl.LOCK_EX):
            ids = self._read()
            if not ids:
                return
            keep = still_needed(ids)
            if keep == ids:
                return
            temporary = self.path.with_name(self.path.name + ".tmp")
            with temporary.open("w", encoding="utf-8") as handle:
                handle.writelines(f"{message_id}\n" for message_id in sorted(keep))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
