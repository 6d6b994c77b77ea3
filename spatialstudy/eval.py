"""The one evaluation harness every method uses: OmniSpatial official prompt, batched greedy decoding, resumable.

Protocol (qizekun/OmniSpatial vlms_eval, prompt_type=manual_cot, eval_type=re): one user turn [image, text], the
text = manual-CoT system text + "Answer: X" format text + question + "\\nA. ..." option lines (none when the options
are drawn in the image). The official README averages 5 repeats; decoding here is greedy (do_sample=False), so the
5 repeats would be identical and ONE pass is run. Both scorers (spatialstudy.scoring) are stored per item; with
prompt_style="direct" the official scorer applies the benchmark's direct rule (first character of the stripped,
upper-cased reply; see scoring.OFFICIAL_RULES), recorded in the run's config as `official_rule`.

    python -m spatialstudy.eval --model tiny-student --data runs/smoke/01_data/OmniSpatial-test --out runs/ev --shard 0/2
    python -m spatialstudy.eval --model tiny-student --data runs/smoke/01_data/OmniSpatial-test --out runs/ev --merge 2
"""
from __future__ import annotations

import hashlib
import json
import random
import resource
import time
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from spatialstudy import runs
from spatialstudy.predictions import (append_rows, discard_stale, merge_shards, predictions_path, read_predictions,
                                      rows_for, shard_records, writer_lock)
from spatialstudy.scoring import LETTERS, SCORERS, extract_answer, official_rule, paired_difference, summarize

__all__ = ["PROMPT_STYLES", "eval_subset", "build_messages", "evaluate", "evaluate_with_controls", "merge_shards",
           "extract_answer", "paired_difference", "generate_batch", "model_cost"]

PROMPT_STYLES = ("manual_cot", "direct")
BLANK_RGB = (128, 128, 128)          # the blind control's image: uniform grey, same size (as pretrain.py)
PIXELS_PER_VISUAL_TOKEN = 28 * 28    # Qwen2.5-VL: 14 px patches merged 2x2; used only to sort requests by length
HARNESS_VERSION = 2                  # bump when prompts, scoring or row fields change: invalidates resumable files
FINGERPRINT_SLICE = 16               # elements per weight tensor hashed into the model fingerprint


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


def load_image(record, blind: bool = False) -> Image.Image:
    """The record's RGB image, or a blank one of the same size for the blind control."""
    path = Path(record.image_path)
    if not path.exists():
        raise FileNotFoundError(f"image of record {record.key} not found: {path} (re-run the data stage?)")
    with Image.open(path) as im:
        return Image.new("RGB", im.size, BLANK_RGB) if blind else im.convert("RGB")


def build_messages(record, prompt_style: str = "manual_cot", blind: bool = False, demos=()) -> list[dict]:
    """Qwen chat messages for one record: demo turns (ICL) then the query [image, official prompt]."""
    from spatialstudy.data.prompts import chat_messages, omnispatial_prompt

    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    prompt = omnispatial_prompt(record.question, list(record.options), style=prompt_style)
    return chat_messages(prompt, load_image(record, blind), demos=demos)


def message_images(messages: list[dict]) -> list[Image.Image]:
    """Every image in the messages, in the order the chat template places their tokens."""
    return [c["image"] for m in messages if isinstance(m["content"], list)
            for c in m["content"] if c.get("type") == "image"]


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


def eval_config(model, processor, *, max_new_tokens, prompt_style, blind, extra=None) -> dict:
    """Everything that changes an item's prediction; batch size and sharding deliberately excluded."""
    return {"harness": HARNESS_VERSION, "model": model_fingerprint(model), "processor": processor_identity(processor),
            "max_new_tokens": max_new_tokens, "prompt_style": prompt_style, "official_rule": official_rule(prompt_style),
            "blind": blind, "extra": extra or {}}


# ---------------------------------------------------------------- generation
def _eos_ids(model, processor) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids | {processor.tokenizer.pad_token_id} if i is not None}


def _n_generated(seq: list[int], stop: set[int]) -> int:
    """Generated tokens up to and including the first stop token (the rest is padding)."""
    return next((i + 1 for i, t in enumerate(seq) if t in stop), len(seq))


@torch.inference_mode()
def generate_batch(model, processor, messages: list[list[dict]], max_new_tokens: int) -> list[dict]:
    """Greedy, left-padded, KV-cached generation for a batch of chats -> [{raw, new_tokens, prompt_tokens}]."""
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    images = [im for m in messages for im in message_images(m)]
    inputs = processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                         pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    raw = processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stop, prompt_len = _eos_ids(model, processor), inputs["attention_mask"].sum(1).tolist()
    return [{"raw": r, "new_tokens": _n_generated(s, stop), "prompt_tokens": int(p)}
            for r, s, p in zip(raw, new, prompt_len)]


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


def _request_length(processor, record) -> int:
    """Approximate prompt length (question + options tokens + visual tokens), only for sorting into batches."""
    with Image.open(record.image_path) as im:
        visual = im.size[0] * im.size[1] // PIXELS_PER_VISUAL_TOKEN
    return len(processor.tokenizer(record.question + " ".join(record.options))["input_ids"]) + visual


# ---------------------------------------------------------------- cost
def model_cost(model) -> dict:
    """Total and trainable parameters (a 4-bit layer counts its packed storage, as bitsandbytes reports it)."""
    params = list(model.parameters())
    return {"params_total": sum(p.numel() for p in params),
            "params_trainable": sum(p.numel() for p in params if p.requires_grad)}


def peak_memory_bytes(device) -> tuple[int, str]:
    """CUDA max_memory_allocated since the evaluation started, else the process's lifetime RSS peak."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss_peak"  # Linux reports KiB


# ---------------------------------------------------------------- the harness
def _run_batches(model, processor, todo, path, chash, *, max_new_tokens, batch_size, prompt_style, blind,
                 demos_fn, on_batch, desc) -> tuple[float, int]:
    """Generate, score and append batch after batch; returns (generation seconds, generated tokens)."""
    gen_time, gen_tokens = 0.0, 0
    with tqdm(total=len(todo), desc=desc, disable=desc is None) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            msgs = [build_messages(r, prompt_style, blind, demos_fn(r) if demos_fn else ()) for r in batch]
            t0 = time.perf_counter()
            gens = generate_batch(model, processor, msgs, max_new_tokens)
            wall = time.perf_counter() - t0
            rows = [score_row(r, {**g, "latency_s": wall / len(batch), "batch_size": len(batch)}, chash, prompt_style)
                    for r, g in zip(batch, gens)]
            append_rows(path, rows)
            gen_time, gen_tokens = gen_time + wall, gen_tokens + sum(g["new_tokens"] for g in gens)
            bar.update(len(batch))
            if on_batch:
                on_batch(rows)
    return gen_time, gen_tokens


def evaluate(model, processor, records: Sequence, *, out_dir, max_new_tokens: int = 64, batch_size: int = 8,
             prompt_style: str = "manual_cot", blind: bool = False, shard: tuple[int, int] | None = None,
             progress: bool = True, name: str = "model", demos_fn: Callable | None = None,
             config_extra: dict | None = None, overwrite: bool = False, restart_stale: bool = False,
             on_batch: Callable | None = None) -> dict:
    """Evaluate `records`; predictions go to out_dir/predictions_<name>[_blind][.shardIofN].jsonl, metrics returned.

    One greedy pass: the official protocol's 5 repeats would be identical under greedy decoding.
    Resumable: items already in the file under the same config hash are skipped. `demos_fn(record)` gives ICL
    demo turns; put anything that changes them (k, index) in `config_extra` so the hash tells runs apart.
    A file of another configuration is an error, unless `restart_stale` (a stage that owns its run dir) drops it.
    `latency_s` per item is its batch's wall time divided by the batch size (amortised).
    """
    config = eval_config(model, processor, max_new_tokens=max_new_tokens, prompt_style=prompt_style, blind=blind,
                         extra=config_extra)
    chash = runs.config_hash(config)
    path = predictions_path(out_dir, name, blind, shard)
    with writer_lock(path):  # a second process evaluating into this file is refused, never interleaved
        if overwrite:
            path.unlink(missing_ok=True)
        elif restart_stale and discard_stale(path, chash):
            print(f"{path}: held predictions of another configuration; evaluating afresh")
        done = {(r["task_type"], r["id"]) for r in read_predictions(path, chash)}
        mine = shard_records(records, shard)
        todo = sorted((r for r in mine if r.key not in done), key=lambda r: _request_length(processor, r))
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        was_training = model.training
        model.eval()  # dropout off: greedy decoding must be a pure function of the inputs
        try:
            gen_time, gen_tokens = _run_batches(model, processor, todo, path, chash, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size, prompt_style=prompt_style, blind=blind,
                                                demos_fn=demos_fn, on_batch=on_batch,
                                                desc=f"eval {name}{' blind' if blind else ''}" if progress else None)
        finally:
            model.train(was_training)
        rows = rows_for(read_predictions(path, chash), mine)
    metrics = summarize(rows)
    peak, peak_kind = peak_memory_bytes(device)
    metrics.update(config=config, config_hash=chash, predictions=str(path), n_generated_now=len(todo),
                   cost={**model_cost(model), "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
                         "tokens_per_s": gen_tokens / gen_time if gen_time else None,
                         "items_per_s": len(todo) / gen_time if gen_time else None, "batch_size": batch_size})
    return metrics


def evaluate_with_controls(model, processor, records: Sequence, **kw) -> dict:
    """The image run plus the blind control (blank images); always-"A" and letter tables are in every summary."""
    metrics = evaluate(model, processor, records, blind=False, **kw)
    blind = evaluate(model, processor, records, blind=True, **kw)
    metrics["controls"] = {"always_A": metrics["always_A"],
                           "blind": {k: blind[k] for k in ("n", *(f"accuracy_{s}" for s in SCORERS), "scorers",
                                                           "predictions")}}
    return metrics


def main(argv=None) -> int:
    """CLI: evaluate one model (or one shard of it) on a local OmniSpatial-format folder, or merge shards."""
    import argparse

    from spatialstudy.data import load_omnispatial
    from spatialstudy.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint dir, cached hub name or tiny spec")
    ap.add_argument("--data", required=True, help="OmniSpatial-format folder (data.json + <task_type>/*.png)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="model")
    ap.add_argument("--n", type=int, default=None, help="fixed stratified subset size (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-style", default="manual_cot", choices=PROMPT_STYLES)
    ap.add_argument("--blind", action="store_true")
    ap.add_argument("--shard", default=None, help="i/n: evaluate the i-th of n shards")
    ap.add_argument("--merge", type=int, default=None, help="n: merge n finished shards instead of evaluating")
    args = ap.parse_args(argv)
    records = eval_subset(load_omnispatial(args.data), args.n, args.seed)
    if args.merge:
        metrics = merge_shards(args.out, args.name, args.merge, records=records, blind=args.blind)
    else:
        shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
        model, processor = load_model(args.model, device_map="auto" if torch.cuda.is_available() else None)
        metrics = evaluate(model, processor, records, out_dir=args.out, name=args.name, shard=shard,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           prompt_style=args.prompt_style, blind=args.blind)
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy_official", "accuracy_lenient")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
