"""A frozen base (int4, int8 or fp32 matrices as constants; vectors and LoRA trainable) computes
what PyTorch computes with the same weights: dequantized here by the test's own arithmetic from
the bytes the folder stores, LoRA merged here as W + (alpha / r) A B."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

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
             "phi3": "*qkv_proj", "gpt2": "*c_attn", "gpt_neox": "*query_key_value"}


def _torch_scores(model, feeds) -> np.ndarray:
    return _torch_family_scores(model, feeds, ("input_ids", "attention_mask", "position_ids"))


def _dequantized(folder, weight: str, bits: int, block: int, symmetric: bool, k: int, n: int) -> np.ndarray:
    """The matrix [K, N] the folder's MatMulNBits multiplies by, from its stored bytes:
    q - zero point, times the block's scale, low nibble first."""
    model = onnx.load(str(folder / "model.onnx"))  # with the external data
    t = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    packed, scales = t[f"{weight}/q{bits}"], t[f"{weight}/scales"]
    blocks = scales.shape[1]
    if bits == 4:
        q = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, block).astype(np.float64)
    else:
        q = packed.reshape(n, blocks, block).astype(np.float64)
    if symmetric:
        zero = np.full((n, blocks), 2.0 ** (bits - 1))
    else:
        zp = t[f"{weight}/zero_points"]
        zero = (np.stack([zp & 15, zp >> 4], -1).reshape(n, -1) if bits == 4 else zp)[:, :blocks].astype(np.float64)
    return ((q - zero[..., None]) * scales[..., None]).reshape(n, blocks * block)[:, :k].T


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """GPT-2's Conv1D weights are traced as Gemm(x, W, bias), stored [in, out] untransposed."""
    root = tmp_path_factory.mktemp("gpt2")
    hf = FAMILIES["gpt2"](root / "hf")
    export_model(str(hf), root / "fp32", say=lambda _: None)
    return hf, root / "fp32"


@pytest.mark.parametrize("source,bits,block,symmetric", [("llama", 4, 16, False), ("llama", 4, 32, True),
                                                         ("llama", 8, 16, False), ("llama-fp16", 4, 16, False),
                                                         ("gpt2", 4, 16, False)])
def test_quantized_base_scores_equal_pytorch_with_the_dequantized_weights(request, tmp_path, source, bits, block,
                                                                          symmetric):
    """An fp16 folder's base is quantized from its fp16 values; its other weights compute
    from their fp16 roundings, so the reference rounds every weight first."""
    hf, folder = (request.getfixturevalue("tiny_gpt2") if source == "gpt2" else
                  (request.getfixturevalue("tiny_hf"),
                   request.getfixturevalue("tiny_model_fp16" if source.endswith("fp16") else "tiny_model")))
    out = freeze(folder, tmp_path / "q", QuantSpec(bits, block, symmetric))
    stored = {f["name"]: f for f in out.base["frozen"]}
    quantized = [n for n, f in stored.items() if f["stored"] == f"int{bits}"]
    assert len(quantized) == 2 * (4 if source == "gpt2" else 7)  # every Linear of both layers
    embedding = "transformer.wte.weight" if source == "gpt2" else "model.embed_tokens.weight"
    assert stored[embedding]["stored"] == ("float16" if source.endswith("fp16") else "float32")  # tied: Gathered too
    assert [p.name for p in out.parameters] == [p.name for p in Manifest.load(folder).parameters if len(p.shape) == 1]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        if source.endswith("fp16"):
            for p in params.values():
                p.copy_(p.half().float())
        for name in quantized:
            k, n = stored[name]["shape"]  # as the graph multiplies: [in, out]
            deq = _dequantized(tmp_path / "q", name, bits, block, symmetric, k, n).astype(np.float32)
            torch_layout = deq if source == "gpt2" else deq.T  # Conv1D keeps [in, out]; Linear is [out, in]
            assert np.abs(torch_layout - params[name].numpy()).max() > 0  # quantization changed it
            params[name].copy_(torch.from_numpy(torch_layout))
    _, session = open_folder(tmp_path / "q")
    feeds = _feeds()
    np.testing.assert_allclose(session(feeds), _torch_scores(model, feeds), rtol=0, atol=3e-5)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family, Hugging Face folder, fp32 trainable folder) for every family that exports."""
    name = request.param
    root = tmp_path_factory.mktemp(f"lora-{name}")
    hf = FAMILIES[name](root / "hf")
    export_model(str(hf), root / "fp32", say=lambda _: None)
    return name, hf, root / "fp32"


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
    quant = QuantSpec(4, 16)
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
    m = freeze(tiny_model, tmp_path / "q", QuantSpec(4, 16), LoraSpec(r=2))
    vectors = sum(p.nbytes for p in fp32.parameters if len(p.shape) == 1)
    lora = sum(p.nbytes for p in m.parameters if "lora_" in p.name)
    assert lora == 4 * 2 * (32 * 2 + 2 * 32 + 32 * 2 + 2 * 16)  # A and B of q (32 -> 32), v (32 -> 16); 2 layers
    assert m.weights_bytes < vectors + lora + 64 * len(m.parameters)
    linear = sum(p.nbytes for p in fp32.parameters if len(p.shape) == 2 and "embed" not in p.name)
    embedding = fp32.param("model.embed_tokens.weight").nbytes
    assert m.base["data_bytes"] < embedding + linear / 4  # int4 + one fp32 scale and a zero point per 16

