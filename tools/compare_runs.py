"""Did a rerun reproduce? Compare every predictions file of two run dirs, item by item, on the model's raw reply.

    .venv/bin/python tools/compare_runs.py runs/smoke/02_sft /elsewhere/runs/smoke/02_sft

Items are matched by (task_type, id); latencies and config hashes (which hold paths) are not compared. Prints one
line per file and a total; exits 1 when any reply differs or a file is missing on one side, so a script can rely on
it. reports/smoke_rerun.md was checked this way.
"""
from __future__ import annotations

import sys
from pathlib import Path

from spatialstudy.evaluation.predictions import read_predictions


def replies(path: Path) -> dict:
    """{(task_type, id): (raw reply, correct_official)} of one predictions file."""
    return {(r["task_type"], r["id"]): (r.get("raw"), r.get("correct_official")) for r in read_predictions(path)}


def compare_file(a: Path, b: Path) -> tuple[int, int, str]:
    """(identical replies, items compared: those on one side only count as not identical, one line saying so)."""
    ra, rb = replies(a), replies(b)
    both = ra.keys() & rb.keys()
    same = sum(ra[k][0] == rb[k][0] for k in both)
    right = [sum(bool(r[k][1]) for k in both) for r in (ra, rb)]
    only = len(ra) + len(rb) - 2 * len(both)
    line = (f"{a.name:48s} {same:6d} / {len(both):6d} identical   correct {right[0]} vs {right[1]}"
            + (f"   ({only} items on one side only)" if only else ""))
    return same, len(both) + only, line


def compare_dirs(a: Path, b: Path) -> tuple[int, int, list[str]]:
    """(identical, compared, lines) over the predictions files of either dir."""
    names = sorted({p.name for d in (a, b) for p in d.glob("predictions_*.jsonl")})
    same = total = 0
    lines = []
    for name in names:
        if not ((a / name).exists() and (b / name).exists()):
            lines.append(f"{name:48s} missing in {b if (a / name).exists() else a}")
            total += 1
            continue
        s, n, line = compare_file(a / name, b / name)
        same, total, lines = same + s, total + n, lines + [line]
    return same, total, lines


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(Path(p).is_dir() for p in argv):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    same, total, lines = compare_dirs(Path(argv[0]), Path(argv[1]))
    print("\n".join(lines) + f"\ntotal: {same} of {total} identical")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
