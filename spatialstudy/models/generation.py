"""Greedy, batched, KV-cached generation: the one way any method turns chat messages into answers.

Below the evaluation harness (eval.py) and pretraining's held-out measurement alike, so both generate the same way
and neither imports the other.
"""
from __future__ import annotations

import copy

import torch
from PIL import Image

GREEDY = {"do_sample": False, "num_beams": 1, "use_cache": True}   # one greedy pass with a KV cache


def message_images(messages: list[dict]) -> list[Image.Image]:
    """Every image in the messages, in the order the chat template places their tokens."""
    return [c["image"] for m in messages if isinstance(m["content"], list)
            for c in m["content"] if c.get("type") == "image"]


def generation_config(model, processor, max_new_tokens: int):
    """What generate() runs with: the checkpoint's own generation config (it may set e.g. a repetition penalty,
    which greedy decoding still applies) under the harness's greedy settings, as generate() merges them."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.update(max_new_tokens=max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id, **GREEDY)
    return cfg


def generation_identity(model, processor, max_new_tokens: int) -> dict:
    """The generation settings that differ from transformers' defaults, without bookkeeping fields (the library
    version would split shards of one run across machines)."""
    diff = generation_config(model, processor, max_new_tokens).to_diff_dict()
    return {k: v for k, v in diff.items() if k not in ("transformers_version", "_from_model_config")}


def _eos_ids(cfg) -> set[int]:
    eos = cfg.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids | {cfg.pad_token_id} if i is not None}


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
    cfg = generation_config(model, processor, max_new_tokens)
    out = model.generate(**inputs, generation_config=cfg)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    raw = processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stop, prompt_len = _eos_ids(cfg), inputs["attention_mask"].sum(1).tolist()
    return [{"raw": r, "new_tokens": _n_generated(s, stop), "prompt_tokens": int(p)}
            for r, s, p in zip(raw, new, prompt_len)]


_RSS_PEAK_RESET = False   # whether this process has restarted its RSS high-water mark (reset_peak_memory)


def reset_peak_memory(device) -> None:
    """Start a fresh peak before a run (an evaluation, a training): CUDA's allocator counter, or on Linux the
    process's RSS high-water mark (writing "5" to /proc/self/clear_refs), so each run reports its own peak rather
    than the process's lifetime one (which, after a teacher was loaded, would be the teacher's for every model)."""
    global _RSS_PEAK_RESET
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _RSS_PEAK_RESET = True
    except OSError:   # not Linux, or not permitted: the lifetime peak is what there is
        pass


def peak_memory_bytes(device) -> tuple[int, str]:
    """CUDA max_memory_allocated since the last reset; on CPU the process's RSS peak since reset_peak_memory (the
    whole process: every model loaded at the time counts), else its lifetime RSS peak."""
    import resource

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    if _RSS_PEAK_RESET:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return hwm * 1024, "process_rss_peak_since_reset"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss_peak"  # Linux reports KiB
