"""Normalised record types shared by the generator's files and the real datasets, and the load report that makes
every skipped record inspectable."""
from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

log = logging.getLogger("spatialstudy.data")
MAX_MESSAGES = 20          # skip messages kept verbatim in a LoadReport (the counts are always complete)


class DataError(ValueError):
    """A record or file that fails validation; the message names the file and the record."""


@dataclass
class OmniRecord:
    """One OmniSpatial multiple-choice item; `key` = (task_type, id) because ids repeat across task types."""

    task_type: str
    sub_task_type: str
    id: str
    question: str
    options: list[str]
    answer: int
    letter: str
    image_path: Path
    family: str | None = None
    partition: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.task_type, self.id)

    @property
    def image(self) -> Image.Image:
        """The decoded RGB image; a file that cannot be decoded is a DataError naming it and this record."""
        try:
            with Image.open(self.image_path) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - re-raised with the record named
            raise DataError(f"{self.image_path}: image of record (task_type={self.task_type!r}, id={self.id!r}) "
                            f"cannot be decoded ({e})") from e


class LazyImages(Sequence):
    """A list of images decoded on access (RGB), so 11k real rows do not sit decoded in memory."""

    def __init__(self, sources: list, where: str = ""):
        self.sources, self.where = sources, where     # each: encoded bytes or a file path

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        src = self.sources[i]
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - re-raised with the row named
            raise DataError(f"{self.where}: image {i} cannot be decoded ({e})") from e

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} image(s) of {self.where})"


@dataclass
class SpaceRecord:
    """One SpaceThinker row: image(s), question, reasoning (<think>), answer (<answer>), the raw output."""

    images: Sequence
    question: str
    reasoning: str
    answer: str
    output: str
    family: str | None = None
    choices: list[str] | None = None
    correct: int | None = None
    row: int = -1
    source: str = ""


@dataclass
class LoadReport:
    """What a loader read: totals, skips by reason (with on_error='skip') and the first messages verbatim."""

    source: str
    n_total: int = 0
    n_loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def as_dict(self) -> dict:
        return {"source": self.source, "n_total": self.n_total, "n_loaded": self.n_loaded,
                "n_skipped": self.n_skipped, "skipped": dict(self.skipped), "messages": list(self.messages)}


class Records(list):
    """A plain list of records that also carries its LoadReport as `.report`."""

    report: LoadReport


_LAST: dict[str, LoadReport] = {}


def last_report(kind: str | None = None) -> LoadReport | None:
    """The report of the most recent load ('omnispatial' / 'spacethinker', or the latest of either)."""
    if kind is None:
        return _LAST.get("latest")
    return _LAST.get(kind)


def finish(records: list, report: LoadReport, kind: str) -> Records:
    """Attach the report, remember it for last_report(), and log any skips (nothing is dropped silently)."""
    out = Records(records)
    report.n_loaded = len(records)
    out.report = report
    _LAST[kind] = _LAST["latest"] = report
    if report.n_skipped:
        log.warning("%s: skipped %d of %d records: %s", report.source, report.n_skipped, report.n_total,
                    dict(report.skipped))
    return out


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
