"""LoRA / QLoRA on a Qwen2.5-VL language model: what every method that fine-tunes (SFT, distillation) shares.

`cfg` below is any stage config with the LoRA fields (SFTConfig, DistillConfig): lora_r, lora_alpha, lora_dropout,
lora_modules, quantize, quantize_vision, gradient_checkpointing. Heavy imports stay inside the functions.
"""
from __future__ import annotations

import re
from pathlib import Path

from spatialstudy import runs

KEEP_UNQUANTIZED = ("model.visual", "lm_head")  # the vision tower and output layer stay whole unless asked
LORA_MODULES = {"all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                "qv": ("q_proj", "v_proj")}   # "qv": the study's own choice


def lora_target_pattern(modules=LORA_MODULES["all"]) -> str:
    """The regex peft full-matches against module names: projections inside the language model's decoder layers.
    Anchored on `language_model.layers.N.` because the vision tower's MLPs carry the same names (gate_proj, up_proj,
    down_proj): a plain name list or "all-linear" would put adapters on the vision tower too."""
    names = "|".join(re.escape(m) for m in modules)
    return rf"(?:.*\.)?language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=lora_target_pattern(LORA_MODULES[cfg.lora_modules]), task_type="CAUSAL_LM")


def adapter_modules(model) -> list[str]:
    """Names of the modules that carry a LoRA adapter (for checks: none may sit in the vision tower)."""
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {}))]


def base_checkpoint(spec: str, profile: str) -> str:
    """A checkpoint dir for a model spec: tiny specs are the cached bases pretrained at the profile's tier."""
    from spatialstudy.models import bases, qwen

    if qwen.parse_tiny(spec):
        return str(bases.tiny_checkpoint(spec, profile))
    local = runs.resolve(spec)
    return str(local) if local.exists() else spec


def quantization_available() -> tuple[bool, str]:
    """Whether 4-bit loading can run here; the reason when it cannot."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an import of a native library fails in many ways
        return False, f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
    return True, ""


def load_base(spec: str, profile: str, cfg, attn_implementation: str | None = None, path: str | None = None):
    """(model, processor, quantized): a base as its LoRA arms train and evaluate it. 4-bit NF4 (double
    quantisation, bf16 compute on CUDA) when cfg.quantize; the vision tower stays whole unless cfg.quantize_vision
    (lm_head always does: transformers never quantises the output layer). `path` overrides the spec's checkpoint.
    Where bitsandbytes cannot run, plain LoRA with a printed message (the metrics record which)."""
    import torch

    from spatialstudy.models import qwen

    path, cuda = path or base_checkpoint(spec, profile), torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    ok, why = quantization_available() if cfg.quantize else (False, "")
    if cfg.quantize and not ok:
        print(f"[lora] 4-bit requested but {why}: training plain LoRA on the full-precision base instead")
    keep = () if cfg.quantize_vision else KEEP_UNQUANTIZED
    model, processor = qwen.load_checkpoint(path, dtype=dtype, quantize_4bit=cfg.quantize and ok,
                                            keep_unquantized=keep, attn_implementation=attn_implementation,
                                            device_map=device_map() if cuda else None)
    return model, processor, cfg.quantize and ok


def processes():
    """accelerate's view of this launch: one process, or one of several under `torchrun` / `accelerate launch`
    (`.num_processes`, `.is_main_process`, `.main_process_first()`, `.wait_for_everyone()`)."""
    import torch
    from accelerate import PartialState

    # cpu=True where there is no GPU, as the Trainer asks (use_cpu): accelerate's state is made once per process,
    # and without it several CPU processes would each think they were alone
    return PartialState(cpu=not torch.cuda.is_available())


def device_map():
    """Where a CUDA base goes: spread over the GPUs for one process; under several processes (data parallel) each
    holds a whole copy on its own GPU, as DDP expects."""
    state = processes()
    return "auto" if state.num_processes == 1 else {"": state.local_process_index}


def load_adapted(base: str, adapter, cfg, attn_implementation: str | None = None):
    """(model, processor) of a trained arm for evaluation: the base checkpoint it was trained from, loaded as its
    stage loaded it (cfg.quantize, cfg.quantize_vision), with its LoRA adapter, frozen. Merged into the weights (a
    plain model, as deployed) unless the base is 4-bit, where merging would round the adapter into the quantised
    weights."""
    from spatialstudy.models.qwen import load_adapter

    model, processor, quantized = load_base("", "", cfg, attn_implementation, path=str(base))
    model = load_adapter(model, adapter)
    model = (model if quantized else model.merge_and_unload()).eval()
    model.requires_grad_(False)
    return model, processor


def make_trainable(model, cfg, quantized: bool):
    """The base wrapped in a LoRA peft model; k-bit preparation first for a 4-bit base unless cfg.kbit_prep is off
    (norms to fp32, input grads, non-reentrant gradient checkpointing when asked). The LoRA weights are drawn right after seeding with cfg.seed:
    otherwise an arm's initialisation depended on what the process drew before it (which arms trained, which were
    loaded from cache), and two runs of one configuration differed by up to 2.4 points (reports/distill_results.md)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    ckpt_kw = {"use_reentrant": False}
    if quantized and cfg.kbit_prep:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kw)
    elif cfg.gradient_checkpointing:   # also a 4-bit base without k-bit preparation (the study's setup)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kw)
        model.enable_input_require_grads()
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lora_config(cfg))


def last_checkpoint(path) -> str | None:
    """The newest checkpoint-N under a run's dir (what an interrupted run resumes from), else None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(path)) if Path(path).is_dir() else None


def training_args(cfg, path, lr: float, progress: bool = True):
    """TrainingArguments: checkpoints and TensorBoard logs in the run's dir, validation loss every eval_steps."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(path), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps,
        eval_strategy="steps", eval_steps=cfg.eval_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=2, report_to=["tensorboard"], seed=cfg.seed, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=False,  # enabled (non-reentrant) by make_trainable, before peft wraps the model
        remove_unused_columns=False, prediction_loss_only=True, dataloader_num_workers=0,
        disable_tqdm=not progress, label_names=["labels"],
        # keep_best: the saved checkpoint with the lowest validation loss is loaded at the end (the study's choice)
        load_best_model_at_end=cfg.keep_best, metric_for_best_model="eval_loss",
        greater_is_better=False)


def arm_trained(path) -> bool:
    """Whether `path` holds a finished arm: the adapter and the log.json that train_and_save writes last."""
    path = Path(path)
    return (path / "log.json").exists() and (path / "adapter" / "adapter_config.json").exists()


def train_and_save(trainer, model, path, who: str, **extra) -> dict:
    """Run `trainer` (resuming from the last checkpoint under `path`), save the adapter and log.json, return the
    log. Under several processes every one trains its shard of the rows (the Trainer's data parallelism), the main
    one alone writes, and all wait for it, so no process reads a half-written adapter."""
    import time

    import torch

    from spatialstudy.models.generation import reset_peak_memory
    from spatialstudy.models.qwen import count_params, save_adapter

    resume = last_checkpoint(path)
    if resume:
        print(f"[{who}] {path.name}: resuming from {resume}")
    t0 = time.perf_counter()
    reset_peak_memory("cuda" if torch.cuda.is_available() else "cpu")
    trainer.train(resume_from_checkpoint=resume)
    log = {"train_s": round(time.perf_counter() - t0, 1), "resumed_from": resume, "params": count_params(model),
           "steps": trainer.state.global_step, "log_history": trainer.state.log_history, "peak_memory": peak_memory(),
           "processes": trainer.args.world_size, **extra}
    if trainer.is_world_process_zero():
        save_adapter(model, path / "adapter")
        runs.write_json(path / "log.json", log)
    trainer.accelerator.wait_for_everyone()
    return log


def peak_memory() -> dict:
    """Peak memory of training, measured as the harness measures evaluation."""
    import torch

    from spatialstudy.models.generation import peak_memory_bytes

    n, kind = peak_memory_bytes("cuda" if torch.cuda.is_available() else "cpu")
    return {"bytes": n, "kind": kind}
