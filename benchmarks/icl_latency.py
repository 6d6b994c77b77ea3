"""Retrieval time against end-to-end ICL latency (not a timed test).

    OMP_NUM_THREADS=1 python benchmarks/icl_latency.py --profile smoke

Needs the profile's 03_icl run (its per-item generation latency, measured by the harness: each batch's wall time
divided by its size). Times here, on the same items and index: embedding the query questions with all-MiniLM-L6-v2
and the FAISS search (both per query, batched as the stage does), and what share of an ICL item's latency they are.
Writes reports/benchmarks/icl_latency.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spatialstudy import runs  # noqa: E402
from spatialstudy.configs import ICLConfig  # noqa: E402
from spatialstudy.evaluation.eval import eval_records, eval_subset  # noqa: E402
from spatialstudy.methods import icl  # noqa: E402
from spatialstudy.run import load_params  # noqa: E402

REPEATS = 3


def retrieval_times(index, encoder, questions: list[str], k: int) -> dict:
    """Best of REPEATS: seconds per query to embed, and to search."""
    embed_s, search_s = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        vectors = icl.embed(encoder, questions)
        t1 = time.perf_counter()
        index.search(vectors, k)
        embed_s.append(t1 - t0)
        search_s.append(time.perf_counter() - t1)
    return {"embed_s": min(embed_s) / len(questions), "search_s": min(search_s) / len(questions)}


def markdown(profile: str, result: dict) -> str:
    r = result
    lines = [f"# ICL latency ({profile})", "", f"Reproduce: `python benchmarks/icl_latency.py --profile {profile}`. "
             f"{r['n_queries']} queries, index over {r['n_train']} training questions ({r['index_type']}).", "",
             f"Retrieval per query: embedding {r['embed_ms']:.2f} ms + search {r['search_ms']:.3f} ms.", "",
             "| setting | ms/item (generation) | retrieval share | x zero-shot |", "|---|---|---|---|"]
    for name, s in r["settings"].items():
        lines.append(f"| {name} | {s['ms']:.1f} | {s['retrieval_share']:.1%} | {s['vs_zero_shot']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke", choices=runs.PROFILES)
    args = ap.parse_args()
    params, _ = load_params("03_icl", args.profile)
    cfg = ICLConfig(**params)
    metrics = runs.read_json(runs.require_run(args.profile, icl.STAGE) / "metrics.json")
    records = eval_subset(eval_records(args.profile), cfg.n_eval or None, cfg.seed)
    plan, index, _ = icl.build_plan(args.profile, cfg, records, processor=None)   # no prompts are built here
    t = retrieval_times(index, plan.encoder, [r.question for r in records], max(cfg.ks))
    retrieval_ms = 1000 * (t["embed_s"] + t["search_s"])
    settings = {}
    for name, e in metrics["settings"].items():
        ms = 1000 * e["cost"]["latency_s"]
        share = retrieval_ms / (ms + retrieval_ms) if e["setting"]["demos"] in ("retrieved", "label_shuffled") else 0.0
        ratio = metrics["latency_ratio"][name]["vs_zero_shot"]
        settings[name] = {"ms": ms, "retrieval_share": share, "vs_zero_shot": ratio}
    result = {"n_queries": len(records), "n_train": len(plan.train), "index_type": cfg.index_type,
              "embed_ms": 1000 * t["embed_s"], "search_ms": 1000 * t["search_s"], "settings": settings}
    out = runs.root() / "reports" / "benchmarks"
    runs.write_json(out / "icl_latency.json", {"profile": args.profile, **result})
    runs.atomic_write_text(out / "icl_latency.md", markdown(args.profile, result))
    print(markdown(args.profile, result))


if __name__ == "__main__":
    main()
