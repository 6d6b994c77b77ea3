"""Stage 04_distill: the fine-tuned teacher distilled into the student (research question 3).

The losses are small pure functions (formula in each docstring); training is transformers' `Trainer` with
`compute_loss` overridden (TRL's distillation trainers do not do attention KD). Every student arm starts from the
same student base with the same LoRA, rows, steps and seed; only the loss differs:

    sft         CE on the hard labels (the control every KD arm is compared with)
    logit_kd    LogitKD = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)
    attn_kd     beta * AttnKD + alpha * CE (attention KD keeps a task signal)
    combined    beta * AttnKD + gamma * LogitKD (the study's loss; "best KD", fixed in advance)
    <arm>/scarce   the same on `scarce_fraction` of the rows (does KD help most when data is scarce?)
    sft/extra   hard labels from a student pretrained on the teacher's budget: steps, batch, pool (equal budget)

The teacher is the 02_sft teacher arm (base + its adapter), read from runs/<profile>/02_sft/; this module never
imports sft. Writes runs/<profile>/04_distill/{config.json, metrics.json, predictions_<arm>[_blind].jsonl,
dev/ (the gate's items), <arm>/{adapter/, checkpoint-N/, runs/ (TensorBoard), log.json, arm.json}}.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from spatialstudy import runs
from spatialstudy.configs import training_identity

SIMILARITIES = ("dot", "cosine", "l1")


# ---------------------------------------------------------------- the losses
def masked_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not `ignore_index` (no shifting: logits[b, t] is
    scored against labels[b, t])."""
    mask = labels != ignore_index
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask])


def logit_kd_loss(student_logits, teacher_logits, labels, *, alpha, temperature, ignore_index=-100):
    """alpha * CE(labels, z_S) + (1 - alpha) * T^2 * KL(softmax(z_T / T) || softmax(z_S / T)).

    No shifting inside: logits[b, t] is scored against labels[b, t] (the caller aligns them). CE and KL are each
    averaged over the positions whose label is not `ignore_index`; masked positions contribute nothing. When the
    vocabulary sizes differ (7B 152,064 rows vs 3B 151,936) both are sliced to the smaller size, never broadcast:
    the extra rows are padding no token of the tokenizer (151,665) reaches. T^2 keeps the KL's gradient on the
    CE's scale as T grows (Hinton et al.)."""
    v = min(student_logits.size(-1), teacher_logits.size(-1))
    mask = labels != ignore_index
    s, t = student_logits[..., :v][mask].float(), teacher_logits[..., :v][mask].float()
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    ce = F.cross_entropy(s, labels[mask])
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="none").sum(-1).mean()
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl


def _flat_maps(attn: torch.Tensor, query_mask) -> torch.Tensor:
    """[B, H, Q, K] -> [B, H, Q*K], rows outside `query_mask` ([B, Q] bool) zeroed."""
    if query_mask is not None:
        attn = attn * query_mask[:, None, :, None].to(attn.dtype)
    return attn.flatten(2).float()


def head_weights(teacher_attn, student_attn, *, similarity, query_mask=None):
    """[B, H_T, H_S]: for each teacher head i, w_ij = softmax_j(sim(t_i, s_j)), t_i and s_j one example's attention
    maps ([B, H, Q, K] probability rows) flattened over Q x K.

    similarity "dot": t_i . s_j (the formula as written: large maps give near one-hot weights);
    "cosine": t_i . s_j / (|t_i|_2 |s_j|_2) (the MHAD paper: in [0, 1] for probabilities, near-uniform weights);
    "l1": each flattened map divided by its L1 norm, then the dot product (the study's code).
    With `query_mask` ([B, Q] bool), rows outside the mask are zeroed before the similarity."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    t, s = _flat_maps(teacher_attn, query_mask), _flat_maps(student_attn, query_mask)
    if similarity == "cosine":
        t, s = F.normalize(t, dim=-1), F.normalize(s, dim=-1)
    elif similarity == "l1":
        t, s = F.normalize(t, p=1, dim=-1), F.normalize(s, p=1, dim=-1)
    return torch.softmax(t @ s.transpose(1, 2), dim=-1)


def attention_kd_loss(teacher_attn, student_attn, *, similarity, query_mask=None):
    """sum_i KL(t_i || sum_j w_ij s_j): each teacher head's map against the head-weighted mixture of the student's,
    the KL taken per query row over keys, summed over teacher heads, averaged over the batch and the query rows
    (only rows inside `query_mask` when given). H_T and H_S may differ (28 vs 16 heads for the real pair).

    The weights w come from head_weights on the student maps detached: they choose which student heads imitate
    each teacher head, and the student lowers the loss by matching the maps, not by reshuffling the weights."""
    w = head_weights(teacher_attn, student_attn.detach(), similarity=similarity, query_mask=query_mask)
    t = teacher_attn.float()
    mix = torch.einsum("bij,bjqk->biqk", w, student_attn.float())
    kl = (torch.xlogy(t, t) - t * torch.log(mix.clamp_min(1e-12))).sum(-1).sum(1)   # [B, Q], 0 log 0 = 0
    if query_mask is None:
        return kl.mean()
    m = query_mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def layer_map(n_student, n_teacher):
    """Student layer l -> teacher layer round((n_teacher - 1) / (n_student - 1) * l), rounding halves up.
    The real pair (3B: 36 layers, 7B: 28) maps several student layers onto one teacher layer; so does the tiny
    pair (4 -> 3: [0, 1, 1, 2])."""
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be positive, got {n_student}, {n_teacher}")
    if n_student == 1:
        return [0]
    # integer arithmetic: in floating point an exact half (23 -> 16, l = 11: 7.5) can land on 7.4999... and go down
    return [(2 * (n_teacher - 1) * l + (n_student - 1)) // (2 * (n_student - 1)) for l in range(n_student)]


def layer_groups(n_student: int, n_teacher: int, pairing: str = "concat") -> list[tuple[int, list[int]]]:
    """[(teacher layer, [student layers])]: with "concat" the student layers that map to one teacher layer form one
    group whose heads are concatenated (as the study did); with "pairs" each student layer is its own pair."""
    mapping = layer_map(n_student, n_teacher)
    if pairing == "pairs":
        return [(t, [s]) for s, t in enumerate(mapping)]
    if pairing != "concat":
        raise ValueError(f"pairing must be 'concat' or 'pairs', got {pairing!r}")
    groups: dict[int, list[int]] = {}
    for s, t in enumerate(mapping):
        groups.setdefault(t, []).append(s)
    return sorted(groups.items())


def stacked_heads(maps: dict[int, torch.Tensor], layers: list[int]) -> torch.Tensor:
    """The student maps of `layers` ([B, H, Q, K] each) concatenated along heads: [B, H * len(layers), Q, K]."""
    return torch.cat([maps[l] for l in layers], dim=1)


def grouped_attention_kd(teacher_maps: dict, student_maps: dict, groups, *, similarity, query_mask=None):
    """AttnKD over the layer groups, averaged over groups (so beta does not scale with depth)."""
    losses = [attention_kd_loss(teacher_maps[t], stacked_heads(student_maps, s), similarity=similarity,
                                query_mask=query_mask) for t, s in groups]
    return torch.stack(losses).mean()


def weight_entropy(weights: torch.Tensor) -> float:
    """Mean entropy (nats) of head-weight rows: 0 = one-hot, log(H_S) = uniform."""
    w = weights.float()
    return float(-(torch.xlogy(w, w)).sum(-1).mean())


# ---------------------------------------------------------------- attention maps, answer rows only
def answer_rows(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, A], mask [B, A]): the query positions t whose next token labels[b, t + 1] is an answer token
    (the rows that produce the answer), padded to the batch's longest answer A; mask marks the real rows."""
    nxt = torch.zeros_like(labels, dtype=torch.bool)
    nxt[:, :-1] = labels[:, 1:] != ignore_index
    n = int(nxt.sum(1).max()) if nxt.any() else 0
    order = torch.sort(nxt.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :max(n, 1)]
    mask = torch.gather(nxt, 1, order)
    return order, mask


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers of a Qwen2.5-VL model, bare or inside a peft wrapper."""
    for name, module in model.named_modules():
        if name.endswith("language_model.layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__} has no language_model.layers: not a Qwen2.5-VL model?")


class _Rows(torch.autograd.Function):
    """probs.gather(2, idx) that keeps the index on ctx instead of saving tensors for backward: under non-reentrant
    gradient checkpointing the recomputed forward (capture closed) must save exactly what the first one saved."""

    @staticmethod
    def forward(ctx, probs, idx):
        ctx.idx, ctx.shape = idx, probs.shape
        return probs.gather(2, idx)

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.shape).scatter_add_(2, ctx.idx, grad), None


class AttentionCapture:
    """Forward hooks on chosen decoder layers' self-attention that keep each layer's attention probabilities for the
    answer rows only ([B, H, A, K]), so the stored maps cost layers x heads x A x L, not layers x heads x L^2.
    Under no_grad (the teacher) the full L x L map is freed as soon as the layer returns. Hooks record only while
    the capture is open (`with cap.recording(rows):`), so recomputation under gradient checkpointing adds nothing.
    Needs attn_implementation="eager" (fused kernels never materialise the maps)."""

    def __init__(self, model, layers: list[int]):
        mods = decoder_layers(model)
        self.maps: dict[int, torch.Tensor] = {}
        self.rows = None
        self.handles = [mods[i].self_attn.register_forward_hook(self._hook(i)) for i in sorted(set(layers))]

    def _hook(self, i: int):
        def hook(module, args, output):
            if self.rows is None:
                return
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise RuntimeError("attention KD needs attention maps: load the model with attn_implementation="
                                   "'eager' (sdpa / flash attention never return them)")
            b, h, _, k = probs.shape
            idx = self.rows[:, None, :, None].expand(b, h, self.rows.size(1), k).to(probs.device)
            self.maps[i] = _Rows.apply(probs, idx)
        return hook

    def recording(self, rows: torch.Tensor):
        cap = self

        class _Open:
            def __enter__(self):
                cap.maps, cap.rows = {}, rows
                return cap.maps

            def __exit__(self, *exc):
                cap.rows = None
        return _Open()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- one training step's loss
@dataclass(frozen=True)
class LossWeights:
    """loss = ce * CE + logit * LogitKD(alpha, T) + attn * AttnKD(similarity)."""

    ce: float = 0.0
    logit: float = 0.0
    attn: float = 0.0
    alpha: float = 0.5
    temperature: float = 1.5
    similarity: str = "l1"

    @property
    def uses_teacher(self) -> bool:
        return bool(self.logit or self.attn)


def _recording(cap: AttentionCapture | None, rows):
    return cap.recording(rows) if cap is not None else contextlib.nullcontext({})


def distill_loss(student, teacher, inputs: dict, labels, w: LossWeights, groups=(), caps=(None, None)):
    """(loss, {part: value, "logits": student logits}) for one batch. The teacher runs first, in no_grad, keeping
    only its answer-row maps; logits are aligned here (position t scores label t + 1), never inside the losses."""
    rows, row_mask = answer_rows(labels)
    t_logits, t_maps = None, {}
    if w.uses_teacher:
        with torch.no_grad(), _recording(caps[0] if w.attn else None, rows) as t_maps:
            t_logits = teacher(**inputs).logits[:, :-1]
    with _recording(caps[1] if w.attn else None, rows) as s_maps:
        s_logits = student(**inputs).logits
    z, y = s_logits[:, :-1], labels[:, 1:]
    parts = {}
    if w.ce:
        parts["ce"] = masked_ce(z, y)
    if w.logit:
        parts["logit_kd"] = logit_kd_loss(z, t_logits, y, alpha=w.alpha, temperature=w.temperature)
    if w.attn:
        parts["attn_kd"] = grouped_attention_kd(t_maps, s_maps, groups, similarity=w.similarity, query_mask=row_mask)
    weight = {"ce": w.ce, "logit_kd": w.logit, "attn_kd": w.attn}
    loss = sum(weight[k] * v for k, v in parts.items())
    return loss, {**parts, "logits": s_logits}


class DistillTrainer(Trainer):
    """transformers' Trainer with the distillation loss: the frozen teacher rides along (eval mode, no_grad); its
    loss parts (ce, logit_kd, attn_kd) are logged beside the total to TensorBoard."""

    def __init__(self, *args, teacher=None, weights: LossWeights, groups=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.weights, self.groups = teacher, weights, list(groups)
        self.model_accepts_loss_kwargs = False   # a per-batch mean: the Trainer scales it for accumulation
        self.caps, self._parts = (None, None), {}
        if weights.attn:
            self.caps = (AttentionCapture(teacher, [t for t, _ in self.groups]),
                         AttentionCapture(self.model, [s for _, ss in self.groups for s in ss]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        loss, parts = distill_loss(model, self.teacher, inputs, labels, self.weights, self.groups, self.caps)
        for k, v in parts.items():
            if k != "logits" and model.training:
                self._parts.setdefault(k, []).append(float(v.detach()))
        return (loss, {"logits": parts["logits"]}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._parts:
            logs.update({f"loss_{k}": sum(v) / len(v) for k, v in self._parts.items()})
            self._parts = {}
        super().log(logs, *args, **kwargs)

    def remove_captures(self) -> None:
        for cap in self.caps:
            if cap is not None:
                cap.remove()


# ---------------------------------------------------------------- the stage: arms, teacher, data
STAGE, SFT_STAGE, DATA_STAGE = "04_distill", "02_sft", "01_data"


@dataclass(frozen=True)
class StudentArm:
    """One student run: the loss and the setting (full rows, scarce rows, or the extra-budget student)."""

    loss: str              # "sft" | "logit_kd" | "attn_kd" | "combined"
    setting: str = "full"  # "full" | "scarce" | "extra"

    @property
    def name(self) -> str:
        return self.loss if self.setting == "full" else f"{self.loss}_{self.setting}"


def parse_arm(text: str) -> StudentArm:
    """"combined/scarce" -> StudentArm("combined", "scarce")."""
    from spatialstudy.configs import distill_arm_parts

    return StudentArm(*distill_arm_parts(text))


def loss_weights(arm: StudentArm, cfg) -> LossWeights:
    """The arm's loss: sft = CE; logit_kd = LogitKD; attn_kd = beta AttnKD + alpha CE; combined = beta AttnKD +
    gamma LogitKD (the study's)."""
    parts = {"sft": {"ce": 1.0}, "logit_kd": {"logit": 1.0}, "attn_kd": {"attn": cfg.beta, "ce": cfg.alpha},
             "combined": {"attn": cfg.beta, "logit": cfg.gamma}}[arm.loss]
    return LossWeights(**parts, alpha=cfg.alpha, temperature=cfg.temperature, similarity=cfg.similarity)


def sft_arm_dir(profile: str, arm: str) -> Path:
    """runs/<profile>/02_sft/<arm>, which must hold a trained adapter."""
    path = runs.require_run(profile, SFT_STAGE) / arm
    if not (path / "adapter" / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} has no adapter: add '{arm.replace('_', '/', 1)}' to the arms of "
                                f"params/{profile}/{SFT_STAGE}.yaml and re-run {SFT_STAGE}")
    return path


def load_sft_model(profile: str, arm: str, attn_implementation: str | None = None):
    """(model, processor, identity) of a 02_sft arm: its base as 02_sft loaded it (same quantisation) plus its
    adapter, frozen; identity = the arm's hash (a retrained teacher retrains every student)."""
    from types import SimpleNamespace

    from spatialstudy.models.lora import load_adapted

    path = sft_arm_dir(profile, arm)
    info, sft_cfg = runs.read_json(path / "arm.json"), runs.read_json(path.parent / "config.json")
    quant = SimpleNamespace(quantize=sft_cfg.get("quantize", False), quantize_vision=sft_cfg.get("quantize_vision"))
    model, processor = load_adapted(info["base"], path / "adapter", quant, attn_implementation)   # merged, frozen
    return model, processor, info["hash"]


def student_checkpoint(arm: StudentArm, cfg, profile: str) -> str:
    """Every arm starts from the student base, except sft/extra: a student pretrained on the teacher's
    pretraining budget (its steps, batch and pool: the teacher's extra budget spent on hard labels), for tiny pairs."""
    from spatialstudy.models import bases, qwen
    from spatialstudy.models.lora import base_checkpoint

    if arm.setting != "extra":
        return base_checkpoint(cfg.student, profile)
    if not (qwen.parse_tiny(cfg.student) and qwen.parse_tiny(cfg.teacher)):
        raise ValueError("sft/extra needs the tiny pair (their pretraining budgets are ours); drop it for real models")
    return str(bases.tiny_checkpoint(cfg.student, profile, budget_of=cfg.teacher))


def arm_rows(arm: StudentArm, cfg, rows: list) -> list:
    """The arm's training rows: all, or the first `scarce_fraction` of them (the rows are i.i.d. draws)."""
    return rows[:max(1, round(len(rows) * cfg.scarce_fraction))] if arm.setting == "scarce" else rows


def training_data(arm: StudentArm, cfg, rows: tuple):
    from spatialstudy.models.episodes import episodes

    layout = cfg.episode_layout()
    train, _ = episodes(arm_rows(arm, cfg, rows[0]), cfg.target, seed=cfg.seed, **layout)
    val, _ = episodes(rows[1], cfg.target, seed=cfg.seed + 1, **layout)
    return train, val


def check_same_inputs(student_proc, teacher_proc, episode) -> None:
    """Attention and logit KD compare position by position: both processors must turn an episode into the same
    tokens (same tokenizer, same image patches)."""
    from spatialstudy.models.chat import collate

    a, b = collate([episode], student_proc)["input_ids"], collate([episode], teacher_proc)["input_ids"]
    if a.shape != b.shape or not torch.equal(a, b):
        raise ValueError("teacher and student tokenise the same episode differently (tokenizer or image pixel "
                         "budget differ): KD needs aligned positions")


# ---------------------------------------------------------------- training one arm
def arm_identity(arm: StudentArm, cfg, base: str, teacher: str, n_rows: tuple) -> dict:
    """Everything that changes an arm's adapter: a checkpoint of another identity is never resumed."""
    skip = {"profile", "arms", "best", "eval_batch_size", "max_new_tokens", "n_eval", "n_dev", "logging_steps",
            "eval_steps", "save_steps", "student", "teacher", "student_arm"}
    train = training_identity(cfg, skip)
    return {"arm": asdict(arm), "base": base, "teacher": teacher if loss_weights(arm, cfg).uses_teacher else None,
            "rows": list(n_rows), "train": train}


def arm_path(arm: StudentArm, cfg, profile: str, out: Path, rows: tuple, teacher) -> Path:
    """The arm's dir, emptied first when it holds a run of other settings, data or teacher."""
    n_rows = (len(arm_rows(arm, cfg, rows[0])), len(rows[1]))
    identity = arm_identity(arm, cfg, student_checkpoint(arm, cfg, profile), teacher[2], n_rows)
    return runs.keyed_dir(out / arm.name, identity, "distill")


def train_in_parallel(arms: list, cfg, profile: str, out: Path, rows: tuple, teacher) -> bool:
    """Under several processes (`torchrun` / `accelerate launch`): every process trains every arm first (the
    Trainer's data parallelism, the frozen teacher on each); then the main process goes on alone (gate, evaluation,
    run dir), finding each arm's adapter, and the others stop (True for them). One process: False."""
    from spatialstudy.models.lora import processes

    state = processes()
    if state.num_processes == 1:
        return False
    for arm in arms:
        with state.main_process_first():   # one process pretrains a missing base or empties a stale dir
            arm_path(arm, cfg, profile, out, rows, teacher)
        trained_arm(arm, cfg, profile, out, rows, teacher)
    return not state.is_main_process


def resize_vocab(model, teacher) -> None:
    """The study's alternative to slicing: the student's embeddings resized to the teacher's vocabulary rows."""
    model.resize_token_embeddings(teacher.get_output_embeddings().weight.shape[0])


def fit_arm(model, processor, teacher, arm: StudentArm, cfg, path: Path, data: tuple, groups) -> dict:
    """Train with DistillTrainer (resuming from the arm's last checkpoint), save the adapter, return the log."""
    from spatialstudy.models.chat import collate
    from spatialstudy.models.lora import train_and_save, training_args

    weights = loss_weights(arm, cfg)
    trainer = DistillTrainer(model=model, args=training_args(cfg, path, cfg.lr), train_dataset=data[0],
                             eval_dataset=data[1], data_collator=lambda eps: collate(eps, processor),
                             teacher=teacher, weights=weights, groups=groups)
    with eager_attention(teacher, weights.attn > 0):
        log = train_and_save(trainer, model, path, "distill", rows=len(data[0]))
    trainer.remove_captures()   # the student is evaluated next: no maps kept
    return log


@contextlib.contextmanager
def eager_attention(model, needed: bool = True):
    """The model on eager attention inside the block (the only kernel that returns attention maps), back on its
    own kernel after it: a 7B teacher on eager everywhere would cost time and memory where no map is read."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation  # noqa: SLF001 - transformers keeps the choice there
    if needed and before != "eager":
        base.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if base.config._attn_implementation != before:  # noqa: SLF001
            base.set_attn_implementation(before)


def trained_arm(arm: StudentArm, cfg, profile: str, out: Path, rows: tuple, teacher):
    """(peft student, processor, log) of one arm: trained now, or loaded when its adapter and log exist under the
    same identity. `teacher` = (model, processor, identity, layer groups)."""
    from spatialstudy.models.lora import arm_trained, load_base, make_trainable
    from spatialstudy.models.qwen import load_adapter

    attn = "eager" if loss_weights(arm, cfg).attn else None
    model, processor, quantized = load_base(cfg.student, profile, cfg, attn, path=student_checkpoint(arm, cfg, profile))
    if cfg.vocab == "resize_student":
        resize_vocab(model, teacher[0])
    path = arm_path(arm, cfg, profile, out, rows, teacher)
    if arm_trained(path):
        return load_adapter(model, path / "adapter"), processor, runs.read_json(path / "log.json")
    model = make_trainable(model, cfg, quantized)
    log = fit_arm(model, processor, teacher[0], arm, cfg, path, training_data(arm, cfg, rows), teacher[3])
    return model, processor, {**log, "quantized": quantized}


# ---------------------------------------------------------------- the teacher gate (a dev slice, never the test items)
def dev_records(profile: str, cfg, out: Path, eval_keys: set) -> list:
    """The gate's dev slice: when 01_data generated the benchmark, the same generator under a seed derived from
    the user seed by the role name "dev" (its streams share no scene with the benchmark's); with a local OmniSpatial
    copy, items outside the evaluation subset (stratified), or none when the subset is all of it."""
    from spatialstudy.data import load_omnispatial
    from spatialstudy.data.streams import role_seed
    from spatialstudy.data.writers import write_omnispatial
    from spatialstudy.evaluation.eval import eval_records, eval_subset

    data = runs.read_json(runs.require_run(profile, DATA_STAGE) / "config.json")
    if data.get("omnispatial_path"):
        rest = [r for r in eval_records(profile) if r.key not in eval_keys]
        return eval_subset(rest, cfg.n_dev, cfg.seed)
    key = {"n": cfg.n_dev, **{k: data[k] for k in ("seed", "image_size", "palette")}}
    path = out / "dev"
    if not (path / "data.json").exists() or runs.read_json(out / "dev.json") != key:
        write_omnispatial(path, cfg.n_dev, role_seed(data["seed"], "dev"), data["image_size"], data["palette"])
        runs.write_json(out / "dev.json", key)
    return load_omnispatial(path)


def eval_settings(cfg, name: str):
    from spatialstudy.evaluation.eval import EvalSettings

    return EvalSettings(name=name, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                        prompt_style="manual_cot", restart_stale=True)


def detectable(dev_diff: dict, n_dev: int, n_eval: int) -> float:
    """The smallest paired difference the evaluation subset detects (alpha 0.05, power 0.8): the dev slice's
    95% CI half-width scaled to n_eval items, times (1.96 + 0.84) / 1.96."""
    half = (dev_diff["ci95"][1] - dev_diff["ci95"][0]) / 2 * math.sqrt(n_dev / max(1, n_eval))
    return half * (1.96 + 0.84) / 1.96


def teacher_gate(teacher, profile: str, cfg, dev: list, out: Path, n_eval: int) -> dict:
    """The fine-tuned teacher minus the fine-tuned student (02_sft) on the dev slice, paired; `testable` when the
    gap is positive and reaches what the evaluation subset can detect."""
    import gc

    from spatialstudy.evaluation.compare import paired_by_partition
    from spatialstudy.evaluation.eval import evaluate

    if not dev:
        return {"testable": None, "why": "no dev items outside the evaluation subset"}
    t = evaluate(teacher[0], teacher[1], dev, out, eval_settings(cfg, "gate_teacher"))
    student, proc, _ = load_sft_model(profile, cfg.student_arm)
    s = evaluate(student, proc, dev, out, eval_settings(cfg, "gate_student"))
    del student
    gc.collect()
    diff = paired_by_partition(t, s, dev)
    need = detectable(diff["overall"], len(dev), n_eval)
    return {"n_dev": len(dev), "teacher_arm": cfg.teacher_arm, "student_arm": cfg.student_arm,
            "teacher": t["accuracy_official"], "student": s["accuracy_official"], "paired": diff,
            "detectable": need, "testable": bool(diff["overall"]["diff"] > 0 and diff["overall"]["diff"] >= need)}


# ---------------------------------------------------------------- evaluation of the arms
def model_cost(model, summary: dict) -> dict:
    """Parameters, weight bytes, per-item latency and peak memory of a model as evaluated."""
    from spatialstudy.models.qwen import count_params

    return {"params": count_params(model)["total"], "weight_bytes": int(model.get_memory_footprint()),
            "latency_s": summary["latency_s"]["mean"], "tokens_per_s": summary["cost"]["tokens_per_s"],
            "peak_memory_bytes": summary["cost"].get("peak_memory_bytes"),   # of its evaluation run
            "peak_memory_kind": summary["cost"].get("peak_memory_kind")}


def loss_curves(log: dict) -> dict:
    """{"train": [(step, loss)], "val": [(step, eval_loss)], "<part>": [(step, value)]} from the log history."""
    hist = log.get("log_history", [])
    out = {"train": [(h["step"], h["loss"]) for h in hist if "loss" in h],
           "val": [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]}
    for part in ("ce", "logit_kd", "attn_kd"):
        out[part] = [(h["step"], h[f"loss_{part}"]) for h in hist if f"loss_{part}" in h]
    return out


def _for_generation(model):
    """The student back on the default attention kernel for evaluation (eager was for its maps only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation == "eager":  # noqa: SLF001 - transformers keeps the choice there
        base.set_attn_implementation("sdpa")
    return model


def arm_entry(arm: StudentArm, cfg, profile: str, records: list, out: Path, rows: tuple, teacher) -> dict:
    """Train (or load) one student arm and evaluate it with its blind control."""
    import gc

    from spatialstudy.evaluation.eval import evaluate_with_controls

    model, processor, log = trained_arm(arm, cfg, profile, out, rows, teacher)
    model = _for_generation(model if cfg.quantize else model.merge_and_unload()).eval()   # as deployed
    summary = evaluate_with_controls(model, processor, records, out, eval_settings(cfg, arm.name))
    cost = model_cost(model, summary)
    del model
    gc.collect()
    train = {k: log[k] for k in ("train_s", "steps", "params", "peak_memory", "resumed_from", "rows") if k in log}
    return {"arm": asdict(arm), "loss": asdict(loss_weights(arm, cfg)), "train": train, "eval": summary,
            "cost": cost, "losses": loss_curves(log)}


def teacher_entry(teacher, records: list, out: Path, cfg) -> dict:
    from spatialstudy.evaluation.eval import evaluate_with_controls

    summary = evaluate_with_controls(teacher[0], teacher[1], records, out, eval_settings(cfg, "teacher_sft"))
    return {"eval": summary, "cost": model_cost(teacher[0], summary)}


def student_base_entry(profile: str, cfg) -> dict:
    """The student base as the baseline stage evaluated it (read, not recomputed); its cost from the checkpoint."""
    from spatialstudy.evaluation.compare import baseline_summary

    summary = baseline_summary(profile, "student", cfg.student)
    return {"eval": summary, "cost": {"params": summary["cost"]["params_total"], "latency_s":
                                      summary["latency_s"]["mean"], "tokens_per_s": summary["cost"]["tokens_per_s"]}}


# ---------------------------------------------------------------- head matching (what `similarity` does)
def head_matching(teacher, student, processor, episodes: list, groups) -> dict:
    """Teacher-head x student-head weights on one batch of training episodes (answer rows), averaged over the
    batch, for each similarity; with the mean entropy of the rows (0 = one-hot, log H_S = uniform)."""
    from spatialstudy.models.chat import collate

    batch = collate(episodes, processor)
    labels = batch.pop("labels")
    rows, mask = answer_rows(labels)
    caps = (AttentionCapture(teacher, [t for t, _ in groups]),
            AttentionCapture(student, [s for _, ss in groups for s in ss]))
    with torch.no_grad(), caps[0].recording(rows) as t_maps:
        teacher(**batch)
    with torch.no_grad(), caps[1].recording(rows) as s_maps:
        student(**batch)
    for cap in caps:
        cap.remove()
    out = {}
    for sim in SIMILARITIES:
        ws = [head_weights(t_maps[t], stacked_heads(s_maps, ss), similarity=sim, query_mask=mask) for t, ss in groups]
        out[sim] = {"groups": [{"teacher_layer": t, "student_layers": ss, "weights": w.mean(0).tolist()}
                               for (t, ss), w in zip(groups, ws)],
                    "entropy": sum(weight_entropy(w) for w in ws) / len(ws),
                    "uniform_entropy": sum(math.log(w.size(-1)) for w in ws) / len(ws)}
    return out


def head_matching_entry(teacher, cfg, profile: str, rows: list, groups) -> dict:
    from spatialstudy.models.episodes import episodes
    from spatialstudy.models.lora import load_base

    student, processor, _ = load_base(cfg.student, profile, cfg, "eager")
    layout = cfg.episode_layout()
    eps, _ = episodes(rows[:8], cfg.target, seed=cfg.seed, **layout)
    with eager_attention(teacher[0]):
        return head_matching(teacher[0], student.eval(), processor, [eps[i] for i in range(len(eps))], groups)


# ---------------------------------------------------------------- comparisons
def comparisons(arms: dict, teacher: dict, base: dict, records: list) -> dict:
    """Paired differences on the same items: every arm minus the SFT student of its setting, minus its own blind
    control and minus the student base; every full-data arm minus the extra-budget student; the teacher minus
    the SFT student and minus each KD arm."""
    from spatialstudy.evaluation.compare import blind_summary, paired_by_partition

    out = {}
    for name, a in arms.items():
        ref = "sft" if a["arm"]["setting"] in ("full", "extra") else f"sft_{a['arm']['setting']}"
        if name != ref and ref in arms:
            out[f"{name} - {ref}"] = paired_by_partition(a["eval"], arms[ref]["eval"], records)
        if a["arm"]["setting"] == "full" and name != "sft" and "sft_extra" in arms:
            out[f"{name} - sft_extra"] = paired_by_partition(a["eval"], arms["sft_extra"]["eval"], records)
        out[f"{name} - its blind"] = paired_by_partition(a["eval"], blind_summary(a["eval"]), records)
        out[f"{name} - student base"] = paired_by_partition(a["eval"], base["eval"], records)
    for name, a in arms.items():
        if a["arm"]["setting"] == "full":
            out[f"teacher - {name}"] = paired_by_partition(teacher["eval"], a["eval"], records)
    return out


def arms_in_order(arms: dict) -> dict:
    """The arms by setting (full, scarce, extra), then loss (sft, logit_kd, attn_kd, combined): metrics.json is
    written with sorted keys, so its own order is alphabetical."""
    from spatialstudy.configs import DISTILL_LOSSES

    settings = ("full", "scarce", "extra")
    return dict(sorted(arms.items(), key=lambda kv: (settings.index(kv[1]["arm"]["setting"]),
                                                     DISTILL_LOSSES.index(kv[1]["arm"]["loss"]))))


def teacher_label(metrics: dict) -> str:
    """"teacher (teacher_mcq)": which 02_sft arm (or "base") the teacher is."""
    return f"teacher ({metrics.get('teacher_arm', 'SFT')})"


def models_in_order(metrics: dict) -> dict:
    """{label: evaluation summary}: the student base, each student arm, the fine-tuned teacher."""
    return {"student base": metrics["student_base"]["eval"],
            **{name: a["eval"] for name, a in arms_in_order(metrics["arms"]).items()},
            teacher_label(metrics): metrics["teacher"]["eval"]}


# ---------------------------------------------------------------- figures and the summary table
def accuracy_figure(metrics: dict):
    """Accuracy by partition for the student base, every student arm and the teacher, each beside its blind."""
    from spatialstudy import plotting
    from spatialstudy.evaluation.compare import blind_summary, ci_groups

    series = {}
    for label, summary in models_in_order(metrics).items():
        series[label] = ci_groups(summary)
        series[f"{label} blind"] = ci_groups(blind_summary(summary))
    return plotting.accuracy_bars(series, paired=True, title="Distillation arms on the benchmark (official scorer)")


def _entries(metrics: dict) -> dict:
    return {"student base": metrics["student_base"], **arms_in_order(metrics["arms"]),
            teacher_label(metrics): metrics["teacher"]}


def cost_figure(metrics: dict):
    """Overall accuracy (95% CI) against parameters and against per-item latency: what the teacher's extra
    accuracy costs, and where each distilled student lands."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting
    from spatialstudy.evaluation.compare import ci_groups

    plotting.setup_style()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, e in _entries(metrics).items():
        acc, lo, hi = next(iter(ci_groups(e["eval"]).values()))
        for ax, x in zip(axes, (e["cost"]["params"] / 1e6, e["cost"]["latency_s"] * 1e3)):
            ax.errorbar([x], [acc], yerr=[[acc - lo], [hi - acc]], fmt="o", capsize=2, label=label)
    axes[0].set(xlabel="parameters (millions)", ylabel="overall accuracy (%)", title="accuracy vs size")
    axes[1].set(xlabel="latency per item (ms, batched)", title="accuracy vs latency")
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def head_figure(matching: dict):
    """Head weights (teacher heads x concatenated student heads) of the widest layer group, one panel per
    similarity, each on its own colour range (near-uniform weights would be one flat colour on a 0-1 scale); the
    title gives the mean row entropy against the uniform one and the largest weight against 1 / H_S."""
    import matplotlib.pyplot as plt
    import numpy as np

    from spatialstudy import plotting

    plotting.setup_style()
    fig, axes = plt.subplots(1, len(matching), figsize=(3.6 * len(matching), 3.2), squeeze=False)
    for ax, (sim, m) in zip(axes.flat, matching.items()):
        g = max(m["groups"], key=lambda g: len(g["student_layers"]))
        w = np.array(g["weights"])
        im = ax.imshow(w, cmap="viridis", aspect="auto")
        ax.grid(False)
        ax.set(title=f"{sim}: H {m['entropy']:.3f} / {m['uniform_entropy']:.3f}, max {w.max():.2f} "
                     f"(1/{w.shape[1]} = {1 / w.shape[1]:.2f})",
               xlabel=f"student heads (layers {g['student_layers']})",
               ylabel=f"teacher heads (layer {g['teacher_layer']})")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def loss_figure(metrics: dict):
    """Each arm's training loss and its parts (CE, logit KD, attention KD) and the validation loss."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.setup_style()
    arms = arms_in_order(metrics["arms"])
    fig, axes = plt.subplots(1, len(arms), figsize=(3.0 * len(arms), 2.8), squeeze=False)
    for ax, (name, a) in zip(axes.flat, arms.items()):
        for part, pts in a["losses"].items():
            if pts:
                ax.plot(*zip(*pts), "o-" if part == "val" else "-", label=part, ms=3)
        ax.set(title=name, xlabel="step", ylabel="loss")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def save_figures(metrics: dict, profile: str) -> None:
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.savefig(accuracy_figure(metrics), "distill_accuracy", profile)
    plotting.savefig(cost_figure(metrics), "distill_cost", profile)
    plotting.savefig(head_figure(metrics["head_matching"]), "distill_heads", profile)
    plotting.savefig(loss_figure(metrics), "distill_loss", profile)
    plt.close("all")


def gate_line(gate: dict) -> str:
    from spatialstudy.evaluation.compare import paired_cell

    if gate.get("testable") is None:
        return f"teacher gate: not run ({gate['why']})"
    verdict = ("testable" if gate["testable"] else "NOT testable at this scale: the teacher's lead is below what "
               "the evaluation subset can detect, so the KD arms' differences are not read as a result")
    pair = f"{gate.get('teacher_arm', 'teacher')} - {gate.get('student_arm', 'student')}"
    return (f"teacher gate (dev slice, n {gate['n_dev']}): {pair} "
            f"{paired_cell(gate['paired']['overall'])}; detectable on the evaluation subset >= "
            f"{gate['detectable']:.1f} points: {verdict}")


def summary_table(metrics: dict) -> str:
    """Plain text: the gate, accuracy by model and partition with blind controls, paired differences, cost."""
    from spatialstudy.evaluation.compare import accuracy_table, paired_table

    cost = [f"  {label:<22} {e['cost']['params']:>10,} params  {e['cost']['latency_s'] * 1e3:6.1f} ms/item"
            + (f"  trained {e['train']['steps']} steps on {e['train'].get('rows')} rows in {e['train']['train_s']} s"
               if "train" in e else "") for label, e in _entries(metrics).items()]
    return "\n".join([gate_line(metrics["gate"]), f"best KD (fixed in advance): {metrics['best']}", ""] +
                     accuracy_table(models_in_order(metrics)) + [""] + paired_table(metrics["paired"]) +
                     ["", "cost:"] + cost)


# ---------------------------------------------------------------- the stage
def load_teacher(profile: str, cfg) -> tuple:
    """(model, processor, identity, layer groups): the fine-tuned teacher, or the teacher base when teacher_arm is
    "base", on the default attention kernel (`eager_attention` switches it only where its maps are read: attention
    KD and the head-matching figure), and the student-to-teacher layer groups."""
    from spatialstudy.models.lora import base_checkpoint, load_base

    if cfg.teacher_arm == "base":
        model, processor, _ = load_base(cfg.teacher, profile, cfg)
        model.eval().requires_grad_(False)
        identity = base_checkpoint(cfg.teacher, profile)
    else:
        model, processor, identity = load_sft_model(profile, cfg.teacher_arm)
    n_student = runs.read_json(Path(base_checkpoint(cfg.student, profile)) / "config.json")
    n_student = n_student.get("text_config", n_student)["num_hidden_layers"]
    groups = layer_groups(n_student, len(decoder_layers(model)), cfg.layer_pairing)
    return model, processor, identity, groups


def student_processor(cfg, profile: str):
    from spatialstudy.models.lora import base_checkpoint
    from spatialstudy.models.qwen import load_processor

    return load_processor(Path(base_checkpoint(cfg.student, profile)))


def run_distill(profile: str, cfg) -> dict:
    """The teacher gate, every student arm (trained, evaluated with its blind control), the teacher on the same
    items, paired differences, cost and head matching; writes the run dir and the figures. Under `torchrun` /
    `accelerate launch` the arms train data-parallel and the main process alone does the rest; the others
    return {}."""
    from spatialstudy.evaluation.eval import eval_records, eval_subset
    from spatialstudy.models.episodes import spacethinker_rows

    from spatialstudy.models.lora import processes

    runs.seed_everything(cfg.seed)
    out = runs.run_dir(profile, STAGE)
    with processes().main_process_first():   # under several processes the main one builds what is missing first
        records = eval_subset(eval_records(profile), cfg.n_eval or None, cfg.seed)
        rows = spacethinker_rows(profile, cfg.spacethinker_path, cfg.n_train, cfg.n_val)
        teacher = load_teacher(profile, cfg)
    check_same_inputs(student_processor(cfg, profile), teacher[1], training_data(StudentArm("sft"), cfg, rows)[0][0])
    if train_in_parallel(list(map(parse_arm, cfg.arms)), cfg, profile, out, rows, teacher):
        return {}
    gate = teacher_gate(teacher, profile, cfg, dev_records(profile, cfg, out, {r.key for r in records}), out,
                        len(records))
    print(gate_line(gate))
    arms = {a.name: arm_entry(a, cfg, profile, records, out, rows, teacher) for a in map(parse_arm, cfg.arms)}
    metrics = {"n_eval": len(records), "n_train": len(rows[0]), "n_val": len(rows[1]), "gate": gate,
               "best": parse_arm(cfg.best).name, "layer_groups": teacher[3], "arms": arms,
               "teacher_arm": cfg.teacher_arm,
               "teacher": teacher_entry(teacher, records, out, cfg), "student_base": student_base_entry(profile, cfg),
               "head_matching": head_matching_entry(teacher, cfg, profile, rows[0], teacher[3])}
    metrics["sft_gap"] = runs.read_json(runs.require_run(profile, SFT_STAGE) / "metrics.json")["paired"].get(
        f"{cfg.teacher_arm} - {cfg.student_arm}")
    metrics["paired"] = comparisons(arms, metrics["teacher"], metrics["student_base"], records)
    runs.save_run(profile, STAGE, asdict(cfg), metrics)
    save_figures(metrics, profile)
    return metrics


def main(profile: str, params: dict) -> dict:
    """Entry point with params as papermill passes them (for scripts and benchmarks)."""
    from spatialstudy.configs import DistillConfig

    return run_distill(profile, DistillConfig.for_profile(profile, params, STAGE))
