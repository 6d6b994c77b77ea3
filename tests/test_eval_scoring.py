"""Both answer scorers on tricky outputs, the official one against the official rule itself, and bootstrap CIs."""
import random
import re

import pytest

from spatialstudy.scoring import (OTHER_FAMILIES, accuracy_block, bootstrap_ci, extract_answer, headline_rows,
                                  letter_table, summarize)


def official_oracle(response: str) -> str:
    """The rule as written in qizekun/OmniSpatial vlms_eval/qwenvl_eval.py (eval_type == "re"), kept verbatim."""
    PATTERN = re.compile(r"Answer\s*:\s*([A-D])\b", re.IGNORECASE)
    pred_letter = PATTERN.findall(response)[-1] if len(PATTERN.findall(response)) > 0 else "A"
    return pred_letter


OPTIONS = ["left of the chair", "right of the chair", "can not determine", "behind the chair"]
REPEATED = ["can not determine", "red cube", "can not determine", "blue ball"]

# text, options, official (letter, parsed), lenient (letter, parsed)
TRICKY = [
    ("Answer: B", OPTIONS, ("B", True), ("B", True)),
    ("Answer: A\nWait, reconsider.\nAnswer: C", OPTIONS, ("C", True), ("C", True)),   # last match wins
    ("answer: c", OPTIONS, ("c", True), ("C", True)),          # official quirk: lower-case letter kept as is
    ("Answer: (B)", OPTIONS, ("A", False), ("B", True)),       # "(" is not \s, so the official rule misses it
    ("**Answer:** C", OPTIONS, ("A", False), ("C", True)),     # "**" sits between ":" and the letter
    ("**Answer: D**", OPTIONS, ("D", True), ("D", True)),
    ("<think>the cup is left</think><answer>B</answer>", OPTIONS, ("A", False), ("B", True)),
    ("<answer>Answer: D</answer>", OPTIONS, ("D", True), ("D", True)),
    ("The answer is D.", OPTIONS, ("A", False), ("D", True)),
    ("the answer is a red cube", OPTIONS, ("A", False), (None, False)),  # article "a", not option A
    ("I think the cup is on the left side.", OPTIONS, ("A", False), (None, False)),  # no answer at all
    ("", OPTIONS, ("A", False), (None, False)),
    ("Answer: E", OPTIONS, ("A", False), (None, False)),       # E is not an option letter
    ("Answer: Apple", OPTIONS, ("A", False), (None, False)),   # \b: "A" inside a word is not a letter
    ("B", OPTIONS, ("A", False), ("B", True)),                 # a bare letter (direct-answer style)
    ("(c)", OPTIONS, ("A", False), ("C", True)),
    ("<answer>(C) can not determine</answer>", OPTIONS, ("A", False), ("C", True)),  # letter leads the reply
    ("B. right of the chair", OPTIONS, ("A", False), ("B", True)),
    ("So the answer is option B.", OPTIONS, ("A", False), ("B", True)),
    ("A cube is left of the chair.", OPTIONS, ("A", False), (None, False)),  # article, not a letter
    ("Answer: right of the chair", OPTIONS, ("A", False), ("B", True)),  # exact option text
    ("behind the chair", OPTIONS, ("A", False), ("D", True)),
    ("<answer>can not determine</answer>", REPEATED, ("A", False), (None, False)),  # ambiguous repeated option
    ("<answer>red cube</answer>", REPEATED, ("A", False), ("B", True)),
    ("Answer: can not determine", REPEATED, ("A", False), (None, False)),
    ("Answer : b\nso the final Answer: A", OPTIONS, ("A", True), ("A", True)),
    ("Answer:\n\nD", OPTIONS, ("D", True), ("D", True)),       # \s* spans newlines
    ("Answer: B", [], ("B", True), ("B", True)),               # options drawn in the image
]


@pytest.mark.parametrize("text,options,official,lenient", TRICKY)
def test_scorers_on_tricky_outputs(text, options, official, lenient):
    assert extract_answer(text, "official", options) == official
    assert extract_answer(text, "lenient", options) == lenient


@pytest.mark.parametrize("text,options,official,lenient", TRICKY)
def test_official_matches_oracle_on_table(text, options, official, lenient):
    assert extract_answer(text, "official")[0] == official_oracle(text)


def test_official_lowercase_quirk_never_scores():
    letter, parsed = extract_answer("answer: c", "official")
    assert parsed and letter == "c" and letter != "C"  # compared case-sensitively with chr(65 + answer)


FRAGMENTS = ["Answer", "answer", "ANSWER", ":", " : ", " ", "\n", "A", "B", "C", "D", "E", "a", "b", "c", "d", "**",
             "(", ")", ".", "x", "Apple", "Bob", "<answer>", "</answer>", "is", "\t", "1", "_"]
FRAGMENTS += ["Answer:", "answer :", "Answer: "] * 4  # enough near-misses and hits to exercise the regex


def test_official_matches_oracle_on_random_strings():
    rng = random.Random(0)
    texts = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    hits = sum(bool(re.search(r"Answer\s*:\s*([A-D])\b", t, re.IGNORECASE)) for t in texts)
    assert hits > 400  # the sample really exercises matches, not only the fallback
    for t in texts:
        letter, parsed = extract_answer(t, "official")
        assert letter == official_oracle(t), t
        assert parsed == bool(re.search(r"Answer\s*:\s*([A-D])\b", t, re.IGNORECASE)), t


def test_lenient_never_defaults_and_returns_upper_case():
    rng = random.Random(1)
    for _ in range(2000):
        t = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 10)))
        letter, parsed = extract_answer(t, "lenient", OPTIONS)
        assert (letter is None) == (not parsed)
        assert letter in (None, "A", "B", "C", "D"), t


def test_unknown_scorer_is_an_error():
    with pytest.raises(ValueError, match="unknown scorer"):
        extract_answer("Answer: A", "strict")


def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    rng = random.Random(0)
    widths = []
    for n in (40, 400, 4000):
        xs = [rng.random() < 0.6 for _ in range(n)]
        block = accuracy_block(xs)
        lo, hi = block["ci95"]
        assert lo <= block["accuracy"] <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert bootstrap_ci([True, False] * 20) == bootstrap_ci([True, False] * 20)  # fixed seed: deterministic
    assert bootstrap_ci([]) is None


def _row(truth, pred_o, pred_l, tt="Perspective_Taking", sub="Egocentric", drawn=False, partition="test_only",
         family=None):
    return {"task_type": tt, "sub_task_type": sub, "partition": partition, "family": family,
            "options_in_image": drawn, "truth": truth, "pred_official": pred_o,
            "parsed_official": pred_o != "A" or truth == "A", "correct_official": pred_o == truth,
            "pred_lenient": pred_l, "parsed_lenient": pred_l is not None, "correct_lenient": pred_l == truth,
            "latency_s": 0.1, "new_tokens": 5}


def test_summarize_groups_controls_and_letter_table():
    rows = [_row("A", "A", None), _row("B", "B", "B", tt="Complex_Logic", sub="Pattern_Recognition"),
            _row("C", "A", "C"), _row("D", "c", "C", partition="base")]
    m = summarize(rows)
    assert m["n"] == m["n_headline"] == 4
    assert m["accuracy_official"] == 50.0 and m["accuracy_lenient"] == 50.0
    assert m["always_A"]["accuracy"] == 25.0
    assert m["scorers"]["lenient"]["parse_failure_rate"] == 25.0
    assert m["scorers"]["official"]["by_partition"]["base"]["accuracy"] == 0.0
    # unparsed per partition, each scorer: the official fallback "A" for C and the lenient None for A (test_only)
    assert m["scorers"]["official"]["parse_failure_by_partition"] == {"base": 0.0, "test_only": pytest.approx(100 / 3)}
    assert m["scorers"]["lenient"]["parse_failure_by_partition"] == {"base": 0.0, "test_only": pytest.approx(100 / 3)}
    assert set(m["scorers"]["official"]["by_sub_task_type"]) == {"Perspective_Taking/Egocentric",
                                                                  "Complex_Logic/Pattern_Recognition"}
    assert letter_table(rows, "lenient") == {"A": {"none": 1}, "B": {"B": 1}, "C": {"C": 1}, "D": {"C": 1}}
    assert letter_table(rows, "official")["D"] == {"c": 1}


def test_accuracy_table_shows_each_scorers_unparsed_share_per_partition():
    from spatialstudy.evaluation.compare import accuracy_table

    rows = [_row("C", "A", "C", partition="base"), _row("B", "B", "B", partition="base"),
            _row("A", "A", None, partition="sft"), _row("D", "D", "D", partition="sft")]
    m = summarize(rows)
    lines = accuracy_table({"m": {**m, "controls": {"blind": m}}})
    cells = {line.split()[1]: line.split()[-7:] for line in lines[1:]}  # partition -> n .. img-blind
    assert cells["overall"][2] == "25.0" and cells["overall"][4] == "25.0"   # official and lenient unparsed
    assert cells["retention"][2:5] == ["50.0", "100.0", "0.0"]             # base: the "A" fallback for C
    assert cells["seen"][2:5] == ["0.0", "50.0", "50.0"]                   # sft: lenient finds no letter for A


def test_drawn_options_leave_the_procedural_headline_only():
    listed = [_row("A", "A", "A"), _row("B", "C", "C", partition="base"), _row("C", "A", None)]
    drawn = [_row("B", "B", "B", drawn=True), _row("D", "D", "D", drawn=True, partition="base")]
    m = summarize(listed + drawn)  # procedural: the two drawn items, both right, stay out of the headline
    assert headline_rows(listed + drawn) == listed
    assert m["n"] == 5 and m["n_headline"] == 3
    assert m["accuracy_official"] == pytest.approx(100 / 3) and m["accuracy_lenient"] == pytest.approx(100 / 3)
    assert m["scorers"]["official"]["by_partition"]["base"]["n"] == 1
    assert m["always_A"]["n"] == 3
    assert m["options_in_image"]["official"] == accuracy_block([True, True])
    assert m["scorers"]["official"]["by_options_location"]["in_image"]["n"] == 2  # every row, headline or not
    real = [{**r, "partition": None} for r in listed + drawn]  # real data: every item in the headline, as published
    assert summarize(real)["n_headline"] == 5 and summarize(real)["accuracy_official"] == 60.0


def test_by_family_only_where_n_reaches_50():
    rows = ([_row("A", "A", "A", family="big")] * 50 + [_row("A", "B", "B", family="small")] * 30
            + [_row("B", "B", "B", family="tiny")] * 10 + [_row("C", "C", "C")] * 5)  # no family: left out
    fam = summarize(rows)["scorers"]["official"]["by_family"]
    assert set(fam) == {"big", OTHER_FAMILIES} and OTHER_FAMILIES == "other (families with n < 50)"
    assert fam["big"] == accuracy_block([True] * 50)
    assert fam[OTHER_FAMILIES]["n"] == 40 and fam[OTHER_FAMILIES]["accuracy"] == 25.0
    assert set(summarize(rows[:50])["scorers"]["official"]["by_family"]) == {"big"}  # no small family: no pool
