"""make_items: procedural spatial VQA items (image + 2-4 option question + reasoning + free answer), deterministic
from a seed, with families drawn from an exactly balanced schedule and the correct letter exactly balanced among the
items of each option count."""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from spatialstudy.data.families import FAMILIES, Ctx, families_in
from spatialstudy.data.scenes import PALETTE, Scene, sample_scene

LETTERS = "ABCD"
COLOUR_FREE_P = 0.5            # share of questions that name objects by shape/size only (the issue asks >= 40%)
N_OBJECTS = (2, 4)             # objects per scene, drawn uniformly
BUILD_TRIES = 8                # role re-draws per family before giving up on a scene for it
_COLOUR_RE = re.compile(r"\b(" + "|".join(PALETTE) + r")\b", re.IGNORECASE)
_SIZE_RE = re.compile(r"\b(large|small)\b")


@dataclass
class Item:
    """One generated question about one rendered scene (several items may share a scene_id and image)."""

    image: Image.Image
    question: str
    options: list[str]
    answer: int
    family: str
    partition: str
    task_type: str
    sub_task_type: str
    reasoning: str
    free_answer: str
    scene_id: int
    kind: str = ""
    roles: tuple = ()
    value: object = None
    colour_free: bool = False
    scene: Scene | None = field(default=None, repr=False)    # kept only with keep_scene=True (tests, figures)

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


def names_colour(text: str) -> bool:
    """True if the text names any palette colour (the measure behind the colour-free share)."""
    return bool(_COLOUR_RE.search(text))


class Schedule:
    """Cycles through shuffled blocks of `values`, so every value appears equally often (off by at most one)."""

    def __init__(self, values, rng):
        self.values, self.rng, self.queue = list(values), rng, []

    def refill(self):
        self.queue = [self.values[i] for i in self.rng.permutation(len(self.values))] + self.queue

    def next(self):
        if not self.queue:
            self.refill()
        return self.queue.pop()

    def peek(self):
        if not self.queue:
            self.refill()
        return self.queue[-1]

    def push_back(self, v):
        self.queue.append(v)


def _place(options: list[str], letter: int, rng) -> tuple[list[str], int]:
    """Put options[0] (the correct one) at index `letter`, the distractors shuffled around it."""
    wrong = [options[1:][i] for i in rng.permutation(len(options) - 1)]
    return wrong[:letter] + [options[0]] + wrong[letter:], letter


def _size_hint(fam, qa) -> bool:
    """A size word in a family where size hints at the answer ("is the large cube wider ...")."""
    return not fam.size_words and bool(_SIZE_RE.search(qa.question + " " + " ".join(qa.options)))


def _try_family(name: str, scene: Scene, rng, colour_free: bool, targets: dict):
    fam = FAMILIES[name]
    if scene.geom.k < fam.min_objects:
        return None
    ctx = Ctx(scene.geom, scene.objs, rng, colour_free, targets[name].peek() if name in targets else None)
    for _ in range(BUILD_TRIES):
        qa = fam.build(ctx)
        if qa is not None and not _size_hint(fam, qa):
            return qa
    return None


def _item(qa, name, scene, sid, letters, rng, keep_scene) -> Item:
    """Place the correct option on the next letter of the schedule for this many options (2, 3 or 4)."""
    fam, n = FAMILIES[name], len(qa.options)
    if fam.ordered:            # the scheduled answer decides the letter (a fixed order; answers balanced per family)
        opts = sorted(qa.options)
        ans = opts.index(qa.options[0])
    else:
        if n not in letters:
            letters[n] = Schedule(range(n), rng)
        opts, ans = _place(qa.options, letters[n].next(), rng)
    free = not names_colour(qa.question + " " + " ".join(opts))
    return Item(scene.image, qa.question, opts, ans, name, fam.partition, fam.task_type, fam.sub_task_type,
                qa.reasoning, qa.free_answer, sid, qa.kind, qa.roles, qa.value, free, scene if keep_scene else None)


def make_items(n: int, seed: int = 0, partition: str | None = None, families=None, image_size: int = 112,
               palette: str = "distinct", per_scene: int = 1, keep_scene: bool = False,
               colour_free_p: float = COLOUR_FREE_P, n_objects: tuple[int, int] = N_OBJECTS) -> list[Item]:
    """n items from families of `partition` (None = all) or the explicit `families` list; deterministic in seed.
    `n_objects` bounds the objects per scene (more objects: families needing 4 are built on more scenes)."""
    names = families_in(partition, families)
    if not names:
        raise ValueError(f"no families for partition={partition!r}, families={families!r}")
    rng = np.random.default_rng(seed)
    fam_sched, letter_sched = Schedule(names, rng), {}
    # closed-answer families get an answer schedule too: a scheduled answer waits until a scene allows it
    targets = {n_: Schedule(FAMILIES[n_].answers, rng) for n_ in names if FAMILIES[n_].answers}
    items, sid = [], 0
    while len(items) < n:
        scene = sample_scene(rng, image_size, palette, n_objects)
        for _ in range(min(per_scene, n - len(items))):
            it = _one(scene, sid, fam_sched, letter_sched, names, rng, keep_scene, colour_free_p, targets)
            if it is not None:
                items.append(it)
        sid += 1
    return items


def _one(scene, sid, fam_sched, letter_sched, names, rng, keep_scene, colour_free_p, targets):
    """One item on this scene: the scheduled family if it can be built here, else another (the scheduled one waits)."""
    want = fam_sched.next()
    colour_free = rng.random() < colour_free_p
    if not fam_sched.queue:
        fam_sched.refill()
    upcoming = fam_sched.queue[::-1]              # substitutes come from the current block first, keeping balance
    # substitutes only from the current block: a family that is rarely buildable (e.g. it needs 4 objects) then
    # costs extra scenes instead of being crowded out by an always-buildable one
    for name in [want] + upcoming:
        qa = _try_family(name, scene, rng, colour_free, targets)
        if qa is not None:
            if name in targets:
                targets[name].next()            # the scheduled answer was used
            if name != want:                    # swap: the substitute leaves the queue, the wanted one waits
                fam_sched.push_back(want)
                if name in fam_sched.queue:
                    fam_sched.queue.remove(name)
            return _item(qa, name, scene, sid, letter_sched, rng, keep_scene)
    fam_sched.push_back(want)
    return None


def summarize(items: list[Item]) -> dict:
    """Counts by family / partition / task type / letter, and the colour-free share."""
    return {
        "n": len(items),
        "scenes": len({it.scene_id for it in items}),
        "family": dict(Counter(it.family for it in items)),
        "partition": dict(Counter(it.partition for it in items)),
        "task_type": dict(Counter(it.task_type for it in items)),
        "letter": dict(sorted(Counter(it.letter for it in items).items())),
        "colour_free_share": float(np.mean([it.colour_free for it in items])) if items else 0.0,
    }


def throughput(n: int = 300, seed: int = 0, **kw) -> float:
    """Measured items per minute of make_items on this machine (one process)."""
    t = time.perf_counter()
    make_items(n, seed, **kw)
    return n / (time.perf_counter() - t) * 60
