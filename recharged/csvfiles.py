"""Reading the CSV files that services import (accounts, usage): UTF-8 with an optional BOM, a checked header,
rows numbered by their line in the file, ragged rows reported rather than guessed at, and rows in batches."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from recharged.errors import InputError

Row = tuple[int, dict[str, str]]  # (line number, row)

EXTRA = "\x00extra"


@contextmanager
def open_csv(path: Path) -> Iterator[tuple[csv.DictReader[str], Iterator[Row], IO[str]]]:
    """Open a UTF-8 CSV (BOM allowed): its reader, its (line number, row) pairs, and the file (for progress).
    See `shape_problem` for ragged rows."""
    with path.open("r", newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, restkey=EXTRA)

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

        yield reader, rows(), handle


def shape_problem(row: dict[str, Any]) -> str | None:
    """Why a CSV row does not fit its header, if it does not."""
    if EXTRA in row:
        return f"row has {len(row[EXTRA])} more fields than the header (quote fields that contain commas)"
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
