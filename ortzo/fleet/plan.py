"""A fleet's plan: how many devices take which steps, and which training examples each holds.

Step numbers are slots. A slot fixes the step's seed (as in a single-device run) and which of
the device's own batches it uses, so a repeated round draws the same directions on the same
examples, and a device that misses a round leaves no hole in anyone's arithmetic. With N devices
and P steps a round, two ways to merge what the devices send:

- "average": every device probes the round's P slots rP ... rP + P - 1 on its share of the
  step's batch (the run's batch size dealt out in proportion to the shard sizes), and the
  server averages each slot's projected gradients weighted by the devices' example counts
  (their shard sizes). Loss is a mean over
  examples, so that is the SPSA estimate of the whole fleet's loss along the slot's direction:
  one step of a single device whose batch is drawn from every shard, whatever each holds.
- "append": device k probes its own slots (rN + k)P ... (rN + k)P + P - 1 on a whole batch of
  its own examples, and the server appends every record: N times the steps a round, each on one
  device's examples. On label-skewed shards each such estimate is of a skewed loss (larger
  gradients, so noisier directions); measured, that costs accuracy (docs/fleet.md).

A real fleet's devices hold their own data; a simulation deals one task's training examples
out: IID (a seeded permutation cut into near-equal parts) or non-IID by label with a Dirichlet
prior (per label, the shares of the devices are drawn from Dir(alpha); small alpha gives each
device few labels), as FedAvg papers partition. Every party computes the same shards from the
same (labels, clients, alpha, seed), so the server never ships data, only this recipe, and
every device knows its share of a step's batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import OrtzoError


@dataclass(frozen=True)
class Fleet:
    """`clients` devices, `rounds` rounds of `per_round` MeZO steps on each, merged by
    `merge`, shards IID or Dirichlet(`alpha`) by label, an evaluation every `eval_every` rounds."""

    clients: int
    rounds: int
    per_round: int = 1
    alpha: float | None = None
    eval_every: int = 10
    merge: Literal["average", "append"] = "average"

    @property
    def round_steps(self) -> int:
        """Steps of the global log a round adds."""
        return self.per_round * (self.clients if self.merge == "append" else 1)

    @property
    def steps(self) -> int:
        return self.rounds * self.round_steps

    def slots(self, rnd: int, device: int) -> list[int]:
        first = rnd * self.round_steps + (device * self.per_round if self.merge == "append" else 0)
        return list(range(first, first + self.per_round))

    def local_batch(self, slot: int) -> int:
        """Which of its own batches a device steps on at `slot`: round r's j-th, r P + j."""
        rnd, j = divmod(slot, self.round_steps)
        return rnd * self.per_round + j % self.per_round

    def shares(self, batch_size: int, sizes: Sequence[int]) -> list[int]:
        """Examples each device forwards a step: with "append" the whole batch; with "average"
        its part of the step's batch, in proportion to `sizes` (the devices' shard sizes; at
        least one each, largest remainders first), so the batch the devices forward together is
        a proportionally stratified sample of all their examples, as a single device's is a
        random one. (Equal parts would weight a big shard's few examples up: a noisier estimate.)"""
        if self.merge == "append":
            return [batch_size] * self.clients
        if batch_size < self.clients:
            raise OrtzoError(f"--merge average deals each step's batch to the devices: --batch-size {batch_size} "
                             f"cannot give each of {self.clients} devices an example (raise it, or --merge append)")
        quota = batch_size * np.asarray(sizes, dtype=np.float64) / float(sum(sizes))
        share = np.maximum(1, np.floor(quota)).astype(int)
        while share.sum() > batch_size:  # the ones raised to 1 are paid for by the largest shares
            share[np.argmax(np.where(share > 1, share - quota, -np.inf))] -= 1
        while share.sum() < batch_size:
            share[np.argmax(quota - share)] += 1
        return share.tolist()


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
