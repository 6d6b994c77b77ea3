"""Predictions files: a corrupt line is named, never silently cut; only a torn last line is; one writer at a time."""
import json
import subprocess
import sys
import textwrap

import pytest

from spatialstudy.evaluation.predictions import (CorruptPredictions, ForeignConfig, PredictionsLocked, append_rows,
                                      discard_stale, lock_path, read_predictions, writer_lock)


def _row(i, chash="h1"):
    return {"task_type": "Perspective_Taking", "id": f"{i}_0", "config_hash": chash, "raw": f"Answer: {'ABCD'[i % 4]}"}


def _lines(n, chash="h1"):
    return [json.dumps(_row(i, chash)) + "\n" for i in range(n)]


def test_corrupt_middle_line_is_an_error_naming_file_and_line_and_the_file_is_kept(tmp_path):
    path = tmp_path / "predictions_model.jsonl"
    lines = _lines(5)
    lines[2] = '{"task_type": "Perspective_Taking", "id": \n'  # a complete line that is not a row
    path.write_text("".join(lines))
    before = path.read_bytes()
    with pytest.raises(CorruptPredictions, match=r"predictions_model\.jsonl, line 3: .*nothing was changed"):
        read_predictions(path)
    with pytest.raises(CorruptPredictions, match="line 3"):
        discard_stale(path, "other-hash")                  # a stage re-run must not delete it either
    assert path.read_bytes() == before


def test_corrupt_lines_can_be_skipped_and_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = _lines(6)
    lines[1], lines[4] = "garbage\n", '["a list, not a row"]\n'
    path.write_text("".join(lines))
    before = path.read_bytes()
    rows = read_predictions(path, "h1", on_corrupt="skip")
    assert [r["id"] for r in rows] == ["0_0", "2_0", "3_0", "5_0"] and rows.skipped_lines == [2, 5]
    assert path.read_bytes() == before
    assert read_predictions(tmp_path / "none.jsonl").skipped_lines == []
    with pytest.raises(ValueError, match="on_corrupt"):
        read_predictions(path, on_corrupt="ignore")


def test_torn_last_line_is_cut_and_the_rest_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    good = "".join(_lines(3))
    path.write_text(good + '{"task_type": "Perspective_Taking", "id": "3_0", "config_hash": "h1"}')  # no newline
    rows = read_predictions(path, "h1")
    assert [r["id"] for r in rows] == ["0_0", "1_0", "2_0"]
    assert path.read_text() == good
    append_rows(path, [_row(3)])
    assert len(read_predictions(path, "h1")) == 4


def test_foreign_config_is_refused_and_discarded_only_on_request(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(_lines(2, "old")))
    with pytest.raises(ForeignConfig, match="another configuration"):
        read_predictions(path, "new")
    assert not discard_stale(path, "old") and path.exists()
    assert discard_stale(path, "new") and not path.exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from spatialstudy.evaluation.predictions import writer_lock
    with writer_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def held_by_other_process(tmp_path):
    path = tmp_path / "predictions_model.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield path, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_second_writer_is_refused_naming_file_and_pid(held_by_other_process):
    path, pid = held_by_other_process
    with pytest.raises(PredictionsLocked, match=rf"predictions_model\.jsonl is being written .*pid {pid}"):
        append_rows(path, [_row(0)])
    with pytest.raises(PredictionsLocked, match=str(pid)):
        with writer_lock(path):
            pass
    assert not path.exists()                                           # nothing was written


def test_reader_does_not_cut_a_line_another_writer_may_be_writing(held_by_other_process):
    path, _ = held_by_other_process
    path.write_text("".join(_lines(2)) + '{"task_type": "Persp')
    assert len(read_predictions(path)) == 2
    assert path.read_text().endswith('{"task_type": "Persp')               # left for its writer


def test_lock_is_reentrant_and_released(tmp_path):
    path = tmp_path / "p.jsonl"
    with writer_lock(path):
        append_rows(path, [_row(0)])                                   # the holder itself may append
        assert lock_path(path).read_text().strip().isdigit()
    assert lock_path(path).read_text() == ""                           # no stale pid after release
    with writer_lock(path):
        pass
