"""LoRA as graph inputs: beside a frozen matrix W, y = x W + (alpha / r) (x A) B, where A [in, r]
and B [r, out] are graph inputs that MeZO perturbs like any other trainable tensor.

A starts as PyTorch's and PEFT's default (uniform in +-1/sqrt(in), seeded) and B at zero, so a
new folder's graph computes exactly what its base computes. Names follow PEFT's modules
(`<module>.lora_A.weight`), stored transposed ([in, r], [r, out]) as the Linear weights are.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING

import numpy as np

from ..errors import OrtzoError

if TYPE_CHECKING:
    import onnx

DEFAULT_TARGETS = ("*q_proj", "*v_proj")
SCALE = "ortzo/lora/scale"


@dataclass(frozen=True)
class LoraSpec:
    """Rank `r`, scale `alpha / r`, `targets`: glob patterns over module names (a weight's name
    without `.weight`, e.g. `model.layers.0.self_attn.q_proj`)."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise OrtzoError(f"--lora r={self.r}: the rank must be at least 1")
        if not self.alpha > 0:
            raise OrtzoError(f"--lora alpha={self.alpha}: must be positive")
        if not self.targets:
            raise OrtzoError("--lora targets=: name at least one module pattern")

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`r=8,alpha=16,targets=*q_proj,*v_proj` (any subset, in any order; targets last, or
        separated by `;`). Unnamed values after `targets=` are more targets."""
        values: dict[str, list[str]] = {}
        key = None
        for part in (p.strip() for p in text.replace(";", ",").split(",")):
            if not part:
                continue
            if "=" in part:
                key, _, part = part.partition("=")
                key = key.strip()
                if key not in ("r", "alpha", "targets", "seed"):
                    raise OrtzoError(f"--lora {text!r}: unknown key {key!r} (r, alpha, targets, seed)")
                values[key] = []
            elif key != "targets":
                raise OrtzoError(f"--lora {text!r}: {part!r} is not key=value")
            values[key].append(part.strip())
        try:
            one = {k: v[0] for k, v in values.items() if k != "targets" and len(v) == 1}
            if any(len(v) != 1 for k, v in values.items() if k != "targets"):
                raise ValueError("one value per key")
            return cls(r=int(one.get("r", 8)), alpha=float(one.get("alpha", 16.0)),
                       targets=tuple(values.get("targets", DEFAULT_TARGETS)), seed=int(one.get("seed", 0)))
        except ValueError as e:
            raise OrtzoError(f"--lora {text!r}: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_json(self) -> dict[str, object]:
        return {"r": self.r, "alpha": self.alpha, "targets": list(self.targets), "seed": self.seed}


def module(weight: str) -> str:
    return weight.removesuffix(".weight")


def names(weight: str) -> tuple[str, str]:
    """The A and B inputs of the LoRA beside `weight`."""
    return f"{module(weight)}.lora_A.weight", f"{module(weight)}.lora_B.weight"


def targeted(spec: LoraSpec, candidates: list[str]) -> list[str]:
    """The weights among `candidates` (matrices a MatMul multiplies by) whose module matches a
    target; each pattern must match at least one, so a typo is an error, not a silent no-op."""
    for pattern in spec.targets:
        if not any(fnmatch(module(w), pattern) for w in candidates):
            example = ", ".join(module(w) for w in candidates[:4])
            raise OrtzoError(f"--lora target {pattern!r} matches no matrix of this model (its modules: {example}, ...)")
    return [w for w in candidates if any(fnmatch(module(w), p) for p in spec.targets)]


def initial(spec: LoraSpec, shape: tuple[int, ...], index: int) -> tuple[np.ndarray, np.ndarray]:
    """A [in, r] uniform in +-1/sqrt(in) (PEFT's kaiming_uniform with a=sqrt(5)), from the spec's
    seed and the matrix's index; B [r, out] zero."""
    k, n = shape
    rng = np.random.default_rng([spec.seed, index])
    bound = 1.0 / np.sqrt(k)
    return rng.uniform(-bound, bound, size=(k, spec.r)).astype(np.float32), np.zeros((spec.r, n), np.float32)


def branch(x: str, base_out: str, out: str, weight: str) -> list[onnx.NodeProto]:
    """out = base_out + scale * ((x @ A) @ B), nodes named after the module."""
    from onnx import helper

    a, b = names(weight)
    m = f"ortzo/lora/{module(weight)}"
    return [helper.make_node("MatMul", [x, a], [f"{m}/xa"], name=f"{m}/xa"),
            helper.make_node("MatMul", [f"{m}/xa", b], [f"{m}/xab"], name=f"{m}/xab"),
            helper.make_node("Mul", [f"{m}/xab", SCALE], [f"{m}/scaled"], name=f"{m}/scaled"),
            helper.make_node("Add", [base_out, f"{m}/scaled"], [out], name=f"{m}/add")]
