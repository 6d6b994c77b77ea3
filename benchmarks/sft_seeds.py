"""Training-seed variance of SFT: the student `mcq` arm trained with several seeds, its spread beside the item-bootstrap
CI of one run (not a timed test).

    OMP_NUM_THREADS=1 python benchmarks/sft_seeds.py --profile smoke --seeds 0 1 2

Needs the profile's 01_data and baseline runs. Uses params/<profile>/02_sft.yaml with only `seed` and `arms` changed
(the seed moves the LoRA initialisation, the data order and the MCQ letters); each seed trains into
runs/<profile>/sft_seeds/seed<N>/ (cached like the stage's arms) and is evaluated on the baseline's fixed subset with
its blind control. Writes reports/benchmarks/sft_seeds.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spatialstudy import runs  # noqa: E402
from spatialstudy.configs import SFTConfig  # noqa: E402
from spatialstudy.evaluation.compare import accuracy_by_partition  # noqa: E402
from spatialstudy.evaluation.eval import eval_records, eval_subset  # noqa: E402
from spatialstudy.methods import sft  # noqa: E402
from spatialstudy.run import load_params  # noqa: E402

ARM = "student/mcq"


def one_seed(cfg: SFTConfig, seed: int, records: list, rows: tuple) -> dict:
    """Train (or load) the arm at `seed` and evaluate it with its blind control."""
    cfg = replace(cfg, seed=seed, arms=[ARM])
    out = runs.run_dir(cfg.profile, "sft_seeds") / f"seed{seed}"
    arm = sft.parse_arm(ARM)
    model, processor, log, _ = sft.trained_arm(arm, cfg, cfg.profile, out, rows)
    summary = sft.benchmark(model, processor, records, out, sft.eval_settings(cfg, arm.name, arm.target))
    return {"seed": seed, "train_s": log.get("train_s"), "official": summary["scorers"]["official"],
            "blind": accuracy_by_partition(sft.blind_summary(summary))}


def spread(results: list[dict]) -> dict:
    """Per partition: each seed's accuracy, their mean and standard deviation, and the first seed's bootstrap CI."""
    out = {}
    for part in results[0]["official"]["by_partition"] | {"overall": None}:
        accs = [accuracy_by_partition({"scorers": {"official": r["official"]}})[part] for r in results]
        block = results[0]["official"] if part == "overall" else results[0]["official"]["by_partition"][part]
        out[part] = {"accuracies": accs, "mean": statistics.mean(accs),
                     "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "ci95_first_seed": block["ci95"]}
    return out


def markdown(profile: str, table: dict, results: list[dict]) -> str:
    lines = [f"# SFT training-seed variance ({profile}, arm {ARM})", "",
             "Reproduce: `python benchmarks/sft_seeds.py --profile " + profile + "`. Official scorer, headline items.",
             "", "| partition | accuracy per seed | mean | sd (seeds) | 95% CI of one run (items) |",
             "|---|---|---|---|---|"]
    for part, t in table.items():
        accs = " / ".join(f"{a:.1f}" for a in t["accuracies"])
        lines.append(f"| {part} | {accs} | {t['mean']:.1f} | {t['sd']:.1f} | "
                     f"{t['ci95_first_seed'][0]:.1f}-{t['ci95_first_seed'][1]:.1f} |")
    lines += ["", "Blind controls per seed: " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{p} {a:.1f}" for p, a in r["blind"].items()) for r in results)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke", choices=runs.PROFILES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    params, _ = load_params("02_sft", args.profile)
    cfg = SFTConfig(**params)
    records = eval_subset(eval_records(args.profile), cfg.n_eval or None, cfg.seed)
    rows = sft.spacethinker_records(args.profile, cfg)
    results = [one_seed(cfg, s, records, rows) for s in args.seeds]
    table = spread(results)
    out = runs.root() / "reports" / "benchmarks"
    runs.write_json(out / "sft_seeds.json", {"profile": args.profile, "arm": ARM, "spread": table, "seeds": results})
    runs.atomic_write_text(out / "sft_seeds.md", markdown(args.profile, table, results))
    print(markdown(args.profile, table, results))


if __name__ == "__main__":
    main()
