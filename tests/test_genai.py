"""An onnxruntime-genai folder (the model builder's int4 decoder with its KV cache), prepared by
ortzo: its scoring graph computes the shipped decoder's log-probs, and with trained vectors and
LoRA what PyTorch computes with the builder's int4 matrices dequantized here, by the test's own
arithmetic, and the LoRA merged here; ortzo's adapters change what onnxruntime-genai generates.

The builder needs transformers 5 (ortzo's export pins 4.57 for Optimum), so it runs in its own
environment: `make test` sets it up as .venv-genai (or set ORTZO_GENAI_PYTHON)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from ortzo.model.manifest import Manifest
from ortzo.model.prepare import prepare
from ortzo.model.lora import LoraSpec
from ortzo.tasks.batches import collate

from conftest import SHARED_DATA, open_folder
from tiny import make_tiny_llama_genai

BUILDER = Path(os.environ.get("ORTZO_GENAI_PYTHON") or Path(__file__).resolve().parents[1] / ".venv-genai/bin/python")
CANDIDATES = np.array([3, 40, 99, 200])
LORA = LoraSpec.parse("r=4,alpha=8,targets=*qkv_proj,*down_proj")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the Hugging Face folder, the builder's int4 CPU folder made from it)."""
    if not BUILDER.is_file():
        pytest.skip(f"onnxruntime-genai's model builder environment is missing ({BUILDER}); `make test` makes it")
    root = tmp_path_factory.mktemp("genai")
    hf = make_tiny_llama_genai(root / "hf")
    subprocess.run([str(BUILDER), "-m", "onnxruntime_genai.models.builder", "-m", "tiny", "-i", str(hf),
                    "-o", str(root / "og"), "-p", "int4", "-e", "cpu", "-c", str(root / "cache")],
                   check=True, capture_output=True)
    return hf, root / "og"


@pytest.fixture(scope="module")
def prepared(built, tmp_path_factory) -> Path:
    return prepare(built[1], tmp_path_factory.mktemp("prepared") / "model", lora=LORA)


def _right_padded() -> dict[str, np.ndarray]:
    """A right-padded batch, every real position scored."""
    rng = np.random.default_rng(0)
    feeds = collate([list(rng.integers(2, 300, size=n)) for n in (5, 11, 2, 8)], 1, CANDIDATES, right=True)
    feeds["score_index"] = np.flatnonzero(feeds["attention_mask"])
    feeds["score_ids"] = np.tile(CANDIDATES, (len(feeds["score_index"]), 1))
    return feeds


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _shipped_scores(og: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Each row through the builder's own decoder, alone and unpadded, with an empty cache."""
    config = json.loads((og / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(og / "model.onnx"))
    rows = []
    for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"]):
        ids = ids[mask == 1][None]
        f = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values"):
                f[i.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
        rows.append(_log_softmax(session.run(["logits"], f)[0][0])[:, CANDIDATES])
    return np.concatenate(rows)


def test_the_scoring_graph_is_the_shipped_decoder_and_the_og_graph_runs_as_shipped(built, prepared):
    """B = 0 and the vectors as built: ortzo's right-padded batch scores what the builder's
    decoder computes row by row; the prepared folder's own decoder, run without any of its
    trainable inputs, computes the shipped logits."""
    _, og = built
    m = Manifest.load(prepared)
    assert m.base["quantize"] == "int4" and m.tokenizer["padding_side"] == "right"
    assert {p.name for p in m.parameters} >= {"model.layers.0.attn.qkv_proj.lora_A.weight",
                                               "model.layers.1.mlp.down_proj.lora_B.weight",
                                               "model.layers.0.input_layernorm.weight"}
    feeds = _right_padded()
    _, session = open_folder(prepared)
    np.testing.assert_allclose(session(feeds), _shipped_scores(og, feeds), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_shipped_scores(prepared, feeds), _shipped_scores(og, feeds), rtol=0, atol=1e-6)


def _dequantized(og: Path) -> dict[str, np.ndarray]:
    """Every MatMulNBits matrix of the builder's decoder as a PyTorch Linear weight [N, K], by
    module name, from its bytes: low nibble first, (q - 8) times the block's scale."""
    model = onnx.load(str(og / "model.onnx"))
    t = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 4 and len(node.input) == 3  # symmetric: no zero points
        packed, scales = t[node.input[1]], t[node.input[2]].reshape(attrs["N"], -1)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(attrs["N"], scales.shape[1], -1).astype(np.float64)
        w = ((q - 8) * scales[..., None]).reshape(attrs["N"], -1)[:, :attrs["K"]]
        out[".".join(node.name.strip("/").split("/")[:-1])] = w
    return out


def test_trained_vectors_and_lora_compute_the_dequantized_model_with_the_lora_merged(built, prepared):
    """Vectors scaled and every LoRA B set: ortzo's scores equal PyTorch's with each matrix the
    builder's int4 dequantized here, each targeted one plus (alpha / r) (A B)^T (the fused qkv
    split into q, k and v), and the norms the store's."""
    hf, og = built
    store, session = open_folder(prepared)
    feeds = _right_padded()
    base = session(feeds)
    rng = np.random.default_rng(1)
    for name, arr in store.arrays.items():
        arr[...] = rng.normal(0, 0.3, arr.shape) if name.endswith("lora_B.weight") else \
            arr if "lora_A" in name else arr * rng.uniform(0.8, 1.2, arr.shape)
    got = session(feeds)

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    cfg = model.config
    params = dict(model.named_parameters())
    hd = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for module, w in _dequantized(og).items():
            a, b = (store.arrays.get(f"{module}.lora_{x}.weight") for x in "AB")
            if a is not None:
                w = w + (LORA.scale * a.astype(np.float64) @ b.astype(np.float64)).T
            if module.endswith("qkv_proj"):
                layer = module.removesuffix("attn.qkv_proj")
                q, k = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
                for part, rows in (("q_proj", w[:q]), ("k_proj", w[q:q + k]), ("v_proj", w[q + k:])):
                    params[f"{layer}self_attn.{part}.weight"].copy_(torch.from_numpy(rows))
            else:
                name = module.replace(".attn.", ".self_attn.")
                params[f"{name}.weight"].copy_(torch.from_numpy(w))
        for name, arr in store.arrays.items():
            if "lora" not in name:
                params[name.replace(f"layers.{cfg.num_hidden_layers}.final_norm_layernorm", "norm")].copy_(
                    torch.from_numpy(arr))
        logits = model(input_ids=torch.tensor(feeds["input_ids"]),
                       attention_mask=torch.tensor(feeds["attention_mask"])).logits
    want = torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])[feeds["score_index"]][:, CANDIDATES].numpy()
    assert np.abs(got - base).max() > 0.5  # what was trained moved the scores a lot ...
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02)  # ... and ORT's int8 activations (level 4) a little


def test_an_adapter_from_a_run_changes_what_onnxruntime_genai_generates(prepared, tmp_path):
    """A MeZO run over the folder trains its LoRA B; `ortzo adapter` writes it; plain ORT with
    the adapter over the folder's decoder scores what ortzo scores with the run's tensors, and
    onnxruntime-genai, loading it per request, generates other text than without it."""
    og = pytest.importorskip("onnxruntime_genai")
    from ortzo.model.adapter import apply_adapter

    run, adapter = tmp_path / "run", tmp_path / "sst2.onnx_adapter"
    cmd = [sys.executable, "-m", "ortzo.cli"]
    subprocess.run([*cmd, "finetune", str(prepared), "--task", "sst2", "--data", str(SHARED_DATA / "sst2"),
                    "--out", str(run), "--steps", "4", "--include", "*lora_B*", "--lr", "20", "--eps", "0.01",
                    "--eval-examples", "8", "--batch-size", "4"], check=True, capture_output=True)
    subprocess.run([*cmd, "adapter", str(run), "--out", str(adapter)], check=True, capture_output=True)

    store, session = open_folder(prepared)
    apply_adapter(adapter, store, prepared)
    assert max(np.abs(a).max() for n, a in store.arrays.items() if n.endswith("lora_B.weight")) > 0
    feeds = collate([[5, 6, 7, 8, 9, 10, 11]], 1, CANDIDATES, right=True)
    plain = ort.InferenceSession(str(prepared / "model.onnx"))
    lora = ort.LoraAdapter()
    lora.Load(str(adapter))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    f = {"input_ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"]}
    for i in plain.get_inputs():
        if i.name.startswith("past_key_values"):
            f[i.name] = np.zeros((1, 2, 0, 16), np.float32)
    logits = plain.run(["logits"], f, run_options=options)[0][0, -1]
    np.testing.assert_allclose(session(feeds)[0], _log_softmax(logits)[CANDIDATES], rtol=0, atol=1e-5)

    model = og.Model(str(prepared))
    adapters = og.Adapters(model)
    adapters.load(str(adapter), "sst2")

    def generate(name: str | None) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=24, do_sample=False)
        g = og.Generator(model, params)
        if name:
            g.set_active_adapter(adapters, name)
        g.append_tokens(np.array([[5, 6, 7, 8]], np.int32))
        while not g.is_done():
            g.generate_next_token()
        return list(g.get_sequence(0))

    before = generate(None)
    assert generate("sst2") != before
    assert generate(None) == before  # per request: the base is unchanged


def test_collate_right_pads_and_scores_the_last_real_token():
    feeds = collate([[5, 6, 7], [8]], 0, np.array([1, 2]), right=True)
    np.testing.assert_array_equal(feeds["input_ids"], [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(feeds["score_index"], [2, 3])


def test_right_padding_scores_what_left_padding_scores(tiny_model):
    """On an exported folder (position ids as input) the two paddings are the same batch."""
    _, session = open_folder(tiny_model)
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    left, right = (session(collate(rows, 1, CANDIDATES, right=r)) for r in (False, True))
    np.testing.assert_allclose(right, left, rtol=0, atol=1e-5)


def test_bad_inputs_are_one_line_and_write_nothing(built, prepared, tmp_path, capsys):
    from ortzo.cli import main

    _, og = built
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "genai_config.json").write_text('{"model": {"decoder": {"filename": "../model.onnx"}}}')
    for args, message in (([str(og), "--quantize", "int4"], "drop --quantize"),
                          ([str(og), "--lora", "targets=*q_proj"], "matches no matrix"),
                          ([str(bad)], "not an onnxruntime-genai decoder config"),
                          ([str(prepared)], "is prepared already")):
        code = main(["prepare", *args, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_the_pytorch_baselines_and_bake_refuse_the_builders_graph(prepared, tmp_path, capsys):
    from ortzo.cli import main

    for args, out, message in (
            (["finetune", str(prepared), "--task", "sst2", "--data", str(SHARED_DATA / "sst2"), "--engine", "torch-bp"],
             tmp_path / "run", "onnxruntime-genai's graph"),
            (["bake", str(prepared)], tmp_path / "baked", "ships as it is")):
        code = main([*args, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
