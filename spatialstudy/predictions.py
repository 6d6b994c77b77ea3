"""Prediction files of the evaluation harness: one jsonl row per item, appended per batch, resumable, shardable.

A row is keyed by (task_type, id) and carries the config hash of the run that wrote it; a file never mixes hashes,
so resuming trusts only rows of the same configuration. Shard i of n holds every n-th record in key order.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from spatialstudy import runs
from spatialstudy.scoring import summarize


def predictions_path(out_dir, name: str, blind: bool = False, shard=None) -> Path:
    """out_dir/predictions_<name>[_blind][.shardIofN].jsonl"""
    stem = f"predictions_{name}" + ("_blind" if blind else "")
    return Path(out_dir) / (stem + (f".shard{shard[0]}of{shard[1]}" if shard else "") + ".jsonl")


def read_predictions(path: Path, config_hash: str | None = None) -> list[dict]:
    """Rows of a predictions file; a torn last line (crash mid-write) is cut off, a foreign config hash refused."""
    path = Path(path)
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):  # a torn write, even if it happens to parse
                    break
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        os.truncate(path, good_bytes)
    bad = {r["config_hash"] for r in rows} - {config_hash} if config_hash else set()
    if bad:
        raise ValueError(f"{path} holds predictions of another configuration (hash {sorted(bad)}, this run "
                         f"{config_hash}); delete the file, pass overwrite=True, or use another out_dir/name")
    return rows


def discard_stale(path, config_hash: str) -> bool:
    """Delete `path` if it holds predictions of another configuration (a pipeline stage re-run after its model or
    settings changed); True if it did. A file of this configuration is kept, so the run resumes."""
    try:
        read_predictions(path, config_hash)
    except ValueError:
        Path(path).unlink()
        return True
    return False


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append one batch and fsync, so a crash loses at most the batch in flight."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def shard_records(records: Sequence, shard: tuple[int, int] | None) -> list:
    """Shard i of n: every n-th record in key order, so shards are disjoint and cover everything."""
    if shard is None:
        return list(records)
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    return sorted(records, key=lambda r: r.key)[i::n]


def rows_for(rows: list[dict], records: Sequence) -> list[dict]:
    """The rows of `records` (a file may hold more, from a larger subset), in record order, one per key."""
    by_key = {(r["task_type"], r["id"]): r for r in rows}
    return [by_key[r.key] for r in records if r.key in by_key]


def merge_shards(out_dir, name: str, n_shards: int, records: Sequence | None = None, blind: bool = False) -> dict:
    """Concatenate shard files into predictions_<name>.jsonl (one config hash, no gaps) and summarise them."""
    rows = []
    for i in range(n_shards):
        path = predictions_path(out_dir, name, blind, (i, n_shards))
        if not path.exists():
            raise FileNotFoundError(f"shard {i}/{n_shards} missing: {path}; run it with shard=({i}, {n_shards})")
        rows += read_predictions(path)
    hashes = {r["config_hash"] for r in rows}
    if len(hashes) > 1:
        raise ValueError(f"shards of {name!r} in {out_dir} were run with different configs: {sorted(hashes)}")
    if records is not None:
        missing = [r.key for r in records if r.key not in {(x["task_type"], x["id"]) for x in rows}]
        if missing:
            raise ValueError(f"merged shards lack {len(missing)} item(s), e.g. {missing[:3]}; re-run those shards")
        rows = rows_for(rows, records)
    out = predictions_path(out_dir, name, blind)
    runs.atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {**summarize(rows), "config_hash": hashes.pop() if hashes else None, "predictions": str(out)}
