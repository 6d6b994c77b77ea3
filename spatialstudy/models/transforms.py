"""Named image transforms: the blind control and the grayscale ablation, shared by every method and pretraining.

Below the evaluation harness, so pretraining's held-out measurement blanks images exactly as the harness's blind
control does without importing the harness.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image

BLANK_RGB = (128, 128, 128)   # the blind control's image: uniform grey, same size


@dataclass(frozen=True)
class ImageTransform:
    """A named change to every query image (a control or an ablation); the name enters the run's config hash and
    its predictions file name. Demo images (ICL) are the method's and stay as given."""

    name: str
    fn: Callable[[Image.Image], Image.Image]


BLIND = ImageTransform("blind", lambda im: Image.new("RGB", im.size, BLANK_RGB))
GRAYSCALE = ImageTransform("grayscale", lambda im: im.convert("L").convert("RGB"))
TRANSFORMS = {t.name: t for t in (BLIND, GRAYSCALE)}
