"""tools/compare_runs.py: a rerun reproduces only when every reply of every predictions file matches, item by item."""
import subprocess
import sys
from pathlib import Path

from spatialstudy.evaluation.predictions import append_rows

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "compare_runs.py"


def write(run: Path, name: str, replies: dict, config_hash: str = "aaa") -> None:
    run.mkdir(parents=True, exist_ok=True)
    append_rows(run / f"predictions_{name}.jsonl",
                [{"task_type": "Perspective_Taking", "id": i, "config_hash": config_hash, "raw": raw,
                  "correct_official": raw.endswith("A"), "latency_s": 0.01 * n}
                 for n, (i, raw) in enumerate(replies.items())])


def compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(a), str(b)], capture_output=True, text=True, cwd=ROOT)


def test_identical_replies_pass_whatever_the_order_latency_or_config_hash(tmp_path):
    write(tmp_path / "a", "m", {"1": "Answer: A", "2": "Answer: B"})
    write(tmp_path / "b", "m", {"2": "Answer: B", "1": "Answer: A"}, config_hash="bbb")
    done = compare(tmp_path / "a", tmp_path / "b")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "total: 2 of 2 identical" in done.stdout


def test_one_changed_reply_or_a_missing_file_fails(tmp_path):
    write(tmp_path / "a", "m", {"1": "Answer: A", "2": "Answer: B"})
    write(tmp_path / "b", "m", {"1": "Answer: A", "2": "Answer: C"})
    done = compare(tmp_path / "a", tmp_path / "b")
    assert done.returncode == 1 and "total: 1 of 2 identical" in done.stdout
    write(tmp_path / "a", "blind", {"1": "Answer: A"})
    done = compare(tmp_path / "a", tmp_path / "b")
    assert done.returncode == 1 and "predictions_blind.jsonl" in done.stdout and "missing in" in done.stdout
