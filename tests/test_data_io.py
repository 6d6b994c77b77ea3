"""Both on-disk layouts through the one reading path: round trips, every real-data quirk, every bad-input case."""
import io
import json
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spatialstudy.data import (DataError, last_report, load_omnispatial, load_spacethinker, write_omnispatial,
                               write_spacethinker, zip_folder)
from spatialstudy.data.loaders import extract_question
from spatialstudy.data.writers import INPUT_TEMPLATE, partition_counts, quirk_counts, spacethinker_items, write_parquet

N_OMNI = 120


@pytest.fixture(scope="module")
def st_root(tmp_path_factory):
    return write_spacethinker(tmp_path_factory.mktemp("st") / "SpaceThinker", 12, 6, seed=0, shards=2)


@pytest.fixture(scope="module")
def omni_root(tmp_path_factory):
    return write_omnispatial(tmp_path_factory.mktemp("omni") / "OmniSpatial-test", N_OMNI, seed=0)


def _png(color=(200, 10, 10), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (50, 20), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


# --- SpaceThinker ---

def test_spacethinker_layout_and_roundtrip(st_root):
    assert sorted(p.name for p in (st_root / "data").iterdir()) == [
        "test-00000-of-00002.parquet", "test-00001-of-00002.parquet",
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    schema = pq.read_schema(st_root / "data" / "train-00000-of-00002.parquet")
    assert str(schema.field("images").type) == "list<element: struct<bytes: binary, path: string>>"
    train, test = load_spacethinker(st_root, "train"), load_spacethinker(st_root, "test")
    assert (len(train), len(test)) == (12, 6) and train.report.n_skipped == 0
    want = spacethinker_items("train", 12, 0)
    for rec, it in zip(train, want):
        assert rec.question == it.question and rec.answer == it.free_answer and rec.reasoning == it.reasoning
        assert rec.choices == it.options and rec.correct == it.answer and rec.family == it.family
        assert rec.images[0].mode == "RGB" and rec.images[0].size == (112, 112) and len(rec.images) == 1
    raw = pq.read_table(st_root / "data" / "train-00000-of-00002.parquet").to_pylist()[0]
    assert raw["input"].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>  detailed thinking on")
    assert raw["input"].endswith("<|start_header_id|>assistant<|end_header_id|>") and "<image>" not in raw["input"]
    assert raw["reasoning"] == "on"


def test_spacethinker_free_answers_in_style(tmp_path):
    root = write_spacethinker(tmp_path / "st", 150, 1, seed=1)
    recs = load_spacethinker(root, "train")
    answers = [r.answer for r in recs]
    text = " ".join(answers)
    assert "\u2013" in text                                        # en-dash ranges
    for unit in ("meters", "feet", "centimeters", "inches"):
        assert unit in text
    assert any(a.startswith("Yes, ") for a in answers) and any(a.startswith("No, ") for a in answers)
    assert any(a.startswith("about ") for a in answers)
    assert any(" is more to the left." in a or " is taller." in a for a in answers)
    outs = [r.output for r in recs]
    assert any("\n" in o for o in outs) and any("</think> <answer>" in o for o in outs)


@pytest.mark.parametrize("text, want", [
    (INPUT_TEMPLATE.format(question="How wide is the cube?"), "How wide is the cube?"),
    ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nIs it left?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
     "Is it left?"),
    ("<|start_header_id|>user<|end_header_id|>  No system turn?<|eot_id|><|start_header_id|>assistant"
     "<|end_header_id|>", "No system turn?"),
    ("  Plain question without markup?  ", "Plain question without markup?"),
    ("<|start_header_id|>user<|end_header_id|>\nMulti\nline<|eot_id|>", "Multi\nline"),
])
def test_question_extraction(text, want):
    assert extract_question(text) == want


def _rows_fixture():
    """Real-like rows (no generator columns): header variants, output spacing variants, en-dash answer."""
    q = ["<|begin_of_text|><|start_header_id|>system<|end_header_id|>  detailed thinking on<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>  How far is the man from the pallet?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>",
         "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nIs the lamp above the desk?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>",
         "<|start_header_id|>user<|end_header_id|>  Which is taller, the chair or the table?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>",
         "What is the width of the sofa?"]
    o = ["<think>\nI see the man ... roughly 2 to 3 feet.\n</think>\n<answer>\n2\u20133 feet\n</answer>",
         "<think>The lamp hangs high.</think> <answer>Yes, the lamp is above the desk.</answer>",
         "<think>\nThe table is short.\n</think>\n\n<answer>The chair is taller.</answer>",
         "<think>It spans the wall.</think><answer>Approximately 60 centimeters.</answer>"]
    imgs = [_png(), _jpeg(), _png((0, 0, 255), (64, 64)), _png()]
    return [{"images": [{"bytes": b, "path": None}], "input": a, "output": c, "messages": None, "reasoning": "on"}
            for a, c, b in zip(q, o, imgs)]


def test_real_like_rows_list_and_single_struct(tmp_path):
    rows = _rows_fixture()
    (tmp_path / "data").mkdir()
    write_parquet(rows, tmp_path / "data" / "train-00000-of-00001.parquet")
    recs = load_spacethinker(tmp_path, "train")
    assert [r.question for r in recs] == ["How far is the man from the pallet?", "Is the lamp above the desk?",
                                          "Which is taller, the chair or the table?", "What is the width of the sofa?"]
    assert [r.answer for r in recs] == ["2\u20133 feet", "Yes, the lamp is above the desk.", "The chair is taller.",
                                        "Approximately 60 centimeters."]
    assert recs[0].reasoning.startswith("I see the man") and recs[0].choices is None and recs[0].family is None
    assert recs[1].images[0].size == (50, 20) and recs[1].images[0].mode == "RGB"   # JPEG, other size
    # the same rows with `images` as a single struct (not a list), in a second split
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    single = [{**r, "images": r["images"][0]} for r in rows]
    schema = pa.schema([("images", img_t), ("input", pa.string()), ("output", pa.string())])
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("images", "input", "output")} for r in single],
                                        schema=schema), tmp_path / "data" / "test-00000-of-00001.parquet")
    test = load_spacethinker(tmp_path, "test")
    assert [r.answer for r in test] == [r.answer for r in recs] and test[2].images[0].size == (64, 64)


def test_save_to_disk_folder(st_root, tmp_path):
    from datasets import Dataset, DatasetDict

    tables = {s: pa.concat_tables([pq.read_table(p) for p in sorted((st_root / "data").glob(f"{s}-*.parquet"))])
              for s in ("train", "test")}
    DatasetDict({s: Dataset(t) for s, t in tables.items()}).save_to_disk(str(tmp_path / "saved"))
    recs = load_spacethinker(tmp_path / "saved", "test")
    assert [r.question for r in recs] == [r.question for r in load_spacethinker(st_root, "test")]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_spacethinker(tmp_path / "saved", "validation")


def _bad_rows():
    rows = _rows_fixture()
    rows[1]["output"] = "<think>no answer tag here</think>"
    rows[2]["images"] = [{"bytes": b"not an image", "path": None}]
    rows[3]["input"] = None
    return rows


def test_spacethinker_bad_rows_raise_naming_file_and_row(tmp_path):
    (tmp_path / "data").mkdir()
    shard = tmp_path / "data" / "train-00000-of-00001.parquet"
    write_parquet(_bad_rows(), shard)
    with pytest.raises(DataError, match=r"train-00000-of-00001\.parquet row 1: output lacks <answer>"):
        load_spacethinker(tmp_path, "train")
    recs = load_spacethinker(tmp_path, "train", on_error="skip")
    assert len(recs) == 1 and recs.report.n_total == 4
    assert recs.report.skipped == Counter({"missing_tag": 1, "bad_image": 1, "missing_field": 1})
    assert last_report("spacethinker") is recs.report
    assert any("row 2" in m and "image" in m for m in recs.report.messages)


def test_spacethinker_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no train-\\*.parquet"):
        load_spacethinker(tmp_path, "train")
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"input": ["q"], "answer": ["a"]}), tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['output', 'images'\]"):
        load_spacethinker(tmp_path, "train")
    with pytest.raises(ValueError, match="on_error"):
        load_spacethinker(tmp_path, "train", on_error="ignore")


# --- OmniSpatial ---

def test_omnispatial_roundtrip_and_quirks(omni_root):
    recs = load_omnispatial(omni_root)
    data = json.loads((omni_root / "data.json").read_text())
    assert len(recs) == len(data) == N_OMNI and recs.report.n_skipped == 0
    assert set(data[0]) >= {"id", "question", "options", "answer", "task_type", "sub_task_type"}
    want = quirk_counts(N_OMNI)
    # ids unique only within a task type: the same id in several task types, key = (task_type, id)
    by_id = Counter(r.id for r in recs)
    assert by_id["0_0"] >= 2 and len({r.key for r in recs}) == N_OMNI
    # several questions share one image (ids N_0, N_1, ...)
    shared = Counter(r.image_path for r in recs)
    assert max(shared.values()) >= 2 and len(shared) < N_OMNI
    assert any(r.id.endswith("_1") and r.id.split("_")[0] == r.image_path.stem for r in recs)
    # empty options: Complex_Logic, answer still 0-3, options drawn into a wider image
    # (at most half of the Complex_Logic items, so each of their families is also asked with listed options)
    empty = [r for r in recs if not r.options]
    per_family = Counter(r.family for r in recs if r.task_type == "Complex_Logic")
    halves = sum(n // 2 for n in per_family.values())
    assert len(empty) == min(want["empty_options"], halves) and all(r.task_type == "Complex_Logic" for r in empty)
    assert all(0 <= r.answer <= 3 and r.image.size[0] > r.image.size[1] for r in empty)
    logic_families = {r.family for r in recs if r.task_type == "Complex_Logic"}
    assert {r.family for r in recs if r.task_type == "Complex_Logic" and r.options} == logic_families
    rep = [r for r in recs if r.options and len(set(r.options)) < len(r.options)]
    assert len(rep) == want["repeated_option"]
    assert all(r.options.count(r.options[r.answer]) == 1 for r in rep)       # the answer itself is never doubled
    assert all(r.family for r in recs)
    assert Counter(r.partition for r in recs) == partition_counts(N_OMNI) == {"base": 60, "sft": 30, "test_only": 30}
    assert all(r.letter == "ABCD"[r.answer] for r in recs)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 401])
def test_partition_counts_sum_to_n(n):
    counts = partition_counts(n)
    assert sum(counts.values()) == n and counts["base"] >= counts["sft"] >= counts["test_only"]


def test_omnispatial_zip_and_nested_folder(omni_root, tmp_path):
    z = zip_folder(omni_root, tmp_path / "OmniSpatial-test.zip")
    assert [r.key for r in load_omnispatial(z)] == [r.key for r in load_omnispatial(omni_root)]
    assert len(load_omnispatial(omni_root.parent)) == N_OMNI                  # parent folder: found one level down


def _real_like(tmp_path):
    """A hand-written real-like folder: no family/partition keys, shared image, empty options, repeated options."""
    root = tmp_path / "OmniSpatial-test"
    for t in ("Complex_Logic", "Perspective_Taking"):
        (root / t).mkdir(parents=True)
        Image.new("RGB", (80, 60)).save(root / t / "0.png")
    data = [
        {"id": "0_0", "question": "Which option?", "options": [], "answer": 3, "task_type": "Complex_Logic",
         "sub_task_type": "Pattern_Recognition"},
        {"id": "0_0", "question": "Left?", "options": ["yes", "no"], "answer": 1, "task_type": "Perspective_Taking",
         "sub_task_type": "Egocentric"},
        {"id": "0_1", "question": "Where?", "options": ["left", "can not determine", "can not determine", "right"],
         "answer": 3, "task_type": "Perspective_Taking", "sub_task_type": "Allocentric"},
    ]
    return root, data


def _write(root, data):
    (root / "data.json").write_text(json.dumps(data))


def test_omnispatial_real_like_quirks(tmp_path):
    root, data = _real_like(tmp_path)
    _write(root, data)
    recs = load_omnispatial(root)
    assert [r.key for r in recs] == [("Complex_Logic", "0_0"), ("Perspective_Taking", "0_0"),
                                     ("Perspective_Taking", "0_1")]
    assert recs[0].options == [] and recs[0].letter == "D" and recs[1].letter == "B"
    assert recs[1].image_path == recs[2].image_path == root / "Perspective_Taking" / "0.png"
    assert recs[0].family is None and recs[0].partition is None


BAD_CASES = {
    "missing image": (lambda d, root: d.append({**d[1], "id": "5_0"}), "missing or corrupt image", "bad_image"),
    "corrupt image": (lambda d, root: (root / "Perspective_Taking" / "0.png").write_bytes(b"garbage"),
                      "missing or corrupt image", "bad_image"),
    "missing field": (lambda d, root: d[1].pop("question"), r"missing field\(s\) \['question'\]", "missing_field"),
    "answer out of range": (lambda d, root: d[1].update(answer=2), "answer 2 out of range for 2 option",
                            "answer_out_of_range"),
    "empty options answer out of A-D": (lambda d, root: d[0].update(answer=4), r"answer 4 out of range .*empty options: A-D",
                                        "answer_out_of_range"),
    "duplicate key": (lambda d, root: d.append(dict(d[2])), r"duplicate key \(task_type, id\)", "duplicate"),
}


def test_omnispatial_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no data.json"):
        load_omnispatial(tmp_path)
    (tmp_path / "data.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_omnispatial(tmp_path)
    bad_zip = tmp_path / "x.zip"
    bad_zip.write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable zip"):
        load_omnispatial(bad_zip)


def test_writes_are_atomic_and_replace(tmp_path):
    root = write_omnispatial(tmp_path / "o", 8, seed=1)
    first = (root / "data.json").read_text()
    root = write_omnispatial(tmp_path / "o", 8, seed=2)
    assert (root / "data.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]               # no temporary folders left behind
    shutil.rmtree(root)


# --- hardening: every bad row named, never a crash elsewhere ---

def _truncated_jpeg() -> bytes:
    """A JPEG cut short: PIL's verify() passes it, only a full decode fails."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) * 2 // 3]


def _with_choices(rows, choices=None, correct=None):
    """Rows with generator columns: row 1 gets `choices`/`correct`, the others none (nulls)."""
    for k, r in enumerate(rows):
        r["choices"], r["correct"] = (choices, correct) if k == 1 else (None, None)
    return rows


ST_BAD_ROWS = {
    "empty answer": (lambda rows: rows[1].update(output="<think>x</think><answer> \n </answer>"),
                     "empty <answer>", "empty_field"),
    "empty question": (lambda rows: rows[1].update(input="<|start_header_id|>user<|end_header_id|>  <|eot_id|>"),
                       "empty question", "empty_field"),
    "answer only inside think": (lambda rows: rows[1].update(output="<think>maybe <answer>B</answer></think> so."),
                                 r"<answer> found only inside <think>", "answer_only_in_think"),
    "truncated image": (lambda rows: rows[1].update(images=[{"bytes": _truncated_jpeg(), "path": None}]),
                        "missing or corrupt image", "bad_image"),
    "non-string choice": (lambda rows: _with_choices(rows, json.dumps(["a", 5, "c", "d"]), 0),
                          "choices: option 1 is int 5, not a string", "bad_options"),
    "five choices": (lambda rows: _with_choices(rows, json.dumps(list("abcde")), 0),
                     "choices has 5 options, more than the 4 letters A-D", "bad_options"),
    "choices not json": (lambda rows: _with_choices(rows, "[not json", 0), "choices is not a JSON list",
                         "bad_options"),
    "correct not an integer": (lambda rows: _with_choices(rows, json.dumps(list("abcd")), "1"),
                               "correct='1' is not an integer", "answer_not_integer"),
    "correct out of range": (lambda rows: _with_choices(rows, json.dumps(list("abcd")), 7),
                             "correct=7 out of range for 4 choices", "answer_out_of_range"),
}


@pytest.mark.parametrize("case", sorted(ST_BAD_ROWS))
def test_spacethinker_bad_row_is_named_or_skipped(tmp_path, case):
    mutate, pattern, reason = ST_BAD_ROWS[case]
    rows = _rows_fixture()
    mutate(rows)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match=rf"train-00000-of-00001\.parquet row 1: {pattern}"):
        load_spacethinker(tmp_path, "train")
    recs = load_spacethinker(tmp_path, "train", on_error="skip")
    assert len(recs) == 3 and recs.report.skipped == Counter({reason: 1})


def test_spacethinker_final_answer_is_the_one_outside_think(tmp_path):
    rows = _rows_fixture()
    rows[0]["output"] = "<think>first <answer>a draft</answer> then</think>\n<answer>2 meters</answer>"
    (tmp_path / "data").mkdir()
    write_parquet(rows, tmp_path / "data" / "train-00000-of-00001.parquet")
    recs = load_spacethinker(tmp_path, "train")
    assert recs[0].answer == "2 meters" and recs[0].reasoning == "first <answer>a draft</answer> then"


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_corrupt_parquet_shard_is_named(st_root, tmp_path, damage):
    root = tmp_path / "st"
    shutil.copytree(st_root, root)
    shard = root / "data" / "train-00001-of-00002.parquet"
    b = shard.read_bytes()
    shard.write_bytes(b[: len(b) // 2] if damage == "truncated" else b[:4] + bytes(len(b) // 2) + b[4 + len(b) // 2:])
    for on_error in ("raise", "skip"):                                     # a broken file is never skipped quietly
        with pytest.raises(DataError, match=r"train-00001-of-00002\.parquet: corrupt or unreadable parquet shard"):
            load_spacethinker(root, "train", on_error=on_error)


def _jpeg_as_png_truncated(d, root):
    (root / "Perspective_Taking" / "0.png").write_bytes(_truncated_jpeg())


OMNI_BAD_CASES = {
    "non-string option": (lambda d, root: d[2].update(options=["left", 3, "up", "right"]),
                          r"options: option 1 is int 3, not a string", "bad_options"),
    "null option": (lambda d, root: d[1].update(options=["yes", None]), r"options: option 1 is NoneType None",
                    "bad_options"),
    "five options": (lambda d, root: d[2].update(options=list("abcde"), answer=0),
                     "options has 5 options, more than the 4 letters A-D", "bad_options"),
    "answer as string": (lambda d, root: d[1].update(answer="1"), r"answer '1' is not an integer",
                         "answer_not_integer"),
    "answer as float": (lambda d, root: d[1].update(answer=1.0), r"answer 1\.0 is not an integer",
                        "answer_not_integer"),
    "answer as bool": (lambda d, root: d[1].update(answer=True), r"answer True is not an integer",
                       "answer_not_integer"),
    "empty question": (lambda d, root: d[1].update(question="  "), "empty question", "empty_field"),
    "question not a string": (lambda d, root: d[1].update(question=["Left?"]), "question is list, not a string",
                              "wrong_type"),
    "image only partly decodable": (_jpeg_as_png_truncated, "missing or corrupt image", "bad_image"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES) + sorted(OMNI_BAD_CASES))
def test_omnispatial_bad_input(tmp_path, case):
    root, data = _real_like(tmp_path)
    mutate, pattern, reason = {**BAD_CASES, **OMNI_BAD_CASES}[case]
    mutate(data, root)
    _write(root, data)
    with pytest.raises(DataError, match=rf"data\.json record \d+ \(task_type=.*id=.*\): {pattern}"):
        load_omnispatial(root)
    recs = load_omnispatial(root, on_error="skip")
    assert recs.report.skipped[reason] >= 1
    assert len(recs) + recs.report.n_skipped == len(data)                    # nothing silently dropped
    assert last_report("omnispatial").as_dict()["n_skipped"] == recs.report.n_skipped



def test_image_damaged_after_loading_names_the_record(tmp_path):
    root, data = _real_like(tmp_path)
    _write(root, data)
    recs = load_omnispatial(root)
    (root / "Perspective_Taking" / "0.png").write_bytes(_truncated_jpeg())
    with pytest.raises(DataError, match=r"0\.png: image of record \(task_type='Perspective_Taking', id='0_0'\) "
                                        r"cannot be decoded"):
        recs[1].image
