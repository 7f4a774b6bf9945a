"""Where the vectors' gradient lies inside each tensor: per hidden channel (all of SmolLM2's
vectors are 576 wide, one coordinate per residual channel), the share of the squared mean
gradient (gradient_shares.py's autograd, summed over the 61 tensors) and the mean square of what
each norm scale multiplies (its normalized input x / rms(x), over the batches' real tokens: a
forward-only statistic, and the Gauss-Newton curvature of a scale is proportional to it).
Prints the concentration summary and writes one row per channel. Needs the torch extra:

    python experiments/channel_shares.py models/smollm2-135m ../shared/data/sst2 OUT.csv
"""
from __future__ import annotations

import csv
import sys

import numpy as np
import torch

from gradient_shares import BATCHES, batch_gradients
from ortzo.config import RunConfig
from ortzo.engines.torch_model import load_module, word_scores
from ortzo.recipes.setup import Setup, prepare
from ortzo.tasks.task import load_task


def normalized_input_squares(setup: Setup, names: list[str]) -> dict[str, np.ndarray]:
    """For each norm scale in `names`, the per-channel mean of (x / rms(x))^2 over the real
    (unpadded) tokens of the first BATCHES training batches, x the norm's input."""
    module = load_module(setup.model_dir, setup.load_store())
    layers = dict(module.named_modules())
    sums: dict[str, list[np.ndarray]] = {n: [] for n in names}
    mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(_m, inputs, _out):
            x = inputs[0].detach().double()
            xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            sums[name].append(xhat.pow(2)[mask[0]].mean(0).numpy())
        return record

    for n in names:
        layers[n.rsplit(".", 1)[0]].register_forward_hook(hook(n))
    with torch.no_grad():
        for step in range(BATCHES):
            batch = setup.train_batch(step)
            mask[:] = [torch.from_numpy(batch.feeds["attention_mask"]).bool()]
            word_scores(module, batch)
    return {n: np.mean(sums[n], axis=0) for n in names}


def main(model: str, data: str, out: str) -> None:
    cfg = RunConfig.build({"model": model, "task": "sst2", "data": data}).resolved()
    setup = prepare(cfg, load_task(cfg.task, cfg.template), say=lambda *_: None)
    store = setup.load_store()
    names = setup.trained(store)
    grads = batch_gradients(setup, setup.load_store(), names)
    g = np.stack([np.mean([b[n] for b in grads], axis=0).astype(np.float64) for n in names])  # [tensor, channel]
    x2 = normalized_input_squares(setup, names)
    h = np.stack([x2[n] for n in names])
    w = np.stack([np.abs(store.arrays[n]) for n in names])
    sq = g ** 2
    flat = np.sort(sq.ravel())[::-1]
    print(f"coordinates: the top 1 % ({flat.size // 100}) hold {flat[:flat.size // 100].sum() / flat.sum():.2f} "
          f"of the squared gradient, the top 0.1 % {flat[:flat.size // 1000].sum() / flat.sum():.2f}")
    share = sq.sum(0) / sq.sum()
    order = np.argsort(share)[::-1]
    print("channels by share:", ", ".join(f"{c} {share[c]:.3f}" for c in order[:8]))
    print("channels by mean (x/rms x)^2:", ", ".join(str(c) for c in np.argsort(h.mean(0))[::-1][:8]))
    print(f"log-log correlation with the channel's squared gradient: mean (x/rms x)^2 "
          f"{np.corrcoef(np.log(h.mean(0)), np.log(sq.sum(0)))[0, 1]:.2f}, mean |w| "
          f"{np.corrcoef(np.log(w.mean(0)), np.log(sq.sum(0)))[0, 1]:.2f}; per coordinate: (x/rms x)^2 "
          f"{np.corrcoef(np.log(h.ravel()), np.log(sq.ravel() + 1e-30))[0, 1]:.2f}")
    # One MeZO step moves coordinate i by lr s_i^2 g_i in expectation and by lr s_i |u.g_batch| of noise
    # (u = S z): their ratio, median over coordinates, with no scale and with Adam's first-step scale.
    batches = np.stack([np.stack([b[n] for n in names]).astype(np.float64) for b in grads])  # [batch, tensor, ch]
    for label, p in (("none", np.ones_like(g)), ("Adam's 1/sqrt(v)", 1 / np.sqrt((batches ** 2).mean(0) + 1e-16))):
        p = p / p.mean()
        noise = np.sqrt(np.mean([(p * b ** 2).sum() for b in batches]))
        print(f"one step's noise / signal per coordinate, scale {label}: median "
              f"{np.median(noise / (np.sqrt(p) * np.abs(g) + 1e-30)):.0f} (|u.g_batch| rms {noise:.2f})")
    with open(out, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["channel", "share_of_squared_grad", "mean_normalized_input_square", "mean_abs_weight"])
        for c in order:
            rows.writerow([int(c), f"{share[c]:.5f}", f"{h[:, c].mean():.4f}", f"{w[:, c].mean():.4f}"])


if __name__ == "__main__":
    main(*sys.argv[1:])
