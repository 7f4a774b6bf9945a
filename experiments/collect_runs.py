"""Put the metrics of run folders made by `ortzo finetune` (not `ortzo compare`) into one curves
CSV in compare's columns, and plot it as compare does, so one-off runs sit beside an ablation:

    python experiments/collect_runs.py OUT.csv "TITLE" ARM=RUN_FOLDER [ARM=RUN_FOLDER ...]

writes OUT.csv and OUT.png (accuracy against minutes of steps, one line per arm)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ortzo import jsonl
from ortzo.run.plots import plot_compare

COLUMNS = ["arm", "seed", "model", "engine", "step", "train_seconds", "wall_seconds", "eval_accuracy", "eval_loss",
           "eval_examples", "peak_rss_mib", "over_budget"]


def rows(arm: str, run: Path) -> list[dict]:
    cfg = json.loads((run / "config.json").read_text())
    history, _ = jsonl.read(run / "metrics.jsonl")
    return [{"arm": arm, "seed": cfg["seed"], "model": Path(cfg["model"]).name, "engine": cfg["engine"],
             "over_budget": False} | {k: h.get(k) for k in COLUMNS[4:-1]} for h in history]


def main(out: str, title: str, *arms: str) -> None:
    table = [r for spec in arms for r in rows(*_arm(spec))]
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    plot_compare(table, Path(out).with_suffix(".png"), title)


def _arm(spec: str) -> tuple[str, Path]:
    arm, _, run = spec.partition("=")
    return arm, Path(run)


if __name__ == "__main__":
    main(*sys.argv[1:])
