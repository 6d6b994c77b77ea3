"""Pretraining of the tiny bases: procedural OmniSpatial-format questions, multi-question and few-shot episodes.

A random tiny model answers nothing, so every later comparison would sit at chance; the bases are pretrained once
on the generator's "base" partition families (never the SFT families) and cached under runs/cache/bases/<hash>,
keyed by spec + tokenizer + generator version + seed + settings. Loss is on the assistant answers only.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spatialstudy import runs
from spatialstudy.models.chat import collate
from spatialstudy.models.generation import generate_batch
from spatialstudy.models.qwen import TINY_PIXELS, TINY_SPECS, build_tiny, count_params, make_processor, spec_summary
from spatialstudy.models.transforms import BLIND
from spatialstudy.scoring import LETTERS, extract_answer

CKPT_EVERY = 100           # steps between resumable checkpoints of a run in progress
POOL_COLOUR_FREE = 0.5     # share of pretraining questions naming objects by shape/size only, as in the benchmark
                           # (measured: a colour-named-only pool left the benchmark's shape-named half near chance)
MAX_NEW_TOKENS = 16        # enough for the longest option text + "Answer: X"


@dataclass(frozen=True)
class PretrainSettings:
    """How one base is pretrained; every field enters the cache key."""

    steps: int
    batch_size: int          # episodes per optimiser step
    lr: float
    n_scenes: int            # training pool: scenes drawn once from the base families ...
    per_scene: int           # ... each with this many questions (several answers per forward pass)
    icl_fraction: float = 0.3    # share of episodes in the few-shot layout (0-5 demos, then the query)
    max_shots: int = 5
    direct_fraction: float = 0.25  # share of questions in the direct format (target "X"), else manual-CoT + RE
    bare_demo_fraction: float = 0.5  # few-shot episodes whose demos show only question + options (no prompt text)
    warmup: int = 30
    weight_decay: float = 0.01
    eval_items: int = 0      # held-out items (all partitions) measured after training; 0 skips
    single_object: float = 0.0   # share of pool scenes holding one object, asked where it is: the easy rung that
                                 # needs no word-to-object binding, so position is learnt before the 2-4 object items
    fixed_order: float = 0.0     # first share of the steps: options in one fixed (sorted) order, so the image -> letter
                                 # mapping is learnt before reading shuffled options (the benchmark shuffles them)
    fewer_options: float = 0.0   # share of questions shown without the options after the correct one (the benchmark
                                 # has 2-3 option items; a base that only saw four answered C or D to them blind)
    say_option: float = 0.0      # share of answers that state the chosen option's text before "Answer: X"
    lookup_drill: float = 0.0    # share of one-scene episodes turned into reading drills: no image, the answer's text
                                 # given in the question, so only finding its letter among the options is learnt
    blank_guess: float = 0.0     # share of one-scene episodes shown a blank image, each answer a uniformly random
                                 # listed letter: a base that cannot see guesses among the options it was given


TIERS = {
    ("student", "ci"): PretrainSettings(steps=6, batch_size=4, lr=2e-3, n_scenes=8, per_scene=2, warmup=2,
                                        single_object=0.5),
    ("teacher", "ci"): PretrainSettings(steps=8, batch_size=4, lr=2e-3, n_scenes=8, per_scene=2, warmup=2,
                                        single_object=0.5),
    # smoke (recipe 6): one question per image, 32 images per step, half the scenes single-object, half the questions
    # shape-named, base families in their fixed option order, a fifth of the questions without the options after the
    # correct one, few-shot batches of 0-5 demos, a tenth of the one-scene episodes on a blank image answered with a
    # random listed letter (so a blind base guesses among the offered letters). The teacher (the larger model trained
    # on more) sees 1.8x the student's episodes in batches of 16 from a pool 3.3x larger, cached once per machine:
    # chosen on the 400-item dev slice by a rule fixed before the runs (+4.0 over batch 32 / 900 steps / 2,400
    # scenes; 2x the episodes at batch 32 gave +1.25). Measured in reports/pretraining_targets.md: reading shuffled
    # options did not emerge within the smoke budget.
    ("student", "smoke"): PretrainSettings(steps=500, batch_size=32, lr=5e-4, n_scenes=2400, per_scene=1,
                                           icl_fraction=0.1, max_shots=5, eval_items=200, single_object=0.5,
                                           fewer_options=0.2, blank_guess=0.1),
    ("teacher", "smoke"): PretrainSettings(steps=1800, batch_size=16, lr=5e-4, n_scenes=8000, per_scene=1,
                                           icl_fraction=0.1, max_shots=5, eval_items=200, single_object=0.5,
                                           fewer_options=0.2, blank_guess=0.1),
    ("student", "full"): PretrainSettings(steps=3000, batch_size=32, lr=5e-4, n_scenes=6000, per_scene=1,
                                          icl_fraction=0.2, eval_items=600, single_object=0.5),
    ("teacher", "full"): PretrainSettings(steps=4000, batch_size=32, lr=5e-4, n_scenes=6000, per_scene=1,
                                          icl_fraction=0.2, eval_items=600, single_object=0.5),
}


# ---------------------------------------------------------------- data
def _data():
    """The data layer (imported lazily: loading a checkpoint through spatialstudy.models.bases needs none of it)."""
    import spatialstudy.data as data
    from spatialstudy.data import prompts

    return data, prompts


def generator_version() -> str:
    """The generator's declared version plus a hash of its source, so any change to it retrains the bases."""
    data, _ = _data()
    src = sorted(Path(data.__file__).parent.glob("*.py"))
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in src)).hexdigest()[:12]
    return f"{getattr(data, 'GENERATOR_VERSION', 'unversioned')}+{digest}"


@functools.lru_cache(maxsize=1)
def base_tokenizer():
    """The tiny models' small BPE tokenizer, trained once per generator version and cached on disk."""
    from transformers import AutoTokenizer

    from spatialstudy.models import tokenizer as T

    recipe = {"generator": generator_version(), "split": T.SMALL_SPLIT, "vocab": T.SMALL_VOCAB_SIZE,
              "corpus": [T.CORPUS_ITEMS, T.CORPUS_PER_SCENE], "blocks": T.PROMPT_BLOCK_NAMES,
              "whole_texts": "prompt blocks + closed-answer option texts"}
    out = runs.cache_dir("tokenizer") / runs.config_hash(recipe)
    if not (out / "tokenizer.json").exists():
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        T.small_tokenizer().save_pretrained(tmp)
        _publish(tmp, out)
    return AutoTokenizer.from_pretrained(out)


def _publish(tmp: Path, out: Path) -> None:
    """Rename a finished tmp dir into place; a concurrent identical build that won the race is kept."""
    try:
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def training_pool(s: PretrainSettings, seed: int) -> list[list]:
    """Training items from the base families, grouped by scene (each group shares one image)."""
    return _pool(s.n_scenes, s.per_scene, seed, s.single_object)


@functools.lru_cache(maxsize=2)
def _pool(n_scenes: int, per_scene: int, seed: int, single_object: float = 0.0) -> list[list]:
    """Rendered once per process. Each stream is drawn in order, so a larger pool (the smoke teacher's 8,000 scenes)
    begins with the smaller one (the student's 2,400)."""
    from spatialstudy.data.streams import role_seed

    data, _ = _data()
    n_single = round(n_scenes * single_object)
    multi = data.make_items((n_scenes - n_single) * per_scene, seed=role_seed(seed, "pretrain_pool"),
                            partition="base", per_scene=per_scene, colour_free_p=POOL_COLOUR_FREE)
    single = data.make_items(n_single, seed=role_seed(seed, "pretrain_single"), families=["image_quadrant"],
                             n_objects=(1, 1), colour_free_p=POOL_COLOUR_FREE)
    return _by_scene(multi) + _by_scene(single)   # grouped apart: both lists number their scenes from 0


def _by_scene(items: list) -> list[list]:
    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(it.scene_id, []).append(it)
    return list(groups.values())


def target(item, style: str, say_option: bool = False) -> str:
    """The assistant answer: the bare letter for the direct prompt, "Answer: X" for manual-CoT + RE, optionally
    after the chosen option's text (a one-line reason: the letter is then looked up next to text just written)."""
    letter = LETTERS[item.answer]
    if style == "direct":
        return letter
    return f"{item.options[item.answer]}.\nAnswer: {letter}" if say_option else f"Answer: {letter}"


def view(item, rng: random.Random, fixed: bool, fewer: float):
    """The item as shown in training: options sorted into one fixed order (`fixed`), and with probability `fewer`
    the options after the correct one cut (at least two kept), so every kept option keeps its letter and the base
    learns that the answer is one of the listed letters; answer index remapped."""
    opts = sorted(item.options) if fixed else list(item.options)
    right = item.options[item.answer]
    if rng.random() < fewer:
        opts = opts[:rng.randint(max(2, opts.index(right) + 1), len(opts))]
    return dataclasses.replace(item, options=opts, answer=opts.index(right))


def _turn(item, style: str, with_image: bool, prompts, bare: bool = False) -> dict:
    """A user turn: the official prompt, or (`bare`, for demos) only the question and lettered options."""
    text = (prompts.lettered(item.question, item.options) if bare
            else prompts.omnispatial_prompt(item.question, item.options, style=style))
    return prompts.user_turn(text, item.image if with_image else None)


def _answer(item, style: str, say_option: bool = False) -> dict:
    _, prompts = _data()
    return prompts.assistant_turn(target(item, style, say_option))


def drill(item):
    """A reading drill: the question names its own answer, so the letter is found by reading the options alone."""
    return dataclasses.replace(item, question=f'{item.question} (The answer is "{item.options[item.answer]}".)')


def blank_guess(item, rng: random.Random):
    """The item on a blank image with a uniformly random listed letter as its answer: nothing to see, so the only
    thing to learn is to answer with one of the letters offered (a blind base then sits at chance)."""
    from spatialstudy.models.transforms import BLIND

    return dataclasses.replace(item, image=BLIND.fn(item.image), answer=rng.randrange(len(item.options)))


def episode(pool: list[list], rng: random.Random, s: PretrainSettings, few_shot: bool,
            fixed: bool = False) -> tuple[list[dict], list]:
    """One training sequence: a scene's questions as consecutive turns, a reading drill (no image), or a few-shot
    episode; (messages, images)."""
    _, prompts = _data()
    style = lambda: "direct" if rng.random() < s.direct_fraction else "manual_cot"  # noqa: E731
    shown = lambda it: view(it, rng, fixed, s.fewer_options)  # noqa: E731
    say = rng.random() < s.say_option
    if few_shot:  # demos from other scenes (each with its image), then the query
        items = [shown(rng.choice(g)) for g in rng.sample(pool, min(len(pool), rng.randint(0, s.max_shots) + 1))]
        st, bare = style(), rng.random() < s.bare_demo_fraction
        msgs = [m for k, it in enumerate(items)
                for m in (_turn(it, st, True, prompts, bare and k < len(items) - 1), _answer(it, st, say))]
    else:  # several questions on one image: more supervision per forward pass of the vision tower
        g = rng.choice(pool)
        items = [shown(it) for it in rng.sample(g, len(g))]
        reading = rng.random() < s.lookup_drill
        if s.blank_guess and not reading and rng.random() < s.blank_guess:  # no draw when off: same batches as before
            items = [blank_guess(it, rng) for it in items]
        msgs = []
        for i, it in enumerate(items):
            st = style()
            msgs += [_turn(drill(it) if reading else it, st, i == 0 and not reading, prompts), _answer(it, st, say)]
    return msgs, [m["content"][0]["image"] for m in msgs if m["role"] == "user" and m["content"][0]["type"] == "image"]


# ---------------------------------------------------------------- training
def cache_key(name: str, tier: str, seed: int, settings: PretrainSettings) -> dict:
    """Everything a pretrained base depends on."""
    tok = base_tokenizer()
    vocab_hash = hashlib.sha1(json.dumps(tok.get_vocab(), sort_keys=True).encode()).hexdigest()[:12]
    return {"spec": spec_summary(name), "tokenizer": vocab_hash, "generator": generator_version(), "seed": seed,
            "settings": dataclasses.asdict(settings), "pixels": TINY_PIXELS, "tier": tier, "recipe": 6,
            "pool_colour_free": POOL_COLOUR_FREE}


def _lr_at(step: int, s: PretrainSettings) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _save_state(work: Path, model, opt, step: int, losses: list[float]) -> None:
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "losses": losses}
    torch.save(state, work / "state.tmp")
    os.replace(work / "state.tmp", work / "state.pt")


def train(model, processor, pool, s: PretrainSettings, seed: int, work: Path, desc: str,
          after_step=None) -> list[float]:
    """AdamW on answer tokens; checkpoints into `work` so an interrupted run resumes where it stopped.
    `after_step(steps_done)`, if given, is called after every step (e.g. to measure a learning curve)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98))
    start, losses = 0, []
    if (work / "state.pt").exists():
        state = torch.load(work / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, losses = state["step"], state["losses"]
    model.train()
    bar = tqdm(range(start, s.steps), desc=desc, initial=start, total=s.steps)
    for step in bar:
        rng = random.Random(seed * 1_000_003 + step)  # per-step stream: a resumed run sees the same batches
        few_shot = rng.random() < s.icl_fraction  # whole batches: one long episode would pad all 32 rows (4x cost)
        fixed = step < s.fixed_order * s.steps
        batch = collate([episode(pool, rng, s, few_shot, fixed) for _ in range(s.batch_size)], processor)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, s)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if (step + 1) % CKPT_EVERY == 0 and step + 1 < s.steps:
            _save_state(work, model, opt, step + 1, losses)
        if after_step:
            after_step(step + 1)
    model.eval()
    return losses


def pretrain_base(name: str, tier: str = "smoke", seed: int = 0, settings: PretrainSettings | None = None,
                  force: bool = False, on_step=None) -> Path:
    """The cached dir of a pretrained tiny base ("student" | "teacher"); trains it on a cache miss.
    `on_step(model, processor, steps_done)`, if given, is called after every training step (a learning curve).
    A second process asking for the same base while it trains waits for it (runs.build_lock), then reuses it."""
    s = settings or TIERS[(name, tier)]
    out = base_dir(name, tier, seed, s)
    if (out / "pretrain.json").exists() and not force:
        return out
    with runs.build_lock(out):
        if force or not (out / "pretrain.json").exists():   # not built meanwhile by the process we waited for
            _train_into(out, name, tier, seed, s, cache_key(name, tier, seed, s), on_step)
    return out


def base_dir(name: str, tier: str, seed: int, s: PretrainSettings) -> Path:
    """Where the base of these settings is (or will be) cached: runs/cache/bases/<name>-<tier>-<key hash>."""
    return runs.cache_dir("bases") / f"{name}-{tier}-{runs.config_hash(cache_key(name, tier, seed, s))}"


def _train_into(out: Path, name: str, tier: str, seed: int, s: PretrainSettings, key: dict, on_step) -> None:
    work = out.with_name(f".{out.name}.partial")  # kept across crashes: the resumable state lives here
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs.seed_everything(seed)
    tok = base_tokenizer()
    processor = make_processor(tok)
    model = build_tiny(name, tok, seed=seed)
    pool = training_pool(s, seed)
    hook = (lambda done: on_step(model, processor, done)) if on_step else None
    losses = train(model, processor, pool, s, seed, work, desc=f"pretrain {name} ({tier})", after_step=hook)
    wall = time.time() - t0
    metrics = measure(model, processor, heldout_items(s.eval_items)) if s.eval_items else {}
    model.save_pretrained(work)
    processor.save_pretrained(work)
    (work / "state.pt").unlink(missing_ok=True)
    runs.write_json(work / "pretrain.json", {"key": key, "params": count_params(model), "train_seconds": wall,
                                             "losses": losses, "heldout": metrics})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work, out)


# ---------------------------------------------------------------- measurement (the harness's generation and scorer)
def heldout_items(n: int, seed: int = 0) -> list:
    """Held-out procedural OmniSpatial-format items in the benchmark's partition shares (half base families), from
    their own stream (never the pool's, the SpaceThinker sets' or the benchmark's)."""
    from spatialstudy.data.writers import benchmark_items

    return benchmark_items(n, seed, image_size=int(TINY_PIXELS ** 0.5), palette="distinct", per_scene=1,
                           role="pretrain_heldout")


def answers(model, processor, items, style: str = "manual_cot", blind: bool = False,
            batch_size: int = 32) -> list[str]:
    """Replies to single-turn official prompts, generated by the harness's greedy decoding; `blind` shows each
    item's image through the harness's blind control."""
    _, prompts = _data()
    out = []
    for i in range(0, len(items), batch_size):
        msgs = [prompts.chat_messages(prompts.omnispatial_prompt(it.question, it.options, style=style),
                                      BLIND.fn(it.image) if blind else it.image) for it in items[i:i + batch_size]]
        out += [g["raw"] for g in generate_batch(model, processor, msgs, MAX_NEW_TOKENS)]
    return out


def letter_index(text: str, options, style: str = "manual_cot") -> int:
    """The official scorer's letter as an option index; -1 for anything that is not one of A-D."""
    letter, _ = extract_answer(text, "official", options, prompt_style=style)
    return LETTERS.find(letter) if len(letter) == 1 else -1   # case kept: "a" is no answer, as in the benchmark


def measure(model, processor, items, style: str = "manual_cot") -> dict:
    """Held-out letter accuracy (official scorer) with and without the image, overall and per partition."""
    truth = torch.tensor([it.answer for it in items])
    res = {"n": len(items), "chance": sum(1 / len(it.options) for it in items) / len(items), "style": style}
    for tag, blind in (("acc", False), ("blind_acc", True)):
        texts = answers(model, processor, items, style, blind)
        pred = torch.tensor([letter_index(t, it.options, style) for t, it in zip(texts, items)])
        res[tag] = (pred == truth).float().mean().item()
        for part in sorted({str(it.partition) for it in items}):
            mask = torch.tensor([str(it.partition) == part for it in items])
            res[f"{tag}_{part}"] = (pred[mask] == truth[mask]).float().mean().item()
        res[f"{tag}_pred_letters"] = {c: int((pred == i).sum()) for i, c in enumerate(LETTERS)}
    return res


def report(tier: str = "smoke", seed: int = 0) -> dict:
    """Pretrain (or load) both bases at `tier` and collect their held-out numbers and wall times."""
    rows = {}
    for name in TINY_SPECS:
        info = runs.read_json(pretrain_base(name, tier, seed) / "pretrain.json")
        rows[name] = {"params": info["params"]["total"], "train_seconds": round(info["train_seconds"], 1),
                      "steps": info["key"]["settings"]["steps"], **info["heldout"]}
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="pretrain the tiny student and teacher bases (cached) and report")
    ap.add_argument("--tier", default="smoke", choices=sorted({t for _, t in TIERS}))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(report(args.tier, args.seed), indent=2))
