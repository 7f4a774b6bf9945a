"""The backprop baseline: full fine-tuning in PyTorch, fp32, with AdamW, SGD or SGD with
momentum, and activation checkpointing of a chosen fraction of the layers.

It trains the same store as the ORT engine (its parameters are views of the store's arrays),
on the same batches, with the same loss, so the run folder, checkpoints and evaluation are
shared. A checkpoint adds the optimizer's state; a resume recomputes the logged steps after
the checkpoint (CPU kernels are deterministic at a fixed thread count)."""
from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..errors import OrtzoError
from ..files import sha256_file
from ..model.weights import WeightStore
from .base import BackpropRecord, BatchAt, Saved
from .torch_model import candidate_loss, checkpoint_layers, load_module, scores, word_scores

OPTIMIZER = "optimizer.pt"


class TorchBackprop:
    def __init__(self, cfg: RunConfig, model_dir: Path, store: WeightStore, names: list[str], batch_at: BatchAt,
                 state: Saved | None = None) -> None:
        self.cfg, self.store, self.batch_at = cfg, store, batch_at
        self.model = load_module(model_dir, store)
        checkpoint_layers(self.model, cfg.checkpoint_fraction)
        trained = set(names)
        params = [(n, p) for n, p in self.model.named_parameters() if n in trained]
        for _, p in params:
            p.requires_grad_(True)
        # Weight decay on matrices only, as the MeZO engines do.
        groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        else:
            momentum = cfg.momentum if cfg.optimizer == "momentum" else 0.0
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum)
        if state is not None:
            self._load_state(state)

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return scores(self.model, feeds).numpy()

    def replay(self, records: Sequence[BackpropRecord]) -> None:
        for r in records:
            self.step(r.step, r.lr)

    def step(self, step: int, lr: float, adapt: None = None) -> BackpropRecord:  # no adaptive step here
        batch = self.batch_at(step)
        self.model.train()  # checkpointing acts in training mode; dropout is off
        try:
            loss = candidate_loss(word_scores(self.model, batch), batch.labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: {float(loss)}")
            loss.backward()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        return BackpropRecord(step, loss.item(), lr)

    def save_state(self, folder: Path) -> dict[str, Any]:
        path = folder / OPTIMIZER
        torch.save(self.optimizer.state_dict(), path)
        return {"optimizer_sha256": sha256_file(path)}

    def _load_state(self, saved: Saved) -> None:
        path = saved.folder / OPTIMIZER
        if not path.is_file():
            raise OrtzoError(f"corrupt checkpoint {saved.folder}: no {OPTIMIZER} (was it written by another engine?)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != saved.meta.get("optimizer_sha256"):
            raise OrtzoError(f"checksum mismatch for {path}: the optimizer state is corrupt")
        self.optimizer.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
