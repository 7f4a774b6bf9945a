"""MeZO in PyTorch as its reference implementation does it (princeton-nlp/MeZO,
`trainer.py`: zo_perturb_parameters, zo_forward, zo_step, zo_update): the yardstick for
ortzo's step time.

For each step: seed torch's generator, and for every trained parameter draw z ~ N(0, 1) and
add eps z in place; forward; the same with -2 eps; restore with +eps; then draw every z a
fourth time for the update  w <- w - lr (g z + wd w)  (wd on matrices only). Four Gaussian
passes and two forwards per step, no fusing: as the reference does. The step log holds the
same records as the ORT engine's, so a resume replays them (with torch's generator)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..model.weights import WeightStore
from ..optim.mezo import StepRecord, step_seed
from .base import BatchAt
from .torch_model import candidate_loss, load_module, scores, word_scores


class TorchMezo:
    def __init__(self, cfg: RunConfig, model_dir: Path, store: WeightStore, names: list[str],
                 batch_at: BatchAt) -> None:
        self.cfg, self.store, self.batch_at = cfg, store, batch_at
        self.model = load_module(model_dir, store)
        trained = set(names)
        self.params = [p for n, p in self.model.named_parameters() if n in trained]

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return scores(self.model, feeds).numpy()

    def step(self, step: int, lr: float, adapt: None = None) -> StepRecord:  # no adaptive step here
        cfg = self.cfg
        seed, eps = step_seed(cfg.seed, step), cfg.eps
        batch = self.batch_at(step)
        self._perturb(seed, eps)
        lp = self._loss(batch)
        self._perturb(seed, -2 * eps)
        lm = self._loss(batch)
        self._perturb(seed, eps)
        if not (math.isfinite(lp) and math.isfinite(lm)):
            raise FloatingPointError(f"non-finite loss at step {step}: L+={lp}, L-={lm}")
        record = StepRecord(step, seed, ((lp - lm) / (2 * eps),), lr, eps, cfg.weight_decay, (lp,), (lm,))
        self._update(record)
        return record

    def replay(self, records: Sequence[StepRecord]) -> None:
        for r in records:
            self._perturb(r.seed, r.eps)
            self._perturb(r.seed, -2 * r.eps)
            self._perturb(r.seed, r.eps)
            self._update(r)

    def save_state(self, folder: Path) -> dict[str, Any]:
        return {}

    def _loss(self, batch) -> float:
        with torch.inference_mode():
            return float(candidate_loss(word_scores(self.model, batch), batch.labels))

    @torch.no_grad()
    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            p.add_(torch.normal(0.0, 1.0, size=p.shape), alpha=scale)

    @torch.no_grad()
    def _update(self, r: StepRecord) -> None:
        torch.manual_seed(r.seed)
        g = r.grads[0]
        for p in self.params:
            z = torch.normal(0.0, 1.0, size=p.shape)
            if p.ndim >= 2 and r.weight_decay:
                p.sub_(r.lr * (g * z + r.weight_decay * p))
            else:
                p.sub_(r.lr * g * z)
