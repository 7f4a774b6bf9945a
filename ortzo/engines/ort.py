"""The product: MeZO through an ONNX Runtime inference session over the weight store.

Each step perturbs the weights in place where the session reads them (the store's arrays,
bound zero-copy, or their device copy on a CUDA target) and calls only the session's
forward: two forwards a step, inference memory."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig
from ..errors import OrtzoError
from ..model.session import ScoringSession
from ..model.targets import Target
from ..model.weights import WeightStore
from ..optim.directions import Directions
from ..optim.estimators import estimator_step
from ..optim.mezo import StepRecord, decay_mask, replay, step_seed
from ..optim.precondition import Scale, ScaledDirections
from ..tasks.objective import loss
from .base import Adapt, BatchAt


class OrtMezo:
    def __init__(self, cfg: RunConfig, model_dir: Path, store: WeightStore, names: list[str], target: Target,
                 batch_at: BatchAt, scales: dict[str, Scale] | None = None) -> None:
        self.cfg, self.store, self.batch_at = cfg, store, batch_at
        self.session = ScoringSession(model_dir, store, target)
        self.buffers, self.directions = trainable_buffers(self.session, names, cfg.directions,
                                                          target.direction_threads)
        if scales is not None:
            if missing := [n for n in names if n not in scales]:
                raise OrtzoError(f"the run's recorded direction scales miss {len(missing)} of its parameters "
                                 f"({missing[0]}, ...): a corrupt run config")
            self.directions = ScaledDirections(self.directions, [scales[n] for n in names])
        self.decay = decay_mask(self.buffers)

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session(feeds)

    def step(self, step: int, lr: float, adapt: Adapt | None = None) -> StepRecord:
        cfg, batch = self.cfg, self.batch_at(step)

        def batch_loss() -> float:
            return loss(batch.candidate_scores(self.session(batch.feeds)), batch.labels)

        return estimator_step(cfg.estimator, self.buffers, batch_loss,
                              step=step, seed=step_seed(cfg.seed, step), eps=cfg.eps,
                              lr=lr, directions=self.directions,
                              n_directions=cfg.n_directions, clip=cfg.clip, weight_decay=cfg.weight_decay,
                              decay=self.decay, adapt=adapt)

    def replay(self, records: Sequence[StepRecord]) -> None:
        replay(self.buffers, records, self.directions, self.decay)

    def save_state(self, folder: Path) -> dict[str, Any]:
        return {}


def trainable_buffers(session: ScoringSession, names: list[str], kind: str, threads: int = 0) -> tuple[list, Any]:
    """The float32 buffers MeZO changes for the parameters `names`, and the generator of their
    directions: host arrays (fp32 masters for fp16 weights) with NumPy's, or views of the
    device copy with the CUDA kernel's (the same values)."""
    if session.device is None:
        return session.store.trainable(names), Directions(kind, threads or None)
    from ..optim.cuda import CudaDirections

    return session.device.trainable(names), CudaDirections(kind)
