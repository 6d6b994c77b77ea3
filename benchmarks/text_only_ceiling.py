"""Text-only ceiling: how well a classifier that never sees the image answers the generated items (not a timed test).

    OMP_NUM_THREADS=1 python benchmarks/text_only_ceiling.py                        # 1,500 train / 600 test items
    OMP_NUM_THREADS=1 python benchmarks/text_only_ceiling.py --n-train 500 --n-test 300 --out runs/toc

For each partition (base, sft, test_only) it generates fresh train and test items from disjoint streams
(role_seed(seed, "text_only_train/<partition>") and role_seed(seed, "text_only_test/<partition>"), so train and test
never share a scene), fits a logistic regression that scores every (question, option) pair as correct or not from
hashed text features, answers each test item with its highest-scoring option, and reports accuracy beside chance
(the mean of 1/len(options) over the test items) per partition and per family; plus sft -> test_only transfer (the
sft model answering test_only items). A margin well over chance is a shortcut that a model can learn without looking
at the image. Target: every partition at most chance + 8 points. Writes <out>/text_only_ceiling.{json,md}
(default reports/benchmarks/).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict

import numpy as np
import scipy.sparse as sp
import sklearn
from sklearn.feature_extraction import FeatureHasher
from sklearn.linear_model import LogisticRegression

from spatialstudy import runs
from spatialstudy.data import PARTITIONS, make_items
from spatialstudy.data.scenes import PALETTE, SHAPES
from spatialstudy.data.streams import role_seed

TARGET_MARGIN = 0.08          # points over chance a partition may reach (issue 15)
N_FEATURES = 2 ** 20          # hashed feature space: collisions are rare at ~10^4 distinct features per partition
C_GRID = (0.1, 1.0, 10.0, 100.0)  # inverse L2 strength, picked per partition on a held-out fifth of the train items
HOLDOUT_SHARE = 0.2
CANT = "can not determine"    # OmniSpatial's refusal option: the rule baseline never picks it
# Object names vary item to item; masking them gives a question "template" that identifies the family's wording,
# so structural features crossed with it can learn one rule per template (a per-family rule, the family unseen).
ENTITY_WORDS = frozenset(PALETTE) | frozenset(SHAPES) | {"large", "small"}
WORD_RE = re.compile(r"\d+(?:\.\d+)?|[a-z]+(?:'[a-z]+)?")
NUM_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z/]+)?")
SEGMENT_RE = re.compile(r",\s*(?:then\s+)?|\s+and\s+")
TIE_WORDS = frozenset({"equally", "same", "together", "both"})


# --- features of one (question, option) pair, in the context of the item's other options ---

def words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def question_key(question: str) -> str:
    """The question's wording without object names and numbers: one key per family template."""
    return " ".join(w for w in words(question) if w not in ENTITY_WORDS and not w[0].isdigit())


def mentions(ws: list[str]) -> list[tuple[str, ...]]:
    """Maximal runs of object-name words ("blue sphere", "small cylinder"), in order."""
    runs_, cur = [], []
    for w in ws + [""]:
        if w in ENTITY_WORDS:
            cur.append(w)
        elif cur:
            runs_.append(tuple(cur))
            cur = []
    return runs_


def number(option: str) -> tuple[float, str, int] | None:
    """The option's first number, the word after it (its unit) and its count of decimals, if any."""
    m = NUM_RE.search(option.lower())
    return (float(m.group(1)), m.group(2) or "", len(m.group(1).partition(".")[2])) if m else None


def rank(values: list[float], j: int) -> int:
    """How many of the item's values are strictly smaller than values[j] (ties share a rank)."""
    return sum(v < values[j] for v in values)


def log_bin(x: float, per_octave: int = 2) -> int:
    return int(round(per_octave * math.log2(max(x, 1e-6))))


def text_features(qws: list[str], key: str, ows: list[str]) -> dict[str, float]:
    """Option words and bigrams, each crossed with the question's words and with its template."""
    grams = [f"w:{w}" for w in ows] + [f"b:{a}_{b}" for a, b in zip(ows, ows[1:])]
    f = {g: 1.0 for g in grams}
    f.update({f"k:{key}|{g}": 1.0 for g in grams})
    f.update({f"x:{q}|{w}": 1.0 for q in set(qws) for w in set(ows)})
    return f


def numeric_features(nums: list[tuple[float, str, int] | None], j: int, qnums: set[float]) -> dict[str, float]:
    """Magnitude, unit, decimals, and where the number sits among the item's numbers (rank, min/max/median,
    ratios to the smallest and largest): distractors built around the truth show up here."""
    if nums[j] is None:
        return {"num:none": 1.0}
    v, unit, dec = nums[j]
    vals = [n[0] for n in nums if n is not None]
    k, r, lo, hi = len(vals), rank(vals, vals.index(v)), min(vals), max(vals)
    # the item's scale (its smallest number) with the option's rank fixes the option's value, so a prior on the
    # true value (depths of 2-6 m, sizes...) can pick the rung of a ladder of distractors
    f = {f"num:mag:{log_bin(v)}": 1, f"num:mag4:{log_bin(v, 4)}": 1, f"num:scale_rank:{log_bin(lo, 4)}/{r}": 1,
         f"num:unit:{unit}": 1, f"num:rank:{r}/{k}": 1, f"num:k:{k}": 1,
         f"num:dec:{dec}": 1, f"num:ratio_min:{log_bin(v / max(lo, 1e-6), 4)}": 1,
         f"num:ratio_max:{log_bin(hi / max(v, 1e-6), 4)}": 1, f"num:in_question:{v in qnums}": 1}
    f.update({"num:min": r == 0, "num:max": v == hi, "num:median": r in ((k - 1) // 2, k // 2)})
    return {name: float(on) for name, on in f.items() if on}


def length_features(options: list[str], j: int) -> dict[str, float]:
    lens = [len(o) for o in options]
    nw = len(options[j].split())
    return {f"len:chars:{min(lens[j] // 8, 12)}": 1.0, f"len:words:{min(nw, 15)}": 1.0,
            f"len:rank:{rank(lens, j)}/{len(options)}": 1.0, f"len:longest:{lens[j] == max(lens)}": 1.0,
            f"len:shortest:{lens[j] == min(lens)}": 1.0}


def overlaps(options: list[str]) -> tuple[list[float], list[int]]:
    """Per option: mean word-set Jaccard with the other options, and how many of its comma/"then"/"and"-separated
    segments sit at the same place in another option. An answer whose distractors are perturbations of it (order
    swapped, one word changed) is the option most like the rest."""
    sets = [set(words(o)) for o in options]
    segs = [SEGMENT_RE.split(o.lower().strip(" .")) for o in options]
    others = [[o for o in range(len(options)) if o != i] for i in range(len(options))]
    jac = [float(np.mean([len(sets[i] & sets[o]) / max(len(sets[i] | sets[o]), 1) for o in others[i]] or [0]))
           for i in range(len(options))]
    slot = [sum(a == b for o in others[i] for a, b in zip(segs[i], segs[o])) for i in range(len(options))]
    return jac, slot


def overlap_features(jac: list[float], slot: list[int], j: int) -> dict[str, float]:
    return {f"ov:jac:{int(jac[j] * 8)}": 1.0, f"ov:jac_rank:{rank(jac, j)}": 1.0,
            f"ov:slot:{min(slot[j], 12)}": 1.0, f"ov:slot_rank:{rank(slot, j)}": 1.0,
            f"ov:slot_max:{slot[j] == max(slot)}": 1.0}


def number_after(qws: list[str], mention: tuple[str, ...]) -> str:
    """Rank among the question's numbers of the first number after `mention` in the question ("the red cube at
    4 m/s"): lets the model prefer, say, the faster of two named objects."""
    qnums = sorted({float(w) for w in qws if w[0].isdigit()})
    n = len(mention)
    at = next((i for i in range(len(qws)) if tuple(qws[i:i + n]) == mention), None)
    after = [float(w) for w in qws[at + n:] if w[0].isdigit()] if at is not None else []
    return f"{qnums.index(after[0])}/{len(qnums)}" if after else "none"


def form_features(option: str, ows: list[str], qws: list[str]) -> dict[str, float]:
    """Yes/no, refusal and tie forms; how much of the option the question already says; which of the question's
    objects (first-named, second-named...) the option names first, and the number the question gives it."""
    qset, qm, om = set(qws), mentions(qws), mentions(ows)
    inq = sum(w in qset for w in ows) / max(len(ows), 1)
    first = (qm.index(om[0]) if om[0] in qm else "new") if om else "none"
    f = {f"form:yes:{ows[:1] == ['yes']}": 1, f"form:no:{ows[:1] == ['no']}": 1,
         f"form:cant:{CANT in option.lower()}": 1, f"form:tie:{bool(TIE_WORDS & set(ows))}": 1,
         f"inq:{int(inq * 4)}": 1, f"inq:all:{inq == 1}": 1, f"ment:first:{first}": 1, f"ment:n:{len(om)}": 1,
         f"ment:qnum:{number_after(qws, om[0]) if om else 'none'}": 1}
    return {name: float(v) for name, v in f.items()}


def item_features(question: str, options: list[str]) -> list[dict[str, float]]:
    """One feature dict per option. Structural features are kept plain and crossed with the question template."""
    qws, key = words(question), question_key(question)
    ows = [words(o) for o in options]
    nums = [number(o) for o in options]
    qnums = {float(w) for w in qws if w[0].isdigit()}
    jac, slot = overlaps(options)
    out = []
    for j, o in enumerate(options):
        s = {f"pos:{j}/{len(options)}": 1.0, f"nopt:{len(options)}": 1.0}
        for part in (numeric_features(nums, j, qnums), length_features(options, j),
                     overlap_features(jac, slot, j), form_features(o, ows[j], qws)):
            s.update(part)
        f = text_features(qws, key, ows[j])
        f.update(s)
        f.update({f"k:{key}|{name}": v for name, v in s.items()})
        out.append(f)
    return out


# --- per-option classifier ---

HASHER = FeatureHasher(n_features=N_FEATURES, input_type="dict", alternate_sign=False)


def featurise(items) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Rows = (item, option) pairs: the hashed features, 1 for the correct option, and each row's item index."""
    dicts, y, group = [], [], []
    for i, it in enumerate(items):
        for j, f in enumerate(item_features(it.question, it.options)):
            dicts.append(f)
            y.append(int(j == it.answer))
            group.append(i)
    return HASHER.transform(dicts).tocsr(), np.array(y), np.array(group)


class OptionScorer:
    """Logistic regression on only the hashed columns the train rows use: liblinear's cost grows with the width of
    X (2^20), not just its non-zeros, and unused columns get zero weight anyway."""

    def __init__(self, C: float):
        self.lr = LogisticRegression(C=C, solver="liblinear", max_iter=1000)

    def fit(self, X, y) -> "OptionScorer":
        self.cols = np.unique(X.indices)
        self.lr.fit(X[:, self.cols], y)
        return self

    def decision_function(self, X) -> np.ndarray:
        return self.lr.decision_function(X[:, self.cols])


def fit(X, y, C: float) -> OptionScorer:
    return OptionScorer(C).fit(X, y)


def predict(model, X, group) -> np.ndarray:
    """Per item, the option whose pair the model scores most likely correct (a conditional-logit-style choice)."""
    score = model.decision_function(X)
    n = group.max() + 1
    best = np.full(n, -np.inf)
    pick = np.zeros(n, dtype=int)
    first = np.searchsorted(group, np.arange(n))   # rows are grouped by item, options in order
    for r, (g, s) in enumerate(zip(group, score)):
        if s > best[g]:
            best[g], pick[g] = s, r - first[g]
    return pick


def choose_c(X, y, group, answers) -> tuple[float, dict]:
    """The C with the best item accuracy on the last fifth of the train items (fit on the rest)."""
    cut = int(group.max() * (1 - HOLDOUT_SHARE))
    tr, ho = group < cut, group >= cut
    acc = {}
    for C in C_GRID:
        pick = predict(fit(X[tr], y[tr], C), X[ho], group[ho] - cut)
        acc[C] = float(np.mean(pick == answers[cut:]))
    return max(acc, key=acc.get), acc


def train(items) -> tuple[OptionScorer, dict]:
    X, y, group = featurise(items)
    C, acc = choose_c(X, y, group, np.array([it.answer for it in items]))
    return fit(X, y, C), {"C": C, "holdout_accuracy_by_C": acc, "rows": X.shape[0], "train_items": len(items)}


# --- scoring ---

def chance(items) -> float:
    return float(np.mean([1 / len(it.options) for it in items]))


def cant_rule(items) -> float:
    """Expected accuracy of guessing uniformly among the options that are not "can not determine"."""
    acc = []
    for it in items:
        ok = [j for j, o in enumerate(it.options) if CANT not in o.lower()] or list(range(len(it.options)))
        acc.append(1 / len(ok) if it.answer in ok else 0.0)
    return float(np.mean(acc))


def score(items, pick) -> dict:
    """n, chance, accuracy (with a binomial 95% half-width), margin over chance, target met, rule baseline."""
    right = np.array([p == it.answer for p, it in zip(pick, items)])
    acc, ch = float(right.mean()), chance(items)
    return {"n": len(items), "chance": ch, "accuracy": acc, "ci95": 1.96 * math.sqrt(acc * (1 - acc) / len(items)),
            "margin": acc - ch, "target_met": acc <= ch + TARGET_MARGIN, "cant_rule": cant_rule(items)}


def by_family(items, pick) -> dict:
    idx = defaultdict(list)
    for i, it in enumerate(items):
        idx[it.family].append(i)
    return {fam: score([items[i] for i in ii], pick[ii]) for fam, ii in sorted(idx.items())}


# --- report ---

def generate(n: int, seed: int, role: str, partition: str) -> tuple[list, float]:
    t0 = time.perf_counter()
    items = make_items(n, seed=role_seed(seed, f"{role}/{partition}"), partition=partition)
    return items, time.perf_counter() - t0


def run_partition(partition: str, args) -> tuple[dict, OptionScorer, list]:
    train_items, t_gen = generate(args.n_train, args.seed, "text_only_train", partition)
    test_items, t_gen2 = generate(args.n_test, args.seed, "text_only_test", partition)
    t0 = time.perf_counter()
    model, fit_info = train(train_items)
    X, _, group = featurise(test_items)
    pick = predict(model, X, group)
    out = score(test_items, pick)
    out.update(families=by_family(test_items, pick), fit=fit_info, options_per_item=dict(
        sorted(Counter(len(it.options) for it in test_items).items())),
        generate_s=t_gen + t_gen2, fit_s=time.perf_counter() - t0)
    return out, model, test_items


def transfer(model, test_items) -> dict:
    X, _, group = featurise(test_items)
    return score(test_items, predict(model, X, group))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def partition_table(report: dict) -> list[str]:
    lines = ["| partition | n | chance % | text-only % (95% CI) | margin (points) | target met (<= +8) | "
             "never-'can not determine' rule % | C |", "|---|---|---|---|---|---|---|---|"]
    for p, r in report["partitions"].items():
        lines.append(f"| {p} | {r['n']} | {pct(r['chance'])} | {pct(r['accuracy'])} (+/- {pct(r['ci95'])}) | "
                     f"{100 * r['margin']:+.1f} | {'yes' if r['target_met'] else '**no**'} | "
                     f"{pct(r['cant_rule'])} | {r['fit']['C']:g} |")
    t = report["transfer"]
    lines.append(f"| sft -> test_only (transfer) | {t['n']} | {pct(t['chance'])} | {pct(t['accuracy'])} "
                 f"(+/- {pct(t['ci95'])}) | {100 * t['margin']:+.1f} | {'yes' if t['target_met'] else '**no**'} | "
                 f"{pct(t['cant_rule'])} | {report['partitions']['sft']['fit']['C']:g} |")
    return lines


def family_table(report: dict) -> list[str]:
    lines = ["| partition | family | n | chance % | text-only % | margin (points) |", "|---|---|---|---|---|---|"]
    for p, r in report["partitions"].items():
        for fam, f in r["families"].items():
            m = f"{100 * f['margin']:+.1f}"
            m = f"**{m}**" if f["margin"] > TARGET_MARGIN else m   # bold: the family alone misses the target
            lines.append(f"| {p} | {fam} | {f['n']} | {pct(f['chance'])} | {pct(f['accuracy'])} | {m} |")
    return lines


FEATURES_TEXT = """\
What the classifier sees. Only text: the question and the options, never the image. Every (question, option) pair
is one row of a logistic regression (scikit-learn {sklearn}, liblinear, L2, C picked from {grid} on a held-out fifth
of the train items) whose target is "this option is the correct one"; an item's answer is its highest-scoring option,
so the rows of one item compete as in a conditional logit. Features, hashed into 2^20 dimensions: the option's words
and bigrams; every question word x option word pair; the option's position and the number of options; the option's
number (log-magnitude bins, unit, decimals, its rank among the item's numbers, that rank with the item's scale,
whether it is the smallest, largest or a median one, its ratio to the smallest and to the largest, whether the
question states it); its length in characters and words and its length rank; yes / no / "can not determine" / tie
form; the share of its words the question contains, which of the question's objects it names first and the rank of
the number the question gives that object (a speed, say); its word overlap with the other options and how many of
its comma- or "then"-separated segments sit at the same place in another option. Every feature except
the question x option word pairs is also crossed with the question's template (its words without object names and
numbers), so the model can learn a separate rule per family wording. The rule column is the expected accuracy of
guessing uniformly among the options other than "can not determine"."""


def markdown(report: dict) -> str:
    cfg = report["config"]
    fam_n = [f["n"] for r in report["partitions"].values() for f in r["families"].values()]
    lines = ["# Text-only ceiling: accuracy without the image", "",
             f"Fresh generated items per partition: {cfg['n_train']} to train, {cfg['n_test']} to test (disjoint "
             f"streams, seed {cfg['seed']}); chance = mean of 1/len(options) over the test items; target: every "
             f"partition at most chance + {100 * TARGET_MARGIN:.0f} points. Options per test item: "
             + "; ".join(f"{p} {r['options_per_item']}" for p, r in report["partitions"].items()) + ".", "",
             *partition_table(report), "", f"Per family (bold: margin over 8 points; {min(fam_n)}-{max(fam_n)} "
             "test items per family, so a family's margin is noisy):", "",
             *family_table(report), "",
             f"Measured {report['date']} on code {report['code']} with `{report['command']}` "
             f"({report['wall_s'] / 60:.1f} min, "
             f"OMP_NUM_THREADS={report['threads']}, {report['machine']}; generating the items took "
             f"{report['generate_s']:.0f} s).", "",
             textwrap.fill(FEATURES_TEXT.format(sklearn=report["sklearn"], grid=", ".join(f"{c:g}" for c in C_GRID))
                           .replace("\n", " "), 116)]
    return "\n".join(lines) + "\n"


def code_state() -> str:
    """The commit the generator code comes from, and whether spatialstudy/data/ has uncommitted edits (the numbers
    describe the generator as it was when they were measured)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=runs.root(), capture_output=True, text=True, check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--", "spatialstudy/data")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted edits to spatialstudy/data/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"


def measure(args) -> dict:
    """Every partition's train/test run, then the sft model on the test_only test items."""
    parts, models, tests = {}, {}, {}
    for p in PARTITIONS:
        parts[p], models[p], tests[p] = run_partition(p, args)
        print(f"{p}: chance {pct(parts[p]['chance'])}%, text-only {pct(parts[p]['accuracy'])}%", flush=True)
    return {"partitions": parts, "transfer": transfer(models["sft"], tests["test_only"]),
            "generate_s": sum(r["generate_s"] for r in parts.values()),
            "all_targets_met": all(r["target_met"] for r in parts.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1500, help="train items per partition")
    ap.add_argument("--n-test", type=int, default=600, help="test items per partition")
    ap.add_argument("--seed", type=int, default=0, help="user seed; the streams derive from it by role")
    ap.add_argument("--out", default="reports/benchmarks", help="folder for text_only_ceiling.{json,md}")
    args = ap.parse_args(argv)
    command = " ".join(["python benchmarks/text_only_ceiling.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.perf_counter()
    report = measure(args)
    report.update(config=vars(args), date=datetime.date.today().isoformat(), wall_s=time.perf_counter() - t0,
                  sklearn=sklearn.__version__, threads=os.environ.get("OMP_NUM_THREADS", "unset"),
                  machine=platform.processor() or platform.machine(), command=command, code=code_state())
    out = runs.resolve(args.out)
    runs.write_json(out / "text_only_ceiling.json", report)
    runs.atomic_write_text(out / "text_only_ceiling.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
