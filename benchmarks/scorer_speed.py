"""Answer-scorer speed on pathological replies: the current scorers at 100,000 characters, and the lenient scorer
of an older revision (nested whitespace quantifiers, cubic time) on short inputs for comparison (not a timed test).

    python benchmarks/scorer_speed.py                      # old revision: 3a30a3b (before the linear-time regexes)
    python benchmarks/scorer_speed.py --before REV --old-sizes 500 1000

Writes reports/benchmarks/scorer_speed.md. The old scorer runs in a subprocess under a time cap, because at
100,000 characters it would run for days.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from spatialstudy import runs
from spatialstudy.scoring import extract_answer

N = 100_000
BEFORE = "3a30a3b"   # the last revision with the backtracking lenient regex
OLD_CAP_S = 120      # time cap per old-scorer measurement

INPUTS = {
    '"answer" + spaces': lambda n: "answer" + " " * n,
    '"answer" + spaces + "x"': lambda n: "answer" + " " * n + "x",
    '"answer" + stars + "x"': lambda n: "answer" + "*" * n + "x",
    '"answer" + underscores': lambda n: "answer" + "_" * n,
    '"answer" + "("s': lambda n: "answer" + "(" * n,
    '"answer " repeated': lambda n: "answer " * (n // 7),
    "random printable": lambda n: "".join(chr(32 + (i * 7919) % 95) for i in range(n)),
}
SCORERS = {"official": {"scorer": "official"}, "official direct": {"scorer": "official", "prompt_style": "direct"},
           "lenient": {"scorer": "lenient"}}
OLD_SNIPPET = """
import sys, time, types
mod = types.ModuleType("old_scoring"); exec(sys.stdin.read(), mod.__dict__)
text = "answer" + " " * int(sys.argv[1])
t0 = time.perf_counter(); mod.extract_answer(text, "lenient"); print(time.perf_counter() - t0)
"""


def time_current(n: int) -> dict:
    """{input: {scorer: seconds}} for the current scorers."""
    out = {}
    for name, make in INPUTS.items():
        text = make(n)
        out[name] = {}
        for label, kw in SCORERS.items():
            t0 = time.perf_counter()
            extract_answer(text, kw["scorer"], prompt_style=kw.get("prompt_style", "manual_cot"))
            out[name][label] = time.perf_counter() - t0
    return out


def time_old(rev: str, n: int) -> float | None:
    """Seconds the lenient scorer of `rev` takes on "answer" + n spaces; None past OLD_CAP_S."""
    src = subprocess.run(["git", "show", f"{rev}:spatialstudy/scoring.py"], cwd=runs.root(), check=True,
                         capture_output=True, text=True).stdout
    try:
        res = subprocess.run([sys.executable, "-c", OLD_SNIPPET, str(n)], input=src, capture_output=True, text=True,
                             timeout=OLD_CAP_S, check=True)
    except subprocess.TimeoutExpired:
        return None
    return float(res.stdout.strip())


def markdown(current: dict, old: dict, rev: str) -> str:
    worst_name, worst = max(((k, max(v.values())) for k, v in current.items()), key=lambda kv: kv[1])
    old_rows = [f"| {n:,} | " + (f"{s:.2f}" if s is not None else f"> {OLD_CAP_S}") + " |" for n, s in old.items()]
    lines = ["# Answer-scorer speed on pathological replies", "",
             f"Python {sys.version.split()[0]}; 1-min load average {os.getloadavg()[0]:.1f} (other work shares the "
             "cores). Made by `benchmarks/scorer_speed.py`.", "",
             f"**Worst case now: {worst * 1000:.1f} ms** ({worst_name}, {N:,} characters). **Before** "
             f"(revision {rev}): the lenient scorer took {_worst_old(old)} on \"answer\" + spaces, growing as n^3.",
             "", f"Now, {N:,} characters, seconds per call:", "",
             "| input | " + " | ".join(SCORERS) + " |", "|---|" + "---|" * len(SCORERS)]
    lines += [f"| {k} | " + " | ".join(f"{v[s]:.4f}" for s in SCORERS) + " |" for k, v in current.items()]
    lines += ["", f"Before (revision {rev}), lenient scorer on \"answer\" + n spaces:", "", "| n | seconds |",
              "|---|---|", *old_rows, ""]
    return "\n".join(lines)


def _worst_old(old: dict) -> str:
    n, s = max(old.items())
    return f"{s:.1f} s at n = {n:,}" if s is not None else f"more than {OLD_CAP_S} s at n = {n:,}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=BEFORE, help="git revision of the old scorer")
    ap.add_argument("--old-sizes", type=int, nargs="+", default=[500, 1000, 2000])
    args = ap.parse_args(argv)
    current = time_current(N)
    old = {n: time_old(args.before, n) for n in args.old_sizes}
    text = markdown(current, old, args.before)
    runs.atomic_write_text(runs.root() / "reports" / "benchmarks" / "scorer_speed.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
