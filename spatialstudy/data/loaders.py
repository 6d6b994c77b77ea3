"""The one reading path for generated and real data: local copies of remyxai/SpaceThinker (hub parquet layout or a
save_to_disk folder) and qizekun/OmniSpatial (unzipped test folder or the zip), validated record by record.

on_error="raise" stops at the first bad record with a message naming the file and the record; on_error="skip" leaves
bad records out and counts them: the returned list's `.report` (a LoadReport) and `last_report()` say how many and
why, and a warning is logged. File-level problems (no data file, a missing column) always raise.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

from PIL import Image

from spatialstudy.data.records import (DataError, LazyImages, LoadReport, OmniRecord, SpaceRecord, check_on_error,
                                       finish)

# --- SpaceThinker ---
USER_TURN = re.compile(r"<\|start_header_id\|>\s*user\s*<\|end_header_id\|>\s*(.*?)\s*(?:<\|eot_id\|>|$)", re.DOTALL)
HEADER = re.compile(r"<\|(?:start_header_id|end_header_id|eot_id|begin_of_text)\|>")
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
IMAGE_COLUMNS = ("images", "image")
BATCH_ROWS = 256


def extract_question(text: str) -> str:
    """The user turn of Llama-3 header markup (any whitespace, system turn optional); plain text if no markup."""
    m = USER_TURN.search(text)
    if m:
        return m.group(1).strip()
    if HEADER.search(text):
        raise ValueError("header markup without a user turn")
    return text.strip()


def _image_sources(value, base: Path) -> list:
    """Encoded bytes (or a file path) of each image; accepts a list of {bytes, path} structs or a single struct."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for im in items:
        if isinstance(im, dict) and im.get("bytes"):
            out.append(bytes(im["bytes"]))
        elif isinstance(im, dict) and im.get("path"):
            p = Path(im["path"])
            out.append(p if p.is_absolute() else base / p)
        elif isinstance(im, Image.Image):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            out.append(buf.getvalue())
        else:
            raise ValueError(f"image entry is neither bytes nor a path: {str(im)[:80]}")
    if not out:
        raise ValueError("no image")
    return out


def _verify(src) -> None:
    """Integrity check: verify() checks the structure (PNG chunk CRCs), load() decodes every pixel, which catches
    truncated or corrupt image data that verify() lets through (for JPEG it checks nothing)."""
    for check in ("verify", "load"):
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            getattr(im, check)()


def _space_row(row: dict, where: str, i: int, base: Path) -> SpaceRecord:
    for col in ("input", "output"):
        if not isinstance(row.get(col), str):
            raise ValueError(f"field {col!r} is missing or not a string")
    img_col = next(c for c in IMAGE_COLUMNS if c in row)
    try:
        srcs = _image_sources(row[img_col], base)
        for s in srcs:
            _verify(s)
    except Exception as e:  # noqa: BLE001 - any PIL failure means a corrupt image
        raise ValueError(f"missing or corrupt image ({e})") from e
    think, answer = _think_and_answer(row["output"])
    question = extract_question(row["input"])
    if not question:
        raise ValueError("empty question in 'input'")
    choices, correct = _choices(row)
    return SpaceRecord(LazyImages(srcs, f"{where} row {i}"), question, think, answer, row["output"],
                       row.get("family"), choices, correct, i, where)


def _think_and_answer(output: str) -> tuple[str, str]:
    """(reasoning, answer): the answer is the <answer> outside every <think> block; one inside only is a draft."""
    think = THINK.search(output)
    if not think:
        raise ValueError("output lacks <think>...</think>")
    ans = ANSWER.search(THINK.sub("", output))
    if not ans:
        if ANSWER.search(output):
            raise ValueError("<answer> found only inside <think>; the output has no final answer")
        raise ValueError("output lacks <answer>...</answer>")
    if not ans.group(1).strip():
        raise ValueError("empty <answer></answer>")
    return think.group(1).strip(), ans.group(1).strip()


def _choices(row: dict):
    """Generator-only columns: exact options (JSON list) and the correct index; absent in real rows."""
    raw = row.get("choices")
    if raw is None:
        return None, None
    try:
        choices = json.loads(raw) if isinstance(raw, str) else list(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"choices is not a JSON list of options ({e})") from e
    _check_options(choices, "choices")
    correct = row.get("correct")
    if isinstance(correct, bool) or not isinstance(correct, int):
        raise ValueError(f"correct={correct!r} is not an integer")
    if not 0 <= correct < len(choices):
        raise ValueError(f"correct={correct} out of range for {len(choices)} choices")
    return choices, correct


def _shards(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    for d in (path / "data", path):
        found = sorted(d.glob(f"{split}-*.parquet")) or sorted(d.glob(f"{split}.parquet"))
        if found:
            return found
    return []


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _iter_parquet(shard: Path):
    """(row index, row) of one shard; a corrupt shard is a DataError naming it, wherever pyarrow notices."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(shard)
        _check_columns(pf.schema_arrow.names, shard)
        i = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                yield i, row
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{shard}: corrupt or unreadable parquet shard ({e}); re-download or rewrite this "
                        "shard") from e


def _iter_saved(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} in the saved dataset (has {sorted(ds)})")
        ds = ds[split]
    _check_columns(ds.column_names, path)
    ds = ds.with_format("arrow")         # raw {bytes, path} image structs, no decoding
    for start in range(0, len(ds), BATCH_ROWS):
        for j, row in enumerate(ds[start:start + BATCH_ROWS].to_pylist()):
            yield start + j, row


def _check_columns(names, where) -> None:
    missing = [c for c in ("input", "output") if c not in names]
    if not any(c in names for c in IMAGE_COLUMNS):
        missing.append("images")
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; a SpaceThinker file needs input, output and images "
                        f"(has {list(names)})")


def load_spacethinker(path, split: str = "train", on_error: str = "raise") -> list[SpaceRecord]:
    """Read a local SpaceThinker copy (data/<split>-*.parquet shards, or a save_to_disk folder) into SpaceRecords."""
    check_on_error(on_error)
    path = Path(path)
    report, records = LoadReport(f"{path} [{split}]"), []
    if _is_saved_dataset(path):
        sources = [(path, _iter_saved(path, split))]
    else:
        shards = _shards(path, split)
        if not shards:
            raise DataError(f"{path}: no {split}-*.parquet under {path}/data or {path}, and not a save_to_disk "
                            "folder; point at the local remyxai/SpaceThinker copy")
        sources = [(s, _iter_parquet(s)) for s in shards]
    for where, rows in sources:
        base = where.parent if where.is_file() else where
        for i, row in rows:
            report.n_total += 1
            try:
                records.append(_space_row(row, str(where), i, base))
            except (ValueError, KeyError, TypeError) as e:
                msg = f"{where} row {i}: {e}"
                if on_error == "raise":
                    raise DataError(msg + "; fix the row or pass on_error='skip'") from e
                report.skip(_reason(e), msg)
    return finish(records, report, "spacethinker")


def _reason(e: Exception) -> str:
    """A short category for the skip counter (the first key found in the message, in this order)."""
    s = str(e)
    for key in REASONS:
        if key in s:
            return REASONS[key] or key
    return type(e).__name__


REASONS = {"image": "bad_image", "lacks": "missing_tag", "missing": "missing_field", "range": "answer_out_of_range",
           "integer": "answer_not_integer", "inside": "answer_only_in_think", "empty": "empty_field",
           "option": "bad_options", "not a string": "wrong_type", "duplicate": None, "markup": None}


def _check_options(opts: list, field: str) -> None:
    """Options are strings (never silently str()-ed: a number or None there means a broken record), at most A-D."""
    if len(opts) > N_LETTERS:
        raise ValueError(f"{field} has {len(opts)} options, more than the {N_LETTERS} letters A-D")
    for k, o in enumerate(opts):
        if not isinstance(o, str):
            raise ValueError(f"{field}: option {k} is {type(o).__name__} {o!r}, not a string")


# --- OmniSpatial ---
OMNI_FIELDS = ("id", "question", "options", "answer", "task_type", "sub_task_type")
N_LETTERS = 4


def image_path_for(root: Path, task_type: str, item_id: str) -> Path:
    """<root>/<task_type>/<id before the first "_">.png: several questions share one image."""
    return root / task_type / f"{str(item_id).split('_')[0]}.png"


def _extract_zip(zpath: Path) -> Path:
    """Unzip once into the cache (keyed by size and mtime) and return the folder."""
    try:
        from spatialstudy.runs import cache_dir
        base = cache_dir("omnispatial_zip")
    except ImportError:                      # data is the lowest layer; runs.py is optional here
        import tempfile
        base = Path(tempfile.gettempdir()) / "spatialstudy_omnispatial_zip"
    st = zpath.stat()
    key = hashlib.sha1(f"{zpath.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = Path(base) / f"{zpath.stem}-{key}"
    if not (out / ".complete").exists():
        try:
            with zipfile.ZipFile(zpath) as zf:
                zf.extractall(out)
        except zipfile.BadZipFile as e:
            raise DataError(f"{zpath}: not a readable zip file ({e})") from e
        (out / ".complete").touch()
    return out


def _find_data_json(path: Path) -> Path:
    if path.is_file() and path.suffix == ".zip":
        path = _extract_zip(path)
    if path.is_file() and path.name.endswith(".json"):
        return path
    for pattern in ("data.json", "*/data.json", "*/*/data.json"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    raise DataError(f"{path}: no data.json found (looked in the folder and two levels below); point at the "
                    "unzipped OmniSpatial-test folder or the zip")


def _omni_record(e, idx: int, root: Path, checked: dict) -> OmniRecord:
    if not isinstance(e, dict):
        raise ValueError("entry is not an object")
    missing = [f for f in OMNI_FIELDS if f not in e or e[f] is None]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    opts, ans = e["options"], e["answer"]
    if not isinstance(opts, list):
        raise ValueError(f"options must be a list, got {type(opts).__name__}")
    _check_options(opts, "options")
    if not isinstance(e["question"], str):
        raise ValueError(f"question is {type(e['question']).__name__}, not a string")
    if not e["question"].strip():
        raise ValueError("empty question")
    n = len(opts) if opts else N_LETTERS       # empty options: the four choices are drawn in the image
    if isinstance(ans, bool) or not isinstance(ans, int):
        raise ValueError(f"answer {ans!r} is not an integer (the index of the correct option)")
    if not 0 <= ans < n:
        raise ValueError(f"answer {ans!r} out of range for {len(opts)} option(s)" +
                         (" (empty options: A-D)" if not opts else ""))
    img = image_path_for(root, e["task_type"], e["id"])
    if img not in checked:
        try:
            _verify(img)
            checked[img] = None
        except Exception as err:  # noqa: BLE001
            checked[img] = f"missing or corrupt image {img} ({err})"
    if checked[img]:
        raise ValueError(checked[img])
    return OmniRecord(str(e["task_type"]), str(e["sub_task_type"]), str(e["id"]), str(e["question"]),
                      [str(o) for o in opts], ans, chr(65 + ans), img, e.get("family"), e.get("partition"))


def load_omnispatial(path, on_error: str = "raise") -> list[OmniRecord]:
    """Read data.json + images of a local OmniSpatial copy (folder or zip) into OmniRecords, validating each."""
    check_on_error(on_error)
    jpath = _find_data_json(Path(path))
    try:
        data = json.loads(jpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{jpath}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DataError(f"{jpath}: expected a JSON list of items, got {type(data).__name__}")
    report, records, seen, checked = LoadReport(str(jpath), n_total=len(data)), [], {}, {}
    for idx, e in enumerate(data):
        label = f"{jpath} record {idx} (task_type={e.get('task_type')!r}, id={e.get('id')!r})" \
            if isinstance(e, dict) else f"{jpath} record {idx}"
        try:
            rec = _omni_record(e, idx, jpath.parent, checked)
            if rec.key in seen:
                raise ValueError(f"duplicate key (task_type, id)={rec.key}, first at record {seen[rec.key]}")
            seen[rec.key] = idx
            records.append(rec)
        except (ValueError, TypeError) as err:
            if on_error == "raise":
                raise DataError(f"{label}: {err}; fix the record or pass on_error='skip'") from err
            report.skip(_reason(err), f"{label}: {err}")
    return finish(records, report, "omnispatial")
