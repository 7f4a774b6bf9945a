"""Which training examples each device of a simulated fleet holds.

A real fleet's devices hold their own data; a simulation deals one task's training examples
out: IID (a seeded permutation cut into near-equal parts) or non-IID by label with a Dirichlet
prior (per label, the shares of the devices are drawn from Dir(alpha); small alpha gives each
device few labels), as FedAvg papers partition. Every party computes the same shards from the
same (labels, clients, alpha, seed), so the server never ships data, only this recipe.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import OrtzoError


def shards(labels: Sequence[object], clients: int, alpha: float | None = None, seed: int = 0) -> list[list[int]]:
    """Example indices per client: IID when `alpha` is None, else Dirichlet(alpha) by label.
    Each client gets at least one example; the shards are disjoint and cover every example."""
    n = len(labels)
    if clients < 1 or n < clients:
        raise OrtzoError(f"{n} training examples cannot be dealt to {clients} clients (one each at least)")
    if alpha is not None and not alpha > 0:
        raise OrtzoError(f"--alpha must be positive (the Dirichlet concentration), got {alpha}")
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(n), clients)]
    parts: list[list[int]] = [[] for _ in range(clients)]
    by_label: dict[object, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label in sorted(by_label, key=str):
        members = rng.permutation(by_label[label])
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(members)).astype(int)[:-1]
        for part, piece in zip(parts, np.split(members, cuts), strict=True):
            part.extend(piece.tolist())
    for k in range(clients):  # a client the draw left empty takes one example from the largest
        if not parts[k]:
            largest = max(range(clients), key=lambda j: len(parts[j]))
            parts[k].append(parts[largest].pop())
    return [sorted(p) for p in parts]
