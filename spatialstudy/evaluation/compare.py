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


BASELINE_STAGE = "baseline"
REAL_NAMES = {"student": "real_3b", "teacher": "real_7b"}   # the baseline stage's names for real checkpoints


def blind_summary(summary: dict) -> dict:
    """The blind control (blank images) of an evaluation with controls."""
    return summary["controls"]["blind"]


def baseline_summary(profile: str, model: str, spec: str = "tiny-student") -> dict:
    """A base's evaluation as the baseline stage recorded it (same items, full precision): read, not recomputed.
    `model` is "student" or "teacher"; a spec that is not a tiny one is the baseline's real_3b / real_7b."""
    from spatialstudy import runs

    metrics = runs.read_json(runs.require_run(profile, BASELINE_STAGE) / "metrics.json")
    name = model if spec.startswith("tiny-") else REAL_NAMES[model]
    if name not in metrics["models"]:
        raise KeyError(f"runs/{profile}/{BASELINE_STAGE} has no {name!r} base (spec {spec!r}); give it to "
                       f"{BASELINE_STAGE} (real_student / real_teacher) and re-run that stage")
    return metrics["models"][name]


def accuracy_table(models: dict) -> list[str]:
    """One line per model and partition: official and lenient accuracy, each scorer's unparsed %, its blind
    control and image minus blind. `models` = {label: evaluation summary with controls}."""
    lines = [f"{'model':<22} {'partition':<19} {'n':>4} {'official':>8} {'unparsed':>8} {'lenient':>8} "
             f"{'unparsed':>8} {'blind':>6} {'img-blind':>9}"]
    for label, summary in models.items():
        o = summary["scorers"]["official"]
        blind = accuracy_by_partition(blind_summary(summary))
        lenient = accuracy_by_partition(summary, "lenient")
        fails = {s: unparsed_by_partition(summary, s) for s in ("official", "lenient")}
        for part, acc in accuracy_by_partition(summary).items():
            block = o if part == "overall" else o["by_partition"][part]
            fail = {s: _pct(f.get(part), 8) for s, f in fails.items()}
            lines.append(f"{label:<22} {PARTITION_LABELS.get(part, part):<19} {block['n']:>4} {acc:>8.1f} "
                         f"{fail['official']} {lenient[part]:>8.1f} {fail['lenient']} {blind[part]:>6.1f} "
                         f"{acc - blind[part]:>+9.1f}")
    return lines


def unparsed_by_partition(summary: dict, scorer: str = "official") -> dict:
    """{"overall": unparsed %, partition: unparsed %, ...}; summaries written before the per-partition rates
    existed give the overall one only."""
    s = summary["scorers"][scorer]
    return {"overall": s["parse_failure_rate"], **s.get("parse_failure_by_partition", {})}


def _pct(x: float | None, width: int) -> str:
    return f"{x:>{width}.1f}" if x is not None else " " * width


def paired_table(paired: dict) -> list[str]:
    """One line per comparison, one column per partition: difference [95% CI] McNemar p, in points."""
    head = "".join(f"{PARTITION_LABELS[p]:<30}" for p in PARTITIONS)
    lines = [f"{'paired difference (same items)':<40} {head}"]
    for name, parts in paired.items():
        lines.append((f"{name:<40} " + "".join(f"{paired_cell(parts.get(p)):<30}" for p in PARTITIONS)).rstrip())
    return lines
