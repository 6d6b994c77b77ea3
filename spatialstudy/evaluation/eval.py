"""The one evaluation harness every method uses: OmniSpatial official prompt, batched greedy decoding, resumable.

Protocol (qizekun/OmniSpatial vlms_eval, prompt_type=manual_cot, eval_type=re): one user turn [image, text], the
text = manual-CoT system text + "Answer: X" format text + question + "\\nA. ..." option lines (none when the options
are drawn in the image). The official README averages 5 repeats; decoding here is greedy (do_sample=False), so the
5 repeats would be identical and ONE pass is run. Both scorers (spatialstudy.scoring) are stored per item; with
prompt_style="direct" the official scorer applies the benchmark's direct rule (first character of the stripped,
upper-cased reply; see scoring.OFFICIAL_RULES), recorded in the run's config as `official_rule`.

    python -m spatialstudy.evaluation.eval --model tiny-student --data runs/smoke/01_data/OmniSpatial-test --out runs/ev
    python -m spatialstudy.evaluation.eval ... --shard 0/2   # one shard; then --merge 2 when every shard is done
    torchrun --standalone --nproc-per-node 4 -m spatialstudy.evaluation.eval ... --distributed
                                                      # 4 shards, merged by rank 0
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from spatialstudy import runs
from spatialstudy.evaluation.predictions import (append_rows, discard_stale, merge_shards, predictions_path,
                                                 read_predictions, rows_for, shard_records, writer_lock)
from spatialstudy.models.generation import (generate_batch, generation_identity, peak_memory_bytes,  # noqa: F401
                                           reset_peak_memory)
from spatialstudy.models.transforms import BLIND, GRAYSCALE, TRANSFORMS, ImageTransform  # noqa: F401 (GRAYSCALE)
from spatialstudy.scoring import LETTERS, SCORERS, extract_answer, official_rule, paired_difference, summarize

__all__ = ["PROMPT_STYLES", "ImageTransform", "BLIND", "GRAYSCALE", "TRANSFORMS", "EvalSettings", "eval_subset",
           "build_messages", "evaluate", "evaluate_with_controls", "merge_shards", "extract_answer",
           "paired_difference", "generate_batch", "eval_records", "evaluate_spec"]

PROMPT_STYLES = ("manual_cot", "direct")
PIXELS_PER_VISUAL_TOKEN = 28 * 28    # Qwen2.5-VL: 14 px patches merged 2x2; used only to sort requests by length
HARNESS_VERSION = 3                  # bump when prompts, scoring or row fields change: invalidates resumable files
FINGERPRINT_SLICE = 16               # elements per weight tensor hashed into the model fingerprint
SHARD_WAIT = timedelta(hours=48)     # how long finished shards wait at the barrier for the slowest one
SUBSET_STAGE = "baseline"            # the stage that fixes (and records) each profile's evaluation subset


@dataclass(frozen=True)
class EvalSettings:
    """How `evaluate` runs. `demos_fn(record)` gives ICL demo turns (called once to size the request, once to build
    it); put anything that changes them (k, index) in `config_extra` so the config hash tells runs apart.
    `restart_stale` drops a predictions file of another configuration (a stage that owns its run dir), which is
    otherwise an error. `on_batch(rows)` sees each batch as it is written."""

    name: str = "model"
    max_new_tokens: int = 64
    batch_size: int = 8
    prompt_style: str = "manual_cot"
    transform: ImageTransform | None = None
    shard: tuple[int, int] | None = None
    demos_fn: Callable | None = None
    config_extra: dict = field(default_factory=dict)
    restart_stale: bool = False
    progress: bool = True
    on_batch: Callable | None = None

    @property
    def transform_name(self) -> str | None:
        return self.transform.name if self.transform else None


# ---------------------------------------------------------------- subsets and prompts
def eval_subset(records: Sequence, n: int | None, seed: int = 0) -> list:
    """A deterministic subset of n records stratified by task_type (largest remainder), in input order."""
    if n is None or n >= len(records):
        return list(records)
    strata = defaultdict(list)
    for i, r in enumerate(records):
        strata[r.task_type].append(i)
    quota = {t: n * len(ix) / len(records) for t, ix in strata.items()}
    take = {t: int(q) for t, q in quota.items()}
    for t in sorted(quota, key=lambda t: (take[t] - quota[t], t))[: n - sum(take.values())]:
        take[t] += 1  # hand the leftover slots to the largest fractional parts
    rng = random.Random(seed)
    chosen = set()
    for t in sorted(strata):
        chosen.update(rng.sample(strata[t], take[t]))
    return [records[i] for i in sorted(chosen)]


def save_eval_subset(out_dir, omnispatial_dir, records: Sequence, seed: int) -> Path:
    """Record the fixed evaluation subset (its folder and item keys, in order) in out_dir/eval_subset.json."""
    return runs.write_json(Path(out_dir) / "eval_subset.json", {"omnispatial_dir": str(omnispatial_dir),
                                                                "n": len(records), "seed": seed,
                                                                "keys": [list(r.key) for r in records]})


def eval_records(profile: str) -> list:
    """The fixed evaluation subset of a profile (same items, same order), as the baseline stage recorded it: every
    method evaluates on it, so numbers compare item for item."""
    from spatialstudy.data import load_omnispatial

    out = runs.require_run(profile, SUBSET_STAGE)
    subset = runs.read_json(out / "eval_subset.json")
    by_key = {r.key: r for r in load_omnispatial(subset["omnispatial_dir"])}
    missing = [k for k in map(tuple, subset["keys"]) if k not in by_key]
    if missing:
        raise ValueError(f"{out}/eval_subset.json names {len(missing)} item(s) absent from {subset['omnispatial_dir']}"
                         f", e.g. {missing[:2]}; re-run the {SUBSET_STAGE} stage after the data stage")
    return [by_key[tuple(k)] for k in subset["keys"]]


def load_image(record, transform: ImageTransform | None = None) -> Image.Image:
    """The record's RGB image, through `transform` when given (e.g. BLIND: a blank one of the same size)."""
    path = Path(record.image_path)
    if not path.exists():
        raise FileNotFoundError(f"image of record {record.key} not found: {path} (re-run the data stage?)")
    with Image.open(path) as im:
        image = im.convert("RGB")
    return transform.fn(image) if transform else image


def build_messages(record, prompt_style: str = "manual_cot", transform: ImageTransform | None = None,
                   demos=()) -> list[dict]:
    """Qwen chat messages for one record: demo turns (ICL) then the query [image, official prompt]."""
    from spatialstudy.data.prompts import chat_messages, omnispatial_prompt

    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    prompt = omnispatial_prompt(record.question, list(record.options), style=prompt_style)
    return chat_messages(prompt, load_image(record, transform), demos=demos)


# ---------------------------------------------------------------- identity of a run (what resuming trusts)
def model_fingerprint(model) -> str:
    """Hash of the config and a slice of every weight: cheap even at 7B, changes when training changes weights."""
    h = hashlib.sha1(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:FINGERPRINT_SLICE].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def processor_identity(processor) -> dict:
    """What of the processor changes model inputs: pixel budget, vocabulary size, chat template."""
    ip, tok = processor.image_processor, processor.tokenizer
    size = dict(getattr(ip, "size", None) or {})
    return {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge"), "vocab": len(tok),
            "chat_template": hashlib.sha1(str(processor.chat_template).encode()).hexdigest()[:12]}


def eval_config(model, processor, settings: EvalSettings) -> dict:
    """Everything that changes an item's prediction; batch size and sharding deliberately excluded."""
    s = settings
    return {"harness": HARNESS_VERSION, "model": model_fingerprint(model), "dtype": str(model.dtype),
            "attn_implementation": model.config._attn_implementation, "processor": processor_identity(processor),
            "generation": generation_identity(model, processor, s.max_new_tokens), "prompt_style": s.prompt_style,
            "official_rule": official_rule(s.prompt_style), "transform": s.transform_name, "extra": s.config_extra}


def image_key(record) -> str:
    """<task_type folder>/<file name>: unique per image file within a dataset folder, wherever that folder lies;
    questions sharing it share an image, which paired comparisons resample together."""
    return PurePosixPath(*Path(record.image_path).parts[-2:]).as_posix()


def score_row(record, gen: dict, config_hash: str, prompt_style: str = "manual_cot") -> dict:
    """One predictions-file row: identity, raw output, each scorer's letter/parsed/correct, timing, tokens."""
    row = {"task_type": record.task_type, "id": record.id, "sub_task_type": record.sub_task_type,
           "partition": getattr(record, "partition", None), "family": getattr(record, "family", None),
           "image": image_key(record), "options_in_image": not record.options,
           "truth": LETTERS[record.answer], "config_hash": config_hash, **gen}
    for s in SCORERS:
        letter, parsed = extract_answer(gen["raw"], s, record.options, prompt_style=prompt_style)
        row.update({f"pred_{s}": letter, f"parsed_{s}": parsed, f"correct_{s}": letter == row["truth"]})
    return row


def _visual_tokens(processor, size: tuple[int, int]) -> int:
    """Visual tokens of an image of `size` once the processor brings it within its pixel budget (approximately)."""
    budget = processor.image_processor.size
    pixels = min(max(size[0] * size[1], budget["shortest_edge"]), budget["longest_edge"])
    return pixels // PIXELS_PER_VISUAL_TOKEN


def _content_tokens(processor, content: dict) -> int:
    if content["type"] == "image":
        return _visual_tokens(processor, content["image"].size)
    return len(processor.tokenizer(content["text"])["input_ids"])


def _request_length(processor, record, demos=()) -> int:
    """Approximate prompt tokens of a request, demo turns included (text and visual tokens of every turn; the
    prompt text every request shares is left out), only for sorting into batches."""
    from spatialstudy.data.prompts import chat_messages

    with Image.open(record.image_path) as im:  # lazy: the size comes from the header, no pixels are decoded
        msgs = chat_messages(record.question + " ".join(record.options), im, demos=demos)
        return sum(_content_tokens(processor, c) for m in msgs for c in m["content"])


def longest_first(processor, records: Sequence, demos_fn: Callable | None = None) -> list:
    """Records by request length, longest first: a batch that runs out of memory does so at the start, not
    hours in. Equal lengths keep their order (the sort is stable)."""
    length = {r.key: _request_length(processor, r, demos_fn(r) if demos_fn else ()) for r in records}
    return sorted(records, key=lambda r: length[r.key], reverse=True)


# ---------------------------------------------------------------- cost
def _param_cost(model) -> dict:
    from spatialstudy.models.qwen import count_params  # lazy: merging shards needs no transformers

    n = count_params(model)
    return {"params_total": n["total"], "params_trainable": n["trainable"]}


# ---------------------------------------------------------------- the harness
def _run_batches(model, processor, todo, path, chash, s: EvalSettings) -> tuple[float, int]:
    """Generate, score and append batch after batch; returns (generation seconds, generated tokens)."""
    gen_time, gen_tokens = 0.0, 0
    desc = f"eval {s.name}" + (f" {s.transform_name}" if s.transform else "")
    with tqdm(total=len(todo), desc=desc, disable=not s.progress) as bar:
        for start in range(0, len(todo), s.batch_size):
            batch = todo[start:start + s.batch_size]
            msgs = [build_messages(r, s.prompt_style, s.transform, s.demos_fn(r) if s.demos_fn else ()) for r in batch]
            t0 = time.perf_counter()
            gens = generate_batch(model, processor, msgs, s.max_new_tokens)
            wall = time.perf_counter() - t0
            rows = [score_row(r, {**g, "latency_s": wall / len(batch), "batch_size": len(batch)}, chash, s.prompt_style)
                    for r, g in zip(batch, gens)]
            append_rows(path, rows)
            gen_time, gen_tokens = gen_time + wall, gen_tokens + sum(g["new_tokens"] for g in gens)
            bar.update(len(batch))
            if s.on_batch:
                s.on_batch(rows)
    return gen_time, gen_tokens


def _generate_in_eval_mode(model, processor, todo, path, chash, s: EvalSettings) -> tuple[float, int]:
    """_run_batches with dropout off (greedy decoding must be a pure function of the inputs), the training flag
    restored afterwards, and the peak-memory measure started afresh (generation.reset_peak_memory)."""
    reset_peak_memory(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        return _run_batches(model, processor, todo, path, chash, s)
    finally:
        model.train(was_training)


def evaluate(model, processor, records: Sequence, out_dir, settings: EvalSettings | None = None) -> dict:
    """Evaluate `records`; predictions go to out_dir/predictions_<name>[_<transform>][.shardIofN].jsonl, metrics
    returned.

    One greedy pass: the official protocol's 5 repeats would be identical under greedy decoding.
    Resumable: items already in the file under the same config hash are skipped; a file of another configuration
    is an error unless `settings.restart_stale`. `latency_s` per item is its batch's wall time divided by the batch
    size (amortised).
    """
    s = settings or EvalSettings()
    config = eval_config(model, processor, s)
    chash = runs.config_hash(config)
    path = predictions_path(out_dir, s.name, s.transform_name, s.shard)
    with writer_lock(path):  # a second process evaluating into this file is refused, never interleaved
        if s.restart_stale and discard_stale(path, chash):
            print(f"{path}: held predictions of another configuration; evaluating afresh")
        done = {(r["task_type"], r["id"]) for r in read_predictions(path, chash)}
        mine = shard_records(records, s.shard)
        todo = longest_first(processor, [r for r in mine if r.key not in done], s.demos_fn)
        gen_time, gen_tokens = _generate_in_eval_mode(model, processor, todo, path, chash, s)
        rows = rows_for(read_predictions(path, chash), mine)
    peak, peak_kind = peak_memory_bytes(next(model.parameters()).device)
    return {**summarize(rows), "config": config, "config_hash": chash, "predictions": str(path),
            "n_generated_now": len(todo),
            "cost": {**_param_cost(model), "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
                     "tokens_per_s": gen_tokens / gen_time if gen_time else None,
                     "items_per_s": len(todo) / gen_time if gen_time else None, "batch_size": s.batch_size}}


def evaluate_with_controls(model, processor, records: Sequence, out_dir, settings: EvalSettings | None = None) -> dict:
    """The image run plus the blind control (BLIND images); always-"A" and letter tables are in every summary."""
    settings = settings or EvalSettings()
    metrics = evaluate(model, processor, records, out_dir, settings)
    blind = evaluate(model, processor, records, out_dir, replace(settings, transform=BLIND))
    metrics["controls"] = {"always_A": metrics["always_A"],
                           "blind": {k: blind[k] for k in ("n", *(f"accuracy_{s}" for s in SCORERS), "scorers",
                                                           "predictions", "config_hash")}}
    return metrics


def evaluate_spec(spec, records: Sequence, out_dir, settings: EvalSettings, tier: str = "smoke") -> dict:
    """Load a model spec as every evaluation does (bases.load_for_eval), evaluate it with the controls (resuming
    from its prediction files), and free it before the next model loads."""
    import gc

    from spatialstudy.models.bases import load_for_eval  # lazy: importing the harness pulls in no pretraining

    model, processor = load_for_eval(spec, tier=tier)
    metrics = evaluate_with_controls(model, processor, records, out_dir, settings)
    del model, processor
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"spec": str(spec), **metrics}


# ---------------------------------------------------------------- command line
def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; anything else is a usage error."""
    import argparse

    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _parser():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint dir, cached hub name or tiny spec")
    ap.add_argument("--tier", default="smoke", help="pretraining tier of a tiny spec (the stage's profile)")
    ap.add_argument("--data", required=True, help="OmniSpatial-format folder (data.json + <task_type>/*.png)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="model")
    ap.add_argument("--n", type=int, default=None, help="fixed stratified subset size (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-style", default="manual_cot", choices=PROMPT_STYLES)
    ap.add_argument("--transform", default=None, choices=sorted(TRANSFORMS), help="image transform (blind control)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--shard", type=parse_shard, default=None, help="i/n: evaluate the i-th of n shards")
    how.add_argument("--merge", type=int, default=None, help="n: merge n finished shards instead of evaluating")
    how.add_argument("--distributed", action="store_true",
                     help="under torchrun: this process evaluates shard RANK of WORLD_SIZE; rank 0 then merges")
    return ap


def _settings(args, shard=None) -> EvalSettings:
    return EvalSettings(name=args.name, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        prompt_style=args.prompt_style, transform=TRANSFORMS.get(args.transform), shard=shard)


def _evaluate_distributed(args, records) -> dict | None:
    """Shard RANK of WORLD_SIZE (torchrun's environment) on cuda:LOCAL_RANK (else the CPU); after a barrier rank 0
    merges the shards and returns the merged metrics, the other ranks None. A rank that fails makes torchrun stop
    the others, so nobody waits forever."""
    import torch.distributed as dist

    from spatialstudy.models.bases import load_for_eval  # lazy: importing the harness pulls in no pretraining

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = f"cuda:{local}" if torch.cuda.is_available() else None
    if device:
        torch.cuda.set_device(device)  # what allocates on the "current" GPU stays on this rank's own
    dist.init_process_group("gloo", timeout=SHARD_WAIT)  # gloo: the barrier is all we need, on any device
    try:
        if rank:
            dist.barrier()  # rank 0 loads first: a tiny base not yet cached is pretrained once, not once per rank
        model, processor = load_for_eval(args.model, tier=args.tier, device=device)
        if not rank:
            dist.barrier()
        evaluate(model, processor, records, args.out, _settings(args, (rank, world)))
        dist.barrier()
        return None if rank else merge_shards(args.out, args.name, world, records=records,
                                                  transform=args.transform)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    """CLI: evaluate one model (all of it, one shard, or every shard under torchrun) on a local OmniSpatial-format
    folder, or merge shards. Loads models as the stages do (bases.load_for_eval), so the results merge with theirs."""
    from spatialstudy.models.bases import load_for_eval  # lazy: importing the harness pulls in no pretraining
    from spatialstudy.data import load_omnispatial

    ap = _parser()
    args = ap.parse_args(argv)
    if args.distributed and "RANK" not in os.environ:
        ap.error("--distributed runs under torchrun: "
                 "torchrun --standalone --nproc-per-node N -m spatialstudy.evaluation.eval ...")
    records = eval_subset(load_omnispatial(args.data), args.n, args.seed)
    if args.merge:
        metrics = merge_shards(args.out, args.name, args.merge, records=records, transform=args.transform)
    elif args.distributed:
        metrics = _evaluate_distributed(args, records)
    else:
        model, processor = load_for_eval(args.model, tier=args.tier)
        metrics = evaluate(model, processor, records, args.out, _settings(args, args.shard))
    if metrics is not None:  # None: a rank other than 0, whose shard rank 0 has merged
        print(json.dumps({k: metrics[k] for k in ("n", "accuracy_official", "accuracy_lenient", "predictions")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
