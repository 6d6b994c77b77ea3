"""benchmarks/sft_lr.py's rule, fixed before its runs: the best candidate by overall dev accuracy, unless the current
learning rate is within the margin of it; no choice until every candidate has run; the base row is a reference."""
import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sft_lr.py"
_spec = importlib.util.spec_from_file_location("sft_lr", _PATH)
L = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(L)


def rows(scores: dict) -> list[dict]:
    return [{"lr": lr, "official": {"overall": acc}} for lr, acc in scores.items()]


def test_the_best_candidate_wins_when_it_beats_the_current_lr_by_the_margin():
    scores = dict.fromkeys(L.CANDIDATES, 30.0) | {2e-4: 30.0 + L.MARGIN}
    assert L.choose(rows(scores)) == 2e-4


def test_the_current_lr_stays_when_the_best_is_within_the_margin():
    scores = dict.fromkeys(L.CANDIDATES, 30.0) | {1e-3: 30.0 + L.MARGIN - 0.1}
    assert L.choose(rows(scores)) == L.CURRENT


def test_no_choice_until_every_candidate_has_run_and_the_base_row_is_not_a_candidate():
    partial = {lr: 30.0 for lr in L.CANDIDATES[:-1]}
    assert L.choose(rows(partial)) is None
    full = dict.fromkeys(L.CANDIDATES, 30.0)
    assert L.choose(rows({0.0: 90.0, **full})) == L.CURRENT     # the base (lr 0) scores high: still not chosen
