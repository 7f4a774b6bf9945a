"""Engines: what a run trains through. `ort` (the product: MeZO through an ONNX Runtime
inference session), and the PyTorch baselines `torch-bp` (backprop) and `torch-mezo` (MeZO
as its reference implementation does it). One interface (`base.Engine`); the recipe picks one
by name and never imports torch itself."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..model.targets import Target
from ..model.weights import WeightStore
from ..optim.precondition import Scale
from .base import BatchAt, Engine, Saved

if TYPE_CHECKING:
    from ..config import RunConfig


def open_engine(cfg: RunConfig, model_dir: Path, store: WeightStore, names: list[str], target: Target,
                batch_at: BatchAt, saved: Saved | None = None, scales: dict[str, Scale] | None = None) -> Engine:
    """`cfg.engine` over `store`, training the parameters `names` on `batch_at(step)`; `saved`:
    the checkpoint the store came from; `scales`: each parameter's direction scale (the ort
    engine's, optim/precondition.py), as the run recorded them. Imports only the chosen engine
    (torch only for torch)."""
    if cfg.engine == "ort":
        from .ort import OrtMezo

        return OrtMezo(cfg, model_dir, store, names, target, batch_at, scales)
    if cfg.engine == "torch-bp":
        from .torch_bp import TorchBackprop

        return TorchBackprop(cfg, model_dir, store, names, batch_at, saved)
    from .torch_mezo import TorchMezo

    return TorchMezo(cfg, model_dir, store, names, batch_at)
