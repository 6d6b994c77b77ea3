"""05_grayscale's parts on real objects: the colour-question regex (a table of colour and non-colour questions, real
OmniSpatial phrasings included, and its documented misses), both image transforms (grayscale is colourless; the hue
permutation keeps every pixel's brightness within rounding and moves its hue), the three colour item groups on
constructed and generated scenes, the regenerated benchmark matched to written records, the grayscale augmentation's
choice of rows, the 2 x 2's interaction statistic and the config's validation. The stage end to end runs in
notebooks/05_grayscale.ipynb under nbval.
"""
import colorsys
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spatialstudy.configs import GrayscaleConfig  # noqa: E402
from spatialstudy.data import load_omnispatial, write_omnispatial  # noqa: E402
from spatialstudy.data.generator import make_items, names_colour  # noqa: E402
from spatialstudy.data.scenes import PALETTE, Obj, palette, sample_scene  # noqa: E402
from spatialstudy.methods import grayscale as gs  # noqa: E402
from spatialstudy.models.transforms import GRAYSCALE, HUE_PERMUTED, TRANSFORMS, hue_rotate  # noqa: E402

# ---------------------------------------------------------------- the colour-question regex
COLOUR_QUESTIONS = [
    "What color is the car on the left?",
    "What colour is the mug closest to the laptop?",
    "Is the red chair closer to the camera than the table?",
    "Which of the blue boxes is nearest to the door?",
    "How many colored blocks are stacked on the shelf?",
    "Which of the coloured balls is furthest to the left?",
    "Which of the colorful kites is flying highest?",
    "What is the color of the object nearest the window?",
    "Is the GREEN light on the left of the crossing?",
    "Which is closer, the yellow sphere or the cube?",
    "Is the gray car behind the truck?",
    "Is the grey car behind the truck?",
    "Which object is reddish?",
    "Is the black-and-white cat on the sofa?",
    "Is the light-blue cup to the left of the plate?",
    "If you stand at the white door facing the window, where is the lamp?",
    "The person in the orange jacket is walking toward which building?",
    "Which is closer, the red cube or the blue sphere? A. the red cube B. the blue sphere",
]
NON_COLOUR_QUESTIONS = [
    "How far is the chair from the table?",
    "Is the large cube to the left of the sphere?",
    "Which object is nearest to the camera?",
    "If you stand at the door facing the window, is the lamp on your left?",
    "Is the blackboard behind the teacher?",         # 'black' inside a word
    "How many credits does the sign on the wall show?",   # 'red' inside a word
    "Is the bored student in front of the desk?",
    "Where is the greenhouse relative to the barn?",
    "Which redwood is the tallest?",
    "Which bluebird is perched highest?",
    "Order the objects from nearest to farthest from the camera.",
    "Seen from the camera, where is the cylinder relative to the cube? A. behind B. in front of",
]


@pytest.mark.parametrize("text", COLOUR_QUESTIONS)
def test_colour_questions_are_caught(text):
    assert gs.is_colour_question(text)


@pytest.mark.parametrize("text", NON_COLOUR_QUESTIONS)
def test_non_colour_questions_are_not(text):
    assert not gs.is_colour_question(text)


def test_known_misses_are_what_the_regex_still_says():
    """The notebook's list of false positives and negatives is true of the regex as it is now."""
    for text, regex_says, truth, _ in gs.KNOWN_MISSES:
        assert gs.is_colour_question(text) is regex_says, text
    misses = [(t, r, s) for t, r, s, _ in gs.KNOWN_MISSES if r != s]
    assert {r for _, r, _ in misses} == {True, False}       # both kinds of error are listed


@pytest.fixture(scope="module")
def items():
    """Generated items of every partition with their scenes (both naming modes, 2-4 objects per scene)."""
    return make_items(150, seed=11, per_scene=2, keep_scene=True)


def test_every_generated_colour_word_is_caught(items):
    for colour in PALETTE:
        assert gs.is_colour_question(f"Is the {colour} cube left of the sphere?"), colour
    for it in items:
        text = " ".join([it.question, *it.options])
        assert gs.is_colour_question(text) == names_colour(text) == (not it.colour_free), text


# ---------------------------------------------------------------- the image transforms
def _luma(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L"), int)


@pytest.fixture(scope="module")
def scene_images():
    rng = np.random.default_rng(5)
    images = [sample_scene(rng, palette_name=p).image for p in ("distinct", "equal_brightness") for _ in range(3)]
    noise = np.random.default_rng(6).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    return images + [Image.fromarray(noise, "RGB")]      # every corner of the RGB cube, clipping included


def test_grayscale_is_colourless_and_keeps_luma(scene_images):
    for im in scene_images:
        out = np.asarray(GRAYSCALE.fn(im))
        assert out.shape == (*im.size[::-1], 3)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        assert (out[..., 0] == _luma(im)).all()


def test_hue_permutation_keeps_brightness_within_rounding(scene_images):
    """|luma change| <= 1 on every pixel, out-of-gamut pixels included (they lose chroma, not luma)."""
    for im in scene_images:
        out = HUE_PERMUTED.fn(im)
        assert out.size == im.size and out.mode == "RGB"
        assert np.abs(_luma(out) - _luma(im)).max() <= 1


def _hue(rgb) -> float:
    return 360 * colorsys.rgb_to_hsv(*(np.array(rgb) / 255))[0]


def _turned(rgb) -> tuple:
    return hue_rotate(Image.new("RGB", (1, 1), rgb)).getpixel((0, 0))


@pytest.mark.parametrize("name", ["distinct", "equal_brightness"])
def test_hue_permutation_moves_every_palette_hue(name):
    """Red goes to green, green to blue, blue to red (hue +120 degrees, within 45), at the same luma."""
    for colour, rgb in palette(name).items():
        new = _turned(rgb)
        turn = (_hue(new) - _hue(rgb)) % 360
        assert 75 <= turn <= 165, (colour, rgb, new, turn)
        assert abs(_luma(Image.new("RGB", (1, 1), new))[0, 0] - _luma(Image.new("RGB", (1, 1), rgb))[0, 0]) <= 1


def test_hue_permutation_leaves_greys_and_clips_bright_colours_by_chroma():
    for v in (0, 77, 128, 255):
        assert _turned((v, v, v)) == (v, v, v)
    yellow = (250, 240, 90)                  # luma 226: blue that bright does not exist, so the result is pale
    new = _turned(yellow)
    assert max(new) - min(new) < max(yellow) - min(yellow)
    assert abs(sum(w * c for w, c in zip((0.299, 0.587, 0.114), new)) - 225.9) <= 0.6


def test_the_harness_knows_the_transforms():
    assert {"blind", "grayscale", "hue_permuted"} <= set(TRANSFORMS) and TRANSFORMS["hue_permuted"] is HUE_PERMUTED


# ---------------------------------------------------------------- the three item groups
def _obj(shape, colour, size_word=""):
    return Obj(shape, colour, PALETTE[colour], 0.0, 3.0, 1.0, 1.0, 1.0, size_word)


TWO_CUBES = [_obj("cube", "red", "large"), _obj("cube", "blue", "small"), _obj("sphere", "green")]
ALL_DIFFERENT = [_obj("cube", "red"), _obj("sphere", "green"), _obj("cylinder", "blue")]


@pytest.mark.parametrize("text,objs,group", [
    ("Is the red cube to the left of the green sphere?", TWO_CUBES, "colour_needed"),
    ("Which object is nearest? the red cube the blue cube the green sphere", TWO_CUBES, "colour_needed"),
    ("How far is the green sphere from the camera?", TWO_CUBES, "colour_redundant"),
    ("Is the red cube to the left of the green sphere?", ALL_DIFFERENT, "colour_redundant"),
    ("Is the large cube behind the sphere?", TWO_CUBES, "shape_named"),
    ("Which is taller, the cylinder or the cube?", ALL_DIFFERENT, "shape_named"),
])
def test_item_groups_on_constructed_scenes(text, objs, group):
    assert gs.item_group(text, objs) == group


@pytest.mark.parametrize("text", ["Is the yellow cube left of the sphere?",   # no yellow object
                                  "Is the cube left of the sphere?",          # two cubes, no size word
                                  "Which way is north?"])                     # no object at all
def test_a_text_that_does_not_fit_the_scene_is_an_error(text):
    with pytest.raises(ValueError):
        gs.item_group(text, TWO_CUBES)


def test_item_groups_on_generated_scenes(items):
    """Shape-named exactly when the generator named by shape; colour needed exactly when some object named by colour
    shares its shape with another object of the scene; every group occurs."""
    seen = set()
    for it in items:
        objs = it.scene.objs
        text = " ".join([it.question, *it.options])
        named = [o for o in objs if f"{o.colour} {o.shape}" in text]
        shares_shape = any(sum(p.shape == o.shape for p in objs) > 1 for o in named)
        group = gs.item_group(text, objs)
        assert (group == "shape_named") == it.colour_free, text
        if not it.colour_free:
            assert (group == "colour_needed") == shares_shape, text
        if len({o.shape for o in objs}) == len(objs):
            assert group != "colour_needed", text
        seen.add(group)
    assert seen == set(gs.GROUPS)


def test_regenerated_benchmark_matches_the_written_records(tmp_path):
    """The records write_omnispatial wrote are reproduced (ids, questions, options with their quirks); a changed
    record is reported as unmatched; a second call reads the cache."""
    write_omnispatial(tmp_path / "omni", 60, seed=3)
    records = load_omnispatial(tmp_path / "omni")
    cached = gs.cached_groups(tmp_path / "groups.json", 60, 3, 112, "distinct")
    report = gs.groups_report(records, cached)
    assert not report["unmatched"] and sum(report["counts"].values()) == len(records) == 60
    assert any(not r.options for r in records) and any(len(set(r.options)) < len(r.options) for r in records)
    assert len({r.id for r in records}) < 60                               # quirks, ids shared across task types
    changed = [SimpleNamespace(**{**vars(records[0]), "question": records[0].question + " Really?"})]
    changed[0].key = records[0].key
    assert gs.match_groups(changed, cached["rows"]) == ({}, [list(records[0].key)])
    stamp = (tmp_path / "groups.json").stat().st_mtime_ns
    assert gs.cached_groups(tmp_path / "groups.json", 60, 3, 112, "distinct") == cached
    assert (tmp_path / "groups.json").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- grayscale augmentation
@pytest.mark.parametrize("n", [100, 101, 7])
def test_gray_rows_are_half_and_fixed_by_the_seed(n):
    rows = gs.gray_rows(n, 0.5, seed=0)
    assert len(rows) == round(0.5 * n) and rows <= set(range(n))
    assert gs.gray_rows(n, 0.5, seed=0) == rows
    assert gs.gray_rows(100, 0.5, seed=1) != gs.gray_rows(100, 0.5, seed=0)
    assert len(gs.gray_rows(n, 1.0, seed=0)) == n


def test_gray_augmented_episodes_gray_exactly_the_chosen_rows():
    from spatialstudy.models.bases import load_model
    from spatialstudy.models.chat import collate
    from spatialstudy.models.episodes import Episodes, spacethinker_episode

    rows = [SimpleNamespace(images=[Image.new("RGB", (112, 112), (200, 30 + 20 * i, 40))], question=f"Q {i}?",
                            reasoning="r", answer="a") for i in range(6)]
    data = gs.GrayAugmented(Episodes(rows, spacethinker_episode), gs.gray_rows(6, 0.5, seed=0))
    for i in range(6):
        messages, images = data[i]
        shown = [c["image"] for m in messages for c in m["content"] if c.get("type") == "image"]
        assert [id(im) for im in shown] == [id(im) for im in images]       # the turns show the same images
        pixels = np.asarray(images[0])
        gray = bool((pixels[..., 0] == pixels[..., 2]).all())
        assert gray == (i in data.gray), i
        assert gray or images[0] is rows[i].images[0]                       # the others are untouched
    _, processor = load_model("tiny-student-random")
    assert collate([data[i] for i in range(6)], processor)["pixel_values"].shape[0] > 0


# ---------------------------------------------------------------- the 2 x 2's interaction
def _predictions(tmp_path, name: str, correct: list) -> dict:
    rows = [{"task_type": "T", "id": f"{i}_0", "config_hash": "h", "partition": "base", "options_in_image": False,
             "image": f"T/{i // 2}.png", "correct_official": c} for i, c in enumerate(correct)]
    path = tmp_path / f"predictions_{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"predictions": str(path), "config_hash": "h"}


def test_difference_in_differences_on_known_predictions(tmp_path):
    records = [SimpleNamespace(key=("T", f"{i}_0")) for i in range(8)]
    a0 = _predictions(tmp_path, "a0", [1, 1, 1, 1, 0, 0, 0, 0])
    a1 = _predictions(tmp_path, "a1", [1, 1, 1, 1, 0, 0, 0, 0])     # augmented: gray costs nothing
    b0 = _predictions(tmp_path, "b0", [1, 1, 1, 1, 1, 0, 0, 0])
    b1 = _predictions(tmp_path, "b1", [0, 0, 1, 1, 1, 0, 0, 0])     # colour-trained: gray costs 2 of 8
    d = gs.difference_in_differences(a1, a0, b1, b0, records)
    assert d["n"] == 8 and d["diff"] == pytest.approx(25.0)
    assert d["ci95"][0] <= 25.0 <= d["ci95"][1]


# ---------------------------------------------------------------- the config
@pytest.mark.parametrize("bad", [{"sft_arm": "student_mcq_blank"}, {"sft_arm": "pupil_mcq"}, {"sft_arm": "student"},
                                 {"gray_fraction": 0.0}, {"gray_fraction": 1.5}, {"n_eval": -1},
                                 {"conditions": ["original", "hue_permuted"]}, {"conditions": ["original", "grayscale",
                                                                                              "sepia"]},
                                 {"max_new_tokens": 0}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GrayscaleConfig(**bad)


def test_config_defaults_types_and_keys():
    cfg = GrayscaleConfig()
    assert cfg.conditions == ["original", "grayscale", "hue_permuted", "blind"] and cfg.gray_fraction == 0.5
    assert GrayscaleConfig(sft_arm="teacher_answer_only", conditions=["grayscale", "original"]).n_control == 40
    with pytest.raises(TypeError):
        GrayscaleConfig(n_control="5")
    with pytest.raises(KeyError, match="did you mean 'n_control'"):
        GrayscaleConfig.check_keys({"n_contrl": 5})


def test_missing_upstream_runs_skip_their_models(tmp_path, monkeypatch, capsys):
    """Above the ci tier a stage that has not run skips the models it provides, with a message, never a crash."""
    monkeypatch.setenv("SPATIALSTUDY_ROOT", str(tmp_path))
    assert gs.upstream("smoke", "04_distill") is None
    assert "no 04_distill run for profile 'smoke'" in capsys.readouterr().out
    assert gs.kd_source("smoke") == "its stage has not run"
    (tmp_path / "runs/smoke/02_sft/student_mcq").mkdir(parents=True)
    assert "holds no trained adapter" in gs.arm_source(tmp_path / "runs/smoke/02_sft", "student_mcq", "SFT")
