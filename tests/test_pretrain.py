"""Pretraining of the tiny bases: answer-only labels, episode layouts, the hash-keyed cache (hit, miss, resume)."""
import dataclasses
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spatialstudy.models import pretrain  # noqa: E402
from spatialstudy.models.bases import load_model  # noqa: E402
from spatialstudy.models.chat import collate  # noqa: E402
from spatialstudy.models.qwen import make_processor  # noqa: E402


@pytest.fixture(scope="module")
def proc():
    return make_processor(pretrain.base_tokenizer())


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    """Point runs/ at a temp dir, so tests never touch (or reuse) the real cache."""
    monkeypatch.setenv("SPATIALSTUDY_ROOT", str(tmp_path))
    return tmp_path


REPO_CACHE = pretrain.runs.root() / "runs" / "cache"   # resolved at import, before any test moves the root


def _pool(settings, seed=0):
    return pretrain.training_pool(settings, seed)


def test_pool_uses_only_base_families():
    s = pretrain.TIERS[("student", "ci")]
    pool = _pool(s)
    assert {it.partition for g in pool for it in g} == {"base"}
    assert all(len({it.scene_id for it in g}) == 1 for g in pool)


def test_pool_single_object_share():
    """The easy rung: that share of the pool's scenes holds one object (so its role is object 0), asked where it is;
    the other scenes hold 2-4 objects and ask about any of them."""
    s = dataclasses.replace(pretrain.TIERS[("student", "ci")], n_scenes=16, per_scene=1, single_object=0.5)
    pool = _pool(s)
    assert len(pool) == 16
    single, multi = pool[8:], pool[:8]       # single-object scenes come after the multi-object ones
    assert all(g[0].family == "image_quadrant" and g[0].roles == (0,) for g in single)
    assert {it.family for g in multi for it in g} == {"image_quadrant", "relative_direction"}
    assert max(r for g in multi for it in g for r in it.roles) >= 1


def test_labels_cover_only_assistant_answers(proc):
    s = dataclasses.replace(pretrain.TIERS[("student", "ci")], icl_fraction=0.5, direct_fraction=0.5)
    pool, rng = _pool(s), random.Random(3)
    episodes = [pretrain.episode(pool, rng, s, few_shot=k % 2 == 0) for k in range(12)]
    batch = collate(episodes, proc)
    tok = proc.tokenizer
    for (msgs, images), ids, labels in zip(episodes, batch["input_ids"], batch["labels"]):
        answers = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
        assert tok.decode(ids[labels != -100]) == "".join(a + "<|im_end|>" for a in answers)
        n_pad = int((ids == proc.image_token_id).sum())
        assert n_pad == 16 * len(images)
    assert any(len(m) > 2 for m, _ in episodes), "some episodes hold several turns (few-shot or one scene)"


def test_letter_tokens_are_single(proc):
    """Each answer letter is one token, after "Answer:" (" A") and as a direct answer ("A")."""
    for letters in (" A", " B", " C", " D"), ("A", "B", "C", "D"):
        ids = [proc.tokenizer(c, add_special_tokens=False)["input_ids"] for c in letters]
        assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 4


def test_cache_hit_miss_and_load(cache_root):
    first = pretrain.pretrain_base("student", "ci")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert pretrain.pretrain_base("student", "ci") == first  # hit: same dir, nothing retrained
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    info = pretrain.runs.read_json(first / "pretrain.json")
    assert len(info["losses"]) == pretrain.TIERS[("student", "ci")].steps
    changed = dataclasses.replace(pretrain.TIERS[("student", "ci")], lr=1e-3)
    seen = []   # the curve hook gets the model being trained and its processor after every step
    other = pretrain.pretrain_base("student", "ci", settings=changed,
                                   on_step=lambda m, p, done: seen.append((m.training, p.tokenizer is not None, done)))
    assert other != first and (other / "model.safetensors").exists()
    assert seen == [(True, True, k) for k in range(1, changed.steps + 1)]
    model, proc = load_model("tiny-student", tier="ci")
    assert model.config.text_config.num_hidden_layers == pretrain.TINY_SPECS["student"].layers
    assert not list(first.parent.glob(".*partial")), "no work dir is left behind"


def test_a_second_process_waits_for_the_base_being_built_and_reuses_it(cache_root, tmp_path):
    """Two processes asking for one base (two notebooks, two test workers) train it once: while this process holds
    the base's build lock, a second process's pretrain_base waits, then finds the base published and trains nothing
    (the published stand-in has no weights, so a training run would show as model.safetensors)."""
    import subprocess
    import sys
    import time

    # the second process reuses the repo's tokenizer cache (keyed and race-safe) rather than training its own
    (cache_root / "runs" / "cache").mkdir(parents=True)
    (REPO_CACHE / "tokenizer").mkdir(parents=True, exist_ok=True)
    (cache_root / "runs" / "cache" / "tokenizer").symlink_to(REPO_CACHE / "tokenizer", target_is_directory=True)
    small = {"steps": 1, "batch_size": 2, "n_scenes": 4}
    out = pretrain.base_dir("student", "ci", 0, dataclasses.replace(pretrain.TIERS[("student", "ci")], **small))
    code = ("import dataclasses\nfrom spatialstudy.models import pretrain\n"
            f"s = dataclasses.replace(pretrain.TIERS[('student', 'ci')], **{small!r})\n"
            "out = pretrain.pretrain_base('student', 'ci', settings=s)\n"
            "print(out, (out / 'model.safetensors').exists())")
    err = tmp_path / "stderr.txt"
    with pretrain.runs.build_lock(out), open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=f, text=True)
        deadline = time.time() + 120
        while "waiting for another process building" not in err.read_text() and time.time() < deadline:
            assert proc.poll() is None, err.read_text()[-2000:]
            time.sleep(0.2)
        assert "waiting for another process building" in err.read_text()
        pretrain.runs.write_json(out / "pretrain.json", {"key": "published by the lock holder"})
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.read_text()[-2000:]
    assert stdout.split() == [str(out), "False"]


def test_resume_from_checkpoint_matches_uninterrupted(cache_root, monkeypatch, proc):
    s = dataclasses.replace(pretrain.TIERS[("student", "ci")], steps=4, warmup=1)
    monkeypatch.setattr(pretrain, "CKPT_EVERY", 2)
    pool = _pool(s)

    def run(work, seen):
        work.mkdir(exist_ok=True)
        model = pretrain.build_tiny("student", proc.tokenizer, seed=0)
        return model, pretrain.train(model, proc, pool, s, 0, work, "test", after_step=seen.append)

    full_seen, resumed_seen = [], []
    full_model, full_losses = run(cache_root / "a", full_seen)
    state = torch.load(cache_root / "a" / "state.pt", weights_only=False)  # as a crash after step 2 leaves it
    assert state["step"] == 2
    (cache_root / "b").mkdir()
    torch.save(state, cache_root / "b" / "state.pt")
    resumed, losses = run(cache_root / "b", resumed_seen)
    assert losses == full_losses
    assert full_seen == [1, 2, 3, 4] and resumed_seen == [3, 4]  # the hook sees only the steps run now
    for p, q in zip(full_model.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_measure_reports_blind_and_chance(proc):
    from spatialstudy.models.qwen import build_tiny

    model = build_tiny("student", proc.tokenizer).eval()
    res = pretrain.measure(model, proc, pretrain.heldout_items(8))
    assert res["n"] == 8 and 0.25 <= res["chance"] <= 0.5
    assert 0 <= res["acc"] <= 1 and 0 <= res["blind_acc"] <= 1
    assert sum(res["acc_pred_letters"].values()) == 8


def test_views_keep_the_answer():
    """Training views: sorted options (the fixed order) and the options after the correct one cut keep the correct
    text on its letter."""
    s = pretrain.TIERS[("student", "ci")]
    items = [it for g in _pool(s) for it in g]
    rng = random.Random(0)
    for it in items:
        right = it.options[it.answer]
        fixed = pretrain.view(it, rng, True, 0.0)
        assert fixed.options == sorted(it.options) and fixed.options[fixed.answer] == right
        fewer = pretrain.view(it, rng, True, 1.0)
        assert 2 <= len(fewer.options) <= 4 and fewer.options[fewer.answer] == right
        assert fewer.options == fixed.options[:len(fewer.options)]   # cut after the answer: letters stay put
    assert pretrain.target(items[0], "manual_cot", say_option=True).endswith(f"\nAnswer: {items[0].letter}")
    assert pretrain.target(items[0], "manual_cot", say_option=True).lower().startswith(items[0].options[
        items[0].answer])


def test_reading_drills_have_no_image_and_name_their_answer(proc):
    """A reading drill: one turn without an image whose question quotes the answer's text; labels cover only the
    answer (the option text, then its letter)."""
    s = dataclasses.replace(pretrain.TIERS[("student", "ci")], lookup_drill=1.0, say_option=1.0, direct_fraction=0.0,
                            per_scene=1)
    pool, rng = _pool(s), random.Random(0)
    msgs, images = pretrain.episode(pool, rng, s, few_shot=False)
    assert images == [] and all(c["type"] == "text" for m in msgs for c in m["content"])
    question, answer = msgs[0]["content"][0]["text"], msgs[1]["content"][0]["text"]
    said = answer.split("\n")[0].rstrip(".").lower()
    assert f'(the answer is "{said}".)' in question.lower()
    letter = answer.split("Answer: ")[1]
    assert f"\n{letter}. {said}" in question.lower().replace(f"\n{letter.lower()}. ", f"\n{letter}. ")


def test_a_base_on_another_specs_budget_takes_its_steps_batch_and_pool(cache_root, monkeypatch):
    from spatialstudy.models import bases

    teacher = dataclasses.replace(pretrain.TIERS[("teacher", "ci")], steps=3, batch_size=2, n_scenes=6)
    monkeypatch.setitem(pretrain.TIERS, ("teacher", "ci"), teacher)
    own = pretrain.TIERS[("student", "ci")]
    extra = bases.tiny_checkpoint("tiny-student", "ci", budget_of="tiny-teacher")
    got = pretrain.runs.read_json(extra / "pretrain.json")["key"]["settings"]
    assert (got["steps"], got["batch_size"], got["n_scenes"]) == (3, 2, 6)
    assert got["lr"] == own.lr and got["single_object"] == own.single_object   # the rest is the student's recipe
    assert extra != bases.tiny_checkpoint("tiny-student", "ci")   # cached apart from the student's own base
