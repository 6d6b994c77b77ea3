"""Meaning-based scoring of free-text SpaceThinker answers: does a generated `<answer>` mean what the gold one means?

The shape comes from the gold answer (spatialstudy.data.mcq.answer_shape), and each shape has its own rule:
  number     quantities compared after unit normalisation (lengths to metres, times to seconds) within a relative
             tolerance (default 25 %). A gold range ("1.2-1.5 m", "2–3 feet", "between 1 and 2 meters") accepts
             anything inside it, widened by the tolerance at each end; a predicted range counts by its midpoint.
             A prediction's number without a unit takes the gold's unit (the question asked in it, and the model
             echoes only the value). A gold without a unit takes the one the question asks for ("... in feet?",
             "How many meters ..."); with none there either (a count) the raw numbers are compared.
  yesno      the first "yes"/"no" word of the prediction, case-insensitive. With none, a prediction that states
             the gold's predicate ("The cube is to the right of the sphere.") is scored as a predicate.
  which      the candidate the prediction names first among the two the question offers ("the X or the Y?");
             an opposite predicate ("... is farther") or a negation ("... is not closer") picks the other one.
  predicate  the predicate phrase (OPPOSITES in mcq.py), flipped by a negation ("is not left of" = "right of") and
             by swapped objects ("the B is right of the A" = "the A is left of the B").
  text       everything else (answer_shape's "unknown"): normalised exact match (lower case, no punctuation or
             articles). A gold the rule of its shape cannot read falls back to this, so every gold matches itself.
Answer shapes NUM_UNIT does not know (mm, yards, minutes, bare numbers) are counted as "number" when the gold
holds a number. Imports only from the data layer (tests/test_imports.py).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, NamedTuple

# _PREDS is mcq's alternation of OPPOSITES' phrases, longest first: the same phrases the distractor rules use
from spatialstudy.data.mcq import _PREDS, OPPOSITES, STATEMENT, WHICH_Q, YESNO_PRED, answer_shape

DEFAULT_REL_TOL = 0.25
SHAPES = ("number", "yesno", "which", "predicate", "text")

# --- units: (dimension, factor to the base unit: metres or seconds) ---
_LENGTH = {("mm", "millimeter", "millimeters", "millimetre", "millimetres"): 0.001,
           ("cm", "centimeter", "centimeters", "centimetre", "centimetres"): 0.01,
           ("m", "meter", "meters", "metre", "metres"): 1.0,
           ("km", "kilometer", "kilometers", "kilometre", "kilometres"): 1000.0,
           ("in", "inch", "inches"): 0.0254, ("ft", "foot", "feet"): 0.3048, ("yd", "yard", "yards"): 0.9144}
_TIME = {("s", "sec", "secs", "second", "seconds"): 1.0, ("min", "mins", "minute", "minutes"): 60.0,
         ("hr", "hrs", "hour", "hours"): 3600.0}
UNITS = {name: (dim, f) for dim, table in (("length", _LENGTH), ("time", _TIME))
         for names, f in table.items() for name in names}
# "in" only as a unit when no word follows ("3 in." but not "3 in the corner"); no unit before "/" ("4 m/s").
_UNIT = "(?:" + "|".join(re.escape(u) if u != "in" else r"in(?!\s*[a-z])"
                         for u in sorted(UNITS, key=len, reverse=True)) + r")(?![\w/])"
_NUM = r"(?<![\w.])(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)"
# The hyphen is grouped with the unit so "a 2-meter gap" reads 2 m while "1.2-1.5 m" stays a range; "and" joins a
# range only after "between" (the conditional group), so "3 m and 5 m" stays two values. Possessive runs of spaces
# (*+) are read once: plain ones took 100 s on a number followed by 20,000 spaces.
_QTY = re.compile(rf"(?P<between>\bbetween\s++)?(?P<lo>{_NUM})(?:\s*+-?\s*+(?P<u1>{_UNIT}))?"
                  rf"(?:\s*+(?P<sep>-|\u2013|\u2014|\bto\b|(?(between)\band\b|(?!)))\s*+(?P<hi>{_NUM})"
                  rf"(?:\s*+-?\s*+(?P<u2>{_UNIT}))?)?", re.IGNORECASE)
_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
# Number words only right before a unit ("two meters", "half a meter"): elsewhere "one" is rarely a value.
_WORD_NUM = re.compile(rf"\b(?:(?P<w>{'|'.join(_WORDS)})(?P<half>\s+and\s+a\s+half)?|half(?:\s+an?)?)"
                       rf"(?=\s++{_UNIT})", re.IGNORECASE)

# --- predicates: canonical forms so "to the left of", "left of" and "more to the left" compare equal ---
_ALIASES = {"larger": "bigger", "higher": "above", "lower": "below"}


def _canon(pred: str) -> str:
    """'to the left of' -> 'left', 'closer to' -> 'closer', 'larger than' -> 'bigger'.

    >>> _canon("more to the left"), _canon("Taller than"), _canon("in front of")
    ('left', 'taller', 'in front')
    """
    p = re.sub(r"^(?:more\s+)?to the\s+|\s+(?:of|than|to|from)$", "", pred.lower().strip())
    return _ALIASES.get(p, p)


OPPOSITE = {_canon(k): _canon(v) for k, v in OPPOSITES.items()}
_PRED = re.compile(rf"\b(?:{_PREDS})\b", re.IGNORECASE)


class Quantity(NamedTuple):
    """A value or range as written (lo <= hi), its dimension ('length'/'time', None when bare) and unit factor."""
    lo: float
    hi: float
    dim: str | None
    factor: float


# --- answer text ---

def extract_answer_text(generated: str) -> str:
    """The text of the last <answer> (to the end when it is not closed), else after </think>, else all, stripped.

    >>> extract_answer_text("<think>I see it.</think><answer> 2–3 feet </answer>")
    '2–3 feet'
    >>> extract_answer_text("<think>hm</think> Yes."), extract_answer_text("<answer>About 1 m")
    ('Yes.', 'About 1 m')
    """
    text = generated or ""
    starts = [m.end() for m in re.finditer(r"<answer>", text, re.IGNORECASE)]
    if starts:
        text = re.split(r"</answer>", text[starts[-1]:], flags=re.IGNORECASE)[0]
    elif (ends := [m.end() for m in re.finditer(r"</think>", text, re.IGNORECASE)]):
        text = text[ends[-1]:]
    return re.sub(r"</?(?:think|answer)>", "", text, flags=re.IGNORECASE).strip()


def normalise(text: str) -> str:
    """Lower case without punctuation, articles or extra spaces.

    >>> normalise("The red cube is in the upper-left of the image!")
    'red cube is in upper left of image'
    """
    words = re.sub(r"[^\w\s]", " ", (text or "").lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


# --- numbers ---

def _words_to_digits(text: str) -> str:
    """'two meters' -> '2 meters', 'half a meter' -> '0.5 meter', 'one and a half feet' -> '1.5 feet'."""
    def sub(m):
        if not m["w"]:
            return "0.5"
        return str(_WORDS[m["w"].lower()] + (0.5 if m["half"] else 0))
    return _WORD_NUM.sub(sub, text)


def _quantity(m: re.Match) -> Quantity:
    """A match of _QTY as a Quantity (a range when it has a high end), in the unit written last ("1.2-1.5 m")."""
    lo, hi, u1, u2 = m["lo"], m["hi"], (m["u1"] or "").lower(), (m["u2"] or "").lower()
    a, b = float(lo.replace(",", "")), float((hi or lo).replace(",", ""))
    if u1 and u2 and UNITS[u1][0] == UNITS[u2][0]:    # "1 m to 150 cm": the low end converted to the high end's unit
        a *= UNITS[u1][1] / UNITS[u2][1]
    elif u1 and u2:                                   # "2 m - 3 s" is no range: keep the first value
        b, u2 = a, u1
    dim, factor = UNITS.get(u2 or u1, (None, 1.0))
    return Quantity(min(a, b), max(a, b), dim, factor)


def quantities(text: str) -> list[Quantity]:
    """Every value or range in the text, in order.

    >>> quantities("between 1 and 2 meters, or 70 cm")
    [Quantity(lo=1.0, hi=2.0, dim='length', factor=1.0), Quantity(lo=70.0, hi=70.0, dim='length', factor=0.01)]
    """
    return [_quantity(m) for m in _QTY.finditer(_words_to_digits(text or ""))]


def _pick(qs: list[Quantity], dim: str | None) -> Quantity | None:
    """The first quantity of the wanted dimension, else the first with any unit, else the first bare number."""
    for ok in (lambda q: dim and q.dim == dim, lambda q: q.dim, lambda q: True):
        found = [q for q in qs if ok(q)]
        if found:
            return found[0]
    return None


def _number_key(text: str) -> Quantity | None:
    return _pick(quantities(text), None)


_ASKED_UNIT = re.compile(rf"\b(?:in|how many)\s++(?P<u>{_UNIT})", re.IGNORECASE)


def _gold_number(question: str, gold: str) -> Quantity | None:
    """The gold's quantity; a bare gold takes the unit the question asks for ("... in feet?", "How many meters ...").

    >>> _gold_number("How tall is the cube in centimeters?", "45")
    Quantity(lo=45.0, hi=45.0, dim='length', factor=0.01)
    """
    key = _number_key(gold)
    asked = _ASKED_UNIT.search(question)
    if key is not None and key.dim is None and asked:
        dim, factor = UNITS[asked["u"].lower()]
        key = key._replace(dim=dim, factor=factor)
    return key


def number_match(gold: Quantity, pred: Quantity, rel_tol: float) -> bool:
    """Predicted midpoint inside the gold range widened by rel_tol at each end, in the gold's base unit.

    >>> number_match(Quantity(1.2, 1.5, "length", 1.0), Quantity(180, 180, "length", 0.01), 0.25)
    True
    """
    if gold.dim is None:                       # a bare gold (a count): raw numbers, whatever unit the model wrote
        g_scale, p_scale = 1.0, 1.0
    elif pred.dim is None:                     # a bare prediction takes the gold's unit
        g_scale, p_scale = gold.factor, gold.factor
    elif pred.dim != gold.dim:
        return False
    else:
        g_scale, p_scale = gold.factor, pred.factor
    mid = (pred.lo + pred.hi) / 2 * p_scale
    lo, hi = gold.lo * g_scale, gold.hi * g_scale
    eps = 1e-9 * max(1.0, abs(hi))             # float noise in unit factors must not decide an edge case
    return lo - rel_tol * abs(lo) - eps <= mid <= hi + rel_tol * abs(hi) + eps


# --- names and predicates ---

def _strip_article(name: str) -> str:
    return re.sub(r"^\s*(?:the|a|an)\s+", "", name.strip(" .!,;"), flags=re.IGNORECASE).strip()


def _mentions(text: str, names: list[str]) -> dict[str, int]:
    """First position of each name in text; longer names are blanked first, so "cube" is not found in "red cube".

    >>> _mentions("The red cube is left of the cube.", ["cube", "red cube"])
    {'red cube': 4, 'cube': 28}
    """
    found = {}
    for name in sorted({n for n in names if n}, key=len, reverse=True):
        # lookarounds, not \b: a caption may end in a non-word character ("the man (left)")
        hits = list(re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE))
        if hits:
            found[name] = hits[0].start()
        for h in hits:
            text = text[:h.start()] + " " * (h.end() - h.start()) + text[h.end():]
    return found


def _negated(before: str) -> bool:
    """A negation among the two words before the predicate ("is not left of", "isn't behind")."""
    return any(w in ("not", "never") or w.endswith("n't") for w in before.lower().split()[-2:])


def _first_predicate(text: str) -> tuple[str, str, str] | None:
    """(text before, canonical predicate with negation applied, text after) in the first sentence that has one."""
    for sentence in re.split(r"(?<=[.!?;])\s+", text):
        m = _PRED.search(sentence)
        if m:
            before, pred = sentence[:m.start()], _canon(m.group())
            return before, (OPPOSITE[pred] if _negated(before) else pred), sentence[m.end():]
    return None


def _trim_object(b: str) -> str:
    """The gold's object name without a trailing viewpoint ("the sphere from the viewer's perspective")."""
    return _strip_article(re.split(r",|\s+from\s+(?:the|my|your)\s+(?:viewer|camera)", b, flags=re.IGNORECASE)[0])


def _gold_claim(gold: str) -> tuple[str, str, str] | None:
    """(subject name, canonical predicate, object name) of a gold statement or yes/no sentence, negation applied."""
    m = YESNO_PRED.match(gold.strip()) or STATEMENT.match(gold.strip())   # yes/no first: "Yes, the" is no name
    if not m:
        return None
    pred = _canon(m["pred"])
    if "neg" in m.groupdict() and m["neg"]:
        pred = OPPOSITE[pred]
    return _strip_article(m["a"]), pred, _trim_object(m["b"])


def predicate_of(text: str, subject: str, obj: str) -> str | None:
    """The predicate the text claims of (subject, obj): negation and swapped objects flip it; None if none.

    >>> predicate_of("The blue sphere is not to the left of the red cube.", "red cube", "blue sphere")
    'left'
    """
    found = _first_predicate(text)
    if not found:
        return None
    before, pred, after = found
    s, o = _mentions(before, [subject, obj]), _mentions(after, [subject, obj])
    # Evidence for the gold's order minus evidence for the swapped one; no names at all keeps the gold's order
    # ("It is left of it."), since the question names the objects in that order.
    votes = (subject in s) + (obj in o) - (obj in s) - (subject in o)
    return OPPOSITE[pred] if votes < 0 else pred


# --- which one ---

def _which_pick(text: str, a: str, b: str, q_pred: str | None) -> str | None:
    """The candidate the text names first, switched by an opposite predicate or a negation; None if neither named."""
    pos = _mentions(text, [a, b])
    if not pos:
        return None
    pick = min(pos, key=pos.get)
    found = _first_predicate(text)
    if found and q_pred and found[1] == OPPOSITE.get(q_pred):   # "the B is farther" answers "which is closer"
        pick = b if pick == a else a
    return pick


def _question_pred(question: str) -> str | None:
    m = _PRED.search(question)
    return _canon(m.group()) if m else None


# --- the scorer ---

def _yesno_word(text: str) -> str | None:
    m = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return m[1].lower() if m else None


def _shape(question: str, gold: str) -> str:
    """answer_shape, its "unknown" named "text", and a gold with a number NUM_UNIT misses ("5 yards") a number."""
    shape = answer_shape(question, gold)
    if shape == "unknown":
        return "number" if _number_key(gold) else "text"
    return shape


def _gold_key(shape: str, question: str, gold: str):
    """What the gold answer says in its shape (None when that rule cannot read it)."""
    if shape == "number":
        return _gold_number(question, gold)
    if shape == "yesno":
        return _yesno_word(gold)
    if shape == "which":
        q = WHICH_Q.search(question)
        a, b = q["a"].strip(), q["b"].strip()
        pick = _which_pick(gold, a, b, _question_pred(question))
        return (pick, a, b) if pick else None
    if shape == "predicate":
        return _gold_claim(gold)
    return normalise(gold) or None


def _judge(shape: str, key, question: str, gold: str, pred: str, rel_tol: float) -> tuple[bool, bool, object]:
    """(correct, parsed, what was read from the prediction) for a gold already read as `key`."""
    if shape == "number":
        got = _pick(quantities(pred), key.dim)
        return got is not None and number_match(key, got, rel_tol), got is not None, got
    if shape == "yesno":
        got = _yesno_word(pred)
        claim = _gold_claim(gold)
        if got is None and claim:              # no yes/no word: a statement of what the gold says is true answers it
            stated = predicate_of(pred, claim[0], claim[2])
            return stated == claim[1], stated is not None, stated
        return got == key, got is not None, got
    if shape == "which":
        got = _which_pick(pred, key[1], key[2], _question_pred(question))
        return got == key[0], got is not None, got
    if shape == "predicate":
        got = predicate_of(pred, key[0], key[2])
        return got == key[1], got is not None, got
    got = normalise(pred)
    return bool(got) and got == key, bool(got), got


def meaning_match(question: str, gold: str, predicted: str, *, rel_tol: float = DEFAULT_REL_TOL) -> dict:
    """{"correct", "shape", "parsed", "gold", "predicted"}: does the predicted answer text mean the gold one?

    `predicted` is the answer text (see extract_answer_text); "gold"/"predicted" in the result are what each was
    read as (a Quantity, "yes", a candidate name, a canonical predicate, normalised text).

    >>> meaning_match("How wide is the cube?", "about 70 centimeters", "0.8 m")["correct"]
    True
    >>> meaning_match("Is the cube above the sphere?", "Yes, the cube is above the sphere.", "No.")["correct"]
    False
    >>> meaning_match("How tall is the cube?", "2 feet", "I can't tell.")["parsed"]
    False
    """
    shape = _shape(question, gold)
    key = _gold_key(shape, question, gold)
    if key is None:                            # a gold its shape's rule cannot read is compared as text
        shape, key = "text", normalise(gold)
    correct, parsed, got = _judge(shape, key, question, gold, predicted or "", rel_tol)
    return {"correct": bool(correct), "shape": shape, "parsed": bool(parsed), "gold": key, "predicted": got}


def score_meaning(rows: Iterable[dict], *, rel_tol: float = DEFAULT_REL_TOL) -> dict:
    """Accuracy and parse-failure rate (percent) over rows with "question", "gold" and "generated" (full text).

    Accuracies are None for no rows (as spatialstudy.scoring.accuracy_block does).

    >>> score_meaning([{"question": "Is it left?", "gold": "Yes.", "generated": "<answer>yes</answer>"}])["accuracy"]
    100.0
    """
    results = [meaning_match(r["question"], r["gold"], extract_answer_text(r["generated"]), rel_tol=rel_tol)
               for r in rows]
    groups = defaultdict(list)
    for res in results:
        groups[res["shape"]].append(res["correct"])
    pct = lambda xs: 100.0 * sum(xs) / len(xs) if xs else None
    return {"n": len(results), "accuracy": pct([r["correct"] for r in results]),
            "parse_failure_rate": pct([not r["parsed"] for r in results]),
            "by_shape": {s: {"n": len(v), "accuracy": pct(v)} for s, v in sorted(groups.items())}}
