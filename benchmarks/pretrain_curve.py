"""Learning curve of a tiny base's pretraining: held-out base-family accuracy every 100 steps (not a timed test).

    OMP_NUM_THREADS=1 python benchmarks/pretrain_curve.py student --steps 600 --lr 5e-4

Runs spatialstudy.models.pretrain.train itself (same pool, batches, schedule and optimiser as the smoke tier, with steps
and lr overridden, or any PretrainSettings field with --set; nothing is cached). Every --every steps it scores 200
held-out base-partition items (shuffled as generated, or sorted with --fixed-eval) by their generated answers under
the official rule, with the image and blind (grey image), per family and naming (colour- or shape-named), plus 100
one-object image-quadrant items in the sorted order ("single", with the share of answers that get the left/right and
the upper/lower half right), and prints one JSON line. The 2026-12-02 curves in reports/pretraining_targets.md were
measured this way. `--pair-relation F` tries a rung the package does not use: F of the pool's scenes (taken from the
multi-object share) hold two objects and ask where one is relative to the other; `--pair-quadrant F` the same with
where-is questions (a binding rung: the named one of two objects, its position learnt on one-object scenes).
`--spec field=value` changes the tiny architecture for the run (e.g. `heads=6 kv_heads=2`; nothing is cached).
`--cache` trains through the package's `pretrain_base` instead and keeps the base in runs/cache/ under its settings'
key, so a recipe adopted from the curve is not trained twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spatialstudy.models import pretrain as P  # noqa: E402
from spatialstudy.data import make_items  # noqa: E402
from spatialstudy.data.streams import role_seed  # noqa: E402
from spatialstudy.models import qwen as Q  # noqa: E402
from spatialstudy.models.qwen import build_tiny, make_processor  # noqa: E402

N_HELDOUT = 200
N_SINGLE = 100
SAMPLES: list[str] = []   # one generated answer per measurement, printed with the curve point
TEXT_ACC: list[float] = []   # share of answers whose first line names the correct option (say_option answers)


def letter_predictions(model, processor, items, blind: bool) -> torch.Tensor:
    """Letters of generated answers (official scorer; a missing or out-of-range letter counts as -1)."""
    texts = P.answers(model, processor, items, "manual_cot", blind)
    SAMPLES.append(texts[0])
    said = [t.split("\n")[0].strip(" .").lower() == it.options[it.answer].lower() for t, it in zip(texts, items)]
    TEXT_ACC.append(round(sum(said) / len(items), 3))   # the option text said before the letter is the right one
    letters = [P.letter_index(t, it.options) for t, it in zip(texts, items)]
    return torch.tensor([k if k < len(it.options) else -1 for k, it in zip(letters, items)])


def _acc(pred, truth, mask=None) -> float:
    mask = torch.ones_like(truth, dtype=torch.bool) if mask is None else mask
    return round((pred[mask] == truth[mask]).float().mean().item(), 3)


def curve_point(model, processor, items, single, step: int, t0: float) -> dict:
    """Accuracy with and without the image, per family and naming, on one-object items (and per spatial bit for
    one-object items shown in the sorted order lower left, lower right, upper left, upper right), and the letters."""
    truth = torch.tensor([it.answer for it in items])
    pred, blind = (letter_predictions(model, processor, items, b) for b in (False, True))
    row = {"step": step, "t": round(time.time() - t0), "acc": _acc(pred, truth), "blind": _acc(blind, truth)}
    for fam in sorted({it.family for it in items}):
        for shape_named in (False, True):
            mask = torch.tensor([it.family == fam and it.colour_free == shape_named for it in items])
            row[f"{fam}_{'shape' if shape_named else 'colour'}"] = _acc(pred, truth, mask)
    one_truth = torch.tensor([it.answer for it in single])
    one = letter_predictions(model, processor, single, False)
    row.update(single=_acc(one, one_truth), single_left_right=_acc(one % 2, one_truth % 2),
               single_upper_lower=_acc(one // 2, one_truth // 2))
    row["letters"] = [int((pred == i).sum()) for i in range(4)]
    row["sample"], row["text_acc"] = SAMPLES[-3], TEXT_ACC[-3]
    return row


def _overridden(obj, pairs: list[str]):
    """A dataclass with each "field=value" of `pairs` replaced, the value cast to the field's current type."""
    for kv in pairs:
        k, v = kv.split("=", 1)
        obj = dataclasses.replace(obj, **{k: type(getattr(obj, k))(v)})
    return obj


def _settings(args) -> P.PretrainSettings:
    """The smoke tier's settings with --steps, --lr and any --set field=value overridden."""
    s = dataclasses.replace(P.TIERS[(args.model, "smoke")], steps=args.steps, lr=args.lr)
    return _overridden(s, args.set)


def pool_with_pairs(s: P.PretrainSettings, seed: int, share: float, family: str = "relative_direction") -> list[list]:
    """The smoke pool with `share` of its scenes replaced by two-object scenes asking `family` (own stream)."""
    n_pair = round(s.n_scenes * share)
    pool = P.training_pool(dataclasses.replace(s, n_scenes=s.n_scenes - n_pair,
                                               single_object=s.single_object * s.n_scenes / (s.n_scenes - n_pair)),
                           seed)
    # the relation rung keeps the stream of its reported runs
    role = "pretrain_pair" if family == "relative_direction" else f"pretrain_pair/{family}"
    pairs = make_items(n_pair, seed=role_seed(seed, role), families=[family],
                       n_objects=(2, 2), colour_free_p=P.POOL_COLOUR_FREE)
    return pool + [[it] for it in pairs]


def main(args) -> None:
    torch.set_num_threads(args.threads)
    s = _settings(args)
    # architecture overrides (a tried spec, never cached): e.g. heads=6
    Q.TINY_SPECS[args.model] = _overridden(Q.TINY_SPECS[args.model], args.spec)
    print(json.dumps({"spec": dataclasses.asdict(Q.TINY_SPECS[args.model])}), flush=True)
    print(json.dumps({"settings": dataclasses.asdict(s)}), flush=True)
    tok = P.base_tokenizer()
    proc = make_processor(tok)
    held = make_items(args.heldout, seed=role_seed(args.seed, "pretrain_heldout/base"), partition="base")
    if args.fixed_eval:   # base families listed in their fixed (sorted) order, as a fixed-order benchmark shows them
        held = [P.view(it, random.Random(0), True, 0.0) for it in held]
    single = [P.view(it, random.Random(0), True, 0.0)   # sorted options: letter // 2 is the upper/lower bit
              for it in make_items(N_SINGLE, seed=role_seed(args.seed, "pretrain_heldout/single"),
                                   families=["image_quadrant"], n_objects=(1, 1))]
    t0 = time.time()

    def point(m, p, done: int) -> None:
        if done % args.every == 0:
            m.eval()
            print(json.dumps(curve_point(m, p, held, single, done, t0)), flush=True)
            m.train()

    if args.cache:   # the package's own pretraining, cached under these settings' key: adopting them retrains nothing
        assert not (args.spec or args.pair_relation or args.pair_quadrant), "--cache takes --set overrides only"
        print(json.dumps({"cached": str(P.pretrain_base(args.model, "smoke", args.seed, s, on_step=point))}),
              flush=True)
        return
    model = build_tiny(args.model, tok, seed=args.seed)   # pretrain_base builds its own under --cache
    with tempfile.TemporaryDirectory() as work:  # train() checkpoints here; the curve run keeps nothing
        pool = (pool_with_pairs(s, args.seed, args.pair_relation) if args.pair_relation else
                pool_with_pairs(s, args.seed, args.pair_quadrant, "image_quadrant") if args.pair_quadrant else
                P.training_pool(s, args.seed))
        P.train(model, proc, pool, s, args.seed, Path(work), desc=f"curve {args.model}",
                after_step=lambda done: point(model, proc, done))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=["student", "teacher"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fixed-eval", action="store_true", help="held-out base items in their fixed (sorted) order")
    ap.add_argument("--pair-relation", type=float, default=0.0, help="share of two-object relation scenes")
    ap.add_argument("--pair-quadrant", type=float, default=0.0, help="share of two-object where-is scenes")
    ap.add_argument("--heldout", type=int, default=N_HELDOUT, help="held-out base items per curve point")
    ap.add_argument("--set", nargs="*", default=[], help="PretrainSettings overrides, e.g. fixed_order=0.3")
    ap.add_argument("--cache", action="store_true", help="train through pretrain_base and keep the base in the cache")
    ap.add_argument("--spec", nargs="*", default=[], help="TinySpec overrides, e.g. heads=6 kv_heads=2")
    main(ap.parse_args())
