"""The evaluation command line: usage errors, models loaded as the stages load them, and one torchrun command that
evaluates every shard in its own process and merges them (2 CPU processes here)."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from spatialstudy.data import load_omnispatial, write_omnispatial
from spatialstudy.evaluation import eval as ev
from spatialstudy.evaluation.predictions import read_predictions
from spatialstudy.models.bases import load_for_eval, load_model
from spatialstudy.models.qwen import REAL_MAX_PIXELS, REAL_MIN_PIXELS, TINY_PIXELS, pixel_budget

SCRAMBLE_STD = 0.3  # random init at 0.02 repeats one token for every input; bigger weights make outputs input-dependent
N_ITEMS = 12
ARGS = ["--max-new-tokens", "6", "--batch-size", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A scrambled tiny model saved as a checkpoint dir: loaded as a real checkpoint is (pixel caps, dtype)."""
    model, processor = load_model("tiny-student-random")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * SCRAMBLE_STD)
    out = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("shard", ["1-2", "a/2", "2/2", "0/0", "1/2/3"])
def test_bad_shard_is_a_usage_error(shard, capsys):
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--model", "m", "--data", "d", "--out", "o", "--shard", shard])
    assert exit_.value.code == 2 and "--shard" in capsys.readouterr().err


def test_distributed_outside_torchrun_and_with_shard_are_usage_errors(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    for extra in ([], ["--shard", "0/2"]):
        with pytest.raises(SystemExit) as exit_:
            ev.main(["--model", "m", "--data", "d", "--out", "o", "--distributed", *extra])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "not allowed with argument" in err
    assert ev.parse_shard("1/3") == (1, 3)


def test_load_for_eval_gives_checkpoints_the_real_pixel_caps(checkpoint):
    model, processor = load_for_eval(checkpoint)
    assert pixel_budget(processor) == (REAL_MIN_PIXELS, REAL_MAX_PIXELS)
    assert model.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert pixel_budget(load_for_eval("tiny-student-random")[1]) == (TINY_PIXELS, TINY_PIXELS)


def _rows(path):
    """Rows by key, without the fields that depend on how items were batched."""
    return {(r["task_type"], r["id"]): {k: v for k, v in r.items() if k not in ("latency_s", "batch_size")}
            for r in read_predictions(path)}


@pytest.mark.slow
def test_torchrun_shards_merge_to_the_single_process_result(checkpoint, tmp_path, capsys):
    write_omnispatial(tmp_path / "omni", N_ITEMS, seed=0)
    common = ["--model", str(checkpoint), "--data", str(tmp_path / "omni"), *ARGS]
    ev.main([*common, "--out", str(tmp_path / "single")])
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "spatialstudy.evaluation.eval", *common, "--out", str(tmp_path / "dist"), "--distributed"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 alone prints, after merging
    assert {f.name for f in (tmp_path / "dist").glob("*.jsonl")} == {
        "predictions_model.jsonl", "predictions_model.shard0of2.jsonl", "predictions_model.shard1of2.jsonl"}
    keys = Counter((r["task_type"], r["id"]) for r in read_predictions(merged["predictions"]))
    assert keys == Counter(r.key for r in load_omnispatial(tmp_path / "omni"))  # every item exactly once
    for k in ("n", "accuracy_official", "accuracy_lenient"):
        assert merged[k] == single[k]
    rows = _rows(merged["predictions"])
    assert rows == _rows(single["predictions"]) and len({r["raw"] for r in rows.values()}) > 1
