"""Accuracy-vs-steps and accuracy-vs-time curves, as PNG."""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_open

logger = logging.getLogger(__name__)


def plot_curves(history: list[dict], path: Path, title: str) -> bool:
    """Draw the curves into `path`; False (and one logged line) without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [h["step"] for h in history]
    minutes = [h["wall_seconds"] / 60 for h in history]
    for key in ("eval", "dev"):
        if f"{key}_accuracy" in history[0]:
            acc = [h[f"{key}_accuracy"] for h in history]
            a.plot(steps, acc, marker="o", label=key)
            b.plot(minutes, acc, marker="o", label=key)
    a.set_xlabel("steps")
    a.set_ylabel("accuracy")
    b.set_xlabel("wall-clock minutes (training and evaluations)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


def plot_compare(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy vs minutes of steps, one colour per arm: the mean over its seeds (each seed's
    accuracy held from one evaluation to the next) and the band from the lowest to the
    highest seed. An arm with a run whose peak RSS exceeded the budget is drawn dashed.
    False (and one logged line) without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        seeds = {s: [r for r in mine if r["seed"] == s] for s in dict.fromkeys(r["seed"] for r in mine)}
        grid, mean, low, high = seed_band(list(seeds.values()))
        over = any(r["over_budget"] for r in mine)
        how_many = f"{len(seeds)} seed" + "s" * (len(seeds) != 1)
        label = f"{arm}: {mine[0]['model']} ({mine[0]['engine']}, {how_many})" + (" OVER BUDGET" if over else "")
        line, = ax.plot(grid, mean, linestyle="--" if over else "-", label=label)
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("minutes of training steps (evaluations excluded)")
    ax.set_ylabel("eval accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title, 100), fontsize=10)  # a spec's title can outrun the figure
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


def _pyplot(path: Path) -> Any:
    """matplotlib's pyplot on the Agg backend, imported only to draw; None without the `plots` extra."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        logger.warning(f"{path} not drawn: plots need the 'plots' extra: pip install 'ortzo[plots]'")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def seed_band(runs: list[list[dict]], points: int = 200) -> tuple[np.ndarray, ...]:
    """Minutes of steps (up to where the shortest run ends) and, at each, the mean, lowest and
    highest accuracy over the runs, each run's accuracy held from one evaluation to the next:
    runs evaluate at different seconds, so their rows cannot be averaged row by row."""
    grid = np.linspace(0, min(run[-1]["train_seconds"] for run in runs) / 60, points)
    held = []
    for run in runs:
        minutes = np.array([r["train_seconds"] for r in run]) / 60
        acc = np.array([r["eval_accuracy"] for r in run])
        held.append(acc[np.searchsorted(minutes, grid, side="right") - 1])
    held = np.array(held)
    return grid, held.mean(0), held.min(0), held.max(0)
