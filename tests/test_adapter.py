"""A run over a frozen int4 base with LoRA: it checkpoints only its trained tensors, resumes bit
for bit, and its adapter, loaded by plain ONNX Runtime over the unchanged base, scores what
ortzo's own session scores with the run's weights; bad inputs are one line and exit 2."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from ortzo.cli import main
from ortzo.model.frozen import freeze
from ortzo.model.lora import LoraSpec
from ortzo.model.manifest import Manifest
from ortzo.model.quantize import QuantSpec
from ortzo.recipes.bake import weights_at

from conftest import open_folder
from test_cli import TRAIN, _expect_error, _lines, _untimed
from test_frozen import _feeds


@pytest.fixture(scope="module")
def int4_lora(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen") / "int4-lora"
    # the product's defaults (accuracy level 4, an int8 embedding), LoRA on q and v
    freeze(tiny_model, out, QuantSpec(4, 16), LoraSpec(r=4, alpha=8, targets=("*q_proj", "*v_proj")))
    return out


@pytest.fixture(scope="module")
def run(int4_lora, tiny_data, tmp_path_factory):
    """12 steps on the vectors and LoRA (--params all), checkpoints every 4."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["finetune", str(int4_lora), "--data", str(tiny_data), "--out", str(out), *TRAIN,
                 "--params", "all"]) == 0
    return out


def test_a_run_over_a_frozen_base_checkpoints_its_trained_tensors_and_resumes_bit_for_bit(int4_lora, tiny_data, run,
                                                                                        tmp_path):
    m = Manifest.load(int4_lora)
    final = run / "checkpoints" / "step-0000012" / "weights.bin"
    assert final.stat().st_size == m.weights_bytes < m.base["data_bytes"]
    parts = tmp_path / "parts"
    assert main(["finetune", str(int4_lora), "--data", str(tiny_data), "--out", str(parts), *TRAIN, "--params", "all",
                 "--steps", "6"]) == 0
    shutil.rmtree(parts / "checkpoints" / "step-0000006")  # resumes from step 4 and replays two steps
    assert main(["finetune", "--resume", "--out", str(parts), "--steps", "12"]) == 0
    assert (parts / "checkpoints" / "step-0000012" / "weights.bin").read_bytes() == final.read_bytes()
    assert _untimed(_lines(parts / "steps.jsonl")) == _untimed(_lines(run / "steps.jsonl"))
    start = np.fromfile(int4_lora / m.weights, np.uint8)
    assert not np.array_equal(np.fromfile(final, np.uint8), start)  # it trained
    _, store, trained = weights_at(run)
    moved = [n for n in trained if not np.array_equal(store.arrays[n], open_folder(int4_lora)[0].arrays[n])]
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved) and any(".norm" in n or "_norm" in n
                                                                                              for n in moved)


def test_adapters_over_the_unchanged_base_score_as_ortzo_and_switch_per_request(int4_lora, run, tmp_path):
    adapters = {}
    for step in (4, 12):
        adapters[step] = tmp_path / f"step{step}.onnx_adapter"
        assert main(["adapter", str(run), "--step", str(step), "--out", str(adapters[step])]) == 0
        assert adapters[step].stat().st_size < 64 * 1024
    feeds = _feeds()
    want = {0: open_folder(int4_lora)[1](feeds)}
    for step in adapters:
        _, store, _ = weights_at(run, step)
        want[step] = open_folder(int4_lora, *_saved(store, tmp_path / f"w{step}"))[1](feeds)
    assert np.abs(want[12] - want[0]).max() > 1e-4  # training changed the scores
    session = ort.InferenceSession(str(int4_lora / "model.onnx"), providers=["CPUExecutionProvider"])
    loaded = {}
    for step, path in adapters.items():
        loaded[step] = ort.LoraAdapter()
        loaded[step].Load(str(path))
    for step in (12, 0, 4, 12, 4):  # several adapters over one base, chosen per request
        options = ort.RunOptions()
        if step:
            options.add_active_adapter(loaded[step])
        got = session.run(None, feeds, options)[0]
        np.testing.assert_allclose(got, want[step], rtol=0, atol=1e-6)


def test_eval_with_an_adapter_equals_eval_of_the_run(int4_lora, tiny_data, run, tmp_path, capsys):
    adapter = tmp_path / "a.onnx_adapter"
    assert main(["adapter", str(run), "--out", str(adapter)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    of_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(int4_lora), "--task", "sst2", "--data", str(tiny_data), "--adapter", str(adapter),
                 "--eval-examples", str(of_run["examples"]), "--seed", "0"]) == 0
    with_adapter = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert with_adapter["loss"] == of_run["loss"] and with_adapter["accuracy"] == of_run["accuracy"]


@pytest.mark.parametrize("how", ["run", "adapter"])
def test_bake_of_a_run_over_a_frozen_base_is_a_standalone_model(int4_lora, run, tmp_path, how):
    """Baked from the run, or from the base with the run's adapter merged: the same model."""
    if how == "run":
        assert main(["bake", str(run), "--out", str(tmp_path / "baked")]) == 0
    else:
        assert main(["adapter", str(run), "--out", str(tmp_path / "a.onnx_adapter")]) == 0
        assert main(["bake", str(int4_lora), "--adapter", str(tmp_path / "a.onnx_adapter"),
                     "--out", str(tmp_path / "baked")]) == 0
    feeds = _feeds()
    session = ort.InferenceSession(str(tmp_path / "baked" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {k: feeds[k] for k in ("input_ids", "attention_mask", "position_ids")})[0]
    flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    logp = flat - np.log(np.exp(flat - flat.max(1, keepdims=True)).sum(1, keepdims=True)) - flat.max(1, keepdims=True)
    _, store, _ = weights_at(run)
    want = open_folder(int4_lora, *_saved(store, tmp_path / "w"))[1](feeds)
    np.testing.assert_allclose(logp[feeds["score_index"]][:, [7, 40, 99]], want, rtol=0, atol=2e-5)


def _saved(store, path):
    """The store's weights written as a weight file, with its sha256 (open_folder's arguments)."""
    return path, store.save(path)


def test_bad_inputs_are_one_line(tiny_hf, tiny_model, tiny_data, int4_lora, run, tmp_path, capsys):
    data = ["--data", str(tiny_data)]
    _expect_error(capsys, ["export", str(tiny_hf), "--out", str(tmp_path / "x"), "--lora", "targets=*nothing"],
                  "--lora target '*nothing' matches no matrix")
    _expect_error(capsys, ["export", str(tiny_hf), "--out", str(tmp_path / "x"), "--lora", "r=0"], "at least 1")
    _expect_error(capsys, ["export", str(tiny_hf), "--out", str(tmp_path / "x"), "--lora", "rank=4"],
                  "unknown key 'rank'")
    _expect_error(capsys, ["export", str(tiny_hf), "--out", str(tmp_path / "x"), "--quantize", "int3"], "--quantize")
    _expect_error(capsys, ["export", str(tiny_hf), "--out", str(tmp_path / "x"), "--quantize", "int4",
                           "--block-size", "48"], "a power of 2")
    _expect_error(capsys, ["export", str(tiny_hf), "--out", str(tmp_path / "x"), "--quantize", "int4",
                           "--widths", "source"], "this source is not a GGUF file")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))  # refused before anything is written
    _expect_error(capsys, ["adapter", str(tiny_model), "--out", str(tmp_path / "a.onnx_adapter")], "no frozen base")
    _expect_error(capsys, ["adapter", str(run), "--out", str(tmp_path / "a.bin")], "ends in .onnx_adapter")
    good = tmp_path / "good.onnx_adapter"
    assert main(["adapter", str(run), "--out", str(good)]) == 0
    other = tmp_path / "other"
    freeze(tiny_model, other, QuantSpec(4, 32, accuracy_level=0), LoraSpec(r=4, alpha=8))  # same tensors, another base
    _expect_error(capsys, ["eval", str(other), "--task", "sst2", *data, "--adapter", str(good)], "made for another base")
    for name, shape in (("model.norm.weight", (7,)), ("model.norm.nothing", (32,))):  # this base's id, bad tensors
        fmt = ort.AdapterFormat()
        fmt.set_model_version(Manifest.load(int4_lora).base["id"])
        fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ones(shape, np.float32))})
        fmt.export_adapter(str(tmp_path / "bad.onnx_adapter"))
        _expect_error(capsys, ["eval", str(int4_lora), "--task", "sst2", *data, "--adapter",
                               str(tmp_path / "bad.onnx_adapter")], "has shape (7,)" if shape == (7,) else
                      "is not a trainable tensor")
    corrupt = tmp_path / "corrupt.onnx_adapter"
    corrupt.write_bytes(b"not an adapter" * 10)
    _expect_error(capsys, ["eval", str(int4_lora), "--task", "sst2", *data, "--adapter", str(corrupt)],
                  "is not an ONNX Runtime adapter")
    broken = tmp_path / "broken"
    shutil.copytree(int4_lora, broken)
    with open(broken / "base.onnx_data", "r+b") as f:
        f.truncate(100)
    _expect_error(capsys, ["eval", str(broken), "--task", "sst2", *data], "the frozen base is corrupt")
    for key, value, message in (("data", "../int4-lora/base.onnx_data", "is not a file of the folder"),
                                ("id", "abc", "no valid id"), ("quantize", "int3", "quantized as 'int3'"),
                                ("block_size", None, "no valid block_size")):
        hostile = tmp_path / f"hostile-{key}"
        shutil.copytree(int4_lora, hostile)
        manifest = json.loads((hostile / "manifest.json").read_text())
        manifest["base"][key] = value
        (hostile / "manifest.json").write_text(json.dumps(manifest))
        _expect_error(capsys, ["eval", str(hostile), "--task", "sst2", *data], message)


def test_the_api_saves_and_loads_adapters_that_plain_ort_serves(int4_lora, tiny_data, tmp_path):
    import ortzo

    rows = [json.loads(line) for line in (tiny_data / "train.jsonl").read_text().splitlines()]
    model = ortzo.open(int4_lora).train(params="all", lr=5e-3)
    clf = model.classifier("sst2")
    model.fit(clf.batches(rows, batch_size=8), clf.loss, steps=4, progress=False)
    feeds = clf.batch(rows[:6]).feeds
    path = tmp_path / "api.onnx_adapter"
    assert 0 < model.save_adapter(path) < 64 * 1024
    fresh = ortzo.open(int4_lora)
    before = fresh.run(feeds)["scores"]
    fresh.load_adapter(path)
    np.testing.assert_array_equal(fresh.run(feeds)["scores"], model.run(feeds)["scores"])
    assert np.abs(before - model.run(feeds)["scores"]).max() > 0
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    session = ort.InferenceSession(str(int4_lora / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["scores"], dict(feeds), options)[0], model.run(feeds)["scores"],
                               rtol=0, atol=1e-6)
