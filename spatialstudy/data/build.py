"""build_datasets: the one call of notebook 01_data. Writes the procedural sets (or takes local real copies), reads
them back through the loaders and returns counts and distributions (JSON-able)."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from spatialstudy.data.generator import names_colour, throughput
from spatialstudy.data.loaders import load_omnispatial, load_spacethinker
from spatialstudy.data.mcq import answer_shape, to_mcq_batch
from spatialstudy.data.writers import write_omnispatial, write_spacethinker

SPACETHINKER_DIR, OMNI_DIR = "spacethinker", "OmniSpatial-test"


def _paths(source) -> tuple[str | None, str | None]:
    if source == "procedural" or not source:
        return None, None
    if isinstance(source, dict):
        return source.get("spacethinker") or None, source.get("omnispatial") or None
    raise ValueError(f"source must be 'procedural' or a dict of local paths, got {source!r}")


def _colour_free(texts) -> float:
    texts = list(texts)
    return sum(not names_colour(t) for t in texts) / max(1, len(texts))


def spacethinker_summary(path, on_error: str) -> dict:
    train = load_spacethinker(path, "train", on_error=on_error)
    test = load_spacethinker(path, "test", on_error=on_error)
    _, mcq = to_mcq_batch(train, seed=0)
    return {"path": str(path), "train": len(train), "test": len(test),
            "report": {"train": train.report.as_dict(), "test": test.report.as_dict()},
            "family": dict(Counter(r.family or "real" for r in train)),
            "answer_shape": dict(Counter("exact" if r.choices else answer_shape(r.question, r.answer) for r in train)),
            "mcq": {k: v for k, v in mcq.items() if k != "examples"},
            "colour_free_share": _colour_free(r.question for r in train)}


def omnispatial_summary(path, on_error: str) -> dict:
    recs = load_omnispatial(path, on_error=on_error)
    return {"path": str(path), "n": len(recs), "images": len({r.image_path for r in recs}),
            "report": recs.report.as_dict(),
            "task_type": dict(Counter(r.task_type for r in recs)),
            "sub_task_type": dict(Counter(f"{r.task_type}/{r.sub_task_type}" for r in recs)),
            "partition": dict(Counter(r.partition or "real" for r in recs)),
            "family": dict(Counter(r.family or "real" for r in recs)),
            "letter": dict(sorted(Counter(r.letter for r in recs).items())),
            "n_options": {str(k): v for k, v in sorted(Counter(len(r.options) for r in recs).items())},
            "repeated_option": sum(len(set(r.options)) < len(r.options) for r in recs),
            "ids_in_several_task_types": sum(v > 1 for v in Counter(r.id for r in recs).values()),
            "colour_free_share": _colour_free(r.question + " " + " ".join(r.options) for r in recs)}


def build_datasets(out_dir, source="procedural", n_train: int = 200, n_test: int = 40, n_omni: int = 40,
                   seed: int = 0, image_size: int = 112, palette: str = "distinct", on_error: str = "raise",
                   measure_throughput: bool = True) -> dict:
    """Write (procedural) or locate (local paths) both sets, load them back, and summarise them."""
    st_path, omni_path = _paths(source)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if st_path is None:
        st_path = write_spacethinker(out_dir / SPACETHINKER_DIR, n_train, n_test, seed, image_size, palette)
    if omni_path is None:
        omni_path = write_omnispatial(out_dir / OMNI_DIR, n_omni, seed, image_size, palette)
    summary = {"source": "procedural" if source == "procedural" else "local", "seed": seed,
               "image_size": image_size, "palette": palette, "write_s": round(time.perf_counter() - t0, 2),
               "spacethinker": spacethinker_summary(st_path, on_error),
               "omnispatial": omnispatial_summary(omni_path, on_error)}
    if measure_throughput:
        summary["items_per_minute"] = {f"per_scene={k}": round(throughput(200, seed, per_scene=k,
                                                                          image_size=image_size))
                                       for k in (1, 3)}
    return summary
