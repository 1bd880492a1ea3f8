"""Run every ``scripts/bench_*.py`` and collect their ``RESULT <name> <ratio> <target>`` lines.

    python scripts/run_benches.py [--timeout 600] [--out bench_results.md] [--only NAME ...]

Each benchmark prints its own table and ends with ``RESULT <name> <ratio> <target>`` lines.
This runner gives each script a wall-clock limit, keeps going when one fails or times out, and
writes one Markdown table of the ratios to ``bench_results.md`` (and prints it).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
RESULT = re.compile(r"^RESULT\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


def parse_results(output: str) -> list[tuple[str, float, float]]:
    """``(name, ratio, target)`` for every well-formed RESULT line of ``output``."""
    rows = []
    for line in output.splitlines():
        m = RESULT.match(line.strip())
        if m:
            try:
                rows.append((m.group(1), float(m.group(2)), float(m.group(3))))
            except ValueError:
                continue
    return rows


def run_script(path: Path, timeout: float) -> tuple[str, list[tuple[str, float, float]], float]:
    """Run one benchmark; returns (status, results, seconds)."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=SCRIPTS.parent,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        print(out)
        return f"timeout ({timeout:.0f} s)", parse_results(out), time.monotonic() - start
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return status, parse_results(proc.stdout), time.monotonic() - start


def markdown_table(records: list[tuple[str, str, list[tuple[str, float, float]], float]]) -> str:
    """One row per RESULT line (or one row per script without results)."""
    lines = [
        "| script | result | ratio | target | meets target | status | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for script, status, results, seconds in records:
        if not results:
            lines.append(f"| {script} | - | - | - | - | {status} | {seconds:.1f} |")
        for name, ratio, target in results:
            meets = "yes" if ratio >= target else "no"
            lines.append(
                f"| {script} | {name} | {ratio:.3g} | {target:.3g} | {meets} | {status} | {seconds:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per script")
    parser.add_argument("--out", type=Path, default=SCRIPTS.parent / "bench_results.md")
    parser.add_argument("--only", nargs="*", default=None, help="script stems to run (bench_x)")
    parser.add_argument("--dir", type=Path, default=SCRIPTS, help="folder holding bench_*.py")
    args = parser.parse_args(argv)
    scripts = sorted(args.dir.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem in args.only]
    records = []
    for path in scripts:
        print(f"== {path.name}", flush=True)
        status, results, seconds = run_script(path, args.timeout)
        records.append((path.stem, status, results, seconds))
    table = markdown_table(records) if records else "no scripts/bench_*.py found\n"
    args.out.write_text("# Benchmark results\n\n" + table)
    print(table)
    return 0 if all(r[1] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
