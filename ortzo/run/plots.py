"""Accuracy-vs-steps and accuracy-vs-time curves, as PNG."""
from __future__ import annotations

from pathlib import Path

from ..files import atomic_open


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [h["step"] for h in history]
    minutes = [h["wall_seconds"] / 60 for h in history]
    for key in ("eval", "dev"):
        if f"{key}_accuracy" in history[0]:
            acc = [h[f"{key}_accuracy"] for h in history]
            a.plot(steps, acc, marker="o", label=key)
            b.plot(minutes, acc, marker="o", label=key)
    a.set_xlabel("MeZO steps")
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
