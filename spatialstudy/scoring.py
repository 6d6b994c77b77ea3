"""Answer extraction (official and lenient scorers) and accuracy summaries with bootstrap CIs.

Two scorers are always reported side by side and never mixed:
  official  exactly OmniSpatial's `re` rule (qizekun/OmniSpatial vlms_eval/qwenvl_eval.py): the LAST
            case-insensitive match of `Answer\\s*:\\s*([A-D])\\b`, "A" when nothing matches. Two quirks are
            kept on purpose, because they are part of every published OmniSpatial number:
            * the fallback "A" scores an unparseable output as correct whenever the truth is A (~25 %);
            * the match is case-insensitive but the comparison is not: "answer: c" yields "c", which never
              equals the upper-case truth "C", so a lower-case answer is always wrong.
  lenient   also accepts what models really write (<answer>B</answer>, **Answer:** C, Answer: (B),
            "the answer is D", lower case, a bare letter, the exact text of one option); no default letter,
            an unparsed output is simply wrong, and text matching a repeated option string is ambiguous.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

SCORERS = ("official", "lenient")
LETTERS = "ABCD"
OFFICIAL_DEFAULT = "A"  # the official script's fallback when no "Answer: X" is found
OFFICIAL_PATTERN = re.compile(r"Answer\s*:\s*([A-D])\b", re.IGNORECASE)  # verbatim from the official script

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed, so a CI is a pure function of the predictions
CI_LEVEL = 0.95

_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
# "Answer: B", "**Answer:** C", "Answer: (B)", "The answer is D", "final answer - c." ...
_PHRASE = re.compile(r"answer(?:\s+is)?(?:\s+option)?[\s*_]*[:：\-]?[\s*_]*[(\[]?\s*"
                     r"([A-Da-d])(?![A-Za-z0-9])(\s*[)\]]?)(.?)", re.IGNORECASE)
_BARE = re.compile(r"^[\s*_]*[(\[]?([A-Da-d])[)\].:]?[\s*_]*$")
_LEADING = re.compile(r"^[\s*_]*(?:\(([A-Da-d])\)|([A-D])[.):])")  # "(C) above", "C. above" as the reply's start
_STRIP = " \t\n*_`'\".,;:!()[]"


def extract_official(text: str) -> tuple[str, bool]:
    """The official rule: last match of OFFICIAL_PATTERN, case preserved; ("A", False) when nothing matches."""
    found = OFFICIAL_PATTERN.findall(text or "")
    return (found[-1], True) if found else (OFFICIAL_DEFAULT, False)


def _letter_from_phrase(text: str) -> str | None:
    """Last "answer ... X" phrase; a lower-case x must end the phrase, so "the answer is a cube" is not "A"."""
    for m in reversed(list(_PHRASE.finditer(text))):
        letter, closer, after = m.group(1), m.group(2), m.group(3)
        if letter.isupper() or closer.strip() or after in ("", ".", ",", ";", "!", "\n", "*"):
            return letter.upper()
    return None


def _letter_from_option_text(text: str, options: Sequence[str] | None) -> tuple[str | None, bool]:
    """Exact (case/punctuation-insensitive) option text -> (letter, ambiguous)."""
    if not options:
        return None, False
    norm = [o.strip(_STRIP).lower() for o in options]
    want = text.strip(_STRIP).lower()
    hits = [i for i, o in enumerate(norm) if o and o == want]
    if len(hits) > 1:
        return None, True  # the same string under two letters: no honest way to pick one
    return (LETTERS[hits[0]] if hits else None), False


def _lenient_segment(text: str, options: Sequence[str] | None) -> tuple[str | None, bool]:
    """Letter from one piece of text: phrase, bare letter, then option text; (letter, ambiguous)."""
    letter = _letter_from_phrase(text)
    if letter:
        return letter, False
    bare = _BARE.match(text) or _LEADING.match(text)
    if bare:
        return next(g for g in bare.groups() if g).upper(), False
    tail = re.split(r"answer(?:\s+is)?\s*[:：]?", text, flags=re.IGNORECASE)[-1]
    for piece in dict.fromkeys([tail, text]):  # the text after the last "answer:", then all of it
        letter, ambiguous = _letter_from_option_text(piece, options)
        if letter or ambiguous:
            return letter, ambiguous
    return None, False


def extract_lenient(text: str, options: Sequence[str] | None = None) -> tuple[str | None, bool]:
    """Lenient rule: <answer> tag content first (last tag), then the whole text; (None, False) when unparsed."""
    text = text or ""
    tags = _TAG.findall(text)
    for piece in ([tags[-1]] if tags else []) + [text]:
        letter, ambiguous = _lenient_segment(piece, options)
        if ambiguous:
            return None, False
        if letter:
            return letter, True
    return None, False


def extract_answer(text: str, scorer: str = "official", options: Sequence[str] | None = None):
    """(letter, parsed) under `scorer`; official falls back to ("A", False), lenient to (None, False)."""
    if scorer == "official":
        return extract_official(text)
    if scorer == "lenient":
        return extract_lenient(text, options)
    raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORERS}")


# ---------------------------------------------------------------- summaries
def bootstrap_ci(correct: Sequence[bool], n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = CI_LEVEL) -> list[float] | None:
    """Percentile bootstrap CI of the mean of 0/1 outcomes, in percent; None for an empty group."""
    x = np.asarray(correct, dtype=float)
    if x.size == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1) * 100
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def accuracy_block(correct: Sequence[bool]) -> dict:
    """n, accuracy (percent) and its 95 % bootstrap CI."""
    n = len(correct)
    acc = 100.0 * sum(map(bool, correct)) / n if n else None
    return {"n": n, "accuracy": acc, "ci95": bootstrap_ci(correct)}


def _grouped(rows: list[dict], key, field: str) -> dict:
    groups = defaultdict(list)
    for r in rows:
        k = key(r)
        if k is not None:
            groups[k].append(r[field])
    return {k: accuracy_block(v) for k, v in sorted(groups.items())}


def letter_table(rows: list[dict], scorer: str) -> dict:
    """truth letter -> {predicted letter (or "none") -> count}: shows a bias toward one letter at a glance."""
    table = defaultdict(Counter)
    for r in rows:
        table[r["truth"]][r[f"pred_{scorer}"] or "none"] += 1
    return {t: dict(sorted(c.items())) for t, c in sorted(table.items())}


def scorer_summary(rows: list[dict], scorer: str) -> dict:
    """Accuracy overall and per group, parse-failure rate and letter table under one scorer."""
    field = f"correct_{scorer}"
    out = accuracy_block([r[field] for r in rows])
    out["parse_failure_rate"] = (100.0 * sum(not r[f"parsed_{scorer}"] for r in rows) / len(rows)) if rows else None
    out["by_task_type"] = _grouped(rows, lambda r: r["task_type"], field)
    out["by_sub_task_type"] = _grouped(rows, lambda r: f"{r['task_type']}/{r['sub_task_type']}", field)
    out["by_partition"] = _grouped(rows, lambda r: r.get("partition"), field)
    out["by_options_location"] = _grouped(rows, lambda r: "in_image" if r["options_in_image"] else "listed", field)
    out["letter_table"] = letter_table(rows, scorer)
    return out


def summarize(rows: Iterable[dict]) -> dict:
    """Metrics of a list of prediction rows: both scorers, the always-"A" control, latency and tokens."""
    rows = list(rows)
    latency = [r["latency_s"] for r in rows]
    scorers = {s: scorer_summary(rows, s) for s in SCORERS}
    return {
        "n": len(rows),
        **{f"accuracy_{s}": scorers[s]["accuracy"] for s in SCORERS},  # headline numbers, one per scorer
        "scorers": scorers,
        "always_A": accuracy_block([r["truth"] == "A" for r in rows]),
        "latency_s": {"mean": float(np.mean(latency)) if rows else None,
                      "median": float(np.median(latency)) if rows else None},
        "new_tokens": {"total": int(sum(r["new_tokens"] for r in rows)),
                       "mean": float(np.mean([r["new_tokens"] for r in rows])) if rows else None},
    }
