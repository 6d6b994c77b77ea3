"""Stage 02_sft: (Q)LoRA supervised fine-tuning on SpaceThinker-schema rows (research question 1).

LoRA on the language model only, optionally over a 4-bit NF4 base (QLoRA); trained with transformers' `Trainer`
(progress, gradient accumulation, checkpoints and resume, TensorBoard); data-parallel under `torchrun` /
`accelerate launch` with `python -m spatialstudy.run --only 02_sft --direct` (train_in_parallel).
Each arm is one (model, target format, images) triple:

    student/mcq            the rows through data.mcq.to_mcq: manual-CoT prompt with options, target "... Answer: X"
    student/spacethinker   the study's format: the question, target "<think>...</think>\\n<answer>...</answer>"
    student/answer_only    the mcq prompt with the target "Answer: X" alone (no reasoning): the skill without a
                           new output format (not in the issue's two formats; added to separate the two)
    student/mcq/blank      the same SFT with every training image blank: what SFT teaches without looking
    teacher/mcq            the teacher fine-tuned too (the distillation teacher is its SFT)

Writes runs/<profile>/02_sft/{config.json, metrics.json, predictions_<arm>[_blind].jsonl,
<arm>/{adapter/, checkpoint-N/, runs/ (TensorBoard), log.json, arm.json}}.
Module-level imports stay light: the runner validates SFTConfig before any model loads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from spatialstudy import runs
from spatialstudy.configs import SFTConfig, arm_parts, training_identity
from spatialstudy.evaluation.compare import (BASELINE_STAGE, accuracy_by_partition, accuracy_table,  # noqa: F401
                                             baseline_summary, blind_summary, ci_groups, paired_by_partition,
                                             paired_table)
from spatialstudy.models.episodes import Episodes, mcq_episode, spacethinker_episode, spacethinker_target  # noqa: F401
from spatialstudy.models.episodes import episodes as _episodes
from spatialstudy.models.episodes import spacethinker_rows
from spatialstudy.models.lora import (KEEP_UNQUANTIZED, LORA_MODULES, adapter_modules, base_checkpoint,  # noqa: F401
                                      arm_trained, last_checkpoint, load_base, lora_config, lora_target_pattern,
                                      make_trainable, peak_memory, processes, quantization_available, train_and_save,
                                      training_args)

STAGE = "02_sft"
# The study's system prompt (VLAA-Thinker's "VL-Thinking" R1-style prompt), reconstructed from its description
# (../shared/research/spacethinker.md): used only where a profile asks for it (full-repro).
VL_THINKING_PROMPT = (
    "You are VL-Thinking, a helpful assistant with excellent reasoning ability. A user asks you a question, and you "
    "should try to solve it. You should first think about the reasoning process in the mind and then provide the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.")


@dataclass(frozen=True)
class Arm:
    """One fine-tuning run: which base, which target format, real or blank training images."""

    model: str          # "student" | "teacher"
    target: str         # "mcq" | "spacethinker" | "answer_only"
    blank: bool = False

    @property
    def name(self) -> str:
        return f"{self.model}_{self.target}" + ("_blank" if self.blank else "")


def parse_arm(text: str) -> Arm:
    """"student/mcq/blank" -> Arm("student", "mcq", True)."""
    return Arm(*arm_parts(text))


def episodes(records: list, arm: Arm, cfg: SFTConfig, seed: int):
    """The arm's training (or validation) episodes and, for mcq, the conversion report."""
    return _episodes(records, arm.target, arm.blank, seed=seed, **cfg.episode_layout())


def spacethinker_records(profile: str, cfg: SFTConfig) -> tuple[list, list]:
    """(train, validation) SpaceThinker-schema rows: the configured local copy, else what 01_data wrote."""
    return spacethinker_rows(profile, cfg.spacethinker_path, cfg.n_train, cfg.n_val)


# ---------------------------------------------------------------- training with transformers' Trainer
def arm_identity(arm: Arm, cfg: SFTConfig, base: str, n_rows: tuple[int, int]) -> dict:
    """Everything that changes an arm's adapter: a checkpoint of another identity is never resumed."""
    skip = {"profile", "arms", "eval_batch_size", "max_new_tokens", "spacethinker_max_new_tokens", "n_eval",
            "logging_steps", "eval_steps", "save_steps", "student", "teacher"}
    train = training_identity(cfg, skip)
    return {"arm": asdict(arm), "base": base, "rows": list(n_rows), "train": train}


def arm_dir(out: Path, arm: Arm, identity: dict) -> Path:
    """out/<arm>, emptied first when it holds another identity's training (changed settings or data)."""
    return runs.keyed_dir(out / arm.name, identity, "sft")


def arm_path(arm: Arm, cfg: SFTConfig, profile: str, out: Path, rows: tuple) -> Path:
    """The arm's dir, emptied first when it holds a run of other settings or data."""
    identity = arm_identity(arm, cfg, base_checkpoint(arm_spec(arm, cfg), profile), (len(rows[0]), len(rows[1])))
    return arm_dir(out, arm, identity)


def arm_spec(arm: Arm, cfg: SFTConfig) -> str:
    return cfg.student if arm.model == "student" else cfg.teacher


def arm_lr(arm: Arm, cfg: SFTConfig) -> float:
    return cfg.teacher_lr if arm.model == "teacher" and cfg.teacher_lr else cfg.lr


def make_trainer(model, processor, cfg: SFTConfig, arm: Arm, path: Path, data: tuple, progress: bool = True):
    from transformers import Trainer

    from spatialstudy.models.chat import collate

    return Trainer(model=model, args=training_args(cfg, path, arm_lr(arm, cfg), progress), train_dataset=data[0],
                   eval_dataset=data[1], data_collator=lambda eps: collate(eps, processor, cfg.loss_on_prompt))


def fit(model, processor, cfg: SFTConfig, arm: Arm, path: Path, data: tuple, progress: bool = True,
        **extra) -> dict:
    """Train (resuming from the arm's last checkpoint, if any), save the adapter, return the training log (with
    `extra` entries)."""
    trainer = make_trainer(model, processor, cfg, arm, path, data, progress)
    return train_and_save(trainer, model, path, "sft", **extra)


def trained_arm(arm: Arm, cfg: SFTConfig, profile: str, out: Path, rows: tuple, progress: bool = True):
    """(peft model, processor, training log, quantized) of one arm: trained now, or loaded when its adapter and log
    exist under the same identity."""
    from spatialstudy.models.qwen import load_adapter

    model, processor, quantized = load_base(arm_spec(arm, cfg), profile, cfg)
    path = arm_path(arm, cfg, profile, out, rows)
    if arm_trained(path):
        return load_adapter(model, path / "adapter"), processor, runs.read_json(path / "log.json"), quantized
    train, report = episodes(rows[0], arm, cfg, cfg.seed)
    val, _ = episodes(rows[1], arm, cfg, cfg.seed + 1)
    model = make_trainable(model, cfg, quantized)
    log = fit(model, processor, cfg, arm, path, (train, val), progress, mcq_report=report)
    return model, processor, log, quantized


def train_in_parallel(arms: list, cfg: SFTConfig, profile: str, out: Path, rows: tuple) -> bool:
    """Under several processes (`torchrun` / `accelerate launch`): every process trains every arm first (the
    Trainer's data parallelism); then the main process goes on alone to evaluate, finding each arm's adapter, and
    the others stop (True for them). One process: nothing to do here (False)."""
    state = processes()
    if state.num_processes == 1:
        return False
    for arm in arms:
        with state.main_process_first():   # one process empties a dir of other settings; the rest find it done
            arm_path(arm, cfg, profile, out, rows)
        trained_arm(arm, cfg, profile, out, rows, progress=state.is_main_process)
    return not state.is_main_process


def inputs(profile: str, cfg: SFTConfig, arms: list) -> tuple[list, tuple]:
    """(evaluation records, SpaceThinker rows), with the bases the arms start from pretrained or found; under
    several processes the main one builds whatever is missing (a ci run, a tiny base) before the others look."""
    from spatialstudy.evaluation.eval import eval_records, eval_subset

    with processes().main_process_first():
        records = eval_subset(eval_records(profile), cfg.n_eval or None, cfg.seed)  # stratified, when n_eval is set
        rows = spacethinker_records(profile, cfg)
        for spec in dict.fromkeys(arm_spec(a, cfg) for a in arms):
            base_checkpoint(spec, profile)
    return records, rows


# ---------------------------------------------------------------- evaluation
def eval_settings(cfg: SFTConfig, name: str, target: str):
    from spatialstudy.evaluation.eval import EvalSettings

    tokens = cfg.spacethinker_max_new_tokens if target == "spacethinker" else cfg.max_new_tokens
    return EvalSettings(name=name, max_new_tokens=tokens, batch_size=cfg.eval_batch_size, prompt_style="manual_cot",
                        restart_stale=True)


def benchmark(model, processor, records: list, out: Path, settings) -> dict:
    """The benchmark items with the model's own blind control (the harness resumes finished items)."""
    from spatialstudy.evaluation.eval import evaluate_with_controls

    return evaluate_with_controls(model, processor, records, out, settings)


def meaning_prompts(rows: list, target: str, cfg: SFTConfig) -> tuple[list, list, list]:
    """(rows kept, chat messages, option lists) for SpaceThinker test rows in a format's own prompt: the bare
    question (spacethinker) or lettered options (mcq; the chosen option's text is scored by meaning). Rows that
    cannot become an MCQ are left out of the mcq format."""
    layout = cfg.episode_layout()
    if target == "spacethinker":
        return rows, [spacethinker_episode(r, **layout)[0][:-1] for r in rows], [None] * len(rows)
    from spatialstudy.data.mcq import MCQConversionError, to_mcq

    kept = []
    for i, r in enumerate(rows):
        try:
            kept.append((r, to_mcq(r, seed=cfg.seed * 1_000_003 + i)))   # the prompt only: no target needed
        except MCQConversionError:
            continue
    return [r for r, _ in kept], [mcq_episode(m, **layout)[0][:-1] for _, m in kept], [m.options for _, m in kept]


def _chosen_text(text: str, options) -> str:
    """What an answer says: the generated text (free-text formats) or the text of the letter chosen (mcq)."""
    from spatialstudy.scoring import LETTERS, extract_answer

    if options is None:
        return text
    letter, _ = extract_answer(text, "official")
    return options[LETTERS.index(letter)] if letter in LETTERS[:len(options)] else ""


def meaning_eval(model, processor, rows: list, target: str, cfg: SFTConfig, path: Path) -> dict:
    """SpaceThinker test rows answered in the model's format and scored by meaning (numbers within a tolerance
    after unit conversion, yes/no, which one); cached in `path` under the model's fingerprint."""
    from spatialstudy.evaluation.eval import model_fingerprint
    from spatialstudy.evaluation.meaning import score_meaning
    from spatialstudy.models.generation import generate_batch

    key = {"model": model_fingerprint(model), "target": target, "rows": len(rows), "system": cfg.system_prompt}
    cached = runs.read_json(path) if path.exists() else {}
    if cached.get("key") == key:
        return cached["summary"]
    rows, msgs, options = meaning_prompts(rows, target, cfg)
    tokens = eval_settings(cfg, "meaning", target).max_new_tokens
    gens = []
    for i in range(0, len(msgs), cfg.eval_batch_size):
        gens += [g["raw"] for g in generate_batch(model.eval(), processor, msgs[i:i + cfg.eval_batch_size], tokens)]
    scored = [{"question": r.question, "gold": r.answer, "generated": _chosen_text(g, o)}
              for r, g, o in zip(rows, gens, options)]
    summary = score_meaning(scored)
    runs.write_json(path, {"key": key, "summary": summary, "rows": scored})
    return summary


# ---------------------------------------------------------------- the stage
def base_entry(model: str, cfg: SFTConfig, profile: str, records: list, out: Path, rows: list) -> dict:
    """The base an arm is compared with, under the arm's quantisation: the baseline stage's run when the arms are
    full precision; a 4-bit evaluation of the base here when they are 4-bit (so no difference is a quantisation
    effect). Its SpaceThinker test rows are scored by meaning in the mcq format (what the bases were taught)."""
    spec = cfg.student if model == "student" else cfg.teacher
    model_obj, processor, quantized = load_base(spec, profile, cfg)
    if quantized:
        summary = benchmark(model_obj, processor, records, out, eval_settings(cfg, f"{model}_base_4bit", "mcq"))
    else:
        summary = baseline_summary(profile, model, spec)
    meaning = meaning_eval(model_obj, processor, rows, "mcq", cfg, out / f"meaning_{model}_base.json")
    return {"quantized": quantized, "source": "4-bit here" if quantized else BASELINE_STAGE, "eval": summary,
            "meaning": meaning}


def arm_entry(arm: Arm, cfg: SFTConfig, profile: str, records: list, out: Path, rows: tuple) -> dict:
    """Train (or load) one arm, evaluate it with its blind control, score SpaceThinker test rows by meaning."""
    import gc

    model, processor, log, quantized = trained_arm(arm, cfg, profile, out, rows)
    summary = benchmark(model, processor, records, out, eval_settings(cfg, arm.name, arm.target))
    meaning = meaning_eval(model, processor, rows[1], arm.target, cfg, out / f"meaning_{arm.name}.json")
    del model
    gc.collect()
    train = {k: log[k] for k in ("train_s", "steps", "params", "peak_memory", "resumed_from") if k in log}
    return {"arm": asdict(arm), "quantized": quantized, "train": train, "eval": summary, "meaning": meaning,
            "losses": loss_curves(log)}


def loss_curves(log: dict) -> dict:
    """{"train": [(step, loss)], "val": [(step, eval_loss)]} from the Trainer's log history."""
    hist = log.get("log_history", [])
    return {"train": [(h["step"], h["loss"]) for h in hist if "loss" in h],
            "val": [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]}


def comparisons(arms: dict, bases: dict, records: list) -> dict:
    """Paired differences on the same items: every arm minus its base, minus its own blind control, the image arm
    minus its blank-image arm, and the fine-tuned teacher minus the fine-tuned student (each format)."""
    out = {}
    for name, a in arms.items():
        out[f"{name} - base"] = paired_by_partition(a["eval"], bases[a["arm"]["model"]]["eval"], records)
        out[f"{name} - its blind"] = paired_by_partition(a["eval"], blind_summary(a["eval"]), records)
        if f"{name}_blank" in arms:
            out[f"{name} - {name}_blank"] = paired_by_partition(a["eval"], arms[f"{name}_blank"]["eval"], records)
    for target in ("mcq", "spacethinker", "answer_only"):
        t, s = arms.get(f"teacher_{target}"), arms.get(f"student_{target}")
        if t and s:
            out[f"teacher_{target} - student_{target}"] = paired_by_partition(t["eval"], s["eval"], records)
    return out


# ---------------------------------------------------------------- figures and the summary table
def models_in_order(metrics: dict) -> dict:
    """{label: evaluation summary}: each base, then its arms."""
    out = {}
    for model, base in metrics["bases"].items():
        out[f"{model} base"] = base["eval"]
        out.update({name: a["eval"] for name, a in metrics["arms"].items() if a["arm"]["model"] == model})
    return out


def accuracy_figure(metrics: dict, scorer: str = "official"):
    """Accuracy by partition for every base and arm, each beside its own blind control."""
    from spatialstudy import plotting

    series = {}
    for label, summary in models_in_order(metrics).items():
        series[label] = ci_groups(summary, scorer)
        series[f"{label} blind"] = ci_groups(blind_summary(summary), scorer)
    return plotting.accuracy_bars(series, paired=True, title=f"SFT arms on the benchmark ({scorer} scorer)")


def loss_figure(metrics: dict):
    """Training and validation loss (SpaceThinker test split) of every arm."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.setup_style()
    arms = metrics["arms"]
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 2.8), squeeze=False)
    for ax, (name, a) in zip(axes.flat, arms.items()):
        for part, style in (("train", "-"), ("val", "o-")):
            pts = a["losses"][part]
            if pts:
                ax.plot(*zip(*pts), style, label=part, ms=3)
        ax.set(title=name, xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figures(metrics: dict, profile: str) -> None:
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    for scorer in ("official", "lenient"):
        plotting.savefig(accuracy_figure(metrics, scorer), f"sft_accuracy_{scorer}", profile)
    plotting.savefig(loss_figure(metrics), "sft_loss", profile)
    plt.close("all")


def accuracy_rows(metrics: dict) -> list[str]:
    return accuracy_table(models_in_order(metrics))


def paired_rows(metrics: dict) -> list[str]:
    return paired_table(metrics["paired"])


def meaning_rows(metrics: dict) -> list[str]:
    lines = ["SpaceThinker test rows scored by meaning (numbers within 25% after unit conversion, yes/no, which):"]
    items = [(f"{m} base", b["meaning"]) for m, b in metrics["bases"].items()]
    items += [(n, a["meaning"]) for n, a in metrics["arms"].items()]
    for label, m in items:
        lines.append(f"  {label:<22} {m['accuracy']:>5.1f}% (n {m['n']}, unparsed {m['parse_failure_rate']:.1f}%)")
    return lines


def summary_table(metrics: dict) -> str:
    """Plain text: accuracy by model and partition with blind controls, paired differences, meaning scores, cost."""
    cost = [f"  {n}: {a['train'].get('steps')} steps, {a['train'].get('train_s')} s, trainable "
            f"{a['train']['params']['trainable']:,} / {a['train']['params']['total']:,}"
            for n, a in metrics["arms"].items()]
    return "\n".join(accuracy_rows(metrics) + [""] + paired_rows(metrics) + [""] + meaning_rows(metrics) +
                     ["training cost:"] + cost)


def run_sft(profile: str, cfg: SFTConfig) -> dict:
    """Every arm of the config: train, evaluate with controls, compare on the same items; write the run dir.
    Under `torchrun` / `accelerate launch` the arms train data-parallel and the main process alone evaluates and
    writes; the others return {}."""
    runs.seed_everything(cfg.seed)
    out = runs.run_dir(profile, STAGE)
    arms = [parse_arm(a) for a in cfg.arms]
    records, rows = inputs(profile, cfg, arms)
    if train_in_parallel(arms, cfg, profile, out, rows):
        return {}
    bases = {m: base_entry(m, cfg, profile, records, out, rows[1]) for m in dict.fromkeys(a.model for a in arms)}
    results = {a.name: arm_entry(a, cfg, profile, records, out, rows) for a in arms}
    metrics = {"n_eval": len(records), "n_train": len(rows[0]), "n_val": len(rows[1]), "bases": bases,
               "arms": results, "paired": comparisons(results, bases, records)}
    runs.save_run(profile, STAGE, asdict(cfg), metrics)
    save_figures(metrics, profile)
    return metrics


def main(profile: str, params: dict) -> dict:
    """Entry point with params as papermill passes them (for scripts and the seed benchmark)."""
    return run_sft(profile, SFTConfig.for_profile(profile, params, STAGE))
