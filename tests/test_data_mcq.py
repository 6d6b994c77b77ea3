"""to_mcq on every answer shape, letter balance, unconvertible records; the official prompt strings."""
from collections import Counter

import pytest
from PIL import Image

from spatialstudy.data import (MCQConversionError, SpaceRecord, chat_messages, load_spacethinker, omnispatial_prompt,
                               to_mcq, to_mcq_batch, write_spacethinker)
from spatialstudy.data import prompts as P
from spatialstudy.data.mcq import answer_shape


def rec(question, answer, **kw):
    return SpaceRecord(images=[Image.new("RGB", (8, 8))], question=question, reasoning="I look.", answer=answer,
                       output=f"<think>I look.</think><answer>{answer}</answer>", **kw)


@pytest.fixture(scope="module")
def procedural(tmp_path_factory):
    return load_spacethinker(write_spacethinker(tmp_path_factory.mktemp("st") / "st", 40, 1, seed=3), "train")


def test_procedural_rows_use_exact_choices(procedural):
    for r in procedural:
        m = to_mcq(r, seed=1)
        assert sorted(m.options) == sorted(r.choices) and m.options[m.answer] == r.choices[r.correct]
        assert m.target == f"Answer: {m.letter}" and m.shape == "exact"
    m = to_mcq(procedural[0], seed=1, with_reasoning=True)
    assert m.target.startswith(procedural[0].reasoning) and m.target.endswith(f"\n\nAnswer: {m.letter}")


def test_letters_uniform_and_deterministic(procedural):
    ms, report = to_mcq_batch(procedural, seed=0)
    for n in {len(m.options) for m in ms}:          # balanced among the questions of each option count
        counts = Counter(m.answer for m in ms if len(m.options) == n)
        assert set(counts) == set(range(n)) and max(counts.values()) - min(counts.values()) <= 1, (n, counts)
    assert report["converted"] == 40 and report["skipped"] == 0
    again, _ = to_mcq_batch(procedural, seed=0)
    assert [m.options for m in ms] == [m.options for m in again]
    n0 = len(procedural[0].choices)
    singles = Counter(to_mcq(procedural[0], seed=s).letter for s in range(400))
    assert len(singles) == n0 and min(singles.values()) > 0.7 * 400 / n0   # uniform from the seed


def _correct(m):
    return m.options[m.answer]


@pytest.mark.parametrize("answer, expected_wrong", [
    ("about 1.5 meters", {"about 0.75 meters", "about 2.25 meters", "about 3.75 meters"}),
    ("2\u20133 feet", {"1\u20131.5 feet", "3\u20134.5 feet", "5\u20137.5 feet"}),
    ("Approximately 60 centimeters.", {"Approximately 30 centimeters.", "Approximately 90 centimeters.",
                                       "Approximately 150 centimeters."}),
    ("12 inches", {"6 inches", "18 inches", "30 inches"}),
    ("The red cube is 1.2 meters away from the blue sphere.",
     {"The red cube is 0.6 meters away from the blue sphere.", "The red cube is 1.8 meters away from the blue "
      "sphere.", "The red cube is 3 meters away from the blue sphere."}),
])
def test_numbers_with_units(answer, expected_wrong):
    m = to_mcq(rec("How far is it?", answer), seed=0)
    assert _correct(m) == answer and set(m.options) - {answer} == expected_wrong and m.shape == "number"


@pytest.mark.parametrize("answer, expected", [
    ("Yes, the red cube is above the blue sphere.",
     {"No, the red cube is not above the blue sphere.", "can not determine",
      "No, the blue sphere is not below the red cube."}),
    ("No, the lamp is not to the left of the desk.",
     {"Yes, the lamp is to the left of the desk.", "can not determine", "Yes, the desk is to the right of the lamp."}),
    ("Yes.", {"No.", "can not determine", "Both objects are the same in this respect."}),
])
def test_yes_no(answer, expected):
    m = to_mcq(rec("Is it so?", answer), seed=2)
    assert _correct(m) == answer and set(m.options) - {answer} == expected and m.shape == "yesno"


def test_which_one():
    m = to_mcq(rec("Which is more to the left, the red cube or the blue sphere?", "The blue sphere is more to the "
                   "left."), seed=3)
    assert set(m.options) == {"The blue sphere is more to the left.", "The red cube is more to the left.",
                              "The blue sphere is more to the right.", "can not determine"}
    m = to_mcq(rec("Which is taller, the chair or the table?", "The chair is taller."), seed=3)
    assert set(m.options) == {"The chair is taller.", "The table is taller.", "The chair is shorter.",
                              "can not determine"} and m.shape == "which"


def test_predicate_statement():
    m = to_mcq(rec("Where is the lamp?", "The lamp is behind the sofa."), seed=4)
    assert set(m.options) == {"The lamp is behind the sofa.", "The lamp is in front of the sofa.",
                              "The sofa is behind the lamp.", "can not determine"} and m.shape == "predicate"


@pytest.mark.parametrize("question, answer, reason", [
    ("What colour is it?", "It is a chair.", "unrecognised answer shape"),
    ("Which is taller, the chair or the table?", "Neither of them.", "names neither"),
    ("How far?", "", "empty answer"),
    ("How far?", "0 meters", "repeated options"),
])
def test_unconvertible_is_reported_not_guessed(question, answer, reason):
    with pytest.raises(MCQConversionError, match=reason):
        to_mcq(rec(question, answer), seed=0)


def test_batch_counts_unconvertible():
    recs = [rec("How far?", "about 2 meters"), rec("What?", "It is a chair."), rec("Is it?", "Yes.")]
    ms, report = to_mcq_batch(recs, seed=0)
    assert len(ms) == 2 and report["skipped"] == 1 and report["reasons"] == {"unrecognised answer shape": 1}
    assert report["shapes"] == {"number": 1, "yesno": 1}


def test_answer_shapes():
    assert answer_shape("Is it?", "yes, it is.") == "yesno"
    assert answer_shape("How far?", "10\u201315 meters") == "number"
    assert answer_shape("How far?", "1 meter") == "number"


# The official OmniSpatial texts (qizekun/OmniSpatial vlms_eval), written out independently of prompts.py.
OFFICIAL_RE = "\nEnd your answer with a separate line formatted exactly as:\n\nAnswer: X\nwhere X ∈ {A, B, C, D}.\n"
OFFICIAL_DIRECT = "\nNote: You only need to respond with A, B, C, or D without providing any additional information.\n"
OFFICIAL_MANUAL_COT = """
You are a spatial-reasoning assistant.

Task
-----
You will receive  
1. **Image** - a single RGB frame depicting a scene.  
2. **Question** - a natural-language query about spatial relationships between objects in the image.  
3. **Options** - ≥2 answer candidates, each tagged by a capital letter (A, B, C, D…).

Guidelines
----------
Please follow these steps to analyze the image and answer the question:
1. First, carefully observe the image and identify all relevant objects and their spatial relationships.
2. Next, break down the question into key components that need to be addressed.
3. Think through the spatial reasoning step-by-step to arrive at your answer. It may be necessary to transfer perspective to better understand the scene.
4. Finally, select the most appropriate option (A, B, C, or D) based on your analysis.

Always ground your answer in the visual evidence; do not hallucinate unseen objects.
If uncertain, pick the most plausible option—never refuse or reply “insufficient information.”
"""  # noqa: W291 - the two trailing spaces are part of the benchmark's text


def test_official_prompt_strings():
    assert P.RE_FORMAT == OFFICIAL_RE and P.DIRECT_FORMAT == OFFICIAL_DIRECT
    assert P.MANUAL_COT_SYSTEM_PROMPT == OFFICIAL_MANUAL_COT
    assert "receive  \n" in P.MANUAL_COT_SYSTEM_PROMPT and "scene.  \n" in P.MANUAL_COT_SYSTEM_PROMPT


def test_prompt_composition_and_messages():
    p = omnispatial_prompt("Where is it?", ["left", "right"])
    assert p == OFFICIAL_MANUAL_COT + "\n" + OFFICIAL_RE + "\n\nWhere is it?\nA. left\nB. right"
    assert omnispatial_prompt("Q?", [], style="direct") == OFFICIAL_MANUAL_COT + "\n" + OFFICIAL_DIRECT + "\n\nQ?"
    with pytest.raises(ValueError):
        omnispatial_prompt("Q?", [], style="json")
    img, demo_img = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), "red")
    msgs = chat_messages(p, img, demos=[(demo_img, "Demo q?", "Answer: B")])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"][0] == {"type": "image", "image": demo_img}
    assert msgs[1]["content"] == [{"type": "text", "text": "Answer: B"}]
    assert msgs[2]["content"] == [{"type": "image", "image": img}, {"type": "text", "text": p}]
    assert chat_messages("x", img) == [msgs[2] | {"content": [{"type": "image", "image": img},
                                                              {"type": "text", "text": "x"}]}]


def test_benchmark_record_is_a_clear_error(tmp_path):
    from spatialstudy.data import load_omnispatial, write_omnispatial

    omni = load_omnispatial(write_omnispatial(tmp_path / "omni", 4, seed=0))
    with pytest.raises(TypeError, match=r"to_mcq needs a SpaceThinker-format record .*got OmniRecord \("):
        to_mcq(omni[0], seed=0)
    with pytest.raises(TypeError, match="OmniRecord"):
        to_mcq_batch(omni, seed=0)                  # not counted as an unconvertible row: the wrong kind of input
