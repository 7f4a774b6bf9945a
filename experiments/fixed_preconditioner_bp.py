"""Is AdamW's lead on the vectors (0.884 against SGD's 0.83) a diagonal scaling that could be fixed at
the start, which MeZO's directions can carry (optim/precondition.py), or Adam's adaptivity over
time? Backprop with true gradients and AdamW's step replaced by SGD divided, per coordinate, by
the rms of the first WARM gradients and fixed from then on (no momentum, no later moments): a
fixed diagonal preconditioner, the best case of `--direction-scale`. Needs the torch extra.

    python experiments/fixed_preconditioner_bp.py OUT MODEL --engine torch-bp --optimizer adamw [finetune options...]
"""
from __future__ import annotations

import sys

import torch

from ortzo.cli import main
from ortzo.engines import torch_bp

WARM = 4  # the batches oracle_scales.py's v averages


class FixedDiagonal(torch.optim.Optimizer):
    """p <- p - lr g / sqrt(v), v the mean square of the first WARM gradients, then fixed."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["v"], state["n"] = torch.zeros_like(p), 0
                if state["n"] < WARM:
                    state["v"] += p.grad ** 2
                    state["n"] += 1
                p -= group["lr"] * p.grad / (torch.sqrt(state["v"] / state["n"]) + 1e-8)


if __name__ == "__main__":
    torch_bp.torch.optim.AdamW = lambda groups, lr: FixedDiagonal(groups, lr)
    sys.exit(main(["finetune", "--out", sys.argv[1], *sys.argv[2:]]))
