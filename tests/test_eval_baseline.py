"""The baseline stage end to end at the ci tier, on a throwaway project root: files, fixed subset, resume."""
from dataclasses import replace

import pytest
import torch

from spatialstudy import runs
from spatialstudy.data import load_omnispatial, write_omnispatial
from spatialstudy.evaluation.eval import eval_records
from spatialstudy.evaluation.predictions import read_predictions
from spatialstudy.methods.baseline import BaselineConfig, chance_accuracy, main, run_baseline, summary_table
from spatialstudy.scoring import headline_rows, in_headline, paired_difference

N_ITEMS, N_EVAL = 16, 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread; OpenMP threads sharing a busy core spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALSTUDY_ROOT", str(tmp_path))
    (tmp_path / "notebooks").mkdir()
    write_omnispatial(tmp_path / "omni", N_ITEMS, seed=5)
    return tmp_path


def test_baseline_writes_its_run_and_resumes(project):
    cfg = BaselineConfig(profile="ci", n_eval=N_EVAL, max_new_tokens=4, batch_size=8,
                         omnispatial_path=str(project / "omni"))
    metrics = run_baseline("ci", cfg)
    out = runs.require_run("ci", "baseline")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json", "eval_subset.json"} <= names
    for model in ("student", "teacher"):
        assert {f"predictions_{model}.jsonl", f"predictions_{model}_blind.jsonl"} <= names
        m = metrics["models"][model]
        assert m["n"] == N_EVAL and m["controls"]["blind"]["n"] == N_EVAL
        assert len(read_predictions(out / f"predictions_{model}.jsonl")) == N_EVAL
    subset = eval_records("ci")
    assert len(subset) == N_EVAL and {r.key for r in subset} <= {r.key for r in load_omnispatial(project / "omni")}
    check_targets(metrics, subset, out)
    assert "retention (base)" in summary_table(metrics)
    assert (runs.run_dir("ci", "figures") / "baseline_accuracy.png").exists()
    again = run_baseline("ci", cfg)  # everything is on disk: nothing is generated twice
    assert all(m["n_generated_now"] == 0 for m in again["models"].values())
    assert again["models"]["student"]["scorers"] == metrics["models"]["student"]["scorers"]
    longer = run_baseline("ci", replace(cfg, max_new_tokens=5))  # another configuration: evaluated afresh, not mixed
    assert all(m["n_generated_now"] == N_EVAL for m in longer["models"].values())
    assert len(read_predictions(out / "predictions_student.jsonl", longer["models"]["student"]["config_hash"])) == N_EVAL


def check_targets(metrics, subset, out):
    """Chance per partition over the headline items, the paired teacher-minus-student difference read back from
    the prediction files, the blind check in every partition, and image minus blind."""
    t, head = metrics["targets"], [r for r in subset if in_headline(r.partition, not r.options)]
    assert t["chance"] == pytest.approx(chance_accuracy(head))
    for p in {r.partition for r in head}:
        assert t["chance_by_partition"][p] == pytest.approx(chance_accuracy([r for r in head if r.partition == p]))
    rows = {m: headline_rows(read_predictions(out / f"predictions_{m}.jsonl")) for m in ("teacher", "student")}
    base = {m: [r for r in rs if r["partition"] == "base"] for m, rs in rows.items()}
    assert t["teacher_minus_student_base"] == paired_difference(base["teacher"], base["student"])
    assert t["teacher_minus_student_base"]["diff"] == pytest.approx(t["teacher_base"] - t["student_base"])
    assert t["teacher_minus_student"] == paired_difference(rows["teacher"], rows["student"])
    assert t["student_base_45"] == (t["student_base"] >= 45)
    assert t["teacher_10_above_student_base"] == (t["teacher_minus_student_base"]["diff"] >= 10
                                                  and t["teacher_minus_student_base"]["ci95"][0] > 0)
    blind = t["blind_by_partition"]
    assert set(blind["student"]) == set(t["chance_by_partition"])  # "overall" and every partition
    assert t["blind_within_3_of_chance"] == all(abs(b[g] - t["chance_by_partition"][g]) <= 3
                                                for b in blind.values() for g in b)
    for name in ("student", "teacher"):
        acc = metrics["models"][name]["scorers"]["official"]["by_partition"]
        assert metrics["looked"][name]["base"] == pytest.approx(acc["base"]["accuracy"] - blind[name]["base"])


def test_baseline_config_rejects_bad_parameters():
    with pytest.raises(ValueError, match="prompt_style"):
        BaselineConfig(profile="ci", prompt_style="cot")
    with pytest.raises(KeyError, match="n_eval"):
        main("ci", {"n_evals": 3})
