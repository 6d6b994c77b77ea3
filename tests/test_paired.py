"""Paired comparison of two runs on the same items: hand-computed McNemar table, image-clustered bootstrap CI,
and refusal of item sets that do not pair."""
import pytest

from spatialstudy.scoring import bootstrap_ci, mcnemar_exact, paired_difference


def _rows(outcomes, images=None):
    """Prediction rows with correct_official from `outcomes`; image i of `images` when given."""
    return [{"task_type": "Perspective_Taking", "id": str(i), "correct_official": ok, "correct_lenient": ok,
             **({"image": images[i]} if images else {})} for i, ok in enumerate(outcomes)]


def _table(both, a_only, b_only, neither):
    """Two runs' rows from a 2x2 table of (a correct, b correct) counts."""
    pairs = [(1, 1)] * both + [(1, 0)] * a_only + [(0, 1)] * b_only + [(0, 0)] * neither
    return _rows([bool(a) for a, _ in pairs]), _rows([bool(b) for _, b in pairs])


def test_against_a_hand_computed_table():
    a, b = _table(both=10, a_only=6, b_only=1, neither=3)
    out = paired_difference(a, b)
    assert out["n"] == 20
    assert out["diff"] == pytest.approx(100 * (6 - 1) / 20)      # (16 - 11) correct of 20 = 25 points
    assert out["p_mcnemar"] == pytest.approx(2 * (1 + 7) / 128)  # 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    lo, hi = out["ci95"]
    assert lo <= out["diff"] <= hi
    flipped = paired_difference(b, a)
    assert flipped["diff"] == pytest.approx(-out["diff"]) and flipped["p_mcnemar"] == out["p_mcnemar"]


def test_mcnemar_edges():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0                                 # min(1, ...) caps the doubled tail
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert 0 < mcnemar_exact(600, 400) < 1e-9                         # large tables in exact integers, no overflow


def test_items_sharing_an_image_widen_the_ci():
    # 10 images x 5 questions; on 6 images run a gets all 5 right and run b all 5 wrong, on 4 they agree:
    # the 50 items carry the information of only 10 independent images
    images = [f"Perspective_Taking/{i // 5}.png" for i in range(50)]
    a_ok = [i < 30 or i % 2 == 0 for i in range(50)]
    b_ok = [i >= 30 and i % 2 == 0 for i in range(50)]
    clustered = paired_difference(_rows(a_ok, images), _rows(b_ok, images))
    independent = paired_difference(_rows(a_ok), _rows(b_ok))  # no image field: each item its own cluster
    assert clustered["diff"] == independent["diff"] == 60.0
    width = lambda ci: ci[1] - ci[0]
    assert width(clustered["ci95"]) > 1.5 * width(independent["ci95"])
    d = [int(a_ok[i]) - int(b_ok[i]) for i in sorted(range(50), key=str)]  # in key order, as ids sort
    assert independent["ci95"] == pytest.approx(bootstrap_ci(d))  # singleton clusters: the plain bootstrap


def test_unpaired_item_sets_are_refused():
    a, b = _table(both=3, a_only=1, b_only=1, neither=1)
    with pytest.raises(ValueError, match=r"1 only in rows_a, 0 only in rows_b, e\.g\. \('Perspective_Taking', '5'\)"):
        paired_difference(a, b[:-1])
    with pytest.raises(ValueError, match=r"rows_b: 1 item key\(s\) occur more than once"):
        paired_difference(a, b + b[:1])
    with pytest.raises(ValueError, match="unknown scorer"):
        paired_difference(a, b, scorer="strict")
