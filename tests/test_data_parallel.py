"""The training stages under `torchrun` on two CPU processes (gloo): `python -m spatialstudy.run --only 02_sft
--direct` and the same for 04_distill and 05_grayscale train their arms data-parallel through transformers' Trainer;
the main process alone saves adapters, evaluates and writes the run; a later single-process run finds every arm done.

Real objects throughout: torchrun, accelerate's process state, the Trainer's DDP, the tiny ci bases and the runner.
A temporary project root holds the ci runs, with parameter files that keep one arm per stage.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spatialstudy import run as runner
from spatialstudy.evaluation.predictions import read_predictions

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"02_sft": "arms: [student/mcq]\n",
          # the attention-KD arm: forward hooks on both models inside DDP; the teacher base needs no 02_sft teacher
          "04_distill": "arms: [attn_kd]\nbest: attn_kd\nteacher_arm: base\n",
          # the gray-augmented arm (02_sft's student_mcq recipe); two image conditions, a small control and a part of
          # the subset keep it short
          "05_grayscale": "conditions: [original, grayscale]\nn_control: 8\nn_eval: 12\n",
          # 05_grayscale builds the missing ci 03_icl run (its best ICL); one setting on a few items is enough here
          "03_icl": "ks: [3]\nformats: [mcq]\nn_eval: 8\ncolour_transforms: [grayscale]\n"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A project root with the repo's notebooks, one-arm ci parameter files and the repo's cached ci bases."""
    base = tmp_path_factory.mktemp("dp")
    (base / "notebooks").symlink_to(REPO / "notebooks")
    (base / "params" / "ci").mkdir(parents=True)
    for name, text in PARAMS.items():
        (base / "params" / "ci" / f"{name}.yaml").write_text(text)
    (base / "pyproject.toml").write_text("")
    cache = REPO / "runs" / "cache"
    if cache.is_dir():   # the ci bases and tokenizer, when an earlier test built them: not pretrained again
        (base / "runs").mkdir()
        (base / "runs" / "cache").symlink_to(cache)
    return base


def _run(root: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPATIALSTUDY_ROOT": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if processes else []
    cmd = [sys.executable, *launch, "-m", "spatialstudy.run", "--profile", "ci", *args]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def _arm_logs(run_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/log.json")}


def _check_stage(run_dir: Path, arm: str, rows_per_step: int, rows: int | None = None) -> None:
    """The arm trained on two processes (each step took a shard of twice the single-process rows), its adapter
    exists, and the main process alone evaluated it: every evaluation item once in its predictions."""
    logs = _arm_logs(run_dir)
    assert set(logs) == {arm}
    log = logs[arm]
    assert log["processes"] == 2 and (run_dir / arm / "adapter" / "adapter_config.json").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = rows or metrics["n_train"]
    last = [h for h in log["log_history"] if "loss" in h][-1]   # epochs advance by 2 x batch rows per step
    assert last["epoch"] == pytest.approx(last["step"] * rows_per_step * 2 / rows, rel=0.05, abs=0.05)
    keys = [(r["task_type"], r["id"]) for r in read_predictions(run_dir / f"predictions_{arm}.jsonl")]
    assert len(keys) == len(set(keys)) == metrics["n_eval"]


@pytest.mark.slow
def test_sft_and_distillation_train_data_parallel_under_torchrun(root):
    from spatialstudy.configs import DistillConfig, SFTConfig

    _run(root, "--only", "01_data", "--only", "baseline", processes=0)
    # one launch for the three stages (as a user would run them): each process trains every stage's arms in turn
    _run(root, "--only", "02_sft", "--only", "04_distill", "--only", "05_grayscale", "--direct")
    _check_stage(root / "runs" / "ci" / "02_sft", "student_mcq", SFTConfig(profile="ci").batch_size)
    _check_stage(root / "runs" / "ci" / "04_distill", "attn_kd", DistillConfig(profile="ci").batch_size)
    gray = root / "runs" / "ci" / "05_grayscale"
    _check_stage(gray, "gray_sft", SFTConfig(profile="ci").batch_size, rows=_arm_logs(gray)["gray_sft"]["rows"])
    timings = json.loads((root / "reports" / "ci" / "timings.json").read_text())
    assert {"02_sft", "04_distill", "05_grayscale"} <= set(timings)   # written once, by the main process


@pytest.mark.slow
def test_a_single_process_run_after_torchrun_finds_every_arm_done(root):
    if not (root / "runs" / "ci" / "02_sft" / "metrics.json").exists():
        pytest.skip("needs the torchrun test's runs")
    before = _arm_logs(root / "runs" / "ci" / "02_sft")
    out = _run(root, "--only", "02_sft", "--direct", processes=0).stdout
    assert "resuming" not in out and _arm_logs(root / "runs" / "ci" / "02_sft") == before   # nothing retrained


def test_direct_is_refused_for_stages_that_train_nothing(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--profile", "ci", "--only", "01_data", "--direct"])
    assert "--direct needs --only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--profile", "ci", "--direct"])
