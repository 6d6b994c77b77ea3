"""Real-size Qwen2.5-VL-3B / -7B architectures, random weights, on a GPU: prefill and decode timed apart.

    python benchmarks/gpu_generation.py                     # on the GPU machine: both sizes, batch 1 and 32
    python benchmarks/gpu_generation.py --check             # anywhere: a tiny config on the CPU, to test the script

Random weights never emit EOS on purpose, so every request decodes exactly --new-tokens tokens (min = max).
Prompts are realistic OmniSpatial requests: an image of one of --images sizes (its real number of vision tokens)
plus --text-tokens text tokens (the official manual-CoT prompt with question and options). Prefill is one
`generate(max_new_tokens=1)`; decode is the rest of a full `generate`, so decode time = full - prefill.
Writes reports/benchmarks/gpu_generation.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spatialstudy.models.qwen import REAL_TOKEN_IDS, real_config  # noqa: E402

# Median text tokens of the official manual-CoT prompt (system text + question + lettered options + format line)
# over 200 generated benchmark items, counted with the real Qwen2.5 tokenizer: 291 (273-334), plus chat markup.
TEXT_TOKENS = 300
IMAGES = ["448x448", "1008x756"]  # a small image (256 vision tokens) and a typical photo (972 vision tokens)
PATCH, MERGE = 14, 2


def request(width: int, height: int, text_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(input_ids, pixel_values, grid_thw) of one request: text, <vision_start>, image pads, <vision_end>, text."""
    gh, gw = height // PATCH, width // PATCH
    n_image = gh * gw // MERGE ** 2
    text = torch.randint(0, 150_000, (text_tokens,), generator=gen)  # ordinary (non-special) token ids
    ids = torch.cat([text[:20], torch.tensor([REAL_TOKEN_IDS["vision_start_token_id"]]),
                     torch.full((n_image,), REAL_TOKEN_IDS["image_token_id"]),
                     torch.tensor([REAL_TOKEN_IDS["vision_end_token_id"]]), text[20:]])
    pixels = torch.randn(gh * gw, 3 * 2 * PATCH * PATCH, generator=gen)  # channels x temporal patch x patch^2
    return ids, pixels, [1, gh, gw]


def batch_inputs(n: int, size: str, text_tokens: int, device, dtype) -> dict:
    """A batch of `n` same-length requests (no padding: every request has the same shape)."""
    w, h = map(int, size.split("x"))
    gen = torch.Generator().manual_seed(0)
    reqs = [request(w, h, text_tokens, gen) for _ in range(n)]
    ids = torch.stack([r[0] for r in reqs]).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.cat([r[1] for r in reqs]).to(device, dtype),
            "image_grid_thw": torch.tensor([r[2] for r in reqs], device=device)}


def timed_generate(model, inputs: dict, new_tokens: int, device) -> float:
    """Seconds for one greedy generate of exactly `new_tokens` tokens."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model.generate(**inputs, min_new_tokens=new_tokens, max_new_tokens=new_tokens, do_sample=False)
    sync()
    return time.perf_counter() - t0


def bench_case(model, batch: int, size: str, args, device, dtype) -> dict:
    """Prefill and decode time, throughput and peak memory for one (batch, image size)."""
    inputs = batch_inputs(batch, size, args.text_tokens, device, dtype)
    timed_generate(model, inputs, 4, device)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill = min(timed_generate(model, inputs, 1, device) for _ in range(args.repeats))
    full = timed_generate(model, inputs, args.new_tokens, device)
    decode = full - prefill
    prompt = inputs["input_ids"].shape[1]
    return {"batch": batch, "image": size, "prompt_tokens": prompt, "new_tokens": args.new_tokens,
            "prefill_s": round(prefill, 4), "decode_s": round(decode, 3), "total_s": round(full, 3),
            "prefill_tokens_per_s": round(batch * prompt / prefill), "decode_tokens_per_s": round(batch * (args.new_tokens - 1) / decode, 1),
            "decode_ms_per_step": round(1000 * decode / (args.new_tokens - 1), 2),
            "latency_per_request_s": round(full, 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def build(size: str, device, dtype, check: bool, attn: str):
    """A random-weight model of the real architecture (or a shrunken one with --check), built on the device."""
    cfg = real_config(size)
    if check:  # same code path, toy sizes
        cfg.text_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2))
        cfg.vision_config.update(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                      fullatt_block_indexes=[1]))
        cfg.text_config.rope_parameters["mrope_section"] = [2, 3, 3]
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.eval()


def markdown(report: dict) -> str:
    lines = ["# Real-size Qwen2.5-VL architectures on a GPU (random weights): prefill vs decode", "",
             f"{report['device']}; torch {report['torch']}, transformers {report['transformers']}, {report['dtype']}, "
             f"attention `{report['attn']}`; greedy, exactly {report['new_tokens']} new tokens per request "
             f"(random weights never stop); text part of each prompt {report['text_tokens']} tokens.", "",
             "| model | params | batch | image | prompt tok | prefill s | prefill tok/s | decode ms/step | "
             "decode tok/s | total s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for c in m["cases"]:
            lines.append(f"| {m['size']} | {m['params'] / 1e9:.2f} B | {c['batch']} | {c['image']} | {c['prompt_tokens']} | "
                         f"{c['prefill_s']} | {c['prefill_tokens_per_s']} | {c['decode_ms_per_step']} | "
                         f"{c['decode_tokens_per_s']} | {c['total_s']} | {c['peak_memory_gib']} |")
        lines.append(f"| {m['size']} weights only | | | | | | | | | | {m['weights_gib']} |")
    return "\n".join(lines) + "\n"


def main(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.check else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import transformers

    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
              "attn": args.attn, "new_tokens": args.new_tokens, "text_tokens": args.text_tokens, "models": []}
    for size in args.sizes:
        model = build(size, device, dtype, args.check, args.attn)
        weights = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
        row = {"size": size, "params": sum(p.numel() for p in model.parameters()),
               "weights_gib": round(weights, 2) if weights else None, "cases": []}
        for batch in args.batches:
            for image in args.images:
                row["cases"].append(bench_case(model, batch, image, args, device, dtype))
                print(json.dumps({"size": size, **row["cases"][-1]}), flush=True)
        report["models"].append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["3B", "7B"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--images", nargs="+", default=IMAGES)
    ap.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="prefill timings per case (the fastest is kept)")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--check", action="store_true", help="toy sizes on the CPU: tests the script, measures nothing")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "reports" / "benchmarks"))
    args = ap.parse_args()
    if args.check:
        args.new_tokens, args.batches, args.images = 8, [1, 2], ["112x112"]
    rep = main(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_generation_check" if args.check else "gpu_generation"
    (out / f"{name}.json").write_text(json.dumps(rep, indent=2))
    (out / f"{name}.md").write_text(markdown(rep))
    print(markdown(rep))
