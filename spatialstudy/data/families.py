"""Question families: a template, a ground-truth function over the recovered 3D geometry, exact distractors, a short
reasoning trace and a SpaceThinker-style free answer. Each family stands for one OmniSpatial sub-task and belongs to
one partition: "base" (pretraining), "sft" (SpaceThinker-format train/test) or "test_only" (harder, held out).

Ground-truth functions (`gt_*`) are pure functions of a `Geometry` and object indices; builders turn them into a
question and return None when the answer's margin is too small to be unambiguous (the generator then resamples).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from spatialstudy.data.scenes import Geometry, Obj, sample_scene
from spatialstudy.data.streams import role_seed

PARTITIONS = ("base", "sft", "test_only")
CANT = "can not determine"                    # OmniSpatial's own wording for the refusal option

# Margins that make qualitative answers unambiguous (scenes or roles failing them are resampled).
DIST_MARGIN = 0.6          # m, difference in distance to the camera
DEPTH_MARGIN = 0.6         # m, difference in ground depth (z) for in front / behind
IMAGE_MARGIN = 0.08        # fraction of image width between mask centres for left / right
HEIGHT_MARGIN = 0.2        # m, centroid heights for above / below
SIZE_RATIO = 1.3           # taller / wider
QUADRANT_MARGIN = 0.06     # mask centre this far from the image's centre lines
LATERAL_MARGIN = 0.5       # m, world x difference (view from the other side)
DOMINANCE = 1.5            # perspective taking: dominant axis at least this times the other one
MIN_OFFSET = 0.5           # m, and at least this long
NEAREST_MARGIN = 0.4       # m, nearest-to / farthest-pair margins
TIME_RATIO = 1.25          # arrival times differ at least by this factor
OPTION_RATIO = 1.25        # numeric options differ from each other by at least this factor
PRIOR_SCENES = 300         # scenes of the prior bank that numeric distractors are drawn from
PRIOR_DRAWS = 4            # joint draws of three distractors before a numeric builder gives up on this truth
SPEEDS = (1, 2, 4)         # m/s for the motion families
PUSH = (1.5, 2.0, 3.0)     # m, manipulation displacement
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
DIRECTIONS = ("left", "right", "front", "behind")

# --- units in the SpaceThinker / VQASynth style (human_like_distance) ---
UNIT_FACTORS = {"centimeters": 100.0, "inches": 39.3701, "meters": 1.0, "feet": 3.28084}


def pick_unit(metres: float, rng) -> str:
    """VQASynth's unit choice: cm/inches below 1 m, meters/feet above (meters more likely for long distances)."""
    if metres < 1:
        return "centimeters" if rng.random() < 0.6 else "inches"
    return "meters" if rng.random() < (0.6 if metres < 3 else 0.7) else "feet"


def fmt_number(x: float, decimals: int) -> str:
    s = f"{x:.{decimals}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def _decimals(unit: str) -> int:
    return 0 if unit in ("centimeters", "inches") else 1


def prior_options(value: float, prior: np.ndarray, unit: str, rng,
                  factor: float = 1.0) -> tuple[list[str], float] | None:
    """4 numeric options, the correct first: 3 distractors drawn i.i.d. from `prior` (the same quantity measured on
    other scenes), the draw kept only if all four values are OPTION_RATIO apart. The truth is then exchangeable
    with its distractors (it comes from the same prior and passes the same test), so neither a magnitude prior nor
    "pick the largest" tells it apart (scaled distractors let a size prior pick the rung; greedy draws around the
    truth left it mostly on top). None if PRIOR_DRAWS draws all fail (the builder then draws another truth)."""
    draws = prior[rng.integers(len(prior), size=(PRIOR_DRAWS, 3))]
    vals = np.concatenate([np.full((PRIOR_DRAWS, 1), value), draws], axis=1)
    ratio = vals[:, :, None] / vals[:, None, :]
    apart = (ratio >= OPTION_RATIO) | (ratio <= 1 / OPTION_RATIO) | np.eye(4, dtype=bool)
    ok = np.flatnonzero(apart.all(axis=(1, 2)))
    if not len(ok):
        return None
    vals = [float(v) for v in vals[ok[0]]]
    for dec in range(_decimals(unit), 4):          # more decimals until all four strings differ
        opts = [f"{fmt_number(v * factor, dec)} {unit}" for v in vals]
        if len(set(opts)) == 4:
            return opts, float(fmt_number(value * factor, dec))
    return None


def free_number(shown: float, unit: str, rng) -> str:
    """SpaceThinker-style free answer: 'about 1.5 meters', an en-dash range '2–3 feet', or a bare value."""
    r = rng.random()
    if shown >= 2 and r < 0.25:
        lo = int(np.floor(shown))
        return f"{lo}\u2013{lo + 1} {unit}"
    word = ("about", "approximately", "roughly", "")[int(rng.integers(4))]
    return f"{word} {fmt_number(shown, _decimals(unit))} {unit}".strip()


# --- ground-truth functions (pure; unit-tested one by one) ---

def gt_nearest(g: Geometry) -> int:
    return int(np.argmin(g.dist))


def gt_farthest(g: Geometry) -> int:
    return int(np.argmax(g.dist))


def gt_quadrant(g: Geometry, a: int) -> str:
    u, v = g.uv[a]
    return f"{'upper' if v < 0.5 else 'lower'} {'left' if u < 0.5 else 'right'}"


def gt_tallest(g: Geometry) -> int:
    return int(np.argmax(g.size[:, 1]))


def gt_closer(g: Geometry, a: int, b: int) -> int:
    return a if g.dist[a] < g.dist[b] else b


def gt_side(g: Geometry, a: int, b: int) -> str:
    """Is a left or right of b as seen in the image (mask centres)."""
    return "left" if g.uv[a, 0] < g.uv[b, 0] else "right"


def gt_distance(g: Geometry, a: int, b: int) -> float:
    return float(np.linalg.norm(g.centroid[a] - g.centroid[b]))


def gt_cam_distance(g: Geometry, a: int) -> float:
    return float(g.dist[a])


def gt_width(g: Geometry, a: int) -> float:
    return float(g.size[a, 0])


def gt_height(g: Geometry, a: int) -> float:
    return float(g.size[a, 1])


def gt_is_left(g: Geometry, a: int, b: int) -> bool:
    return gt_side(g, a, b) == "left"


def gt_is_above(g: Geometry, a: int, b: int) -> bool:
    return bool(g.centroid[a, 1] > g.centroid[b, 1])


def gt_is_behind(g: Geometry, a: int, b: int) -> bool:
    return bool(g.centroid[a, 2] > g.centroid[b, 2])


def gt_which_left(g: Geometry, a: int, b: int) -> int:
    return a if g.uv[a, 0] < g.uv[b, 0] else b


def gt_which_taller(g: Geometry, a: int, b: int) -> int:
    return a if g.size[a, 1] > g.size[b, 1] else b


def gt_is_wider(g: Geometry, a: int, b: int) -> bool:
    return bool(g.size[a, 0] > g.size[b, 0])


def _frame_direction(origin, facing, target) -> tuple[str, float, float]:
    """Direction of `target` for an observer at `origin` looking at `facing` (ground plane, y up)."""
    f = np.array([facing[0] - origin[0], facing[2] - origin[2]])
    f /= np.linalg.norm(f)
    right = np.array([f[1], -f[0]])                  # facing +z, the right hand points to +x
    v = np.array([target[0] - origin[0], target[2] - origin[2]])
    lat, fwd = float(v @ right), float(v @ f)
    if abs(lat) >= abs(fwd):
        return ("right" if lat > 0 else "left"), abs(lat), abs(fwd)
    return ("front" if fwd > 0 else "behind"), abs(fwd), abs(lat)


def gt_facing_camera(g: Geometry, a: int, b: int) -> str:
    """Standing at a, facing the camera: where is b (left / right / front / behind)?"""
    return _frame_direction(g.centroid[a], g.cam, g.centroid[b])[0]


def gt_facing_object(g: Geometry, a: int, b: int, c: int) -> str:
    """Standing at a, facing b: where is c?"""
    return _frame_direction(g.centroid[a], g.centroid[b], g.centroid[c])[0]


def gt_view_from_behind(g: Geometry, a: int, b: int) -> str:
    """Seen from the opposite side of the scene (looking back towards the camera), is a left or right of b?"""
    return "right" if g.centroid[a, 0] < g.centroid[b, 0] else "left"


def gt_motion_time(g: Geometry, a: int, speed: float) -> float:
    """Seconds for a to reach the camera moving along the ground at `speed` m/s."""
    return float(g.ground_dist[a] / speed)


def _ground(p) -> np.ndarray:
    return np.array([p[0], p[2]])


def gt_push_nearest(g: Geometry, a: int, dx: float) -> int:
    """After moving a by dx metres along x (negative = left), which other object is closest to it?"""
    moved = _ground(g.centroid[a]) + np.array([dx, 0.0])
    d = [np.linalg.norm(_ground(g.centroid[i]) - moved) if i != a else np.inf for i in range(g.k)]
    return int(np.argmin(d))


def gt_arrive_first(g: Geometry, a: int, b: int, va: float, vb: float) -> int:
    return a if g.ground_dist[a] / va < g.ground_dist[b] / vb else b


def gt_nearest_to(g: Geometry, a: int) -> int:
    d = [np.linalg.norm(g.centroid[i] - g.centroid[a]) if i != a else np.inf for i in range(g.k)]
    return int(np.argmin(d))


def gt_route_length(g: Geometry, a: int, b: int) -> float:
    """Walk on the ground from below the camera to a, then to b."""
    cam = _ground(g.cam)
    pa, pb = _ground(g.centroid[a]), _ground(g.centroid[b])
    return float(np.linalg.norm(pa - cam) + np.linalg.norm(pb - pa))


def gt_depth_order(g: Geometry) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(g.dist))


def gt_farthest_pair(g: Geometry) -> tuple[int, int]:
    pairs = list(itertools.combinations(range(g.k), 2))
    return max(pairs, key=lambda p: gt_distance(g, *p))


# --- building questions ---

@dataclass
class QA:
    """A built question: options[0] is the correct one (the generator places it on its scheduled letter)."""

    question: str
    options: list[str]
    reasoning: str
    free_answer: str
    roles: tuple = ()          # the ground-truth function's arguments: FAMILIES[f].truth(geometry, *roles) == value
    value: object = None
    kind: str = ""


@dataclass
class Ctx:
    """What a builder sees: geometry, objects, rng and the naming mode of this question."""

    g: Geometry
    objs: list[Obj]
    rng: np.random.Generator
    colour_free: bool
    target: object = None      # the scheduled answer of a closed-answer family (kept across retries on this scene)

    def name(self, i: int) -> str:
        ob = self.objs[i]
        return f"{ob.size_word} {ob.shape}".strip() if self.colour_free else f"{ob.colour} {ob.shape}"

    def the(self, i: int) -> str:
        return f"the {self.name(i)}"

    def pick(self, n: int) -> tuple[int, ...] | None:
        return tuple(int(i) for i in self.rng.permutation(self.g.k)[:n]) if self.g.k >= n else None

    def object_options(self, correct: int, among: list[int]) -> list[str]:
        """Correct object first, then the other candidates (2-4 options): only objects that could be the answer,
        since padding (absent shapes, "can not determine") was never correct and a text-only guess skipped it."""
        others = [self.the(i) for i in among if i != correct]
        return [self.the(correct)] + [others[i] for i in self.rng.permutation(len(others))][:3]

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]


def m(x: float) -> str:
    """Metres with 1 decimal, for reasoning traces."""
    return f"{x:.1f} m"


def _second_gap(vals, best) -> float:
    return float(np.sort(np.abs(np.asarray(vals) - vals[best]))[1])


# Each builder returns a QA or None (margin not met / not enough objects).

def b_nearest_object(c: Ctx):
    i = gt_nearest(c.g)
    if c.g.k < 2 or _second_gap(c.g.dist, i) < DIST_MARGIN:
        return None
    ds = ", ".join(f"{c.the(j)} {m(c.g.dist[j])}" for j in range(c.g.k))
    return QA("Which object is nearest to the camera?", c.object_options(i, list(range(c.g.k))),
              f"I estimate each object's distance from the camera: {ds}. The smallest is {c.the(i)}.",
              f"The {c.name(i)} is nearest to the camera.", (), i, "object")


def b_farthest_object(c: Ctx):
    i = gt_farthest(c.g)
    if c.g.k < 2 or _second_gap(c.g.dist, i) < DIST_MARGIN:
        return None
    ds = ", ".join(f"{c.the(j)} {m(c.g.dist[j])}" for j in range(c.g.k))
    return QA("Which object is farthest from the camera?", c.object_options(i, list(range(c.g.k))),
              f"I estimate each object's distance from the camera: {ds}. The largest is {c.the(i)}.",
              f"The {c.name(i)} is farthest from the camera.", (), i, "object")


def b_image_quadrant(c: Ctx):
    # The answer comes from the generator's per-family schedule (c.target), so each quadrant is correct equally
    # often and a text-only (blind) guess cannot exploit where objects on the ground usually appear.
    q = c.target or c.choice(QUADRANTS)
    cands = [a for a in range(c.g.k) if gt_quadrant(c.g, a) == q
             and min(abs(c.g.uv[a, 0] - 0.5), abs(c.g.uv[a, 1] - 0.5)) >= QUADRANT_MARGIN]
    if not cands:
        return None
    a = c.choice(cands)
    u, v = c.g.uv[a]
    return QA(f"In which part of the image is {c.the(a)}?", [q] + [x for x in QUADRANTS if x != q],
              f"I locate {c.the(a)} at {u:.0%} of the width and {v:.0%} of the height, so it is in the {q}.",
              f"The {c.name(a)} is in the {q} of the image.", (a,), q, "choice")


def b_tallest_object(c: Ctx):
    # "largest" by volume favoured cubes (a sphere fills pi/6 of its box): the shape word gave it away
    i = gt_tallest(c.g)
    h = c.g.size[:, 1]
    if c.g.k < 2 or np.sort(h)[-2] * SIZE_RATIO > h[i]:
        return None
    hs = ", ".join(f"{c.the(j)} {m(h[j])}" for j in range(c.g.k))
    return QA("Which object is the tallest?", c.object_options(i, list(range(c.g.k))),
              f"I compare the heights of the objects above the ground: {hs}. The tallest is {c.the(i)}.",
              f"The {c.name(i)} is the tallest.", (), i, "object")


def _pair(c: Ctx, margin_ok: Callable[[int, int], bool]):
    roles = c.pick(2)
    return roles if roles and margin_ok(*roles) else None


def b_closer_pair(c: Ctx):
    r = _pair(c, lambda a, b: abs(c.g.dist[a] - c.g.dist[b]) >= DIST_MARGIN)
    if not r:
        return None
    a, b = r
    w = gt_closer(c.g, a, b)
    return QA(f"Which is closer to the camera, {c.the(a)} or {c.the(b)}?", [c.the(w), c.the(b if w == a else a)],
              f"{c.the(a).capitalize()} is {m(c.g.dist[a])} away and {c.the(b)} is {m(c.g.dist[b])} away, "
              f"so {c.the(w)} is closer.", f"The {c.name(w)} is closer to the camera.", r, w, "which")


def _side_ok(c: Ctx, a: int, b: int) -> bool:
    """Image order and 3D lateral order agree, with a clear image margin."""
    du = c.g.uv[a, 0] - c.g.uv[b, 0]
    return abs(du) >= IMAGE_MARGIN and np.sign(du) == np.sign(c.g.centroid[a, 0] - c.g.centroid[b, 0])


def gt_relative_direction(g: Geometry, a: int, b: int) -> str:
    """Where is a relative to b from the camera's side: left / right (world x) or in front / behind (depth z)."""
    dx, dz = g.centroid[a, 0] - g.centroid[b, 0], g.centroid[a, 2] - g.centroid[b, 2]
    if abs(dx) >= abs(dz):
        return "left" if dx < 0 else "right"
    return "in front" if dz < 0 else "behind"


RELATION_TEXT = {"left": "to the left of", "right": "to the right of", "in front": "in front of",
                 "behind": "behind"}


def _direction_clear(g: Geometry, a: int, b: int) -> bool:
    """The dominant axis wins clearly, so the four-way answer is unambiguous."""
    dx, dz = abs(g.centroid[a, 0] - g.centroid[b, 0]), abs(g.centroid[a, 2] - g.centroid[b, 2])
    return max(dx, dz) >= MIN_OFFSET and max(dx, dz) >= DOMINANCE * min(dx, dz)


def b_relative_direction(c: Ctx):
    # Four genuine answers, the target scheduled by the generator (c.target): no option is a filler that is never
    # right, and left/right pairs (far more common than clear front/behind ones) are not over-represented.
    want = c.target or c.choice(tuple(RELATION_TEXT))
    pairs = [(a, b) for a in range(c.g.k) for b in range(c.g.k)
             if a != b and _direction_clear(c.g, a, b) and gt_relative_direction(c.g, a, b) == want]
    if not pairs:
        return None
    a, b = c.choice(pairs)
    dx, dz = c.g.centroid[a, 0] - c.g.centroid[b, 0], c.g.centroid[a, 2] - c.g.centroid[b, 2]
    rel = RELATION_TEXT[want]
    return QA(f"Seen from the camera, where is {c.the(a)} relative to {c.the(b)}?",
              [rel] + [t for t in RELATION_TEXT.values() if t != rel],
              f"From the point cloud, {c.the(a)} is {m(abs(dx))} to the {'left' if dx < 0 else 'right'} and "
              f"{m(abs(dz))} {'nearer' if dz < 0 else 'farther'} than {c.the(b)}; the larger offset decides: {rel}.",
              f"The {c.name(a)} is {rel} the {c.name(b)}.", (a, b), want, "choice")


@functools.lru_cache(maxsize=None)
def _bank() -> tuple[Geometry, ...]:
    """Geometries of PRIOR_SCENES scenes from their own stream, rendered once per process (~3 s)."""
    rng = np.random.default_rng(role_seed(0, "prior_bank"))
    return tuple(sample_scene(rng).geom for _ in range(PRIOR_SCENES))


@functools.lru_cache(maxsize=None)
def prior(truth: Callable, n_roles: int, *extra) -> np.ndarray:
    """`truth(g, *roles, *extra)` over every ordered role tuple of every bank scene: the quantity's prior."""
    return np.array([truth(g, *r, *extra) for g in _bank()
                     for r in itertools.permutations(range(g.k), n_roles)])


def _numeric(c: Ctx, value: float, question: str, reasoning: str, sentence: str, roles, truth, extra=(),
             seconds=False):
    """A 4-option metric question; `roles` are object indices, `extra` the truth's other arguments (a speed).
    The options' unit is drawn independently of the value (VQASynth's value-dependent unit told a blind guess which
    range the truth lies in); the free answer keeps VQASynth's choice."""
    unit = "seconds" if seconds else c.choice(tuple(UNIT_FACTORS))
    built = prior_options(value, prior(truth, len(roles), *extra), unit, c.rng, UNIT_FACTORS.get(unit, 1.0))
    if built is None:
        return None
    opts, _ = built
    free_unit = "seconds" if seconds else pick_unit(value, c.rng)
    free = free_number(value * UNIT_FACTORS.get(free_unit, 1.0), free_unit, c.rng)
    if c.rng.random() < 0.3:                        # VQASynth also answers in full sentences
        free = sentence.format(x=free)
    return QA(question, opts, reasoning, free, tuple(roles) + tuple(extra), value, "number")


def b_distance_between(c: Ctx):
    a, b = c.pick(2)
    d = gt_distance(c.g, a, b)
    q = c.choice(["What is the distance between {A} and {B}?", "How far apart are {A} and {B}?",
                  "How close is {A} from {B}?"]).format(A=c.the(a), B=c.the(b))
    return _numeric(c, d, q, f"I place {c.the(a)} and {c.the(b)} in 3D from the depth; their centres are "
                    f"{m(d)} apart.", f"The {c.name(a)} is {{x}} away from the {c.name(b)}.", (a, b), gt_distance)


def b_distance_to_camera(c: Ctx):
    (a,) = c.pick(1)
    d = gt_cam_distance(c.g, a)
    return _numeric(c, d, f"How far is {c.the(a)} from the camera?",
                    f"From the depth of its pixels, {c.the(a)} is {m(d)} from the camera.",
                    f"The {c.name(a)} is {{x}} from the camera.", (a,), gt_cam_distance)


def b_width_of(c: Ctx):
    (a,) = c.pick(1)
    w = gt_width(c.g, a)
    return _numeric(c, w, c.choice(["How wide is {A}?", "What is the width of {A}?"]).format(A=c.the(a)),
                    f"The points of {c.the(a)} span {m(w)} from left to right.",
                    f"The {c.name(a)} is {{x}} wide.", (a,), gt_width)


def b_height_of(c: Ctx):
    (a,) = c.pick(1)
    h = gt_height(c.g, a)
    return _numeric(c, h, c.choice(["How tall is {A}?", "What is the height of {A}?"]).format(A=c.the(a)),
                    f"The top of {c.the(a)} is {m(h)} above the ground it stands on.",
                    f"The {c.name(a)} is {{x}} tall.", (a,), gt_height)


def _ordered(c: Ctx, margin_ok: Callable[[int, int], bool], truth: Callable[[int, int], bool]):
    """A pair (a, b) whose predicate answer is the scheduled one (c.target): yes and no come equally often, and the
    order of the names decides it, so neither the answer prior nor the names tell a blind guess anything."""
    r = _pair(c, margin_ok)
    if not r:
        return None
    a, b = r
    want = True if c.target is None else c.target
    return (a, b) if truth(a, b) == want else (b, a)


def _yesno(c: Ctx, a, b, truth: bool, pred: str, question: str, why: str):
    """Options: the yes and the no sentence (an equality statement or "can not determine" was never correct)."""
    yes = f"Yes, {c.the(a)} is {pred} {c.the(b)}."
    no = f"No, {c.the(a)} is not {pred} {c.the(b)}."
    right, wrong = (yes, no) if truth else (no, yes)
    return QA(question, [right, wrong], why, right, (a, b), truth, "yesno")


def _wider(c: Ctx, axis: int):
    """Margin test: one object at least SIZE_RATIO times the other along `axis` (0 width, 1 height)."""
    return lambda a, b: max(c.g.size[a, axis], c.g.size[b, axis]) >= SIZE_RATIO * min(c.g.size[a, axis],
                                                                                      c.g.size[b, axis])


def b_is_left(c: Ctx):
    r = _ordered(c, lambda a, b: _side_ok(c, a, b), lambda a, b: gt_is_left(c.g, a, b))
    if not r:
        return None
    a, b = r
    t = gt_is_left(c.g, a, b)
    return _yesno(c, a, b, t, "to the left of",
                  f"Is {c.the(a)} to the left of {c.the(b)} from the viewer's perspective?",
                  f"{c.the(a).capitalize()} appears at {c.g.uv[a, 0]:.0%} of the image width, {c.the(b)} at "
                  f"{c.g.uv[b, 0]:.0%}, so it is {'' if t else 'not '}to the left.")


def b_is_above(c: Ctx):
    r = _ordered(c, lambda a, b: abs(c.g.centroid[a, 1] - c.g.centroid[b, 1]) >= HEIGHT_MARGIN,
                 lambda a, b: gt_is_above(c.g, a, b))
    if not r:
        return None
    a, b = r
    t = gt_is_above(c.g, a, b)
    return _yesno(c, a, b, t, "above", f"Is {c.the(a)} above {c.the(b)}?",
                  f"The centre of {c.the(a)} is {m(c.g.centroid[a, 1])} above the ground, that of {c.the(b)} "
                  f"{m(c.g.centroid[b, 1])}, so it is {'' if t else 'not '}higher.")


def b_is_behind(c: Ctx):
    r = _ordered(c, lambda a, b: abs(c.g.centroid[a, 2] - c.g.centroid[b, 2]) >= DEPTH_MARGIN,
                 lambda a, b: gt_is_behind(c.g, a, b))
    if not r:
        return None
    a, b = r
    t = gt_is_behind(c.g, a, b)
    return _yesno(c, a, b, t, "behind", f"Is {c.the(a)} behind {c.the(b)}?",
                  f"{c.the(a).capitalize()} is {m(c.g.centroid[a, 2])} deep into the scene and {c.the(b)} "
                  f"{m(c.g.centroid[b, 2])}, so it is {'' if t else 'not '}behind it.")


def b_is_wider(c: Ctx):
    r = _ordered(c, _wider(c, 0), lambda a, b: gt_is_wider(c.g, a, b))
    if not r:
        return None
    a, b = r
    t = gt_is_wider(c.g, a, b)
    return _yesno(c, a, b, t, "wider than", f"Is {c.the(a)} wider than {c.the(b)}?",
                  f"{c.the(a).capitalize()} is {m(c.g.size[a, 0])} wide and {c.the(b)} {m(c.g.size[b, 0])}, "
                  f"so it is {'' if t else 'not '}wider.")


def _which(c: Ctx, a, b, w, pred: str, question: str, why: str):
    """Two options, one per named object ("both equally" / "can not determine" were never correct)."""
    opts = [f"The {c.name(w)} is {pred}.", f"The {c.name(b if w == a else a)} is {pred}."]
    return QA(question, opts, why, opts[0], (a, b), w, "which")


def b_which_left(c: Ctx):
    r = _pair(c, lambda a, b: _side_ok(c, a, b))
    if not r:
        return None
    a, b = r
    w = gt_which_left(c.g, a, b)
    return _which(c, a, b, w, "more to the left", f"Which is more to the left, {c.the(a)} or {c.the(b)}?",
                  f"{c.the(a).capitalize()} is at {c.g.uv[a, 0]:.0%} of the image width and {c.the(b)} at "
                  f"{c.g.uv[b, 0]:.0%}; {c.the(w)} is further left.")


def b_which_taller(c: Ctx):
    r = _pair(c, _wider(c, 1))
    if not r:
        return None
    a, b = r
    w = gt_which_taller(c.g, a, b)
    return _which(c, a, b, w, "taller", f"Which is taller, {c.the(a)} or {c.the(b)}?",
                  f"{c.the(a).capitalize()} is {m(c.g.size[a, 1])} tall and {c.the(b)} {m(c.g.size[b, 1])}; "
                  f"{c.the(w)} is taller.")


def _direction_ok(origin, facing, target) -> bool:
    _, major, minor = _frame_direction(origin, facing, target)
    return major >= MIN_OFFSET and major >= DOMINANCE * minor


DIR_TEXT = {"left": "on the left", "right": "on the right", "front": "in front", "behind": "behind"}


def _scheduled(c: Ctx, n: int, ok: Callable, truth: Callable):
    """Random role tuple (n distinct objects) that passes `ok` and whose answer is the scheduled c.target: every
    direction is correct equally often (left/right were far more common than clear front/behind)."""
    tuples = [r for r in itertools.permutations(range(c.g.k), n) if ok(*r)
              and (c.target is None or truth(*r) == c.target)]
    return c.choice(tuples) if tuples else None


def _direction_options(d: str) -> list[str]:
    return [DIR_TEXT[d]] + [DIR_TEXT[x] for x in DIRECTIONS if x != d]


def b_facing_camera_side(c: Ctx):
    r = _scheduled(c, 2, lambda a, b: _direction_ok(c.g.centroid[a], c.g.cam, c.g.centroid[b]),
                   lambda a, b: gt_facing_camera(c.g, a, b))
    if not r:
        return None
    a, b = r
    d = gt_facing_camera(c.g, a, b)
    return QA(f"Imagine you stand at {c.the(a)} and face the camera. Where is {c.the(b)} from your point of view: "
              "on the left, on the right, in front, or behind?", _direction_options(d),
              f"Facing the camera turns my left and right around. From {c.the(a)}, {c.the(b)} lies mostly "
              f"{DIR_TEXT[d]} of me.", f"The {c.name(b)} is {DIR_TEXT[d]}.", r, d, "choice")


def b_facing_object_side(c: Ctx):
    r = _scheduled(c, 3, lambda *r: _direction_ok(*(c.g.centroid[i] for i in r)),
                   lambda *r: gt_facing_object(c.g, *r))
    if not r:
        return None
    a, b, t = r
    d = gt_facing_object(c.g, a, b, t)
    return QA(f"From the viewpoint of {c.the(a)} facing {c.the(b)}, where is {c.the(t)}: on the left, on the "
              "right, in front, or behind?", _direction_options(d),
              f"I put myself at {c.the(a)} looking towards {c.the(b)}; relative to that heading {c.the(t)} lies "
              f"{DIR_TEXT[d]}.", f"The {c.name(t)} is {DIR_TEXT[d]}.", r, d, "choice")


def b_view_from_behind(c: Ctx):
    r = _scheduled(c, 2, lambda a, b: abs(c.g.centroid[a, 0] - c.g.centroid[b, 0]) >= LATERAL_MARGIN,
                   lambda a, b: gt_view_from_behind(c.g, a, b))
    if not r:
        return None
    a, b = r
    s = gt_view_from_behind(c.g, a, b)
    opts = [f"to the {s}", f"to the {'right' if s == 'left' else 'left'}"]
    return QA(f"If you walked around the scene and looked back towards the camera from the far side, would "
              f"{c.the(a)} appear to the left or to the right of {c.the(b)}?", opts,
              f"From the camera {c.the(a)} is to the {'left' if s == 'right' else 'right'} of {c.the(b)}; "
              f"looking from the opposite side swaps left and right, so it appears to the {s}.",
              f"The {c.name(a)} would appear to the {s} of the {c.name(b)}.", r, s, "choice")


def b_motion_time(c: Ctx):
    (a,) = c.pick(1)
    v = c.choice(SPEEDS)
    t = gt_motion_time(c.g, a, v)
    return _numeric(c, t, f"If {c.the(a)} moves straight toward the camera at {v} m/s, how long until it reaches "
                    "the camera?", f"{c.the(a).capitalize()} is {m(c.g.ground_dist[a])} away along the ground; at "
                    f"{v} m/s that takes {t:.1f} seconds.", "It takes {x}.", (a,), gt_motion_time, (v,),
                    seconds=True)


def b_push_nearest(c: Ctx):
    if c.g.k < 3:
        return None
    (a,) = c.pick(1)
    dx = c.choice(PUSH) * c.choice((-1, 1))
    i = gt_push_nearest(c.g, a, dx)
    moved = _ground(c.g.centroid[a]) + np.array([dx, 0.0])
    d = [np.linalg.norm(_ground(c.g.centroid[j]) - moved) if j != a else np.inf for j in range(c.g.k)]
    if np.sort(d)[1] - d[i] < NEAREST_MARGIN:
        return None
    side = "left" if dx < 0 else "right"
    return QA(f"If {c.the(a)} is moved {abs(dx):g} meters to the {side}, which object will be closest to it?",
              c.object_options(i, [j for j in range(c.g.k) if j != a]),
              f"Moving {c.the(a)} {abs(dx):g} m to the {side} puts it {m(d[i])} from {c.the(i)}, nearer than any "
              "other object.", f"The {c.name(i)} will be closest to it.", (a, dx), i, "object")


def b_arrive_first(c: Ctx):
    # Which one arrives first is scheduled as "faster" / "slower" (c.target): otherwise the faster speed in the
    # question told a blind guess the answer most of the time.
    a, b = c.pick(2)
    va, vb = c.choice(SPEEDS), c.choice(SPEEDS)
    ta, tb = c.g.ground_dist[a] / va, c.g.ground_dist[b] / vb
    if max(ta, tb) < TIME_RATIO * min(ta, tb) or va == vb:
        return None
    w = gt_arrive_first(c.g, a, b, va, vb)
    if c.target is not None and (w == (a if va > vb else b)) != (c.target == "faster"):
        return None
    return QA(f"{c.the(a).capitalize()} moves toward the camera at {va} m/s and {c.the(b)} at {vb} m/s. Which "
              "reaches the camera first?", [c.the(w), c.the(b if w == a else a)],
              f"{c.the(a).capitalize()} needs {ta:.1f} s and {c.the(b)} needs {tb:.1f} s, so {c.the(w)} is first.",
              f"The {c.name(w)} reaches the camera first.", (a, b, va, vb), w, "which")


def b_nearest_to_object(c: Ctx):
    if c.g.k < 3:
        return None
    (a,) = c.pick(1)
    i = gt_nearest_to(c.g, a)
    d = np.array([gt_distance(c.g, a, j) if j != a else np.inf for j in range(c.g.k)])
    if np.sort(d)[1] - d[i] < NEAREST_MARGIN:
        return None
    return QA(f"Which object is closest to {c.the(a)}?", c.object_options(i, [j for j in range(c.g.k) if j != a]),
              f"Measuring from {c.the(a)}, {c.the(i)} is {m(d[i])} away, closer than the others.",
              f"The {c.name(i)} is closest to the {c.name(a)}.", (a,), i, "object")


def b_route_length(c: Ctx):
    a, b = c.pick(2)
    L = gt_route_length(c.g, a, b)
    return _numeric(c, L, f"You walk from the camera to {c.the(a)} and then on to {c.the(b)}. About how far do you "
                    "walk?", f"From the camera to {c.the(a)} is {m(c.g.ground_dist[a])} along the ground, and from "
                    f"there to {c.the(b)} is {m(L - c.g.ground_dist[a])}; together {m(L)}.",
                    "You walk {x}.", (a, b), gt_route_length)


def _order_text(c: Ctx, order) -> str:
    return ", then ".join(c.the(i) for i in order)


def b_depth_order(c: Ctx):
    if c.g.k < 3:
        return None
    order = gt_depth_order(c.g)
    if np.min(np.diff(np.sort(c.g.dist))) < DIST_MARGIN:
        return None
    perms = [p for p in itertools.permutations(order) if p != order]
    wrong = [perms[i] for i in c.rng.permutation(len(perms))[:3]]
    return QA("Order the objects from nearest to farthest from the camera.",
              [_order_text(c, p) for p in [order] + wrong],
              "Sorting the objects by their distance from the camera: " +
              ", ".join(f"{c.the(i)} {m(c.g.dist[i])}" for i in order) + ".",
              f"From nearest to farthest: {_order_text(c, order)}.", (), order, "choice")


def b_farthest_pair(c: Ctx):
    if c.g.k < 3:
        return None
    pairs = list(itertools.combinations(range(c.g.k), 2))
    best = gt_farthest_pair(c.g)
    ds = sorted(gt_distance(c.g, *p) for p in pairs)
    if ds[-1] - ds[-2] < NEAREST_MARGIN:
        return None
    txt = lambda p: f"{c.the(p[0])} and {c.the(p[1])}"
    others = [p for p in pairs if p != best]
    opts = [txt(best)] + [txt(others[i]) for i in c.rng.permutation(len(others))[:3]]
    return QA("Which two objects are farthest apart?", opts,
              f"Comparing the distances between every pair, {txt(best)} are {m(ds[-1])} apart, the most.",
              f"The {c.name(best[0])} and the {c.name(best[1])} are farthest apart.", (), best, "object")


@dataclass(frozen=True)
class Family:
    """A question template with its ground-truth function and the OmniSpatial sub-task it stands for."""

    name: str
    partition: str
    task_type: str
    sub_task_type: str
    build: Callable[[Ctx], QA | None] = field(repr=False)
    truth: Callable = field(repr=False)
    min_objects: int = 2
    answers: tuple = ()        # closed answer set: the generator schedules the answer so each is equally common
    size_words: bool = False   # may name objects "the large cube": only where size cannot hint at the answer
    ordered: bool = False      # closed answer set listed in one fixed (sorted) order instead of shuffled


def _fam(name, partition, task, sub, build, truth, min_objects=2, answers=(), size_words=False, ordered=False):
    return name, Family(name, partition, task, sub, build, truth, min_objects, answers, size_words, ordered)


EGO, ALLO, HYPO = ("Perspective_Taking", "Egocentric"), ("Perspective_Taking", "Allocentric"), \
    ("Perspective_Taking", "Hypothetical")
LOC, TRAFFIC, GEO = ("Spatial_Interaction", "Localization"), ("Spatial_Interaction", "Traffic_Analysis"), \
    ("Spatial_Interaction", "Geospatial_Strategy")
GEOM, PATTERN = ("Complex_Logic", "Geometric_Reasoning"), ("Complex_Logic", "Pattern_Recognition")
MANIP, MOTION = ("Dynamic_Reasoning", "Manipulation"), ("Dynamic_Reasoning", "Motion_Analysis")

YESNO = (True, False)
# Every family but the base ones lists its options in a shuffled order (as OmniSpatial does); every family offers
# only options that can be correct, and closed answer sets are scheduled so each answer is equally common. Colour-free names use size words
# ("the large cube") only where size cannot hint at the answer (size_words=True): a large object is taller, wider
# and, to fit the frame, farther away.
FAMILIES: dict[str, Family] = dict([
    # base: what the tiny bases are pretrained on (positions in the image and relative directions), closed answer
    # sets in one fixed order: the scheduled answers keep a text-only guess at chance, and within the smoke budget
    # the tiny bases did not learn to read shuffled options (reports/pretraining_targets.md)
    _fam("image_quadrant", "base", *LOC, b_image_quadrant, gt_quadrant, 1, QUADRANTS, True, True),  # 1 object will do
    _fam("relative_direction", "base", *EGO, b_relative_direction, gt_relative_direction, 2, tuple(RELATION_TEXT),
         True, True),
    # sft: the SpaceThinker question kinds (metric with units, yes/no predicates, which-one, bigger / closer)
    # which-object families need 3+ objects: with two they would repeat closer_pair / which_taller
    _fam("nearest_object", "sft", *LOC, b_nearest_object, gt_nearest, 3),
    _fam("farthest_object", "sft", *LOC, b_farthest_object, gt_farthest, 3),
    _fam("tallest_object", "sft", *GEOM, b_tallest_object, gt_tallest, 3),
    _fam("closer_pair", "sft", *EGO, b_closer_pair, gt_closer),
    _fam("distance_between", "sft", *GEOM, b_distance_between, gt_distance),
    _fam("distance_to_camera", "sft", *EGO, b_distance_to_camera, gt_cam_distance),
    _fam("width_of", "sft", *GEOM, b_width_of, gt_width),
    _fam("height_of", "sft", *GEOM, b_height_of, gt_height),
    _fam("is_left", "sft", *EGO, b_is_left, gt_is_left, 2, YESNO, True),
    _fam("is_above", "sft", *EGO, b_is_above, gt_is_above, 2, YESNO),
    _fam("is_behind", "sft", *EGO, b_is_behind, gt_is_behind, 2, YESNO),
    _fam("is_wider", "sft", *GEOM, b_is_wider, gt_is_wider, 2, YESNO),
    _fam("which_left", "sft", *EGO, b_which_left, gt_which_left, 2, (), True),
    _fam("which_taller", "sft", *EGO, b_which_taller, gt_which_taller),
    # test_only: perspective taking, motion, multi-step
    _fam("facing_camera_side", "test_only", *ALLO, b_facing_camera_side, gt_facing_camera, 2, DIRECTIONS, True),
    _fam("facing_object_side", "test_only", *ALLO, b_facing_object_side, gt_facing_object, 3, DIRECTIONS, True),
    _fam("view_from_behind", "test_only", *HYPO, b_view_from_behind, gt_view_from_behind, 2, ("left", "right"),
         True),
    _fam("motion_time", "test_only", *MOTION, b_motion_time, gt_motion_time),
    _fam("push_nearest", "test_only", *MANIP, b_push_nearest, gt_push_nearest, 3),
    _fam("arrive_first", "test_only", *TRAFFIC, b_arrive_first, gt_arrive_first, 2, ("faster", "slower")),
    _fam("nearest_to_object", "test_only", *LOC, b_nearest_to_object, gt_nearest_to, 3),
    _fam("route_length", "test_only", *GEO, b_route_length, gt_route_length),
    _fam("depth_order", "test_only", *PATTERN, b_depth_order, gt_depth_order, 3),
    _fam("farthest_pair", "test_only", *GEOM, b_farthest_pair, gt_farthest_pair, 3),
])

# OmniSpatial (task_type, sub_task_type) -> the procedural families that stand for it.
SUBTASK_FAMILIES: dict[tuple[str, str], list[str]] = {}
for _f in FAMILIES.values():
    SUBTASK_FAMILIES.setdefault((_f.task_type, _f.sub_task_type), []).append(_f.name)

OMNISPATIAL_SUBTASKS = {
    "Dynamic_Reasoning": ("Manipulation", "Motion_Analysis"),
    "Spatial_Interaction": ("Traffic_Analysis", "Localization", "Geospatial_Strategy"),
    "Complex_Logic": ("Pattern_Recognition", "Geometric_Reasoning"),
    "Perspective_Taking": ("Egocentric", "Allocentric", "Hypothetical"),
}


def families_in(partition: str | None = None, names=None) -> list[str]:
    """Family names filtered by partition and/or an explicit list (validated)."""
    if partition is not None and partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS} or None, got {partition!r}")
    if names is not None:
        unknown = [n for n in names if n not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    return [n for n, f in FAMILIES.items()
            if (partition is None or f.partition == partition) and (names is None or n in names)]
