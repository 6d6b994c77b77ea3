"""Prediction files of the evaluation harness: one jsonl row per item, appended per batch, resumable, shardable.

A row is keyed by (task_type, id) and carries the config hash of the run that wrote it; a file never mixes hashes,
so resuming trusts only rows of the same configuration. Shard i of n holds every n-th record in key order.

Only a torn last line (a crash mid-write) is ever cut; a corrupt earlier line is an error naming file and line, and
nothing already written is deleted for it. Writes take an exclusive lock (fcntl.flock on the sidecar <file>.lock);
`writer_lock(path)` holds it for a whole evaluation, so a second process writing the same file is refused.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from spatialstudy import runs
from spatialstudy.scoring import summarize

log = logging.getLogger("spatialstudy.evaluation.predictions")


def predictions_path(out_dir, name: str, transform: str | None = None, shard=None) -> Path:
    """out_dir/predictions_<name>[_<transform>][.shardIofN].jsonl; `transform` names the image transform of the
    run (e.g. "blind": predictions_<name>_blind.jsonl)."""
    stem = f"predictions_{name}" + (f"_{transform}" if transform else "")
    return Path(out_dir) / (stem + (f".shard{shard[0]}of{shard[1]}" if shard else "") + ".jsonl")


class CorruptPredictions(ValueError):
    """A line other than the last cannot be read: the file is left untouched and the line named."""


class ForeignConfig(ValueError):
    """The file holds rows of another configuration (config hash)."""


class PredictionsLocked(RuntimeError):
    """Another process holds the file's writer lock."""


class PredictionRows(list):
    """The rows of a predictions file; `skipped_lines` lists the corrupt lines left out (on_corrupt="skip")."""

    def __init__(self, rows=()):
        super().__init__(rows)
        self.skipped_lines: list[int] = []


ROW_KEYS = ("task_type", "id", "config_hash")
_HELD: dict[Path, int] = {}  # file -> lock fd held by this process; flock from a second fd would refuse ourselves


def lock_path(path) -> Path:
    """The sidecar lock file <file>.lock (the predictions file itself is replaced or cut, so it cannot hold one)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def writer_lock(path):
    """Hold the exclusive writer lock of a predictions file (re-entrant within a process). Another process holding
    it makes this raise PredictionsLocked naming the file and the holder's pid. Wrap a whole evaluation in it."""
    key = Path(path).resolve()
    if key in _HELD:
        yield
        return
    _HELD[key] = _acquire(Path(path))
    try:
        yield
    finally:
        _release(_HELD.pop(key))


def _acquire(path: Path) -> int:
    lp = lock_path(path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise PredictionsLocked(f"{path} is being written by another process (pid {holder}, lock {lp}); wait for "
                                "it to finish, stop it, or write to another out_dir/name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(fd: int) -> None:
    os.ftruncate(fd, 0)  # no stale pid left behind; the lock file itself stays (unlinking it would race)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _parse_line(line: bytes) -> dict:
    row = json.loads(line)
    if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
        raise ValueError(f"not a predictions row (needs {list(ROW_KEYS)})")
    return row


def _parse(path: Path, on_corrupt: str) -> tuple[PredictionRows, int | None]:
    """(rows, byte offset of a torn last line or None); a corrupt earlier line raises or is skipped."""
    rows, offset, torn = PredictionRows(), 0, None
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):  # only the last line can lack its newline: a write cut by a crash
                torn = offset
                break
            offset += len(line)
            try:
                rows.append(_parse_line(line))
            except ValueError as err:
                _corrupt_line(path, n, err, on_corrupt)
                rows.skipped_lines.append(n)
    return rows, torn


def _corrupt_line(path: Path, n: int, err: Exception, on_corrupt: str) -> None:
    if on_corrupt != "skip":
        raise CorruptPredictions(f"{path}, line {n}: unreadable predictions row ({err}); nothing was changed. Fix "
                                 "or delete that line, or read with on_corrupt='skip' to leave it out") from err


def _cut_torn_tail(path: Path, on_corrupt: str) -> PredictionRows | None:
    """Cut a torn last line under the writer lock (re-read there: the writer may have finished it meanwhile); None
    when another process holds the lock, since its line may still be in flight."""
    try:
        with writer_lock(path):
            rows, torn = _parse(path, on_corrupt)
            if torn is not None:
                os.truncate(path, torn)
            return rows
    except PredictionsLocked:
        return None


def read_predictions(path: Path, config_hash: str | None = None, on_corrupt: str = "raise") -> PredictionRows:
    """Rows of a predictions file. A torn last line (crash mid-write) is cut off; a corrupt earlier line raises
    CorruptPredictions naming file and line (on_corrupt="skip": left out and listed in `.skipped_lines`), and the
    file is never changed for it; a foreign config hash raises ForeignConfig."""
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
    path = Path(path)
    if not path.exists():
        return PredictionRows()
    rows, torn = _parse(path, on_corrupt)
    if torn is not None:
        cut = _cut_torn_tail(path, on_corrupt)
        rows = rows if cut is None else cut
    _check_hash(path, rows, config_hash)
    if rows.skipped_lines:
        log.warning("%s: skipped %d corrupt line(s): %s", path, len(rows.skipped_lines), rows.skipped_lines[:20])
    return rows


def _check_hash(path: Path, rows: list[dict], config_hash: str | None) -> None:
    bad = {r["config_hash"] for r in rows} - {config_hash} if config_hash else set()
    if bad:
        raise ForeignConfig(f"{path} holds predictions of another configuration (hash {sorted(bad)}, this run "
                            f"{config_hash}); delete the file, evaluate with restart_stale=True, or use another "
                            "out_dir/name")


def discard_stale(path, config_hash: str) -> bool:
    """Delete `path` if it holds predictions of another configuration (a pipeline stage re-run after its model or
    settings changed); True if it did. A file of this configuration is kept, so the run resumes; a corrupt one
    raises and is kept."""
    with writer_lock(path):
        try:
            read_predictions(path, config_hash)
        except ForeignConfig:
            Path(path).unlink()
            return True
    return False


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append one batch and fsync under the writer lock, so a crash loses at most the batch in flight and no two
    processes append at once (the second gets PredictionsLocked). Hold writer_lock(path) around a whole evaluation
    to refuse a second writer from its start, not only at a colliding append."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(path), open(path, "a", encoding="utf-8") as f:
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


def merge_shards(out_dir, name: str, n_shards: int, records: Sequence | None = None,
                 transform: str | None = None) -> dict:
    """Concatenate shard files into predictions_<name>.jsonl (one config hash, no gaps) and summarise them."""
    rows = []
    for i in range(n_shards):
        path = predictions_path(out_dir, name, transform, (i, n_shards))
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
    out = predictions_path(out_dir, name, transform)
    with writer_lock(out):
        runs.atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {**summarize(rows), "config_hash": hashes.pop() if hashes else None, "predictions": str(out)}


def headline_predictions(summary: dict, records, partition: str | None = None) -> list[dict]:
    """The headline prediction rows of an evaluation summary (read back from its predictions file under its config
    hash), in `records` order; one partition, or all. What scoring.paired_difference compares."""
    from spatialstudy.scoring import headline_rows

    rows = headline_rows(rows_for(read_predictions(summary["predictions"], summary["config_hash"]), records))
    return [r for r in rows if partition is None or r["partition"] == partition]
