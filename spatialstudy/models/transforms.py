"""Named image transforms: the blind control, the grayscale ablation and its hue control, shared by every method
and pretraining.

Below the evaluation harness, so pretraining's held-out measurement blanks images exactly as the harness's blind
control does without importing the harness.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

BLANK_RGB = (128, 128, 128)   # the blind control's image: uniform grey, same size
LUMA = np.array([0.299, 0.587, 0.114])   # ITU-R BT.601 weights: the brightness PIL's convert("L") computes
HUE_DEGREES = 120.0           # red -> green -> blue -> red: every hue moves to another, brightness stays
_CB, _CR = 2 * (1 - LUMA[2]), 2 * (1 - LUMA[0])   # YCbCr scales: Cb = (B - Y) / 1.772, Cr = (R - Y) / 1.402


@dataclass(frozen=True)
class ImageTransform:
    """A named change to every query image (a control or an ablation); the name enters the run's config hash and
    its predictions file name. Demo images (ICL) are the method's and stay as given."""

    name: str
    fn: Callable[[Image.Image], Image.Image]


def _rotated_chroma(rgb: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """(luma Y [...], chroma offsets rgb - Y [..., 3]) after rotating (Cb, Cr) by `degrees`. G is solved from
    Y = w . rgb, so the offsets carry no luma: w . offset = 0 exactly."""
    y = rgb @ LUMA
    cb, cr = (rgb[..., 2] - y) / _CB, (rgb[..., 0] - y) / _CR
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r, b = y + _CR * (s * cb + c * cr), y + _CB * (c * cb - s * cr)
    g = (y - LUMA[0] * r - LUMA[2] * b) / LUMA[1]
    return y, np.stack([r, g, b], -1) - y[..., None]


def _gamut_scale(y: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The largest s in [0, 1] per pixel with y + s * offset inside [0, 255] on every channel. The grey (Y, Y, Y)
    is always inside and the RGB cube is convex, so shrinking the chroma towards it reaches the cube without
    changing luma (a bright yellow turned blue cannot stay saturated at its brightness: it becomes a pale blue)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(offset > 0, (255 - y[..., None]) / offset,
                        np.where(offset < 0, -y[..., None] / offset, np.inf))
    return np.clip(room.min(-1), 0.0, 1.0)


def hue_rotate(image: Image.Image, degrees: float = HUE_DEGREES) -> Image.Image:
    """Every pixel's hue turned by `degrees` in the (Cb, Cr) plane, its BT.601 luma kept: out-of-gamut colours lose
    chroma (never luma), and rounding to 8 bits moves luma by at most 0.5, so PIL's "L" value changes by at most 1."""
    rgb = np.asarray(image.convert("RGB"), dtype=float)
    y, offset = _rotated_chroma(rgb, degrees)
    out = y[..., None] + _gamut_scale(y, offset)[..., None] * offset
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


BLIND = ImageTransform("blind", lambda im: Image.new("RGB", im.size, BLANK_RGB))
GRAYSCALE = ImageTransform("grayscale", lambda im: im.convert("L").convert("RGB"))
# the grayscale ablation's control: brightness kept, colour kept but wrong (separates "colour removed" from "images
# unlike training")
HUE_PERMUTED = ImageTransform("hue_permuted", hue_rotate)
TRANSFORMS = {t.name: t for t in (BLIND, GRAYSCALE, HUE_PERMUTED)}
