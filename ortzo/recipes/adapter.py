"""`ortzo adapter`: a run's trained tensors over a frozen base, after some step, as an ONNX
Runtime adapter file (model/adapter.py) that the serving stack loads over the unchanged base.

The weights come from the run's newest checkpoint at or before the step and its step log's
replay, as `ortzo bake` and `ortzo eval` restore them.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model.adapter import write_adapter
from .bake import weights_at


def adapter(path: str | Path, out: str | Path, step: int | None = None,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the tensors the run in `path` trains (all trainable tensors of a model folder), as
    they are after `step` steps (default: all logged), to the adapter file `out`."""
    folder, store, trained = weights_at(Path(path), step, say)
    size = write_adapter(out, store.manifest, folder, {n: store.arrays[n] for n in trained})
    return {"adapter": str(out), "base": str(folder), "tensors": len(trained),
            "weights": sum(store.arrays[n].size for n in trained), "bytes": size}
