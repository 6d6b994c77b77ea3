"""One plotting style for every figure, saved as PNG + SVG with deterministic metadata."""
from __future__ import annotations

from pathlib import Path

import matplotlib

from spatialstudy import runs

STYLE = dict(context="paper", style="whitegrid", palette="colorblind")
DPI = 150


def setup_style() -> None:
    """Seaborn's paper/whitegrid/colorblind theme, and SVGs that do not change from run to run."""
    import seaborn as sns

    sns.set_theme(**STYLE)
    matplotlib.rcParams.update({"svg.hashsalt": "spatialstudy", "figure.dpi": 100, "savefig.bbox": "tight"})


def figures_dir(profile: str) -> Path:
    """reports/figures/<profile>/; the ci tier writes under runs/ci/figures so tests never touch reports/."""
    base = runs.run_dir("ci", "figures") if profile == "ci" else runs.root() / "reports" / "figures" / profile
    base.mkdir(parents=True, exist_ok=True)
    return base


def savefig(fig, name: str, profile: str) -> list[Path]:
    """Save `fig` as <name>.png and <name>.svg; no timestamps or software tags, so reruns diff cleanly."""
    out = figures_dir(profile)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.savefig(paths[0], dpi=DPI, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Date": None, "Creator": None})
    return paths
