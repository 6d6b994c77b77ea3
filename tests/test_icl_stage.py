"""The 03_icl stage's demo plan: prompt structure with the real processor, the budget, and controls that differ from
retrieval only in what they are said to differ in (real MiniLM, real FAISS, real Qwen2.5-VL processor)."""
import numpy as np
import pytest

from spatialstudy.configs import ICLConfig
from spatialstudy.data import load_omnispatial, load_spacethinker, write_omnispatial, write_spacethinker
from spatialstudy.evaluation.eval import build_messages
from spatialstudy.methods import icl

K = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from spatialstudy.models.bases import load_model

    tmp = tmp_path_factory.mktemp("icl")
    train = list(load_spacethinker(write_spacethinker(tmp / "st", 40, 2, seed=3), "train"))
    records = [r for r in load_omnispatial(write_omnispatial(tmp / "omni", 12, seed=4)) if r.options]
    _, processor = load_model("tiny-student-random")
    encoder = icl.load_encoder()
    index = icl.DemoIndex.build(train, encoder)
    return train, records, index, encoder, processor


def plan_for(setup, **cfg_kw):
    train, records, index, encoder, processor = setup
    cfg = ICLConfig(ks=[K], best=f"mcq/{K}", **cfg_kw)
    return icl.DemoPlan(cfg, train, records, index, encoder, processor), records


def settings_by_name(**cfg_kw):
    return {s.name: s for s in icl.stage_settings(ICLConfig(ks=[K], best=f"mcq/{K}", **cfg_kw))}


def test_settings_are_zero_shot_retrieved_and_the_controls_at_best():
    names = list(settings_by_name())
    assert names == ["zero_shot", f"naive_k{K}", f"mcq_k{K}", f"mcq_k{K}_random", f"mcq_k{K}_shuffled"]


@pytest.mark.parametrize("fmt", ["naive", "mcq"])
def test_prompt_has_k_demo_turns_then_the_query(setup, fmt):
    plan, records = plan_for(setup)
    setting = settings_by_name()[f"{fmt}_k{K}"]
    for record in records[:4]:
        msgs = build_messages(record, "manual_cot", demos=plan.demos(setting, record))
        roles = [m["role"] for m in msgs]
        assert roles == ["user", "assistant"] * K + ["user"]
        images = [c for m in msgs for c in m["content"] if c["type"] == "image"]
        assert len(images) == K + 1                      # one per demo, then the query's
        text = plan.processor.apply_chat_template(msgs, tokenize=False)
        assert text.count("<|image_pad|>") == K + 1
        assert ("Answer:" in msgs[1]["content"][0]["text"]) == (fmt == "mcq")
        assert ("<answer>" in msgs[1]["content"][0]["text"]) == (fmt == "naive")
        assert msgs[-1]["content"][-1]["text"].endswith(record.options[-1])   # the query's own options close it


def test_order_puts_the_nearest_demo_next_to_the_query(setup):
    last, records = plan_for(setup, order="most_similar_last")
    first, _ = plan_for(setup, order="most_similar_first")
    setting = settings_by_name()[f"mcq_k{K}"]
    for record in records[:4]:
        assert last.ids(setting, record) == first.ids(setting, record)[::-1]
        _, nearest = last.index.search(icl.embed(last.encoder, [record.question]), 1)
        assert last.ids(setting, record)[-1] == int(nearest[0][0])


def test_budget_drops_demos_and_counts_them(setup):
    plan, records = plan_for(setup, max_prompt_tokens=200)
    setting = settings_by_name()[f"mcq_k{K}"]
    kept = [len(plan.demos(setting, r)) for r in records]
    assert min(kept) < K and plan.dropped[setting.name] == sum(K - n for n in kept) > 0
    roomy, _ = plan_for(setup, max_prompt_tokens=100_000)
    assert all(len(roomy.demos(setting, r)) == K for r in records) and roomy.dropped[setting.name] == 0


def _pixels(image) -> bytes:
    return np.asarray(image).tobytes()


def test_shuffled_demos_change_only_the_answer_letter(setup):
    plan, records = plan_for(setup)
    by = settings_by_name()
    changed = 0
    for record in records:
        retrieved = plan.demos(by[f"mcq_k{K}"], record)
        shuffled = plan.demos(by[f"mcq_k{K}_shuffled"], record)
        assert [d["question"] for d in shuffled] == [d["question"] for d in retrieved]
        assert [_pixels(d["image"]) for d in shuffled] == [_pixels(d["image"]) for d in retrieved]
        for r, s in zip(retrieved, shuffled):
            head_r, _, letter_r = r["answer"].rpartition("Answer: ")
            head_s, _, letter_s = s["answer"].rpartition("Answer: ")
            assert head_r == head_s and letter_s in "ABCD"[:r["n_options"]]
            changed += letter_r != letter_s
    assert changed > 0


def test_random_demos_are_k_training_rows_other_than_the_retrieved(setup):
    plan, records = plan_for(setup)
    by = settings_by_name()
    overlap = 0
    for record in records:
        rand = plan.ids(by[f"mcq_k{K}_random"], record)
        near = plan.ids(by[f"mcq_k{K}"], record)
        assert len(rand) == len(set(rand)) == K and all(0 <= i < len(plan.train) for i in rand)
        overlap += len(set(rand) & set(near))
        assert plan.ids(by[f"mcq_k{K}_random"], record) == rand     # seeded per item: the same every call
    assert overlap < K * len(records) / 2


def test_colour_entries_rerun_the_best_setting_on_transformed_query_images(setup, tmp_path):
    """05_grayscale reads the best ICL's grayscale run from here: the same demos (prompt tokens as in the original
    run), only the query image transformed; the run's config hash and prediction file name carry the transform."""
    from spatialstudy.evaluation.eval import evaluate
    from spatialstudy.models.bases import load_model

    plan, records = plan_for(setup, colour_transforms=["grayscale"], formats=["mcq"])
    model, processor = load_model("tiny-student-random")
    best = next(s for s in icl.stage_settings(plan.cfg) if s.name == f"mcq_k{K}")
    original = evaluate(model, processor, records, tmp_path, icl.eval_settings(plan.cfg, best, plan, "h"))
    colour = icl.colour_entries(model, processor, records, tmp_path, plan.cfg, plan, "h")
    assert list(colour) == ["grayscale"]
    gray = colour["grayscale"]
    assert gray["n"] == original["n"] == len(records) and gray["config_hash"] != original["config_hash"]
    assert "grayscale" in gray["predictions"] and gray["predictions"] != original["predictions"]
    with pytest.raises(ValueError, match="colour_transforms"):
        ICLConfig(colour_transforms=["sepia"])
