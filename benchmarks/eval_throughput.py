"""Batched vs one-by-one evaluation throughput of the harness on the tiny models (CPU; not a timed test).

    python benchmarks/eval_throughput.py                    # pretrained tiny bases (built and cached on first use)
    python benchmarks/eval_throughput.py --random --n 48    # random-weight tiny models: no pretraining needed

Writes reports/benchmarks/eval_throughput.{json,md}. Both modes run the same items through the same
`spatialstudy.evaluation.eval.evaluate`, into fresh prediction files, and must produce identical answers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from spatialstudy import runs
from spatialstudy.data import load_omnispatial, write_omnispatial
from spatialstudy.evaluation.eval import EvalSettings, evaluate
from spatialstudy.evaluation.predictions import read_predictions
from spatialstudy.models.bases import load_model

DATA_SEED = 123
DEFAULT_THREADS = 1  # OpenMP threads spin-wait on a shared busy core: 1 thread gives stable numbers on a shared box


def measure(model, processor, records, batch_size: int, max_new_tokens: int, out_dir: Path) -> dict:
    """One evaluation from scratch; wall time, items/s, tokens/s and the raw outputs by key."""
    t0 = time.perf_counter()
    settings = EvalSettings(name=f"bs{batch_size}", max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=False)
    m = evaluate(model, processor, records, out_dir, settings)
    wall = time.perf_counter() - t0
    raw = {(r["task_type"], r["id"]): r["raw"] for r in read_predictions(Path(m["predictions"]))}
    return {"batch_size": batch_size, "wall_s": wall, "items_per_s": len(records) / wall,
            "gen_tokens_per_s": m["cost"]["tokens_per_s"], "new_tokens_total": m["new_tokens"]["total"],
            "accuracy_official": m["accuracy_official"], "raw": raw}


def bench_model(spec: str, records, args, tmp: Path) -> dict:
    model, processor = load_model(spec, tier=args.tier)
    measure(model, processor, records[:4], 2, args.max_new_tokens, tmp / spec / "warmup")  # first-call overheads
    single = measure(model, processor, records, 1, args.max_new_tokens, tmp / spec / "one")
    batched = measure(model, processor, records, args.batch_size, args.max_new_tokens, tmp / spec / "batched")
    same = sum(single["raw"][k] == batched["raw"][k] for k in single["raw"])
    out = {"spec": spec, "params": sum(p.numel() for p in model.parameters()), "identical_outputs": same,
           "one_by_one": single, "batched": batched, "speedup": batched["items_per_s"] / single["items_per_s"]}
    for mode in ("one_by_one", "batched"):
        out[mode].pop("raw")
    return out


def markdown(report: dict) -> str:
    lines = ["# Evaluation throughput: batched vs one-by-one", "",
             f"{report['n_items']} OmniSpatial-format items, max_new_tokens={report['max_new_tokens']}, "
             f"{report['weights']} weights, {report['threads']} CPU thread(s), torch {report['torch']}, "
             f"{report['machine']}; 1-min load average before/after: "
             f"{report['load_avg_1min'][0]:.1f}/{report['load_avg_1min'][1]:.1f} (other work shares the cores).", "",
             "| model | params | mode | batch | wall s | items/s | gen tokens/s | identical answers | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        for mode in ("one_by_one", "batched"):
            m = r[mode]
            lines.append(f"| {r['spec']} | {r['params']:,} | {mode} | {m['batch_size']} | {m['wall_s']:.2f} | "
                         f"{m['items_per_s']:.2f} | {m['gen_tokens_per_s']:.0f} | "
                         f"{r['identical_outputs']}/{report['n_items']} | "
                         f"{'%.1fx' % r['speedup'] if mode == 'batched' else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="items to evaluate")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--tier", default="smoke", help="pretraining tier of the tiny bases")
    ap.add_argument("--random", action="store_true", help="random-weight tiny models (no pretraining)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    specs = ["tiny-student-random", "tiny-teacher-random"] if args.random else ["tiny-student", "tiny-teacher"]
    with tempfile.TemporaryDirectory() as tmp:
        write_omnispatial(Path(tmp) / "omni", args.n, seed=DATA_SEED)
        records = load_omnispatial(Path(tmp) / "omni")[: args.n]
        models = [bench_model(spec, records, args, Path(tmp)) for spec in specs]
    report = {"n_items": len(records), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
              "load_avg_1min": [load_before, os.getloadavg()[0]], "weights": "random" if args.random else "pretrained",
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "models": models}
    out = runs.root() / "reports" / "benchmarks"
    runs.write_json(out / "eval_throughput.json", report)
    runs.atomic_write_text(out / "eval_throughput.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
