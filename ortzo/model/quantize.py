"""Block-wise weight-only quantization of one matrix into ONNX Runtime's MatMulNBits layout.

The packing is ORT's own kernel (the one `onnxruntime.quantization`'s MatMulNBits quantizer
calls), applied one matrix at a time so that a frozen base is quantized in the memory of its
largest matrix, never as a dense model. MatMulNBits computes y = x @ dequant(B), where each
block of `block_size` rows of a column of B is (q - zero_point) * scale; constant B is
prepacked at session creation, and the trainable tensors (vectors, LoRA) stay float inputs
beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import OrtzoError

if TYPE_CHECKING:
    import onnx

Quantize = Literal["none", "int4", "int8"]


@dataclass(frozen=True)
class QuantSpec:
    """`bits` 4 or 8; `block_size` rows of a column that share a scale (a power of 2, 16-256);
    `symmetric`: no zero points (q centred on 8 or 128). `accuracy_level` is MatMulNBits' own:
    0 computes in fp32 from dequantized blocks, 4 quantizes activations to int8 (faster on CPUs
    with int8 dot products, less exact)."""

    bits: int
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise OrtzoError(f"quantization to {self.bits} bits: choose int4 or int8")
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise OrtzoError(f"--block-size {self.block_size}: a power of 2 from 16 to 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OrtzoError(f"--accuracy-level {self.accuracy_level}: 0 to 4")

    @classmethod
    def named(cls, quantize: Quantize, block_size: int = 32, symmetric: bool = False,
              accuracy_level: int = 0) -> QuantSpec | None:
        """The spec for `--quantize none|int4|int8` (None: no quantization)."""
        if quantize == "none":
            return None
        return cls(int(quantize.removeprefix("int")), block_size, symmetric, accuracy_level)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def to_json(self) -> dict[str, object]:
        return {"quantize": self.name, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level}


@dataclass(frozen=True)
class Quantized:
    """A matrix [K, N] in MatMulNBits' layout: `packed` [N, K / block_size, block_size * bits / 8],
    `scales` [N, K / block_size], `zero_points` packed like q (None when symmetric)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int


def quantize(w: np.ndarray, spec: QuantSpec) -> Quantized:
    """Quantize the matrix `w` [K, N] (as MatMul's B) with ORT's block quantization kernel."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w.shape
    per_byte = 8 // spec.bits
    blocks = -(-k // spec.block_size)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if blocks * spec.block_size != k:  # the kernel reads whole blocks
        w = np.pad(w, ((0, blocks * spec.block_size - k), (0, 0)))
    packed = np.zeros((n, blocks, spec.block_size // per_byte), np.uint8)
    zero_points = np.zeros((n, -(-blocks // per_byte)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    kernel = quantize_matmul_4bits if spec.bits == 4 else quantize_matmul_8bits
    kernel(packed, w, scales, zero_points, spec.block_size, n, k, spec.symmetric)
    return Quantized(packed, scales, None if spec.symmetric else zero_points, k, n)


def matmul_nbits(x: str, weights: list[str], out: str, k: int, n: int, spec: QuantSpec, name: str) -> onnx.NodeProto:
    """The node y = x @ dequant(B) for B [k, n]; `weights` names the initializers of packed,
    scales (and zero points)."""
    from onnx import helper

    extra = {"accuracy_level": spec.accuracy_level} if spec.accuracy_level else {}
    return helper.make_node("MatMulNBits", [x, *weights], [out], name=name, domain="com.microsoft",
                            K=k, N=n, bits=spec.bits, block_size=spec.block_size, **extra)
