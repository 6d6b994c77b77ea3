"""benchmarks/text_only_ceiling.py on tiny handmade item sets: chance, features, and that the classifier finds a
planted text-only shortcut but not one that is absent."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "text_only_ceiling.py"
_spec = importlib.util.spec_from_file_location("text_only_ceiling", _PATH)
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)

COLOURS, SHAPES = ("red", "blue", "green"), ("cube", "sphere", "cylinder")


def item(question, options, answer, family="toy"):
    return SimpleNamespace(question=question, options=list(options), answer=answer, family=family, partition="sft")


def ladder_items(n, seed, leak=True):
    """Height questions with options on a ladder 1/2/3/5 x a scale drawn independently of the truth: with the leak
    the truth is always the second rung; without it a random rung, so the text says nothing (the scale cannot
    hint at the rung, unlike a truth drawn from a fixed range with distractors scaled around it)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scale, rung = np.exp(rng.uniform(np.log(10), np.log(100))), 1 if leak else int(rng.integers(4))
        opts = [f"{scale * r:.0f} centimeters" for r in (1, 2, 3, 5)]
        order = rng.permutation(4)
        q = f"How tall is the {rng.choice(COLOURS)} {rng.choice(SHAPES)}?"
        out.append(item(q, [opts[k] for k in order], int(np.where(order == rung)[0][0])))
    return out


def accuracy(train, test):
    model, _ = T.train(train)
    X, _, group = T.featurise(test)
    return T.score(test, T.predict(model, X, group))


def test_chance_is_mean_inverse_option_count():
    items = [item("q", ["a", "b"], 0), item("q", ["a", "b", "c"], 1), item("q", ["a", "b", "c", "d"], 2)]
    assert T.chance(items) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_cant_rule_skips_the_refusal_option():
    items = [item("q", ["yes", "no", "can not determine"], 0), item("q", ["yes", "can not determine"], 1)]
    assert T.cant_rule(items) == pytest.approx((1 / 2 + 0) / 2)


def test_numeric_and_form_features():
    f = T.item_features("How far is the red cube?", ["6 meters", "2 meters", "4 meters", "10 meters"])
    assert {"num:rank:1/4", "num:median", "num:unit:meters", "pos:2/4", "nopt:4"} <= set(f[2])
    assert "num:min" in f[1] and "num:max" in f[3] and "num:min" not in f[2] and "num:median" not in f[3]
    assert "k:how far is the|num:rank:1/4" in f[2]   # crossed with the template
    g = T.item_features("Is the red cube left of the blue sphere?",
                        ["Yes, the red cube is left of the blue sphere.", "can not determine"])
    assert g[0]["form:yes:True"] == 1 and g[1]["form:cant:True"] == 1 and g[0]["ment:first:0"] == 1


def test_question_key_masks_object_names_and_numbers():
    assert T.question_key("Is the small red cube 2 meters from the sphere?") == "is the meters from the"


def test_number_after_names_the_speed_of_the_mentioned_object():
    qws = T.words("The red cube moves at 2 m/s and the blue sphere at 4 m/s. Which arrives first?")
    assert T.number_after(qws, ("blue", "sphere")) == "1/2" and T.number_after(qws, ("red", "cube")) == "0/2"


def test_predict_takes_the_best_option_per_item_with_mixed_counts():
    model = SimpleNamespace(decision_function=lambda X: np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.0, 2.0, 1.0, 0.4]))
    group = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    assert T.predict(model, None, group).tolist() == [1, 0, 1]


def test_finds_a_planted_shortcut():
    r = accuracy(ladder_items(100, 1), ladder_items(100, 2))
    assert r["accuracy"] > 0.95 and not r["target_met"]


def test_stays_near_chance_without_a_shortcut():
    r = accuracy(ladder_items(100, 3, leak=False), ladder_items(200, 4, leak=False))
    assert r["chance"] == 0.25 and r["accuracy"] < 0.25 + 0.12


def test_overlaps_single_out_the_option_the_others_perturb():
    opts = ["the cube, then the sphere, then the cylinder", "the sphere, then the cube, then the cylinder",
            "the cube, then the cylinder, then the sphere", "the cylinder, then the sphere, then the cube"]
    jac, slot = T.overlaps(opts)
    assert slot == [3, 1, 1, 1] and jac == [1.0] * 4   # the first shares a place with each; word sets all equal
    assert T.overlaps(["only"]) == ([0.0], [0])
