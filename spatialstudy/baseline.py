"""Stage `baseline`: the student and teacher bases (tiny, and real 3B/7B when given) on the fixed evaluation subset.

Writes runs/<profile>/baseline/{config.json, metrics.json, eval_subset.json, predictions_<model>[_blind].jsonl}.
Every later method evaluates on exactly this subset (`eval_records(profile)`), so numbers compare item for item.
Module-level imports stay light (no torch) so the runner can validate BaselineConfig before starting work.
"""
from __future__ import annotations

import gc
from dataclasses import asdict
from pathlib import Path

from spatialstudy import runs
from spatialstudy.configs import BaselineConfig

STAGE = "baseline"
DATA_STAGE = "01_data"
CHANCE_TOLERANCE = 5.0    # points: the blind control must sit this close to chance
CEILING = 90.0            # "well below ceiling": the student base must leave room for methods to help
TEACHER_MARGIN = 10.0     # points the teacher base must beat the student base by
REAL_MIN_PIXELS = 256 * 28 * 28   # lmms-eval's Qwen2.5-VL pixel caps: fixed, so runs stay comparable
REAL_MAX_PIXELS = 2048 * 28 * 28


def omnispatial_dir(profile: str, cfg: BaselineConfig) -> Path:
    """The OmniSpatial-format test folder: the configured local copy, else what the data stage wrote."""
    if cfg.omnispatial_path:
        return runs.resolve(cfg.omnispatial_path)
    data = runs.require_run(profile, DATA_STAGE)
    metrics = runs.read_json(data / "metrics.json")
    if not metrics.get("omnispatial_dir"):
        raise KeyError(f"{data / 'metrics.json'} has no 'omnispatial_dir'; re-run the {DATA_STAGE} stage")
    return Path(metrics["omnispatial_dir"])


def test_records(profile: str, cfg: BaselineConfig) -> list:
    """Every OmniSpatial-format test record, then the fixed stratified subset of `n_eval`."""
    from spatialstudy.data import load_omnispatial
    from spatialstudy.eval import eval_subset

    records = load_omnispatial(omnispatial_dir(profile, cfg))
    return eval_subset(records, cfg.n_eval or None, cfg.eval_seed)


def eval_records(profile: str) -> list:
    """The baseline's evaluation subset (same items, same order) for any later method of this profile."""
    from spatialstudy.data import load_omnispatial

    out = runs.require_run(profile, STAGE)
    subset = runs.read_json(out / "eval_subset.json")
    by_key = {r.key: r for r in load_omnispatial(subset["omnispatial_dir"])}
    missing = [k for k in map(tuple, subset["keys"]) if k not in by_key]
    if missing:
        raise ValueError(f"{out}/eval_subset.json names {len(missing)} item(s) absent from {subset['omnispatial_dir']}"
                         f", e.g. {missing[:2]}; re-run the baseline stage after the data stage")
    return [by_key[tuple(k)] for k in subset["keys"]]


def model_specs(cfg: BaselineConfig) -> dict[str, tuple[str, dict]]:
    """name -> (load_model spec, evaluation overrides); the real models only when their paths are given."""
    specs = {"student": ("tiny-student", {}), "teacher": ("tiny-teacher", {})}
    for name, path in (("real_3b", cfg.real_student), ("real_7b", cfg.real_teacher)):
        if path:  # a folder relative to the project root, else a hub name in the local cache
            local = runs.resolve(path)
            specs[name] = (str(local) if local.exists() else path, {"max_new_tokens": cfg.real_max_new_tokens})
    return specs


def _load(spec: str, profile: str):
    import torch

    from spatialstudy.models import load_model

    if spec.startswith("tiny-"):
        return load_model(spec, tier=profile)
    cuda = torch.cuda.is_available()
    return load_model(spec, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None,
                      min_pixels=REAL_MIN_PIXELS, max_pixels=REAL_MAX_PIXELS)


def evaluate_model(spec: str, profile: str, records: list, out_dir: Path, cfg: BaselineConfig, name: str,
                   overrides: dict) -> dict:
    """Load one model, evaluate it with the controls (resumes from its prediction files), free it."""
    import torch

    from spatialstudy.eval import evaluate_with_controls

    model, processor = _load(spec, profile)
    # restart_stale: predictions left by an earlier run of this stage with other bases (retrained after a generator
    # change) or settings are replaced, not mixed in; those of this configuration are resumed
    kw = dict(out_dir=out_dir, name=name, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
              prompt_style=cfg.prompt_style, restart_stale=True)
    metrics = evaluate_with_controls(model, processor, records, **{**kw, **overrides})
    del model, processor
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"spec": spec, **metrics}


def chance_accuracy(records: list) -> float:
    """Expected accuracy of a uniform guess (percent): 1/len(options), 1/4 when the options are in the image."""
    return 100.0 * sum(1 / (len(r.options) or 4) for r in records) / len(records)


def targets(results: dict, chance: float) -> dict:
    """The pretraining targets of the tiny bases, with their numbers (official scorer), plus each base's accuracy
    on the base partition (the families pretraining teaches) where the records carry partitions."""
    s, t = results["student"], results["teacher"]
    blind = s["controls"]["blind"]["accuracy_official"]
    lo = s["scorers"]["official"]["ci95"][0]
    out = {"chance": chance, "student": s["accuracy_official"], "teacher": t["accuracy_official"],
           "student_blind": blind,
           "blind_within_5_of_chance": abs(blind - chance) <= CHANCE_TOLERANCE,
           "student_above_chance": lo > chance, "student_below_ceiling": s["accuracy_official"] < CEILING,
           "teacher_10_above_student": t["accuracy_official"] - s["accuracy_official"] >= TEACHER_MARGIN}
    for name, m in (("student", s), ("teacher", t)):
        base = m["scorers"]["official"].get("by_partition", {}).get("base")
        if base:
            out[f"{name}_base_partition"] = base["accuracy"]
    return out


def run_baseline(profile: str, cfg: BaselineConfig) -> dict:
    """Evaluate every base on the fixed subset with controls; write the run dir; return its metrics."""
    runs.seed_everything(cfg.seed)
    records = test_records(profile, cfg)
    out = runs.run_dir(profile, STAGE)
    runs.write_json(out / "eval_subset.json", {"omnispatial_dir": str(omnispatial_dir(profile, cfg)),
                                               "n": len(records), "seed": cfg.eval_seed,
                                               "keys": [list(r.key) for r in records]})
    results = {name: evaluate_model(spec, profile, records, out, cfg, name, over)
               for name, (spec, over) in model_specs(cfg).items()}
    metrics = {"n_eval": len(records), "models": results, "targets": targets(results, chance_accuracy(records))}
    runs.save_run(profile, STAGE, asdict(cfg), metrics)
    save_figures(metrics, profile)
    print(summary_table(metrics))
    return metrics


def _by_group(scorer: dict) -> dict:
    """{group: (accuracy, lo, hi)}: overall, then per partition (procedural data) or task type (real data)."""
    out = {"overall": (scorer["accuracy"], *scorer["ci95"])}
    groups = scorer.get("by_partition") or scorer["by_task_type"]
    return {**out, **{g: (v["accuracy"], *v["ci95"]) for g, v in groups.items()}}


def save_figures(metrics: dict, profile: str) -> None:
    """Accuracy per model and partition with CIs (and the blind control), and predicted-vs-correct letters."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    series = {}
    for name, m in metrics["models"].items():
        series[name] = _by_group(m["scorers"]["official"])
        series[f"{name} blind"] = _by_group(m["controls"]["blind"]["scorers"]["official"])
    fig = plotting.accuracy_bars(series, chance=metrics["targets"]["chance"],
                                 title="Baselines on the OmniSpatial-format test set (official scorer)")
    plotting.savefig(fig, "baseline_accuracy", profile)
    tables = {n: m["scorers"]["official"]["letter_table"] for n, m in metrics["models"].items()}
    plotting.savefig(plotting.letter_heatmaps(tables), "baseline_letters", profile)
    plt.close("all")


def summary_table(metrics: dict) -> str:
    """A plain-text table: accuracy (official, lenient), parse failures, blind control, per model."""
    lines = [f"{'model':<9} {'official':>9} {'95% CI':>14} {'lenient':>8} {'unparsed(off/len)':>18} {'blind':>6}"]
    for name, m in metrics["models"].items():
        o, le = m["scorers"]["official"], m["scorers"]["lenient"]
        ci = "[{:.1f}, {:.1f}]".format(*o["ci95"])
        lines.append(f"{name:<9} {o['accuracy']:>9.1f} {ci:>14} {le['accuracy']:>8.1f} "
                     f"{o['parse_failure_rate']:>8.1f}/{le['parse_failure_rate']:<9.1f} "
                     f"{m['controls']['blind']['accuracy_official']:>6.1f}")
    lines.append(f"always-A {metrics['models']['student']['always_A']['accuracy']:.1f}; targets: {metrics['targets']}")
    return "\n".join(lines)


def main(profile: str, params: dict) -> dict:
    """Runner entry point (spatialstudy.run PY_STAGES): params from params/<profile>/baseline.yaml."""
    params = {**params, "profile": profile}
    BaselineConfig.check_keys(params, where=f"params/{profile}/{STAGE}.yaml")
    return run_baseline(profile, BaselineConfig(**params))
