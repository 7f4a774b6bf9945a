"""The fleet-vs-one-device SST-2 plot of docs/fleet.md: accuracy against steps (the same
examples forwarded by the fleet and by the device) and the fleet's against the bytes a device
sent and received, beside what one round of federated averaging ships. Each seed a thin line,
the median across seeds a thick one.

    python experiments/plot_fleet_sst2.py OUT.png --single runs/single-s*/metrics.jsonl \\
        --fleet "fleet, proportional parts" runs/fleet-prop-s*/rounds.csv \\
        --fleet "fleet, equal parts" docs/fleet/*-average-seed*-rounds.csv \\
        --weights 538000000 --trained 140544
"""
import argparse
import csv
import json

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out")
parser.add_argument("--single", nargs="+", required=True, help="single-device runs' metrics.jsonl, one a seed")
parser.add_argument("--fleet", nargs="+", action="append", required=True, metavar="LABEL FILE",
                    help="a label, then fleet runs' rounds.csv, one a seed (repeatable)")
parser.add_argument("--weights", type=float, help="bytes of the model's weights (FedAvg ships them each way)")
parser.add_argument("--trained", type=float, help="bytes of the trained tensors alone")
args = parser.parse_args()


def single(path: str) -> tuple[list[int], list[float], float]:
    rows = [json.loads(line) for line in open(path)]
    return [r["step"] for r in rows], [r["eval_accuracy"] for r in rows], rows[0]["eval_accuracy"]


def fleet(path: str, start: float) -> tuple[list[int], list[float], list[float]]:
    """(steps, accuracies, bytes a device moved so far) at the evaluated rounds, from the start."""
    rows = list(csv.DictReader(open(path)))
    moved = np.cumsum([(int(r["bytes_up"]) + int(r["bytes_down"])) / int(r["clients"]) for r in rows])
    at = [i for i, r in enumerate(rows) if r["eval_accuracy"]]
    return ([0] + [int(rows[i]["steps"]) for i in at], [start] + [float(rows[i]["eval_accuracy"]) for i in at],
            [moved[0] / 2] + [moved[i] for i in at])  # the start drawn at half the first round's bytes (log axis)


def draw(ax, curves: list[tuple[list, list]], label: str, style: str, color: str) -> None:
    for x, y in curves:
        ax.plot(x, y, style, color=color, alpha=0.3, lw=1)
    x = np.median([x for x, _ in curves], axis=0)
    ax.plot(x, np.median([y for _, y in curves], axis=0), style, color=color, lw=2.5,
            label=f"{label} (median of {len(curves)})")


fig, (by_steps, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
singles = [single(p) for p in args.single]
draw(by_steps, [(s, a) for s, a, _ in singles], "one device", "o-", "black")
start = singles[0][2]
for (label, *paths), color in zip(args.fleet, ["tab:blue", "tab:orange", "tab:green"]):
    runs = [fleet(p, start) for p in paths]
    draw(by_steps, [(s, a) for s, a, _ in runs], label, "s-", color)
    draw(by_bytes, [(b, a) for _, a, b in runs], label, "s-", color)
by_steps.set_xlabel("steps (the same examples forwarded)")
by_bytes.set_xlabel("bytes a device sent and received (log)")
by_bytes.set_xscale("log")
for value, what in ((args.trained, "trained tensors"), (args.weights, "all weights")):
    if value:
        by_bytes.axvline(2 * value, ls="--", color="gray")
        by_bytes.text(2 * value, 0.98, f"FedAvg, 1 round\n({what}) ", fontsize=8, va="top", ha="right",
                      transform=by_bytes.get_xaxis_transform())
for ax in (by_steps, by_bytes):
    ax.set_ylabel("SST-2 accuracy (all 872)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(args.out, dpi=120)
