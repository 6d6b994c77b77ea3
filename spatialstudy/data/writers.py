"""Write generated items in the real on-disk layouts, so one loader reads generated and real data:
- SpaceThinker: <root>/data/{train,test}-XXXXX-of-NNNNN.parquet with images = list<struct<bytes, path>>, Llama-3
  header markup in `input`, <think>/<answer> in `output`, `reasoning` = "on"; plus generator-only columns
  `family`, `choices` (JSON list) and `correct` that the loader reads when present.
- OmniSpatial: <root>/data.json + <root>/<task_type>/<id before "_">.png, reproducing the real file's quirks at a
  proportional scale (shared images, ids repeated across task types, empty-options items whose options are drawn
  into the image, 2-option items, repeated option strings). Every write goes to a temporary folder first and is
  renamed into place, so a crash never leaves a half-written dataset.
"""
from __future__ import annotations

import io
import json
import textwrap
import os
import shutil
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spatialstudy.data.families import PARTITIONS
from spatialstudy.data.generator import Item, make_items
from spatialstudy.data.streams import role_seed

# SpaceThinker's `input` (VQASynth r1_reasoning._format_input_string): two spaces after each header, a system turn
# "detailed thinking on", no <image> token, ending with the assistant header.
INPUT_TEMPLATE = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>  detailed thinking on"
                  "<|eot_id|><|start_header_id|>user<|end_header_id|>  {question}"
                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>")
OUTPUT_STYLES = ("<think>\n{r}\n</think>\n<answer>\n{a}\n</answer>",      # GPT-4o completions vary in spacing
                 "<think>{r}</think> <answer>{a}</answer>",
                 "<think>\n{r}\n</think>\n\n<answer>{a}</answer>")
REAL_SPACETHINKER = {"train": 11_413, "test": 1_250}
# Quirk rates of the real OmniSpatial data.json (1,533 items over 1,387 images).
REAL_OMNI_ITEMS = 1533
REAL_EMPTY_OPTIONS, REAL_TWO_OPTIONS, REAL_REPEATED = 229, 2, 476
DRAWN_OPTION_MAX_CHARS = 80       # empty-options items need options short enough to draw legibly ...
DRAWN_LINE_CHARS = 40             # ... on at most two lines of this many characters in the side panel


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _atomic_dir(final: Path, build) -> Path:
    """Build the folder under a temporary name beside `final`, then swap it in."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# --- SpaceThinker ---

def spacethinker_row(it: Item, rng) -> dict:
    """One row in the real column layout (plus the generator-only family/choices/correct columns)."""
    style = OUTPUT_STYLES[int(rng.integers(len(OUTPUT_STYLES)))]
    return {"images": [{"bytes": _png(it.image), "path": None}],
            "input": INPUT_TEMPLATE.format(question=it.question),
            "output": style.format(r=it.reasoning, a=it.free_answer),
            "reasoning": "on", "family": it.family, "choices": json.dumps(it.options), "correct": it.answer}


def write_parquet(rows: list[dict], path: Path) -> None:
    """Rows -> one parquet file with `images` as list<struct<bytes: binary, path: string>> (the datasets layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    types = {"images": pa.list_(img), "image": img, "correct": pa.int64()}
    cols = list(rows[0]) if rows else ["images", "input", "output"]
    schema = pa.schema([(c, types.get(c, pa.string())) for c in cols])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def spacethinker_items(split: str, n: int, seed: int = 0, image_size: int = 112, palette: str = "distinct",
                       families=None, partition: str | None = "sft", per_scene: int = 1) -> list[Item]:
    """The generated items of one SpaceThinker-format split, from that split's own stream."""
    return make_items(n, role_seed(seed, f"spacethinker_{split}"), partition, families, image_size, palette,
                      per_scene)


def write_spacethinker(out_dir, n_train: int, n_test: int, seed: int = 0, image_size: int = 112,
                       palette: str = "distinct", families=None, partition: str | None = "sft",
                       per_scene: int = 1, shards: int = 1) -> Path:
    """Write train/test splits of SpaceThinker-format rows (from the SFT families by default) to out_dir."""
    def build(tmp: Path):
        (tmp / "data").mkdir()
        for split, n in (("train", n_train), ("test", n_test)):
            items = spacethinker_items(split, n, seed, image_size, palette, families, partition, per_scene)
            rng = np.random.default_rng(role_seed(seed, f"spacethinker_{split}/rows"))
            rows = [spacethinker_row(it, rng) for it in items]
            k = max(1, min(shards, len(rows)))
            for j, part in enumerate(np.array_split(np.arange(len(rows)), k)):
                write_parquet([rows[i] for i in part], tmp / "data" / f"{split}-{j:05d}-of-{k:05d}.parquet")
    return _atomic_dir(Path(out_dir), build)


# --- OmniSpatial ---

def quirk_counts(n: int) -> dict:
    """Real quirk frequencies scaled to n items (at least one of each once the set is big enough)."""
    scale = n / REAL_OMNI_ITEMS
    return {"empty_options": max(1, round(REAL_EMPTY_OPTIONS * scale)) if n >= 10 else 0,
            "two_options": (2 if n >= 20 else 1) if n >= 5 else 0,
            "repeated_option": max(1, round(REAL_REPEATED * scale)) if n >= 5 else 0}


def draw_options(img: Image.Image, options: list[str]) -> Image.Image:
    """The image with a panel listing 'A. ...' to 'D. ...' on its right (as the real Complex_Logic images)."""
    w, h = img.size
    canvas = Image.new("RGB", (w * 3, h), "white")
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(8, h // 11))
    for i, opt in enumerate(options):
        text = "\n   ".join(textwrap.wrap(f"{chr(65 + i)}. {opt}", DRAWN_LINE_CHARS))
        draw.text((w + 4, 4 + i * h // 4), text, fill="black", font=font, spacing=1)
    return canvas


def _apply_quirks(items: list[Item], rng) -> list[dict]:
    """Per-item dicts with quirks assigned: empty options (Complex_Logic), two options, a repeated option."""
    entries = [dict(it=it, options=list(it.options), answer=it.answer, drawn=False) for it in items]
    want = quirk_counts(len(items))
    order = [int(i) for i in rng.permutation(len(items))]
    used = set()
    drawable, seen = [], Counter()
    for i in order:   # every second item of each family at most: each is also asked with listed options (headline)
        if items[i].task_type == "Complex_Logic" and max(map(len, items[i].options)) <= DRAWN_OPTION_MAX_CHARS:
            seen[items[i].family] += 1
            drawable += [i] if seen[items[i].family] % 2 == 0 else []
    empty = drawable[:want["empty_options"]]
    for i in empty:
        entries[i].update(options=[], drawn=True)
        used.add(i)
    two = [i for i in order if i not in used and len(items[i].options) > 2][:want["two_options"]]
    for i in two:                                                     # the correct option and one wrong one
        e = entries[i]
        keep = sorted([e["answer"], next(j for j in range(len(e["options"])) if j != e["answer"])])
        e.update(options=[e["options"][j] for j in keep], answer=keep.index(e["answer"]))
        used.add(i)
    # a wrong option copied over another wrong one (the real file repeats "can not determine"); four-option items
    rep = [i for i in order if i not in used and len(items[i].options) == 4][:want["repeated_option"]]
    for i in rep:
        e = entries[i]
        src, dst = [j for j in range(4) if j != e["answer"]][:2]
        e["options"][dst] = e["options"][src]
    return entries


def _assign_ids(entries: list[dict]) -> None:
    """ids "N_k": N numbers an image within its task type (so "0_0" recurs across task types), k its questions."""
    image_no, next_no, k_of = {}, defaultdict(int), defaultdict(int)
    for e in entries:
        it = e["it"]
        key = (it.task_type, it.scene_id, e["drawn"] and id(e))       # drawn-options items get their own image
        if key not in image_no:
            image_no[key] = next_no[it.task_type]
            next_no[it.task_type] += 1
        n = image_no[key]
        e["id"] = f"{n}_{k_of[(it.task_type, n)]}"
        k_of[(it.task_type, n)] += 1


# Share of the benchmark per partition. The real study's instruction-tuned bases start well above chance on much of
# OmniSpatial (the 3B at 43%); half of the embedded benchmark asks what the tiny bases were pretrained on, so a base's
# skill shows overall, and the other half measures what methods add (sft) and how far it transfers (test_only).
BENCHMARK_SHARES = {"base": 0.5, "sft": 0.25, "test_only": 0.25}


def partition_counts(n: int, shares: dict = BENCHMARK_SHARES) -> dict[str, int]:
    """Items per partition: floor(n * share), the remainder handed out in partition order; sums to n."""
    counts = {p: int(n * shares[p]) for p in PARTITIONS}
    for p in PARTITIONS[:n - sum(counts.values())]:
        counts[p] += 1
    return counts


def benchmark_items(n: int, seed: int, image_size: int, palette: str, partition=None, families=None,
                    per_scene: int = 2, role: str = "benchmark") -> list[Item]:
    """The test set's items: BENCHMARK_SHARES of each partition (base, sft, test_only), tagged, unless one
    partition or explicit families are asked for; each partition from its own stream of `role`."""
    if partition is not None or families is not None:
        return make_items(n, role_seed(seed, role), partition, families, image_size, palette, per_scene)
    items, scenes = [], 0
    for part, share in partition_counts(n).items():
        part_items = make_items(share, role_seed(seed, f"{role}/{part}"), part, None, image_size, palette, per_scene)
        for it in part_items:
            it.scene_id += scenes                 # scene ids stay unique: they decide which items share an image
        scenes = max((it.scene_id for it in items + part_items), default=-1) + 1
        items += part_items
    return items


def write_omnispatial(out_dir, n: int, seed: int = 0, image_size: int = 112, palette: str = "distinct",
                      partition: str | None = None, families=None, per_scene: int = 2) -> Path:
    """Write an OmniSpatial-layout test set of n items (all partitions by default, tagged) to out_dir."""
    items = benchmark_items(n, seed, image_size, palette, partition, families, per_scene)
    entries = _apply_quirks(items, np.random.default_rng(role_seed(seed, "benchmark_quirks")))
    _assign_ids(entries)

    def build(tmp: Path):
        data = []
        for e in entries:
            it = e["it"]
            img_path = tmp / it.task_type / f"{e['id'].split('_')[0]}.png"
            if not img_path.exists():
                img_path.parent.mkdir(exist_ok=True)
                (draw_options(it.image, it.options) if e["drawn"] else it.image).save(img_path)
            q = it.question + (" Choose one of the options A-D shown in the image." if e["drawn"] else "")
            data.append({"id": e["id"], "question": q, "options": e["options"], "answer": e["answer"],
                         "task_type": it.task_type, "sub_task_type": it.sub_task_type,
                         "family": it.family, "partition": it.partition})
        (tmp / "data.json").write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    return _atomic_dir(Path(out_dir), build)


def zip_folder(folder, zip_path) -> Path:
    """Zip an OmniSpatial folder as the release does (the folder name as the top-level entry); atomic."""
    folder, zip_path = Path(folder), Path(zip_path)
    tmp = zip_path.with_name(f".{zip_path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, Path(folder.name) / p.relative_to(folder))
    tmp.replace(zip_path)
    return zip_path
