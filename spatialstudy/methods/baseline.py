"""Stage `baseline`: the student and teacher bases (tiny, and real 3B/7B when given) on the fixed evaluation subset.

Writes runs/<profile>/baseline/{config.json, metrics.json, eval_subset.json, predictions_<model>[_blind].jsonl}.
Every later method evaluates on exactly this subset (`eval.eval_records(profile)`), so numbers compare item for
item.
Module-level imports stay light (no torch) so the runner can validate BaselineConfig before starting work.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from spatialstudy import runs
from spatialstudy.configs import BaselineConfig
from spatialstudy.evaluation.predictions import headline_predictions
from spatialstudy.scoring import in_headline, paired_difference

STAGE = "baseline"
DATA_STAGE = "01_data"
CHANCE_TOLERANCE = 3.0    # points: each base's blind control must sit this close to chance in every partition
CEILING = 90.0            # "well below ceiling": the student base must leave room for methods to help
STUDENT_BASE_FLOOR = 45.0  # accuracy the student base must reach on the base partition (what pretraining teaches)
TEACHER_MARGIN = 10.0     # points the teacher base must beat the student base by on the base partition
BASES = ("student", "teacher")   # the tiny bases the targets are about (real models are reported, not targeted)
PARTITION_LABELS = {"base": "retention (base)", "sft": "seen (sft)", "test_only": "unseen (test_only)"}


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
    from spatialstudy.evaluation.eval import eval_subset

    records = load_omnispatial(omnispatial_dir(profile, cfg))
    return eval_subset(records, cfg.n_eval or None, cfg.eval_seed)


def model_specs(cfg: BaselineConfig) -> dict[str, tuple[str, dict]]:
    """name -> (load_model spec, evaluation overrides); the real models only when their paths are given."""
    specs = {"student": ("tiny-student", {}), "teacher": ("tiny-teacher", {})}
    for name, path in (("real_3b", cfg.real_student), ("real_7b", cfg.real_teacher)):
        if path:  # a folder relative to the project root, else a hub name in the local cache
            local = runs.resolve(path)
            specs[name] = (str(local) if local.exists() else path, {"max_new_tokens": cfg.real_max_new_tokens})
    return specs


def evaluate_model(spec: str, profile: str, records: list, out_dir: Path, cfg: BaselineConfig, name: str,
                   overrides: dict) -> dict:
    """One base with its controls, at this stage's settings (the evaluation layer loads, evaluates and frees it)."""
    from spatialstudy.evaluation.eval import EvalSettings, evaluate_spec

    # restart_stale: predictions left by an earlier run of this stage with other bases (retrained after a generator
    # change) or settings are replaced, not mixed in; those of this configuration are resumed
    kw = dict(name=name, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, prompt_style=cfg.prompt_style,
              restart_stale=True)
    return evaluate_spec(spec, records, out_dir, EvalSettings(**{**kw, **overrides}), tier=profile)


def chance_accuracy(records: list) -> float:
    """Expected accuracy of a uniform guess (percent): 1/len(options), 1/4 when the options are in the image."""
    return 100.0 * sum(1 / (len(r.options) or 4) for r in records) / len(records)


def chance_by_partition(records: list) -> dict:
    """Chance over the headline records, "overall" and per partition: partitions differ in options per item (2-4)."""
    head = [r for r in records if in_headline(r.partition, not r.options)]
    groups = defaultdict(list)
    for r in head:
        if r.partition is not None:
            groups[r.partition].append(r)
    return {"overall": chance_accuracy(head), **{p: chance_accuracy(g) for p, g in sorted(groups.items())}}


def partition_blocks(scorer: dict) -> dict:
    """{"overall": block, partition: block, ...} of one scorer summary; real data has only "overall"."""
    return {"overall": scorer, **scorer["by_partition"]}


def partition_accuracy(scorer: dict) -> dict:
    return {g: b["accuracy"] for g, b in partition_blocks(scorer).items()}


def looked(models: dict) -> dict:
    """Image minus blind accuracy (points) per model and partition: what seeing the image is worth."""
    out = {}
    for name, m in models.items():
        image = partition_accuracy(m["scorers"]["official"])
        blind = partition_accuracy(m["controls"]["blind"]["scorers"]["official"])
        out[name] = {g: image[g] - blind[g] for g in image}
    return out


def base_targets(student: dict, teacher: dict, records: list) -> dict:
    """The base-partition targets with their numbers; {} for data without a base partition (real OmniSpatial)."""
    s_base = student["scorers"]["official"]["by_partition"].get("base")
    if s_base is None:
        return {}
    t_base = teacher["scorers"]["official"]["by_partition"]["base"]
    paired = paired_difference(headline_predictions(teacher, records, "base"),
                               headline_predictions(student, records, "base"))
    return {"student_base": s_base["accuracy"], "teacher_base": t_base["accuracy"],
            "student_base_45": s_base["accuracy"] >= STUDENT_BASE_FLOOR, "teacher_minus_student_base": paired,
            "teacher_10_above_student_base": paired["diff"] >= TEACHER_MARGIN and paired["ci95"][0] > 0}


def targets(results: dict, records: list) -> dict:
    """The pretraining targets of the tiny bases (official scorer, headline items), each with its numbers: the
    student learns the base partition, the teacher beats it there (paired CI), each blind control sits at chance
    in every partition, and the student is above chance and below the ceiling overall."""
    s, t = results["student"], results["teacher"]
    chance = chance_by_partition(records)
    blind = {n: partition_accuracy(results[n]["controls"]["blind"]["scorers"]["official"]) for n in BASES}
    return {"chance": chance["overall"], "chance_by_partition": chance,
            "student": s["accuracy_official"], "teacher": t["accuracy_official"], **base_targets(s, t, records),
            "blind_by_partition": blind,
            "blind_within_3_of_chance": all(abs(b[g] - chance[g]) <= CHANCE_TOLERANCE
                                            for b in blind.values() for g in b),
            "student_above_chance": s["scorers"]["official"]["ci95"][0] > chance["overall"],
            "student_below_ceiling": s["accuracy_official"] < CEILING,
            "teacher_minus_student": paired_difference(headline_predictions(t, records),
                                                       headline_predictions(s, records))}


def run_baseline(profile: str, cfg: BaselineConfig) -> dict:
    """Evaluate every base on the fixed subset with controls; write the run dir; return its metrics."""
    from spatialstudy.evaluation.eval import save_eval_subset

    runs.seed_everything(cfg.seed)
    records = test_records(profile, cfg)
    out = runs.run_dir(profile, STAGE)
    save_eval_subset(out, omnispatial_dir(profile, cfg), records, cfg.eval_seed)
    results = {name: evaluate_model(spec, profile, records, out, cfg, name, over)
               for name, (spec, over) in model_specs(cfg).items()}
    metrics = {"n_eval": len(records), "models": results, "targets": targets(results, records),
               "looked": looked(results)}
    runs.save_run(profile, STAGE, asdict(cfg), metrics)
    save_figures(metrics, profile)
    print(summary_table(metrics))
    return metrics


def _by_group(scorer: dict) -> dict:
    """{group: (accuracy, lo, hi)}: overall, then per partition (procedural data) or task type (real data)."""
    out = {"overall": (scorer["accuracy"], *scorer["ci95"])}
    groups = scorer["by_partition"] or scorer["by_task_type"]
    return {**out, **{PARTITION_LABELS.get(g, g): (v["accuracy"], *v["ci95"]) for g, v in groups.items()}}


def save_figures(metrics: dict, profile: str) -> None:
    """Accuracy per model and partition with CIs, each model beside its blind control, chance per partition; and
    predicted-vs-correct letters."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    series = {}
    for name, m in metrics["models"].items():
        series[name] = _by_group(m["scorers"]["official"])
        series[f"{name} blind"] = _by_group(m["controls"]["blind"]["scorers"]["official"])
    chance = metrics["targets"]["chance_by_partition"]
    # real data has no partitions: its task-type groups share the one overall chance line
    chance = {PARTITION_LABELS.get(g, g): c for g, c in chance.items()} if len(chance) > 1 else chance["overall"]
    fig = plotting.accuracy_bars(series, chance=chance, paired=True,
                                 title="Baselines on the OmniSpatial-format test set (official scorer)")
    plotting.savefig(fig, "baseline_accuracy", profile)
    tables = {n: m["scorers"]["official"]["letter_table"] for n, m in metrics["models"].items()}
    plotting.savefig(plotting.letter_heatmaps(tables), "baseline_letters", profile)
    plt.close("all")


def _model_rows(name: str, m: dict, looked_: dict) -> list[str]:
    """One table row per partition: n, official accuracy and CI, lenient, blind, image minus blind."""
    lenient = partition_accuracy(m["scorers"]["lenient"])
    blind = partition_accuracy(m["controls"]["blind"]["scorers"]["official"])
    lines = []
    for g, b in partition_blocks(m["scorers"]["official"]).items():
        ci = "[{:.1f}, {:.1f}]".format(*b["ci95"])
        lines.append(f"{name:<9} {PARTITION_LABELS.get(g, g):<19} {b['n']:>4} {b['accuracy']:>9.1f} {ci:>14} "
                     f"{lenient[g]:>8.1f} {blind[g]:>6.1f} {looked_[g]:>+10.1f}")
    return lines


def _model_notes(name: str, m: dict) -> str:
    """Parse failures and the drawn-options items (outside the headline on procedural data)."""
    o, le, drawn = m["scorers"]["official"], m["scorers"]["lenient"], m["options_in_image"]["official"]
    note = f"{name}: unparsed {o['parse_failure_rate']:.1f}% official / {le['parse_failure_rate']:.1f}% lenient"
    if drawn["n"]:
        note += f"; options drawn in the image {drawn['accuracy']:.1f}% (n {drawn['n']})"
    return note


def _targets_text(t: dict) -> str:
    parts = [f"chance {t['chance']:.1f}%", f"blind within {CHANCE_TOLERANCE:g} of chance in every partition: "
             f"{t['blind_within_3_of_chance']}", f"student above chance: {t['student_above_chance']}",
             f"below ceiling: {t['student_below_ceiling']}"]
    if "student_base" in t:
        p = t["teacher_minus_student_base"]
        parts += [f"student base {t['student_base']:.1f}% >= {STUDENT_BASE_FLOOR:g}: {t['student_base_45']}",
                  "teacher - student on base {:+.1f} [{:.1f}, {:.1f}] (McNemar p {:.3f}, n {}) >= {:g} with CI "
                  "above 0: {}".format(p["diff"], *p["ci95"], p["p_mcnemar"], p["n"], TEACHER_MARGIN,
                                       t["teacher_10_above_student_base"])]
    return "targets: " + "; ".join(parts)


def summary_table(metrics: dict) -> str:
    """A plain-text table, one row per model and partition (official scorer unless named), then parse failures,
    the drawn-options items, always-A and the targets."""
    lines = [f"{'model':<9} {'partition':<19} {'n':>4} {'official':>9} {'95% CI':>14} {'lenient':>8} {'blind':>6} "
             f"{'img-blind':>10}"]
    for name, m in metrics["models"].items():
        lines += _model_rows(name, m, metrics["looked"][name])
    lines += [_model_notes(name, m) for name, m in metrics["models"].items()]
    lines.append(f"always-A {metrics['models']['student']['always_A']['accuracy']:.1f}")
    lines.append(_targets_text(metrics["targets"]))
    return "\n".join(lines)


def main(profile: str, params: dict) -> dict:
    """Runner entry point (spatialstudy.run PY_STAGES): params from params/<profile>/baseline.yaml."""
    return run_baseline(profile, BaselineConfig.for_profile(profile, params, STAGE))
