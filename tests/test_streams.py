"""Disjoint generation streams: no image is shared between any two roles' sets at smoke sizes."""
import hashlib

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


@pytest.mark.slow
def test_no_image_shared_between_roles_at_smoke_sizes():
    """Every role's set built at the smoke tier's sizes (params/smoke/01_data.yaml, the smoke pretraining pool and
    held-out check): the images of any two roles are disjoint (pixel hashes)."""
    data = yaml.safe_load(open("params/smoke/01_data.yaml"))
    s = pretrain.TIERS[("student", "smoke")]
    pool = [it for g in pretrain.training_pool(s, 0) for it in g]
    sets = {"pretrain_pool": _hashes(pool),
            "pretrain_heldout": _hashes(pretrain.heldout_items(s.eval_items)),
            "spacethinker_train": _hashes(spacethinker_items("train", data["n_train"])),
            "spacethinker_test": _hashes(spacethinker_items("test", data["n_test"])),
            "benchmark": _hashes(benchmark_items(data["n_omni"], 0, 112, "distinct"))}
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], f"{a} and {b} share {len(sets[a] & sets[b])} image(s)"
