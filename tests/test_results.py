"""06_results reads hand-made runs (metrics.json + prediction files, built here in a temporary project root) into
the expected table: accuracies per partition, blind controls, paired differences against the base on shared items
(numbers computed by hand below), missing stages reported with their command, the study's figures, and an HTML
report with nothing outside itself."""
import json
import re

import nbformat
import pytest

from spatialstudy import runs
from spatialstudy.configs import ResultsConfig
from spatialstudy.methods import results
from spatialstudy.scoring import summarize

# 8 headline items (two task types; partitions base / sft / test_only) and one with its options drawn in the image,
# which the headline numbers leave out
ITEMS = [("Perspective_Taking", "0_0", "base"), ("Perspective_Taking", "1_0", "base"),
         ("Perspective_Taking", "2_0", "sft"), ("Perspective_Taking", "3_0", "test_only"),
         ("Spatial_Interaction", "0_0", "base"), ("Spatial_Interaction", "1_0", "base"),
         ("Spatial_Interaction", "2_0", "sft"), ("Spatial_Interaction", "3_0", "test_only")]
DRAWN = ("Perspective_Taking", "9_0", "base")
#                 items:  0  1  2  3  4  5  6  7
STUDENT_BASE = [1, 0, 1, 0, 1, 0, 0, 1]   # 50 overall; 50 in each partition
STUDENT_BLIND = [1, 0, 0, 0, 1, 0, 0, 0]
TEACHER_BASE = [0, 0, 0, 0, 1, 1, 1, 1]
SFT_ARM = [1, 1, 1, 0, 1, 1, 1, 1]        # 87.5 overall; base 100, sft 100, test_only 50
SFT_BLIND = [0, 0, 1, 0, 1, 0, 1, 0]      # 37.5
ICL_ITEMS = 4                             # ICL runs the first four items only (a stratified part, as at smoke)
ICL_ZERO = [1, 0, 1, 0]
ICL_MCQ = [0, 0, 1, 1]
GRAY_SFT = [1, 1, 0, 0, 1, 1, 0, 0]


def _rows(correct, items=ITEMS, chash="h"):
    """Prediction rows as the harness writes them (the fields scoring.summarize and pairing read); the drawn-options
    item is appended, right for every run, so leaving it out of the headline changes every number."""
    out = []
    for (task, iid, part), ok in zip(list(items) + [DRAWN], list(correct) + [1]):
        letter = "B" if ok else "C"
        out.append({"task_type": task, "id": iid, "sub_task_type": "Egocentric", "partition": part, "family": "f1",
                    "image": f"{task}/{iid.split('_')[0]}.png", "options_in_image": (task, iid, part) == DRAWN,
                    "truth": "B", "config_hash": chash, "raw": f"Answer: {letter}", "new_tokens": 4,
                    "prompt_tokens": 50, "latency_s": 0.01, "batch_size": 8, "pred_official": letter,
                    "parsed_official": True, "correct_official": bool(ok), "pred_lenient": letter,
                    "parsed_lenient": True, "correct_lenient": bool(ok)})
    return out


def _summary(run, name, correct, blind=None, items=ITEMS, params=1000):
    """Write predictions_<name>.jsonl (+ its blind file) into `run` and return the evaluation summary naming them,
    with a relative file name, as a copied run would after the move (results.localize finds it)."""
    def one(fname, corr, chash):
        rows = _rows(corr, items, chash)
        (run / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {**summarize(rows), "predictions": fname, "config_hash": chash, "cost": {"params_total": params}}

    out = one(f"predictions_{name}.jsonl", correct, f"h_{name}")
    if blind is not None:
        out["controls"] = {"blind": one(f"predictions_{name}_blind.jsonl", blind, f"h_{name}_blind")}
    return out


def _stage(root, stage, metrics, config=None):
    run = root / "runs" / "ci" / stage
    runs.write_json(run / "config.json", {"profile": "ci", **(config or {})})
    runs.write_json(run / "metrics.json", metrics)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with baseline, 02_sft and 03_icl runs of the ci tier (04_distill and 05_grayscale missing)."""
    monkeypatch.setenv("SPATIALSTUDY_ROOT", str(tmp_path))
    mk = lambda s: (tmp_path / "runs" / "ci" / s).mkdir(parents=True, exist_ok=True) or tmp_path / "runs" / "ci" / s
    base = mk("baseline")
    student = _summary(base, "student", STUDENT_BASE, STUDENT_BLIND, params=800)
    teacher = _summary(base, "teacher", TEACHER_BASE, TEACHER_BASE, params=4000)
    runs.write_json(base / "eval_subset.json", {"keys": [[t, i] for t, i, _ in ITEMS + [DRAWN]], "n": 9})
    _stage(tmp_path, "baseline", {"models": {"student": student, "teacher": teacher},
                                  "targets": {"chance_by_partition": {"overall": 25.0, "base": 25.0}}})
    sft = mk("02_sft")
    arm = _summary(sft, "student_mcq", SFT_ARM, SFT_BLIND, params=900)
    _stage(tmp_path, "02_sft", {"bases": {"student": {"source": "baseline", "eval": student}},
                                "arms": {"student_mcq": {"arm": {"model": "student", "target": "mcq", "blank": False},
                                                         "eval": arm}}})
    icl = mk("03_icl")
    settings = {name: {"setting": setting, "cost": {"latency_s": lat},
                       "eval": _summary(icl, f"icl_{name}", corr, corr, items=ITEMS[:ICL_ITEMS])}
                for name, setting, corr, lat in
                [("zero_shot", {"k": 0, "fmt": None, "demos": "none"}, ICL_ZERO, 0.01),
                 ("mcq_k3", {"k": 3, "fmt": "mcq", "demos": "retrieved"}, ICL_MCQ, 0.04)]}
    _stage(tmp_path, "03_icl", {"settings": settings, "best": "mcq_k3",
                                "latency_ratio": {"mcq_k3": {"vs_zero_shot": 4.0}}})
    return tmp_path


def _row(res, key, part="overall"):
    (row,) = [r for r in results.table_rows(res) if r["key"] == key and r["partition"] == part]
    return row


def test_fixture_runs_read_into_the_expected_table(project):
    res = results.collect("ci")
    assert list(res.methods) == ["baseline/student", "baseline/teacher", "02_sft/student_mcq", "03_icl/zero_shot",
                                 "03_icl/mcq_k3"]
    expected = {  # (key, partition): (n, accuracy, blind accuracy)
        ("baseline/student", "overall"): (8, 50.0, 25.0), ("baseline/student", "base"): (4, 50.0, 50.0),
        ("02_sft/student_mcq", "overall"): (8, 87.5, 37.5), ("02_sft/student_mcq", "base"): (4, 100.0, 25.0),
        ("02_sft/student_mcq", "sft"): (2, 100.0, 100.0), ("02_sft/student_mcq", "test_only"): (2, 50.0, 0.0),
        ("03_icl/mcq_k3", "overall"): (4, 50.0, 50.0), ("baseline/teacher", "overall"): (8, 50.0, 50.0)}
    for (key, part), (n, acc, blind) in expected.items():
        row = _row(res, key, part)
        assert (row["n"], row["accuracy"], row["blind"]) == (n, pytest.approx(acc), pytest.approx(blind)), (key, part)
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]


def test_paired_differences_against_the_base_on_shared_items(project):
    res = results.collect("ci")
    sft = res.paired["02_sft/student_mcq"]
    # arm - base per item: [0, 1, 0, 0, 0, 1, 1, 0]: +3/8; McNemar 3 vs 0 discordant: p = 2 / 2^3
    assert sft["vs_ref"]["overall"]["diff"] == pytest.approx(37.5) and sft["vs_ref"]["overall"]["n"] == 8
    assert sft["vs_ref"]["overall"]["p_mcnemar"] == pytest.approx(0.25)
    assert sft["vs_ref"]["base"]["diff"] == pytest.approx(50.0) and sft["vs_ref"]["base"]["p_mcnemar"] == 0.5
    assert sft["vs_ref"]["test_only"]["diff"] == 0.0
    # arm - its blind: [1, 1, 0, 0, 0, 1, 0, 1]: +4/8, p = 2 / 2^4
    assert sft["vs_blind"]["overall"]["diff"] == pytest.approx(50.0)
    assert sft["vs_blind"]["overall"]["p_mcnemar"] == pytest.approx(0.125)
    # ICL covers the first four items: paired with the base on those only ([-1, 0, 0, +1]: 0, p 1)
    icl = res.paired["03_icl/mcq_k3"]["vs_ref"]
    assert (icl["overall"]["n"], icl["overall"]["diff"], icl["overall"]["p_mcnemar"]) == (4, 0.0, 1.0)
    assert icl["base"]["diff"] == pytest.approx(-50.0) and "sft" in icl and "test_only" in icl
    assert res.paired["03_icl/zero_shot"]["vs_ref"]["overall"]["diff"] == 0.0
    # the bases have no reference; the teacher methods would be compared with the teacher base
    assert res.paired["baseline/student"]["vs_ref"] == {}
    assert res.methods["02_sft/student_mcq"].ref == "baseline/student"
    assert "+37.5 [" in results.table_text(res) and results.fmt_pair(sft["vs_ref"]["overall"]).endswith("p 0.250")


def test_best_settings_breakdowns_and_costs(project):
    res = results.collect("ci")
    assert results.best_methods(res) == {"ICL": "ICL MCQ k=3"}
    assert [m.label for m in res.methods.values() if m.best] == ["ICL MCQ k=3"]
    cols, table = results.breakdown(res, "by_task_type")
    assert cols == ["Perspective_Taking", "Spatial_Interaction"]
    assert table["SFT student mcq"]["Perspective_Taking"]["accuracy"] == pytest.approx(75.0)   # 3 of items 0-3
    assert "Spatial_Interaction" not in table["ICL MCQ k=3 *"]                                 # ICL ran items 0-3
    assert results.breakdown(res, "by_family", 50)[0] == []                                    # n 8 < 50: none
    assert res.methods["03_icl/mcq_k3"].latency_s == 0.04 and res.methods["baseline/teacher"].params == 4000


def test_missing_stages_are_reported_with_their_command(project):
    res = results.collect("ci")           # build_missing defaults to False: nothing is built, even at ci
    assert results.found(res) == ["baseline", "02_sft", "03_icl"]
    assert results.missing(res) == ["04_distill", "05_grayscale"]
    lines = results.status_lines(res)
    assert "04_distill: MISSING" in lines[3] and lines[3].endswith("python -m spatialstudy.run --profile ci "
                                                                   "--only 04_distill")
    assert results.rq_lines(res, "kd") == ["04_distill has not run for ci: python -m spatialstudy.run --profile ci "
                                           "--only 04_distill"]
    assert results.rq_lines(res, "icl")[-1] == "best (mcq_k3, fixed in advance) minus zero-shot: -; latency x4.00 " \
        "of zero-shot"
    assert not (project / "runs" / "ci" / "04_distill").exists()


def test_without_the_baseline_nothing_pairs_and_nothing_crashes(project):
    (project / "runs" / "ci" / "baseline" / "eval_subset.json").unlink()
    res = results.collect("ci")
    assert res.records is None and all(p == {"vs_ref": {}, "vs_blind": {}} for p in res.paired.values())
    assert any("need the baseline stage" in n for n in res.notes)
    assert _row(res, "02_sft/student_mcq")["vs_ref"] is None


def test_the_study_table(project):
    rows = {r["study"]: r for r in results.study_rows(results.collect("ci"))}
    assert {k: r["study_accuracy"] for k, r in rows.items()} == {
        "3B base": 43.44, "3B SFT": 41.81, "7B SFT": 43.57, "naive ICL": 30.59, "MCQ ICL k = 3": 43.44,
        "attention KD": 42.98}
    assert "first 851 of the 1,533" in rows["3B SFT"]["study_setup"]
    assert "all 1,533" in rows["MCQ ICL k = 3"]["study_setup"]
    assert all("VLAA-Thinker" in r["study_setup"] for r in rows.values())
    # ours: the student base, the SFT arm (its mcq target stands in for the missing SpaceThinker-format arm), ICL
    assert (rows["3B base"]["ours_method"], rows["3B base"]["ours_accuracy"]) == ("student base", 50.0)
    assert (rows["3B SFT"]["ours_method"], rows["3B SFT"]["ours_accuracy"]) == ("SFT student mcq", 87.5)
    assert rows["MCQ ICL k = 3"]["ours_n"] == 4 and rows["7B SFT"]["ours_method"] is None
    assert rows["attention KD"]["missing"] == "04_distill (combined)"
    assert rows["3B base"]["ours_label"] == "ci: embedded default (tiny models on procedural scenes)"


def test_grayscale_arm_joins_the_table_when_present(project):
    run = project / "runs" / "ci" / "05_grayscale"
    run.mkdir()
    compact = lambda name, corr: {**{k: v for k, v in _summary(run, name, corr).items() if k in
                                     ("predictions", "config_hash", "n")}, "latency_s": 0.02}
    evals = {"original": compact("gray_sft", GRAY_SFT), "blind": compact("gray_sft_blind", STUDENT_BLIND)}
    acc = {"all questions": {"original": {"n": 8, "accuracy": 50.0, "ci95": [12.5, 87.5]}}}
    _stage(project, "05_grayscale", {"models": {"gray_sft": {"label": "SFT gray-augmented", "evals": evals}},
                                     "accuracy": {"gray_sft": acc}, "paired": {}}, {"sft_arm": "student_mcq"})
    res = results.collect("ci")
    row = _row(res, "05_grayscale/gray_sft")
    assert (row["method"], row["n"], row["accuracy"], row["blind"]) == ("SFT gray-augmented", 8, 50.0, 25.0)
    assert row["vs_ref"]["diff"] == 0.0 and row["vs_ref"]["p_mcnemar"] == 1.0   # [0, 1, -1, 0, 0, 1, 0, -1]
    assert res.methods["05_grayscale/gray_sft"].params == 900                     # the 02_sft arm it repeats
    assert results.grayscale_rows(res)[0]["conditions"] == {"original": (50.0, [12.5, 87.5])}


def test_html_report_is_self_contained_and_ci_stays_out_of_reports(project):
    res = results.collect("ci")
    metrics = results.save(res, ResultsConfig(profile="ci"))
    path = project / metrics["report"]
    assert metrics["report"] == "runs/ci/results_ci.html" and path.exists()
    assert not (project / "reports").exists()                       # ci: figures and report under runs/ci/
    assert set(metrics["figures"]) == {"accuracy", "paired", "cost", "task_types"}
    assert all(p.startswith("runs/ci/figures/results_") for p in metrics["figures"].values())
    text = path.read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]?([^'" >]+)""", text, re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert text.count("<img ") == 4 and "<link" not in text and "<script" not in text
    for needle in ("SFT student mcq", "04_distill: MISSING", "--profile ci --only 04_distill", "43.44", "VLAA-Thinker",
                   results.RQ_TEXT["colour"][1][:60], "No stage times recorded"):
        assert needle in text, needle
    assert runs.is_done("ci", results.STAGE)
    stored = runs.read_json(project / "runs" / "ci" / results.STAGE / "metrics.json")
    assert stored["stages"]["05_grayscale"]["found"] is False and stored["best"] == {"ICL": "ICL MCQ k=3"}


def test_the_report_lists_the_runners_stage_times(project):
    runs.write_json(project / "reports" / "ci" / "timings.json", {"02_sft": 150.0, "01_data": 12.0})   # runner order
    text = results.html_report(results.collect("ci"))
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", text[text.index("Time per stage"):])
    assert cells[:9] == ["01_data", "12", "0.2", "02_sft", "150", "2.5", "all recorded", "162", "2.7"]


def test_notebook_markdown_holds_the_research_question_text():
    nb = nbformat.read(runs.root() / "notebooks" / "06_results.ipynb", as_version=4)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for title, text in results.RQ_TEXT.values():
        assert f"### {title}\n\n{text}" in markdown, title
