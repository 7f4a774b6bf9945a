"""`ortzo bench`: is a MeZO step close to the two forwards it cannot avoid, and does it fit
in inference memory? Each measurement runs in a fresh process so peak RSS is its own."""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .directions import Directions
from .manifest import Manifest
from .mezo import mezo_step
from .objective import loss
from .session import ScoringSession
from .targets import load_target
from .weights import WeightStore


def bench_step(model: Path, batch_size: int, seq_len: int, repeats: int, target: str, kinds: list[str]) -> None:
    args = [str(model), str(batch_size), str(seq_len), str(repeats), target]
    infer = _child(args + ["inference"])
    print(f"{model.name}: batch {batch_size} x seq {seq_len}, {repeats} repeats, median times")
    print(f"inference: forward {infer['forward_s']:.3f} s, peak RSS {infer['peak_rss_mib']:.0f} MiB")
    print(f"{'directions':<15} {'forward s':>9} {'step s':>7} {'step/(2 fwd)':>12} {'perturb share':>13} "
          f"{'peak RSS MiB':>12} {'RSS vs infer':>12}")
    for kind in kinds:
        r = _child(args + [kind])
        print(f"{kind:<15} {r['forward_s']:>9.3f} {r['step_s']:>7.3f} {r['step_s'] / (2 * r['forward_s']):>12.2f} "
              f"{r['perturb_s'] / r['step_s']:>13.1%} {r['peak_rss_mib']:>12.0f} "
              f"{r['peak_rss_mib'] / infer['peak_rss_mib']:>12.2f}")


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "ortzo.bench", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(model: Path, batch_size: int, seq_len: int, repeats: int, target_name: str, mode: str) -> dict:
    manifest = Manifest.load(model)
    store = WeightStore.load(model, manifest)
    target = load_target(target_name)
    session = ScoringSession(model, store, target)
    rng = np.random.default_rng(0)
    vocab = manifest.parameters[0].shape[0]
    ids = rng.integers(10, min(vocab, 30000), size=(batch_size, seq_len))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.tile(np.arange(seq_len), (batch_size, 1)),
             "score_index": np.arange(batch_size) * seq_len + seq_len - 1,
             "score_ids": np.tile(np.array([11, 12]), (batch_size, 1))}
    labels = rng.integers(0, 2, size=batch_size)
    session(feeds)  # warm-up: ORT allocates its arenas on the first run
    fwd = []
    for _ in range(repeats):
        t = time.perf_counter()
        session(feeds)
        fwd.append(time.perf_counter() - t)
    result = {"forward_s": statistics.median(fwd)}
    if mode != "inference":
        directions = _TimedDirections(mode, target.direction_threads or None)
        buffers = list(store.arrays.values())
        steps = []
        for step in range(repeats + 1):
            directions.seconds = 0.0
            t = time.perf_counter()
            mezo_step(buffers, lambda: loss(session(feeds), labels), step=step, seed=step, eps=1e-3, lr=1e-6,
                      directions=directions)
            steps.append((time.perf_counter() - t, directions.seconds))
        steps = steps[1:]  # the first step builds the noise table, if any
        result |= {"step_s": statistics.median(s for s, _ in steps), "perturb_s": statistics.median(p for _, p in steps)}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


class _TimedDirections(Directions):
    seconds = 0.0

    def add(self, buffers, seed, scale):
        t = time.perf_counter()
        super().add(buffers, seed, scale)
        self.seconds += time.perf_counter() - t


if __name__ == "__main__":
    m, b, s, r, tgt, mode = sys.argv[1:]
    print(json.dumps(_measure(Path(m), int(b), int(s), int(r), tgt, mode)))
