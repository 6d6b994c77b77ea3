"""The evaluation harness on a tiny random Qwen2.5-VL and real OmniSpatial-format files: prompts, batching,
resume after a crash, shards, the fixed subset and the controls."""
import dataclasses
import json
from collections import Counter

import pytest
import torch

from spatialstudy import runs
from spatialstudy.data import load_omnispatial, write_omnispatial
from spatialstudy.evaluation import eval as ev
from spatialstudy.evaluation.predictions import predictions_path, read_predictions
from spatialstudy.models.bases import load_model
from spatialstudy.models.generation import message_images
from spatialstudy.models.transforms import BLANK_RGB
from spatialstudy.scoring import in_headline

N_ITEMS = 12
MAX_NEW = 6
SCRAMBLE_STD = 0.3  # random init at 0.02 repeats one token for every input; bigger weights make outputs input-dependent


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("omni")
    write_omnispatial(out, N_ITEMS, seed=3)
    return load_omnispatial(out)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads that share a busy core spin-wait
    (measured here: 4.7 s vs 0.06 s for one batch while another process used a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    model, processor = load_model("tiny-student-random", attn_implementation="eager")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * SCRAMBLE_STD)
    return model.eval(), processor


def settings(**kw):
    return ev.EvalSettings(**{"max_new_tokens": MAX_NEW, "batch_size": 4, "progress": False, **kw})


def run(tiny, records, out_dir, **kw):
    return ev.evaluate(*tiny, records, out_dir, settings(**kw))


def rows_by_key(path):
    return {(r["task_type"], r["id"]): r for r in read_predictions(path)}


def _query_content(messages):
    return messages[-1]["content"]


def test_prompt_is_official_with_image_first(records):
    rec = next(r for r in records if r.options)
    content = _query_content(ev.build_messages(rec))
    assert [c["type"] for c in content] == ["image", "text"]
    text = content[1]["text"]
    lines = "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(rec.options))
    assert text.endswith("\n\n" + rec.question + lines)
    assert "Answer: X" in text and "spatial-reasoning assistant" in text


def test_empty_options_item_gets_no_option_lines(records):
    rec = next((r for r in records if not r.options), None) or dataclasses.replace(records[0], options=[])
    text = _query_content(ev.build_messages(rec))[1]["text"]
    assert text.endswith("\n\n" + rec.question)
    assert "\nA. " not in text


def test_direct_style_and_blind_image(records):
    rec = records[0]
    direct = _query_content(ev.build_messages(rec, "direct"))[1]["text"]
    assert "only need to respond with A, B, C, or D" in direct
    image = _query_content(ev.build_messages(rec, transform=ev.BLIND))[0]["image"]
    real = ev.load_image(rec)
    assert image.size == real.size and image.getextrema() == tuple((v, v) for v in BLANK_RGB)
    with pytest.raises(ValueError, match="prompt_style"):
        ev.build_messages(rec, "cot")


def test_grayscale_transform_names_its_file_and_its_config(tiny, records, tmp_path):
    colour, gray = ev.load_image(records[0]), ev.load_image(records[0], ev.GRAYSCALE)
    assert gray.mode == "RGB" and gray.size == colour.size
    assert len({band.tobytes() for band in gray.split()}) == 1 < len({band.tobytes() for band in colour.split()})
    plain = run(tiny, records[:4], tmp_path)
    m = run(tiny, records[:4], tmp_path, transform=ev.GRAYSCALE)
    assert m["predictions"] == str(predictions_path(tmp_path, "model", "grayscale"))
    assert m["predictions"].endswith("predictions_model_grayscale.jsonl")
    assert m["config"]["transform"] == "grayscale" and plain["config"]["transform"] is None
    assert m["config_hash"] != plain["config_hash"] and m["n"] == 4


def test_config_records_dtype_attention_and_generation_used(tiny, records, tmp_path):
    model = tiny[0]
    config = run(tiny, records[:2], tmp_path / "a")["config"]
    assert config["harness"] == ev.HARNESS_VERSION and config["dtype"] == "torch.float32"
    assert config["attn_implementation"] == "eager"
    gen = config["generation"]
    assert gen["max_new_tokens"] == MAX_NEW and gen["do_sample"] is False and gen["num_beams"] == 1
    assert "transformers_version" not in gen
    model.generation_config.repetition_penalty = 1.05  # a checkpoint's own setting, which greedy decoding applies
    try:
        penalised = run(tiny, records[:2], tmp_path / "b")["config"]
    finally:
        model.generation_config.repetition_penalty = None
    assert penalised["generation"]["repetition_penalty"] == 1.05
    assert runs.config_hash(penalised) != runs.config_hash(config)


def test_requests_run_longest_first_counting_demo_turns(tiny, records, tmp_path):
    demo = (ev.load_image(records[0]), records[0].question, "Answer: " + records[0].letter)
    shortest = min(records, key=lambda r: ev._request_length(tiny[1], r))  # without demos
    demos_fn = lambda r: [demo, demo] if r.key == shortest.key else []  # noqa: E731
    order = ev.longest_first(tiny[1], records, demos_fn)
    assert order[0].key == shortest.key
    lengths = [ev._request_length(tiny[1], r, demos_fn(r)) for r in order]
    assert lengths == sorted(lengths, reverse=True)
    batches = []
    m = run(tiny, records, tmp_path, demos_fn=demos_fn, on_batch=batches.append)
    assert m["n"] == N_ITEMS and shortest.key in {(r["task_type"], r["id"]) for r in batches[0]}
    assert max(r["prompt_tokens"] for r in batches[0]) == max(r["prompt_tokens"] for b in batches for r in b)


def test_batched_and_one_by_one_give_the_same_answers(tiny, records, tmp_path):
    one = run(tiny, records, tmp_path / "one", batch_size=1)
    many = run(tiny, records, tmp_path / "many", batch_size=5)
    a, b = rows_by_key(one["predictions"]), rows_by_key(many["predictions"])
    assert set(a) == set(b) == {r.key for r in records}
    assert [a[k]["raw"] for k in a] == [b[k]["raw"] for k in a]
    assert len({a[k]["raw"] for k in a}) > 1  # outputs depend on the input, so the comparison means something
    assert one["config_hash"] == many["config_hash"]  # batch size is not part of an item's identity
    assert many["cost"]["params_total"] > 0 and many["cost"]["tokens_per_s"] > 0


class Crash(RuntimeError):
    pass


def test_interrupted_evaluation_resumes_without_repeating(tiny, records, tmp_path):
    def crash(rows):
        raise Crash("simulated crash after the first batch")

    with pytest.raises(Crash):
        run(tiny, records, tmp_path, batch_size=4, on_batch=crash)
    path = predictions_path(tmp_path, "model")
    assert len(read_predictions(path)) == 4
    with open(path, "a") as f:
        f.write('{"task_type": "torn')  # the crash also tore the next write
    seen = []
    metrics = run(tiny, records, tmp_path, batch_size=4, on_batch=lambda rows: seen.extend(rows))
    keys = [(r["task_type"], r["id"]) for r in read_predictions(path)]
    assert len(seen) == N_ITEMS - 4 and metrics["n_generated_now"] == N_ITEMS - 4
    assert Counter(keys) == Counter(r.key for r in records)  # every item exactly once
    assert metrics["n"] == N_ITEMS
    again = run(tiny, records, tmp_path)
    assert again["n_generated_now"] == 0 and again["accuracy_official"] == metrics["accuracy_official"]
    with pytest.raises(ValueError, match="another configuration"):
        run(tiny, records, tmp_path, max_new_tokens=MAX_NEW + 1)
    fresh = run(tiny, records, tmp_path, max_new_tokens=MAX_NEW + 1, restart_stale=True)  # a stage re-run
    assert fresh["n_generated_now"] == N_ITEMS and len(read_predictions(path)) == N_ITEMS
    assert run(tiny, records, tmp_path, max_new_tokens=MAX_NEW + 1, restart_stale=True)["n_generated_now"] == 0


def test_shards_merge_to_the_unsharded_result(tiny, records, tmp_path):
    full = run(tiny, records, tmp_path / "full")
    for i in range(3):
        part = run(tiny, records, tmp_path / "sharded", shard=(i, 3))
        assert part["n"] in (N_ITEMS // 3, N_ITEMS // 3 + 1)
    merged = ev.merge_shards(tmp_path / "sharded", "model", 3, records=records)
    assert merged["config_hash"] == full["config_hash"]
    for key in ("accuracy_official", "accuracy_lenient", "always_A"):
        assert merged[key] == full[key]
    assert merged["scorers"] == full["scorers"]
    strip = lambda rows: {k: {f: v for f, v in r.items() if f not in ("latency_s", "batch_size")}
                          for k, r in rows.items()}
    assert strip(rows_by_key(merged["predictions"])) == strip(rows_by_key(full["predictions"]))
    with pytest.raises(FileNotFoundError, match="shard 0/4 missing"):
        ev.merge_shards(tmp_path / "sharded", "model", 4)


def test_rows_name_image_and_family_and_drawn_items_leave_the_headline(tiny, records, tmp_path):
    drawn = dataclasses.replace(records[3], options=[])  # a procedural item whose options are drawn in the image
    subset = [*records[:3], drawn]
    m = run(tiny, subset, tmp_path)
    rows = rows_by_key(m["predictions"])
    for r in subset:
        assert rows[r.key]["image"] == f"{r.task_type}/{r.image_path.name}"  # relative to the dataset folder
        assert r.family is not None and rows[r.key]["family"] == r.family
    assert len({row["image"] for row in rows.values()}) == len({r.image_path for r in subset})  # one per file
    assert rows[drawn.key]["options_in_image"] and m["n"] == 4 and m["n_headline"] == 3
    assert m["options_in_image"]["official"]["n"] == 1
    assert m["accuracy_official"] == pytest.approx(100 * sum(rows[r.key]["correct_official"] for r in records[:3]) / 3)


def test_controls_in_the_report(tiny, records, tmp_path):
    m = ev.evaluate_with_controls(*tiny, records, tmp_path, settings(batch_size=6))
    head = [r for r in records if in_headline(r.partition, not r.options)]
    truth = Counter("ABCD"[r.answer] for r in head)
    assert m["controls"]["always_A"]["accuracy"] == pytest.approx(100 * truth["A"] / len(head))
    assert m["controls"]["blind"]["n"] == len(records)
    assert m["controls"]["blind"]["predictions"] == str(tmp_path / "predictions_model_blind.jsonl")
    assert predictions_path(tmp_path, "model", "blind").exists()
    table = m["scorers"]["official"]["letter_table"]
    assert sum(sum(row.values()) for row in table.values()) == len(records)
    assert set(m["scorers"]["lenient"]["by_task_type"]) == {r.task_type for r in records}
    json.dumps(m)  # the report is json-able as it stands


def test_eval_subset_is_fixed_and_stratified(records):
    many = records * 5  # more items per stratum; keys repeat but the subset works on positions
    a, b = ev.eval_subset(many, 20, seed=1), ev.eval_subset(many, 20, seed=1)
    assert [id(r) for r in a] == [id(r) for r in b] and len(a) == 20
    full, sub = Counter(r.task_type for r in many), Counter(r.task_type for r in a)
    for t, n in full.items():
        assert abs(sub[t] - 20 * n / len(many)) < 1
    assert [id(r) for r in ev.eval_subset(many, 20, seed=2)] != [id(r) for r in a]
    assert ev.eval_subset(records, None) == list(records)


def test_icl_demos_enter_the_prompt_and_the_hash(tiny, records, tmp_path):
    demo = (ev.load_image(records[0]), records[0].question, "Answer: " + records[0].letter)
    msgs = ev.build_messages(records[1], demos=[demo, demo])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert len(message_images(msgs)) == 3
    plain = run(tiny, records[:4], tmp_path / "plain")
    icl = run(tiny, records[:4], tmp_path / "icl", demos_fn=lambda r: [demo], config_extra={"k": 1})
    assert icl["n"] == 4 and icl["config_hash"] != plain["config_hash"]
    with_demo, without = rows_by_key(icl["predictions"]), rows_by_key(plain["predictions"])
    assert all(with_demo[k]["prompt_tokens"] > without[k]["prompt_tokens"] for k in without)


def test_each_run_reports_its_own_peak_memory_not_the_process_lifetime_one():
    """On CPU the peak is the process's RSS high-water mark since reset_peak_memory: a 200 MB buffer touched in one
    run does not show in the next run's peak (the lifetime peak would keep it for every later model)."""
    import numpy as np

    from spatialstudy.models.generation import peak_memory_bytes, reset_peak_memory

    reset_peak_memory("cpu")
    buffer = np.ones(25_000_000)   # 200 MB, touched
    first, kind = peak_memory_bytes("cpu")
    del buffer
    reset_peak_memory("cpu")
    second, _ = peak_memory_bytes("cpu")
    assert kind == "process_rss_peak_since_reset" and first - second > 150e6
