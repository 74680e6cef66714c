"""How fast the `recharged` command answers: `--help` and `accounts show ID` beside `python -c pass`.

    .venv/bin/python bench/cli_startup.py [--runs N] [--imports N]

Creates a small SQLite database in a new directory under /tmp (removed at the end) with the real command:
`db upgrade`, one account on the standard plan with auto-recharge on and 30 days of calls (`usage import`).
Then runs, as an admin would, `python -c pass` (the interpreter's own start-up), `recharged --help` and
`recharged accounts show acme` (the `.venv/bin/recharged` script, in that directory, no config.toml), in
turns so that other work on the machine slows all three alike: one warm-up round, then `--runs` rounds
(default 9). Printed per command: the median and the best wall time, the median CPU time (user + system of
the child), and the median's ratio to `python -c pass`'s median. Goals (issue 14): `--help` under 0.3 s and
`accounts show` under 0.5 s, wall medians of this run; the script exits 1 when either is missed.
`--imports N` adds, per command, the N slowest imports of one more run (`python -X importtime`, cumulative).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import median

import _common as c

BIN = Path(sys.executable).parent
GOALS = {"recharged --help": 0.3, "recharged accounts show acme": 0.5}  # seconds, wall median


def run_timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of argv; the run must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr or done.stdout}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def set_up(directory: Path, env: dict[str, str]) -> None:
    """The database, one account and 30 days of its calls, through the command itself."""
    recharged = str(BIN / "recharged")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    usage = directory / "usage.csv"
    with usage.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["event_id", "account_id", "kind", "started_at", "duration_seconds", "quantity", "text", "cost"]
        )
        for day in range(1, 31):
            for n in range(5):
                started = today - timedelta(days=day) + timedelta(hours=9 + n)
                writer.writerow(
                    [f"CA{day:02d}{n}", "acme", "dialer", started.strftime("%Y-%m-%dT%H:%M:%SZ"), 240, "", "", ""]
                )
    for args in (
        ["db", "upgrade"],
        ["accounts", "create", "acme", "--email", "billing@acme.example", "--plan", "standard", "--vat-percent",
         "20", "--opening-balance", "500", "--created-at", (today - timedelta(days=60)).strftime("%Y-%m-%dT%H:%M:%SZ")],
        ["auto-recharge", "acme", "--enable"],
        ["usage", "import", str(usage)],
    ):  # fmt: skip
        run_timed([recharged, *args], env, directory)


def slowest_imports(argv: list[str], env: dict[str, str], cwd: Path, count: int) -> list[tuple[str, str]]:
    """The `count` imports with the largest cumulative time in one run under `-X importtime`."""
    rest = argv[1:] if argv[0] == sys.executable else ["-m", "recharged", *argv[1:]]  # the script: its module
    done = subprocess.run([sys.executable, "-X", "importtime", *rest], env=env, cwd=cwd, capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return [(name, f"{micros / 1e6:.3f}") for micros, name in sorted(rows, reverse=True)[:count]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="measured rounds after one warm-up (default 9)")
    parser.add_argument("--imports", type=int, default=0, metavar="N", help="print the N slowest imports of each")
    args = parser.parse_args(argv)

    code = c.code_fingerprint()
    directory = Path(tempfile.mkdtemp(prefix="recharged-bench-cli-", dir="/tmp"))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECHARGED_")}
        env |= {"RECHARGED_DATABASE__URL": f"sqlite:///{directory}/recharged.db", "RECHARGED_ACTOR": "Bench Runner"}
        set_up(directory, env)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "recharged --help": [str(BIN / "recharged"), "--help"],
            "recharged accounts show acme": [str(BIN / "recharged"), "accounts", "show", "acme"],
        }
        load_before = os.getloadavg()[0]
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for round_ in range(args.runs + 1):
            for name, command in commands.items():
                measured = run_timed(command, env, directory)
                if round_:  # round 0 warms the caches (.pyc files, the page cache)
                    times[name].append(measured)
        load_after = os.getloadavg()[0]
        imports = {name: slowest_imports(command, env, directory, args.imports) for name, command in commands.items()}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    check = c.code_fingerprint()

    print(c.describe_code(code))
    if check["digest"] != code["digest"]:
        print(f"WARNING: the code changed during this run ({code['digest']} -> {check['digest']})")
    base = median(wall for wall, _ in times["python -c pass"])
    rows, missed = [], []
    for name, measured in times.items():
        wall = median(w for w, _ in measured)
        goal = GOALS.get(name)
        verdict = "" if goal is None else f"< {goal:.1f} s: " + ("ok" if wall < goal else "MISSED")
        if goal is not None and wall >= goal:
            missed.append(name)
        rows.append(
            (
                name,
                c.fmt_s(wall),
                c.fmt_s(min(w for w, _ in measured)),
                c.fmt_s(median(cpu for _, cpu in measured)),
                f"{wall / base:.1f}x",
                verdict,
            )
        )
    c.print_table(
        f"cli start-up: {args.runs} runs each, seconds (load average {load_before:.2f} before, {load_after:.2f} after)",
        ["command", "median", "best", "CPU median", "vs python -c pass", "goal"],
        rows,
    )
    for name, slowest in imports.items():
        if slowest:
            c.print_table(f"slowest imports of {name} (cumulative s, one run)", ["module", "s"], slowest)
    if missed:
        print(f"\ngoal missed: {', '.join(missed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
