"""04_distill beyond the pure losses: the training step (teacher frozen, gradients only into the student's LoRA),
the Trainer subclass logging its loss parts, arm parsing and weights, the scarce rows, the input alignment check,
the teacher gate's threshold and the dev slice's disjointness from the benchmark.

Real objects: the tiny Qwen2.5-VL student and teacher (random weights, eager attention), their processor, peft and
transformers' Trainer; the stage end to end runs in notebooks/04_distill.ipynb under nbval.
"""
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spatialstudy.configs import DistillConfig  # noqa: E402
from spatialstudy.methods import distill  # noqa: E402
from spatialstudy.models.bases import load_model  # noqa: E402
from spatialstudy.models.chat import collate  # noqa: E402
from spatialstudy.models.episodes import Episodes, spacethinker_episode  # noqa: E402
from spatialstudy.models.lora import make_trainable  # noqa: E402


def _record(i: int):
    image = Image.new("RGB", (112, 112), ((37 * i) % 256, (91 * i + 40) % 256, 200))
    return SimpleNamespace(images=[image], question=f"How far is the red cube from the blue sphere in scene {i}?",
                           reasoning="The cube sits left of the sphere.", answer=f"About {i % 5 + 1} meters.")


@pytest.fixture(scope="module")
def pair():
    """(student peft model, teacher, processor, layer groups): random tiny pair, eager attention, teacher frozen."""
    student, proc = load_model("tiny-student-random", attn_implementation="eager")
    teacher, tproc = load_model("tiny-teacher-random", attn_implementation="eager")
    teacher.eval().requires_grad_(False)
    torch.manual_seed(0)
    student = make_trainable(student, DistillConfig(), quantized=False)
    groups = distill.layer_groups(len(distill.decoder_layers(student)), len(distill.decoder_layers(teacher)))
    return student, teacher, proc, tproc, groups


def _batch(proc, n=2):
    batch = collate([spacethinker_episode(_record(i)) for i in range(n)], proc)
    labels = batch.pop("labels")
    return batch, labels


def test_tiny_pair_shares_inputs_and_maps_layers_like_the_real_pair(pair):
    student, teacher, proc, tproc, groups = pair
    distill.check_same_inputs(proc, tproc, spacethinker_episode(_record(3)))
    assert groups == [(0, [0]), (1, [1, 2]), (2, [3])]     # 4 student layers -> 3 teacher layers, two share one


def test_check_same_inputs_rejects_a_different_pixel_budget(pair):
    from spatialstudy.models import qwen

    _, _, proc, _, _ = pair
    other = qwen.make_processor(proc.tokenizer, 224 * 224, 224 * 224)
    with pytest.raises(ValueError, match="tokenise the same episode differently"):
        distill.check_same_inputs(proc, other, spacethinker_episode(_record(3)))


def _backward(pair, w, t_layers, s_layers):
    """One distillation loss on a fresh batch, backpropagated; the hooks are removed whatever happens."""
    student, teacher, proc, _, groups = pair
    caps = (distill.AttentionCapture(teacher, t_layers), distill.AttentionCapture(student, s_layers))
    try:
        student.zero_grad(set_to_none=True)
        batch, labels = _batch(proc)
        total, parts = distill.distill_loss(student, teacher, batch, labels, w, groups, caps)
        total.backward()
    finally:
        for c in caps:
            c.remove()
    return total, parts


@pytest.mark.parametrize("loss", ["sft", "logit_kd", "attn_kd", "combined"])
def test_gradients_reach_only_the_students_lora(pair, loss):
    student, teacher, _, _, groups = pair
    w = distill.loss_weights(distill.StudentArm(loss), DistillConfig())
    total, parts = _backward(pair, w, [t for t, _ in groups], [s for _, ss in groups for s in ss])
    expected = {"sft": {"ce"}, "logit_kd": {"logit_kd"}, "attn_kd": {"attn_kd", "ce"},
                "combined": {"attn_kd", "logit_kd"}}
    assert set(parts) - {"logits"} == expected[loss]
    assert all(torch.isfinite(v) for k, v in parts.items() if k != "logits") and total.item() > 0
    with_grad = [n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_attention_term_moves_the_student_only_through_its_maps(pair):
    """With beta only (no CE, no logits), the gradient is non-zero: the attention maps carry it into the LoRA of
    the q/k projections of the mapped layers (v/o/mlp do not shape the maps of the same layer)."""
    student = pair[0]
    _backward(pair, distill.LossWeights(attn=1.0, similarity="cosine"), [0, 1, 2], [0, 1, 2, 3])
    grads = {n: p.grad.abs().sum().item() for n, p in student.named_parameters() if p.grad is not None}
    assert any(g > 0 for n, g in grads.items() if "layers.3.self_attn.q_proj.lora_B" in n)
    assert all(g == 0 for n, g in grads.items() if "layers.3.mlp" in n)   # after the last map: no effect on it


def test_trainer_trains_two_steps_and_logs_the_loss_parts(pair, tmp_path):
    from spatialstudy.models.lora import training_args

    student, teacher, proc, _, groups = pair
    cfg = DistillConfig(max_steps=2, batch_size=2, logging_steps=1, eval_steps=2, save_steps=2)
    data = Episodes([_record(i) for i in range(4)], spacethinker_episode)
    before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_B" in n}
    trainer = distill.DistillTrainer(model=student, args=training_args(cfg, tmp_path, 1e-2, progress=False),
                                     train_dataset=data, eval_dataset=data,
                                     data_collator=lambda eps: collate(eps, proc), teacher=teacher,
                                     weights=distill.loss_weights(distill.StudentArm("combined"), cfg), groups=groups)
    trainer.train()
    trainer.remove_captures()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"loss_attn_kd", "loss_logit_kd"} <= set(h) for h in logged)
    assert any("eval_loss" in h for h in trainer.state.log_history)
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters() if n in before)
    assert list(tmp_path.glob("runs/*/events.out.tfevents.*"))    # TensorBoard in the run dir


def test_arms_parse_and_weigh_as_documented():
    cfg = DistillConfig(alpha=0.3, beta=0.7, gamma=0.2)
    assert distill.parse_arm("combined/scarce") == distill.StudentArm("combined", "scarce")
    assert distill.parse_arm("combined/scarce").name == "combined_scarce"
    w = {a: distill.loss_weights(distill.StudentArm(a), cfg) for a in ("sft", "logit_kd", "attn_kd", "combined")}
    assert (w["sft"].ce, w["sft"].logit, w["sft"].attn) == (1.0, 0.0, 0.0) and not w["sft"].uses_teacher
    assert (w["logit_kd"].logit, w["logit_kd"].alpha) == (1.0, 0.3)
    assert (w["attn_kd"].attn, w["attn_kd"].ce) == (0.7, 0.3)
    assert (w["combined"].attn, w["combined"].logit, w["combined"].ce) == (0.7, 0.2, 0.0)
    for bad in ("logit_kd/extra", "kd", "sft/half"):
        with pytest.raises(ValueError):
            DistillConfig(arms=[bad])
    with pytest.raises(ValueError, match="similarity"):
        DistillConfig(similarity="l2")


def test_scarce_rows_are_a_fixed_tenth():
    cfg = DistillConfig(scarce_fraction=0.1)
    rows = list(range(200))
    assert distill.arm_rows(distill.StudentArm("sft", "scarce"), cfg, rows) == list(range(20))
    assert distill.arm_rows(distill.StudentArm("combined"), cfg, rows) == rows
    assert distill.arm_rows(distill.StudentArm("sft", "scarce"), cfg, rows[:3]) == [0]   # never empty


def test_detectable_gap_scales_with_the_subset():
    """The dev CI half-width scaled to n_eval items, times (1.96 + 0.84) / 1.96 (80% power)."""
    d = {"ci95": [-2.0, 6.0]}
    assert distill.detectable(d, 400, 400) == pytest.approx(4.0 * 2.8 / 1.96)
    assert distill.detectable(d, 400, 1600) == pytest.approx(2.0 * 2.8 / 1.96)
    gate = {"n_dev": 400, "paired": {"overall": {"diff": 1.0, "ci95": [-2.0, 4.0], "p_mcnemar": 0.5, "n": 400}},
            "detectable": 5.7, "testable": False}
    assert "NOT testable" in distill.gate_line(gate)


def test_dev_slice_shares_no_image_with_the_benchmark(tmp_path):
    """The gate's items come from the generator under a seed derived from the user's by the role "dev": no image
    (pixel hash) in common with a benchmark written from the user's seed."""
    import hashlib

    from spatialstudy.data import load_omnispatial
    from spatialstudy.data.streams import role_seed
    from spatialstudy.data.writers import write_omnispatial

    def hashes(path):
        return {hashlib.sha1(Image.open(r.image_path).tobytes()).hexdigest() for r in load_omnispatial(path)}

    bench = write_omnispatial(tmp_path / "bench", 60, seed=0, image_size=64)
    dev = write_omnispatial(tmp_path / "dev", 60, seed=role_seed(0, "dev"), image_size=64)
    assert hashes(bench) and hashes(dev) and not hashes(bench) & hashes(dev)


def test_the_teacher_runs_eager_only_where_its_maps_are_read(pair):
    """A teacher on the default kernel returns no attention maps; inside eager_attention it does (attention KD, the
    head-matching figure), and afterwards it is back on its own kernel. Not needed: left as it is."""
    _, _, proc, _, _ = pair
    teacher, _ = load_model("tiny-teacher-random")
    batch, _ = _batch(proc)
    assert teacher.config._attn_implementation == "sdpa"
    with distill.eager_attention(teacher, needed=False):
        assert teacher.config._attn_implementation == "sdpa"
    with torch.no_grad(), distill.eager_attention(teacher):
        maps = teacher(**batch, output_attentions=True).attentions
    assert maps[0] is not None and maps[0].shape[1] == teacher.config.text_config.num_attention_heads
    assert teacher.config._attn_implementation == "sdpa"
