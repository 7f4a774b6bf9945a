"""The fleet-vs-one-device SST-2 plot of docs/fleet.md: accuracy against forwards, from a fleet's
rounds.csv and a single-device run's metrics.jsonl (both evaluate all 872 sentences).

    python experiments/plot_fleet_sst2.py runs/fleet/rounds.csv runs/single/metrics.jsonl OUT.png
"""
import csv
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rounds, metrics, out = sys.argv[1:4]
single = [(2 * d["step"], d["eval_accuracy"]) for d in map(json.loads, open(metrics))]
fleet = [single[0]] + [(2 * int(r["steps"]), float(r["eval_accuracy"])) for r in csv.DictReader(open(rounds))
                       if r["eval_accuracy"]]  # the fleet starts from the same weights: step 0 is shared
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(*zip(*single), "o-", label="one device")
ax.plot(*zip(*fleet), "s-", label="fleet")
ax.set_xlabel("forwards")
ax.set_ylabel("SST-2 accuracy (all 872)")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(out, dpi=120)
