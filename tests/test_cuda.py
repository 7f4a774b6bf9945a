"""The CUDA target end to end. Needs onnxruntime-gpu, CuPy and a GPU (`pip install
'ortzo[cuda]'`); skipped with the reason elsewhere. The device kernel's arithmetic is also
checked without a GPU (tests/test_directions.py compiles its source for the host)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ortzo.model.targets import load_target

WHY = load_target("cuda").unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"CUDA target unavailable: {WHY}")


def _sessions(folder):
    from ortzo.model.manifest import Manifest
    from ortzo.model.session import ScoringSession
    from ortzo.model.weights import WeightStore

    def one(target):
        store = WeightStore.load(folder, Manifest.load(folder))
        return store, ScoringSession(folder, store, load_target(target))

    return one("cpu"), one("cuda")


def _feeds():
    from ortzo.tasks.batches import collate

    return collate([[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]], 1, np.array([30, 31]))


def test_device_weights_are_bound_once_and_edited_in_place(tiny_model):
    (_, cpu), (store, gpu) = _sessions(tiny_model)
    feeds = _feeds()
    np.testing.assert_allclose(gpu(feeds), cpu(feeds), atol=1e-4)
    name = store.manifest.parameters[0].name
    assert gpu.weight_ptr(name) == gpu.device.base + store.manifest.param(name).offset
    before = gpu(feeds)
    (w,) = gpu.device.trainable([p.name for p in store.manifest.parameters if p.name.endswith("norm.weight")][:1])
    w *= 3.0  # a CuPy write on CuPy's stream: the next run must see it
    assert not np.allclose(gpu(feeds), before)
    gpu.device.download()
    assert not np.array_equal(store.buffer, _sessions(tiny_model)[0][0].buffer)


def test_a_run_on_cuda_replays_on_the_cpu_bit_for_bit(tiny_model, tiny_data, tmp_path):
    """Train on the GPU, rebuild anywhere from the step log: restoring step 4 from the step-2
    checkpoint by a CPU replay gives the GPU's step-4 weights byte for byte."""
    from ortzo.cli import main
    from ortzo.engines.base import record_type
    from ortzo.model.manifest import Manifest
    from ortzo.model.weights import WeightStore
    from ortzo.optim import steplog
    from ortzo.optim.directions import Directions
    from ortzo.optim.mezo import decay_mask, replay
    from ortzo.run import checkpoint

    out = tmp_path / "run"
    assert main(["finetune", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--out", str(out),
                 "--provider", "cuda", "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "2",
                 "--keep-checkpoints", "3", "--train-examples", "16", "--eval-examples", "8"]) == 0
    log = steplog.read(out / "steps.jsonl", record_type("ort"))
    two = out / "checkpoints" / checkpoint.name(2)
    four = out / "checkpoints" / checkpoint.name(4)
    meta = json.loads((two / checkpoint.META).read_text())
    store = WeightStore.load(tiny_model, Manifest.load(tiny_model), two / checkpoint.WEIGHTS, meta["sha256"])
    buffers = store.trainable(list(store.arrays))
    replay(buffers, log.records[2:4], Directions("rademacher-counter"), decay_mask(buffers))
    assert store.buffer.tobytes() == (four / "weights.bin").read_bytes()
