"""Models: the image-only Qwen2.5-VL processor, the tiny student/teacher specs, checkpoints and LoRA adapters.

`load_checkpoint(spec)` takes a local checkpoint dir or a name already in the local Hugging Face cache. Tiny specs
("tiny-student", "tiny-teacher": pretrained bases; "tiny-student-random" etc.: same config, random weights, for fast
tests) need pretraining, which sits above this module: load any spec with `spatialstudy.models.bases.load_model`.
The tiny pair keeps the real 3B/7B pair's mismatches in miniature (see TINY_SPECS).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil)
from transformers.processing_utils import ProcessorMixin

from spatialstudy.models.tokenizer import CHAT_TEMPLATE

TINY_PIXELS = 112 * 112  # 112 px -> 8x8 patches -> 16 image tokens; the learnability spike's working size
REAL_MIN_PIXELS = 256 * 28 * 28   # lmms-eval's Qwen2.5-VL pixel caps: fixed, so runs stay comparable
REAL_MAX_PIXELS = 2048 * 28 * 28


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video processor (which needs torchvision; the image path does not)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)


def make_processor(tokenizer, min_pixels: int = TINY_PIXELS, max_pixels: int = TINY_PIXELS, image_processor=None):
    """A real Qwen2.5-VL processor (PIL image path) around `tokenizer`, with the pixel budget configurable."""
    ip = image_processor or Qwen2VLImageProcessorPil()
    ip.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}  # what min/max_pixels map to
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    return ImageOnlyQwen2_5_VLProcessor(ip, tokenizer, chat_template=template)


def pixel_budget(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a processor's image processor."""
    size = processor.image_processor.size
    return int(size["shortest_edge"]), int(size["longest_edge"])


# ---------------------------------------------------------------- tiny specs
@dataclass(frozen=True)
class TinySpec:
    """A miniature Qwen2.5-VL: text decoder + vision tower sizes, embedding tying and vocab padding."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    tie_embeddings: bool
    vocab_multiple: int   # embedding rows rounded up to a multiple of this ...
    vocab_extra: int      # ... after adding this many spare rows (real 3B: 151,665 -> 151,936; 7B -> 152,064)


# Real pair: 3B = 16 heads x 36 layers, hidden 2048, tied, vocab 151,936; 7B = 28 heads x 28 layers, hidden 3584,
# untied, vocab 152,064; both head_dim 128 and the same ViT. Miniature: head_dim 32 for both, the teacher with more
# heads and fewer layers, a wider hidden size, untied embeddings and more vocab padding; the teacher's vision tower
# is wider too (at this scale vision capacity is what limits learning, per the learnability spike).
TINY_SPECS = {
    "student": TinySpec(hidden=96, layers=4, heads=3, kv_heads=1, intermediate=256, vision_depth=4, vision_hidden=64,
                        vision_heads=2, tie_embeddings=True, vocab_multiple=64, vocab_extra=0),
    "teacher": TinySpec(hidden=256, layers=3, heads=8, kv_heads=2, intermediate=768, vision_depth=4,
                        vision_hidden=128, vision_heads=4, tie_embeddings=False, vocab_multiple=128, vocab_extra=64),
}


# The real pair's published config.json values (Qwen/Qwen2.5-VL-{3B,7B}-Instruct), for random-weight benchmarks of
# real-size architectures on a GPU (no hub access anywhere here). Both share the 32-block ViT (hidden 1280).
REAL_TEXT = {
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
REAL_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                      vision_end_token_id=151653)


def real_config(size: str) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL-3B or -7B architecture ("3B" | "7B") as a config, for random-weight speed/memory checks."""
    t = REAL_TEXT[size]
    text = dict(t, max_position_embeddings=128000, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    vision = dict(REAL_VISION, out_hidden_size=t["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=t["tie_word_embeddings"],
                            **REAL_TOKEN_IDS)


def padded_vocab(n_tokens: int, spec: TinySpec) -> int:
    """Embedding rows: len(tokenizer) plus spare rows, rounded up (as Qwen pads 151,665 to 151,936 / 152,064)."""
    return math.ceil((n_tokens + spec.vocab_extra) / spec.vocab_multiple) * spec.vocab_multiple


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) as Qwen2.5-VL's 16:24:24 of 64."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t + 1) // 2, (half - t) // 2]


def tiny_config(spec: TinySpec, tokenizer) -> Qwen2_5_VLConfig:
    """A Qwen2_5_VLConfig for `spec`, with every special-token id taken from `tokenizer`."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]}
    head_dim = spec.hidden // spec.heads
    text = dict(vocab_size=padded_vocab(len(tokenizer), spec), hidden_size=spec.hidden,
                intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": _mrope_section(head_dim),
                                 "rope_theta": 1e6},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=spec.tie_embeddings)
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                  num_heads=spec.vision_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, out_hidden_size=spec.hidden,
                  fullatt_block_indexes=list(range(spec.vision_depth)))  # 112 px is one window: all full attention
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=spec.tie_embeddings)


def build_tiny(name: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised tiny Qwen2_5_VLForConditionalGeneration ("student" | "teacher"), seeded."""
    if name not in TINY_SPECS:
        raise KeyError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_SPECS)}")
    torch.manual_seed(seed)
    cfg = tiny_config(TINY_SPECS[name], tokenizer)
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)


def spec_summary(name: str) -> dict:
    """The spec of a tiny model as a dict (for configs, hashes and reports)."""
    return {"name": name, **asdict(TINY_SPECS[name])}


def count_params(model) -> dict[str, int]:
    """Total and trainable parameters (tied embeddings counted once; a 4-bit layer counts its packed storage, as
    bitsandbytes reports it)."""
    params = {id(p): p for p in model.parameters()}.values()
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


# ---------------------------------------------------------------- loading
def parse_tiny(spec: str) -> tuple[str, bool] | None:
    """"tiny-student" -> ("student", False); "tiny-teacher-random" -> ("teacher", True); otherwise None."""
    if not spec.startswith("tiny-"):
        return None
    name = spec[len("tiny-"):]
    random_init = name.endswith("-random")
    name = name[:-len("-random")] if random_init else name
    if name not in TINY_SPECS:
        raise KeyError(f"unknown tiny spec {spec!r}; choose tiny-{{{','.join(TINY_SPECS)}}}[-random]")
    return name, random_init


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A local checkpoint dir, or a hub name already in the local HF cache; offline, a clear error otherwise."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a checkpoint: it has no config.json")
        return path
    if str(spec).count("/") != 1 or path.exists():
        raise FileNotFoundError(f"model {str(spec)!r}: no such directory, and not a hub name like 'Qwen/Qwen2.5-VL-3B-"
                                f"Instruct' nor a tiny spec (tiny-student, tiny-teacher, ...)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(spec), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - every failure here means "not in the local cache"
        raise FileNotFoundError(
            f"model {spec!r} is not in the local Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')})"
            f" and this machine is offline. On a connected machine run:\n  huggingface-cli download {spec} "
            f"--local-dir /some/dir/{str(spec).split('/')[-1]}\nthen copy the folder here and pass its path as the "
            f"model spec.") from e


def quantization_config(compute_dtype=torch.float32, keep_unquantized=()):
    """4-bit NF4 with double quantisation (QLoRA's recipe); needs bitsandbytes. `keep_unquantized`: module-name
    prefixes left in full precision (transformers 5 matches them from the start of the name: ("model.visual",
    "lm_head") keeps the vision tower and the output layer whole)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("4-bit loading needs bitsandbytes: pip install 'spatialstudy[quant]'") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(keep_unquantized) or None)


def bnb_cpu_workaround(model) -> int:
    """Stop bitsandbytes 0.50 repacking 4-bit weights for CPU inference (training after it fails); returns count."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_processor(path: Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The image-only processor of a checkpoint dir (tiny or real), pixel budget overridable."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ip = Qwen2VLImageProcessorPil.from_pretrained(path)
    lo, hi = int(ip.size["shortest_edge"]), int(ip.size["longest_edge"])
    return make_processor(tok, min_pixels or lo, max_pixels or hi, image_processor=ip)


def load_checkpoint(spec, *, dtype=None, device_map=None, attn_implementation=None, quantize_4bit=False,
                    keep_unquantized=(), min_pixels=None, max_pixels=None):
    """(model, processor) of a checkpoint dir or a locally cached hub name. Tiny specs are not checkpoints until
    pretrained: load those with spatialstudy.models.bases.load_model. `quantize_4bit`: NF4 (quantization_config),
    with the modules named in `keep_unquantized` left whole."""
    if parse_tiny(str(spec)):
        raise ValueError(f"{spec!r} is a tiny spec: load it with spatialstudy.models.bases.load_model "
                         "(it pretrains the base)")
    path = resolve_checkpoint(spec)
    kw = dict(dtype=dtype or "auto", attn_implementation=attn_implementation)
    if device_map is not None:
        kw["device_map"] = device_map
    if quantize_4bit:
        compute = dtype if dtype and dtype != "auto" else torch.float32
        kw["quantization_config"] = quantization_config(compute, keep_unquantized)
        kw.setdefault("device_map", "cuda" if torch.cuda.is_available() else "cpu")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kw)
    if quantize_4bit:
        bnb_cpu_workaround(model)  # always: whether a CPU has avx512_bf16 varies
    return model.eval(), load_processor(path, min_pixels, max_pixels)


def load_checkpoint_for_eval(spec, *, device=None):
    """A checkpoint as every evaluation loads it: bf16 on CUDA (fp32 on the CPU) at lmms-eval's fixed pixel caps,
    on `device` (e.g. "cuda:1") or spread by "auto"."""
    cuda = torch.cuda.is_available()
    return load_checkpoint(spec, dtype=torch.bfloat16 if cuda else torch.float32,
                           device_map=device or ("auto" if cuda else None), min_pixels=REAL_MIN_PIXELS,
                           max_pixels=REAL_MAX_PIXELS)


# ---------------------------------------------------------------- LoRA adapters
def save_adapter(model, adapter_dir) -> Path:
    """Write a peft model's adapter (its LoRA weights and config, not the base) to `adapter_dir`."""
    model.save_pretrained(adapter_dir)
    return Path(adapter_dir)


def load_adapter(spec_or_model, adapter_dir, *, trainable: bool = False, **load_kw):
    """The base with the adapter in `adapter_dir` on top (a peft model): `spec_or_model` is a loaded base (a tiny
    one from spatialstudy.models.bases.load_model) or a checkpoint for load_checkpoint(spec, **load_kw). `trainable`
    keeps the adapter's weights trainable (to go on fine-tuning); otherwise they are frozen, for inference."""
    from peft import PeftModel

    base = spec_or_model
    if isinstance(spec_or_model, (str, os.PathLike)):
        base = load_checkpoint(spec_or_model, **load_kw)[0]
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
