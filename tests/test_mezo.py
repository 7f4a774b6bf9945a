"""The MeZO step on real models: its estimate equals autograd's directional derivative, and it
learns through the ORT session and through PyTorch parameters alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ortzo.tasks.batches import collate
from ortzo.optim.directions import Directions
from ortzo.model.manifest import Manifest
from ortzo.optim.mezo import mezo_step
from ortzo.tasks.objective import loss

from conftest import open_folder

ENCODED = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14], [5, 5, 6]]
LABELS = np.array([0, 1, 1, 0])
CANDIDATES = np.array([30, 31])


@pytest.mark.parametrize("kind", ["rademacher", "rademacher-counter", "gaussian"])
def test_spsa_estimate_matches_autograd_directional_derivative(tiny_hf, tiny_model, kind):
    """g from two ORT forwards equals grad(L) . z computed by PyTorch autograd."""
    store, session = open_folder(tiny_model)
    feeds = collate(ENCODED, 1, CANDIDATES)
    names = list(store.arrays)
    buffers = [store.arrays[n] for n in names]
    directions = Directions(kind)
    eps = 1e-4  # at 1e-3 the curvature along a Gaussian z already shows (float64 PyTorch agrees)
    rec = mezo_step(buffers, lambda: loss(session(feeds), LABELS), step=0, seed=123, eps=eps, lr=0.0,
                    directions=directions)

    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    params = dict(model.named_parameters())
    logits = model(input_ids=torch.tensor(feeds["input_ids"]), attention_mask=torch.tensor(feeds["attention_mask"]),
                   position_ids=torch.tensor(feeds["position_ids"])).logits[:, -1]
    scores = torch.log_softmax(logits, -1)[:, torch.tensor(CANDIDATES)]
    torch.nn.functional.cross_entropy(scores, torch.tensor(LABELS)).backward()
    manifest = Manifest.load(tiny_model)
    zs = directions.sample([b.shape for b in buffers], seed=123)
    directional = 0.0
    for name, z in zip(names, zs):
        grad = params[name].grad.numpy()
        directional += float((grad.T if manifest.param(name).transposed else grad).ravel() @ z.ravel())
    assert rec.grads[0] == pytest.approx(directional, rel=2e-2, abs=1e-4)


def test_step_with_zero_lr_restores_weights(tiny_model):
    store, session = open_folder(tiny_model)
    feeds = collate(ENCODED, 1, CANDIDATES)
    before = {n: a.copy() for n, a in store.arrays.items()}
    mezo_step(list(store.arrays.values()), lambda: loss(session(feeds), LABELS), step=0, seed=5, eps=1e-3,
              lr=0.0, directions=Directions())
    for n, a in store.arrays.items():
        np.testing.assert_allclose(a, before[n], atol=1e-6)


def test_drives_pytorch_parameters_through_numpy_views(tiny_hf):
    """The optimizer knows nothing about ONNX: PyTorch tensors' memory works as buffers too."""
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    buffers = [p.data.numpy() for p in model.parameters()]
    feeds = collate(ENCODED, 1, CANDIDATES)
    ids = torch.tensor(feeds["input_ids"])

    def loss_fn():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.tensor(feeds["attention_mask"])).logits[:, -1]
        return loss(torch.log_softmax(logits, -1)[:, torch.tensor(CANDIDATES)].numpy(), LABELS)
    start = loss_fn()
    d = Directions()
    for t in range(60):
        mezo_step(buffers, loss_fn, step=t, seed=t, eps=1e-3, lr=1e-2, directions=d)
    assert loss_fn() < start


def test_loss_falls_through_the_ort_session(tiny_model):
    """Two forwards of the inference session per step are enough to fit a small batch."""
    store, session = open_folder(tiny_model)
    feeds = collate(ENCODED, 1, CANDIDATES)
    buffers = list(store.arrays.values())
    loss_fn = lambda: loss(session(feeds), LABELS)  # noqa: E731
    start = loss_fn()
    d = Directions()
    for t in range(150):
        mezo_step(buffers, loss_fn, step=t, seed=t, eps=1e-3, lr=2e-3, directions=d)
    assert loss_fn() < 0.5 * start
