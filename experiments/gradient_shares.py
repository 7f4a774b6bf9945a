"""Where the vectors' gradient lies at the start of a run: for each one-dimensional parameter, the
rms of its weights and of its gradient (autograd, the mean over the first BATCHES training
batches of the default recipe), and its share of the squared gradient. Needs the torch extra:

    python experiments/gradient_shares.py models/smollm2-135m ../shared/data/sst2 > OUT.csv
"""
from __future__ import annotations

import csv
import sys

import numpy as np

from ortzo.config import RunConfig
from ortzo.engines.torch_model import candidate_loss, load_module, word_scores
from ortzo.recipes.setup import prepare
from ortzo.tasks.task import load_task

BATCHES = 4


def batch_gradients(setup, store, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Autograd's gradient of each of `names` on each of the first BATCHES training batches."""
    module = load_module(setup.model_dir, store)
    params = dict(module.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    grads = []
    for step in range(BATCHES):
        batch = setup.train_batch(step)
        module.zero_grad()
        candidate_loss(word_scores(module, batch), batch.labels).backward()
        grads.append({n: params[n].grad.numpy().copy() for n in names})
    return grads


def main(model: str, data: str) -> None:
    cfg = RunConfig.build({"model": model, "task": "sst2", "data": data}).resolved()
    setup = prepare(cfg, load_task(cfg.task, cfg.template), say=lambda *_: None)
    store = setup.load_store()
    names = setup.trained(store)
    grads = {n: np.mean([g[n] for g in batch_gradients(setup, store, names)], axis=0) for n in names}
    total = sum(float((g ** 2).sum()) for g in grads.values())
    out = csv.writer(sys.stdout)
    out.writerow(["parameter", "size", "weight_rms", "grad_rms", "share_of_squared_grad"])
    for n in names:
        w, g = store.arrays[n], grads[n]
        out.writerow([n, w.size, f"{np.sqrt((w ** 2).mean()):.4f}", f"{np.sqrt((g ** 2).mean()):.3e}",
                      f"{float((g ** 2).sum()) / total:.4f}"])


if __name__ == "__main__":
    main(*sys.argv[1:])
