"""Meaning-based scoring of free-text SpaceThinker answers: a hand-worked table of real-style cases (units, ranges,
tolerance edges, yes/no sentences, which-one, predicates), answer extraction, the aggregate, and the procedural
generator's own answers (each gold must match itself; for closed shapes, the exact options must score as such)."""
import doctest
import time

import pytest

from spatialstudy.data import FAMILIES, make_items
from spatialstudy.data.mcq import OPPOSITES
from spatialstudy.data.writers import spacethinker_items
from spatialstudy.evaluation import meaning
from spatialstudy.evaluation.meaning import (OPPOSITE, SHAPES, _canon, extract_answer_text, meaning_match,
                                             score_meaning)

# Questions in the VQASynth template style (../shared/research/spacethinker.md, section 3).
Q_CLOSE = "How close is the man in red hat walking from the wooden pallet with boxes?"
Q_FEET = "How far is the man in the red hat from the pallet of boxes in feet?"
Q_FAR = "What is the distance between the car and the building?"
Q_DOOR = "How wide is the door?"
Q_TALL = "How tall is the chair?"
Q_TIME = "If the sphere moves straight toward the camera at 4 m/s, how long until it reaches the camera?"
Q_COUNT = "How many chairs are in the image?"
Q_LEFT = "Is the cylinder to the left of the sphere from the viewer's perspective?"
Q_ABOVE = "Is the lamp above the table?"
Q_CLOSER = "Which is closer to the camera, the red cube or the blue sphere?"
Q_WLEFT = "Which is more to the left, the yellow sphere or the green cylinder?"
Q_REL = "Seen from the camera, where is the orange cube relative to the red cube?"
Q_NEAR = "Which object is nearest to the camera?"

# (question, gold, predicted, correct, parsed) with rel_tol 0.25; every expectation worked out by hand.
CASES = [
    # metric answers: units
    (Q_CLOSE, "Approximately 60.13 centimeters.", "about 0.6 meters", True, True),
    (Q_CLOSE, "Approximately 60.13 centimeters.", "60 inches", False, True),           # 152 cm
    (Q_CLOSE, "Approximately 60.13 centimeters.", "about 24 inches", True, True),      # 61 cm
    (Q_CLOSE, "Approximately 60.13 centimeters.", "600 mm", True, True),
    (Q_TALL, "about 3 feet", "36 inches", True, True),
    (Q_TALL, "about 3 feet", "about 0.9 m", True, True),                               # 2.95 ft
    (Q_TALL, "about 3 feet", "3 meters", False, True),
    (Q_TALL, "about 22 inches", "56 cm", True, True),
    (Q_FAR, "The sphere is about 3.4 meters away from the cube.", "roughly 11 feet", True, True),
    (Q_FAR, "5 yards", "4.5 meters", True, True),                                      # 4.9 yd; NUM_UNIT lacks yards
    (Q_FAR, "2 meters", "two meters", True, True),
    (Q_FAR, "about 0.5 meters", "half a meter", True, True),
    (Q_FAR, "1.5 meters", "one and a half meters", True, True),
    # a bare predicted number takes the gold's unit
    (Q_TALL, "about 3 feet", "3", True, True),
    (Q_TALL, "about 3 feet", "It is about 5.", False, True),
    # a gold without a unit (a count) compares the raw numbers
    (Q_COUNT, "3", "3 chairs", True, True),
    (Q_COUNT, "3", "4", False, True),
    (Q_FAR, "3", "3 meters", True, True),                                          # no unit anywhere: raw numbers
    (Q_FAR, "3", "300 cm", False, True),
    # a bare gold takes the unit the question asks for
    ("How tall is the cube in centimeters?", "45", "0.45 m", True, True),
    ("How tall is the cube in centimeters?", "45", "45", True, True),
    ("How many meters apart are the cube and the sphere?", "3", "300 cm", True, True),
    ("How many meters apart are the cube and the sphere?", "3", "3 feet", False, True),
    # ranges in the gold (en dash, hyphen, "between ... and ...")
    (Q_FEET, "2–3 feet", "about 0.8 meters", True, True),                             # 2.6 ft
    (Q_FEET, "2–3 feet", "3.7 feet", True, True),                                     # below 3 * 1.25
    (Q_FEET, "2–3 feet", "1.2 meters", False, True),                                   # 3.94 ft
    (Q_FEET, "2–3 feet", "1.4 feet", False, True),                                     # below 2 * 0.75
    (Q_FAR, "10–15 meters", "between 12 and 14 meters", True, True),
    (Q_FAR, "10–15 meters", "20 meters", False, True),
    (Q_DOOR, "1.2-1.5 m", "1.4 m", True, True),
    (Q_DOOR, "1.2-1.5 m", "2 m", False, True),
    (Q_DOOR, "between 1 and 2 meters", "150 cm", True, True),
    # predicted ranges count by their midpoint
    (Q_FAR, "1.9 meters", "1.5–2.5 meters", True, True),
    (Q_FAR, "1 meter", "1–2 meters", False, True),
    # tolerance edges (inclusive)
    (Q_FAR, "1 meter", "1.25 m", True, True),
    (Q_FAR, "1 meter", "1.26 m", False, True),
    (Q_FAR, "1 meter", "0.75 m", True, True),
    (Q_FAR, "1 meter", "0.74 m", False, True),
    (Q_TALL, "1 foot", "9 inches", True, True),                                      # exactly 25 % below
    (Q_TIME, "about 0.4 seconds", "0.3 seconds", True, True),                          # exactly 25 % below
    # times; "4 m/s" in the answer is not a length
    (Q_TIME, "about 1.1 seconds", "1 second", True, True),
    (Q_TIME, "about 1.1 seconds", "It takes 2 seconds.", False, True),
    (Q_TIME, "about 0.4 seconds", "At 4 m/s it takes 0.45 seconds.", True, True),
    (Q_TIME, "2 minutes", "120 seconds", True, True),
    (Q_TIME, "about 2 seconds", "The sphere is 6 meters away, so it takes 1.8 seconds.", True, True),
    (Q_FAR, "2 meters", "2 seconds", False, True),                                     # another dimension
    (Q_FAR, "2 meters", "I cannot tell from the image.", False, False),
    # yes / no sentences
    (Q_LEFT, "Yes, the cylinder is to the left of the sphere.", "Yes.", True, True),
    (Q_LEFT, "Yes, the cylinder is to the left of the sphere.", "YES, definitely.", True, True),
    (Q_LEFT, "Yes, the cylinder is to the left of the sphere.", "No, it is on the right.", False, True),
    (Q_LEFT, "No, the cylinder is not to the left of the sphere.", "no", True, True),
    (Q_LEFT, "No, the cylinder is not to the left of the sphere.",
     "Yes, the cylinder is to the left of the sphere.", False, True),
    (Q_ABOVE, "No.", "No, the lamp is not above the table.", True, True),
    (Q_ABOVE, "Yes.", "Nothing is in the way; yes, it is.", True, True),               # "nothing" is not "no"
    # no yes/no word: a statement of the gold's predicate answers it
    (Q_LEFT, "No, the cylinder is not to the left of the sphere.", "The cylinder is to the right of the sphere.",
     True, True),
    (Q_LEFT, "No, the cylinder is not to the left of the sphere.", "The sphere is to the right of the cylinder.",
     False, True),
    (Q_LEFT, "Yes, the cylinder is to the left of the sphere.", "I can't tell.", False, False),
    (Q_ABOVE, "Yes.", "The lamp is above the table.", False, False),                   # bare gold: no claim to test
    # which one, both orders of naming
    (Q_CLOSER, "The red cube is closer to the camera.", "The red cube.", True, True),
    (Q_CLOSER, "The red cube is closer to the camera.", "the blue sphere", False, True),
    (Q_CLOSER, "The red cube is closer to the camera.", "The red cube is closer than the blue sphere.", True, True),
    (Q_CLOSER, "The red cube is closer to the camera.", "The blue sphere is closer than the red cube.", False, True),
    (Q_CLOSER, "The red cube is closer to the camera.", "The red cube is closer than the blue sphere, so the red cube.",
     True, True),                                                                  # a name repeated later
    (Q_CLOSER, "The red cube is closer to the camera.", "The blue sphere is farther from the camera than the red cube.",
     True, True),
    (Q_CLOSER, "The red cube is closer to the camera.", "The blue sphere is not closer than the red cube.", True, True),
    (Q_CLOSER, "The blue sphere is closer to the camera.", "The blue sphere", True, True),
    (Q_CLOSER, "The red cube is closer to the camera.", "Neither, they look equally far.", False, False),
    (Q_WLEFT, "The green cylinder is more to the left.", "The green cylinder is to the left of the yellow sphere.",
     True, True),
    (Q_WLEFT, "The green cylinder is more to the left.", "The yellow sphere is to the right of the green cylinder.",
     True, True),
    (Q_WLEFT, "The green cylinder is more to the left.", "The yellow sphere.", False, True),
    # one candidate's name inside the other's
    ("Which is taller, the cube or the red cube?", "The red cube is taller.", "The cube is taller.", False, True),
    ("Which is taller, the cube or the red cube?", "The red cube is taller.", "the red cube", True, True),
    ("Which is taller, the man (left) or the woman?", "The man (left) is taller.", "the man (left)", True, True),
    # predicates: aliases, swapped objects, negation
    (Q_REL, "The orange cube is to the left of the red cube.", "The orange cube is to the left of the red cube.",
     True, True),
    (Q_REL, "The orange cube is to the left of the red cube.", "The orange cube is left of the red cube.", True, True),
    (Q_REL, "The orange cube is to the left of the red cube.", "The red cube is to the right of the orange cube.",
     True, True),
    (Q_REL, "The orange cube is to the left of the red cube.", "The orange cube is not to the left of the red cube.",
     False, True),
    (Q_REL, "The orange cube is to the left of the red cube.", "The orange cube isn't left of the red cube.",
     False, True),
    (Q_REL, "The orange cube is to the left of the red cube.", "The red cube is not to the left of the orange cube.",
     True, True),
    (Q_REL, "The orange cube is to the left of the red cube.", "The orange cube is to the right of the red cube.",
     False, True),
    (Q_REL, "The orange cube is to the left of the red cube.", "It is in front of it.", False, True),
    (Q_REL, "The orange cube is to the left of the red cube.", "I don't know.", False, False),
    ("Seen from the camera, where is the cube relative to the small sphere?", "The cube is behind the small sphere.",
     "The small sphere is in front of the cube.", True, True),
    ("Is the table bigger than the chair?", "The table is bigger than the chair.",
     "The table is larger than the chair.", True, True),
    # everything else: normalised exact text
    (Q_NEAR, "The yellow sphere is nearest to the camera.", "the yellow sphere is nearest to the camera", True, True),
    (Q_NEAR, "The yellow sphere is nearest to the camera.", "The yellow sphere.", False, True),
    (Q_NEAR, "The yellow sphere is nearest to the camera.", "", False, False),
    ("Where is the orange cube from your point of view: on the left, on the right, in front, or behind?",
     "The orange cube is on the right.", "The orange cube is on the left.", False, True),
]


@pytest.mark.parametrize("question,gold,pred,correct,parsed", CASES)
def test_meaning_match_table(question, gold, pred, correct, parsed):
    res = meaning_match(question, gold, pred)
    assert (res["correct"], res["parsed"]) == (correct, parsed), res
    assert res["shape"] in SHAPES


@pytest.mark.parametrize("question,gold,shape", [
    (Q_FEET, "2–3 feet", "number"), (Q_FAR, "5 yards", "number"), (Q_COUNT, "3", "number"),
    (Q_LEFT, "Yes, the cylinder is to the left of the sphere.", "yesno"), (Q_ABOVE, "No.", "yesno"),
    (Q_CLOSER, "The red cube is closer to the camera.", "which"),
    (Q_REL, "The orange cube is to the left of the red cube.", "predicate"),
    (Q_NEAR, "The yellow sphere is nearest to the camera.", "text"),
    (Q_CLOSER, "Both look the same.", "text"),        # a which-gold naming no candidate falls back to text
])
def test_shapes(question, gold, shape):
    assert meaning_match(question, gold, gold)["shape"] == shape


def test_tolerance_is_a_parameter():
    assert not meaning_match(Q_FAR, "1 meter", "1.08 m", rel_tol=0.05)["correct"]
    assert meaning_match(Q_FAR, "1 meter", "1.08 m", rel_tol=0.1)["correct"]
    assert not meaning_match(Q_FEET, "2–3 feet", "3.2 feet", rel_tol=0.0)["correct"]
    assert meaning_match(Q_FEET, "2–3 feet", "2.5 feet", rel_tol=0.0)["correct"]


@pytest.mark.parametrize("gold,pred", [
    ("1 foot", "12 inches"), ("1 foot", "30.48 cm"), ("1 yard", "3 feet"), ("1 m", "100 cm"), ("1 m", "1000 mm"),
    ("1 km", "1000 meters"), ("1 inch", "2.54 centimeters"), ("1 minute", "60 seconds"), ("1 hour", "60 min"),
])
def test_unit_factors_are_exact(gold, pred):
    # at 1 % tolerance only an exact conversion passes, in both directions
    assert meaning_match(Q_FAR, gold, pred, rel_tol=0.01)["correct"]
    assert meaning_match(Q_FAR, pred, gold, rel_tol=0.01)["correct"]


def test_quantities_ranges_and_separate_values():
    lo_hi = lambda text: [(q.lo, q.hi) for q in meaning.quantities(text)]
    assert lo_hi("3 meters and 5 meters") == [(3.0, 3.0), (5.0, 5.0)]     # "and" makes a range only after "between"
    assert lo_hi("between 3 and 5 meters") == [(3.0, 5.0)]
    assert lo_hi("2 to 3 feet, a 2-meter gap, 4 m/s") == [(2.0, 3.0), (2.0, 2.0), (4.0, 4.0)]
    assert meaning.quantities("1 m to 150 cm") == [meaning.Quantity(100.0, 150.0, "length", 0.01)]
    assert lo_hi("2 m - 3 s") == [(2.0, 2.0)]                                    # no range across dimensions
    assert [q.dim for q in meaning.quantities("a 2-meter gap at 4 m/s, 3 in the corner")] == ["length", None, None]


def test_canonical_opposites_agree_with_mcq():
    # every opposite pair of mcq.OPPOSITES must survive canonicalisation, or a flip could land on the wrong side
    for k, v in OPPOSITES.items():
        assert OPPOSITE[_canon(k)] == _canon(v), k
        assert OPPOSITE[OPPOSITE[_canon(k)]] == _canon(k), k


@pytest.mark.parametrize("generated,want", [
    ("<think>\nI can see the man in the red hat ... roughly half a meter.\n</think>\n<answer>\nApproximately 60 "
     "centimeters.\n</answer>", "Approximately 60 centimeters."),
    ("<think>The cube is left.</think> <answer>2–3 feet</answer>", "2–3 feet"),
    ("<think>first</think><answer>1 m</answer> wait, <answer>2 m</answer>", "2 m"),
    ("<think>I compare heights.</think><answer>about 3 feet", "about 3 feet"),          # unclosed final answer
    ("<answer>1 m</answer><answer> Yes, it is", "Yes, it is"),
    ("<think>I compare heights.</think>\nThe red cube is taller.", "The red cube is taller."),
    ("<THINK>x</THINK><ANSWER> No. </ANSWER>", "No."),
    ("  Yes, the lamp is above the table.  ", "Yes, the lamp is above the table."),
    ("<think>never finished", "never finished"),
    ("", ""),
])
def test_extract_answer_text(generated, want):
    assert extract_answer_text(generated) == want


@pytest.mark.parametrize("text", ["1" + " " * 20000 + "x", "2 " + "-" * 20000, "between " * 5000 + "1",
                                  "not " * 5000 + "left of", "<answer>" * 5000, "the red cube " * 3000])
def test_long_adversarial_predictions_are_fast(text):
    # a runaway model can write anything; no rule may backtrack over it (scoring.py's patterns run in linear time)
    start = time.perf_counter()
    for q, g in [(Q_FAR, "2 meters"), (Q_LEFT, "Yes, the cylinder is to the left of the sphere."),
                 (Q_CLOSER, "The red cube is closer to the camera."),
                 (Q_REL, "The orange cube is to the left of the red cube."), (Q_NEAR, "The sphere is nearest.")]:
        meaning_match(q, g, extract_answer_text(text))
    assert time.perf_counter() - start < 1.0


def test_score_meaning_aggregate():
    rows = [
        {"question": Q_FEET, "gold": "2–3 feet", "generated": "<think>..</think><answer>about 0.8 meters</answer>"},
        {"question": Q_FAR, "gold": "1 meter", "generated": "<think>..</think><answer>no idea</answer>"},
        {"question": Q_LEFT, "gold": "Yes, the cylinder is to the left of the sphere.",
         "generated": "<think>It is on the right.</think><answer>No.</answer>"},
        {"question": Q_CLOSER, "gold": "The red cube is closer to the camera.", "generated": "Neither."},
    ]
    out = score_meaning(rows)
    assert out["n"] == 4
    assert out["accuracy"] == pytest.approx(25.0)
    assert out["parse_failure_rate"] == pytest.approx(50.0)
    assert out["by_shape"] == {"number": {"n": 2, "accuracy": pytest.approx(50.0)},
                               "yesno": {"n": 1, "accuracy": pytest.approx(0.0)},
                               "which": {"n": 1, "accuracy": pytest.approx(0.0)}}
    above = [dict(rows[0], generated="<answer>3.5 feet</answer>")]   # above 2-3 feet, within 25 % of 3
    assert (score_meaning(above)["accuracy"], score_meaning(above, rel_tol=0.0)["accuracy"]) == (100.0, 0.0)
    assert score_meaning([]) == {"n": 0, "accuracy": None, "parse_failure_rate": None, "by_shape": {}}


@pytest.fixture(scope="module")
def generated_items():
    """SpaceThinker-format rows of the SFT split plus a few of every family (test-only ones are scored too)."""
    return spacethinker_items("test", 40, 0) + make_items(2 * len(FAMILIES), seed=0, partition=None)


def test_every_generated_gold_matches_itself(generated_items):
    bad = [(it.family, it.free_answer, res) for it in generated_items
           if not ((res := meaning_match(it.question, it.free_answer, it.free_answer))["correct"] and res["parsed"])]
    assert not bad, bad[:5]
    shapes = {meaning_match(it.question, it.free_answer, "")["shape"] for it in generated_items}
    assert shapes == set(SHAPES)


def test_generated_options_score_as_the_generator_says(generated_items):
    """Closed shapes: the correct exact option means the gold answer and every distractor does not (numeric
    options are left out: they are rounded to the options' own unit and meant to be near the truth)."""
    checked = 0
    for it in generated_items:
        if meaning_match(it.question, it.free_answer, "")["shape"] not in ("yesno", "which", "predicate"):
            continue
        for j, opt in enumerate(it.options):
            res = meaning_match(it.question, it.free_answer, opt)
            assert res["correct"] == (j == it.answer), (it.question, it.free_answer, opt, res)
            checked += 1
    assert checked >= 40


def test_docstring_examples():
    assert doctest.testmod(meaning).failed == 0
