"""Replay of base-family items during SFT: does it keep the student's retention? (exploratory, not a timed test)

    OMP_NUM_THREADS=1 python benchmarks/sft_replay.py --profile smoke --replay 0.25
    OMP_NUM_THREADS=1 python benchmarks/sft_replay.py --profile smoke --replay 0.5     # beside it, one core each
    python benchmarks/sft_replay.py --profile smoke --report

Why: at lr 2e-4 the image-trained student `mcq` arm loses 4-5 points of retention on the benchmark (every training
seed: reports/benchmarks/sft_seeds.md) while the blank-image arm keeps it (reports/sft_results.md). Replaying the
skills the base was pretrained on is the usual remedy for that kind of forgetting.

What runs: the 02_sft `student/mcq` arm with every setting of params/<profile>/02_sft.yaml (lr, 200 steps of 16, LoRA,
seed), its 2,000 SpaceThinker-format rows joined by base-family items from their own role stream ("sft_replay": no
scene shared with any other set) so that `replay` of the joined rows are replayed items. A replayed item is asked as the
benchmark asks it (the manual-CoT prompt, options in the base families' fixed order) with the pretraining target
"Answer: X". Each run is read on 04_distill's 600-item dev slice with its blind control, as in benchmarks/sft_lr.py,
whose cached rows give the references (the base, and the arm without replay at the same lr).

Fixed before the runs: this is exploratory, and nothing in the recipe changes with it this session, whatever it shows.
A replay share that keeps the dev retention within 2 points of the base's while its overall accuracy is no lower than
the no-replay arm's would be worth a rule and a rerun of the method stages. Writes reports/benchmarks/sft_replay.md.
"""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_lr  # noqa: E402  (the dev slice, its result rows and the cached references)

from spatialstudy import runs  # noqa: E402
from spatialstudy.configs import SFTConfig  # noqa: E402
from spatialstudy.data import make_items  # noqa: E402
from spatialstudy.data.mcq import LETTERS  # noqa: E402
from spatialstudy.data.streams import role_seed  # noqa: E402
from spatialstudy.methods import sft  # noqa: E402
from spatialstudy.models.episodes import mcq_episode  # noqa: E402
from spatialstudy.models.qwen import load_adapter  # noqa: E402
from spatialstudy.run import load_params  # noqa: E402

ARM = sft.Arm("student", "mcq")


class Joined:
    """Two episode datasets as one (the Trainer shuffles them together)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i):
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


def replay_episodes(n: int, cfg: SFTConfig) -> sft.Episodes:
    """n base-family items of their own stream, as the benchmark asks them, target "Answer: X"."""
    items = make_items(n, seed=role_seed(cfg.seed, "sft_replay"), partition="base")
    asked = [SimpleNamespace(images=[it.image], question=it.question, options=it.options,
                             target=f"Answer: {LETTERS[it.answer]}") for it in items]
    return sft.Episodes(asked, lambda m: mcq_episode(m, **cfg.episode_layout()))


def result_path(profile: str, share: float) -> Path:
    return runs.run_dir(profile, "sft_replay") / f"replay{share:g}" / "result.json"


def one_run(cfg: SFTConfig, share: float, dev: list, rows: tuple) -> dict:
    """Train (or load) the arm with `share` of replayed items and read it on the dev slice; cached as json."""
    done = result_path(cfg.profile, share)
    if done.exists():
        return runs.read_json(done)
    path = done.parent
    model, processor, quantized = sft.load_base(cfg.student, cfg.profile, cfg)
    if sft.arm_trained(path):
        model, log = load_adapter(model, path / "adapter"), runs.read_json(path / "log.json")
    else:
        train, _ = sft.episodes(rows[0], ARM, cfg, cfg.seed)
        val, _ = sft.episodes(rows[1], ARM, cfg, cfg.seed + 1)
        extra = replay_episodes(round(len(train) * share / (1 - share)), cfg)
        model = sft.make_trainable(model, cfg, quantized)
        log = sft.fit(model, processor, cfg, ARM, path, (Joined(train, extra), val), replayed=len(extra))
    summary = sft.benchmark(model, processor, dev, path, sft.eval_settings(cfg, f"replay{share:g}", "mcq"))
    result = {**sft_lr.dev_result(summary, cfg.lr, f"student/mcq + replay {share:g}", log), "replay": share}
    del model
    gc.collect()
    runs.write_json(done, result)
    return result


def paired_lines(profile: str, shares: list[float]) -> list[str]:
    """Each replay run minus the arm without replay and minus the base, on the same dev items (scoring's paired
    difference: bootstrap CI over images, exact McNemar p), overall and on retention (base items)."""
    from spatialstudy.evaluation.predictions import read_predictions
    from spatialstudy.scoring import paired_difference

    def rows(path: Path, part: str | None) -> list[dict]:
        got = [r for r in read_predictions(path) if not r["options_in_image"]]
        return [r for r in got if part is None or r.get("partition") == part]

    lr_dir = sft_lr.row_path(profile, 2e-4, ARM).parent.parent
    refs = {"student/mcq": lr_dir / "lr0.0002" / "predictions_student_mcq.jsonl",
            "student base": lr_dir / "base" / "predictions_student_base.jsonl"}
    lines = ["| comparison (same dev items) | overall | retention (base) |", "|---|---|---|"]
    for share in shares:
        mine = result_path(profile, share).parent / f"predictions_replay{share:g}.jsonl"
        for name, ref in refs.items():
            cells = [paired_difference(rows(mine, p), rows(ref, p)) for p in (None, "base")]
            lines.append(f"| replay {share:g} - {name} | " + " | ".join(
                f"{d['diff']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] p {d['p_mcnemar']:.3f}" for d in cells)
                + " |")
    return lines


def markdown(profile: str, rows: list[dict]) -> str:
    parts = [p for p in rows[0]["official"] if p != "overall"]
    lines = [f"# Replay of base-family items during SFT ({profile}, exploratory)", "",
             "Reproduce: `benchmarks/sft_replay.py` (its docstring says what was fixed before the runs). Dev slice: "
             f"{sft_lr.N_DEV} items of 04_distill's role-\"dev\" stream; official scorer; the student `mcq` arm at the "
             "smoke recipe. Replay share: the part of the joined training rows that are replayed base-family items.",
             "", "| run | overall | " + " | ".join(parts) + " | blind overall | unparsed | val loss |",
             "|---" * (len(parts) + 5) + "|"]
    for r in rows:
        o, loss = r["official"], r["final_val_loss"]
        lines.append(f"| {r['arm']} | {o['overall']:.1f} | " + " | ".join(f"{o[p]:.1f}" for p in parts) +
                     f" | {r['blind']['overall']:.1f} | {(r['unparsed'] or 0):.1f}% | "
                     f"{'' if loss is None else f'{loss:.3f}'} |")
    shares = [r["replay"] for r in rows if "replay" in r]
    return "\n".join(lines + [""] + (paired_lines(profile, shares) + [""] if shares else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke", choices=runs.PROFILES)
    ap.add_argument("--replay", type=float, nargs="*", default=[])
    ap.add_argument("--report", action="store_true", help="gather what has run into the report")
    args = ap.parse_args()
    params, _ = load_params("02_sft", args.profile)
    cfg = replace(SFTConfig(**params), arms=["student/mcq"])
    if args.replay:
        dev, rows = sft_lr.dev_slice(args.profile, cfg.seed), sft.spacethinker_records(args.profile, cfg)
        for share in args.replay:
            print(one_run(cfg, share, dev, rows), flush=True)
    if args.report:
        refs = [sft_lr.row_path(args.profile, lr, ARM) for lr in (0.0, cfg.lr)]
        done = sorted(result_path(args.profile, 0).parent.parent.glob("replay*/result.json"))
        table = [runs.read_json(p) for p in [*refs, *done] if p.exists()]
        out = Path(__file__).resolve().parents[1] / "reports" / "benchmarks" / "sft_replay.md"
        runs.atomic_write_text(out, markdown(args.profile, table))
        print(out.read_text())


if __name__ == "__main__":
    main()
