"""Disjoint generation streams: no image is shared between any two roles' sets at smoke sizes."""
import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import yaml

from spatialstudy.models import pretrain
from spatialstudy.data.streams import role_seed
from spatialstudy.data.writers import benchmark_items, spacethinker_items


def _hashes(items) -> set[str]:
    return {hashlib.sha1(it.image.tobytes()).hexdigest() for it in items}


def test_role_seeds_differ_by_role_and_user_seed():
    roles = ["pretrain_pool", "spacethinker_train", "spacethinker_test", "benchmark", "dev"]
    seeds = {role_seed(s, r) for s in (0, 1) for r in roles}
    assert len(seeds) == 2 * len(roles)
    assert role_seed(3, "benchmark") == role_seed(3, "benchmark")           # a pure function
    with pytest.raises(ValueError):
        role_seed(0, "")


def _role_hashes(role: str) -> set[str]:
    """Pixel hashes of one role's set at the smoke sizes (params/smoke/01_data.yaml, the smoke pretraining pool and
    held-out check); a function of its own so that each role renders in its own process. The pool is the student's
    2,400 scenes: the teacher's 8,000 continue the same streams, so a stream shared with another role shows in the
    first 2,400 already (rendering all 8,000 would add minutes)."""
    data = yaml.safe_load(open("params/smoke/01_data.yaml"))
    s = pretrain.TIERS[("student", "smoke")]
    if role == "pretrain_pool":
        return _hashes([it for g in pretrain.training_pool(s, 0) for it in g])
    if role == "pretrain_heldout":
        return _hashes(pretrain.heldout_items(s.eval_items))
    if role.startswith("spacethinker_"):
        split = role.split("_")[1]
        return _hashes(spacethinker_items(split, data[f"n_{split}"]))
    return _hashes(benchmark_items(data["n_omni"], 0, 112, "distinct"))


ROLES = ["pretrain_pool", "benchmark", "spacethinker_train", "spacethinker_test", "pretrain_heldout"]  # largest first


@pytest.mark.slow
def test_no_image_shared_between_roles_at_smoke_sizes():
    """Every role's set built at the smoke tier's sizes: the images of any two roles are disjoint (pixel hashes).
    Rendering about 7,000 scenes is the cost, so the roles render in parallel, one process per core."""
    ctx = multiprocessing.get_context("spawn")     # a fresh interpreter: no forked torch state
    with ProcessPoolExecutor(max_workers=min(len(ROLES), os.cpu_count() or 1), mp_context=ctx) as pool:
        sets = dict(zip(ROLES, pool.map(_role_hashes, ROLES)))
    assert all(sets.values())
    for i, a in enumerate(ROLES):
        for b in ROLES[i + 1:]:
            assert not sets[a] & sets[b], f"{a} and {b} share {len(sets[a] & sets[b])} image(s)"
