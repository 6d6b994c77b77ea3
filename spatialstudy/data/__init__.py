"""Data layer: procedural 3D spatial scenes (the embedded default), the real SpaceThinker / OmniSpatial layouts,
one validated reading path for both, multiple-choice conversion and the official OmniSpatial prompts."""
from spatialstudy.data.families import FAMILIES, PARTITIONS, SUBTASK_FAMILIES, Family, families_in
from spatialstudy.data.generator import Item, make_items, summarize, throughput
from spatialstudy.data.loaders import load_omnispatial, load_spacethinker
from spatialstudy.data.mcq import MCQ, MCQConversionError, to_mcq, to_mcq_batch
from spatialstudy.data.prompts import chat_messages, omnispatial_prompt
from spatialstudy.data.records import DataError, LoadReport, OmniRecord, SpaceRecord, last_report
from spatialstudy.data.scenes import palette, sample_scene
from spatialstudy.data.writers import write_omnispatial, write_spacethinker, zip_folder

__all__ = [
    "FAMILIES", "PARTITIONS", "SUBTASK_FAMILIES", "Family", "families_in", "Item", "make_items", "summarize",
    "throughput", "load_omnispatial", "load_spacethinker", "MCQ", "MCQConversionError", "to_mcq", "to_mcq_batch",
    "chat_messages", "omnispatial_prompt", "DataError", "LoadReport", "OmniRecord", "SpaceRecord", "last_report",
    "palette", "sample_scene", "write_omnispatial", "write_spacethinker", "zip_folder", "build_datasets",
]


def build_datasets(*args, **kwargs):
    """See spatialstudy.data.build.build_datasets (imported lazily: it pulls in the figure helpers)."""
    from spatialstudy.data.build import build_datasets as _build
    return _build(*args, **kwargs)
