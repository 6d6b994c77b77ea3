"""ICL retrieval core (spatialstudy.methods.icl) on the real all-MiniLM-L6-v2, real FAISS and the real tiny
processor: exact retrieval, index reuse by provenance, approximate-index recall, demo formats and controls, and
the prompt budget."""
import dataclasses
import os
import re

import numpy as np
import pytest

from spatialstudy.data import SpaceRecord, load_spacethinker, write_spacethinker
from spatialstudy.data.mcq import LETTERS
from spatialstudy.data.prompts import chat_messages, lettered
from spatialstudy.methods import icl

N_TRAIN, N_TEST = 64, 16
TIE = 1e-5           # squared-L2 gap below which two neighbours count as tied (duplicate questions embed alike)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_spacethinker(tmp_path_factory.mktemp("icl") / "st", N_TRAIN, N_TEST, seed=0)
    return load_spacethinker(root, "train"), load_spacethinker(root, "test")


@pytest.fixture(scope="module")
def encoder():
    return icl.load_encoder()


@pytest.fixture(scope="module")
def flat(data, encoder):
    return icl.DemoIndex.build(data[0], encoder, "flat")


@pytest.fixture(scope="module")
def processor():
    from spatialstudy.models.bases import load_model

    return load_model("tiny-student-random")[1]


def _questions(records):
    return [r.question for r in records]


# ---------------------------------------------------------------- retrieval
def test_the_encoder_is_the_real_minilm(encoder, data):
    vecs = icl.embed(encoder, _questions(data[0][:4]))
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32
    assert icl.encoder_identity(encoder)["name"] == icl.MODEL_NAME
    near = icl.embed(encoder, ["Is the red cube to the left of the blue ball?", "Is the red cube left of the blue "
                               "sphere?", "How tall is the green cylinder in meters?"])
    d = lambda a, b: float(((near[a] - near[b]) ** 2).sum())  # noqa: E731
    assert d(0, 1) < d(0, 2)  # a paraphrase is nearer than another question: semantic, not random, vectors


def _assert_topk(got: list[int], d2: np.ndarray, k: int) -> bool:
    """got (nearest first) is a brute-force top-k of one query; returns whether the top-k was free of ties (then
    the ids must be exactly numpy's)."""
    ref = np.argsort(d2, kind="stable")[:k]
    assert len(got) == k == len(set(got))
    assert np.allclose(d2[got], d2[ref], atol=TIE), (got, ref.tolist())  # same distances, rank by rank
    untied = bool(np.all(np.diff(np.sort(d2)[:k + 1]) > TIE))
    if untied:
        assert got == ref.tolist()
    return untied


@pytest.mark.parametrize("k", [3, 5])
def test_retrieval_equals_brute_force_l2(data, encoder, flat, k):
    train, test = data
    X = icl.embed(encoder, _questions(train)).astype(np.float64)
    Q = icl.embed(encoder, _questions(test)).astype(np.float64)
    d2 = ((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    first = icl.retrieve(flat, encoder, _questions(test), k, order="most_similar_first")
    last = icl.retrieve(flat, encoder, _questions(test), k, order="most_similar_last")
    untied = [_assert_topk(row, d2[i], k) for i, row in enumerate(first)]
    assert sum(untied) >= len(test) // 2  # the exact-id branch really ran
    assert last == [row[::-1] for row in first]
    dist, ids = flat.search(Q.astype(np.float32), k)
    assert ids.tolist() == first and np.allclose(dist, np.sort(d2, axis=1)[:, :k], atol=1e-4)


def test_a_training_question_retrieves_itself(data, encoder, flat):
    ids = icl.retrieve(flat, encoder, _questions(data[0][:10]), 1)
    assert all(flat.questions[row[0]] == data[0][i].question for i, row in enumerate(ids))  # itself or a duplicate


def test_the_query_is_the_question_unless_the_options_are_asked_for(data, encoder, flat):
    """The study queries with the question alone; query_options appends the item's options, and the demo plan
    retrieves with whichever text the config asks for."""
    from types import SimpleNamespace

    from spatialstudy.configs import ICLConfig

    question = data[0][0].question
    item = SimpleNamespace(question=question, options=["left", "right", "behind"])
    assert icl.query_text(item) == icl.query_text(item, False) == question
    assert icl.query_text(item, True) == f"{question} left right behind"
    assert icl.query_text(SimpleNamespace(question="Where?", options=None), True) == "Where?"   # real rows: none
    item.key = ("Perspective_Taking", "0")
    for with_options in (False, True):   # the plan retrieves with the configured query text
        plan = icl.DemoPlan(ICLConfig(query_options=with_options), data[0], [item], flat, encoder, None)
        want = icl.retrieve(flat, encoder, [icl.query_text(item, with_options)], 5, "most_similar_first")[0]
        assert plan.nearest[item.key] == want
    assert np.abs(icl.embed(encoder, [question]) - icl.embed(encoder, [icl.query_text(item, True)])).max() > 1e-3


def test_retrieve_rejects_an_unknown_order_and_caps_k(data, encoder, flat):
    with pytest.raises(ValueError, match="order"):
        icl.retrieve(flat, encoder, ["q"], 3, order="random")
    assert [len(r) for r in icl.retrieve(flat, encoder, ["a question", "another"], N_TRAIN + 10)] == [N_TRAIN] * 2


def test_family_match_rate():
    train_fams = ["a", "a", "b", None]
    assert icl.family_match_rate(["a", "b"], [[0, 1], [0, 2]], train_fams) == 0.75
    assert icl.family_match_rate([None, "a"], [[2], [3]], train_fams) == 0.0  # query without a family: not counted
    assert np.isnan(icl.family_match_rate([None], [[0]], train_fams))


# ---------------------------------------------------------------- reuse by provenance
def _age(path):
    os.utime(path, ns=(10**18, 10**18))  # an old mtime: any rewrite shows, however coarse the clock
    return path.stat().st_mtime_ns


def test_index_is_reused_when_nothing_changed_and_rebuilt_when_the_data_does(tmp_path, data, encoder):
    train, test = data
    out = tmp_path / "index"
    first, rebuilt = icl.load_or_build(out, train, encoder, "flat")
    assert rebuilt and (out / icl.INDEX_FILE).exists() and (out / icl.META_FILE).exists()
    old = _age(out / icl.INDEX_FILE)
    again, rebuilt = icl.load_or_build(out, train, encoder, "flat")
    assert not rebuilt and (out / icl.INDEX_FILE).stat().st_mtime_ns == old
    Q = icl.embed(encoder, _questions(test))
    assert np.array_equal(first.search(Q, 4)[1], again.search(Q, 4)[1])
    relabelled = [dataclasses.replace(r, family="other") if i == 3 else r for i, r in enumerate(train)]
    again, rebuilt = icl.load_or_build(out, relabelled, encoder, "flat")  # families are not in the vectors ...
    assert not rebuilt and again.families[3] == "other"                 # ... but come from the records given

    edited = list(train)
    edited[7] = dataclasses.replace(train[7], question="Where is the purple teapot relative to the lamp?")
    changed, rebuilt = icl.load_or_build(out, edited, encoder, "flat")
    assert rebuilt and (out / icl.INDEX_FILE).stat().st_mtime_ns != old
    assert icl.retrieve(changed, encoder, [edited[7].question], 1) == [[7]]  # the new vectors, not the old ones
    assert not icl.load_or_build(out, edited, encoder, "flat")[1]


def test_index_is_rebuilt_for_another_index_type_encoder_or_a_damaged_file(tmp_path, data, encoder):
    train = data[0]
    out = tmp_path / "index"
    assert icl.load_or_build(out, train, encoder, "flat")[1]
    assert icl.load_or_build(out, train, encoder, "hnsw")[1]
    assert not icl.load_or_build(out, train, encoder, "hnsw")[1]
    saved = dict(encoder.spatialstudy_identity)
    try:
        encoder.spatialstudy_identity = {**saved, "version": "9.9"}  # another model release: another index
        assert icl.load_or_build(out, train, encoder, "hnsw")[1]
    finally:
        encoder.spatialstudy_identity = saved
    assert icl.load_or_build(out, train, encoder, "hnsw")[1]
    (out / icl.INDEX_FILE).write_bytes(b"not a faiss index")
    index, rebuilt = icl.load_or_build(out, train, encoder, "hnsw")
    assert rebuilt and len(index) == N_TRAIN


def test_nprobe_is_a_search_setting_not_a_rebuild(tmp_path, data, encoder):
    out = tmp_path / "ivf"
    assert icl.load_or_build(out, data[0], encoder, "ivf", nprobe=1)[1]
    index, rebuilt = icl.load_or_build(out, data[0], encoder, "ivf", nprobe=3)
    assert not rebuilt and index.nprobe == 3


def test_build_rejects_an_unknown_index_type(data, encoder):
    with pytest.raises(ValueError, match="index_type"):
        icl.DemoIndex.build(data[0], encoder, "lsh")


# ---------------------------------------------------------------- approximate indexes
def test_the_stage_reports_an_approximate_index_recall_against_flat(tmp_path, monkeypatch, data, encoder, flat):
    from types import SimpleNamespace

    from spatialstudy.configs import ICLConfig

    monkeypatch.setenv("SPATIALSTUDY_ROOT", str(tmp_path))   # the flat index is built into this cache
    train, test = data
    ivf = icl.DemoIndex.build(train, encoder, "ivf", nprobe=1)
    plan = SimpleNamespace(train=train, encoder=encoder, index=ivf)
    assert icl.recall_vs_flat("ci", ICLConfig(), plan, test) is None          # the flat index is exact
    got = icl.recall_vs_flat("ci", ICLConfig(index_type="ivf", ks=[3], best="mcq/4"), plan, test)
    want = icl.recall_at_k(ivf, flat, icl.embed(encoder, _questions(test)), 4)
    assert got == {"k": 4, "recall": want, "n_queries": len(test)} and 0 < want <= 1
    assert (tmp_path / "runs" / "cache" / "icl_index" / "ci-flat").is_dir()


def test_approximate_indexes_recall_against_flat(data, encoder, flat):
    train, test = data
    Q = icl.embed(encoder, _questions(test) + _questions(train[::4]))
    ivf = icl.DemoIndex.build(train, encoder, "ivf", nprobe=2)
    hnsw = icl.DemoIndex.build(train, encoder, "hnsw")
    nlist = ivf.provenance["index_params"]["nlist"]
    assert nlist == round(np.sqrt(N_TRAIN)) and ivf.index.nlist == nlist and hnsw.index.hnsw.nb_neighbors(1) == 32
    recall = {name: icl.recall_at_k(ix, flat, Q, 5) for name, ix in (("ivf", ivf), ("hnsw", hnsw))}
    print(f"recall@5 vs flat on {len(Q)} queries, {N_TRAIN} rows: ivf (nprobe 2/{nlist}) {recall['ivf']:.3f}, "
          f"hnsw (M=32) {recall['hnsw']:.3f}")
    assert recall["hnsw"] >= 0.95 and recall["ivf"] >= 0.5
    assert icl.recall_at_k(flat, flat, Q, 5) == 1.0
    ivf.nprobe = nlist  # every list visited: exhaustive, so exact
    assert icl.recall_at_k(ivf, flat, Q, 5) == 1.0
    assert icl.recall_at_k(ivf.index, flat.index, Q, 5) == 1.0  # raw faiss indexes work too


# ---------------------------------------------------------------- demos
def _pixels(image):
    return np.asarray(image)


def test_naive_and_mcq_demos_differ_in_answer_format_only(data):
    for row, rec in enumerate(data[0][:12]):
        naive, mcq = icl.demo_naive(rec), icl.demo_mcq(rec, seed=row)
        assert np.array_equal(_pixels(naive["image"]), _pixels(mcq["image"]))
        assert naive["question"] == rec.question and mcq["question"].startswith(rec.question + "\nA. ")
        assert naive["answer"] == f"<think>{rec.reasoning.strip()}</think>\n<answer>{rec.answer.strip()}</answer>"
        assert mcq["answer"] == f"{rec.reasoning.strip()}\n\nAnswer: {mcq['letter']}"
        options = re.findall(r"\n[A-D]\. (.*)", mcq["question"])
        assert len(options) == mcq["n_options"] == len(rec.choices)
        assert options[LETTERS.index(mcq["letter"])] == rec.choices[rec.correct]  # the letter is the right one
        assert mcq["question"] == lettered(rec.question, options)


def test_demo_mcq_is_none_for_an_unconvertible_row_and_demos_for_skips_it(data):
    odd = SpaceRecord(images=[], question="Describe the scene.", reasoning="r", answer="a nice scene", output="")
    assert icl.demo_mcq(odd, 0) is None and icl.demo_naive(odd)["image"] is None
    rows = [data[0][0], odd, data[0][1]]
    assert [d["question"].split("\n")[0] for d in icl.demos_for(rows, [0, 1, 2], "mcq")] == \
        [rows[0].question, rows[2].question]
    assert len(icl.demos_for(rows, [0, 1, 2], "naive")) == 3
    a, b = icl.demos_for(rows, [0], "mcq", seed=5)[0], icl.demos_for(rows, [2, 0], "mcq", seed=5)[1]
    assert a["question"] == b["question"] and a["answer"] == b["answer"]  # a row looks the same in every prompt


def _option_count(question):
    return len(re.findall(r"\n[A-D]\. ", question))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_shuffled_mcq_demos_keep_image_and_question_and_show_a_valid_other_letter(data, seed):
    demos = icl.demos_for(data[0], range(10), "mcq", seed=seed)
    shuffled = icl.label_shuffled(demos, np.random.default_rng(seed))
    sources = [s["shuffled_from"] for s in shuffled]
    assert sorted(sources) == list(range(len(demos))) and all(j != i for i, j in enumerate(sources))
    for d, s in zip(demos, shuffled):
        assert s["image"] is d["image"] and s["question"] == d["question"]
        body, letter = s["answer"].rsplit("Answer: ", 1)
        assert body == d["answer"].rsplit("Answer: ", 1)[0]          # its own reasoning: only the letter moves
        assert LETTERS.index(letter) < _option_count(d["question"])  # valid for its own options
        assert letter == LETTERS[LETTERS.index(demos[s["shuffled_from"]]["letter"]) % d["n_options"]]
    assert any(s["answer"] != d["answer"] for d, s in zip(demos, shuffled))
    assert [d["answer"][-1] for d in demos] == [d["letter"] for d in demos]  # the input is left alone


def test_label_shuffled_free_text_demos_swap_the_answer_tag_only(data):
    demos = icl.demos_for(data[0], range(6), "naive")
    shuffled = icl.label_shuffled(demos, 3)
    for d, s in zip(demos, shuffled):
        source = demos[s["shuffled_from"]]
        assert s["image"] is d["image"] and s["question"] == d["question"]
        assert s["answer"].split("<answer>")[0] == d["answer"].split("<answer>")[0]
        assert s["answer"].split("<answer>")[1] == source["answer"].split("<answer>")[1]
    assert icl.label_shuffled(demos[:1], 0) == demos[:1]  # no other label to show
    tuples = icl.label_shuffled([(None, "q1", "a1"), (None, "q2", "a2")], 0)
    assert [(t["question"], t["answer"]) for t in tuples] == [("q1", "a2"), ("q2", "a1")]


def test_random_demos_are_distinct_training_ids_with_the_same_k():
    ids = icl.random_demos(N_TRAIN, 5, np.random.default_rng(0))
    assert len(ids) == 5 == len(set(ids)) and all(0 <= i < N_TRAIN for i in ids)
    assert ids == icl.random_demos(N_TRAIN, 5, 0) and ids != icl.random_demos(N_TRAIN, 5, 1)
    assert sorted(icl.random_demos(3, 5, 0)) == [0, 1, 2]


# ---------------------------------------------------------------- prompt budget
@pytest.mark.parametrize("size", [(112, 112), (640, 480), (30, 200), (1000, 28)])
def test_image_tokens_match_the_processor(processor, size):
    from PIL import Image

    from spatialstudy.models.qwen import make_processor

    wide = make_processor(processor.tokenizer, 4 * 28 * 28, 64 * 28 * 28)
    for proc in (processor, wide):
        grid = proc.image_processor(images=[Image.new("RGB", size)])["image_grid_thw"][0]
        assert icl.image_tokens(proc, size) == int(np.prod(grid)) // proc.image_processor.merge_size ** 2


def _query(record):
    return chat_messages(lettered(record.question, record.choices), record.images[0])


def test_prompt_and_demo_tokens_are_exact(processor, data):
    demos = icl.demos_for(data[0], range(3), "mcq")
    msgs = chat_messages(lettered(data[1][0].question, data[1][0].choices), data[1][0].images[0], demos)
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    images = [c["image"] for m in msgs for c in m["content"] if c["type"] == "image"]
    real = len(processor(text=[text], images=images)["input_ids"][0])
    assert icl.prompt_tokens(processor, msgs) == real
    assert icl.prompt_tokens(processor, _query(data[1][0])) + sum(icl.demo_tokens(processor, d) for d in demos) == real


def test_fit_budget_drops_the_least_similar_demos_and_counts_them(processor, data):
    small = {"image": None, "question": "Is it?", "answer": "Answer: A"}  # the least similar, and the cheapest
    demos = [small] + icl.demos_for(data[0], range(3), "mcq")  # most_similar_last: demos[-1] is the nearest
    cost = [icl.demo_tokens(processor, d) for d in demos]
    assert cost[0] < min(cost[1:]) - 1  # so a greedy packer (not the rule) would keep it after an overflow
    q = icl.prompt_tokens(processor, _query(data[1][0]))
    assert icl.fit_budget(demos, processor, q + sum(cost) + 100, q) == (demos, 0)
    assert icl.fit_budget(demos, processor, None, q) == (demos, 0)
    kept, dropped = icl.fit_budget(demos, processor, q + cost[-1] + cost[-2], q)
    assert kept == demos[-2:] and dropped == 2
    kept, dropped = icl.fit_budget(demos, processor, q + cost[-1] + cost[-2] - 1, q)
    assert kept == demos[-1:] and dropped == 3
    kept, dropped = icl.fit_budget(demos, processor, q + cost[0] + cost[1], q, order="most_similar_first")
    assert kept == demos[:2] and dropped == 2
    assert icl.fit_budget(demos, processor, q - 50, q) == ([], 4)  # the query alone overflows: no demo, no error
    assert icl.fit_budget([], processor, 10, q) == ([], 0)
