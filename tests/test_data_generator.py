"""Procedural scenes and question families: rendering, point-cloud recovery, ground truth, balance, determinism."""
from collections import Counter
import numpy as np
import pytest

from spatialstudy.data import FAMILIES, PARTITIONS, SUBTASK_FAMILIES, make_items, palette, sample_scene, summarize
from spatialstudy.data import families as F
from spatialstudy.data.generator import names_colour
from spatialstudy.data import scenes as S
from spatialstudy.data.scenes import Camera, Geometry, luma, point_cloud, render


@pytest.fixture(scope="module")
def items():
    return make_items(208, seed=3, per_scene=2, keep_scene=True)


def _geometry_from_point_cloud(scene) -> Geometry:
    """Independent recovery: back-project the depth map, group points by object id, take means and extents."""
    pts, ids = point_cloud(scene.rend, scene.cam)
    k = len(scene.objs)
    cen = np.array([pts[ids == i].mean(0) for i in range(k)])
    size = np.array([[np.ptp(pts[ids == i][:, 0]), pts[ids == i][:, 1].max(), np.ptp(pts[ids == i][:, 2])]
                     for i in range(k)])
    rows, cols = np.nonzero(scene.rend.ids >= 0)
    lab = scene.rend.ids[rows, cols]
    s = scene.cam.size
    uv = np.array([[(cols[lab == i].mean() + 0.5) / s, (rows[lab == i].mean() + 0.5) / s] for i in range(k)])
    return Geometry(cen, size, uv, scene.cam.pos)


def test_render_depth_backprojects_onto_true_surfaces():
    rng = np.random.default_rng(0)
    sc = sample_scene(rng)
    pts, ids = point_cloud(sc.rend, sc.cam)
    ground = pts[ids == -1]
    assert np.allclose(ground[:, 1], 0, atol=1e-6)                 # ground pixels lie on y = 0
    for i, ob in enumerate(sc.objs):
        p = pts[ids == i]
        assert len(p) >= 40
        assert p[:, 1].min() >= -1e-6 and p[:, 1].max() <= ob.height + 1e-6
        assert np.all(np.abs(p[:, 0] - ob.x) <= ob.width / 2 + 1e-6)
        if ob.shape == "sphere":                                    # every point on the sphere's surface
            d = np.linalg.norm(p - np.array([ob.x, ob.radius, ob.z]), axis=1)
            assert np.allclose(d, ob.radius, atol=1e-6)


def test_shadows_darken_the_ground():
    rng = np.random.default_rng(1)
    sc = sample_scene(rng)
    img = np.asarray(sc.image).reshape(-1, 3).astype(float)
    g = img[sc.rend.ids.reshape(-1) == -1].mean(1)
    assert g.max() - g.min() > 40                                    # lit ground vs shadowed ground


def test_recovered_centroids_match_true_positions():
    rng = np.random.default_rng(2)
    for _ in range(5):
        sc = sample_scene(rng)
        for i, ob in enumerate(sc.objs):
            # visible-surface centroid sits on the camera side of the object, within its half extent
            assert abs(sc.geom.centroid[i, 0] - ob.x) <= ob.width / 2
            assert abs(sc.geom.centroid[i, 2] - ob.z) <= ob.depth / 2
            assert abs(sc.geom.size[i, 1] - ob.height) < 0.05 * ob.height + 0.02


def test_palettes_brightness():
    lum = sorted(luma(c) for c in palette("distinct").values())
    assert min(np.diff(lum)) >= 25                                  # grayscale keeps objects apart
    eq = [luma(c) for c in palette("equal_brightness").values()]
    assert max(eq) - min(eq) < 6
    with pytest.raises(ValueError):
        palette("nope")


def test_render_is_deterministic_and_sized():
    a = sample_scene(np.random.default_rng(5), image_size=64)
    b = sample_scene(np.random.default_rng(5), image_size=64)
    assert a.image.size == (64, 64) and np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_make_items_deterministic():
    a, b = make_items(24, seed=7), make_items(24, seed=7)
    assert [(x.question, x.options, x.answer) for x in a] == [(x.question, x.options, x.answer) for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    c = make_items(24, seed=8)
    assert [x.question for x in a] != [x.question for x in c]


def test_answers_agree_with_point_cloud_geometry(items):
    for it in items:
        g = _geometry_from_point_cloud(it.scene)
        v = FAMILIES[it.family].truth(g, *it.roles)
        if isinstance(v, float):
            assert v == pytest.approx(it.value, rel=1e-6), it.family
        else:
            assert v == it.value, it.family


def test_closer_answer_matches_centroid_depths(items):
    closer = [it for it in items if it.family == "closer_pair"]
    assert closer
    for it in closer:
        g = _geometry_from_point_cloud(it.scene)
        a, b = it.roles
        near = a if np.linalg.norm(g.centroid[a] - g.cam) < np.linalg.norm(g.centroid[b] - g.cam) else b
        ctx = F.Ctx(g, it.scene.objs, np.random.default_rng(0), it.colour_free)
        assert it.options[it.answer] == ctx.the(near)


def test_letters_exactly_balanced_per_option_count():
    for ps in (1, 3):
        its = make_items(200, seed=11, per_scene=ps)
        for n in (2, 3, 4):
            counts = Counter(it.answer for it in its if len(it.options) == n)
            assert set(counts) == set(range(n)), (n, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (n, counts)


def test_options_exact_distinct_and_all_possible(items):
    """2-4 distinct options, none of the fillers that were never correct (a text-only guess skipped them)."""
    for it in items:
        assert 2 <= len(it.options) <= 4 and len(set(it.options)) == len(it.options)
        assert 0 <= it.answer < len(it.options) and it.letter == "ABCD"[it.answer]
        assert not any(w in o.lower() for o in it.options for w in (F.CANT, "equally", "same", "together"))


def _correct_text(it) -> str:
    """The correct option's text rebuilt from the item's ground truth (value), independent of the option order."""
    ctx = F.Ctx(it.scene.geom, it.scene.objs, np.random.default_rng(0), it.colour_free)
    if it.kind == "object" and isinstance(it.value, tuple):
        return f"{ctx.the(it.value[0])} and {ctx.the(it.value[1])}"
    if it.kind == "object":
        return ctx.the(it.value)
    if it.kind == "which":
        return ctx.the(it.value)
    if it.kind == "yesno":
        return "Yes" if it.value else "No"
    if it.kind == "choice" and isinstance(it.value, tuple):
        return ", then ".join(ctx.the(i) for i in it.value)
    return {**F.DIR_TEXT, **F.RELATION_TEXT, "left": "to the left", "right": "to the right"}.get(it.value, it.value) \
        if it.family in ("relative_direction", "view_from_behind") or it.value in F.DIR_TEXT else it.value


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shuffled_options_keep_the_answer_correct(name):
    """Wherever the options land, options[answer] is the ground truth's own text."""
    its = make_items(12, seed=21, families=[name], keep_scene=True)
    assert len({it.answer for it in its}) > 1                         # the correct option moves
    assert all(it.options == sorted(it.options) for it in its) == FAMILIES[name].ordered   # fixed or shuffled
    for it in its:
        right = it.options[it.answer]
        if it.kind == "number":
            shown = float(right.split()[0])
            factor = 1.0 if right.endswith("seconds") else F.UNIT_FACTORS[right.split()[1]]
            assert shown == pytest.approx(it.value * factor, rel=0.06, abs=0.06), (right, it.value)
        elif it.family in ("view_from_behind",):
            assert right == f"to the {it.value}"
        elif it.family in ("facing_camera_side", "facing_object_side"):
            assert right == F.DIR_TEXT[it.value]
        elif it.family == "relative_direction":
            assert right == F.RELATION_TEXT[it.value]
        elif it.family == "image_quadrant":
            assert right == it.value
        else:
            want = _correct_text(it)
            assert want.lower() in right.lower() or right.lower().startswith(want.lower()), (right, want)


def test_colour_free_share(items):
    share = np.mean([not names_colour(it.question + " ".join(it.options)) for it in items])
    assert share >= 0.4
    assert summarize(items)["colour_free_share"] == pytest.approx(share)


def test_partitions_and_family_filter():
    for part in PARTITIONS:
        its = make_items(12, seed=1, partition=part)
        assert {it.partition for it in its} == {part}
    its = make_items(8, seed=1, families=["motion_time"])
    assert {it.family for it in its} == {"motion_time"}
    with pytest.raises(ValueError):
        make_items(2, families=["nope"])


def test_every_family_generated_and_subtasks_covered():
    s = summarize(make_items(len(FAMILIES) * 4, seed=2, per_scene=2))
    assert set(s["family"]) == set(FAMILIES)
    assert max(s["family"].values()) - min(s["family"].values()) <= 3       # scheduled, not random
    for task, subs in F.OMNISPATIAL_SUBTASKS.items():
        for sub in subs:
            assert SUBTASK_FAMILIES[(task, sub)], (task, sub)


def test_per_scene_shares_image():
    its = make_items(9, seed=4, per_scene=3)
    assert len({it.scene_id for it in its}) == 3
    assert its[0].image is its[1].image


# Hand-made geometry (camera at (0, 2, 0)): every family's ground-truth function against values worked by hand.
G = Geometry(centroid=np.array([[-1.0, 0.5, 3.0], [1.0, 0.3, 5.0], [0.2, 0.8, 7.0]]),
             size=np.array([[1.0, 1.0, 1.0], [0.6, 0.6, 0.6], [0.5, 1.6, 0.5]]),
             uv=np.array([[0.3, 0.6], [0.7, 0.4], [0.52, 0.3]]), cam=np.array([0.0, 2.0, 0.0]))
EXPECTED = {
    "nearest_object": [((), 0)],
    "farthest_object": [((), 2)],
    "image_quadrant": [((0,), "lower left"), ((1,), "upper right")],
    "tallest_object": [((), 2)],
    "closer_pair": [((1, 2), 1), ((2, 0), 0)],
    "relative_direction": [((0, 1), "left"), ((1, 0), "right"), ((1, 2), "in front"), ((2, 1), "behind")],
    "distance_between": [((0, 1), np.sqrt(8.04))],
    "distance_to_camera": [((0,), np.sqrt(12.25))],
    "width_of": [((1,), 0.6)],
    "height_of": [((2,), 1.6)],
    "is_left": [((0, 2), True), ((1, 2), False)],
    "is_above": [((2, 0), True), ((1, 0), False)],
    "is_behind": [((1, 0), True), ((0, 1), False)],
    "is_wider": [((0, 1), True), ((1, 0), False)],
    "which_left": [((1, 0), 0)],
    "which_taller": [((0, 2), 2)],
    "facing_camera_side": [((0, 1), "left")],
    "facing_object_side": [((0, 1, 2), "front")],
    "view_from_behind": [((0, 1), "right"), ((1, 0), "left")],
    "motion_time": [((0, 2), np.sqrt(10) / 2)],
    "push_nearest": [((0, 3.0), 1), ((1, -1.0), 2)],
    "arrive_first": [((0, 1, 1, 4), 1), ((0, 1, 4, 1), 0)],
    "nearest_to_object": [((0,), 1)],
    "route_length": [((0, 1), np.sqrt(10) + np.sqrt(8))],
    "depth_order": [((), (0, 1, 2))],
    "farthest_pair": [((), (0, 2))],
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_ground_truth(name):
    assert name in EXPECTED, f"add a hand-worked case for {name}"
    for args, want in EXPECTED[name]:
        got = FAMILIES[name].truth(G, *args)
        assert (got == pytest.approx(want)) if isinstance(want, float) else got == want


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_builds_consistent_question(name):
    its = make_items(6, seed=5, families=[name], keep_scene=True)
    for it in its:
        assert it.family == name and it.partition == FAMILIES[name].partition
        assert it.task_type == FAMILIES[name].task_type and it.question.strip() and it.reasoning and it.free_answer


def test_numeric_options_from_the_prior():
    """Distractors come from the quantity's prior, OPTION_RATIO apart; a truth from that prior is as likely to be
    the smallest, second, third or largest option."""
    prior = np.random.default_rng(0).uniform(0.2, 6.0, 500)
    ranks = Counter()
    for seed in range(1500):
        value = float(np.random.default_rng(seed).choice(prior))
        built = F.prior_options(value, prior, "centimeters", np.random.default_rng(seed), 100.0)
        if built is None:
            continue
        opts, shown = built
        vals = sorted(float(o.split()[0]) / 100 for o in opts)
        assert opts[0] == f"{F.fmt_number(shown, 0)} centimeters" and len(set(opts)) == 4
        assert all(b / a >= F.OPTION_RATIO * 0.97 for a, b in zip(vals, vals[1:]))
        ranks[vals.index(float(opts[0].split()[0]) / 100)] += 1
    assert sum(ranks.values()) > 500 and min(ranks.values()) > 0.75 * max(ranks.values()), ranks
    assert F.prior_options(0.5, np.array([0.5, 0.55]), "centimeters", np.random.default_rng(0), 100.0) is None
    assert F.free_number(2.4, "feet", np.random.default_rng(1)) in {
        "2\u20133 feet", "about 2.4 feet", "approximately 2.4 feet", "roughly 2.4 feet", "2.4 feet"}


def test_margins_make_labels_unambiguous(items):
    for it in items:
        g = it.scene.geom
        if it.family == "closer_pair":
            a, b = it.roles
            assert abs(g.dist[a] - g.dist[b]) >= F.DIST_MARGIN
        if it.family == "relative_direction":
            assert F._direction_clear(g, *it.roles)
        if it.family in ("is_left", "which_left"):
            a, b = it.roles
            assert abs(g.uv[a, 0] - g.uv[b, 0]) >= F.IMAGE_MARGIN


def test_camera_projection_roundtrip():
    cam = Camera(112)
    pts = np.array([[0.5, 0.3, 4.0], [-1.0, 1.0, 6.0]])
    px, z = cam.project(pts)
    depth = np.full((112, 112), np.inf)
    r, c = int(px[0, 1]), int(px[0, 0])
    depth[r, c] = z[0]
    back = cam.backproject(depth).reshape(112, 112, 3)[r, c]
    assert np.linalg.norm(back - pts[0]) < 0.05                     # within a pixel's footprint
    assert render([], cam).ids.min() == -2                          # sky exists above the ground


def test_side_light_tells_left_from_right():
    """An empty floor is left-right symmetric but for the side light: ground brightness falls from the left edge to
    the right edge by (1 + SIDE_LIGHT) / (1 - SIDE_LIGHT), smoothly (a ground row near the bottom, checked pixel by pixel)."""
    cam = Camera(112)
    img = np.asarray(render([], cam).image, float).mean(2)
    row = img[100]                                                   # a ground row near the bottom
    assert np.all(np.diff(row) <= 0.5)                              # never brighter towards the right
    edge_ratio = row[0] / row[-1]
    expected = (1 + S.SIDE_LIGHT) / (1 - S.SIDE_LIGHT)
    assert edge_ratio > 1.2 and abs(edge_ratio - expected) < 0.1 * expected
    assert abs(row[56] - row[55]) < 2                               # no seam at the centre


def _word_prior(items):
    """Per (family, word): how often an option containing the word is the correct one."""
    hit, tot = Counter(), Counter()
    for it in items:
        for i, o in enumerate(it.options):
            for w in set(o.lower().split()):
                tot[it.family, w] += 1
                hit[it.family, w] += i == it.answer
    return {k: hit[k] / tot[k] for k in tot}


def test_base_families_give_a_blind_guess_no_edge():
    """A text-only guesser (word priors of the options, fit on one seed) stays at chance on another seed: the
    pretrained bases can only beat chance by looking at the image."""
    prior = _word_prior(make_items(320, seed=11, partition="base", per_scene=4))
    test = make_items(320, seed=12, partition="base", per_scene=4)

    def guess(it):
        scores = [np.mean([prior.get((it.family, w), 0.25) for w in set(o.lower().split())]) for o in it.options]
        return int(np.argmax(scores))

    acc = np.mean([guess(it) == it.answer for it in test])
    assert abs(acc - 0.25) < 0.06, acc
    for fam in ("relative_direction", "image_quadrant"):
        answers = Counter(it.options[it.answer] for it in test if it.family == fam)
        assert max(answers.values()) - min(answers.values()) <= 1  # the scheduled answers are exactly balanced
        assert len({tuple(it.options) for it in test if it.family == fam}) == 1    # one fixed (sorted) order


@pytest.mark.parametrize("name", ["is_left", "is_above", "is_behind", "is_wider", "view_from_behind",
                                  "facing_camera_side", "arrive_first"])
def test_scheduled_answers_are_balanced(name):
    """Closed-answer families: each answer equally often, so no answer prior helps a blind guess."""
    its = make_items(40, seed=13, families=[name])
    counts = Counter(str(it.value) if name != "arrive_first" else it.options[it.answer] for it in its)
    if name == "arrive_first":   # the faster object arrives first in exactly half of the items
        faster = Counter((it.roles[2] > it.roles[3]) == (it.value == it.roles[0]) for it in its)
        assert abs(faster[True] - faster[False]) <= 1, faster
    else:
        assert max(counts.values()) - min(counts.values()) <= 1, counts
