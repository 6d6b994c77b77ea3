"""One validated config per notebook, built from its papermill parameters cell (typos and wrong types fail loudly).

Kept free of heavy imports so the runner can check params/<profile>/*.yaml before starting a kernel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from spatialstudy.runs import StageConfig


@dataclass
class DataConfig(StageConfig):
    """01_data: build (procedural) or load (real, local) the SpaceThinker- and OmniSpatial-format sets."""

    spacethinker_path: str = ""   # local remyxai/SpaceThinker copy; "" = the procedural embedded default
    omnispatial_path: str = ""    # local qizekun/OmniSpatial test folder or zip; "" = procedural
    n_train: int = 200            # procedural SpaceThinker-format train rows
    n_test: int = 40              # procedural SpaceThinker-format test rows
    n_omni: int = 40              # procedural OmniSpatial-format test items
    image_size: int = 112         # procedural image side in pixels
    palette: str = "distinct"     # "distinct" (brightness differs) | "equal_brightness"

    def __post_init__(self):
        super().__post_init__()
        if self.palette not in ("distinct", "equal_brightness"):
            raise ValueError(f"palette must be 'distinct' or 'equal_brightness', got {self.palette!r}")
        for name in ("n_train", "n_test", "n_omni", "image_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class BaselineConfig(StageConfig):
    """Parameters of the baseline stage (params/<profile>/baseline.yaml)."""

    n_eval: int = 40                 # size of the fixed evaluation subset; 0 = every test item
    eval_seed: int = 0               # seed of the stratified subset draw
    max_new_tokens: int = 32         # tiny bases answer in a few tokens; the official script allows 8192
    batch_size: int = 16
    prompt_style: str = "manual_cot"
    omnispatial_path: str = ""       # "" = the 01_data stage's procedural set; else a local OmniSpatial copy
    real_student: str = ""           # local Qwen2.5-VL-3B(-Instruct) checkpoint dir or cached hub name; "" = skip
    real_teacher: str = ""           # local Qwen2.5-VL-7B(-Instruct) likewise
    real_max_new_tokens: int = 2048  # real models reason before "Answer: X"; VLMEvalKit's cap

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_style not in ("manual_cot", "direct"):
            raise ValueError(f"prompt_style must be 'manual_cot' or 'direct', got {self.prompt_style!r}")
        for name in ("max_new_tokens", "batch_size", "real_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


ARM_MODELS, ARM_TARGETS = ("student", "teacher"), ("mcq", "spacethinker", "answer_only")


def arm_parts(text: str) -> tuple[str, str, bool]:
    """"student/mcq/blank" -> ("student", "mcq", True): an SFT arm's base, target format and blank images."""
    parts = str(text).strip().split("/")
    if len(parts) not in (2, 3) or parts[0] not in ARM_MODELS or parts[1] not in ARM_TARGETS or \
            parts[2:] not in ([], ["blank"]):
        raise ValueError(f"arm {text!r}: expected '<student|teacher>/<mcq|spacethinker|answer_only>[/blank]'")
    return parts[0], parts[1], len(parts) == 3


# Training fields added after arms had been trained: an arm's identity holds one only when it is set away from this
# default, so adding a field never retrains the arms cached before it existed.
LATE_FIELDS = {"text_before_image": False, "keep_best": False, "kbit_prep": True}


def training_identity(cfg, skip: set) -> dict:
    """The config fields that change a trained arm: all but `skip`, and the LATE_FIELDS only when set."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in skip and not (k in LATE_FIELDS and v == LATE_FIELDS[k])}


@dataclass
class LoraTrainConfig(StageConfig):
    """What every LoRA-training stage shares (02_sft, 04_distill): the bases, the rows, LoRA / QLoRA and the
    Trainer's settings, and how its models are evaluated."""

    student: str = "tiny-student"    # tiny spec, local checkpoint dir or cached hub name
    teacher: str = "tiny-teacher"
    spacethinker_path: str = ""      # local SpaceThinker copy; "" = what 01_data wrote
    n_train: int = 32                # training rows (0 = all)
    n_val: int = 16                  # validation rows from the test split (0 = all)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_modules: str = "all"        # "all": attention + MLP projections of the language model; "qv": the study's
    quantize: bool = False           # 4-bit NF4 base (QLoRA)
    quantize_vision: bool = False    # also quantise the vision tower (the study did; lm_head always stays whole)
    system_prompt: str = ""          # "" = Qwen's default; full-repro: the study's VL-Thinking prompt
    lr: float = 1e-3
    epochs: float = 1.0
    max_steps: int = 4               # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr_scheduler: str = "cosine"
    warmup_steps: float = 0.05       # < 1: a share of the steps
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    eval_steps: int = 2
    save_steps: int = 2
    eval_batch_size: int = 16
    max_new_tokens: int = 64         # mcq answers (reasoning, then "Answer: X": up to ~60 tokens here)
    n_eval: int = 0                  # benchmark items: a stratified part of the baseline's fixed subset (0 = all of it)
    # the study's training quirks (full-repro sets them; see LATE_FIELDS)
    text_before_image: bool = False  # the training user turn: question, then image (the benchmark puts the image first)
    keep_best: bool = False          # end on the checkpoint with the lowest validation loss (save_steps % eval_steps)
    kbit_prep: bool = True           # peft's prepare_model_for_kbit_training on a 4-bit base (the study skipped it)

    def episode_layout(self) -> dict:
        """How every training (and meaning-scored) episode is laid out: models.episodes' `system` and `text_first`."""
        return {"system": self.system_prompt, "text_first": self.text_before_image}

    def __post_init__(self):
        super().__post_init__()
        if self.keep_best and self.save_steps % self.eval_steps:
            raise ValueError(f"keep_best needs save_steps ({self.save_steps}) a multiple of eval_steps "
                             f"({self.eval_steps}): only saved checkpoints can be kept")
        if self.lora_modules not in ("all", "qv"):
            raise ValueError(f"lora_modules must be 'all' or 'qv', got {self.lora_modules!r}")
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "eval_batch_size", "max_new_tokens",
                     "logging_steps", "eval_steps", "save_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.epochs > 0 and 0 <= self.lora_dropout < 1):
            raise ValueError("lr and epochs must be positive, lora_dropout in [0, 1)")


@dataclass
class SFTConfig(LoraTrainConfig):
    """02_sft: (Q)LoRA fine-tuning arms on SpaceThinker-schema rows, each evaluated with its own blind control."""

    arms: list = dataclasses.field(default_factory=lambda: ["student/mcq", "student/spacethinker",
                                                            "student/mcq/blank", "teacher/mcq"])
    loss_on_prompt: bool = False     # the study trained on the prompt too
    teacher_lr: float = 0.0          # 0 = lr
    spacethinker_max_new_tokens: int = 96

    def __post_init__(self):
        super().__post_init__()
        for arm in self.arms:
            arm_parts(arm)
        if self.spacethinker_max_new_tokens <= 0:
            raise ValueError(f"spacethinker_max_new_tokens must be positive, got {self.spacethinker_max_new_tokens}")


DISTILL_LOSSES = ("sft", "logit_kd", "attn_kd", "combined")
DISTILL_SETTINGS = ("scarce", "extra")


def distill_arm_parts(text: str) -> tuple[str, str]:
    """"combined/scarce" -> ("combined", "scarce"); "sft" -> ("sft", "full")."""
    loss, _, setting = str(text).strip().partition("/")
    if loss not in DISTILL_LOSSES or setting not in ("",) + DISTILL_SETTINGS or (setting == "extra" and loss != "sft"):
        raise ValueError(f"distillation arm {text!r}: expected '<{'|'.join(DISTILL_LOSSES)}>[/scarce]' or "
                         f"'sft/extra' (the hard-label student with the teacher's extra pretraining)")
    return loss, setting or "full"


@dataclass
class DistillConfig(LoraTrainConfig):
    """04_distill: the fine-tuned teacher distilled into the student (logit KD, attention KD, both), every student
    arm with the same data, steps, LoRA and seed, each evaluated with its own blind control."""

    arms: list = dataclasses.field(default_factory=lambda: ["sft", "logit_kd", "attn_kd", "combined",
                                                            "sft/scarce", "combined/scarce", "sft/extra"])
    best: str = "combined"           # the "best KD" of the results report, fixed in advance
    teacher_arm: str = "teacher_mcq"   # the 02_sft arm whose adapter makes the fine-tuned teacher; "base": no SFT
    student_arm: str = "student_mcq"   # the 02_sft arm the teacher gate compares it with
    target: str = "mcq"              # training target format (the teacher's SFT format)
    temperature: float = 1.5         # T of logit KD
    alpha: float = 0.5               # CE share inside logit KD; the CE weight of the attention-KD-only arm
    beta: float = 0.5                # attention KD weight
    gamma: float = 0.5               # logit KD weight in the combined arm
    similarity: str = "l1"           # head matching: "dot" | "cosine" | "l1" (the study's code)
    layer_pairing: str = "concat"    # student layers sharing a teacher layer: "concat" their heads | "pairs"
    vocab: str = "slice"             # vocab sizes differ: "slice" both to the smaller | "resize_student" (the study)
    scarce_fraction: float = 0.1     # the data-scarce setting's share of the training rows
    n_dev: int = 40                  # teacher gate: dev items generated apart from the benchmark (own stream)

    def __post_init__(self):
        super().__post_init__()
        for arm in self.arms:
            distill_arm_parts(arm)
        distill_arm_parts(self.best)
        choices = {"similarity": ("dot", "cosine", "l1"), "layer_pairing": ("concat", "pairs"),
                   "vocab": ("slice", "resize_student"), "target": ARM_TARGETS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (self.temperature > 0 and 0 <= self.alpha <= 1 and self.beta >= 0 and self.gamma >= 0):
            raise ValueError("temperature must be positive, alpha in [0, 1], beta and gamma non-negative")
        if not (0 < self.scarce_fraction <= 1 and self.n_dev > 0):
            raise ValueError("scarce_fraction must be in (0, 1] and n_dev positive")


@dataclass
class ICLConfig(StageConfig):
    """03_icl: retrieval-based in-context learning with the base model, each configuration with its blind control."""

    model: str = "tiny-student"      # tiny spec, local checkpoint dir or cached hub name
    spacethinker_path: str = ""      # local SpaceThinker copy; "" = what 01_data wrote (the demos' pool)
    n_train: int = 0                 # training rows indexed (0 = all)
    ks: list = dataclasses.field(default_factory=lambda: [3, 5])
    formats: list = dataclasses.field(default_factory=lambda: ["naive", "mcq"])
    best: str = "mcq/3"              # the configuration fixed in advance (the study's headline): controls run here
    order: str = "most_similar_last"
    query_options: bool = False      # the retrieval query adds the item's options to its question (study: question)
    index_type: str = "flat"         # "flat" | "ivf" | "hnsw"
    nprobe: int = 8
    max_prompt_tokens: int = 4096    # demos that would overflow are dropped (counted), never a crash
    max_new_tokens: int = 64
    naive_max_new_tokens: int = 96
    batch_size: int = 8
    n_eval: int = 0                  # benchmark items: a stratified part of the baseline's fixed subset (0 = all)
    colour_transforms: list = dataclasses.field(default_factory=lambda: ["grayscale", "hue_permuted"])  # for 05

    def __post_init__(self):
        super().__post_init__()
        if not set(self.colour_transforms) <= {"grayscale", "hue_permuted"}:
            raise ValueError(f"colour_transforms must come from grayscale, hue_permuted; got {self.colour_transforms}")
        fmts = set(self.formats) | {self.best.split("/")[0]}
        if not fmts <= {"naive", "mcq"} or not all(isinstance(k, int) and k > 0 for k in self.ks):
            raise ValueError(f"formats must be 'naive'/'mcq' and ks positive ints, got {self.formats} {self.ks}")
        fmt, _, k = self.best.partition("/")
        if not k.isdigit():
            raise ValueError(f"best must look like 'mcq/3', got {self.best!r}")
        if self.order not in ("most_similar_first", "most_similar_last"):
            raise ValueError(f"order must be most_similar_first or most_similar_last, got {self.order!r}")
        if self.index_type not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index_type must be flat, ivf or hnsw, got {self.index_type!r}")
        for name in ("max_prompt_tokens", "max_new_tokens", "naive_max_new_tokens", "batch_size", "nprobe"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


GRAYSCALE_CONDITIONS = ("original", "grayscale", "hue_permuted", "blind")   # blind: blank images, the control


@dataclass
class GrayscaleConfig(StageConfig):
    """05_grayscale: does colour matter? Every model on original, grayscale and hue-permuted images (and blank ones,
    the blind control), on all questions, the non-colour questions and the three colour item groups; one more SFT
    arm trained with grayscale augmentation (02_sft's recipe, read from its run, so only the images differ)."""

    student: str = "tiny-student"    # the student base, loaded as the baseline stage loads it
    sft_arm: str = "student_mcq"     # the 02_sft arm: the colour-trained model, and the recipe the gray arm repeats
    gray_fraction: float = 0.5       # share of the training images shown in grayscale (rows fixed by the seed)
    n_eval: int = 0                  # benchmark items: a stratified part of the baseline's fixed subset (0 = all of it)
    n_control: int = 40              # equal-brightness positive-control items generated here (0 = no control)
    conditions: list = dataclasses.field(default_factory=lambda: list(GRAYSCALE_CONDITIONS))   # images per model
    max_new_tokens: int = 64
    eval_batch_size: int = 16

    def __post_init__(self):
        super().__post_init__()
        if not {"original", "grayscale"} <= set(self.conditions) <= set(GRAYSCALE_CONDITIONS):
            raise ValueError(f"conditions must include 'original' and 'grayscale' and come from "
                             f"{GRAYSCALE_CONDITIONS}, got {self.conditions}")
        model, _, target = self.sft_arm.partition("_")
        if model not in ARM_MODELS or target not in ARM_TARGETS:
            raise ValueError(f"sft_arm must name a 02_sft arm with real images, '<{'|'.join(ARM_MODELS)}>_"
                             f"<{'|'.join(ARM_TARGETS)}>', got {self.sft_arm!r}")
        if not 0 < self.gray_fraction <= 1:
            raise ValueError(f"gray_fraction must be in (0, 1], got {self.gray_fraction}")
        if self.n_eval < 0 or self.n_control < 0:
            raise ValueError(f"n_eval and n_control must be >= 0, got {self.n_eval}, {self.n_control}")
        for name in ("max_new_tokens", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class ResultsConfig(StageConfig):
    """06_results: the study's summary read from every stage's run (metrics and prediction files), never
    re-evaluated; a missing stage is reported with the command that makes it."""

    build_missing_ci: bool = True    # at the ci tier build a missing earlier stage first (other tiers only report it)


CONFIGS = {"01_data": DataConfig, "baseline": BaselineConfig, "02_sft": SFTConfig, "03_icl": ICLConfig,
           "04_distill": DistillConfig, "05_grayscale": GrayscaleConfig,
           "06_results": ResultsConfig}
