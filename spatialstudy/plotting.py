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


def accuracy_bars(series: dict, chance: float | dict | None = None, title: str = "", ylabel: str = "accuracy (%)",
                  paired: bool = False):
    """Grouped bars with 95% CI whiskers: series = {label: {group: (accuracy, lo, hi)}}; a dashed chance line,
    across the plot for a number, per group for {group: chance} (groups may differ in options per item).
    paired: series alternate (model, its control); a control is hatched in its model's lighter colour, so each
    model stands beside its own control."""
    import matplotlib.pyplot as plt
    import numpy as np

    setup_style()
    groups = list(dict.fromkeys(g for s in series.values() for g in s))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(groups) * max(1, len(series)) ** 0.5, 3.6))
    for k, (label, vals) in enumerate(series.items()):
        x = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
        acc = np.array([vals.get(g, (np.nan,) * 3)[0] for g in groups], float)
        err = np.array([[a - vals[g][1], vals[g][2] - a] if g in vals else [0, 0] for a, g in zip(acc, groups)]).T
        ax.bar(x, acc, width, yerr=err, capsize=2, label=label, **(_pair_style(k) if paired else {}))
    _chance_line(ax, chance, groups)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 100))
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    return fig


def _pair_style(k: int) -> dict:
    """Bar k of (model, control) pairs: the pair's palette colour; the control light and hatched."""
    import seaborn as sns

    colour = sns.color_palette()[(k // 2) % len(sns.color_palette())]
    return {"color": colour} if k % 2 == 0 else {"color": (*colour, 0.35), "edgecolor": colour, "hatch": "//"}


def _chance_line(ax, chance: float | dict | None, groups: list) -> None:
    """Dashed chance level: one line for a number, a segment over each group's bars for {group: chance}."""
    if chance is None:
        return
    if not isinstance(chance, dict):
        ax.axhline(chance, ls="--", c="0.3", lw=1, label=f"chance ({chance:.0f}%)")
        return
    x = [i for i, g in enumerate(groups) if g in chance]
    levels = [chance[groups[i]] for i in x]
    ax.hlines(levels, [i - 0.45 for i in x], [i + 0.45 for i in x], linestyles="--", colors="0.3", lw=1,
              label="chance")


def letter_heatmaps(tables: dict, letters: str = "ABCD"):
    """One predicted-vs-correct heatmap per model: tables = {label: {correct: {predicted: count}}}."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    setup_style()
    fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables), 3.0), squeeze=False)
    for ax, (label, table) in zip(axes.flat, tables.items()):
        preds = sorted({p for row in table.values() for p in row} | set(letters))
        grid = [[table.get(c, {}).get(p, 0) for p in preds] for c in letters]
        sns.heatmap(grid, annot=True, fmt="d", cbar=False, cmap="Blues", ax=ax, xticklabels=preds,
                    yticklabels=list(letters))
        ax.set(xlabel="predicted", ylabel="correct", title=label)
    fig.tight_layout()
    return fig
