"""Reading the CSV files that services import (accounts, usage): UTF-8 with an optional BOM, a checked header,
rows numbered by their line in the file, ragged rows reported rather than guessed at, and rows in batches."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from recharged.errors import InputError
from recharged.words import plural

Row = tuple[int, dict[str, str]]  # (line number, row)

EXTRA = "\x00extra"


class _CountingLines:
    """A text file's lines, counting the bytes they took: `tell()` is disabled while the csv module iterates the
    file, so progress is counted here instead (ASCII lines take one byte a character; others are encoded)."""

    def __init__(self, handle: IO[str]) -> None:
        self._lines = iter(handle)
        self.bytes_read = 0

    def __iter__(self) -> _CountingLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.bytes_read += len(line) if line.isascii() else len(line.encode("utf-8"))
        return line


@contextmanager
def open_csv(path: Path) -> Iterator[tuple[csv.DictReader[str], Iterator[Row], Callable[[], int]]]:
    """Open a UTF-8 CSV (BOM allowed): its reader, its (line number, row) pairs, and a function telling how many
    bytes of the file the rows read so far took (for progress). See `shape_problem` for ragged rows."""
    with path.open("r", newline="", encoding="utf-8-sig") as handle:
        lines = _CountingLines(handle)
        reader = csv.DictReader(lines, restkey=EXTRA)

        def rows() -> Iterator[Row]:
            try:
                for row in reader:
                    yield reader.line_num, row
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}: not UTF-8 text after line {reader.line_num} (byte {exc.start}); "
                    "rows before it were processed, re-running after fixing the file is safe"
                ) from None
            except csv.Error as exc:
                raise InputError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None

        yield reader, rows(), lambda: lines.bytes_read


def shape_problem(row: dict[str, Any]) -> str | None:
    """Why a CSV row does not fit its header, if it does not."""
    if EXTRA in row:
        return f"row has {plural(len(row[EXTRA]), 'more field')} than the header (quote fields that contain commas)"
    if None in row.values():
        return "row has fewer fields than the header"
    return None


def check_header(path: Path, header: Any, *, required: tuple[str, ...], known: tuple[str, ...]) -> None:
    """Refuse a header that lacks a required column or has one that is not known."""
    columns = [c.strip() for c in header or []]
    missing = [c for c in required if c not in columns]
    unknown = [c for c in columns if c not in known]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing columns {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown columns {', '.join(unknown)}")
        raise InputError(f"{path}:1: bad header ({'; '.join(parts)}); expected {','.join(known)}")


def batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    """The rows in lists of `size` (the last one shorter)."""
    batch: list[Row] = []
    for item in rows:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
