"""The default SST-2 recipe over the int4 base beside the same recipe on the fp32 folder: both
curves CSVs (`ortzo compare`'s columns) in one plot, as compare draws it.

    python experiments/plot_int4_sst2.py runs/int4-sst2/curves.csv docs/ablation/sst2-demos.csv OUT.png

The fp32 arm is issue 8's `norms-demos` (docs/ablation-sst2.md); only that arm is taken from it."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from ortzo.run.plots import plot_compare

ARMS = {"int4-norms-demos": "int4 base", "norms-demos": "fp32 folder"}


def rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [r | {"arm": ARMS[r["arm"]], "seed": int(r["seed"]), "train_seconds": float(r["train_seconds"]),
                     "eval_accuracy": float(r["eval_accuracy"]), "over_budget": r["over_budget"] == "True"}
                for r in csv.DictReader(f) if r["arm"] in ARMS]


if __name__ == "__main__":
    int4, fp32, out = sys.argv[1:]
    plot_compare(rows(int4) + rows(fp32), Path(out),
                 title="SST-2, SmolLM2-135M, the default recipe: int4 base vs fp32 folder (3 seeds)")
