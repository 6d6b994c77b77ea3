"""Reading evaluation summaries the way every method reports them: accuracy per partition, CI bars, paired
differences on the same items. Methods share these here (they never import each other)."""
from __future__ import annotations

from spatialstudy.evaluation.predictions import headline_predictions

PARTITIONS = ("overall", "base", "sft", "test_only")
PARTITION_LABELS = {"overall": "overall", "base": "retention (base)", "sft": "seen (sft)",
                    "test_only": "unseen (test_only)"}


def accuracy_by_partition(summary: dict, scorer: str = "official") -> dict:
    """{"overall": accuracy, partition: accuracy, ...} of an evaluation summary (percent)."""
    s = summary["scorers"][scorer]
    return {"overall": s["accuracy"], **{p: b["accuracy"] for p, b in s["by_partition"].items()}}


def ci_groups(summary: dict, scorer: str = "official") -> dict:
    """{partition label: (accuracy, lo, hi)}: overall, then each partition (what plotting.accuracy_bars takes)."""
    s = summary["scorers"][scorer]
    out = {"overall": (s["accuracy"], *s["ci95"])}
    return {**out, **{PARTITION_LABELS.get(p, p): (b["accuracy"], *b["ci95"]) for p, b in s["by_partition"].items()}}


def paired_by_partition(a: dict, b: dict, records) -> dict:
    """a minus b on the same headline items, overall and per partition: scoring.paired_difference (difference,
    bootstrap CI over images, exact McNemar p) for each partition a has items in."""
    from spatialstudy.scoring import paired_difference

    out = {}
    for part in PARTITIONS:
        p = None if part == "overall" else part
        rows_a = headline_predictions(a, records, p)
        if rows_a:
            out[part] = paired_difference(rows_a, headline_predictions(b, records, p))
    return out


def paired_cell(d: dict | None) -> str:
    """One paired difference as table text: "+1.2 [-0.3, +2.8] p 0.041"."""
    return f"{d['diff']:+5.1f} [{d['ci95'][0]:+5.1f},{d['ci95'][1]:+5.1f}] p {d['p_mcnemar']:.3f}" if d else ""
