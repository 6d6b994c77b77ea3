"""Answer extraction (official and lenient scorers) and accuracy summaries with bootstrap CIs.

Two scorers are always reported side by side and never mixed:
  official  exactly OmniSpatial's `re` rule (qizekun/OmniSpatial vlms_eval/qwenvl_eval.py): the LAST
            case-insensitive match of `Answer\\s*:\\s*([A-D])\\b`, "A" when nothing matches. Two quirks are
            kept on purpose, because they are part of every published OmniSpatial number:
            * the fallback "A" scores an unparseable output as correct whenever the truth is A (~25 %);
            * the match is case-insensitive but the comparison is not: "answer: c" yields "c", which never
              equals the upper-case truth "C", so a lower-case answer is always wrong.
            Under prompt_style="direct" the official rule is instead the benchmark's eval_type "direct": the
            first character of the stripped, upper-cased reply (no fallback; parsed only when it is A-D).
  lenient   also accepts what models really write (<answer>B</answer>, **Answer:** C, Answer: (B),
            "the answer is D", lower case, a bare letter, the exact text of one option); no default letter,
            an unparsed output is simply wrong, and text matching a repeated option string is ambiguous.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

SCORERS = ("official", "lenient")
LETTERS = "ABCD"
OFFICIAL_DEFAULT = "A"  # the official script's fallback when no "Answer: X" is found
OFFICIAL_PATTERN = re.compile(r"Answer\s*:\s*([A-D])\b", re.IGNORECASE)  # verbatim from the official script
# prompt style -> the official rule (OmniSpatial eval_type) its official numbers are scored by
OFFICIAL_RULES = {"manual_cot": "official-re: last 'Answer: X' (case-insensitive), 'A' when none",
                  "direct": "official-direct: first character of the stripped, upper-cased reply"}

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed, so a CI is a pure function of the predictions
CI_LEVEL = 0.95
FAMILY_MIN_N = 50   # fewer items give a CI too wide to say anything about one family
OTHER_FAMILIES = f"other (families with n < {FAMILY_MIN_N})"

# Lenient patterns use possessive quantifiers (*+, ++): a run of spaces or stars is read once and never re-split
# between neighbouring quantifiers, so every pattern runs in linear time (the nested greedy runs took 16 s on
# "answer" + 2,000 spaces). The trailing context of _PHRASE is a lookahead: consuming it could swallow the start of
# the next "Answer:" line, and then an earlier answer would win.
_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
# "Answer: B", "**Answer:** C", "Answer: (B)", "The answer is D", "final answer - c." ...
_PHRASE = re.compile(r"answer(?:\s++is)?(?:\s++option)?[\s*_]*+[:：\-]?[\s*_]*+[(\[]?\s*+"
                     r"([A-Da-d])(?![A-Za-z0-9])(?=(\s*+[)\]]?)(.?))", re.IGNORECASE)
_MARKER = re.compile(r"answer(?:\s++is)?\s*+[:：]?", re.IGNORECASE)  # what the option text may follow
_BARE = re.compile(r"^[\s*_]*+[(\[]?([A-Da-d])[)\].:]?[\s*_]*+$")
_LEADING = re.compile(r"^[\s*_]*+(?:\(([A-Da-d])\)|([A-D])[.):])")  # "(C) above", "C. above" as the reply's start
_STRIP = " \t\n*_`'\".,;:!()[]"


def extract_official(text: str) -> tuple[str, bool]:
    """The official rule: last match of OFFICIAL_PATTERN, case preserved; ("A", False) when nothing matches."""
    found = OFFICIAL_PATTERN.findall(text or "")
    return (found[-1], True) if found else (OFFICIAL_DEFAULT, False)


def _letter_from_phrase(text: str) -> tuple[int, str] | None:
    """(start, letter) of the last "answer ... X" phrase; a lower-case x must end the phrase, so "the answer is a
    cube" is not "A"."""
    for m in reversed(list(_PHRASE.finditer(text))):
        letter, closer, after = m.group(1), m.group(2), m.group(3)
        if letter.isupper() or closer.strip() or after in ("", ".", ",", ";", "!", "\n", "*"):
            return m.start(), letter.upper()
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


def _last_marker(text: str):
    """The last "answer:" / "answer is" marker, or None."""
    last = None
    for last in _MARKER.finditer(text):
        pass
    return last


def _lenient_segment(text: str, options: Sequence[str] | None) -> tuple[str | None, bool]:
    """Letter from one piece of text, (letter, ambiguous): the last answer wins, so option text after a later
    "answer:" beats an earlier letter phrase; then a bare or leading letter, then the whole text as option text."""
    phrase, marker = _letter_from_phrase(text), _last_marker(text)
    if marker and (phrase is None or marker.start() > phrase[0]):
        letter, ambiguous = _letter_from_option_text(text[marker.end():], options)
        if letter or ambiguous:
            return letter, ambiguous
    if phrase:
        return phrase[1], False
    bare = _BARE.match(text) or _LEADING.match(text)
    if bare:
        return next(g for g in bare.groups() if g).upper(), False
    return _letter_from_option_text(text, options)


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


def extract_official_direct(text: str) -> tuple[str, bool]:
    """The official rule under the direct prompt (eval_type "direct"): the first character of the stripped,
    upper-cased reply, whatever it is ("" for an empty reply); parsed only when that character is A-D."""
    letter = (text or "").strip().upper()[:1]
    return letter, bool(letter) and letter in LETTERS


def official_rule(prompt_style: str = "manual_cot") -> str:
    """A label of the official rule a prompt style is scored by, to store next to the official numbers."""
    _check_prompt_style(prompt_style)
    return OFFICIAL_RULES[prompt_style]


def _check_prompt_style(prompt_style: str) -> None:
    if prompt_style not in OFFICIAL_RULES:
        raise ValueError(f"unknown prompt_style {prompt_style!r}; choose one of {tuple(OFFICIAL_RULES)}")


def extract_answer(text: str, scorer: str = "official", options: Sequence[str] | None = None,
                   prompt_style: str = "manual_cot"):
    """(letter, parsed) under `scorer`; official falls back to ("A", False), lenient to (None, False).
    The official scorer follows the benchmark's rule for `prompt_style` (see OFFICIAL_RULES); lenient ignores it."""
    _check_prompt_style(prompt_style)
    if scorer == "official":
        return extract_official_direct(text) if prompt_style == "direct" else extract_official(text)
    if scorer == "lenient":
        return extract_lenient(text, options)
    raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORERS}")


# ---------------------------------------------------------------- summaries
def in_headline(partition: str | None, options_in_image: bool) -> bool:
    """Whether an item counts in the headline numbers: the one place that decides it.

    Procedural items (partition set) whose options are drawn into the image are left out: at the tiny models'
    112x112 input the drawn option text is ~5 px high and the scene gets ~4 visual tokens, so those items are
    illegible and would only measure the resolution. They stay in the files (the real benchmark's quirk), are
    evaluated, and are reported as their own block. Real data (partition None) keeps every item, as published.
    """
    return partition is None or not options_in_image


def headline_rows(rows: list[dict]) -> list[dict]:
    """The prediction rows that count in the headline numbers (see in_headline)."""
    return [r for r in rows if in_headline(r.get("partition"), r["options_in_image"])]


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


def _groups(rows: list[dict], key) -> dict:
    """key -> its rows, sorted by key; rows whose key is None are left out."""
    groups = defaultdict(list)
    for r in rows:
        k = key(r)
        if k is not None:
            groups[k].append(r)
    return dict(sorted(groups.items()))


def _grouped(rows: list[dict], key, field: str) -> dict:
    return {k: accuracy_block([r[field] for r in rs]) for k, rs in _groups(rows, key).items()}


def by_family(rows: list[dict], field: str, min_n: int = FAMILY_MIN_N) -> dict:
    """Accuracy per question family with n >= min_n; the smaller families pooled under OTHER_FAMILIES, because a
    per-family number over a few dozen items is noise. Rows without a family (real data) are left out."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("family") is not None:
            groups[r["family"]].append(r[field])
    out = {fam: accuracy_block(xs) for fam, xs in sorted(groups.items()) if len(xs) >= min_n}
    small = [x for xs in groups.values() if len(xs) < min_n for x in xs]
    return {**out, OTHER_FAMILIES: accuracy_block(small)} if small else out


def letter_table(rows: list[dict], scorer: str) -> dict:
    """truth letter -> {predicted letter (or "none") -> count}: shows a bias toward one letter at a glance."""
    table = defaultdict(Counter)
    for r in rows:
        table[r["truth"]][r[f"pred_{scorer}"] or "none"] += 1
    return {t: dict(sorted(c.items())) for t, c in sorted(table.items())}


def _unparsed(rows: list[dict], scorer: str) -> float | None:
    """Percent of rows whose reply the scorer could not parse (the official rule then falls back to "A")."""
    return 100.0 * sum(not r[f"parsed_{scorer}"] for r in rows) / len(rows) if rows else None


def scorer_summary(rows: list[dict], scorer: str) -> dict:
    """Accuracy overall and per group, parse-failure rate (overall and per partition) and letter table under one
    scorer, over the headline
    rows; `by_options_location` covers every row, so the drawn-options items left out are still shown."""
    field = f"correct_{scorer}"
    head = headline_rows(rows)
    out = accuracy_block([r[field] for r in head])
    out["parse_failure_rate"] = _unparsed(head, scorer)
    out["parse_failure_by_partition"] = {p: _unparsed(rs, scorer)
                                         for p, rs in _groups(head, lambda r: r.get("partition")).items()}
    out["by_task_type"] = _grouped(head, lambda r: r["task_type"], field)
    out["by_sub_task_type"] = _grouped(head, lambda r: f"{r['task_type']}/{r['sub_task_type']}", field)
    out["by_partition"] = _grouped(head, lambda r: r.get("partition"), field)
    out["by_family"] = by_family(head, field)
    out["by_options_location"] = _grouped(rows, lambda r: "in_image" if r["options_in_image"] else "listed", field)
    out["letter_table"] = letter_table(head, scorer)
    return out


def summarize(rows: Iterable[dict]) -> dict:
    """Metrics of a list of prediction rows: both scorers, the always-"A" control, the drawn-options items on their
    own, latency and tokens. `n` counts every row, `n_headline` those in the headline numbers."""
    rows = list(rows)
    head = headline_rows(rows)
    drawn = [r for r in rows if r["options_in_image"]]
    latency = [r["latency_s"] for r in rows]
    scorers = {s: scorer_summary(rows, s) for s in SCORERS}
    return {
        "n": len(rows),
        "n_headline": len(head),
        **{f"accuracy_{s}": scorers[s]["accuracy"] for s in SCORERS},  # headline numbers, one per scorer
        "scorers": scorers,
        "options_in_image": {s: accuracy_block([r[f"correct_{s}"] for r in drawn]) for s in SCORERS},
        "always_A": accuracy_block([r["truth"] == "A" for r in head]),
        "latency_s": {"mean": float(np.mean(latency)) if rows else None,
                      "median": float(np.median(latency)) if rows else None},
        "new_tokens": {"total": int(sum(r["new_tokens"] for r in rows)),
                       "mean": float(np.mean([r["new_tokens"] for r in rows])) if rows else None},
    }


# ---------------------------------------------------------------- paired comparison of two runs
def _rows_by_item(rows: Sequence[dict], name: str) -> dict:
    """(task_type, id) -> row; a repeated key is an error, since pairing needs one prediction per item."""
    keys = [(r["task_type"], r["id"]) for r in rows]
    repeated = [k for k, c in Counter(keys).items() if c > 1]
    if repeated:
        raise ValueError(f"{name}: {len(repeated)} item key(s) occur more than once, e.g. {repeated[0]}")
    return dict(zip(keys, rows))


def _check_same_items(a: dict, b: dict) -> None:
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a or only_b:
        example = (only_a or only_b)[0]
        raise ValueError(f"the two runs cover different items: {len(only_a)} only in rows_a, {len(only_b)} only "
                         f"in rows_b, e.g. {example}; compare predictions on the same evaluation subset")


def _cluster_ids(rows: Sequence[dict]) -> np.ndarray:
    """One integer per row: rows sharing an image share it; a row without an image is a cluster of its own."""
    ids: dict = {}
    return np.array([ids.setdefault(r.get("image") or ("row", i), len(ids)) for i, r in enumerate(rows)])


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence[int], n_boot: int = BOOTSTRAP_SAMPLES,
                         seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL) -> list[float] | None:
    """Percentile bootstrap CI of the mean of `values` (x100) resampling whole clusters: questions on one image
    are not independent, and resampling them one by one would make the CI too narrow. With one item per cluster
    it is exactly bootstrap_ci."""
    x, ids = np.asarray(values, dtype=float), np.asarray(clusters)
    if x.size == 0:
        return None
    sums, sizes = np.bincount(ids, weights=x), np.bincount(ids)
    idx = np.random.default_rng(seed).integers(0, sums.size, size=(n_boot, sums.size))
    means = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1) * 100
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: a binomial(b + c, 1/2) test on the discordant pairs; 1 when there are none."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def paired_difference(rows_a: Sequence[dict], rows_b: Sequence[dict], scorer: str = "official") -> dict:
    """Accuracy of run a minus run b (points) on the same items, matched by (task_type, id): {diff, ci95 (paired
    bootstrap over images), p_mcnemar (exact), n}. Pairing removes the item-difficulty variance both runs share."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORERS}")
    a, b = _rows_by_item(rows_a, "rows_a"), _rows_by_item(rows_b, "rows_b")
    _check_same_items(a, b)
    keys = sorted(a)
    field = f"correct_{scorer}"
    d = np.array([int(a[k][field]) - int(b[k][field]) for k in keys], dtype=float)
    return {"diff": float(100.0 * d.mean()) if keys else None,
            "ci95": cluster_bootstrap_ci(d, _cluster_ids([a[k] for k in keys])),
            "p_mcnemar": mcnemar_exact(int((d > 0).sum()), int((d < 0).sum())), "n": len(keys)}
