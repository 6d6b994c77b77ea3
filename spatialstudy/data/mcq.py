"""to_mcq: a SpaceThinker-format record -> a multiple-choice question whose target ends "Answer: X" (SFT and ICL).

Procedural rows carry the generator's exact options (2-4: only options that can be correct). Real rows get rule-made distractors (the study used an LLM,
which is not available offline), by answer shape:
  yes/no      -> the flipped sentence, "can not determine", and the subject-swapped opposite predicate
                 ("Yes, the A is above the B." -> "No, the B is not below the A."); bare "Yes."/"No." get a generic
                 equality statement as the fourth option
  which-one   -> the other named object, the opposite predicate, "can not determine"
  number+unit -> the numbers scaled x0.5, x1.5, x2.5 (en-dash ranges scale both ends)
  predicate   -> the opposite predicate, the subjects swapped, "can not determine"
A record of any other shape raises MCQConversionError with the reason (the batch helper counts and leaves it out).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from spatialstudy.data.families import CANT
from spatialstudy.data.prompts import omnispatial_prompt

SCALES = (0.5, 1.5, 2.5)
LETTERS = "ABCD"
OPPOSITES = {"to the left of": "to the right of", "left of": "right of", "above": "below",
             "in front of": "behind", "taller than": "shorter than", "wider than": "thinner than",
             "bigger than": "smaller than", "larger than": "smaller than", "higher than": "lower than",
             "closer to": "farther from", "more to the left": "more to the right", "taller": "shorter",
             "wider": "thinner", "bigger": "smaller", "larger": "smaller", "closer": "farther", "higher": "lower"}
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items()) if v not in OPPOSITES})
_PREDS = "|".join(sorted(map(re.escape, OPPOSITES), key=len, reverse=True))
UNITS = r"centimeters?|centimetres?|cm|inches|inch|meters?|metres?|m|feet|foot|ft|seconds?|s"
NUM_UNIT = re.compile(rf"(?P<x>\d+(?:\.\d+)?)(?:\s*(?P<sep>\u2013|-|to)\s*(?P<y>\d+(?:\.\d+)?))?\s*(?P<u>{UNITS})\b",
                      re.IGNORECASE)
YESNO = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)
YESNO_PRED = re.compile(rf"^(?P<yn>yes|no)[,.!]?\s+(?P<a>.+?)\s+(?P<verb>is|are)\s+(?P<neg>not\s+)?"
                        rf"(?P<pred>{_PREDS})\s+(?P<b>.+?)[.!]?$", re.IGNORECASE)
STATEMENT = re.compile(rf"^(?P<a>.+?)\s+(?P<verb>is|are)\s+(?P<pred>{_PREDS})\s+(?P<b>.+?)(?P<end>[.!]?)$",
                       re.IGNORECASE)
WHICH_Q = re.compile(r"\bthe (?P<a>[^,?]+?),? or the (?P<b>[^,?]+?)\s*\?", re.IGNORECASE)
EQUAL_FALLBACK = "Both objects are the same in this respect."


class MCQConversionError(ValueError):
    """The record's answer has a shape the rules cannot turn into four options (never guessed)."""


@dataclass
class MCQ:
    """A 2-4 option question built from a record; `target` is what SFT trains on (ends with 'Answer: X')."""

    question: str
    options: list[str]
    answer: int
    target: str
    images: object = None
    family: str | None = None
    shape: str = ""
    row: int = -1
    source: str = ""

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]

    def prompt(self, style: str = "manual_cot") -> str:
        return omnispatial_prompt(self.question, self.options, style)


def _sentence_case(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fmt_like(orig: str, v: float) -> str:
    """Scaled number with up to two more decimals than the original (x0.5 of 1.5 is 0.75, of 60 is 30)."""
    dec = (len(orig.split(".")[1]) if "." in orig else 0) + 2
    s = f"{v:.{dec}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def numeric_options(answer: str) -> list[str]:
    m = NUM_UNIT.search(answer)
    out = [answer]
    for k in SCALES:
        rep = _fmt_like(m["x"], float(m["x"]) * k)
        if m["y"]:
            rep += f"{m['sep'] if m['sep'] != 'to' else ' to '}{_fmt_like(m['y'], float(m['y']) * k)}"
        num_span = m.span("y")[1] if m["y"] else m.span("x")[1]
        out.append(answer[:m.start()] + rep + answer[num_span:])
    return out


def _flip_yesno(ans: str) -> str:
    yn = YESNO.match(ans)[1]
    other = {"yes": "no", "no": "yes"}[yn.lower()]
    other = other.capitalize() if yn[0].isupper() else other
    body = ans[YESNO.match(ans).end():]
    if re.search(r"\b(is|are)\s+not\b", body):
        body = re.sub(r"\b(is|are)\s+not\b", r"\1", body, count=1)
    else:
        body = re.sub(r"\b(is|are)\b", r"\1 not", body, count=1)
    return ans[:YESNO.match(ans).start(1)] + other + body


def yesno_options(answer: str) -> list[str]:
    m = YESNO_PRED.match(answer.strip())
    if m:
        opp = OPPOSITES[m["pred"].lower()]
        fourth = f"Yes, {m['b']} {m['verb']} {opp} {m['a']}." if m["yn"].lower() == "no" else \
            f"No, {m['b']} {m['verb']} not {opp} {m['a']}."
    else:
        fourth = EQUAL_FALLBACK
    return [answer, _flip_yesno(answer), CANT, fourth]


def which_options(question: str, answer: str) -> list[str]:
    q = WHICH_Q.search(question)
    a, b = q["a"].strip(), q["b"].strip()
    has_a = re.search(rf"\b{re.escape(a)}\b", answer, re.IGNORECASE)
    has_b = re.search(rf"\b{re.escape(b)}\b", answer, re.IGNORECASE)
    if bool(has_a) == bool(has_b):
        raise MCQConversionError(f"which-one answer names {'both' if has_a else 'neither'} of {a!r} / {b!r}")
    named, other = (a, b) if has_a else (b, a)
    swapped = re.sub(rf"\b{re.escape(named)}\b", other, answer, count=1, flags=re.IGNORECASE)
    pred = re.search(rf"\b({_PREDS})\b", answer, re.IGNORECASE)
    third = (answer[:pred.start()] + OPPOSITES[pred[1].lower()] + answer[pred.end():]) if pred else EQUAL_FALLBACK
    return [answer, swapped, third, CANT]


def statement_options(answer: str) -> list[str]:
    m = STATEMENT.match(answer.strip())
    opp = OPPOSITES[m["pred"].lower()]
    return [answer, f"{m['a']} {m['verb']} {opp} {m['b']}{m['end']}",
            f"{_sentence_case(m['b'])} {m['verb']} {m['pred']} {m['a'][:1].lower() + m['a'][1:]}{m['end']}", CANT]


def answer_shape(question: str, answer: str) -> str:
    """'yesno' | 'which' | 'number' | 'predicate' | 'unknown' (checked in this order)."""
    if YESNO.match(answer):
        return "yesno"
    if WHICH_Q.search(question) and re.match(r"\s*which\b", question, re.IGNORECASE):
        return "which"
    if NUM_UNIT.search(answer):
        return "number"
    if STATEMENT.match(answer.strip()):
        return "predicate"
    return "unknown"


def rule_options(question: str, answer: str) -> tuple[list[str], str]:
    """Correct answer first, then three rule-made distractors; raises MCQConversionError if impossible."""
    answer = answer.strip()
    if not answer:
        raise MCQConversionError("empty answer")
    shape = answer_shape(question, answer)
    if shape == "unknown":
        raise MCQConversionError(f"unrecognised answer shape: {answer[:60]!r}")
    opts = {"yesno": lambda: yesno_options(answer), "which": lambda: which_options(question, answer),
            "number": lambda: numeric_options(answer), "predicate": lambda: statement_options(answer)}[shape]()
    if len({o.strip().lower() for o in opts}) < 4:
        raise MCQConversionError(f"{shape} rules give repeated options for {answer[:60]!r}")
    return opts, shape


def _check_training_record(record) -> None:
    """to_mcq builds training targets from SpaceThinker-format records (a text answer, or exact choices); a
    benchmark record (options + answer index, e.g. an OmniRecord) is evaluation data, refused with a clear error."""
    if getattr(record, "choices", None) is not None or isinstance(getattr(record, "answer", None), str):
        return
    name = f"{type(record).__name__} {getattr(record, 'key', '')}".strip()
    raise TypeError(f"to_mcq needs a SpaceThinker-format record (text answer, or choices + correct); got {name}, "
                    "a benchmark-style record whose options and answer index are already an MCQ: use them directly")


def mcq_options(record) -> tuple[list[str], str]:
    """(options with the correct one first, answer shape): the record's exact choices, else rule-made ones."""
    _check_training_record(record)
    choices = getattr(record, "choices", None)
    if choices is not None and getattr(record, "correct", None) is not None:
        return [choices[record.correct]] + [c for i, c in enumerate(choices) if i != record.correct], "exact"
    return rule_options(record.question, record.answer)


def to_mcq(record, seed: int, letter: int | None = None, with_reasoning: bool = False) -> MCQ:
    """An MCQ from a SpaceRecord (or generator Item): the exact 2-4 choices, else four rule-made options; the
    correct letter is uniform from `seed` unless given (a given letter wraps round fewer options)."""
    rng = np.random.default_rng(seed)
    opts, shape = mcq_options(record)
    n = len(opts)
    if not 2 <= n <= 4:
        raise MCQConversionError(f"exact choices have {n} options, need 2 to 4")
    k = int(rng.integers(n)) if letter is None else int(letter) % n
    wrong = [opts[1:][i] for i in rng.permutation(n - 1)]
    options = wrong[:k] + [opts[0]] + wrong[k:]
    target = (record.reasoning.strip() + "\n\n" if with_reasoning and record.reasoning else "") + \
        f"Answer: {LETTERS[k]}"
    return MCQ(record.question, options, k, target, getattr(record, "images", None), getattr(record, "family", None),
               shape, getattr(record, "row", -1), getattr(record, "source", ""))


def to_mcq_batch(records, seed: int = 0, with_reasoning: bool = False) -> tuple[list[MCQ], dict]:
    """Convert many records with exactly balanced letters among the records of each option count; unconvertible
    ones are counted with their reasons."""
    rng = np.random.default_rng(seed)
    letters, out, reasons, examples = {}, [], Counter(), []
    for i, rec in enumerate(records):
        try:
            n = len(mcq_options(rec)[0])
            if not letters.get(n):
                letters[n] = [int(x) for x in rng.permutation(n)]
            out.append(to_mcq(rec, seed * 1_000_003 + i, letters[n][-1], with_reasoning))
            letters[n].pop()
        except MCQConversionError as e:
            reasons[str(e).split(":")[0]] += 1
            if len(examples) < 20:
                examples.append(f"{getattr(rec, 'source', '')} row {getattr(rec, 'row', i)}: {e}")
    report = {"n": len(records), "converted": len(out), "skipped": sum(reasons.values()),
              "reasons": dict(reasons), "examples": examples, "shapes": dict(Counter(m.shape for m in out))}
    return out, report
