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


@dataclass
class BaselineConfig(StageConfig):
    """Parameters of the baseline stage (params/<profile>/baseline.yaml)."""

    n_eval: int = 40                 # size of the fixed evaluation subset; 0 = every test item
    eval_seed: int = 0               # seed of the stratified subset draw
    max_new_tokens: int = 32         # tiny bases answer in a few tokens; the official script allows 8192
    batch_size: int = 16
    prompt_style: str = "manual_cot"
    omnispatial_path: str = ""       # "" = the 01_data stage's procedural set; else a local OmniSpatial copy
    real_student: str = ""           # local Qwen2.5-VL-3B(-Instruct) checkpoint dir or cached hub name; "" = skip
    real_teacher: str = ""           # local Qwen2.5-VL-7B(-Instruct) likewise
    real_max_new_tokens: int = 2048  # real models reason before "Answer: X"; VLMEvalKit's cap

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_style not in ("manual_cot", "direct"):
            raise ValueError(f"prompt_style must be 'manual_cot' or 'direct', got {self.prompt_style!r}")
        for name in ("max_new_tokens", "batch_size", "real_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


CONFIGS = {"01_data": DataConfig, "baseline": BaselineConfig}
