"""Load any model spec: a checkpoint, a cached hub name, or a tiny spec pretrained on demand.

Sits above both qwen.py (architectures, checkpoints, adapters) and pretrain.py (which builds tiny bases from
qwen.py), so that neither imports the other's layer upward:

    from spatialstudy.models.bases import load_model
    model, processor = load_model("tiny-student", tier="smoke")          # pretrained (cached) on first use
    model, processor = load_model("tiny-teacher", tier="ci", adapter="runs/ci/02_sft/adapter")   # with a LoRA
"""
from __future__ import annotations

from pathlib import Path

from spatialstudy.models import pretrain, qwen

PROFILE_TO_TIER = {"ci": "ci", "smoke": "smoke", "full": "full", "full-repro": "full"}


BUDGET_FIELDS = ("steps", "batch_size", "n_scenes")   # a tiny base's training budget: its episodes and its pool


def tiny_checkpoint(spec: str, tier: str = "smoke", seed: int = 0, budget_of: str | None = None) -> Path:
    """The cached dir of a pretrained tiny spec ("tiny-student" at a run profile or tier), trained on a miss.
    `budget_of` (another tiny spec) trains it on that spec's budget instead: its steps, batch size and pool size
    (e.g. a student given the teacher's extra budget; cached apart unless the budgets are equal)."""
    from dataclasses import replace

    name, random_init = qwen.parse_tiny(spec)
    if random_init:
        raise ValueError(f"{spec!r} has random weights and no checkpoint")
    tier = PROFILE_TO_TIER.get(tier, tier)
    settings = replace(pretrain.TIERS[(name, tier)], **pretrain_budget(budget_of, tier)) if budget_of else None
    return pretrain.pretrain_base(name, tier, seed=seed, settings=settings)


def pretrain_budget(spec: str, tier: str = "smoke") -> dict:
    """A tiny spec's pretraining budget at a tier: {"steps", "batch_size", "n_scenes"}."""
    s = pretrain.TIERS[(qwen.parse_tiny(spec)[0], PROFILE_TO_TIER.get(tier, tier))]
    return {f: getattr(s, f) for f in BUDGET_FIELDS}


def load_model(spec, *, tier: str = "smoke", seed: int = 0, adapter=None, **load_kw):
    """(model, processor) for a checkpoint dir, a locally cached hub name or a tiny spec (pretrained at `tier`);
    `adapter`: a LoRA adapter dir put on top (qwen.load_adapter). `load_kw` go to qwen.load_checkpoint."""
    tiny = qwen.parse_tiny(str(spec))
    if tiny and tiny[1]:
        model, processor = _random_tiny(tiny[0], seed, **load_kw)
    else:
        model, processor = qwen.load_checkpoint(tiny_checkpoint(spec, tier, seed) if tiny else spec, **load_kw)
    return (qwen.load_adapter(model, adapter) if adapter else model), processor


def _random_tiny(name: str, seed: int, dtype=None, attn_implementation=None, min_pixels=None, max_pixels=None):
    """A tiny model with random weights (fast tests), on the tiny bases' tokenizer."""
    tok = pretrain.base_tokenizer()
    model = qwen.build_tiny(name, tok, seed=seed, attn_implementation=attn_implementation or "sdpa")
    proc = qwen.make_processor(tok, min_pixels or qwen.TINY_PIXELS, max_pixels or qwen.TINY_PIXELS)
    return (model.to(dtype) if dtype else model), proc


def load_for_eval(spec, *, tier: str = "smoke", device=None):
    """(model, processor) as every evaluation loads them (stages and the eval CLI alike), so that their runs share
    config hashes and shards merge with stage results: a tiny spec as pretrained at `tier`, on `device` if given;
    anything else as qwen.load_checkpoint_for_eval loads it."""
    if qwen.parse_tiny(str(spec)):
        model, processor = load_model(spec, tier=tier)
        return (model.to(device) if device else model), processor
    return qwen.load_checkpoint_for_eval(spec, device=device)
