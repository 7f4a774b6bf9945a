"""The memory model behind `ortzo memory`: what fine-tuning a causal LM holds, term by term,
for ort-mezo, torch-mezo and backprop (bp), and its inversion, the largest model of a family
that fits a budget. Pure Python: the runtime never imports torch.

Where the terms come from
-------------------------
The paper (Katti et al., "On-Device Fine-Tuning via Backprop-Free Zeroth-Order Optimization",
arXiv 2511.11362) models BP as weights + gradients + optimizer states + the activations of the
layers, a fraction L'/L of them checkpointed, and MeZO as inference. Its formulas' text was not
available to us (only its abstract), so every term below is derived here, and derived for the
code that runs: Hugging Face modules, SDPA attention on the CPU, dropout off, `use_cache=False`,
the scoring head of `ortzo.engines.torch_model.scores` (the LM head at one row per example,
then log-softmax). Each count was checked against what PyTorch saves for backward
(`torch.autograd.graph.saved_tensors_hooks`, unique storages) in tests/test_memory.py.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
count s b h (34 + 5 a s / h) bytes a layer in fp16: dropout masks and the materialised
s x s attention scores included. Our count differs where our implementation does: SDPA's CPU
flash kernel keeps q, k, v, its output and a log-sum-exp per row and head (no s x s scores),
dropout is off (no masks), RMSNorm upcasts to fp32 (Gemma's norms and Cohere's LayerNorm
compute in fp32 throughout), and GQA's k/v are repeated only when SDPA gets a mask. MeZO
(Malladi et al. 2023) needs inference memory: the weights, one forward's transient activations
and the head; its reference code adds one Gaussian z of the largest parameter at a time
(torch-mezo), ortzo's directions a few 64k-element chunks (none). Under ONNX Runtime "one
forward" is two allocations of it: the arena keeps the pages of the first run, which places
each tensor on its own, and from the second run on holds one block laid out for all of them,
the memory pattern (`ort_arena`); and a frozen base costs what the session keeps of its file,
packed or mapped (`frozen_base_resident`), not the file's size.

Notation: b batch, s sequence, t = b s tokens, h hidden, n heads, k kv heads, d head dim,
I intermediate, V vocab, c bytes of the compute dtype (4 for fp32); sizes below are bytes.

The paper's setting (`PAPER`; `ortzo memory --budget 17GB` prints it): with MeZO's batch of 16
and 256-token prompts, BP in fp32 with AdamW (weights + gradients + two moments + kept
activations) fits GPT-2-medium and not GPT-2-large in 17 GB, and MeZO on 16-bit weights
(weights + one forward's transient + the head) fits Llama-2-7B, 19x the parameters. Llama-2-13B
needs ~27 GB at 16 bits: within 17 GB only at ~1.2 bytes a weight (8-bit), which no engine
here does. L'/L is read as the fraction of layers checkpointed (recomputed), as torch-bp's
--checkpoint-fraction.
"""
from __future__ import annotations

import math
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

from .errors import OrtzoError

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
METHODS = ("ort-mezo", "torch-mezo", "bp")
OPTIMIZER_COPIES = {"adamw": 2, "sgd": 0, "momentum": 1}  # state tensors per parameter (torch.optim)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "cohere", "gpt2", "opt", "gpt_neox",
            "phi3", "phi")
_GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "cohere", "phi3")  # down(act(gate x) * up x)
_GEMMA = ("gemma3_text", "gemma2")  # fp32 RMSNorms scaling by (1 + weight), four a layer; a scaled embedding
_UNGATED_KEPT = {"gelu_new": 5, "gelu": 2, "relu": 1}  # I-wide tensors an fc-act-fc MLP keeps
_FLOAT_MASK = ("opt",)  # builds one float mask that every layer's SDPA shares (others: a bool one)

# Peak RSS of an engine's process on a model of 29k parameters (imports, ORT session, torch's
# pools): `python -m ortzo.recipes.measure` on this project's CPU machine, torch 2.13; it
# differs between machines and library versions.
RUNTIME = {"ort-mezo": 86 * 2**20, "torch-mezo": 351 * 2**20, "bp": 357 * 2**20}
# A loaded tokenizer (`tokenizers`) costs about this much a vocabulary entry: 1.1 kB measured for
# Gemma 3's (262k entries), 0.7 kB for SmolLM2's (49k).
TOKENIZER = 1024

# Model families for the budget inversion: export/ aliases with a [config] table, smallest first.
SIZES = {
    "gpt2": ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"),
    "opt": ("opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b"),
    "pythia": ("pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b", "pythia-6.9b",
               "pythia-12b"),
    "smollm2": ("smollm2-135m", "smollm2-360m", "smollm2-1.7b"),
    "qwen2.5": ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b"),
    "gemma3": ("gemma3-270m", "gemma3-1b"),
    "llama2": ("llama2-7b", "llama2-13b", "llama2-70b"),
}


@dataclass(frozen=True)
class Arch:
    """The numbers of a decoder-only LM that its memory depends on, from its HF config."""

    family: str  # the config's model_type (gemma3: its text part)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    act: str
    positions: int = 0  # rows of a learned position table (gpt2, opt); 0: rotary
    rotary_dims: int = 0
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    proj_dim: int = 0  # opt's word_embed_proj_dim when it is not hidden: project_in/out
    final_norm: bool = True  # opt-350m normalises after each block instead
    parallel_residual: bool = True  # gpt_neox
    sliding: tuple[bool, ...] = ()  # per layer: attends within `window` tokens
    window: int = 0
    head_bias: bool = False  # phi: the LM head has a bias (also when its weight is tied)
    qk_norm: bool = False  # phi's qk_layernorm, cohere's use_qk_norm (qwen3 and gemma3 always have theirs)
    softcap: bool = False  # a final logit soft-cap, tanh(logits / cap) cap (gemma2)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Arch:
        """Read a Hugging Face config dict (config.json) as transformers would: a key it
        leaves out takes the default of that model_type's config class (`save_pretrained`
        writes only what differs), and kv heads and head_dim, where the class derives them,
        are derived (heads, hidden / heads)."""
        c = {k: v for k, v in config.items() if v is not None or k in _NULLABLE}
        family = c.get("model_type")
        if family == "gemma3":  # the multimodal wrapper: its language model
            c = {k: v for k, v in (c.get("text_config") or {}).items() if v is not None or k in _NULLABLE}
            family = "gemma3_text"
        if family not in FAMILIES:
            raise OrtzoError(f"{'unsupported model_type ' + repr(family) if family else 'config without model_type'} "
                             f"(the memory model knows {', '.join(FAMILIES)})")
        return _READERS[family](_DEFAULTS[family] | c | {"model_type": family})

    @property
    def inner(self) -> int:
        """Width of the attention's q (and output): heads x head_dim, not always hidden."""
        return self.heads * self.head_dim

    @property
    def embed_dim(self) -> int:
        return self.proj_dim or self.hidden


# Keys whose None means something (no soft-cap), not "the class default".
_NULLABLE = ("final_logit_softcapping",)
_LLAMA = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
          "vocab_size": 32000, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
          "mlp_bias": False}
# transformers 4.57's config-class defaults of the keys read here.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA | {"num_key_value_heads": 8, "intermediate_size": 14336, "sliding_window": 4096},
    "qwen2": _LLAMA | {"num_key_value_heads": 32, "intermediate_size": 22016, "vocab_size": 151936},
    "qwen3": _LLAMA | {"num_key_value_heads": 32, "head_dim": 128, "intermediate_size": 22016, "vocab_size": 151936},
    "gemma3_text": _LLAMA | {"hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
                             "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216,
                             "vocab_size": 262208, "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh",
                             "sliding_window": 4096, "sliding_window_pattern": 6},
    "gemma2": _LLAMA | {"hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
                        "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000,
                        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096,
                        "final_logit_softcapping": 30.0},
    "cohere": _LLAMA | {"hidden_size": 8192, "num_hidden_layers": 40, "num_attention_heads": 64,
                        "intermediate_size": 22528, "vocab_size": 256000, "tie_word_embeddings": True,
                        "use_qk_norm": False},
    "phi3": _LLAMA | {"hidden_size": 3072, "intermediate_size": 8192, "vocab_size": 32064,
                      "partial_rotary_factor": 1.0},
    "phi": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "intermediate_size": 8192,
            "vocab_size": 51200, "tie_word_embeddings": False, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5,
            "qk_layernorm": False},
    "gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024,
             "activation_function": "gelu_new", "tie_word_embeddings": True},
    "opt": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "ffn_dim": 3072,
            "vocab_size": 50272, "max_position_embeddings": 2048, "activation_function": "relu",
            "do_layer_norm_before": True, "_remove_final_layer_norm": False, "enable_bias": True,
            "tie_word_embeddings": True},
    "gpt_neox": {"hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64, "intermediate_size": 24576,
                 "vocab_size": 50432, "tie_word_embeddings": False, "hidden_act": "gelu", "attention_bias": True,
                 "rotary_pct": 0.25, "use_parallel_residual": True},
}


def _llama_like(c: dict[str, Any]) -> Arch:
    family, h, n, layers = c["model_type"], c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    head_dim = c.get("head_dim", h // n)
    window = c.get("sliding_window", 0)
    types = c.get("layer_types")
    if family == "gemma3_text" and not types:  # older configs: every 6th layer global
        types = ["full_attention" if (i + 1) % c["sliding_window_pattern"] == 0 else "sliding_attention"
                 for i in range(layers)]
    if family == "gemma2" and not types:  # older configs: sliding and global layers alternate, sliding first
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if family in ("mistral", "phi3") and window:
        types = ["sliding_attention"] * layers
    if family == "qwen2" and not c.get("use_sliding_window"):
        types = None
    return Arch(family, h, layers, n, c.get("num_key_value_heads", n), head_dim, c["intermediate_size"],
                c["vocab_size"], c["tie_word_embeddings"], c.get("hidden_activation", c["hidden_act"]),
                rotary_dims=int(head_dim * c.get("partial_rotary_factor", 1.0)),
                qkv_bias=family == "qwen2" or c["attention_bias"], out_bias=family != "qwen2" and c["attention_bias"],
                mlp_bias=c["mlp_bias"] and family not in ("gemma2", "cohere"),  # theirs take no mlp_bias
                sliding=tuple(t == "sliding_attention" for t in types) if types and window else (), window=window,
                qk_norm=family == "cohere" and c["use_qk_norm"], softcap=c.get("final_logit_softcapping") is not None)


def _gpt2(c: dict[str, Any]) -> Arch:
    h, n = c["n_embd"], c["n_head"]
    return Arch("gpt2", h, c["n_layer"], n, n, h // n, c.get("n_inner", 4 * h), c["vocab_size"],
                c["tie_word_embeddings"], c["activation_function"], positions=c["n_positions"], qkv_bias=True,
                out_bias=True, mlp_bias=True)


def _opt(c: dict[str, Any]) -> Arch:
    h, n = c["hidden_size"], c["num_attention_heads"]
    proj, bias, pre = c.get("word_embed_proj_dim", h), c["enable_bias"], c["do_layer_norm_before"]
    return Arch("opt", h, c["num_hidden_layers"], n, n, h // n, c["ffn_dim"], c["vocab_size"],
                c["tie_word_embeddings"], c["activation_function"],
                positions=c["max_position_embeddings"] + 2,  # OPT offsets positions by 2
                qkv_bias=bias, out_bias=bias, mlp_bias=bias, proj_dim=proj if proj != h else 0,
                final_norm=pre and not c["_remove_final_layer_norm"])


def _gpt_neox(c: dict[str, Any]) -> Arch:
    h, n = c["hidden_size"], c["num_attention_heads"]
    return Arch("gpt_neox", h, c["num_hidden_layers"], n, n, h // n, c["intermediate_size"], c["vocab_size"],
                c["tie_word_embeddings"], c["hidden_act"], rotary_dims=int(h // n * c["rotary_pct"]),
                qkv_bias=c["attention_bias"], out_bias=c["attention_bias"], mlp_bias=True,
                parallel_residual=c["use_parallel_residual"])


def _phi(c: dict[str, Any]) -> Arch:
    h, n = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim", h // n)  # PhiConfig has none; the model reads one if given
    return Arch("phi", h, c["num_hidden_layers"], n, c.get("num_key_value_heads", n), head_dim, c["intermediate_size"],
                c["vocab_size"], c["tie_word_embeddings"], c["hidden_act"],
                rotary_dims=int(head_dim * c["partial_rotary_factor"]), qkv_bias=True, out_bias=True, mlp_bias=True,
                head_bias=True, qk_norm=c["qk_layernorm"])


_READERS = dict.fromkeys(_GATED, _llama_like) | {"gpt2": _gpt2, "opt": _opt, "gpt_neox": _gpt_neox, "phi": _phi}


# ---------------------------------------------------------------------------------- parameters

def layer_parameters(a: Arch) -> list[tuple[int, ...]]:
    """Shapes of one decoder layer's parameter tensors, fused where the model fuses them
    (GPT-2's c_attn, GPT-NeoX's query_key_value, Phi-3's qkv_proj and gate_up_proj); q, k, v
    first (q and v at 0 and 2 where they are apart). Norms: two RMSNorms (llama-like), Gemma's
    four, Cohere's one LayerNorm without a bias (its q/k norms, if any, are [heads, d] and
    [kv heads, d] matrices of weights: `_norm_matrices`), Phi's one LayerNorm with a bias (and
    its q/k LayerNorms of d), two LayerNorms with biases otherwise."""
    h, nd, kd, i, d = a.hidden, a.inner, a.kv_heads * a.head_dim, a.intermediate, a.head_dim
    if a.family == "phi3":
        return [(h, nd + 2 * kd), (nd, h), (h, 2 * i), (i, h), (h,), (h,)]
    if a.family == "phi":  # q, k, v, dense, fc1 and fc2 all with biases
        qk_norms = [(d,)] * 4 if a.qk_norm else []
        return [(h, nd), (h, kd), (h, kd), (nd,), (kd,), (kd,), (nd, h), (h,), (h, i), (i,), (i, h), (h,), (h,), (h,)] \
            + qk_norms
    if a.family in _GATED:
        qkv = [(h, nd), (h, kd), (h, kd)] + ([(nd,), (kd,), (kd,)] if a.qkv_bias else [])
        out = [(nd, h)] + ([(h,)] if a.out_bias else [])
        mlp = [(h, i), (h, i), (i, h)] + ([(i,), (i,), (h,)] if a.mlp_bias else [])
        norms = {"gemma3_text": [(h,)] * 4 + [(d,)] * 2, "gemma2": [(h,)] * 4,
                 "cohere": [(h,)] + _norm_matrices(a),
                 "qwen3": [(h,)] * 2 + [(d,)] * 2}.get(a.family, [(h,)] * 2)
        return qkv + out + mlp + norms
    fused = a.family in ("gpt2", "gpt_neox")
    qkv = ([(h, 3 * nd)] if fused else [(h, nd)] * 3) + (([(3 * nd,)] if fused else [(nd,)] * 3) if a.qkv_bias else [])
    out = [(nd, h)] + ([(h,)] if a.out_bias else [])
    mlp = [(h, i), (i, h)] + ([(i,), (h,)] if a.mlp_bias else [])
    return qkv + out + mlp + [(h,)] * 4  # two LayerNorms, weight and bias


def _norm_matrices(a: Arch) -> list[tuple[int, ...]]:
    """Cohere's q/k norms, when it has them, weigh each head apart: [heads, d] and [kv heads,
    d]. Two-dimensional, yet no MatMul's: a frozen base stores them as they are."""
    return [(a.heads, a.head_dim), (a.kv_heads, a.head_dim)] if a.family == "cohere" and a.qk_norm else []


def outer_parameters(a: Arch) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Shapes (input side: embeddings, positions, OPT's project_in; output side: final norm
    (RMSNorm, Cohere's LayerNorm: a weight; LayerNorm: a weight and a bias), project_out, an
    untied LM head, Phi's head bias): the tensors outside the decoder layers."""
    e = a.embed_dim
    inputs = [(a.vocab, e)] + ([(a.positions, a.hidden)] if a.positions else []) + \
        ([(e, a.hidden)] if a.proj_dim else [])
    norm = [] if not a.final_norm else [(a.hidden,)] * (1 if a.family in _GATED else 2)
    outputs = norm + ([(a.hidden, e)] if a.proj_dim else []) + ([] if a.tied else [(a.vocab, e)]) + \
        ([(a.vocab,)] if a.head_bias else [])
    return inputs, outputs


def _sizes(shapes: list[tuple[int, ...]]) -> list[int]:
    return [math.prod(s) for s in shapes]


def parameter_count(a: Arch) -> int:
    """Every parameter once (a tied head is the embedding), as `model.parameters()` yields them."""
    inputs, outputs = outer_parameters(a)
    return sum(_sizes(inputs + outputs)) + a.layers * sum(_sizes(layer_parameters(a)))


def vector_count(a: Arch) -> int:
    """The one-dimensional parameters (norms, biases): what `--params vectors` trains and a
    frozen base keeps as trainable inputs."""
    inputs, outputs = outer_parameters(a)
    one_d = [s for s in inputs + outputs if len(s) == 1] + [s for s in layer_parameters(a) if len(s) == 1] * a.layers
    return sum(_sizes(one_d))


def largest_parameter(a: Arch) -> int:
    """Elements of the largest tensor: what per-tensor temporaries (AdamW's sqrt, MeZO's z) cost."""
    inputs, outputs = outer_parameters(a)
    return max(_sizes(inputs + outputs + layer_parameters(a)))


def quantized_bytes(shape: tuple[int, ...], bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes of a matrix [K, N] in MatMulNBits' layout (ortzo.model.quantize): per column, K in
    blocks of `block_size`, each `bits` a weight, an fp32 scale and (asymmetric) a zero point:
    fp32 at 4 bits, packed like the weights at 8."""
    k, n = shape
    blocks = -(-k // block_size)
    zero_points = 0 if symmetric else 4 * n * blocks if bits == 4 else n * blocks
    return n * blocks * block_size * bits // 8 + 4 * n * blocks + zero_points


def frozen_base_bytes(a: Arch, bits: int, block_size: int = 32, symmetric: bool = False, embedding: int = 8,
                      lora_rank: int = 0) -> dict[str, int]:
    """The weights of a frozen base (ortzo.model.frozen) by kind: every matrix quantized (as
    [in, out]); the embedding tables (and an untied head) quantized symmetric to `embedding`
    bits along their rows, a tied table's packed bytes twice (the Gather's layout and the
    head's; scales shared), or (0) all kept fp32; the vectors fp32 twice (the trained buffer
    and the graph's default); LoRA A [in, r] and B [r, out] beside each layer's query and value
    matrices (the one fused qkv matrix where the model fuses them), twice likewise; Cohere's
    [heads, d] q/k norm weights, frozen but multiplied by no MatMul, fp32 as they are."""
    inputs, outputs = outer_parameters(a)
    project_in = [(a.embed_dim, a.hidden)] if a.proj_dim else []
    tables = [s for s in inputs if len(s) == 2 and s not in project_in]
    head = [s for s in outputs if s == (a.vocab, a.embed_dim)]
    layer_matrices = [s for s in layer_parameters(a) if len(s) == 2]
    for s in _norm_matrices(a):
        layer_matrices.remove(s)
    matrices = layer_matrices * a.layers + project_in + [s for s in outputs if len(s) == 2 and s not in head]
    q = lambda shape: quantized_bytes(shape, bits, block_size, symmetric)  # noqa: E731
    if embedding:
        tied = a.vocab * -(-a.embed_dim // block_size) * block_size * embedding // 8 if a.tied else 0
        rows = sum(quantized_bytes(s[::-1], embedding, block_size, True) for s in tables + head) + tied
    else:
        rows = 4 * sum(_sizes(tables + head))
    layer = layer_parameters(a)
    qv = [layer[0]] if a.family in ("gpt2", "gpt_neox", "phi3") else [layer[0], layer[2]]
    terms = {"quantized matrices": sum(q(s) for s in matrices), "embedding and head": rows,
             "trained vectors (x2)": 2 * 4 * vector_count(a),
             "LoRA (x2)": 2 * 4 * a.layers * sum(lora_rank * (k + n) for k, n in qv)}
    if _norm_matrices(a):
        terms["norm matrices"] = 4 * a.layers * sum(_sizes(_norm_matrices(a)))
    return terms


def _frozen_shapes(a: Arch) -> tuple[list[tuple[int, ...]], ...]:
    """A frozen base's 2-D tensors as ORT reads them: the Gathered tables [rows, width], the
    head as MatMulNBits' B [K = e, N = V] (a tied one: the table's second layout), one layer's
    matrices [in, out] (Cohere's norm matrices are no MatMul's), and the matrices outside the
    layers (OPT's project_in/out)."""
    inputs, outputs = outer_parameters(a)
    project_in = [(a.embed_dim, a.hidden)] if a.proj_dim else []
    tables = [s for s in inputs if len(s) == 2 and s not in project_in]
    heads = [s[::-1] for s in outputs if s == (a.vocab, a.embed_dim)] or ([tables[0][::-1]] if a.tied else [])
    layer = [s for s in layer_parameters(a) if len(s) == 2 and s not in _norm_matrices(a)]
    outer = project_in + [s for s in outputs if len(s) == 2 and s != (a.vocab, a.embed_dim)]
    return tables, heads, layer, outer


def mlas_packing(bits: int, symmetric: bool, accuracy_level: int) -> str | None:
    """How ONNX Runtime's MatMulNBits (CPU, onnxruntime 1.32, MLAS's x64 kernels) keeps a
    constant B: "int8" (packed for int8 compute, accuracy level 4), "fp32" (packed for fp32
    compute, 4 bits at levels 0-3) or None (not packed: B is dequantized on every call). Zero
    points that are not uint8 disable packing, and ortzo stores int4's as floats (what a Q4_1
    block needs), so an asymmetric int4 matrix is never packed; MLAS has no fp32-compute kernel
    for 8 bits."""
    if bits == 4 and not symmetric:
        return None
    if accuracy_level == 4:
        return "int8"
    return "fp32" if bits == 4 else None


def packed_bytes(shape: tuple[int, int], bits: int, block_size: int, packing: str) -> int:
    """MLAS's packed B for a [K, N] matrix: per column, K in blocks, `bits` a weight; packed for
    int8 compute also an fp32 scale and an fp32 block sum a block (which the int8 kernel
    folds the zero point into). Measured: the arena after session creation (SmolLM2's int8
    matrices 126.6 MiB, its int4 symmetric ones 75.9 MiB at level 4 and 50.6 at level 0)."""
    k, n = shape
    blocks = n * -(-k // block_size)
    return blocks * block_size * bits // 8 + (8 * blocks if packing == "int8" else 0)


def frozen_base_resident(a: Arch, bits: int, block_size: int = 32, symmetric: bool = False, embedding: int = 8,
                         lora_rank: int = 0, accuracy_level: int = 4) -> dict[str, int]:
    """What ONNX Runtime holds of a frozen base at a step's peak, by kind: `frozen_base_bytes`
    says what the folder stores, this what a session keeps resident of it.

    ORT maps the external data file; a mapped initializer's pages count in RSS once read and
    stay. Where MatMulNBits packs B (`mlas_packing`) it reads B at session creation into the
    arena (`packed_bytes`) and the mapped original is released, but the kernel keeps reading
    the mapped scales (4 bytes a block) and an 8-bit matrix's uint8 zero points (a byte a
    block). A matrix it does not pack (int4 with float zero points; 8 bits below level 4)
    stays mapped, all of it paged in by the first forward (SmolLM2's int4 base: RSS grew by
    its 77 MiB of matrices at the first run, not at session creation).

    tables: GatherBlockQuantized reads rows of the mapped table: its pages come in as ids
      arrive, so a run holds up to all of it, counted whole with its scales (a random batch of
      16 x 128 ids touched a quarter of SmolLM2's);
    head: a tied head is MatMulNBits over the table's second layout (`embedding` bits,
      symmetric; its scales are the table's), packed or mapped by the same rules, an untied
      head likewise with its own scales; a table kept fp32 (`embedding` 0) is read by a Gemm
      whose constant B ORT packs: a second 4 V e copy in the arena (measured: 108 MiB beside
      SmolLM2's mapped 108 MiB table);
    vectors and LoRA (x2), Cohere's norm matrices: as `frozen_base_bytes`.
    """
    stored = frozen_base_bytes(a, bits, block_size, symmetric, embedding, lora_rank)
    tables, heads, layer, outer = _frozen_shapes(a)
    matrices = layer * a.layers + outer
    terms: Counter[str] = Counter()
    packing = mlas_packing(bits, symmetric, accuracy_level)
    for s in matrices:
        if packing:
            blocks = s[1] * -(-s[0] // block_size)
            terms["packed matrices"] += packed_bytes(s, bits, block_size, packing)
            terms["scales, zero points (mapped)"] += blocks * (4 + (1 if bits == 8 and not symmetric else 0))
        else:
            terms["quantized matrices (mapped)"] += quantized_bytes(s, bits, block_size, symmetric)
    if embedding:
        terms["embedding tables (mapped)"] = sum(quantized_bytes(s[::-1], embedding, block_size, True) for s in tables)
        head_packing = mlas_packing(embedding, True, accuracy_level)
        for s in heads:  # a tied head's scales are the table's
            scales = 4 * s[1] * -(-s[0] // block_size)
            terms["head"] += packed_bytes(s, embedding, block_size, head_packing) + (0 if a.tied else scales) \
                if head_packing else quantized_bytes(s, embedding, block_size, True) - (scales if a.tied else 0)
    else:
        terms["embedding tables (mapped)"] = 4 * sum(_sizes(tables))
        terms["head"] = 4 * sum(_sizes(heads))  # ORT's packed copy; an untied head's original is released
    for kind in ("trained vectors (x2)", "LoRA (x2)", "norm matrices"):
        if stored.get(kind):
            terms[kind] = stored[kind]
    return dict(terms)


def frozen_base_scratch(a: Arch, batch: int, seq: int, bits: int, block_size: int = 32, symmetric: bool = False,
                        embedding: int = 8, accuracy_level: int = 4) -> dict[str, int]:
    """MatMulNBits' scratch beside a frozen base, by moment: what a call reserves outside the
    arena (BFC's Reserve: allocated for the call and returned after, so it adds to the
    arena's resident pages at its moment only).

    forward: a matrix without packed B is dequantized into an fp32 K x N buffer on every call;
      with B packed for int8 compute, A is quantized per call (t K bytes and an fp32 scale
      and block sum a block): the largest of the layers' (SmolLM2's int4 MLP matrices: 3.4
      MiB, and peak RSS stood 3.2 MiB above RSS after the run);
    head: the same for the head's call, on b rows (SmolLM2's 8-bit head at level 0: 4 V e,
      and peak RSS stood 108 MiB above RSS after the run).
    Session creation, while it packs a B, holds that B's mapped original beside the packed
    copies (24.5 MiB above what creation leaves, for SmolLM2's int8 head); where the largest
    B is the head, as usual, that is less than the table's pages the step holds beside its
    activations, so it is not counted.
    """
    _, heads, layer, outer = _frozen_shapes(a)
    matrices = layer + outer

    def call(s: tuple[int, ...], rows: int, packing: str | None) -> int:
        k, n = s
        if packing == "int8":
            return rows * -(-k // block_size) * (block_size + 8)
        return 0 if packing else 4 * k * n

    packing = mlas_packing(bits, symmetric, accuracy_level)
    head_packing = mlas_packing(embedding, True, accuracy_level) if embedding else "fp32"
    return {"forward": max(call(s, batch * seq, packing) for s in matrices),
            "head": max([call(s, batch, head_packing) for s in heads], default=0)}


# --------------------------------------------------------------------- activations for backward

def _rms(rows: int, width: int, c: int) -> int:
    """HF RMSNorm keeps x upcast to fp32 (pow, mul), 1/rms (fp32), and x/rms cast back (c)."""
    return 4 * rows * width + 4 * rows + c * rows * width


def _gemma_rms(rows: int, width: int) -> int:
    """Gemma's RMSNorm stays in fp32: x, 1/rms, x/rms, and its (1 + weight) vector."""
    return 4 * rows * width + 4 * rows + 4 * rows * width + 4 * width


def _layernorm(rows: int, width: int, c: int) -> int:
    """native_layer_norm keeps its input and per-row mean and 1/std, all in the compute dtype."""
    return c * rows * width + 2 * c * rows


def _cohere_norm(rows: int, width: int, c: int, weight: int) -> int:
    """Cohere's LayerNorm is composed in fp32, and computes x - mean twice: pow keeps the one
    and its product with 1/std the other, mul keeps 1/std (fp32, a row) and the normalised x
    the weight multiplies; below fp32 also the weight's fp32 copy (`weight` elements)."""
    return 3 * 4 * rows * width + 4 * rows + (4 * weight if c != 4 else 0)


def masked(a: Arch, layer: int, seq: int, padded: bool) -> bool:
    """Whether SDPA gets a mask in this layer: transformers drops it for a full causal batch,
    except in a sliding-window layer the sequence fills."""
    return padded or (bool(a.sliding) and a.sliding[layer] and seq >= a.window)


def layer_activations(a: Arch, batch: int, seq: int, c: int, mask: bool) -> Counter[str]:
    """Bytes one decoder layer keeps for backward, by tensor kind.

    norms: 2 (RMSNorm(t h) + c t h) for llama-like (each norm's output feeds a Linear, which
      keeps it); Gemma 2 and 3: 4 fp32 norms, two with their outputs (the post-norms' outputs
      go to the residual sum, which keeps nothing); LayerNorm families 2 (c t h + 2 c t + c t h),
      except that GPT-NeoX's parallel norms share their input, and Phi and Cohere have one norm
      whose output both attention and MLP read (LayerNorm + c t h; Cohere's `_cohere_norm`).
      q/k norms: Qwen3's and Gemma 3's always, Phi's qk_layernorm and Cohere's use_qk_norm when
      set, each over t n (q) and t k (k) rows of d (Phi's LayerNorm keeps the projection's
      output as its input).
    q k v: c t n d (q after RoPE) + 2 c t n d when SDPA's mask makes transformers repeat
      GQA's k/v, else 2 c t k d; GPT-2 keeps the fused c_attn output (3 c t h), Phi-3's v and
      GPT-NeoX's v are views of their fused output ((n + 2k) d, 3 n d); OPT 3 c t n d. Phi's
      partial RoPE concatenates the rotated and the passed dims into new q and k, which SDPA
      keeps (as llama's), and Cohere's interleaved RoPE keeps only its tables.
    attention: 4 t n (SDPA's log-sum-exp) + c t n d (its output, which o_proj keeps as its
      input) + c t n d more where that output is head-major and o_proj copies it (NeoX, Phi-3,
      Phi: their q is a torch.cat's head-major output, and SDPA's output follows q's layout).
      Gemma 2's attention soft-cap is eager attention's: SDPA takes no soft-cap and drops it.
    attention mask: c b s^2, SDPA's CPU kernel turns the boolean mask into a float copy per call
      (OPT's mask is float already, one for all layers: see `outer_activations`).
    mlp: gated 4 c t I (gate, act(gate), up, their product); GPT-2's and Phi's composed
      gelu_new 5 c t I, GPT-NeoX's gelu 2 c t I, OPT's relu c t I (its output is fc2's input).
    """
    t = batch * seq
    h, n, d, i, nd, kd = a.hidden, a.heads, a.head_dim, a.intermediate, a.inner, a.kv_heads * a.head_dim
    repeat = mask and a.kv_heads < n
    out: Counter[str] = Counter()
    f = a.family
    if f in _GEMMA:
        out["norms"] = 4 * _gemma_rms(t, h) + 2 * c * t * h
        if f == "gemma3_text":
            out["norms"] += _gemma_rms(t * n, d) + _gemma_rms(t * a.kv_heads, d)
    elif f == "cohere":
        out["norms"] = _cohere_norm(t, h, c, h) + c * t * h
        if a.qk_norm:
            out["norms"] += _cohere_norm(t * n, d, c, nd) + _cohere_norm(t * a.kv_heads, d, c, kd)
    elif f == "phi":
        out["norms"] = _layernorm(t, h, c) + c * t * h
        if a.qk_norm:
            out["norms"] += _layernorm(t * n, d, c) + _layernorm(t * a.kv_heads, d, c)
    elif f in _GATED:
        out["norms"] = 2 * (_rms(t, h, c) + c * t * h)
        if f == "qwen3":
            out["norms"] += _rms(t * n, d, c) + _rms(t * a.kv_heads, d, c)
    elif f == "gpt_neox" and a.parallel_residual:
        out["norms"] = c * t * h + 2 * (2 * c * t + c * t * h)
    else:
        out["norms"] = 2 * (_layernorm(t, h, c) + c * t * h)
    if f == "gpt2":
        out["q k v"] = 3 * c * t * h
    elif f == "opt":
        out["q k v"] = 3 * c * t * nd
    elif f == "gpt_neox":
        out["q k v"] = 2 * c * t * nd + 3 * c * t * nd
    elif f == "phi3":
        out["q k v"] = c * t * nd + (2 * c * t * nd if repeat else c * t * kd + c * t * (nd + 2 * kd))
    else:
        out["q k v"] = c * t * nd + (2 * c * t * nd if repeat else 2 * c * t * kd)
    out["attention"] = 4 * t * n + c * t * nd * (2 if f in ("gpt_neox", "phi3", "phi") else 1)
    if mask and f not in _FLOAT_MASK:
        out["attention mask"] = c * batch * seq * seq
    out["mlp"] = c * t * i * (4 if f in _GATED else _mlp_kept(a))
    return out


def _mlp_kept(a: Arch) -> int:
    if a.act not in _UNGATED_KEPT:
        raise OrtzoError(f"{a.family} with activation {a.act!r}: not in the memory model "
                         f"({', '.join(_UNGATED_KEPT)})")
    return _UNGATED_KEPT[a.act]


def outer_activations(a: Arch, batch: int, seq: int, c: int, padded: bool) -> Counter[str]:
    """Bytes kept outside the decoder layers, by kind.

    indices: 8 t (token ids, which the embedding keeps) + 8 t (learned positions) + 8 b (the
      scored rows); rotary tables: 2 c t r per table (cos, sin: r rotary dims; Gemma 3 has a
      local and a global table, Gemma 2 one; Phi's r is its partial_rotary_factor of d);
    embeddings: OPT's project_in keeps c t e, Gemma's (2 and 3) scale c;
    attention mask: OPT's one float mask, c b s^2, when the batch is padded;
    head: the final norm (as in a layer, without an output: the row gather keeps nothing)
      + OPT's project_out input c t h + the scored rows the LM head keeps, c b e (Phi's head
      bias keeps nothing) + a final soft-cap's tanh output, c b V (Gemma 2: its division and
      multiplication by the cap, like Cohere's logit scale, keep only Python numbers).
    """
    t = batch * seq
    h, e = a.hidden, a.embed_dim
    out: Counter[str] = Counter()
    out["indices"] = 8 * t * (2 if a.positions else 1) + 8 * batch
    if a.rotary_dims:  # Gemma 3: a local and a global table when it has both kinds of layer
        tables = 2 if a.family == "gemma3_text" and len(set(a.sliding)) == 2 else 1
        out["rotary tables"] = tables * 2 * c * t * a.rotary_dims
    if a.proj_dim:
        out["embeddings"] = c * t * e
    if padded and a.family in _FLOAT_MASK:
        out["attention mask"] = c * batch * seq * seq
    if a.family in _GEMMA:
        out["embeddings"] = c
    if not a.final_norm:
        head = 0
    elif a.family in _GEMMA:
        head = _gemma_rms(t, h)
    elif a.family == "cohere":
        head = _cohere_norm(t, h, c, h)
    elif a.family in _GATED:
        head = _rms(t, h, c)
    else:
        head = _layernorm(t, h, c)
    out["head"] = head + (c * t * h if a.proj_dim else 0) + c * batch * e + (c * batch * a.vocab if a.softcap else 0)
    return out


# ------------------------------------------------------------------------- transient forwards

def forward_transient(a: Arch, batch: int, seq: int, c: int, padded: bool, ort: bool) -> int:
    """The most one forward without autograd holds at once beyond the weights (the peak of
    its worst layer).

    PyTorch (inference mode; checked against the profiler's allocation timeline): Python
    references keep the embedding output, the layer's input, the residual and the normed
    input alive (4 c t h; GPT-2 also its position embeddings and attention output, 6 c t h),
    plus the larger of the MLP's live intermediates (gated 3 c t I: act, up, product; Phi-3's
    fused gate_up 4 c t I; GPT-2's and Phi's composed gelu_new 4 c t I; gelu, relu 2 c t I)
    and the attention's (q, k, v, repeated k/v, output, the float mask copy); plus the rotary
    tables and the boolean mask (b s^2). Phi and Cohere, whose MLP runs beside the attention,
    hold the attention's output through the MLP in place of the llama-like's residual sum
    (4 c t h too). Phi's attention is counted tensor by tensor: at its peak 3 c t h are held
    (no attention output yet), q_proj's and k_proj's outputs stay alive beside the
    concatenations SDPA gets (the slices of the dims RoPE passes hold them), and so do the
    rotated dims, v, the repeated k and v, SDPA's head-major output and, once SDPA has freed
    its float mask, the output's copy for `dense`: c t (2 (n + k) d + k d + (n + k) r + n d)
    + 2 c t n d repeated + the larger of c t n d and c b s^2.

    ONNX Runtime (`ort`): the first run's arena pages plus the memory pattern's block, what
    `ort_arena` counts for the layers (the scoring head is `estimate`'s).
    """
    if ort:
        return sum(ort_arena(a, batch, seq, c))
    t = batch * seq
    h, nd, kd = a.hidden, a.inner, a.kv_heads * a.head_dim
    mask = any(masked(a, layer, seq, padded) for layer in range(a.layers))
    repeat = 2 * c * t * nd if mask and a.kv_heads < a.heads else 2 * c * t * kd
    mlp = c * t * a.intermediate * {"phi3": 4, "gpt2": 4}.get(
        a.family, 3 if a.family in _GATED else 4 if a.act == "gelu_new" else 2)
    attention = 2 * c * t * nd + repeat + (c * batch * seq * seq if mask else 0)
    held = (6 if a.family == "gpt2" else 4) * c * t * h
    if a.family == "phi":  # written relative to the 4 c t h held: one fewer
        attention = c * t * (2 * (nd + kd) + kd + (a.heads + a.kv_heads) * a.rotary_dims + nd) - c * t * h + \
            (2 * c * t * nd if mask and a.kv_heads < a.heads else 0) + \
            max(c * batch * seq * seq if mask else 0, c * t * nd)
    return held + max(mlp, attention) + outer_activations(a, batch, seq, c, padded)["rotary tables"] + (
        batch * seq * seq if mask else 0)


_PARALLEL = ("phi", "cohere")  # the attention's output waits beside the MLP (and GPT-NeoX's parallel residual)


def ort_phases(a: Arch, batch: int, seq: int, c: int) -> dict[str, tuple[int, int]]:
    """ONNX Runtime's forward (the CPU provider as targets/cpu.toml sets it up: ORT_ENABLE_ALL,
    the BFC arena, the memory pattern) at its two candidate peaks, as (planned, scratch) bytes:
    planned are the tensors of ORT's allocation plan alive at once, scratch what a kernel
    allocates from the arena for itself meanwhile.

    Counted on the optimized graphs of Optimum's SDPA exports (SmolLM2-135M, a tiny Llama and
    a tiny Gemma 3: `SessionOptions.optimized_model_filepath`), against ORT's profiler, which
    records the arena's requested bytes after each node (SmolLM2 at 16 x 128: 41.75 MiB at
    the peak, counted 41.75). The planner frees each tensor after its last reader, but the
    export decomposes attention: the scores q k^T (FusedMatMul), the float mask added, Softmax,
    and a NaN guard Where(IsNaN(p), 0, p), each [b, n, s, s]; GQA's k and v are expanded to n
    heads, and v is projected only after the softmax. The graph is the same for full rows and
    padded ones: it computes the mask and the expansion either way.

    attention, at the guard: the layer's input and its normed input (2 c t h, v still to be
      projected from it), the softmax's output, its NaN mask and the guard's output
      ((2c + 1) b n s^2: the scores and the float mask are freed by then), the batch's
      boolean mask (b s^2 bytes; Gemma 3's sliding and full layers have one each, OPT one
      float mask, c b s^2) and the rotary tables (cos and sin, 2 c t r bytes a table, made
      once for all layers).
      Scratch: Where's CPU kernel makes both of its selections as full-size tensors before it
      merges them, 2 c b n s^2 (the profiler's in-use peak jumps by that inside the node).
    mlp: the residual (c t h; Phi's and Cohere's attention output waits beside it, c t h more)
      and, gated, act(gate), up and their product (3 c t I: the gate dies into its
      activation, ORT's fused QuickGelu for SiLU, the normed input after up); 4 c t I where
      ORT leaves the activation composed (Gemma's tanh GELU: up, gate and two steps of the
      chain) or splits a fused gate_up (Phi-3); ungated, fc1's output and its activation's
      (2 c t I); plus the masks and rotary tables.
    """
    t = batch * seq
    h, n, s = a.hidden, a.heads, seq
    kinds = 2 if len(set(a.sliding)) == 2 else 1
    masks = c * batch * s * s if a.family in _FLOAT_MASK else kinds * batch * s * s
    rotary = outer_activations(a, batch, seq, c, False)["rotary tables"]
    scores = batch * n * s * s
    attention = 2 * c * t * h + (2 * c + 1) * scores + masks + rotary
    if a.family in _GATED:
        wide = 4 if a.family == "phi3" or a.act == "gelu_pytorch_tanh" else 3
    else:
        wide = 2
    mlp = (2 if a.family in _PARALLEL or (a.family == "gpt_neox" and a.parallel_residual) else 1) * c * t * h + \
        wide * c * t * a.intermediate + masks + rotary
    return {"attention": (attention, 2 * c * scores), "mlp": (mlp, 0)}


def ort_arena(a: Arch, batch: int, seq: int, c: int, head: int = 0) -> tuple[int, int]:
    """(first run, memory pattern): the bytes of the arena ONNX Runtime's forwards leave
    resident, the layers' `ort_phases` and the scoring head's `head` planned bytes.

    The first run allocates each planned tensor from the BFC arena on its own; the arena
    never returns a page it has touched, so its footprint is the larger phase's planned
    tensors plus that phase's scratch. From the second run on (enable_mem_pattern) ORT
    allocates one block for all planned tensors, its offsets traced in the first run (the
    planned peak), while the first run's chunks sit free in the arena: 75-107 % of that block
    landed on pages the first run had not touched (SmolLM2, 4 x 32 to 64 x 64), so both
    count. Hence the per-token slope of peak RSS, about twice the planned tensors' (SmolLM2
    at 16 x 128: 52 kB a token, 21 kB planned at the MLP's peak, 24 kB at the guard with its
    scratch).

    Not counted: BFC splits a free chunk only when it is at least twice the request, it
    places a run's chunks at different addresses over time, and the pattern's best-fit
    offsets leave holes between tensors of different widths. Where the MLP's c t h and c t I
    tensors set the peak (SmolLM2, Gemma 3 270M) the pages touched were 1.16-1.43x this count
    (2-4 % of those processes at 16 x 128); on a tiny Llama, whose s^2 blocks of equal size
    set it, 0.94-1.07x.
    """
    phases = ort_phases(a, batch, seq, c)
    pattern = max([planned for planned, _ in phases.values()] + [head])
    return max([planned + scratch for planned, scratch in phases.values()] + [head]), pattern


# --------------------------------------------------------------------------------- estimates

@dataclass(frozen=True)
class Estimate:
    """Bytes per term, the activations by kind and per layer, and `total`: the predicted peak
    (the most the terms alive together at one moment of a step reach), with `phase` naming it."""

    method: str
    params: int
    terms: dict[str, int]
    total: int
    phase: str
    activations: dict[str, int] = field(default_factory=dict)
    layer_bytes: tuple[int, ...] = ()
    checkpointed: int = 0


def estimate(model: Arch | Mapping[str, Any], batch: int, seq: int, *, method: str = "ort-mezo",
             optimizer: str = "adamw", checkpoint_fraction: float = 0.0, dtype: str = "float32",
             padded: bool = True, base: str = "none", block_size: int = 32, lora_rank: int = 0,
             symmetric: bool = False, embedding: int = 8, accuracy_level: int = 4) -> Estimate:
    """The memory of one training step of `model` (an Arch or an HF config dict). Every method
    holds its runtime, the tokenizer (`TOKENIZER` bytes a vocabulary entry) and the weights; then

    ort-mezo: fp32 masters for an fp16 store (4 bytes a parameter) + ONNX Runtime's arena
      (`ort_arena`): the memory pattern's block, held through every run from the second on,
      and the first run's pages at the larger of the layers' peak (`ort_phases`) and the
      head's (logits and log-probs, 2 x 4 b V, once the layers' tensors are freed); over a
      frozen base also MatMulNBits' per-call scratch at that moment (`frozen_base_scratch`).
    torch-mezo: the largest of the forward transient, the head, and the reference update's
      temporaries (z and lr g z: 2 c x the largest tensor).
    bp: the optimizer state (AdamW 2, momentum 1, SGD 0 copies of the weights) + the largest of
      forward end: kept activations + log-probs (4 b V);
      backward at layer l: the layers below l (a checkpointed one keeps only its input, c t h),
        layer l in full (rebuilt if checkpointed), the gradients of layers >= l and of the head
        (a tied embedding's among them), and the backward's working set 2 c t I (activation
        gradients inside the layer: calibrated on the profiler's allocation timeline);
      backward end: all gradients, and for a tied embedding two more dense c V e: the Gather's
        gradient and its sum with the head's, which autograd makes out of place while both are
        alive (three V x e tensors at that moment on the profiler's timeline). Gemma 3's 640 MiB
        embedding makes this the peak with SGD at 8 x 64;
      optimizer step: all gradients + AdamW's temporaries (sqrt and its quotient, 2 c x the
        largest tensor; SGD without weight decay: none).
    `padded`: batches with padding, so SDPA gets a mask (ortzo's left-padded batches); False
    for full rows, where transformers drops the mask and GQA skips the k/v copies.

    `base` int4 or int8 (ort-mezo only): a frozen base (`ortzo export --quantize`), whose weights
    are what ORT keeps resident of it, `frozen_base_resident` (`block_size`, `symmetric`,
    `embedding` bits and `accuracy_level` as export takes them; `lora_rank` > 0: with LoRA on
    q and v).

    `total` is the allocator's peak (live bytes). glibc's heap keeps freed chunks, so a
    process's peak RSS can exceed it (bp: by 30-130 % where activations dominate); with
    MALLOC_MMAP_THRESHOLD_=65536 peak RSS followed it within 5 % (Gemma 3 270M, 16 x 128).
    """
    a = model if isinstance(model, Arch) else Arch.from_config(model)
    if method not in METHODS:
        raise OrtzoError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if optimizer not in OPTIMIZER_COPIES:
        raise OrtzoError(f"unknown optimizer {optimizer!r} (choose from {', '.join(OPTIMIZER_COPIES)})")
    if dtype not in DTYPES:
        raise OrtzoError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if batch < 1 or seq < 1 or not 0 <= checkpoint_fraction <= 1:
        raise OrtzoError(f"batch {batch}, seq {seq}, checkpoint fraction {checkpoint_fraction}: out of range")
    if method == "ort-mezo" and dtype == "bfloat16":
        raise OrtzoError("ort-mezo stores float32 or float16 weights (see `ortzo export --dtype`)")
    if base not in ("none", "int4", "int8") or (base != "none" and method != "ort-mezo"):
        raise OrtzoError(f"a frozen {base} base is ort-mezo's (`ortzo export --quantize int4|int8`)")
    if lora_rank and base == "none":
        raise OrtzoError("LoRA is estimated over a frozen base: give it one (int4 or int8)")
    c = DTYPES[dtype]
    params = parameter_count(a)
    held = {"runtime": RUNTIME[method], "tokenizer": TOKENIZER * a.vocab, "weights": c * params}
    bits = int(base.removeprefix("int")) if base != "none" else 0
    if base != "none":
        del held["weights"]
        held |= frozen_base_resident(a, bits, block_size, symmetric, embedding, lora_rank, accuracy_level)
    if method == "bp":
        return _backprop(a, batch, seq, c, optimizer, checkpoint_fraction, padded, params, held)
    if method == "ort-mezo" and c == 2:
        held["fp32 masters"] = 4 * (vector_count(a) if base != "none" else params)
    head = 2 * 4 * batch * a.vocab
    if method == "ort-mezo":
        _, pattern = ort_arena(a, batch, seq, c, head)
        first = max(planned + scratch for planned, scratch in ort_phases(a, batch, seq, c).values())
        calls = frozen_base_scratch(a, batch, seq, bits, block_size, symmetric, embedding, accuracy_level) \
            if base != "none" else {"forward": 0, "head": 0}
        moments = {"forward transient": first + pattern + calls["forward"],
                   "scoring head": head + pattern + calls["head"]}
    else:
        moments = {"forward transient": forward_transient(a, batch, seq, c, padded, ort=False), "scoring head": head}
    if method == "torch-mezo":
        moments["perturbation temporaries"] = 2 * c * largest_parameter(a)
    worst = max(moments, key=moments.get)
    phase = {"forward transient": "forward", "scoring head": "head"}.get(worst, "perturbation")
    return Estimate(method, params, held | moments, sum(held.values()) + moments[worst], phase)


def _backprop(a: Arch, batch: int, seq: int, c: int, optimizer: str, fraction: float, padded: bool,
              params: int, held: dict[str, int]) -> Estimate:
    t = batch * seq
    n_ckpt = round(fraction * a.layers)
    full = [sum(layer_activations(a, batch, seq, c, masked(a, layer, seq, padded)).values())
            for layer in range(a.layers)]
    kept = [c * t * a.hidden if layer < n_ckpt else full[layer] for layer in range(a.layers)]
    outer = outer_activations(a, batch, seq, c, padded)
    kinds: Counter[str] = Counter(outer)
    for layer in range(n_ckpt, a.layers):
        kinds.update(layer_activations(a, batch, seq, c, masked(a, layer, seq, padded)))
    if n_ckpt:
        kinds["checkpointed inputs"] = n_ckpt * c * t * a.hidden
    held["optimizer state"] = OPTIMIZER_COPIES[optimizer] * c * params
    terms = held | {"gradients": c * params, "activations kept": sum(kinds.values()), "logits": 4 * batch * a.vocab,
                    "backward working set": 2 * c * t * a.intermediate}
    if n_ckpt:
        terms["recompute (one layer)"] = max(full[:n_ckpt])
    if optimizer == "adamw":
        terms["optimizer temporaries"] = 2 * c * largest_parameter(a)
    _, outputs = outer_parameters(a)
    first_grads = c * (sum(_sizes(outputs)) + (a.vocab * a.embed_dim if a.tied else 0))  # the head's, first in backward
    resident = outer["indices"] + outer["rotary tables"] + outer["embeddings"]
    layer_grads = c * sum(_sizes(layer_parameters(a)))
    moments = {
        "forward end": terms["activations kept"] + terms["logits"],
        "backward": max(resident + sum(kept[:layer]) + full[layer] + (a.layers - layer) * layer_grads
                        for layer in range(a.layers)) + first_grads + terms["backward working set"],
        "backward end": terms["gradients"] + (2 * c * a.vocab * a.embed_dim if a.tied else 0),
        "optimizer step": terms["gradients"] + terms.get("optimizer temporaries", 0)}
    phase = max(moments, key=moments.get)
    return Estimate("bp", params, terms, sum(held.values()) + moments[phase], phase, dict(kinds), tuple(kept), n_ckpt)


# ----------------------------------------------------------------------------- budget, aliases

def parse_size(text: str) -> int:
    """Bytes of a size such as 17GB (10^9) or 16GiB (2^30); a bare number is bytes (pydantic's ByteSize)."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise OrtzoError(f"bad memory size {text!r}: expected a number and a unit, e.g. 17GB or 16GiB") from None


def alias_config(alias: str) -> dict[str, Any] | None:
    """The [config] table of export/<alias>.toml (public HF config values), None if it has none."""
    spec = files("ortzo.model_files") / f"{alias}.toml"
    if not spec.is_file():
        return None
    return tomllib.loads(spec.read_text(encoding="utf-8")).get("config")


def aliases() -> list[str]:
    """The export/ aliases that carry a [config] table."""
    names = sorted(p.name[:-5] for p in files("ortzo.model_files").iterdir() if p.name.endswith(".toml"))
    return [n for n in names if alias_config(n) is not None]


def largest_fitting(budget: int, sizes: Sequence[str], batch: int, seq: int,
                    **how: Any) -> tuple[str, Estimate] | None:
    """The size with the most parameters whose predicted peak fits `budget` (none: None).
    Every size is checked, not the first that fails: memory need not grow with parameters."""
    fitting = []
    for name in sizes:
        config = alias_config(name)
        if config is None:
            raise OrtzoError(f"export/{name}.toml has no [config] table")
        e = estimate(config, batch, seq, **how)
        if e.total <= budget:
            fitting.append((name, e))
    return max(fitting, key=lambda ne: ne[1].params, default=None)


@dataclass(frozen=True)
class PaperSetting:
    """The comparison of Katti et al. (BP on GPT-2-medium vs MeZO on Llama-2-7B/13B at about
    17 GB) with the assumptions this model needs to state it: MeZO's batch of 16, prompts of
    256 tokens, BP in fp32 with AdamW, MeZO on 16-bit weights perturbed in place."""

    batch: int = 16
    seq: int = 256
    bp_model: str = "gpt2-medium"
    bp_optimizer: str = "adamw"
    bp_dtype: str = "float32"
    mezo_models: tuple[str, ...] = ("llama2-7b", "llama2-13b")
    mezo_dtype: str = "float16"


PAPER = PaperSetting()
