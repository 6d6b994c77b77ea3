"""Why a base scores higher on the pretraining curve's dev slice than on the benchmark (not a timed test).

    OMP_NUM_THREADS=1 python benchmarks/heldout_sets.py runs/cache/bases/teacher-smoke-<hash>

Scores one pretrained base (greedy answers, official rule, with the image, the same generation as the harness) on the
base-family items of:
  - the smoke benchmark (seed 0, 1,800 items), in memory, as the files write them (the repeated-option quirk applied)
    and clean (the same items without it), with the items that carry the quirk apart;
  - the base items of benchmark-like sets of other seeds (`--seeds`);
  - fresh held-out sets of 400 items from one stream, one and two questions per image (the benchmark asks two);
  - the curve's 200-item dev slice (`benchmarks/pretrain_curve.py --fixed-eval`).
Prints one JSON line per set. The 2026-12-03 numbers in reports/pretraining_targets.md were measured this way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spatialstudy.data import make_items  # noqa: E402
from spatialstudy.data.streams import role_seed  # noqa: E402
from spatialstudy.data.writers import _apply_quirks, benchmark_items  # noqa: E402
from spatialstudy.models import pretrain as P  # noqa: E402
from spatialstudy.models.qwen import load_checkpoint  # noqa: E402

N_BENCH, SIZE, PALETTE = 1800, 112, "distinct"   # the smoke tier's 01_data


def correct(model, proc, items) -> np.ndarray:
    texts = P.answers(model, proc, items, "manual_cot", blind=False)
    return np.array([P.letter_index(t, it.options) == it.answer for t, it in zip(texts, items)])


def line(name: str, items, ok: np.ndarray, **extra) -> str:
    fam = np.array([it.family for it in items])
    per = {f: round(float(ok[fam == f].mean()), 3) for f in sorted(set(fam))}
    return json.dumps({"set": name, "n": len(items), "acc": round(float(ok.mean()), 3), **per, **extra})


def benchmark_as_written(seed: int) -> tuple[list, list, np.ndarray]:
    """(clean items, items as the files write them, which carry a repeated option) for the base partition."""
    items = benchmark_items(N_BENCH, seed, SIZE, PALETTE)
    entries = _apply_quirks(items, np.random.default_rng(role_seed(seed, "benchmark_quirks")))
    base = [e for e in entries if e["it"].partition == "base" and not e["drawn"]]
    written = [dataclasses.replace(e["it"], options=e["options"], answer=e["answer"]) for e in base]
    repeated = np.array([len(set(e["options"])) < len(e["options"]) for e in base])
    return [e["it"] for e in base], written, repeated


def main(args) -> None:
    torch.set_num_threads(args.threads)
    model, proc = load_checkpoint(args.base)   # the project's loader: eval mode, the base's own processor
    clean, written, rep = benchmark_as_written(0)
    ok_clean, ok_written = correct(model, proc, clean), correct(model, proc, written)
    print(line("benchmark seed 0, as written", written, ok_written,
               repeated_items=int(rep.sum()), repeated_acc=round(float(ok_written[rep].mean()), 3),
               other_acc=round(float(ok_written[~rep].mean()), 3)), flush=True)
    print(line("benchmark seed 0, clean", clean, ok_clean,
               repeated_items_clean_acc=round(float(ok_clean[rep].mean()), 3)), flush=True)
    for seed in args.seeds:
        items = [it for it in benchmark_items(N_BENCH, seed, SIZE, PALETTE) if it.partition == "base"]
        print(line(f"benchmark-like seed {seed}", items, correct(model, proc, items)), flush=True)
    for per_scene in (1, 2):
        items = make_items(400, seed=role_seed(7, "diag/base"), partition="base", per_scene=per_scene,
                           keep_scene=True)
        objs = np.bincount([len(it.scene.objs) for it in items]).tolist()
        print(line(f"fresh, {per_scene} per image", items, correct(model, proc, items), objects_per_scene=objs),
              flush=True)
    dev = make_items(200, seed=role_seed(0, "pretrain_heldout/base"), partition="base")
    print(line("curve dev slice", dev, correct(model, proc, dev)), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", help="a pretrained base's directory (runs/cache/bases/<name>-smoke-<hash>)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1])
    ap.add_argument("--threads", type=int, default=1)
    main(ap.parse_args())
