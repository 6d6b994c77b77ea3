"""06_results: the study's summary, read from every stage's run (metrics.json and the prediction files they name).

Nothing is re-evaluated and no model is loaded: accuracies come from the stages' evaluation summaries, paired
differences from their prediction files (compare.paired_by_partition, on the items both runs cover). A stage that
has not run is reported with the command that makes it, and everything else is still built. Methods never import
each other, so what the other stages know (labels, the pre-declared best settings) is re-read from their metrics.

    python -c "from spatialstudy.methods import results; results.main('smoke', {})"   # = the notebook's calls

Outputs: runs/<profile>/06_results/{config,metrics}.json, figures under reports/figures/<profile>/results_*, and a
self-contained HTML report reports/results_<profile>.html (the ci tier writes both under runs/ci/ instead).
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from spatialstudy import runs
from spatialstudy.evaluation.compare import PARTITION_LABELS, PARTITIONS, REAL_NAMES, paired_by_partition
from spatialstudy.scoring import FAMILY_MIN_N

STAGE = "06_results"
STAGES = ("baseline", "02_sft", "03_icl", "04_distill", "05_grayscale")
GROUPS = ("base", "SFT", "ICL", "KD", "colour")

# The study's reported OmniSpatial accuracies (NotManigandan/VLM-Spatial-Reasoning README; ../shared/research/
# methods.md section 0): (row, percent, what it was measured on, our counterpart: [(stage, name), ...] first found)
STUDY = [
    ("3B base", 43.44, "VLAA-Thinker-Qwen2.5VL-3B, untuned; item set not stated (its SFT evaluation script scores "
     "the first 851 of the 1,533 items, its ICL script all 1,533)", [("baseline", "real_3b"), ("baseline", "student")]),
    ("3B SFT", 41.81, "VLAA-Thinker-3B, QLoRA on SpaceThinker's own target format; scored on the first 851 of the "
     "1,533 items (4-bit base, LoRA merged)", [("02_sft", "student_spacethinker"), ("02_sft", "student_mcq")]),
    ("7B SFT", 43.57, "VLAA-Thinker-7B, QLoRA as for 3B; scored on the first 851 of the 1,533 items",
     [("02_sft", "teacher_spacethinker"), ("02_sft", "teacher_mcq")]),
    ("naive ICL", 30.59, "VLAA-Thinker-3B, k = 3 free-text demos; all 1,533 items (format failures score the "
     "fallback 'A')", [("03_icl", "naive_k3")]),
    ("MCQ ICL k = 3", 43.44, "VLAA-Thinker-3B, k = 3 demos rewritten as 4-option MCQ; all 1,533 items",
     [("03_icl", "mcq_k3")]),
    ("attention KD", 42.98, "VLAA-Thinker 7B (its SFT) into 3B, beta AttnKD + gamma LogitKD; item set not stated",
     [("04_distill", "combined")]),
]

# What the embedded default can and cannot say, one paragraph per research question (hand-written; the notebook's
# markdown holds the same text, which tests/test_results.py checks). REAL_NOTE replaces the caveat for real weights.
RQ_TEXT = {
    "sft": ("Research question 1: does supervised fine-tuning help?",
            "On the embedded default the student and teacher are tiny Qwen2.5-VL-architecture models (about 0.8 M "
            "and 3.9 M parameters) pretrained on procedural scenes, and the benchmark is procedural OmniSpatial-format "
            "items. What it can say is about the method's mechanics and its controls: whether each arm trains "
            "(validation loss), whether it keeps the answer format the official scorer needs (a reasoning target can "
            "cost the 'Answer: X' line, and the scorer then falls back to 'A'), whether it forgets the families its "
            "base knew (retention) while gaining on the families it was trained on (seen, unseen), and whether it "
            "looks at the image at all (each arm against its own blank-image control and against the arm trained on "
            "blank images). It cannot say whether QLoRA on SpaceThinker raises or lowers the real 3B's or 7B's "
            "OmniSpatial accuracy, or by how much: the tiny bases read the scenes poorly, the questions are templated, "
            "and the study's 41.81 / 43.57 against 43.44 are numbers about other models on other items."),
    "icl": ("Research question 2: does retrieval-based in-context learning help?",
            "The embedded default exercises the whole retrieval pipeline (the MiniLM index over the "
            "SpaceThinker-format training questions, demos in the chat, the token budget) and its controls: random "
            "demos and demos with shuffled answers tell whether the retrieved demos' content matters at all, and the "
            "blind control whether the query image does. It measures the latency that k extra images add, and it "
            "shows whether a model copies the demos' answer format, which is what separates the study's naive ICL "
            "(30.59, free-text answers the scorer cannot read) from its MCQ ICL (43.44). It cannot say whether the "
            "real 3B learns from demonstrations: a model of a million parameters pretrained on templated scenes has "
            "no in-context learning to speak of, so equal or lower accuracy with demos here is expected and says "
            "nothing about Qwen2.5-VL-3B."),
    "kd": ("Research question 3: can the 7B teacher be distilled into the 3B student?",
           "The embedded default checks the losses (logit KD, similarity-weighted attention KD across a layer map, "
           "their combination), that only the student's LoRA learns, the same data, steps and seed for every arm, and "
           "the gate that decides whether the question is testable at all: distillation can only transfer a lead "
           "the fine-tuned teacher has over the fine-tuned student. When the gate finds no lead, equal accuracy of "
           "the KD arms and the CE-only arm is what one expects and is not evidence about distillation. The "
           "equal-budget arm (the teacher's extra pretraining spent on the student) is the control the study lacked. "
           "It cannot say whether attention KD helps the real 3B: the tiny pair has 8 against 3 heads where the real "
           "one has 28 against 16, its head matching comes out near uniform, and the real teacher's lead, if any, is "
           "unknown here."),
    "colour": ("Research question 4: does colour matter?",
               "On procedural scenes colour is a controlled factor: an item needs the colour word, names the object "
               "by colour although shape and size single it out too, or names it by shape only, and an "
               "equal-brightness palette is a positive control where grayscale removes every trace of colour. So the "
               "embedded default can show that the evaluation detects a colour dependence where one exists by "
               "construction, that hue-permuted images separate 'colour removed' from 'images unlike training', and "
               "whether a model trained on colour images only is hurt by the shift to gray or by the missing "
               "colour (the gray-augmented arm). It cannot say how much the real models rely on colour on "
               "OmniSpatial's photographs and renderings, nor how well the colour-question regex splits the real "
               "benchmark's phrasings."),
}
REAL_NOTE = ("These numbers come from real weights on the benchmark the profile names: they speak to those models "
             "under this project's harness (one greedy pass, the official scorer, the same items for every method), "
             "which differs from the study's in the ways the study table lists.")


@dataclass
class Method:
    """One evaluated model or setting as the table shows it; `summary` is its stage's evaluation summary (with the
    blind control under controls.blind), `ref` the key of the base its paired differences are taken against."""

    key: str
    label: str
    stage: str
    group: str
    model: str
    summary: dict
    ref: str | None = None
    params: int | None = None
    latency_s: float | None = None
    best: bool = False


@dataclass
class Results:
    """Everything the report shows, read from the runs of one profile."""

    profile: str
    status: dict
    metrics: dict
    records: list | None
    methods: dict = field(default_factory=dict)
    paired: dict = field(default_factory=dict)        # key -> {"vs_ref": by partition, "vs_blind": by partition}
    figures: dict = field(default_factory=dict)       # name -> PNG path
    notes: list = field(default_factory=list)         # what could not be read (named, never silently dropped)


# ---------------------------------------------------------------- which runs exist
def command(profile: str, stage: str) -> str:
    """The runner's command line that makes one stage of a profile (what a missing stage's line names)."""
    return f"python -m spatialstudy.run --profile {profile} --only {stage}"


def stage_status(profile: str, build_missing: bool = False) -> dict:
    """{stage: {"found", "command", "error"}}; at the ci tier with `build_missing` a missing stage is built first
    (runs.require_run), elsewhere it is only reported, since a smoke or full stage takes minutes to days."""
    out = {}
    for stage in STAGES:
        error = None
        if build_missing and profile == "ci" and not runs.is_done(profile, stage):
            try:
                runs.require_run(profile, stage)
            except (RuntimeError, FileNotFoundError) as err:
                error = str(err)
        out[stage] = {"found": runs.is_done(profile, stage), "command": command(profile, stage), "error": error}
    return out


def status_lines(res: Results) -> list[str]:
    """One line per stage: found, or missing with the command that makes it."""
    lines = []
    for stage, s in res.status.items():
        if s["found"]:
            lines.append(f"{stage}: found (runs/{res.profile}/{stage}/metrics.json)")
        else:
            lines.append(f"{stage}: MISSING (no runs/{res.profile}/{stage}/metrics.json); make it with: {s['command']}"
                         + (f" [building it failed: {s['error']}]" if s["error"] else ""))
    return lines


def found(res: Results) -> list[str]:
    """The stages whose runs exist."""
    return [s for s, v in res.status.items() if v["found"]]


def missing(res: Results) -> list[str]:
    """The stages that have not run."""
    return [s for s, v in res.status.items() if not v["found"]]


# ---------------------------------------------------------------- reading the runs
def localize(summary: dict, where: Path) -> dict:
    """The summary with prediction paths that exist: as recorded, else the same file name in `where`, so a run
    folder that was copied or moved (or a fixture naming files relative to its run) still pairs item by item."""
    out = dict(summary)
    if summary.get("predictions"):
        path = Path(summary["predictions"])
        if not path.is_absolute() or not path.exists():
            out["predictions"] = str(Path(where) / path.name)
    blind = summary.get("controls", {}).get("blind")
    if blind:
        out["controls"] = {**summary["controls"], "blind": localize(blind, where)}
    return out


def item_records(profile: str) -> list | None:
    """The fixed evaluation subset's items in order, as the baseline stage recorded them (eval_subset.json). Pairing
    needs only each item's key, so the benchmark (and the evaluation harness, with torch) is not loaded; this is the
    key list evaluation.eval.eval_records orders its records by. None when the baseline has not run."""
    path = runs.run_dir(profile, "baseline", create=False) / "eval_subset.json"
    if not path.exists():
        return None
    return [SimpleNamespace(key=tuple(k)) for k in runs.read_json(path)["keys"]]


def _cost(summary: dict) -> tuple[int | None, float | None]:
    """(parameters, mean per-item latency in seconds) of an evaluation summary, where recorded."""
    return summary.get("cost", {}).get("params_total"), (summary.get("latency_s") or {}).get("mean")


def _method(key: str, label: str, group: str, model: str, summary: dict, where: Path, **kw) -> Method:
    """A Method with the summary's own cost unless the stage recorded a better one (`kw`, None ignored)."""
    params, latency = _cost(summary)
    kw = {"params": params, "latency_s": latency, **{k: v for k, v in kw.items() if v is not None}}
    return Method(key, label, key.split("/")[0], group, model, localize(summary, where), **kw)


BASE_LABELS = {"student": "student base", "teacher": "teacher base", "real_3b": "3B base", "real_7b": "7B base"}


def baseline_methods(m: dict, where: Path) -> list[Method]:
    """The untuned bases; with real checkpoints present the tiny ones are labelled as such (a pipeline check)."""
    real = any(n in m["models"] for n in REAL_NAMES.values())
    out = []
    for name, s in m["models"].items():
        label = ("tiny " if real and name in REAL_NAMES else "") + BASE_LABELS.get(name, name)
        model = "teacher" if name in ("teacher", "real_7b") else "student"
        out.append(_method(f"baseline/{name}", label, "base", model, s, where))
    return out


def base_refs(methods: dict) -> dict:
    """{"student": key, "teacher": key}: the bases every student / teacher method is compared with (the real
    checkpoints when the baseline evaluated them, else the tiny bases)."""
    out = {}
    for model, real in REAL_NAMES.items():
        for key in (f"baseline/{real}", f"baseline/{model}"):
            if key in methods:
                out[model] = key
                break
    return out


def sft_methods(m: dict, where: Path, refs: dict) -> list[Method]:
    """Every 02_sft arm; an arm whose base was evaluated here (4-bit) is compared with that base, listed too."""
    out = []
    for model, b in m.get("bases", {}).items():
        if b.get("source", "baseline") != "baseline":
            out.append(_method(f"02_sft/{model}_base", f"{model} base ({b['source']})", "base", model, b["eval"],
                               where, ref=refs.get(model)))
    own = {x.model: x.key for x in out}
    for name, a in sorted(m.get("arms", {}).items(), key=lambda kv: sft_order(kv[1]["arm"])):
        arm = a["arm"]
        label = f"SFT {arm['model']} {arm['target']}" + (", blank images" if arm.get("blank") else "")
        out.append(_method(f"02_sft/{name}", label, "SFT", arm["model"], a["eval"], where,
                           ref=own.get(arm["model"], refs.get(arm["model"]))))
    return out


def sft_order(arm: dict) -> tuple:
    """Student arms before teacher arms; the mcq, SpaceThinker and answer-only targets in that order; blank last."""
    targets = ("mcq", "spacethinker", "answer_only")
    return (arm["model"] != "student", targets.index(arm["target"]) if arm["target"] in targets else 9,
            bool(arm.get("blank")))


ICL_DEMOS = {"retrieved": "", "random": ", random demos", "label_shuffled": ", label-shuffled demos"}


def icl_label(setting: dict) -> str:
    """"ICL MCQ k=3, random demos" from a 03_icl setting record (its name alone hides the controls)."""
    if not setting.get("k"):
        return "ICL zero-shot"
    fmt = "MCQ" if setting.get("fmt") == "mcq" else str(setting.get("fmt"))
    return f"ICL {fmt} k={setting['k']}{ICL_DEMOS.get(setting.get('demos'), ', ' + str(setting.get('demos')))}"


def icl_order(setting: dict) -> tuple:
    """Zero-shot, then naive before MCQ demos, k ascending, the retrieved demos before their controls."""
    demos = ("retrieved", "random", "label_shuffled")
    return (bool(setting.get("k")), setting.get("fmt") != "naive", setting.get("k") or 0,
            demos.index(setting.get("demos")) if setting.get("demos") in demos else -1)


def icl_methods(m: dict, where: Path, refs: dict) -> list[Method]:
    """Every 03_icl setting (the base model with demos), the one fixed in advance marked best; latency is the
    stage's per-item cost, which includes the demos' extra images and tokens."""
    out = []
    for name, s in sorted(m.get("settings", {}).items(), key=lambda kv: icl_order(kv[1].get("setting", {}))):
        latency = s.get("cost", {}).get("latency_s")
        out.append(_method(f"03_icl/{name}", icl_label(s.get("setting", {"k": 0})), "ICL", "student", s["eval"],
                           where, ref=refs.get("student"), latency_s=latency, best=name == m.get("best")))
    return out


KD_LABELS = {"sft": "KD: CE only (control)", "logit_kd": "KD: logit", "attn_kd": "KD: attention + CE",
             "combined": "KD: combined (attn + logit)"}
KD_SETTINGS = {"full": "", "scarce": ", scarce data", "extra": ", extra budget"}


def kd_order(arm: dict) -> tuple:
    """Full data, scarce data, then the extra-budget control; CE, logit, attention, combined within each."""
    settings, losses = tuple(KD_SETTINGS), tuple(KD_LABELS)
    return tuple(t.index(x) if x in t else 9 for t, x in ((settings, arm["setting"]), (losses, arm["loss"])))


def distill_methods(m: dict, where: Path, refs: dict) -> list[Method]:
    """Every 04_distill student arm (the pre-declared best marked) and its frozen fine-tuned teacher, which is
    compared with the teacher base."""
    out = []
    for name, a in sorted(m.get("arms", {}).items(), key=lambda kv: kd_order(kv[1]["arm"])):
        arm = a["arm"]
        label = KD_LABELS.get(arm["loss"], arm["loss"]) + KD_SETTINGS.get(arm["setting"], f", {arm['setting']}")
        cost = a.get("cost", {})
        out.append(_method(f"04_distill/{name}", label, "KD", "student", a["eval"], where, ref=refs.get("student"),
                           params=cost.get("params"), latency_s=cost.get("latency_s"), best=name == m.get("best")))
    if "teacher" in m:
        cost = m["teacher"].get("cost", {})
        out.append(_method("04_distill/teacher", "KD: teacher (fine-tuned, frozen)", "KD", "teacher",
                           m["teacher"]["eval"], where, ref=refs.get("teacher"), params=cost.get("params"),
                           latency_s=cost.get("latency_s")))
    return out


def summary_from_predictions(compact: dict, records: list, where: Path) -> dict:
    """An evaluation summary rebuilt from a prediction file (05_grayscale keeps only a compact one per condition):
    the same scoring.summarize the harness runs, on the rows of `records`."""
    from spatialstudy.evaluation.predictions import read_predictions, rows_for
    from spatialstudy.scoring import summarize

    s = localize(compact, where)
    rows = rows_for(read_predictions(s["predictions"], s.get("config_hash")), records)
    return {**summarize(rows), "predictions": s["predictions"], "config_hash": s.get("config_hash")}


def grayscale_methods(m: dict, where: Path, refs: dict, records: list | None) -> list[Method]:
    """The one new model of 05_grayscale, the gray-augmented SFT arm on original images (its blank-image run is its
    blind control); the stage's other models are earlier stages' and appear there."""
    entry = m.get("models", {}).get("gray_sft")
    if not entry or records is None or "original" not in entry.get("evals", {}):
        return []
    evals = entry["evals"]
    summary = summary_from_predictions(evals["original"], records, where)
    if "blind" in evals:
        summary["controls"] = {"blind": summary_from_predictions(evals["blind"], records, where)}
    return [_method("05_grayscale/gray_sft", entry.get("label", "SFT gray-augmented"), "colour", "student", summary,
                    where, ref=refs.get("student"), latency_s=evals["original"].get("latency_s"))]


def _gray_size(methods: list, sft_arm: str | None) -> None:
    """The gray-augmented arm has the size of the 02_sft arm whose recipe it repeats (only its images differ)."""
    by_key = {m.key: m for m in methods}
    gray, sft = by_key.get("05_grayscale/gray_sft"), by_key.get(f"02_sft/{sft_arm}")
    if gray and sft and gray.params is None:
        gray.params = sft.params


def read_metrics(profile: str, status: dict) -> dict:
    """{stage: metrics.json} of every stage found."""
    return {s: runs.read_json(runs.run_dir(profile, s, create=False) / "metrics.json")
            for s, v in status.items() if v["found"]}


def collect(profile: str, build_missing: bool = False) -> Results:
    """Read every stage's run of `profile` into the methods table, with paired differences against the bases."""
    status = stage_status(profile, build_missing)
    res = Results(profile, status, read_metrics(profile, status), item_records(profile))
    where = {s: runs.run_dir(profile, s, create=False) for s in STAGES}
    mets = res.metrics
    base = baseline_methods(mets["baseline"], where["baseline"]) if "baseline" in mets else []
    refs = base_refs({x.key: x for x in base})
    readers = {"02_sft": sft_methods, "03_icl": icl_methods, "04_distill": distill_methods}
    found_methods = base + [x for s, read in readers.items() if s in mets for x in read(mets[s], where[s], refs)]
    if "05_grayscale" in mets:
        found_methods += grayscale_methods(mets["05_grayscale"], where["05_grayscale"], refs, res.records)
        _gray_size(found_methods, runs.read_json(where["05_grayscale"] / "config.json").get("sft_arm"))
    res.methods = {x.key: x for x in found_methods}
    res.paired = {k: pair_method(res, x) for k, x in res.methods.items()}
    res.notes += [f"{res.methods[k].label}, {which}: paired differences unavailable ({d['error']})"
                  for k, p in res.paired.items() for which, d in p.items() if "error" in d]
    if res.records is None and res.methods:
        res.notes.append("no baseline eval_subset.json: paired differences need the baseline stage")
    return res


# ---------------------------------------------------------------- paired differences on shared items
@functools.lru_cache(maxsize=256)
def _file_keys(path: str, config_hash: str | None, mtime: float) -> frozenset:
    """Keys of one file version; the modification time in the cache key keeps a rewritten file from being stale."""
    from spatialstudy.evaluation.predictions import read_predictions

    return frozenset((r["task_type"], r["id"]) for r in read_predictions(path, config_hash))


def item_keys(summary: dict) -> frozenset:
    """The (task_type, id) keys a summary's prediction file holds (cached per file version)."""
    path = Path(summary["predictions"])
    if not path.exists():
        return frozenset()
    return _file_keys(str(path), summary.get("config_hash"), path.stat().st_mtime)


def paired_shared(a: dict, b: dict, records: list | None) -> dict:
    """a minus b (compare.paired_by_partition) on the items both prediction files cover: ICL runs a stratified part
    of the subset the bases ran. {} when there is nothing to pair; {"error": why} when the files cannot be read."""
    if records is None:
        return {}
    try:
        shared = item_keys(a) & item_keys(b)
        return paired_by_partition(a, b, [r for r in records if r.key in shared])
    except (ValueError, OSError, KeyError) as err:
        return {"error": f"{type(err).__name__}: {err}"}


def pair_method(res: Results, m: Method) -> dict:
    """The method against its base and against its own blind control, by partition."""
    out = {"vs_ref": {}, "vs_blind": {}}
    if m.ref and m.ref in res.methods:
        out["vs_ref"] = paired_shared(m.summary, res.methods[m.ref].summary, res.records)
    blind = m.summary.get("controls", {}).get("blind")
    if blind:
        out["vs_blind"] = paired_shared(m.summary, blind, res.records)
    return out


# ---------------------------------------------------------------- the tables
def blocks(summary: dict | None) -> dict:
    """{partition: accuracy block (n, accuracy, ci95)} of an evaluation summary: overall, then each partition."""
    if not summary:
        return {}
    s = summary["scorers"]["official"]
    return {"overall": {k: s[k] for k in ("n", "accuracy", "ci95")}, **s.get("by_partition", {})}


def label(m: Method) -> str:
    """The method's label, starred when its stage fixed it in advance as best."""
    return m.label + (" *" if m.best else "")


def table_rows(res: Results) -> list[dict]:
    """The long table: one row per method and partition, with its blind control and its paired differences."""
    rows = []
    for key, m in res.methods.items():
        acc, blind = blocks(m.summary), blocks(m.summary.get("controls", {}).get("blind"))
        for part in PARTITIONS:
            if part not in acc:
                continue
            rows.append({"key": key, "method": m.label, "group": m.group, "best": m.best, "partition": part,
                         "n": acc[part]["n"], "accuracy": acc[part]["accuracy"], "ci95": acc[part]["ci95"],
                         "blind": (blind.get(part) or {}).get("accuracy"),
                         "blind_ci95": (blind.get(part) or {}).get("ci95"),
                         "ref": res.methods[m.ref].label if m.ref in res.methods else None,
                         "vs_ref": res.paired[key]["vs_ref"].get(part),
                         "vs_blind": res.paired[key]["vs_blind"].get(part)})
    return rows


def fmt_acc(acc: float | None, ci=None) -> str:
    """"32.6 [30.2, 34.7]" (the CI when given), "-" for no number."""
    if acc is None or (isinstance(acc, float) and math.isnan(acc)):
        return "-"
    return f"{acc:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def fmt_pair(d: dict | None) -> str:
    """A paired difference as text ("+1.2 [-0.3, +2.8] p 0.041"; p where an exact McNemar p was recorded), "-" when
    there is none."""
    if not d or d.get("diff") is None:
        return "-"
    ci = f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d.get("ci95") else ""
    return f"{d['diff']:+.1f}{ci}" + (f" p {d['p_mcnemar']:.3f}" if d.get("p_mcnemar") is not None else "")


def table_text(res: Results) -> str:
    """The long table as monospaced text (the notebook's view; the HTML report pivots it)."""
    head = (f"{'method':<40} {'partition':<19} {'n':>5} {'accuracy [95% CI]':<20} {'blind':>6} "
            f"{'image - blind (paired)':<28} {'minus base (paired, same items)':<28}")
    lines = [head, "-" * len(head)]
    for r in table_rows(res):
        name = r["method"] + (" *" if r["best"] else "")
        lines.append(f"{name:<40} {PARTITION_LABELS[r['partition']]:<19} {r['n']:>5} "
                     f"{fmt_acc(r['accuracy'], r['ci95']):<20} {fmt_acc(r['blind']):>6} "
                     f"{fmt_pair(r['vs_blind']):<28} {fmt_pair(r['vs_ref']):<28}".rstrip())
    lines.append("* fixed in advance as the best setting of its stage (03_icl best ICL, 04_distill best KD)")
    return "\n".join(lines)


def refs_text(res: Results) -> str:
    """Which base each method's paired difference is taken against (student methods: the student base)."""
    by_ref = {}
    for m in res.methods.values():
        if m.ref in res.methods:
            by_ref.setdefault(res.methods[m.ref].label, []).append(m.label)
    return "\n".join(f"minus {ref}: {', '.join(names)}" for ref, names in by_ref.items())


def best_methods(res: Results) -> dict:
    """{"ICL": label, "KD": label} of the settings the stages fixed in advance."""
    return {m.group: m.label for m in res.methods.values() if m.best}


def breakdown(res: Results, kind: str, min_n: int = 0) -> tuple[list[str], dict]:
    """(columns, {method label: {column: block}}) of the official scorer's by_task_type or by_family blocks; a
    family with fewer than `min_n` items for a method is left out (the summaries pool those already)."""
    table = {}
    for m in res.methods.values():
        got = m.summary["scorers"]["official"].get(kind, {})
        table[label(m)] = {g: b for g, b in got.items() if b["n"] >= min_n}
    cols = sorted({g for row in table.values() for g in row}, key=lambda g: (g.startswith("other"), g))
    return cols, {k: v for k, v in table.items() if v}


def breakdown_text(res: Results, kind: str, min_n: int = 0) -> str:
    """The breakdown as monospaced text: accuracy (n) per method and group."""
    cols, table = breakdown(res, kind, min_n)
    if not cols:
        return f"(no {kind} blocks in the summaries)"
    width = max(12, *(min(len(c), 30) for c in cols))
    lines = [f"{'method':<40} " + " ".join(f"{c[:width]:>{width}}" for c in cols)]
    for name, row in table.items():
        cells = [f"{row[c]['accuracy']:.1f} (n {row[c]['n']})" if c in row else "-" for c in cols]
        lines.append(f"{name:<40} " + " ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------- the study's numbers beside ours
def profile_label(res: Results) -> str:
    """What our numbers were measured with: the embedded default (tiny models, procedural scenes) or real weights."""
    models = res.metrics.get("baseline", {}).get("models", {})
    real = [Path(models[n]["spec"]).name for n in REAL_NAMES.values() if n in models and models[n].get("spec")]
    if real:
        return f"{res.profile}: real weights ({' / '.join(real)})"
    return f"{res.profile}: embedded default (tiny models on procedural scenes)"


def study_rows(res: Results) -> list[dict]:
    """One row per figure the study reports, with our counterpart (first of its candidates that ran)."""
    rows = []
    for name, value, setup, candidates in STUDY:
        ours = next((res.methods[f"{s}/{n}"] for s, n in candidates if f"{s}/{n}" in res.methods), None)
        block = blocks(ours.summary)["overall"] if ours else None
        rows.append({"study": name, "study_accuracy": value, "study_setup": setup,
                     "ours_method": ours.label if ours else None, "ours_accuracy": block and block["accuracy"],
                     "ours_ci95": block and block["ci95"], "ours_n": block and block["n"],
                     "ours_label": profile_label(res),
                     "missing": None if ours else f"{candidates[0][0]} ({candidates[0][1]})"})
    return rows


def study_text(res: Results) -> str:
    """The study's figures beside ours as text, each with what the study measured it on."""
    lines = [f"{'the study (reported)':<16} {'%':>6}   {'ours: ' + profile_label(res)}"]
    for r in study_rows(res):
        ours = (f"{r['ours_method']}: {fmt_acc(r['ours_accuracy'], r['ours_ci95'])} (n {r['ours_n']})"
                if r["ours_method"] else f"not run: {r['missing']}")
        lines.append(f"{r['study']:<16} {r['study_accuracy']:>6.2f}   {ours}")
        lines.append(f"{'':<16} {'':>6}   measured on (study): {r['study_setup']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- per research question: numbers from the runs
def _stored_pair(metrics: dict, name: str, part: str = "overall") -> str:
    return fmt_pair((metrics.get("paired", {}).get(name) or {}).get(part))


def _vs(res: Results, key: str, which: str = "vs_ref", part: str = "overall") -> str:
    return fmt_pair(res.paired.get(key, {}).get(which, {}).get(part))


def rq_sft(res: Results) -> list[str]:
    """Each SFT arm against its base (overall and retention), against its blind control, and its parse failures."""
    lines = []
    for k, m in res.methods.items():
        if m.stage == "02_sft" and m.group == "SFT":
            ref = res.methods[m.ref].label if m.ref in res.methods else "base"
            lines.append(f"{m.label}: minus {ref} {_vs(res, k)} overall, {_vs(res, k, part='base')} on retention; "
                         f"image - blind {_vs(res, k, 'vs_blind')}; unparsed "
                         f"{m.summary['scorers']['official']['parse_failure_rate']:.1f}%")
    return lines


def rq_icl(res: Results) -> list[str]:
    """Each ICL setting against the student base; the best against zero-shot (latency too) and its two controls."""
    m = res.metrics["03_icl"]
    best = m.get("best")
    lines = [f"{res.methods[k].label}: minus student base {_vs(res, k)} overall; image - blind "
             f"{_vs(res, k, 'vs_blind')}" for k in res.methods if k.startswith("03_icl/")]
    if best in m.get("settings", {}):
        b = m["settings"][best]
        ratio = m.get("latency_ratio", {}).get(best, {}).get("vs_zero_shot", float("nan"))
        lines.append(f"best ({best}, fixed in advance) minus zero-shot: "
                     f"{fmt_pair(b.get('vs_zero_shot', {}).get('overall'))}; latency x{ratio:.2f} of zero-shot")
        for ctl in ("random", "shuffled"):
            key = f"03_icl/{best}_{ctl}"
            if key in res.methods:
                d = paired_shared(res.methods[key].summary, res.methods[f"03_icl/{best}"].summary, res.records)
                lines.append(f"{best}_{ctl} minus {best}: {fmt_pair(d.get('overall'))}")
    return lines


def rq_kd(res: Results) -> list[str]:
    """The teacher gate, then the stage's own paired differences between the arms (as 04_distill computed them)."""
    m = res.metrics["04_distill"]
    gate, best = m.get("gate", {}), m.get("best")
    lines = [f"teacher gate: teacher minus student {fmt_pair(gate.get('paired', {}).get('overall'))} on "
             f"{gate.get('n_dev')} dev items, detectable {gate.get('detectable', float('nan')):.1f} points: "
             f"{'testable' if gate.get('testable') else 'NOT testable'}"]
    for name in (f"{best} - sft", "logit_kd - sft", "attn_kd - sft", "combined_scarce - sft_scarce", "sft_extra - sft",
                 f"teacher - {best}"):
        if name in m.get("paired", {}):
            lines.append(f"{name}: {_stored_pair(m, name)}")
    return list(dict.fromkeys(lines))


def rq_colour(res: Results) -> list[str]:
    """Each model's change with gray and hue-permuted images per split, the 2 x 2 interaction, what was not run."""
    m = res.metrics["05_grayscale"]
    labels = {n: e.get("label", n) for n, e in m.get("models", {}).items()}
    lines = []
    for name, changes in sorted(m.get("paired", {}).items(), key=lambda kv: _rank(GRAY_MODELS, kv[0])):
        for change, by_split in changes.items():
            cells = [f"{split} {fmt_pair(by_split[split].get('overall'))}" for split in
                     ("all questions", "non-colour questions", "colour needed") if split in by_split]
            lines.append(f"{labels.get(name, name)}, {change}: " + "; ".join(cells))
    for split, t in (m.get("two_by_two") or {}).items():
        lines.append(f"2 x 2 interaction (what gray-augmentation saves), {split}: {fmt_pair(t.get('interaction'))}")
    lines += [f"not evaluated: {name}: {why}" for name, why in {**m.get("skipped", {}),
                                                                 **m.get("not_evaluated", {})}.items()]
    return lines


RQ_STAGES = {"sft": "02_sft", "icl": "03_icl", "kd": "04_distill", "colour": "05_grayscale"}
RQ_NUMBERS = {"sft": rq_sft, "icl": rq_icl, "kd": rq_kd, "colour": rq_colour}


def rq_lines(res: Results, rq: str) -> list[str]:
    """The question's key numbers from its stage's run, or the line saying the stage is missing."""
    stage = RQ_STAGES[rq]
    if stage not in res.metrics:
        return [f"{stage} has not run for {res.profile}: {command(res.profile, stage)}"]
    return RQ_NUMBERS[rq](res)


# ---------------------------------------------------------------- the colour stage's table
GRAY_MODELS = ("student_base", "sft", "gray_sft", "best_icl", "best_kd")
GRAY_CONDITIONS = ("original", "grayscale", "hue_permuted", "blind")


def _rank(order: tuple, name: str) -> tuple:
    """Sort key: the names of `order` in its order, any other after them by name."""
    return (order.index(name), "") if name in order else (len(order), name)


def grayscale_rows(res: Results) -> list[dict]:
    """Per model and split of 05_grayscale: accuracy under each image condition and the paired changes."""
    m = res.metrics.get("05_grayscale")
    if not m:
        return []
    rows = []
    for name, by_split in sorted(m.get("accuracy", {}).items(), key=lambda kv: _rank(GRAY_MODELS, kv[0])):
        for split, conds in by_split.items():
            changes = m.get("paired", {}).get(name, {})
            rows.append({"model": m["models"].get(name, {}).get("label", name), "split": split,
                         "n": next(iter(conds.values()))["n"] if conds else 0,
                         "conditions": {c: (conds[c]["accuracy"], conds[c]["ci95"])
                                        for c in sorted(conds, key=lambda c: _rank(GRAY_CONDITIONS, c))},
                         "changes": {c: (v.get(split) or {}).get("overall") for c, v in changes.items()}})
    return rows


def grayscale_text(res: Results) -> str:
    """The 05_grayscale table as text, or the line saying the stage is missing."""
    rows = grayscale_rows(res)
    if not rows:
        return "\n".join(rq_lines(res, "colour"))
    conds = list(dict.fromkeys(c for r in rows for c in r["conditions"]))
    changes = list(dict.fromkeys(c for r in rows for c in r["changes"]))
    lines = [f"{'model':<34} {'split':<22} {'n':>4} " + " ".join(f"{c:>18}" for c in conds) + " "
             + " ".join(f"{c:<30}" for c in changes)]
    for r in rows:
        lines.append(f"{r['model'][:34]:<34} {r['split']:<22} {r['n']:>4} "
                     + " ".join(f"{fmt_acc(*r['conditions'].get(c, (None,))):>18}" for c in conds) + " "
                     + " ".join(f"{fmt_pair(r['changes'].get(c)):<30}" for c in changes))
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------- figures
def _palette() -> dict:
    """One colour per method group, shared by every figure."""
    import seaborn as sns

    return dict(zip(GROUPS, sns.color_palette("colorblind", len(GROUPS))))


def _chance(res: Results) -> dict:
    """The baseline's chance level per partition (items differ in options per partition), where recorded."""
    targets = res.metrics.get("baseline", {}).get("targets", {})
    return targets.get("chance_by_partition") or ({"overall": targets["chance"]} if "chance" in targets else {})


def _parts(res: Results) -> list[str]:
    """The partitions any method has (real OmniSpatial data has only "overall")."""
    return [p for p in PARTITIONS if any(p in blocks(m.summary) for m in res.methods.values())]


def _save(res: Results, fig, name: str):
    """Save as reports/figures/<profile>/results_<name>.{png,svg} and remember the PNG for the report."""
    from spatialstudy import plotting

    res.figures[name] = plotting.savefig(fig, f"results_{name}", res.profile)[0]
    return fig


def _method_axes(res: Results, title: str):
    """One panel per partition sharing the methods' axis (first method on top)."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.setup_style()
    parts, n = _parts(res), len(res.methods)
    fig, axes = plt.subplots(1, len(parts), sharey=True, squeeze=False,
                             figsize=(2.3 * len(parts) + 2.6, 0.24 * n + 1.3))
    axes = axes[0]
    axes[0].set_yticks(range(n), [label(m) for m in res.methods.values()], fontsize=7)
    axes[0].set_ylim(n - 0.5, -0.5)
    for ax, part in zip(axes, parts):
        ax.set_title(PARTITION_LABELS[part], fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig, axes, parts


def _errorbar(ax, x, y, ci, colour, **kw):
    """One horizontal point with its CI whiskers."""
    ax.errorbar([x], [y], xerr=[[x - ci[0]], [ci[1] - x]] if ci else None, fmt="o", ms=3.5, capsize=1.5, lw=0.8,
                color=colour, **kw)


def _span(res: Results, chance: dict) -> tuple[float, float]:
    """An accuracy axis over every CI and chance level with a margin (within 0-100), so differences of a few
    points stay visible."""
    values = list(chance.values())
    for m in res.methods.values():
        for s in (m.summary, m.summary.get("controls", {}).get("blind")):
            values += [v for b in blocks(s).values() if b.get("ci95") for v in b["ci95"]]
    return (max(0.0, min(values) - 3), min(100.0, max(values) + 3)) if values else (0.0, 100.0)


def accuracy_figure(res: Results):
    """Accuracy (95% CI) per method and partition, its blind control hollow just below, the chance level dashed."""
    fig, axes, parts = _method_axes(res, "accuracy (official scorer, 95% CI); hollow: the same model on blank images")
    colours, chance = _palette(), _chance(res)
    for ax, part in zip(axes, parts):
        for i, m in enumerate(res.methods.values()):
            acc, blind = blocks(m.summary).get(part), blocks(m.summary.get("controls", {}).get("blind")).get(part)
            if acc and acc["accuracy"] is not None:
                _errorbar(ax, acc["accuracy"], i - 0.12, acc["ci95"], colours[m.group])
            if blind and blind["accuracy"] is not None:
                _errorbar(ax, blind["accuracy"], i + 0.22, blind["ci95"], colours[m.group], mfc="white", alpha=0.8)
        if part in chance:
            ax.axvline(chance[part], ls="--", c="0.4", lw=0.8)
        ax.set(xlim=_span(res, chance), xlabel="accuracy (%)")
    fig.tight_layout()
    return _save(res, fig, "accuracy")


def paired_figure(res: Results):
    """Each method minus its base on the same items (bootstrap CI over images) per partition; 0 = no change."""
    fig, axes, parts = _method_axes(res, "minus its base on the same items (points, 95% CI); student methods: the "
                                         "student base, teachers: the teacher base")
    colours = _palette()
    for ax, part in zip(axes, parts):
        for i, (k, m) in enumerate(res.methods.items()):
            d = res.paired[k]["vs_ref"].get(part)
            if d and d.get("diff") is not None:
                _errorbar(ax, d["diff"], i, d["ci95"], colours[m.group])
        ax.axvline(0, c="0.3", lw=0.8)
        ax.set(xlabel="difference (points)")
    fig.tight_layout()
    return _save(res, fig, "paired")


def _cost_points(res: Results, attr: str, scale: float) -> list[tuple]:
    """(number, x, accuracy block, method) of every method with a recorded cost; the number is the method's place
    in the table, the figure's key."""
    return [(i, getattr(m, attr) * scale, blocks(m.summary)["overall"], m)
            for i, m in enumerate(res.methods.values(), start=1)
            if getattr(m, attr) and blocks(m.summary).get("overall", {}).get("accuracy") is not None]


def cost_figure(res: Results):
    """Overall accuracy (95% CI) against per-item latency and against parameters: what ICL's demos cost in time and
    what the teacher costs in size, beside the distilled students. Points carry their number in the key on the
    right (a score of methods at nearly one cost leaves no room for names); stars: the settings fixed as best."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.setup_style()
    colours = _palette()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1, 0.55]})
    for ax, (attr, scale) in zip(axes, (("latency_s", 1e3), ("params", 1e-6))):
        for i, x, acc, m in _cost_points(res, attr, scale):
            ax.errorbar([x], [acc["accuracy"]], yerr=[[acc["accuracy"] - acc["ci95"][0]],
                                                      [acc["ci95"][1] - acc["accuracy"]]],
                        fmt="*" if m.best else "o", ms=8 if m.best else 4, capsize=1.5, lw=0.6, alpha=0.85,
                        color=colours[m.group])
            ax.annotate(str(i), (x, acc["accuracy"]), fontsize=6, xytext=(3, 1), textcoords="offset points")
        ax.set_xscale("log")
    axes[0].set(xlabel="latency per item (ms, batched as each stage ran)", ylabel="overall accuracy (%)",
                title="accuracy against latency")
    axes[1].set(xlabel="parameters (millions; unmerged LoRA counted)", title="accuracy against size")
    _cost_key(axes[2], res, colours)
    fig.tight_layout()
    return _save(res, fig, "cost")


def _cost_key(ax, res: Results, colours: dict) -> None:
    """The numbered list of methods, each in its group's colour."""
    ax.axis("off")
    n = len(res.methods)
    for i, m in enumerate(res.methods.values(), start=1):
        ax.text(0, 1 - (i - 0.5) / max(n, 12), f"{i:>2}  {label(m)}", fontsize=6.5, color=colours[m.group],
                va="center", transform=ax.transAxes)


def task_type_figure(res: Results):
    """Accuracy per task type (rows: methods), the official scorer's by_task_type blocks."""
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    from spatialstudy import plotting

    plotting.setup_style()
    cols, table = breakdown(res, "by_task_type")
    grid = np.array([[row[c]["accuracy"] if c in row else np.nan for c in cols] for row in table.values()], float)
    fig, ax = plt.subplots(figsize=(1.3 * max(1, len(cols)) + 3.2, 0.24 * len(table) + 1.4))
    sns.heatmap(grid, annot=True, fmt=".0f", cmap="viridis", ax=ax, cbar_kws={"label": "accuracy (%)"},
                xticklabels=[c.replace("_", " ") for c in cols], yticklabels=list(table), annot_kws={"fontsize": 6})
    ax.tick_params(labelsize=7)
    ax.set_title("accuracy per task type (official scorer)", fontsize=9)
    fig.tight_layout()
    return _save(res, fig, "task_types")


def _condition_bars(ax, models: list, conds: list) -> None:
    """Grouped bars: one group per model, one bar (95% CI) per image condition it was evaluated under."""
    import numpy as np

    width = 0.8 / max(1, len(conds))
    for j, c in enumerate(conds):
        acc = np.array([r["conditions"].get(c, (np.nan, None))[0] for r in models], float)
        err = np.array([[a - r["conditions"][c][1][0], r["conditions"][c][1][1] - a]
                        if r["conditions"].get(c, (None, None))[1] else [0, 0] for a, r in zip(acc, models)]).T
        ax.bar(np.arange(len(models)) + (j - (len(conds) - 1) / 2) * width, acc, width, yerr=err, capsize=2, label=c)
    ax.set_xticks(np.arange(len(models)), [r["model"].replace(" (", "\n(") for r in models], fontsize=7)


def grayscale_figure(res: Results):
    """05_grayscale: each model's accuracy (95% CI) under every image condition, on all and on non-colour questions
    (the study's two figures), the split's chance level dashed."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    rows = [r for r in grayscale_rows(res) if r["split"] in ("all questions", "non-colour questions")]
    if not rows:
        return None
    plotting.setup_style()
    splits = list(dict.fromkeys(r["split"] for r in rows))
    conds = list(dict.fromkeys(c for r in rows for c in r["conditions"]))
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.4), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        models = [r for r in rows if r["split"] == split]
        _condition_bars(ax, models, conds)
        chance = (res.metrics["05_grayscale"].get("chance") or {}).get(split)
        if chance is not None:
            ax.axhline(chance, ls="--", c="0.3", lw=1, label="chance")
        ax.set(title=f"{split} (n {models[0]['n']})", ylim=(0, 100))
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(res, fig, "grayscale")


FIGURES = {"accuracy": accuracy_figure, "paired": paired_figure, "cost": cost_figure, "task_types": task_type_figure,
           "grayscale": grayscale_figure}


def make_figures(res: Results, names=None) -> None:
    """Build (and save) every figure not built yet, then close them: the report reads the saved PNGs."""
    import matplotlib.pyplot as plt

    for name, fn in FIGURES.items():
        if name not in res.figures and (names is None or name in names) and res.methods:
            fig = fn(res)
            if fig is not None:
                plt.close(fig)


# ---------------------------------------------------------------- the HTML report
CSS = """body{font-family:system-ui,sans-serif;max-width:1500px;margin:2em auto;padding:0 1em;color:#222;
line-height:1.45}
.wide{overflow-x:auto}table{border-collapse:collapse;font-size:11.5px;margin:.6em 0 1.2em}
td,th{border:1px solid #ccc;padding:2px 5px;text-align:left;vertical-align:top}th{background:#f2f2f2}
td.num{text-align:right;white-space:nowrap}td:first-child{white-space:nowrap;text-align:left}tr.best td{font-weight:600}
img{max-width:min(100%,1150px);border:1px solid #eee}
.missing{color:#a40}.note{color:#555;font-size:13px}figcaption{margin-bottom:1em}"""
NUMERIC = re.compile(r"^([-+]?\d|-$)")


def html_table(header: list, rows: list, classes: list | None = None, groups: list | None = None) -> str:
    """A plain HTML table, every cell escaped, numbers right-aligned; `groups` = [(label, columns spanned)] adds a
    header row above `header`."""
    top = "<tr>" + "".join(f"<th colspan='{n}'>{html.escape(g)}</th>" for g, n in groups) + "</tr>" if groups else ""
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join(f"<tr class='{c}'>" + "".join(
        f"<td{' class=num' if NUMERIC.match(str(x)) else ''}>{html.escape(str(x))}</td>" for x in r) + "</tr>"
                   for r, c in zip(rows, classes or [""] * len(rows)))
    return f"<div class='wide'><table>{top}{head}{body}</table></div>"


def html_figure(res: Results, name: str, caption: str) -> str:
    """A saved figure embedded as base64 PNG (the report opens without its figure files)."""
    path = res.figures.get(name)
    if not path or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>" \
           f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>"


def html_main_table(res: Results) -> str:
    """One row per method; per partition its accuracy [CI], its blind control and its paired difference to its base
    (the student base for student methods, the teacher base for teachers: refs_text lists them)."""
    parts = _parts(res)
    header = ["method", "n"] + [c for _ in parts for c in ("accuracy [95% CI]", "blind", "minus its base")]
    groups = [("", 2)] + [(PARTITION_LABELS[p], 3) for p in parts]
    rows, classes = [], []
    for k, m in res.methods.items():
        acc, blind = blocks(m.summary), blocks(m.summary.get("controls", {}).get("blind"))
        cells = [label(m), acc["overall"]["n"]]
        for p in parts:
            cells += [fmt_acc(acc[p]["accuracy"], acc[p]["ci95"]) if p in acc else "-",
                      fmt_acc((blind.get(p) or {}).get("accuracy")), fmt_pair(res.paired[k]["vs_ref"].get(p))]
        rows.append(cells)
        classes.append("best" if m.best else "")
    return html_table(header, rows, classes, groups)


def html_breakdown(res: Results, kind: str, min_n: int = 0) -> str:
    """The breakdown as an HTML table: accuracy (n) per method and group."""
    cols, table = breakdown(res, kind, min_n)
    if not cols:
        return f"<p class='note'>No {kind} blocks in the summaries.</p>"
    rows = [[name] + [f"{row[c]['accuracy']:.1f} (n {row[c]['n']})" if c in row else "-" for c in cols]
            for name, row in table.items()]
    return html_table(["method"] + [c.replace("_", " ") for c in cols], rows)


def html_study(res: Results) -> str:
    """The study's figures (labelled as the study's, with what they were measured on) beside ours."""
    rows = [[r["study"], f"{r['study_accuracy']:.2f}", r["study_setup"],
             r["ours_method"] or f"not run ({r['missing']})",
             fmt_acc(r["ours_accuracy"], r["ours_ci95"]) if r["ours_method"] else "-", r["ours_n"] or "-"]
            for r in study_rows(res)]
    return html_table(["study's row", "study's figure (%)", "study: measured on",
                       f"ours ({profile_label(res)})", "ours: accuracy [95% CI]", "ours: n"], rows)


def html_grayscale(res: Results) -> str:
    """The 05_grayscale table and figure, or the line saying the stage is missing."""
    rows = grayscale_rows(res)
    if not rows:
        return "".join(f"<p class='missing'>{html.escape(x)}</p>" for x in rq_lines(res, "colour"))
    conds = list(dict.fromkeys(c for r in rows for c in r["conditions"]))
    changes = list(dict.fromkeys(c for r in rows for c in r["changes"]))
    body = [[r["model"], r["split"], r["n"]] + [fmt_acc(*r["conditions"].get(c, (None,))) for c in conds]
            + [fmt_pair(r["changes"].get(c)) for c in changes] for r in rows]
    return html_table(["model", "split", "n"] + conds + [f"{c} (paired)" for c in changes], body) \
        + html_figure(res, "grayscale", "accuracy under each image condition (95% CI)")


def html_rq(res: Results) -> str:
    """Per research question its paragraph (and the real-weights note when it applies) and its numbers."""
    real = "real weights" in profile_label(res)
    out = []
    for rq, (title, text) in RQ_TEXT.items():
        lines = "".join(f"<li>{html.escape(x)}</li>" for x in rq_lines(res, rq))
        extra = f"<p class='note'>{html.escape(REAL_NOTE)}</p>" if real else ""
        out.append(f"<h3>{html.escape(title)}</h3><p>{html.escape(text)}</p>{extra}<ul>{lines}</ul>")
    return "".join(out)


def stage_times(profile: str) -> dict:
    """{stage: seconds} as the runner recorded them (reports/<profile>/timings.json: the last run of each stage)."""
    path = runs.root() / "reports" / profile / "timings.json"
    return runs.read_json(path) if path.exists() else {}


def html_times(res: Results) -> str:
    times = stage_times(res.profile)
    if not times:
        return ("<p class='missing'>No stage times recorded: the runner (python -m spatialstudy.run) writes them to "
                f"reports/{html.escape(res.profile)}/timings.json.</p>")
    order = {s: i for i, s in enumerate(["01_data", *STAGES, STAGE])}   # the runner's order; others after them
    times = dict(sorted(times.items(), key=lambda kv: order.get(kv[0], len(order))))
    rows = [[stage, f"{t:.0f}", f"{t / 60:.1f}"] for stage, t in times.items()]
    total = sum(times.values())
    return html_table(["stage", "seconds", "minutes"], rows + [["all recorded", f"{total:.0f}", f"{total / 60:.1f}"]]) \
        + ("<p class='note'>Wall time of each stage's last run through the runner (a stage resumed from cached arms "
           "takes less than a fresh one); this stage's own time is recorded when it ends.</p>")


def html_report(res: Results) -> str:
    """The whole report as one self-contained HTML page (figures inline, no external files)."""
    make_figures(res)
    stages = "".join(f"<li class='{'' if res.status[s]['found'] else 'missing'}'>{html.escape(x)}</li>"
                     for s, x in zip(res.status, status_lines(res)))
    notes = "".join(f"<li>{html.escape(x)}</li>" for x in res.notes)
    best = ", ".join(f"{g}: {x}" for g, x in best_methods(res).items()) or "none found"
    sections = [
        f"<h1>Spatial reasoning study: results ({html.escape(res.profile)})</h1>",
        f"<p><b>{html.escape(profile_label(res))}</b>. Read from the runs under runs/{html.escape(res.profile)}/ "
        "(metrics.json and prediction files); nothing was re-evaluated. Accuracy is the OmniSpatial official scorer "
        "on the headline items, with a 95% bootstrap CI; 'blind' is the same model on blank images; a paired "
        "difference is on the items both runs cover (bootstrap CI over images, exact McNemar p). Partitions: "
        "retention = the base families, seen = the SFT training families, unseen = families in no training data.</p>",
        f"<h2>Stages</h2><ul>{stages}</ul>" + (f"<ul class='note'>{notes}</ul>" if notes else ""),
        "<h3>Time per stage</h3>", html_times(res),
        "<h2>Every method by partition</h2>",
        f"<p class='note'>Bold rows (*) were fixed in advance as the stage's best ({html.escape(best)}). Student "
        "methods are compared with the student base, the teachers with the teacher base; ICL ran on a stratified part "
        "of the items (n), and its paired differences use those items only.</p>",
        html_main_table(res),
        html_figure(res, "accuracy", "accuracy per method and partition; hollow markers: the blind control"),
        html_figure(res, "paired", "each method minus its base on the same items"),
        "<h2>Accuracy against cost</h2>",
        "<p class='note'>Latency is the mean per-item wall time of each stage's batched evaluation (batch sizes and "
        "machine load differ between stages: compare within a stage first). ICL's latency includes its demos.</p>",
        html_figure(res, "cost", "overall accuracy against latency and against parameters"),
        "<h2>Per task type</h2>", html_breakdown(res, "by_task_type"),
        html_figure(res, "task_types", "accuracy per task type"),
        f"<h2>Per question family (n &ge; {FAMILY_MIN_N})</h2>", html_breakdown(res, "by_family", FAMILY_MIN_N),
        "<h2>Colour (05_grayscale)</h2>", html_grayscale(res),
        "<h2>The study's numbers beside ours</h2>",
        "<p class='note'>The left columns are the study's reported figures (VLAA-Thinker checkpoints), not ours; they "
        "are on other models and other item sets and are not comparable with the embedded default's numbers.</p>",
        html_study(res),
        "<h2>What these runs can and cannot say</h2>", html_rq(res),
        f"<p class='note'>Rebuild: python -m spatialstudy.run --profile {html.escape(res.profile)} --only {STAGE}</p>",
    ]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Results {html.escape(res.profile)}"
            f"</title><style>{CSS}</style></head><body>{''.join(sections)}</body></html>\n")


def report_path(profile: str) -> Path:
    """reports/results_<profile>.html; the ci tier writes under runs/ci/ so tests never touch reports/."""
    if profile == "ci":
        return runs.root() / "runs" / "ci" / "results_ci.html"
    return runs.root() / "reports" / f"results_{profile}.html"


def write_report(res: Results) -> Path:
    """Write the report atomically, so a reader never opens half a page."""
    return runs.atomic_write_text(report_path(res.profile), html_report(res))


# ---------------------------------------------------------------- the stage
def _relative(path: Path) -> str:
    """A path relative to the project root where it lies inside it (metrics that do not depend on the checkout)."""
    try:
        return str(Path(path).resolve().relative_to(runs.root()))
    except ValueError:
        return str(path)


def run_metrics(res: Results, report: Path) -> dict:
    """What this stage records: which stages it found, every table row, the study table and its outputs."""
    return {"profile_label": profile_label(res),
            "stages": {s: {"found": v["found"], "command": v["command"]} for s, v in res.status.items()},
            "methods": {k: {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name != "summary"}
                        for k, m in res.methods.items()},
            "table": table_rows(res), "study": study_rows(res), "best": best_methods(res),
            "rq": {rq: rq_lines(res, rq) for rq in RQ_TEXT}, "report": _relative(report),
            "figures": {n: _relative(p) for n, p in res.figures.items()}}


def save(res: Results, cfg) -> dict:
    """Write the HTML report, then the stage's run (metrics.json last, as every stage)."""
    report = write_report(res)
    metrics = run_metrics(res, report)
    runs.save_run(res.profile, STAGE, dataclasses.asdict(cfg), metrics)
    return metrics


def run_results(profile: str, cfg) -> tuple[Results, dict]:
    """Everything at once (scripts): collect, figures, report, run."""
    res = collect(profile, cfg.build_missing_ci)
    return res, save(res, cfg)


def main(profile: str, params: dict) -> dict:
    """Entry point with params as papermill passes them (scripts)."""
    from spatialstudy.configs import ResultsConfig

    return run_results(profile, ResultsConfig.for_profile(profile, params, STAGE))[1]
