"""Stage 05_grayscale: does colour matter? (research question 4)

Every model is evaluated through the one harness on the same items under four image conditions: original,
grayscale, hue-permuted (brightness kept, hue turned: the control that separates "colour removed" from "images
unlike training") and blank (the blind control: a transform cannot matter to a model that does not look). Accuracy
and paired differences (gray - original, hue - original) are reported on five splits:

    all questions          the fixed evaluation subset (headline items)
    non-colour questions   those whose text matches none of COLOUR_PATTERNS (the study's split)
    colour needed          named by colour, and the colour word is the only thing that singles an object out
    colour redundant       named by colour, but shape (and size) single every named object out too
    shape-named            no colour word: objects named by shape (and size)

The three item groups need each item's scene: the procedural benchmark is regenerated in memory with its scenes
kept and matched to the written records by id, question and options (unmatched items are reported, never guessed).
Losing accuracy on colour-needed items in grayscale is expected by construction; the question is the other two.
The positive control is a small benchmark slice in the generator's equal-brightness palette, where grayscale
removes all colour information.

Models: the student base, the 02_sft arm `sft_arm` (colour-trained), the same arm retrained here with half its
training images in grayscale (02_sft's recipe, read from its run, so only the images differ: the 2 x 2 of
{colour-trained, gray-augmented} x {colour, gray images}) and the pre-declared best KD arm of 04_distill. The
pre-declared best ICL is read, not evaluated, from 03_icl, which runs its best setting on grayscale and
hue-permuted query images too (`colour_transforms`; only it can rebuild its demos, and methods never import each
other), on its own item subset. This module imports no other method.

Writes runs/<profile>/05_grayscale/{config.json, metrics.json, item_groups.json, predictions_<model>_<condition>.jsonl,
gray_sft/{adapter/, checkpoint-N/, runs/ (TensorBoard), log.json, arm.json}, control_data/ (the equal-brightness
slice), control/ (its predictions)}.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from spatialstudy import runs
from spatialstudy.data.scenes import PALETTE, SHAPES
from spatialstudy.models.lora import arm_trained

STAGE = "05_grayscale"
DATA_STAGE, SFT_STAGE, ICL_STAGE, DISTILL_STAGE = "01_data", "02_sft", "03_icl", "04_distill"
GRAY_ARM = "gray_sft"

# ---------------------------------------------------------------- the colour-question filter
# Each pattern with what it is there for; a question is a colour question when any of them matches. Word
# boundaries keep "credits", "bored", "blackboard", "greenhouse" and "redwood" out; case is ignored.
COLOUR_PATTERNS = {
    "colour / color and their forms": r"\bcolou?r(?:s|ed|ful|ing|less)?\b",
    "basic colour words": r"\b(?:red|orange|yellow|green|blue|purple|violet|pink|brown|black|white|gr[ae]y)\b",
    "other colour names": r"\b(?:cyan|magenta|turquoise|beige|maroon|navy|teal|indigo|crimson|scarlet|silver|gold)\b",
    "-ish forms": r"\b(?:reddish|bluish|greenish|yellowish|orangish|purplish|pinkish|brownish|blackish|whitish"
                  r"|gr[ae]yish)\b",
}
COLOUR_RE = re.compile("|".join(f"(?:{p})" for p in COLOUR_PATTERNS.values()), re.IGNORECASE)

# What the filter gets wrong, known in advance: (text, what the regex says, what is true, why). The notebook prints
# this table with the regex's live answer and tests/test_grayscale.py checks that the regex still says so.
KNOWN_MISSES = [
    ("Is the orange on the plate closer to the camera than the apple?", True, False, "orange the fruit"),
    ("Which can of Red Bull is nearest to the laptop?", True, False, "a brand name"),
    ("How far is the White House from the fountain?", True, False, "a proper name"),
    ("Is Mr. Brown standing to the left of the car?", True, False, "a surname"),
    ("Which runner holds the gold medal?", True, False, "a material or award, not a colour"),
    ("Which is closer, the golden vase or the lamp?", False, True, "'golden' is not in the list"),
    ("Is the golden retriever left of the sofa?", False, False, "a breed: right, but only because 'golden' is "
                                                                  "missing (see the line above)"),
    ("Which car is burgundy?", False, True, "a colour name not in the list"),
    ("Is the traffic light showing stop?", False, True, "colour implied, no colour word"),
    ("Which of the reds is closest?", False, True, "plural colour nouns are not matched ('oranges' the fruit)"),
    ("What shade is the wall on the left?", False, True, "'shade' and 'tint' are not matched"),
]


def is_colour_question(text: str) -> bool:
    """Whether a question (with its options: the text the model reads) names a colour or asks about one, by
    COLOUR_PATTERNS. A filter, not an understanding: KNOWN_MISSES lists what it gets wrong."""
    return bool(COLOUR_RE.search(text or ""))


def known_misses_rows() -> list[str]:
    """KNOWN_MISSES as table lines, with what the regex says now beside what is true."""
    lines = [f"{'regex':<6} {'truth':<6} {'text':<66} why"]
    for text, _, truth, why in KNOWN_MISSES:
        lines.append(f"{str(is_colour_question(text)):<6} {str(truth):<6} {text:<66} {why}")
    return lines


def record_text(record) -> str:
    """The question and its listed options: what the colour filter and the item groups read."""
    return " ".join([record.question, *record.options])


# ---------------------------------------------------------------- colour item groups (procedural data only)
GROUPS = ("colour_needed", "colour_redundant", "shape_named")
GROUP_SPLITS = {"colour_needed": "colour needed", "colour_redundant": "colour redundant", "shape_named": "shape-named"}
SPLITS = ("all questions", "non-colour questions", *GROUP_SPLITS.values())
# how the generator names an object: "<colour> <shape>" or "[<size>] <shape>" (data.families.Ctx.name)
_MENTION_RE = re.compile(rf"\b(?:(large|small) )?(?:({'|'.join(PALETTE)}) )?({'|'.join(SHAPES)})\b", re.IGNORECASE)


def mentions(text: str) -> list[tuple[str, str, str]]:
    """(size word, colour, shape) of every object the text names, lower-cased ("" where a part is absent)."""
    return [tuple((g or "").lower() for g in m.groups()) for m in _MENTION_RE.finditer(text)]


def _matching(objs, shape: str, colour: str = "", size: str = "") -> list:
    return [o for o in objs if o.shape == shape and (not colour or o.colour == colour)
            and (not size or o.size_word == size)]


def singled_out_without_colour(obj, objs, size: str = "") -> bool:
    """Whether `obj` is the only object of its shape in the scene (and of its size word, when the text names one):
    what a reader who cannot see colour still has to pick it out by."""
    return len(_matching(objs, obj.shape, size=size)) == 1


def item_group(text: str, objs) -> str:
    """"colour_needed" when a named object shares its shape (and named size) with another one, so only its colour
    word singles it out; "colour_redundant" when every object is named by colour but singled out by shape alone;
    "shape_named" when the text names no colour. A name that fits no object or several is an error (the scene is
    not the item's)."""
    found = mentions(text)
    if not found:
        raise ValueError(f"no object named in {text!r}")
    needed = False
    for size, colour, shape in found:
        hits = _matching(objs, shape, colour, size)
        if len(hits) != 1:
            name = " ".join(p for p in (size, colour, shape) if p)
            raise ValueError(f"'{name}' names {len(hits)} objects of this scene: {text!r}")
        needed |= bool(colour) and not singled_out_without_colour(hits[0], objs, size)
    if not any(colour for _, colour, _ in found):
        return "shape_named"
    return "colour_needed" if needed else "colour_redundant"


def regenerate(n: int, seed: int, image_size: int, palette: str) -> tuple[list[dict], list[list]]:
    """(entries, scene objects per entry): what data.writers.write_omnispatial writes for (n, seed, image_size,
    palette), rebuilt in memory with every item's objects kept. Same streams as writers.benchmark_items (its
    partition seeds, per_scene 2 and scene-id offsets: it has no keep_scene switch, so its loop is repeated here),
    then the writer's own quirks and ids. match_groups checks the result against the written records."""
    from spatialstudy.data import writers
    from spatialstudy.data.generator import make_items
    from spatialstudy.data.streams import role_seed

    items, objs, scenes = [], [], 0
    for part, share in writers.partition_counts(n).items():
        part_items = make_items(share, role_seed(seed, f"benchmark/{part}"), part, None, image_size, palette, 2,
                                keep_scene=True)
        for it in part_items:
            it.scene_id += scenes
            objs.append(it.scene.objs)
            it.scene = None                       # the objects are all we need; the render buffers go
        scenes = max((it.scene_id for it in items + part_items), default=-1) + 1
        items += part_items
    entries = writers._apply_quirks(items, np.random.default_rng(role_seed(seed, "benchmark_quirks")))  # noqa: SLF001
    writers._assign_ids(entries)                                                                       # noqa: SLF001
    return entries, objs


def entry_groups(entries: list[dict], objs: list[list]) -> list[dict]:
    """One row per written item: key, question, options as written, and its group. Items whose options are drawn
    into the image are grouped by the drawn options (what the model sees)."""
    rows = []
    for e, scene_objs in zip(entries, objs):
        it = e["it"]
        text = " ".join([it.question, *(e["options"] or it.options)])
        rows.append({"task_type": it.task_type, "id": e["id"], "question": it.question, "options": e["options"],
                     "group": item_group(text, scene_objs)})
    return rows


def _same_item(record, row: dict) -> bool:
    """The record is the regenerated item: same question (a drawn-options item adds a sentence) and options."""
    same_q = record.question == row["question"] or (not row["options"] and record.question.startswith(row["question"]))
    return same_q and list(record.options) == row["options"]


def match_groups(records, rows: list[dict]) -> tuple[dict, list]:
    """({record key: group}, [keys of records the regenerated items do not reproduce])."""
    by_key = {(r["task_type"], r["id"]): r for r in rows}
    groups, unmatched = {}, []
    for rec in records:
        row = by_key.get(rec.key)
        if row is not None and _same_item(rec, row):
            groups[rec.key] = row["group"]
        else:
            unmatched.append(list(rec.key))
    return groups, unmatched


def cached_groups(path: Path, n: int, seed: int, image_size: int, palette: str) -> dict:
    """The grouped entries of a generated set, from `path` when it was written for the same set and generator
    source (regenerating 1,800 items takes ~15 s on one core), else regenerated and saved there."""
    from spatialstudy.models.pretrain import generator_version

    key = {"n": n, "seed": seed, "image_size": image_size, "palette": palette, "generator": generator_version()}
    if path.exists() and runs.read_json(path).get("key") == key:
        return runs.read_json(path)
    t0 = time.perf_counter()
    rows = entry_groups(*regenerate(n, seed, image_size, palette))
    cached = {"key": key, "regenerate_s": round(time.perf_counter() - t0, 1), "rows": rows}
    runs.write_json(path, cached)
    return cached


def groups_report(records, cached: dict) -> dict:
    """The item groups of `records`: counts, unmatched keys, an example question per group, and the groups."""
    groups, unmatched = match_groups(records, cached["rows"])
    by_key = {r.key: r for r in records}
    examples = {}
    for key, g in groups.items():
        examples.setdefault(g, record_text(by_key[key]))
    counts = {g: sum(v == g for v in groups.values()) for g in GROUPS}
    if unmatched:
        print(f"[grayscale] {len(unmatched)} of {len(records)} records not reproduced by the regenerated items, "
              f"left out of the item groups, e.g. {unmatched[:3]}")
    return {"available": True, "counts": counts, "unmatched": unmatched, "examples": examples,
            "regenerate_s": cached["regenerate_s"], "groups": groups}


def benchmark_groups(profile: str, records, out: Path) -> dict:
    """Item groups of the evaluation records when they are the procedural benchmark 01_data wrote; on real data
    (no scenes) the groups are unavailable and only the colour-question split is reported."""
    data = runs.read_json(runs.require_run(profile, DATA_STAGE) / "config.json")
    if data.get("omnispatial_path") or not all(r.partition for r in records):
        return {"available": False, "why": "real OmniSpatial records carry no scene: only the regex split applies"}
    cached = cached_groups(out / "item_groups.json", data["n_omni"], data["seed"], data["image_size"],
                           data["palette"])
    return groups_report(records, cached)


def groups_rows(groups: dict) -> list[str]:
    """The item groups as text: counts, unmatched records, one example question per group."""
    if not groups["available"]:
        return [f"item groups: not available ({groups['why']})"]
    lines = [f"item groups: {groups['counts']}; {len(groups['unmatched'])} records not reproduced by regeneration "
             f"(regenerated in {groups['regenerate_s']} s when not cached)"]
    return lines + [f"  {GROUP_SPLITS[g]:<17} e.g. {groups['examples'][g]}" for g in GROUPS if g in groups["examples"]]


def palette_rows() -> list[str]:
    """Each generator colour (both palettes) with its luma, and the same under the hue permutation: the hue moves
    to another colour, the luma stays (within rounding)."""
    from PIL import Image

    from spatialstudy.data.scenes import luma, palette
    from spatialstudy.models.transforms import hue_rotate

    lines = []
    for name in ("distinct", "equal_brightness"):
        for colour, rgb in palette(name).items():
            new = hue_rotate(Image.new("RGB", (1, 1), rgb)).getpixel((0, 0))
            lines.append(f"{name:<17} {colour:<7} {str(rgb):<16} luma {luma(rgb):5.1f}  ->  hue-permuted "
                         f"{str(new):<16} luma {luma(new):5.1f}")
    return lines


# ---------------------------------------------------------------- the positive control (equal-brightness palette)
def control_seed(seed: int) -> int:
    from spatialstudy.data.streams import role_seed

    return role_seed(seed, "gray_control")


def control_set(profile: str, cfg, out: Path) -> tuple[list, dict]:
    """(records, item groups) of the equal-brightness slice: n_control items from the generator under a seed derived
    from 01_data's by the role "gray_control" (no scene shared with the benchmark), written once into the run dir."""
    from spatialstudy.data import load_omnispatial, write_omnispatial
    from spatialstudy.models.pretrain import generator_version

    if not cfg.n_control:
        return [], {"available": False, "why": "n_control is 0"}
    data = runs.read_json(runs.require_run(profile, DATA_STAGE) / "config.json")
    seed, size = control_seed(data["seed"]), data["image_size"]
    key = {"n": cfg.n_control, "seed": seed, "image_size": size, "generator": generator_version()}
    path, marker = out / "control_data", out / "control_data.json"
    if not (path / "data.json").exists() or not marker.exists() or runs.read_json(marker) != key:
        write_omnispatial(path, cfg.n_control, seed, size, palette="equal_brightness")
        runs.write_json(marker, key)
    records = load_omnispatial(path)
    cached = cached_groups(out / "control_groups.json", cfg.n_control, seed, size, "equal_brightness")
    return records, groups_report(records, cached)


# ---------------------------------------------------------------- grayscale augmentation
def gray_rows(n: int, fraction: float, seed: int) -> frozenset:
    """The training rows whose images are shown in grayscale: round(fraction * n) of the n rows, drawn without
    replacement from the stream of role "gray_augment" under `seed`. Fixed by (n, fraction, seed), so the same
    rows are gray in every epoch, on resume and on every machine."""
    from spatialstudy.data.streams import role_seed

    order = np.random.default_rng(role_seed(seed, "gray_augment")).permutation(n)
    return frozenset(int(i) for i in order[:round(fraction * n)])


def gray_episode(messages: list[dict], images: list) -> tuple[list[dict], list]:
    """The episode with each of its images in grayscale, in the image list and in the turns alike."""
    from spatialstudy.models.transforms import GRAYSCALE

    gray = {id(im): GRAYSCALE.fn(im) for im in images}

    def turn(m):
        if not isinstance(m.get("content"), list):
            return m
        return {**m, "content": [{**c, "image": gray[id(c["image"])]} if c.get("type") == "image" else c
                                 for c in m["content"]]}
    return [turn(m) for m in messages], [gray[id(im)] for im in images]


class GrayAugmented:
    """Training episodes whose rows in `gray` show their images in grayscale; the other rows are unchanged."""

    def __init__(self, data, gray: frozenset):
        self.data, self.gray = data, gray

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        messages, images = self.data[i]
        return gray_episode(messages, images) if i in self.gray else (messages, images)


# ---------------------------------------------------------------- upstream runs and the models
def upstream(profile: str, stage: str) -> Path | None:
    """An earlier stage's run dir. At the ci tier a missing one is built (runs.require_run); elsewhere a missing one
    skips the models it provides, with a message, instead of stopping this stage."""
    if profile == "ci" or runs.is_done(profile, stage):
        return runs.require_run(profile, stage)
    print(f"[grayscale] no {stage} run for profile {profile!r}: skipping the models it provides (make it with "
          f"python -m spatialstudy.run --profile {profile} --only {stage})")
    return None


def _quant(stage_cfg: dict) -> dict:
    return {"quantize": stage_cfg.get("quantize", False), "quantize_vision": stage_cfg.get("quantize_vision", False)}


def arm_source(run: Path | None, arm: str, label: str) -> dict | str:
    """How to load a trained arm of an earlier stage (its base as it trained, its adapter, its quantisation), or
    why it cannot be."""
    if run is None:
        return "its stage has not run"
    path = run / arm
    if not (path / "adapter" / "adapter_config.json").exists():
        return f"{path} holds no trained adapter"
    info = runs.read_json(path / "arm.json")
    return {"label": label, "base": info["base"], "adapter": str(path / "adapter"),
            "quant": _quant(runs.read_json(run / "config.json")), "origin": f"{run.name}/{arm}", "hash": info["hash"]}


def base_source(cfg) -> dict:
    """The student base as the baseline stage loads it: a tiny spec, or a checkpoint folder (relative to the
    project root) or a cached hub name."""
    local = runs.resolve(cfg.student)
    spec = str(local) if not cfg.student.startswith("tiny-") and local.exists() else cfg.student
    return {"label": "student base", "base": spec, "adapter": None, "quant": {}, "origin": "baseline"}


def kd_source(profile: str) -> dict | str:
    """04_distill's pre-declared best KD arm (its metrics name the arm's folder). An arm trained on a student whose
    embeddings were resized to the teacher's vocabulary (vocab: resize_student) cannot be rebuilt from the base and
    its adapter alone, so it is skipped with that reason."""
    run = upstream(profile, DISTILL_STAGE)
    if run and runs.read_json(run / "config.json").get("vocab") == "resize_student":
        return "its student was trained with embeddings resized to the teacher's vocabulary (vocab: resize_student)"
    best = runs.read_json(run / "metrics.json")["best"] if run else ""
    return arm_source(run, best, f"best KD ({best})")


def load_source(src: dict, profile: str):
    """(model, processor) for evaluation: a base as the baseline stage loads it, or an arm (merged adapter)."""
    if src["adapter"] is None:
        from spatialstudy.models.bases import load_for_eval

        return load_for_eval(src["base"], tier=profile)
    from spatialstudy.models.lora import load_adapted

    return load_adapted(src["base"], src["adapter"], SimpleNamespace(**src["quant"]))


# ---------------------------------------------------------------- the gray-augmented arm (02_sft's recipe)
def sft_recipe(run: Path, arm: str):
    """(LoRA training config, 02_sft config dict, the arm's arm.json) of the colour-trained arm: every setting the
    gray arm needs to train exactly as it did."""
    import dataclasses

    from spatialstudy.configs import LoraTrainConfig

    sft_cfg = runs.read_json(run / "config.json")
    # a field the run's config lacks (added to LoraTrainConfig later) keeps its default, as its arm trained
    recipe = LoraTrainConfig(**{f.name: sft_cfg[f.name] for f in dataclasses.fields(LoraTrainConfig)
                                if f.name in sft_cfg})
    return recipe, sft_cfg, runs.read_json(run / arm / "arm.json")


def recipe_lr(sft_cfg: dict, info: dict) -> float:
    """02_sft's learning rate for the arm (a teacher arm may have its own)."""
    teacher = info["arm"]["model"] == "teacher" and sft_cfg.get("teacher_lr")
    return sft_cfg["teacher_lr"] if teacher else sft_cfg["lr"]


def gray_data(profile: str, recipe, info: dict, cfg):
    """(training episodes with the chosen rows gray, validation episodes in colour, gray rows): the arm's own rows
    and target, converted with 02_sft's seeds. Validation stays in colour, so its loss compares with the arm's."""
    from spatialstudy.models.episodes import episodes, spacethinker_rows

    rows = spacethinker_rows(profile, recipe.spacethinker_path, recipe.n_train, recipe.n_val)
    if [len(rows[0]), len(rows[1])] != info["rows"]:
        raise ValueError(f"{SFT_STAGE}'s arm trained on {info['rows']} (train, validation) rows; {DATA_STAGE} now "
                         f"gives {[len(rows[0]), len(rows[1])]}: re-run {SFT_STAGE} first")
    target, layout = info["arm"]["target"], recipe.episode_layout()
    train, _ = episodes(rows[0], target, seed=recipe.seed, **layout)
    val, _ = episodes(rows[1], target, seed=recipe.seed + 1, **layout)
    gray = gray_rows(len(train), cfg.gray_fraction, cfg.seed)
    return GrayAugmented(train, gray), val, gray


def fit_gray_arm(recipe, sft_cfg: dict, info: dict, path: Path, data: tuple) -> dict:
    """Train with transformers' Trainer (resuming from the last checkpoint), save the adapter, return the log. The
    torch seed is set to the recipe's before LoRA's initialisation, as the Trainer sets it before the data order."""
    from transformers import Trainer

    from spatialstudy.models.chat import collate
    from spatialstudy.models.lora import load_base, make_trainable, train_and_save, training_args

    model, processor, quantized = load_base("", "", recipe, path=info["base"])
    runs.seed_everything(recipe.seed)
    model = make_trainable(model, recipe, quantized)
    loss_on_prompt = sft_cfg.get("loss_on_prompt", False)
    trainer = Trainer(model=model, args=training_args(recipe, path, recipe_lr(sft_cfg, info)), train_dataset=data[0],
                      eval_dataset=data[1], data_collator=lambda eps: collate(eps, processor, loss_on_prompt))
    return train_and_save(trainer, model, path, "grayscale", rows=len(data[0]), gray_rows=len(data[2]))


def gray_arm_dir(cfg, out: Path, run: Path) -> tuple:
    """(recipe, 02_sft config, the colour arm's arm.json, the gray arm's dir, its identity): the dir is keyed by the
    colour-trained arm's hash, its base and rows, the gray share and seed (emptied when those changed)."""
    recipe, sft_cfg, info = sft_recipe(run, cfg.sft_arm)
    identity = {"copies": f"{SFT_STAGE}/{cfg.sft_arm}", "copies_hash": info["hash"], "base": info["base"],
                "rows": info["rows"], "gray_fraction": cfg.gray_fraction, "gray_seed": cfg.seed}
    return recipe, sft_cfg, info, runs.keyed_dir(out / GRAY_ARM, identity, "grayscale"), identity


def gray_arm(profile: str, cfg, out: Path, run: Path) -> tuple[dict, dict]:
    """(source, training log) of the gray-augmented arm: trained now, or found under the same identity."""
    recipe, sft_cfg, info, path, identity = gray_arm_dir(cfg, out, run)
    if arm_trained(path):
        log = runs.read_json(path / "log.json")
    else:
        log = fit_gray_arm(recipe, sft_cfg, info, path, gray_data(profile, recipe, info, cfg))
    src = {"label": f"SFT gray-augmented ({cfg.sft_arm})", "base": info["base"], "adapter": str(path / "adapter"),
           "quant": _quant(sft_cfg), "origin": f"{STAGE}/{GRAY_ARM}", "hash": runs.config_hash(identity)}
    return src, log


def train_in_parallel(profile: str, cfg) -> bool:
    """Under several processes (`torchrun` / `accelerate launch`, the runner's --direct): every process trains the
    gray arm (the Trainer's data parallelism); then the main process goes on alone to evaluate, finding the arm
    trained, and the others stop (True for them). One process: nothing to do here (False)."""
    from spatialstudy.models.lora import processes

    state = processes()
    if state.num_processes == 1:
        return False
    if not runs.is_done(profile, SFT_STAGE):   # not built here: the other processes would wait out its whole run
        raise FileNotFoundError(f"the gray arm repeats {SFT_STAGE}'s {cfg.sft_arm}, which has no {profile} run: "
                                f"python -m spatialstudy.run --profile {profile} --only {SFT_STAGE} first")
    run = runs.run_dir(profile, SFT_STAGE)
    with state.main_process_first():   # one process empties a dir of other settings; the rest find it done
        recipe, sft_cfg, info, path, _ = gray_arm_dir(cfg, runs.run_dir(profile, STAGE), run)
    if not arm_trained(path):
        fit_gray_arm(recipe, sft_cfg, info, path, gray_data(profile, recipe, info, cfg))
    return not state.is_main_process


def gray_arm_entry(log: dict, run: Path, cfg) -> dict:
    """What the report says about the gray arm's training, beside the colour-trained arm's steps."""
    sft_log = runs.read_json(run / cfg.sft_arm / "log.json")
    keep = ("train_s", "steps", "rows", "gray_rows", "resumed_from", "peak_memory")
    losses = [(h["step"], h["loss"]) for h in log.get("log_history", []) if "loss" in h]
    return {"train": {k: log.get(k) for k in keep}, "sft_steps": sft_log.get("steps"), "losses": losses,
            "copies": f"{SFT_STAGE}/{cfg.sft_arm}", "gray_fraction": cfg.gray_fraction}


# ---------------------------------------------------------------- evaluation
def conditions(names=None) -> dict:
    """{condition: image transform}: original images, grayscale, hue-permuted and blank (the blind control), or
    those of `names`, in that order."""
    from spatialstudy.models.transforms import BLIND, GRAYSCALE, HUE_PERMUTED

    table = {"original": None, "grayscale": GRAYSCALE, "hue_permuted": HUE_PERMUTED, "blind": BLIND}
    return {c: t for c, t in table.items() if names is None or c in names}


CONTROL_CONDITIONS = ("original", "grayscale")
CHANGES = {"grayscale - original": ("grayscale", "original"), "hue_permuted - original": ("hue_permuted", "original")}
CONDITION_LABELS = {"original": "original", "grayscale": "grayscale", "hue_permuted": "hue-permuted",
                    "blind": "blind (blank image)"}


def eval_settings(cfg, name: str, transform):
    from spatialstudy.evaluation.eval import EvalSettings

    return EvalSettings(name=name, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                        prompt_style="manual_cot", transform=transform, restart_stale=True)


def compact(summary: dict) -> dict:
    """What this stage keeps of an evaluation summary: headline accuracy, parse failures, cost, and the predictions
    file with its config hash (the split accuracies and paired differences are read from it)."""
    keep = ("n", "n_headline", "accuracy_official", "accuracy_lenient", "predictions", "config_hash", "n_generated_now")
    return {**{k: summary[k] for k in keep}, "transform": summary["config"]["transform"],
            "unparsed_official": summary["scorers"]["official"]["parse_failure_rate"],
            "latency_s": summary["latency_s"]["mean"]}


def evaluate_conditions(model, processor, name: str, records: list, out: Path, cfg, names) -> dict:
    """{condition: compact summary} of one model on `records` under each named condition (resumable files)."""
    from spatialstudy.evaluation.eval import evaluate

    table = conditions()
    return {c: compact(evaluate(model, processor, records, out, eval_settings(cfg, name, table[c]))) for c in names}


def model_entry(name: str, src: dict, profile: str, cfg, data: dict, out: Path) -> dict:
    """Load one model, evaluate it on the benchmark under every condition and on the control slice in colour and
    gray, then free it before the next one loads."""
    import gc

    model, processor = load_source(src, profile)
    evals = evaluate_conditions(model, processor, name, data["records"], out, cfg, list(conditions(cfg.conditions)))
    control = evaluate_conditions(model, processor, name, data["control"], out / "control", cfg,
                                  CONTROL_CONDITIONS) if data["control"] else {}
    del model, processor
    gc.collect()
    return {"label": src["label"], "origin": src["origin"], "evals": evals, "control": control}


# ---------------------------------------------------------------- splits, accuracies, paired differences
def splits(records: list, groups: dict) -> dict:
    """{split: records}: all, the non-colour questions (regex), and each item group (when groups are known)."""
    out = {"all questions": list(records),
           "non-colour questions": [r for r in records if not is_colour_question(record_text(r))]}
    if groups.get("available"):
        for g, label in GROUP_SPLITS.items():
            out[label] = [r for r in records if groups["groups"].get(r.key) == g]
    return out


def _headline(records: list) -> list:
    from spatialstudy.scoring import in_headline

    return [r for r in records if in_headline(r.partition, not r.options)]


def headline_count(records: list) -> int:
    return len(_headline(records))


def chance(records: list) -> float | None:
    """Expected accuracy of a uniform guess among the listed options, over the headline items (percent)."""
    head = _headline(records)
    return 100.0 * float(np.mean([1 / len(r.options) for r in head])) if head else None


def split_block(summary: dict, records: list) -> dict:
    """n, accuracy and bootstrap CI of one evaluation on one split's headline items (official scorer)."""
    from spatialstudy.evaluation.predictions import headline_predictions
    from spatialstudy.scoring import accuracy_block

    return accuracy_block([r["correct_official"] for r in headline_predictions(summary, records)])


def accuracy_grid(evals: dict, split_recs: dict) -> dict:
    """{split: {condition: accuracy block}} of one model."""
    return {s: {c: split_block(e, recs) for c, e in evals.items()} for s, recs in split_recs.items()}


def paired_changes(evals: dict, split_recs: dict, changes: dict = CHANGES) -> dict:
    """{change: {split: paired_by_partition}}: each change of image (gray - original, hue - original) on the same
    items of each split, overall and per partition."""
    from spatialstudy.evaluation.compare import paired_by_partition

    return {name: {s: paired_by_partition(evals[a], evals[b], recs) for s, recs in split_recs.items()}
            for name, (a, b) in changes.items() if a in evals and b in evals}


def difference_in_differences(a1: dict, a0: dict, b1: dict, b0: dict, records: list) -> dict:
    """(a1 - a0) - (b1 - b0) on the same headline items, in points, with a bootstrap CI that resamples images: how
    much less (or more) the change 0 -> 1 costs model a than model b (the 2 x 2's interaction)."""
    from spatialstudy.evaluation.predictions import headline_predictions
    from spatialstudy.scoring import cluster_bootstrap_ci

    rows = [{(r["task_type"], r["id"]): r for r in headline_predictions(s, records)} for s in (a1, a0, b1, b0)]
    keys = sorted(rows[0])
    if not keys or any(set(r) != set(keys) for r in rows):
        return {"diff": None, "ci95": None, "n": 0}
    d = np.array([sum(sign * int(r[k]["correct_official"]) for sign, r in zip((1, -1, -1, 1), rows)) for k in keys])
    images = {}
    clusters = [images.setdefault(rows[0][k]["image"], len(images)) for k in keys]
    return {"diff": float(100 * d.mean()), "ci95": cluster_bootstrap_ci(d, clusters), "n": len(keys)}


def two_by_two(models: dict, split_recs: dict) -> dict:
    """{colour-trained, gray-augmented} x {colour, gray images} on each split: the four accuracies, the paired
    differences along each side, and the interaction (does augmentation shrink what gray images cost?)."""
    from spatialstudy.evaluation.compare import paired_by_partition

    sft, aug = models["sft"]["evals"], models[GRAY_ARM]["evals"]
    out = {}
    for s, recs in split_recs.items():
        cells = {arm: {img: split_block(e[c], recs) for img, c in (("colour", "original"), ("gray", "grayscale"))}
                 for arm, e in (("colour-trained", sft), ("gray-augmented", aug))}
        paired = {"colour-trained: gray - colour": paired_by_partition(sft["grayscale"], sft["original"], recs),
                  "gray-augmented: gray - colour": paired_by_partition(aug["grayscale"], aug["original"], recs),
                  "colour images: gray-augmented - colour-trained": paired_by_partition(aug["original"],
                                                                                      sft["original"], recs),
                  "gray images: gray-augmented - colour-trained": paired_by_partition(aug["grayscale"],
                                                                                    sft["grayscale"], recs)}
        out[s] = {"cells": cells, "paired": paired, "interaction": difference_in_differences(
            aug["grayscale"], aug["original"], sft["grayscale"], sft["original"], recs)}
    return out


def control_analysis(models: dict, control: list, groups: dict) -> dict:
    """The positive control: gray - original on the equal-brightness slice, per model and split."""
    if not control:
        return {"available": False, "why": groups.get("why", "no control items")}
    recs = splits(control, groups)
    out = {"n": len(control), "groups": {k: v for k, v in groups.items() if k != "groups"}, "models": {}}
    for name, m in models.items():
        if not m["control"]:
            continue   # the best ICL: 03_icl has no equal-brightness run
        out["models"][name] = {"accuracy": accuracy_grid(m["control"], recs),
                               "paired": paired_changes(m["control"], recs, {"grayscale - original":
                                                                             ("grayscale", "original")})}
    return out


def best_icl(profile: str) -> tuple[dict | None, str]:
    """(model entry, "") of the pre-declared best ICL setting as 03_icl evaluated it on original, grayscale and
    hue-permuted query images (its `colour_transforms`; only 03_icl can rebuild its demos), or (None, why not).
    The entry carries 03_icl's own item subset, which the analysis uses for this model."""
    run = upstream(profile, ICL_STAGE)
    if run is None:
        return None, f"no {ICL_STAGE} run"
    m, cfg = runs.read_json(run / "metrics.json"), runs.read_json(run / "config.json")
    if not m.get("colour"):
        return None, (f"{ICL_STAGE} ran without colour_transforms: set them in params/{profile}/{ICL_STAGE}.yaml "
                      f"(grayscale, hue_permuted) and re-run it")
    evals = {"original": compact(m["settings"][m["best"]]["eval"])}
    evals.update({t: compact(s) for t, s in m["colour"].items()})
    return {"label": f"best ICL ({m['best']})", "origin": ICL_STAGE, "evals": evals, "control": {},
            "subset": {"n_eval": cfg.get("n_eval", 0), "seed": cfg.get("seed", 0)}}, ""


def own_splits(profile: str, models: dict, out: Path) -> dict:
    """{model: (records, groups)} for models evaluated on their own item subset (the best ICL)."""
    from spatialstudy.evaluation.eval import eval_records, eval_subset

    own = {}
    for name, m in models.items():
        if "subset" in m:
            recs = eval_subset(eval_records(profile), m["subset"]["n_eval"] or None, m["subset"]["seed"])
            own[name] = (recs, benchmark_groups(profile, recs, out))
    return own


# ---------------------------------------------------------------- the stage
def sources(profile: str, cfg, out: Path) -> tuple[dict, dict, dict]:
    """({model: source}, {model: why skipped}, gray arm report): the student base, the colour-trained SFT arm, its
    gray-augmented twin (trained here) and the best KD arm; a missing upstream run skips its models."""
    srcs, skipped, gray = {"student_base": base_source(cfg)}, {}, {}
    run = upstream(profile, SFT_STAGE)
    found = {"sft": arm_source(run, cfg.sft_arm, f"SFT ({cfg.sft_arm})"), "best_kd": kd_source(profile)}
    if isinstance(found["sft"], dict):
        found[GRAY_ARM], log = gray_arm(profile, cfg, out, run)
        gray = gray_arm_entry(log, run, cfg)
    else:
        found[GRAY_ARM] = f"needs the colour-trained arm: {found['sft']}"
    for name in ("sft", GRAY_ARM, "best_kd"):
        if isinstance(found[name], dict):
            srcs[name] = found[name]
        else:
            skipped[name] = found[name]
            print(f"[grayscale] skipping {name}: {found[name]}")
    return srcs, skipped, gray


def analyse(models: dict, records: list, groups: dict, control: tuple, own: dict | None = None) -> dict:
    """Accuracies and paired differences on every split, the 2 x 2 (when both SFT arms ran) and the control.
    `own`: {model: (records, groups)} for a model evaluated on its own items (the best ICL)."""
    split_recs = splits(records, groups)
    per_model = {n: splits(*own[n]) if own and n in own else split_recs for n in models}
    out = {"splits": {s: headline_count(recs) for s, recs in split_recs.items()},
           "chance": {s: chance(recs) for s, recs in split_recs.items()},
           "accuracy": {n: accuracy_grid(m["evals"], per_model[n]) for n, m in models.items()},
           "paired": {n: paired_changes(m["evals"], per_model[n]) for n, m in models.items()}}
    out["two_by_two"] = two_by_two(models, split_recs) if {"sft", GRAY_ARM} <= set(models) else None
    out["control"] = control_analysis(models, *control)
    return out


def run_grayscale(profile: str, cfg) -> dict:
    """Item groups, the gray-augmented arm, every model under every condition (benchmark and control), the splits'
    accuracies and paired differences, the 2 x 2; writes the run dir and the figures."""
    from spatialstudy.evaluation.eval import eval_records, eval_subset

    runs.seed_everything(cfg.seed)
    if train_in_parallel(profile, cfg):
        return {}
    out = runs.run_dir(profile, STAGE)
    records = eval_subset(eval_records(profile), cfg.n_eval or None, cfg.seed)
    groups = benchmark_groups(profile, records, out)
    control = control_set(profile, cfg, out)
    srcs, skipped, gray = sources(profile, cfg, out)
    data = {"records": records, "control": control[0]}
    models = {name: model_entry(name, src, profile, cfg, data, out) for name, src in srcs.items()}
    icl, why = best_icl(profile)
    if icl:
        models["best_icl"] = icl
    metrics = {"n_eval": len(records), "conditions": list(conditions(cfg.conditions)), "models": models,
               "skipped": skipped, "not_evaluated": {} if icl else {"best ICL": why}, "gray_arm": gray,
               "groups": {k: v for k, v in groups.items() if k != "groups"},
               **analyse(models, records, groups, control, own_splits(profile, models, out))}
    runs.save_run(profile, STAGE, asdict(cfg), metrics)
    save_figures(metrics, profile)
    return metrics


def main(profile: str, params: dict) -> dict:
    """Entry point with params as papermill passes them (for scripts and benchmarks)."""
    from spatialstudy.configs import GrayscaleConfig

    return run_grayscale(profile, GrayscaleConfig.for_profile(profile, params, STAGE))


# ---------------------------------------------------------------- figures
def _labels(metrics: dict) -> dict:
    return {n: m["label"] for n, m in metrics["models"].items()}


def transform_figure(metrics: dict, split: str):
    """Accuracy (95% CI) of every model under each image condition on one split: the study's figure (all questions,
    or the non-colour questions), with the split's chance level."""
    from spatialstudy import plotting

    series = {}
    for cond in metrics["conditions"]:
        series[CONDITION_LABELS[cond]] = {label: _ci(metrics["accuracy"][n][split].get(cond))
                                          for n, label in _labels(metrics).items()}
    title = f"{split} (n {metrics['splits'][split]}): accuracy by image condition"
    return plotting.accuracy_bars(series, chance=metrics["chance"][split], title=title)


def _ci(block: dict | None) -> tuple:
    acc = block["accuracy"] if block else None
    return (acc, *block["ci95"]) if acc is not None else (float("nan"),) * 3


def _diff_points(ax, metrics_paired: dict, change: str, splits_shown: list, labels: dict) -> None:
    """One panel: each model's paired change (95% CI) on each split, models side by side."""
    width = 0.8 / max(1, len(labels))
    for k, (name, label) in enumerate(labels.items()):
        for j, s in enumerate(splits_shown):
            d = metrics_paired.get(name, {}).get(change, {}).get(s, {}).get("overall")   # control: no ICL
            if d and d["diff"] is not None:
                x = j + (k - (len(labels) - 1) / 2) * width
                ax.errorbar([x], [d["diff"]], yerr=[[d["diff"] - d["ci95"][0]], [d["ci95"][1] - d["diff"]]],
                            fmt="o", capsize=2, color=f"C{k}", label=label if j == 0 else None)
    ax.axhline(0, c="0.3", lw=1)
    ax.set_xticks(range(len(splits_shown)), [s.replace(" ", "\n", 1) for s in splits_shown], fontsize=7)


def group_figure(metrics: dict):
    """Paired change in accuracy (points, 95% CI) by item group, per model: gray - original and hue - original on
    the benchmark, and gray - original on the equal-brightness control (where colour-needed items must suffer)."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.setup_style()
    shown = [s for s in SPLITS if s in metrics["splits"]]
    panels = [(metrics["paired"], c, "benchmark: " + c.replace("_", "-")) for c in CHANGES]
    ctrl = metrics["control"]
    if ctrl.get("models"):
        panels.append(({n: m["paired"] for n, m in ctrl["models"].items()}, "grayscale - original",
                       "equal-brightness control: grayscale - original"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (paired, change, title) in zip(axes.flat, panels):
        _diff_points(ax, paired, change, shown, _labels(metrics))
        ax.set(title=title)
    axes[0, 0].set(ylabel="change in accuracy (points)")
    axes[0, 0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def two_by_two_figure(metrics: dict):
    """The 2 x 2 as interaction plots: accuracy (95% CI) on colour and gray images for the colour-trained and the
    gray-augmented arm, on all questions and on the non-colour questions. Parallel lines: augmentation does not
    change what gray images cost."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.setup_style()
    shown = ["all questions", "non-colour questions"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.2), squeeze=False, sharey=True)
    for ax, s in zip(axes.flat, shown):
        for k, (arm, cells) in enumerate(metrics["two_by_two"][s]["cells"].items()):
            pts = [_ci(cells[img]) for img in ("colour", "gray")]
            acc = [p[0] for p in pts]
            x = [0.04 * (2 * k - 1), 1 + 0.04 * (2 * k - 1)]           # side by side: equal cells stay visible
            ax.errorbar(x, acc, yerr=[[a - p[1] for a, p in zip(acc, pts)], [p[2] - a for a, p in zip(acc, pts)]],
                        fmt="o-", capsize=3, color=f"C{k}", label=arm)
        ax.set_xticks([0, 1], ["colour images", "gray images"])
        ax.set(title=f"{s} (n {metrics['splits'][s]})", xlim=(-0.4, 1.4))
    axes[0, 0].set(ylabel="accuracy (%)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def one_per_image(records: list, n: int) -> list:
    """The first n records that show different images (several questions share one)."""
    first = {}
    for r in records:
        first.setdefault(r.image_path, r)
    return list(first.values())[:n]


def examples_figure(records: list, n: int = 3):
    """A few benchmark images under each condition (original, grayscale, hue-permuted, blank), each titled with the
    largest change of PIL luma ("L") from the original: 0 for grayscale, at most 1 for the hue permutation."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting
    from spatialstudy.evaluation.eval import load_image

    plotting.setup_style()
    table = conditions()
    shown = one_per_image(records, n)
    fig, axes = plt.subplots(len(shown), len(table), figsize=(2.0 * len(table), 2.1 * len(shown)), squeeze=False)
    for row, rec in zip(axes, shown):
        original = np.asarray(load_image(rec).convert("L"), int)
        for ax, (cond, t) in zip(row, table.items()):
            im = load_image(rec, t)
            shift = np.abs(np.asarray(im.convert("L"), int) - original).max()
            ax.imshow(im)
            ax.set(title=f"{CONDITION_LABELS[cond]}\nmax luma change {shift}", xticks=[], yticks=[])
            ax.title.set_fontsize(7)
    fig.tight_layout()
    return fig


def save_figures(metrics: dict, profile: str) -> None:
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.savefig(transform_figure(metrics, "all questions"), "grayscale_all", profile)
    plotting.savefig(transform_figure(metrics, "non-colour questions"), "grayscale_non_colour", profile)
    plotting.savefig(group_figure(metrics), "grayscale_groups", profile)
    if metrics["two_by_two"]:
        plotting.savefig(two_by_two_figure(metrics), "grayscale_2x2", profile)
    plt.close("all")


# ---------------------------------------------------------------- the summary table
def _acc(block: dict | None) -> str:
    return f"{block['accuracy']:5.1f}" if block and block["accuracy"] is not None else "   - "


def accuracy_rows(metrics: dict) -> list[str]:
    """Accuracy (official) of every model, split and condition; n = headline items of the split."""
    conds = metrics["conditions"]
    lines = [f"{'model':<32} {'split':<21} {'n':>5} " + " ".join(f"{CONDITION_LABELS[c][:12]:>12}" for c in conds)]
    for name, label in _labels(metrics).items():
        for s, blocks in metrics["accuracy"][name].items():
            lines.append(f"{label:<32} {s:<21} {blocks['original']['n']:>5} " +
                         " ".join(f"{_acc(blocks.get(c)):>12}" for c in conds))
    return lines


def paired_rows(metrics: dict) -> list[str]:
    """Every change of image per model: the paired difference on each split (points [95% CI] McNemar p)."""
    from spatialstudy.evaluation.compare import paired_cell

    shown = list(metrics["splits"])
    lines = [f"{'paired difference (same items)':<54} " + "".join(f"{s:<32}" for s in shown)]
    for name, label in _labels(metrics).items():
        for change, by_split in metrics["paired"][name].items():
            cells = "".join(f"{paired_cell(by_split.get(s, {}).get('overall')):<32}" for s in shown)
            lines.append(f"{label + ': ' + change:<54} {cells}".rstrip())
    return lines


def two_by_two_rows(metrics: dict) -> list[str]:
    from spatialstudy.evaluation.compare import paired_cell

    if not metrics["two_by_two"]:
        return ["2 x 2: not run (" + metrics["skipped"].get(GRAY_ARM, "no SFT arm") + ")"]
    lines = ["2 x 2 {colour-trained, gray-augmented} x {colour, gray images} (official accuracy):"]
    for s, block in metrics["two_by_two"].items():
        cells = block["cells"]
        lines.append(f"  {s}: " + "; ".join(f"{arm} {_acc(c['colour'])} / {_acc(c['gray'])}" for arm, c in
                                            cells.items()) + "  (colour / gray)")
        for name, d in block["paired"].items():
            lines.append(f"    {name:<48} {paired_cell(d.get('overall'))}")
        i = block["interaction"]
        if i["diff"] is not None:
            lines.append(f"    {'interaction (augmented - colour-trained change)':<48} {i['diff']:+5.1f} "
                         f"[{i['ci95'][0]:+5.1f},{i['ci95'][1]:+5.1f}]")
    return lines


def control_rows(metrics: dict) -> list[str]:
    from spatialstudy.evaluation.compare import paired_cell

    ctrl = metrics["control"]
    if not ctrl.get("models"):
        return [f"positive control: not run ({ctrl.get('why')})"]
    lines = [f"positive control (equal-brightness palette, {ctrl['n']} items), grayscale - original:"]
    for name, m in ctrl["models"].items():
        cells = m["paired"]["grayscale - original"]
        lines.append(f"  {metrics['models'][name]['label']:<32} " +
                     "; ".join(f"{s} {paired_cell(d.get('overall')) or 'no items'}" for s, d in cells.items()))
    return lines


def summary_table(metrics: dict) -> str:
    """Plain text: the splits, what was skipped or not evaluated, accuracy per model, split and condition, the
    paired changes, the 2 x 2 and the positive control."""
    g = metrics["groups"]
    head = [f"items {metrics['n_eval']}; headline items per split: {metrics['splits']}",
            f"item groups: {g['counts'] if g['available'] else g['why']}" +
            (f"; {len(g['unmatched'])} records unmatched" if g.get("unmatched") else "")]
    head += [f"skipped {n}: {why}" for n, why in metrics["skipped"].items()]
    head += [f"not evaluated, {n}: {why}" for n, why in metrics["not_evaluated"].items()]
    return "\n".join(head + [""] + accuracy_rows(metrics) + [""] + paired_rows(metrics) + [""] +
                     two_by_two_rows(metrics) + [""] + control_rows(metrics))
