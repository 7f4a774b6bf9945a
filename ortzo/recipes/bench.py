"""`ortzo bench`: is a MeZO step close to the two forwards it cannot avoid, and does it fit
in inference memory?

Each direction kind runs in a fresh process, so its peak RSS is its own; inside it, forwards
and steps are timed in turn (forward, step, forward, step, ...), so the step/forward ratio
compares the two under the same conditions."""
from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..files import atomic_open, check_target
from ..memory import estimate
from ..model.manifest import Manifest, hf_config
from ..model.session import ScoringSession, graph_file
from ..model.targets import load_target
from ..model.weights import WeightStore
from ..engines.ort import trainable_buffers
from ..optim.mezo import mezo_step
from ..tasks.objective import loss
from .measure import in_child, peak_rss_mib, random_batch, vocab_size
from .validate import frozen_base

logger = logging.getLogger(__name__)


def bench_step(model: Path, batch_size: int, seq_len: int, repeats: int, target: str, kinds: list[str]) -> None:
    args = ["step", str(model), str(batch_size), str(seq_len), str(repeats), target]
    if load_target(target).device != "host":
        from ..optim.cuda import KIND

        if [k for k in kinds if k != KIND]:
            logger.warning(f"on a device only {KIND} has a kernel: timing it alone")
        kinds = [KIND]
    infer = _child(args + ["inference"])
    gpu = "device_mib" in infer  # a device target: its memory is the GPU's
    mem, what = ("device_mib", "GPU MiB") if gpu else ("peak_rss_mib", "peak RSS MiB")
    print(f"{model.name}: batch {batch_size} x seq {seq_len}, target {target}, {repeats} repeats, median times")
    print(f"inference: forward {infer['forward_s']:.4f} s, {what} {infer[mem]:.0f}")
    print(f"{'directions':<18} {'forward s':>9} {'step s':>7} {'step/(2 fwd)':>12} {'perturb share':>13} "
          f"{what:>12} {'vs inference':>12}")
    for kind in kinds:
        r = _child(args + [kind])
        print(f"{kind:<18} {r['forward_s']:>9.4f} {r['step_s']:>7.4f} {r['step_s'] / (2 * r['forward_s']):>12.2f} "
              f"{r['perturb_s'] / r['step_s']:>13.1%} {r[mem]:>12.0f} {r[mem] / infer[mem]:>12.2f}")
    if gpu:
        print("targets (issue 7): step / (2 x forward) <= 1.15, GPU memory of fine-tuning <= 1.1 x inference")


def bench_engines(model: Path, batch_size: int, seq_len: int, repeats: int, engines: list[str]) -> None:
    """Step time of each engine, timed interleaved in one process, and the peak RSS of each
    alone in its own; checked against the targets ortzo exists for (issue 6): an ORT MeZO
    step at most 0.35 x a PyTorch MeZO step, in at most 0.30 x the memory of backprop with AdamW."""
    times = in_child("interleaved", model, batch_size, seq_len, repeats, *engines)
    rss = {e: in_child("steps", model, e, batch_size, seq_len, 2, "{}")["peak_rss_mib"] for e in engines}
    print(f"{model.name}: batch {batch_size} x seq {seq_len}, engines interleaved, median of {repeats} steps")
    print(f"{'engine':<12} {'step s':>7} {'peak RSS MiB':>12}")
    for e in engines:
        print(f"{e:<12} {times[e]:>7.3f} {rss[e]:>12.0f}")
    for ours, theirs, what, target in (("step", "torch-mezo", "step time", 0.35), ("rss", "torch-bp", "peak RSS", 0.30)):
        if "ort" in engines and theirs in engines:
            a, b = (times["ort"], times[theirs]) if ours == "step" else (rss["ort"], rss[theirs])
            print(f"ort / {theirs} {what}: {a / b:.2f} (target <= {target}: {'met' if a / b <= target else 'MISSED'})")


def bench_formats(model: Path, batch_size: int, seq_len: int, repeats: int, target: str, formats: list[str]) -> None:
    """MeZO step time on each graph format (`model.onnx`, `model.ort`) under one target's
    providers and session options, interleaved in one process: does the phone's format cost
    time on the same provider?"""
    for f in formats:
        graph_file(Manifest.load(model), replace(load_target(target), format=f))  # fails early without a .ort
    times = in_child("formats", model, target, batch_size, seq_len, repeats, *formats)
    print(f"{model.name}: batch {batch_size} x seq {seq_len}, target {target}, graph formats interleaved, "
          f"median of {repeats} steps")
    print(f"{'format':<8} {'step s':>7} {'vs ' + formats[0]:>8}")
    for f in formats:
        print(f"{f:<8} {times[f]:>7.3f} {times[f] / times[formats[0]]:>8.3f}")


def bench_bases(model: Path, others: list[Path], batch_size: int, seq_len: int, repeats: int, runs: int = 3) -> None:
    """Folders of one model side by side (a plain fp32 folder, then frozen int4/int8 bases, say):
    forward seconds timed in turn in one process, `runs` processes (median and spread of their
    medians); peak RSS of each folder's inference alone and of its default recipe's MeZO steps
    (the vectors), each in a process of its own, on the same random batch."""
    folders = [model, *others]
    timed = [in_child("bases", model, batch_size, seq_len, repeats, *others) for _ in range(runs)]
    print(f"batch {batch_size} x seq {seq_len}; forward: median of {runs} processes (each the median of {repeats} "
          f"forwards, folders in turn) [min-max]; peak RSS: one process per cell")
    print(f"{'folder':<28} {'base':<8} {'forward s':>22} {'vs ' + model.name:>20} {'inference MiB':>13} "
          f"{'MeZO vectors MiB':>16} {'vs ' + model.name + ' inference':>28}")
    first_infer = None
    for folder in folders:
        f = [t[str(folder)] for t in timed]
        ratio = [t[str(folder)] / t[str(model)] for t in timed]
        infer = in_child("forwards", folder, "cpu", batch_size, seq_len, 2)["peak_rss_mib"]
        vectors = json.dumps({"params": "vectors"})
        step = in_child("steps", folder, "ort", batch_size, seq_len, 2, vectors)["peak_rss_mib"]
        first_infer = first_infer or infer
        base = Manifest.load(folder).base.get("quantize", "none")
        print(f"{folder.name:<28} {base if base != 'none' else 'plain':<8} "
              f"{statistics.median(f):>9.4f} [{min(f):.4f}-{max(f):.4f}] "
              f"{statistics.median(ratio):>7.3f} [{min(ratio):.3f}-{max(ratio):.3f}] {infer:>13.0f} {step:>16.0f} "
              f"{step / first_infer:>28.3f}")


def bench_memory(model: Path, shapes: list[str], target: str, out: Path | None = None) -> list[dict]:
    """Peak RSS of the MeZO loop (a warm-up step and one more, the ORT engine, every parameter
    trained) and of inference alone (forwards only), each in its own child process, at each
    BATCHxSEQ shape, beside the memory model's prediction for the step. glibc's default malloc,
    as a user's run has; `target` picks the provider and the graph format (`mobile-cpu`: the
    CPU provider on model.ort, what a phone's CPU runs)."""
    if out is not None:
        check_target(out)  # before the minutes of measuring
    manifest = Manifest.load(model)
    graph = graph_file(manifest, load_target(target))
    rows = []
    for shape in shapes:
        b, s = (int(n) for n in shape.split("x"))
        infer = in_child("forwards", model, target, b, s, 1)
        step = in_child("steps", model, "ort", b, s, 1, json.dumps({"target": target}))
        predicted = estimate(hf_config(model), b, s, method="ort-mezo", padded=False,
                             **frozen_base(manifest)).total / 2**20
        rows.append({"model": model.name, "target": target, "graph": graph, "batch": b, "seq": s,
                     "inference_mib": round(infer["peak_rss_mib"]), "mezo_step_mib": round(step["peak_rss_mib"]),
                     "step_vs_inference": round(step["peak_rss_mib"] / infer["peak_rss_mib"], 3),
                     "predicted_step_mib": round(predicted, 2)})
    print(f"{model.name} ({graph}, target {target}): peak RSS in MiB, one child process per cell, default malloc")
    print("| batch x seq | inference only | MeZO step | step / inference | memory model (step) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} x {r['seq']} | {r['inference_mib']} | {r['mezo_step_mib']} | "
              f"{r['step_vs_inference']:.2f} | {r['predicted_step_mib']:.0f} |")
    if out is not None:
        with atomic_open(out, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "ortzo.recipes.bench", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(model: Path, batch_size: int, seq_len: int, repeats: int, target_name: str, mode: str) -> dict:
    manifest = Manifest.load(model)
    store = WeightStore.load(model, manifest)
    target = load_target(target_name)
    session = ScoringSession(model, store, target)
    batch = random_batch(batch_size, seq_len, vocab_size(model))
    feeds, labels = batch.feeds, batch.labels
    session(feeds)  # warm-up: ORT allocates its arenas on the first run
    fence = session.device.fence if session.device else lambda: None  # device work done before a clock is read
    directions = None
    if mode != "inference":  # every parameter, on the target's device (fp32 masters for fp16 weights)
        buffers, generator = trainable_buffers(session, list(store.arrays), mode, target.direction_threads)
        directions = _TimedDirections(generator, fence)

    def step(k: int) -> float:
        directions.seconds = 0.0
        t = time.perf_counter()
        mezo_step(buffers, lambda: loss(session(feeds), labels), step=k, seed=k, eps=1e-3, lr=1e-6,
                  directions=directions)
        fence()
        return time.perf_counter() - t

    if directions:
        step(0)  # warm-up: builds the noise table, if any
    fwd, steps = [], []
    for k in range(1, repeats + 1):  # interleaved: forward, step, forward, step, ...
        t = time.perf_counter()
        session(feeds)
        fwd.append(time.perf_counter() - t)
        if directions:
            steps.append((step(k), directions.seconds))
    result = {"forward_s": statistics.median(fwd)}
    if steps:
        result |= {"step_s": statistics.median(s for s, _ in steps), "perturb_s": statistics.median(p for _, p in steps)}
    if session.device:
        result["device_mib"] = device_used_mib()
    return result


class _TimedDirections:
    """A direction generator that counts the seconds its passes take (device work included)."""

    def __init__(self, inner, fence) -> None:
        self.inner, self.fence, self.seconds = inner, fence, 0.0

    def add(self, buffers, seed, scale):
        t = time.perf_counter()
        self.inner.add(buffers, seed, scale)
        self.fence()
        self.seconds += time.perf_counter() - t


def device_used_mib() -> float:
    """Memory in use on the current GPU (this process's CUDA context, ORT's arena, the weights):
    ORT's arena keeps what a run needed, so after the timed runs this is their peak."""
    import cupy as cp

    free, total = cp.cuda.runtime.memGetInfo()
    return (total - free) / 2**20


if __name__ == "__main__":
    what, *a = sys.argv[1:]
    if what == "step":
        result = _measure(Path(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4], a[5])
    else:
        raise SystemExit(f"unknown step {what!r}")
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))
