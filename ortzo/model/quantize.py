"""Block-wise weight-only quantization of one matrix into ONNX Runtime's MatMulNBits layout,
one matrix at a time, so that a frozen base is quantized in the memory of its largest matrix,
never as a dense model. MatMulNBits computes y = x @ dequant(B), where each block of
`block_size` rows of a column of B is (q - zero_point) * scale; constant B is prepacked at
session creation, and the trainable tensors (vectors, LoRA) stay float inputs beside it.

Asymmetric 4-bit blocks get float zero points: scale (max - min) / 15 and zero point -min /
scale, so no rounding of the zero point adds to the error, and a block that a GGUF's Q4_1 made
(q d + m, q in 0..15, d and m per 32 weights along the input) comes back exactly: SmolLM2's
packaged matrices are such blocks. ORT's CPU kernel takes float zero points at 4 bits only, and
GatherBlockQuantized (a quantized embedding's lookup) none at all, so every other case is
packed by ORT's own kernel (the one `onnxruntime.quantization`'s MatMulNBits quantizer calls),
with integer zero points.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import OrtzoError

if TYPE_CHECKING:
    import onnx

Quantize = Literal["none", "int4", "int8"]
Widths = Literal["uniform", "source"]


@dataclass(frozen=True)
class QuantSpec:
    """`bits` 4 or 8; `block_size` rows of a column that share a scale (a power of 2, 16-256);
    `symmetric`: no zero points (q centred on 8 or 128). `accuracy_level` is MatMulNBits' own:
    0 computes in fp32 from dequantized blocks; 4 quantizes activations to int8 per block, the
    default: on SmolLM2 (16 x 96, this machine) it was faster (1.02 x the fp32 forward against
    1.07 x), and level 0 dequantized the 8-bit head whole at every call (+110 MiB at the peak).
    `embedding`: the bits of the token embedding and the lm head (0: kept as stored); 8 by
    default, which a GGUF's Q8_0 table keeps exactly. `source_widths`: a matrix its GGUF stores
    wider than `bits` (a "Q4_K_M" file holds Q5_0, Q6_K and Q8_0 matrices too) is kept at 8
    bits: Gemma 3 270M's file scored 0.693 on SST-2 with every matrix at 4 bits, 0.823 at 8,
    against 0.818 dequantized to fp32."""

    bits: int
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    embedding: int = 8
    source_widths: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.embedding not in (0, 4, 8):
            raise OrtzoError(f"quantization to {self.bits} bits (embedding {self.embedding}): choose int4 or int8")
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise OrtzoError(f"--block-size {self.block_size}: a power of 2 from 16 to 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OrtzoError(f"--accuracy-level {self.accuracy_level}: 0 to 4")

    @classmethod
    def named(cls, quantize: Quantize, block_size: int = 32, symmetric: bool = False, accuracy_level: int = 4,
              embedding: str = "int8", widths: Widths = "uniform") -> QuantSpec | None:
        """The spec for `--quantize none|int4|int8` (None: no quantization); `embedding`: int8,
        int4 or stored; `widths`: uniform, or source (see `source_widths`)."""
        if quantize == "none":
            return None
        return cls(int(quantize.removeprefix("int")), block_size, symmetric, accuracy_level,
                   0 if embedding == "stored" else int(embedding.removeprefix("int")), widths == "source")

    def widths(self, matrices: list[str], stored_bits: Mapping[str, int] | None) -> dict[str, int]:
        """The bits of each matrix: `bits`, or with `source_widths` 8 where the source stores
        more than `bits` (`stored_bits`: a GGUF's, ortzo.model.export.tensors)."""
        if not self.source_widths:
            return dict.fromkeys(matrices, self.bits)
        if stored_bits is None:
            raise OrtzoError("--widths source keeps a GGUF file's wider matrices at 8 bits: this source is not a "
                             "GGUF file (use --widths uniform)")
        return {w: 8 if stored_bits.get(w, 32) > self.bits else self.bits for w in matrices}

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def to_json(self) -> dict[str, object]:
        return {"quantize": self.name, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level,
                "embedding": f"int{self.embedding}" if self.embedding else "stored",
                "widths": "source" if self.source_widths else "uniform"}


@dataclass(frozen=True)
class Quantized:
    """A matrix [K, N] in MatMulNBits' layout: `packed` [N, K / block_size, block_size * bits / 8],
    `scales` [N, K / block_size], `zero_points` None (symmetric), float [N, K / block_size] or
    uint8 packed like q."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int


def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Quantized:
    """Quantize the matrix `w` [K, N] (as MatMul's B) in blocks of `block_size` along K."""
    k, n = w.shape
    blocks = -(-k // block_size)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if blocks * block_size != k:  # whole blocks; the edge value leaves a block's range as it was
        w = np.pad(w, ((0, blocks * block_size - k), (0, 0)), mode="edge")
    if bits == 4 and not symmetric:
        return _min_max(w, block_size, k, n)
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    per_byte = 8 // bits
    packed = np.zeros((n, blocks, block_size // per_byte), np.uint8)
    zero_points = np.zeros((n, -(-blocks // per_byte)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, w, scales, zero_points, block_size, n, k, symmetric)
    return Quantized(packed, scales, None if symmetric else zero_points, k, n)


def _min_max(w: np.ndarray, block_size: int, k: int, n: int) -> Quantized:
    """4 bits a weight over each block's own range, with a float zero point; q's low nibble first."""
    blocks = w.T.reshape(n, -1, block_size)  # [N, K / block_size, block_size]
    lo, hi = blocks.min(-1), blocks.max(-1)
    scales = np.where(hi > lo, (hi - lo) / 15, 1).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[..., None]) / scales[..., None]), 0, 15).astype(np.uint8)
    return Quantized(q[..., 0::2] | (q[..., 1::2] << 4), scales, (-lo / scales).astype(np.float32), k, n)


def matmul_nbits(x: str, weights: list[str], out: str, k: int, n: int, bits: int, spec: QuantSpec,
                 name: str) -> onnx.NodeProto:
    """The node y = x @ dequant(B) for B [k, n] of `bits`; `weights` names the initializers of
    packed, scales (and zero points)."""
    from onnx import helper

    extra = {"accuracy_level": spec.accuracy_level} if spec.accuracy_level else {}
    return helper.make_node("MatMulNBits", [x, *weights], [out], name=name, domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=spec.block_size, **extra)
