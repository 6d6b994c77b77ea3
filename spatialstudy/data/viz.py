"""Figures for notebook 01_data: example grid, depth map + point cloud, grayscale, distributions. Each returns a
matplotlib Figure; saving is the caller's (plotting.savefig)."""
from __future__ import annotations

import textwrap
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np

from spatialstudy.data.scenes import point_cloud

WRAP = 34             # characters per line of question text under an image
FAR_FACTOR = 1.4      # depth map / point cloud shown up to this times the farthest object pixel


def _style() -> None:
    try:
        from spatialstudy.plotting import setup_style
        setup_style()
    except ImportError:
        pass


def _fields(rec):
    """(image, question, options, answer index or None, caption) for an Item, OmniRecord or SpaceRecord."""
    if hasattr(rec, "images"):                            # SpaceRecord: free answer
        return rec.images[0], rec.question, rec.choices or [], rec.correct, f"answer: {rec.answer}"
    img = rec.image
    return img, rec.question, rec.options, rec.answer, getattr(rec, "family", None) or rec.task_type


def example_grid(records, n: int = 8, cols: int = 4):
    """Images with their question, options (correct one marked) and family / answer."""
    _style()
    records = list(records)[:n]
    rows = max(1, int(np.ceil(len(records) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, rec in zip(axes.flat, records):
        img, q, opts, ans, caption = _fields(rec)
        ax.imshow(img)
        lines = textwrap.wrap(q, WRAP)[:4]
        lines += [("* " if i == ans else "  ") + textwrap.shorten(f"{chr(65 + i)}. {o}", WRAP) for i, o in
                  enumerate(opts)]
        if not opts and ans is not None:
            lines.append(f"* {chr(65 + ans)} (options drawn in the image)")
        lines.append(textwrap.shorten(caption, WRAP))
        ax.set_title("\n".join(lines), fontsize=7, loc="left", family="monospace")
    fig.tight_layout()
    return fig


def scene_figure(scene):
    """One scene: the RGB image, its depth map, the back-projected point cloud (top view) and grayscale."""
    _style()
    fig = plt.figure(figsize=(14, 3.6))
    ax = fig.add_subplot(1, 4, 1)
    ax.imshow(scene.image)
    ax.set_title("RGB render")
    ax = fig.add_subplot(1, 4, 2)
    far = FAR_FACTOR * scene.rend.depth[scene.rend.ids >= 0].max()       # the ground runs to the horizon: clip
    depth = np.where(np.isfinite(scene.rend.depth), scene.rend.depth, np.nan)
    im = ax.imshow(depth, cmap="magma_r", vmin=0, vmax=far)
    fig.colorbar(im, ax=ax, fraction=0.046, label="depth (m)")
    ax.set_title("depth map")
    ax = fig.add_subplot(1, 4, 3, projection="3d")
    pts, ids = point_cloud(scene.rend, scene.cam)
    keep = (np.random.default_rng(0).random(len(pts)) < 0.35) & (pts[:, 2] < far)   # thinned, near ground only
    cols = np.array([np.array(scene.objs[i].rgb) / 255 if i >= 0 else (0.6, 0.6, 0.6) for i in ids[keep]])
    ax.scatter(pts[keep, 0], pts[keep, 2], pts[keep, 1], c=cols, s=1)
    ax.scatter(*scene.geom.centroid[:, [0, 2, 1]].T, c="k", marker="x", s=40, label="recovered centroids")
    ax.set(xlabel="x (m)", ylabel="z (m)", zlabel="y (m)", title="point cloud")
    ax.legend(fontsize=7, loc="upper left")
    ax = fig.add_subplot(1, 4, 4)
    ax.imshow(scene.image.convert("L"), cmap="gray", vmin=0, vmax=255)
    ax.set_title("grayscale")
    for a in fig.axes:
        if a.name != "3d" and a.images:
            a.set_xticks([]), a.set_yticks([])
    fig.tight_layout()
    return fig


def grayscale_figure(images, titles=None):
    """Colour images above their grayscale versions (what the grayscale-input experiments see)."""
    _style()
    images = list(images)
    fig, axes = plt.subplots(2, len(images), figsize=(2.6 * len(images), 5.4), squeeze=False)
    for j, img in enumerate(images):
        axes[0, j].imshow(img)
        axes[1, j].imshow(img.convert("L"), cmap="gray", vmin=0, vmax=255)
        axes[0, j].set_title(titles[j] if titles else "", fontsize=8)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.tight_layout()
    return fig


def _counts(x) -> dict:
    return dict(x) if isinstance(x, (dict, Counter)) else dict(Counter(x))


def distribution_figure(panels: dict):
    """Bar charts, one per panel: {"family": counts or values, "task type": ..., "correct letter": ...}."""
    _style()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [max(3, len(_counts(v))) for v in panels.values()]})
    for ax, (title, vals) in zip(axes.flat, panels.items()):
        c = _counts(vals)
        keys = sorted(c)
        ax.bar(range(len(keys)), [c[k] for k in keys], color="C0")
        ax.set_xticks(range(len(keys)), keys, rotation=60 if len(keys) > 4 else 0, ha="right" if len(keys) > 4
                      else "center", fontsize=7 if len(keys) > 8 else 9)
        ax.set(title=title, ylabel="items")
    fig.tight_layout()
    return fig
