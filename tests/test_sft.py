"""02_sft: answer-only label masking, LoRA on the language model only, 4-bit bases that keep the vision tower whole,
adapter round trips, resuming an interrupted Trainer run, arm identities and arm parsing.

Real objects throughout: the tiny bases' processor and tokenizer, Qwen2.5-VL model classes, peft, bitsandbytes (on
the CPU) and transformers' Trainer.
"""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spatialstudy.configs import SFTConfig  # noqa: E402
from spatialstudy.methods import sft  # noqa: E402
from spatialstudy.models import qwen  # noqa: E402
from spatialstudy.models.bases import load_model  # noqa: E402
from spatialstudy.models.chat import collate  # noqa: E402

VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
LM_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _record(i: int, long: bool = False):
    """A SpaceThinker-schema row: one 112 px image, a question, a reasoning trace and a free-text answer."""
    image = Image.new("RGB", (112, 112), ((37 * i) % 256, (91 * i + 40) % 256, 200))
    if long:
        return SimpleNamespace(images=[image], question=f"How far is the red cube from the blue sphere in scene {i}?",
                               reasoning="The cube sits left of the sphere, and both rest on the floor.",
                               answer=f"About {i % 5 + 1} meters.")
    return SimpleNamespace(images=[image], question="Is it left?", reasoning="Yes.", answer="Yes.")


def _episodes(n: int) -> sft.Episodes:
    return sft.Episodes([_record(i, long=i % 2 == 0) for i in range(n)], sft.spacethinker_episode)


@pytest.fixture(scope="module")
def tiny():
    """(model, processor) of the random tiny student: a fresh model per test comes from _fresh()."""
    return load_model("tiny-student-random")


def _fresh():
    """The same random tiny student each call (build_tiny is seeded)."""
    return load_model("tiny-student-random")[0]


def _trainable(cfg: SFTConfig, model=None, seed: int | None = None):
    """A LoRA-wrapped fresh tiny student; its LoRA init is drawn under cfg.seed, or under `seed` when given (the
    training itself keeps cfg.seed)."""
    from dataclasses import replace

    model = model if model is not None else _fresh()
    return sft.make_trainable(model, cfg if seed is None else replace(cfg, seed=seed), quantized=False)


def _lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------- 1. label masking
def test_labels_are_exactly_the_assistant_answer(tiny):
    """Loss only on the answer tokens + <|im_end|>, located independently of answer_labels: the tokenised answer
    text right after the `<|im_start|>assistant\\n` header. Two episodes of different lengths: right padding."""
    _, proc = tiny
    tok = proc.tokenizer
    records = [_record(1, long=True), _record(2, long=False)]
    eps = [sft.spacethinker_episode(r) for r in records]
    batch = collate(eps, proc)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape and ids.shape[0] == 2
    lengths = mask.sum(1).tolist()
    assert lengths[0] != lengths[1], "episodes of different lengths, so one row is padded"
    assert mask[1, lengths[1]:].eq(0).all() and mask[1, :lengths[1]].eq(1).all(), "right padding"

    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, rec in enumerate(records):
        target = f"<think>{rec.reasoning}</think>\n<answer>{rec.answer}</answer>"
        assert sft.spacethinker_target(rec) == target
        answer = tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
        seq = ids[row].tolist()
        starts = [i for i in range(len(seq)) if seq[i:i + len(header)] == header]
        assert len(starts) == 1, "one assistant turn"
        a0 = starts[0] + len(header)
        assert seq[a0:a0 + len(answer)] == answer, "the answer follows the header, tokenised as on its own"
        expected = torch.full_like(ids[row], -100)
        expected[a0:a0 + len(answer)] = ids[row, a0:a0 + len(answer)]
        assert torch.equal(labels[row], expected)
        kept = (labels[row] != -100).nonzero().flatten().tolist()
        assert kept == list(range(a0, a0 + len(answer)))
        assert tok.convert_ids_to_tokens(seq[kept[-1]]) == "<|im_end|>"
        assert tok.decode(ids[row][labels[row] != -100]) == target + "<|im_end|>"


def test_loss_on_prompt_labels_every_text_token(tiny):
    """loss_on_prompt=True: every non-padding text token is labelled with itself; vision tokens and padding -100."""
    _, proc = tiny
    tok = proc.tokenizer
    eps = [sft.spacethinker_episode(_record(1, long=True)), sft.spacethinker_episode(_record(2))]
    batch = collate(eps, proc, loss_on_prompt=True)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (mask == 0).any(), "the shorter episode is padded"
    vision = torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(list(VISION))))
    n_image = int((ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n_image == 2 * 16 and int(vision.sum()) == n_image + 2 * 2, "16 image tokens + start/end per image"
    text = (mask == 1) & ~vision
    assert torch.equal(labels[text], ids[text]), "every non-padding text token is its own label"
    assert labels[vision].eq(-100).all() and labels[mask == 0].eq(-100).all()
    # the padding token is also a real text token (<|endoftext|>): masked by attention, not by id
    assert (labels != -100).sum() == text.sum()
    # and it covers the prompt: more labelled tokens than answer-only masking gives
    assert (labels != -100).sum() > (collate(eps, proc)["labels"] != -100).sum()


# ---------------------------------------------------------------- 2. LoRA targets
def test_lora_targets_only_the_language_model():
    model = _fresh()
    vision_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear)}
    # counter-check: a plain name list ("gate_proj", ...) would also match the vision tower's MLPs
    assert {"gate_proj", "up_proj", "down_proj"} <= vision_names
    peft_model = _trainable(SFTConfig(), model)
    names = sft.adapter_modules(peft_model)
    n_layers = qwen.TINY_SPECS["student"].layers
    assert len(names) == n_layers * len(LM_PROJ)
    assert all("language_model.layers." in n and "visual" not in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(LM_PROJ)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable), "the base stays frozen"

    qv = sft.adapter_modules(_trainable(SFTConfig(lora_modules="qv")))
    assert len(qv) == 2 * n_layers and {n.rsplit(".", 1)[-1] for n in qv} == {"q_proj", "v_proj"}
    assert all("language_model.layers." in n for n in qv)


def test_lora_target_pattern_rejects_vision_names():
    import re

    pat = re.compile(sft.lora_target_pattern())
    assert pat.fullmatch("base_model.model.model.language_model.layers.3.mlp.gate_proj")
    assert pat.fullmatch("model.language_model.layers.0.self_attn.q_proj")
    assert not pat.fullmatch("model.visual.blocks.0.mlp.gate_proj")
    assert not pat.fullmatch("model.language_model.layers.0.mlp.gate_proj.lora_A")


# ---------------------------------------------------------------- 3. 4-bit bases
@pytest.mark.slow  # loads (on a cache miss: pretrains) the ci tiny-student base, twice
def test_quantized_base_keeps_vision_tower_whole_and_trains(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'spatialstudy[quant]')")
    cfg = SFTConfig(quantize=True, student="tiny-student", warmup_steps=0.0, max_steps=1, batch_size=2)
    model, proc, quantized = sft.load_base(cfg.student, "ci", cfg)
    assert quantized is True
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    vision = {n: m for n, m in linear.items() if n.startswith("model.visual.")}
    lm = {n: m for n, m in linear.items() if ".language_model.layers." in n}
    assert vision and len(lm) == qwen.TINY_SPECS["student"].layers * len(LM_PROJ)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if n.startswith("model.visual"))
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in lm.values())

    # one Trainer step of QLoRA: finite loss, the adapter moves, the 4-bit base does not
    peft_model = sft.make_trainable(model, cfg, quantized=True)
    assert sft.adapter_modules(peft_model) and not any("visual" in n for n in sft.adapter_modules(peft_model))
    before = _lora_state(peft_model)
    packed = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    trainer = sft.make_trainer(peft_model, proc, cfg, sft.Arm("student", "spacethinker"), tmp_path,
                               (_episodes(2), _episodes(2)), progress=False)
    out = trainer.train()
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    after = _lora_state(peft_model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert all(torch.equal(p.detach(), packed[n]) for n, p in peft_model.named_parameters() if n in packed)

    vq, _, _ = sft.load_base(cfg.student, "ci", SFTConfig(quantize=True, quantize_vision=True))
    vis = [m for n, m in vq.named_modules() if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear)]
    assert vis and all(isinstance(m, bnb.nn.Linear4bit) for m in vis)


# ---------------------------------------------------------------- 4. adapter round trip
def _train_steps(model, batch, steps: int = 2, lr: float = 1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_saved_adapter_reloads_to_identical_logits(tmp_path, tiny):
    _, proc = tiny
    batch = collate([sft.spacethinker_episode(_record(i, long=i == 0)) for i in range(2)], proc)
    model = _train_steps(_trainable(SFTConfig()), batch)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n), "the adapter has an effect"
    with torch.no_grad():
        want = model(**batch).logits
    qwen.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists(), "the adapter only, not the base"

    base = _fresh().eval()
    with torch.no_grad():
        plain = base(**batch).logits
    loaded = qwen.load_adapter(base, tmp_path / "adapter").eval()
    assert sorted(sft.adapter_modules(loaded)) == sorted(sft.adapter_modules(model))
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, plain, rtol=0, atol=1e-4), "the adapter changes the base's outputs"


# ---------------------------------------------------------------- 5. resume after an interruption
class Interrupt(RuntimeError):
    pass


def _boom_at(step: int):
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupt(f"simulated crash at step {step}")

    return Boom()


@pytest.mark.slow
def test_interrupted_fit_resumes_from_last_checkpoint(tmp_path, tiny):
    _, proc = tiny
    cfg = SFTConfig(max_steps=6, save_steps=2, eval_steps=2, batch_size=4, logging_steps=1)
    arm = sft.Arm("student", "spacethinker")
    data = (_episodes(16), _episodes(4))

    # the first run dies after step 3: checkpoint-2 was written, step 3 was not saved
    crashed = tmp_path / "crashed"
    trainer = sft.make_trainer(_trainable(cfg), proc, cfg, arm, crashed, data, progress=False)
    trainer.add_callback(_boom_at(3))
    with pytest.raises(Interrupt):
        trainer.train()
    assert sft.last_checkpoint(crashed) == str(crashed / "checkpoint-2")
    assert not sft.arm_trained(crashed), "a checkpoint is not a finished arm: the stage trains it again (resuming)"

    # a new process: a fresh model (its own LoRA init, which the checkpoint replaces), no callback
    log = sft.fit(_trainable(cfg, seed=123), proc, cfg, arm, crashed, data, progress=False)
    assert log["resumed_from"] is not None and Path(log["resumed_from"]).name == "checkpoint-2"
    assert log["steps"] == 6
    assert sft.runs.read_json(crashed / "log.json")["steps"] == 6
    assert (crashed / "adapter" / "adapter_config.json").exists() and sft.arm_trained(crashed)
    assert sft.last_checkpoint(crashed) == str(crashed / "checkpoint-6")
    steps = {h["step"] for h in log["log_history"] if "loss" in h}
    assert {1, 2} <= steps and {4, 5, 6} <= steps, "the history runs from before the crash to after it"
    assert {h["step"] for h in log["log_history"] if "eval_loss" in h} == {2, 4, 6}
    state = sft.runs.read_json(crashed / "checkpoint-6" / "trainer_state.json")
    assert state["global_step"] == 6 and {h["step"] for h in state["log_history"] if "loss" in h} == set(range(1, 7))
    resumed = _lora_state(qwen.load_adapter(_fresh(), crashed / "adapter"))

    # the same seed, uninterrupted
    straight = tmp_path / "straight"
    log2 = sft.fit(_trainable(cfg), proc, cfg, arm, straight, data, progress=False)
    assert log2["resumed_from"] is None and log2["steps"] == 6
    whole = _lora_state(qwen.load_adapter(_fresh(), straight / "adapter"))
    assert resumed.keys() == whole.keys() and resumed
    assert all(whole[n].abs().sum() > 0 for n in whole if "lora_B" in n), "trained: every lora_B moved off zero"
    # Trainer restores the LoRA weights, optimizer, scheduler and RNG states (rng_state.pth) from checkpoint-2 and
    # skips the batches of the epoch already seen, so the resumed run sees the same data order and dropout masks
    for n in whole:
        assert torch.allclose(resumed[n], whole[n], rtol=0, atol=1e-5), n
    loss_at = {h["step"]: h["loss"] for h in log["log_history"] if "loss" in h}
    loss_at2 = {h["step"]: h["loss"] for h in log2["log_history"] if "loss" in h}
    for s in range(1, 7):
        assert loss_at[s] == pytest.approx(loss_at2[s], abs=1e-4), s


# ---------------------------------------------------------------- 6. arm identity
def test_arm_dir_empties_only_on_a_changed_identity(tmp_path):
    arm, cfg = sft.Arm("student", "mcq"), SFTConfig()
    ident = sft.arm_identity(arm, cfg, "/bases/student", (16, 8))
    path = sft.arm_dir(tmp_path, arm, ident)
    assert path == tmp_path / "student_mcq"
    (path / "checkpoint-2").mkdir()
    (path / "checkpoint-2" / "state.txt").write_text("x")

    # identical identity, or a change that does not touch the adapter (evaluation settings): kept
    assert sft.arm_dir(tmp_path, arm, sft.arm_identity(arm, cfg, "/bases/student", (16, 8))) == path
    assert (path / "checkpoint-2" / "state.txt").exists()
    same = sft.arm_identity(arm, SFTConfig(eval_batch_size=4, max_new_tokens=8), "/bases/student", (16, 8))
    sft.arm_dir(tmp_path, arm, same)
    assert (path / "checkpoint-2" / "state.txt").exists()

    changed = sft.arm_identity(arm, SFTConfig(lr=5e-4), "/bases/student", (16, 8))
    assert changed != ident
    assert sft.arm_dir(tmp_path, arm, changed) == path
    assert not (path / "checkpoint-2").exists(), "another identity's checkpoints are never resumed"
    marker = sft.runs.read_json(path / "arm.json")
    assert marker["hash"] == sft.runs.config_hash(changed) and marker["train"]["lr"] == 5e-4

    (path / "checkpoint-4").mkdir()
    for other in (sft.arm_identity(arm, SFTConfig(lr=5e-4), "/bases/student", (32, 8)),       # more rows
                  sft.arm_identity(arm, SFTConfig(lr=5e-4), "/bases/other", (32, 8))):        # another base
        (path / "checkpoint-4").mkdir(exist_ok=True)
        sft.arm_dir(tmp_path, arm, other)
        assert not (path / "checkpoint-4").exists()


# ---------------------------------------------------------------- 7. arm parsing
def test_parse_arm():
    assert sft.parse_arm("student/mcq/blank") == sft.Arm("student", "mcq", True)
    assert sft.parse_arm("teacher/spacethinker") == sft.Arm("teacher", "spacethinker", False)
    assert sft.parse_arm("student/mcq/blank").name == "student_mcq_blank"


@pytest.mark.parametrize("bad", ["student/foo", "pupil/mcq", "student/mcq/gray", "student", "student/mcq/blank/x"])
def test_bad_arms_are_rejected(bad):
    with pytest.raises(ValueError, match="arm"):
        sft.parse_arm(bad)
    with pytest.raises(ValueError, match="arm"):
        SFTConfig(arms=["student/mcq", bad])


def test_bad_lora_modules_rejected():
    with pytest.raises(ValueError, match="lora_modules"):
        SFTConfig(lora_modules="all-linear")


def test_lora_init_depends_on_the_seed_not_on_what_the_process_drew_before():
    """An arm's LoRA initialisation is the same whether or not other arms drew random numbers first (arms loaded
    from cache draw nothing), and differs with cfg.seed."""
    cfg = SFTConfig()
    first = _lora_state(sft.make_trainable(_fresh(), cfg, quantized=False))
    torch.rand(1000)   # another arm's draws
    again = _lora_state(sft.make_trainable(_fresh(), cfg, quantized=False))
    other = _lora_state(sft.make_trainable(_fresh(), SFTConfig(seed=1), quantized=False))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first if "lora_A" in n)


# ---------------------------------------------------------------- 8. the study's training quirks (full-repro)
def test_a_late_field_enters_an_arm_identity_only_when_set():
    """Fields added after arms were trained (LATE_FIELDS) leave the identity of a default config unchanged, so the
    cached arms are not retrained; set away from their default, they change it."""
    from spatialstudy.configs import LATE_FIELDS

    arm = sft.Arm("student", "mcq")
    ident = sft.arm_identity(arm, SFTConfig(), "/bases/student", (16, 8))
    assert not set(LATE_FIELDS) & set(ident["train"]) and "lr" in ident["train"]
    for field, default in LATE_FIELDS.items():
        changed = sft.arm_identity(arm, SFTConfig(**{field: not default}), "/bases/student", (16, 8))
        assert changed["train"][field] == (not default) and changed != ident


def test_text_before_image_puts_the_question_first_in_every_format():
    record = _record(1, long=True)
    for target in ("spacethinker", "mcq", "answer_only"):
        eps, _ = sft._episodes([record], target, seed=0)
        study, _ = sft._episodes([record], target, seed=0, text_first=True)
        default_user, study_user = eps[0][0][0]["content"], study[0][0][0]["content"]
        assert [c["type"] for c in default_user] == ["image", "text"]          # the benchmark's order
        assert [c["type"] for c in study_user] == ["text", "image"]            # the study's SFT rows
        assert study_user[::-1] == default_user and study[0][0][1:] == eps[0][0][1:]
    cfg = SFTConfig(text_before_image=True)
    (_, msgs, _) = sft.meaning_prompts([record], "spacethinker", cfg)
    assert [c["type"] for c in msgs[0][0]["content"]] == ["text", "image"]    # evaluated as it was trained


def test_keep_best_ends_on_the_checkpoint_with_the_lowest_validation_loss(tmp_path, tiny):
    _, proc = tiny
    with pytest.raises(ValueError, match="multiple of eval_steps"):
        SFTConfig(keep_best=True, save_steps=3, eval_steps=2)
    cfg = SFTConfig(max_steps=6, save_steps=2, eval_steps=2, batch_size=4, lr=5e-2, keep_best=True)
    arm, data = sft.Arm("student", "spacethinker"), (_episodes(16), _episodes(4))
    log = sft.fit(_trainable(cfg), proc, cfg, arm, tmp_path / "best", data, progress=False)
    evals = {h["step"]: h["eval_loss"] for h in log["log_history"] if "eval_loss" in h}
    best = min(evals, key=evals.get)
    assert best < max(evals), "lr 5e-2 overshoots after step 2: the best checkpoint is not simply the last one"
    kept = _lora_state(qwen.load_adapter(_fresh(), tmp_path / "best" / "adapter"))
    at_best = _lora_state(qwen.load_adapter(_fresh(), tmp_path / "best" / f"checkpoint-{best}"))
    assert kept.keys() == at_best.keys() and all(torch.equal(kept[n], at_best[n]) for n in kept)
