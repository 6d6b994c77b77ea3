"""One validated config per notebook, built from its papermill parameters cell (typos and wrong types fail loudly).

Kept free of heavy imports so the runner can check params/<profile>/*.yaml before starting a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

from spatialstudy.runs import StageConfig


@dataclass
class DataConfig(StageConfig):
    """01_data: build (procedural) or load (real, local) the SpaceThinker- and OmniSpatial-format sets."""

    spacethinker_path: str = ""   # local remyxai/SpaceThinker copy; "" = the procedural embedded default
    omnispatial_path: str = ""    # local qizekun/OmniSpatial test folder or zip; "" = procedural
    n_train: int = 200            # procedural SpaceThinker-format train rows
    n_test: int = 40              # procedural SpaceThinker-format test rows
    n_omni: int = 40              # procedural OmniSpatial-format test items
    image_size: int = 112         # procedural image side in pixels
    palette: str = "distinct"     # "distinct" (brightness differs) | "equal_brightness"

    def __post_init__(self):
        super().__post_init__()
        if self.palette not in ("distinct", "equal_brightness"):
            raise ValueError(f"palette must be 'distinct' or 'equal_brightness', got {self.palette!r}")
        for name in ("n_train", "n_test", "n_omni", "image_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


CONFIGS = {"01_data": DataConfig}
