"""The public API an app imports (`import ortzo`): inference and in-place fine-tuning on one
set of bound buffers, against values the tests compute themselves."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ortzo
from ortzo.errors import OrtzoError
from ortzo.optim.directions import Directions
from ortzo.optim.mezo import replay


def _rows(data, split="train"):
    return [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]


def test_run_serves_the_graph_and_ignores_extra_keys(tiny_model, tiny_data):
    from conftest import open_folder

    model = ortzo.open(tiny_model)
    clf = model.classifier("sst2", template="mezo")
    batch = clf.batch(_rows(tiny_data)[:4])
    out = model.run({**batch.feeds, "labels": batch.labels})
    assert list(out) == ["scores"] and out["scores"].shape == (4, 2)
    _, session = open_folder(tiny_model)
    np.testing.assert_array_equal(out["scores"], session(batch.feeds))
    with pytest.raises(OrtzoError, match="missing graph inputs score_index, score_ids"):
        model.run({k: v for k, v in batch.feeds.items() if not k.startswith("score")})


def test_step_is_the_spsa_update_the_test_computes(tiny_model, tiny_data):
    """w1 = w0 - lr * (L(w0 + eps z) - L(w0 - eps z)) / (2 eps) * z, with L evaluated here on
    a second session over weights the test sets itself."""
    from conftest import open_folder

    model = ortzo.open(tiny_model).train(include=["model.layers.0.*"], lr=1e-2, eps=1e-2, seed=5)
    clf = model.classifier("sst2", template="mezo")
    batch = clf.batch(_rows(tiny_data)[:8])
    names = model.names
    w0 = {n: model.store.arrays[n].copy() for n in names}
    record = model.step(batch.feeds, lambda out: clf.loss(out, batch))

    z = Directions("rademacher-counter").sample([w0[n].shape for n in names], record.seed)
    store, session = open_folder(tiny_model)

    def loss_at(sign: float) -> float:
        for n, zi in zip(names, z):
            store.arrays[n][...] = w0[n] + np.float32(sign * 1e-2) * zi
        scores = session(batch.feeds).astype(np.float64)
        logp = scores - np.log(np.exp(scores).sum(1, keepdims=True))
        return float(-logp[np.arange(8), batch.labels].mean())

    g = (loss_at(1) - loss_at(-1)) / 2e-2
    assert record.grads[0] == pytest.approx(g, rel=1e-4, abs=1e-6) and abs(g) > 1e-4
    for n, zi in zip(names, z):
        np.testing.assert_allclose(model.store.arrays[n], w0[n] - 1e-2 * g * zi, rtol=0, atol=2e-6)
    assert len(model.records) == 1


def test_meazo_scales_each_step_by_the_moment_of_the_earlier_gradients(tiny_model, tiny_data):
    """MEAZO's closed forms for two steps: lr / |g1|, then lr / sqrt((beta g1^2 + g2^2) / (1 + beta))."""
    model = ortzo.open(tiny_model).train(lr=1e-3, eps=1e-2, seed=2, adaptive="meazo")
    clf = model.classifier("sst2", template="mezo")
    rows = _rows(tiny_data)
    first, second = (model.step(b.feeds, lambda out, b=b: clf.loss(out, b)) for b in (clf.batch(rows[:8]),
                                                                                      clf.batch(rows[8:16])))
    g1, g2 = first.grads[0], second.grads[0]
    assert first.lr == pytest.approx(1e-3 / abs(g1)) and second.lr == pytest.approx(
        1e-3 / np.sqrt((0.99 * g1 ** 2 + g2 ** 2) / 1.99))
    with pytest.raises(OrtzoError, match="adaptive=meazo"):
        model.train(estimator="fzoo", n_directions=2, adaptive="meazo")


def test_fit_learns_and_its_records_replay_exactly(tiny_model, tiny_data):
    model = ortzo.open(tiny_model).train(lr=1e-2, eps=1e-2, seed=1, clip=1.0)
    clf = model.classifier("sst2", template="mezo")
    train, val = _rows(tiny_data), _rows(tiny_data, "validation")
    before = clf.evaluate(val)
    initial = model.store.buffer.copy()
    records = model.fit(clf.batches(train, 8), clf.loss, steps=60, progress=False)
    assert len(records) == 60 and [r.step for r in records] == list(range(60))
    after = clf.evaluate(val)
    assert after["accuracy"] >= before["accuracy"] + 0.25 and after["loss"] < before["loss"] - 0.1, (before, after)
    assert clf.accuracy(val) == after["accuracy"]
    assert np.array_equal(clf.predict(val[:8]), model.run(clf.batch(val[:8]).feeds)["scores"].argmax(1))

    fresh = ortzo.open(tiny_model)
    np.testing.assert_array_equal(fresh.store.buffer, initial)
    replay(fresh.store.trainable(list(fresh.store.arrays)), records, Directions("rademacher-counter"))
    np.testing.assert_array_equal(fresh.store.buffer, model.store.buffer)


def test_save_restore_round_trip_and_a_bad_file_changes_nothing(tiny_model, tiny_data, tmp_path):
    model = ortzo.open(tiny_model).train(lr=5e-3, seed=2)
    clf = model.classifier("sst2", template="mezo")
    batches = clf.batches(_rows(tiny_data), 8)
    model.fit(batches, clf.loss, steps=3, progress=False)
    saved = model.store.buffer.copy()
    sha = model.save(tmp_path / "tuned.bin")
    model.fit(batches, clf.loss, steps=3, progress=False)
    assert not np.array_equal(model.store.buffer, saved)
    later = model.store.buffer.copy()

    (tmp_path / "bad.bin").write_bytes(b"\0" * model.manifest.weights_bytes)
    with pytest.raises(OrtzoError, match="checksum mismatch"):
        model.restore(tmp_path / "bad.bin", sha)
    with pytest.raises(OrtzoError, match="has 3 bytes"):
        (tmp_path / "short.bin").write_bytes(b"abc")
        model.restore(tmp_path / "short.bin")
    np.testing.assert_array_equal(model.store.buffer, later)

    ptr = model.session.weight_ptr(model.names[0])
    model.restore(tmp_path / "tuned.bin", sha)
    np.testing.assert_array_equal(model.store.buffer, saved)
    assert model.session.weight_ptr(model.names[0]) == ptr  # the same bound buffer: no rebinding
    reopened = ortzo.open(tiny_model, weights=tmp_path / "tuned.bin", sha256=sha)
    feeds = clf.batch(_rows(tiny_data)[:4]).feeds
    np.testing.assert_array_equal(reopened.run(feeds)["scores"], model.run(feeds)["scores"])


def test_fp16_folder_restores_into_its_masters(tiny_model_fp16, tiny_data, tmp_path):
    model = ortzo.open(tiny_model_fp16).train(include=["model.norm.weight"], lr=1e-1, seed=3)
    clf = model.classifier("sst2", template="mezo")
    sha = model.save(tmp_path / "w.bin")
    before = model.buffers[0].copy()
    model.fit(clf.batches(_rows(tiny_data), 8), clf.loss, steps=2, progress=False)
    assert not np.array_equal(model.buffers[0], before)
    model.restore(tmp_path / "w.bin", sha)
    np.testing.assert_array_equal(model.buffers[0], before.astype(np.float16).astype(np.float32))


def test_a_failed_step_joins_the_records_as_a_zero_step_and_they_still_replay(tiny_model, tiny_data):
    """A loss that raises (or goes NaN) mid-step: the error reaches the app, the step is a zero
    step in `records` (lr 0), and replaying the records on a fresh copy gives the live weights
    byte for byte; the next steps go on from them."""
    model = ortzo.open(tiny_model).train(lr=1e-2, eps=1e-2, seed=3)
    clf = model.classifier("sst2", template="mezo")
    batches = clf.batches(_rows(tiny_data), 8)
    model.fit(batches, clf.loss, steps=2, progress=False)
    batch, calls = clf.batch(_rows(tiny_data)[:8]), []

    def breaks_once(outputs):
        calls.append(1)
        if len(calls) == 2:  # at L-, after the weights moved twice
            raise KeyError("the app's loss broke")
        return clf.loss(outputs, batch)
    with pytest.raises(KeyError):
        model.step(batch.feeds, breaks_once)
    model.step(batch.feeds, breaks_once)
    with pytest.raises(FloatingPointError):
        model.step(batch.feeds, lambda outputs: float("nan"))
    model.fit(batches, clf.loss, steps=2, progress=False)
    assert [r.lr == 0 for r in model.records] == [False, False, True, False, True, False, False]
    fresh = ortzo.open(tiny_model)
    replay(fresh.store.trainable(list(fresh.store.arrays)), model.records, Directions("rademacher-counter"))
    np.testing.assert_array_equal(fresh.store.buffer, model.store.buffer)


def test_settings_that_wreck_the_weights_are_refused_before_a_step(tiny_model):
    model = ortzo.open(tiny_model)
    for bad in ({"lr": 1e30}, {"lr": float("inf")}, {"eps": float("inf")}, {"eps": 1e30}, {"lr": float("nan")},
                {"weight_decay": float("inf")}):
        with pytest.raises(OrtzoError, match="bad settings"):
            model.train(**bad)
    model.train(lr=1e-3)
    before = model.store.buffer.copy()
    with pytest.raises(OrtzoError, match="lr"):
        model.step({}, lambda outputs: 0.0, lr=float("inf"))
    assert np.array_equal(model.store.buffer, before) and model.records == []


def test_bad_settings_and_folders(tiny_model, tmp_path):
    with pytest.raises(OrtzoError, match="model folder not found"):
        ortzo.open(tmp_path / "none")
    with pytest.raises(OrtzoError, match="bad settings"):
        ortzo.open(tiny_model).train(eps=0)
    with pytest.raises(OrtzoError, match="no parameter matches"):
        ortzo.open(tiny_model).train(include=["nothing.*"])
    with pytest.raises(OrtzoError, match="bad settings"):
        ortzo.open(tiny_model).train(params="matrices")
    model = ortzo.open(tiny_model).train(params="vectors")
    assert model.names and [b.ndim for b in model.buffers] == [1] * len(model.names)
    with pytest.raises(OrtzoError, match="unknown target/provider"):
        ortzo.open(tiny_model, provider="tpu")


def test_the_api_never_imports_torch(tiny_model, tiny_data):
    code = f"""
import sys, json
sys.modules["torch"] = None  # importing torch now fails
import ortzo
model = ortzo.open({str(tiny_model)!r}).train(lr=1e-3)
clf = model.classifier("sst2", template="mezo")
rows = [json.loads(l) for l in open({str(tiny_data / 'train.jsonl')!r})][:16]
model.fit(clf.batches(rows, 8), clf.loss, steps=2, progress=False)
print(clf.accuracy(rows))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_fit_reproduces_the_cli_default_recipe_step_for_step(tiny_model, tiny_data, tmp_path):
    """The docstring's recipe from Python: the same seeds, projected gradients, scheduled lrs
    and final weights as `ortzo finetune` with its defaults."""
    from ortzo.cli import main

    run = tmp_path / "run"
    assert main(["finetune", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--out", str(run),
                 "--steps", "6", "--batch-size", "8"]) == 0
    cli = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    model = ortzo.open(tiny_model).train(params="vectors", lr=2e-4, clip=30)
    clf = model.classifier("sst2")
    records = model.fit(clf.batches(_rows(tiny_data), 8), clf.loss, steps=6, schedule="linear", progress=False)
    assert [r.lr for r in records] == pytest.approx([2e-4 * (1 - t / 6) for t in range(6)], rel=1e-12)
    assert [(r.seed, list(r.grads), r.lr) for r in records] == [(c["seed"], c["grads"], c["lr"]) for c in cli]
    model.save(tmp_path / "api.bin")
    assert (tmp_path / "api.bin").read_bytes() == (run / "checkpoints/step-0000006/weights.bin").read_bytes()


def test_fit_ends_by_epochs_or_time_and_refuses_batches_that_never_end(tiny_model, tiny_data):
    model = ortzo.open(tiny_model).train(lr=1e-3, seed=4)
    clf = model.classifier("sst2", template="mezo")
    rows = _rows(tiny_data)  # 64 rows: 8 batches of 8 an epoch
    with pytest.raises(OrtzoError, match="never end"):
        model.fit(clf.batches(rows, 8), clf.loss, progress=False)
    assert model.records == []
    assert len(model.fit(clf.batches(rows, 8), clf.loss, epochs=2, progress=False)) == 16

    seen = []
    fixed = [clf.batch(rows[i:i + 4]) for i in (0, 4, 8)]
    records = model.fit(fixed, lambda out, b: seen.append(b) or clf.loss(out, b), epochs=2, schedule="linear",
                        progress=False)
    assert [id(b) for b in seen[::2]] == [id(b) for b in fixed * 2]  # a list: passes in order, twice (2 losses a step)
    assert [r.lr for r in records] == pytest.approx([1e-3 * (1 - t / 6) for t in range(6)])

    one = model.fit(clf.batches(rows, 8), clf.loss, time_budget=1e-9, schedule="linear", progress=False)
    assert len(one) == 1 and one[0].lr == 1e-3  # by time: the first step at the full lr, then the budget is spent
    for kwargs, message in (({"steps": 2, "epochs": 1}, "not both"), ({"steps": 2, "schedule": "cosine"}, "cosine"),
                            ({"epochs": 0}, "epochs >= 1")):
        with pytest.raises(OrtzoError, match=message):
            model.fit(clf.batches(rows, 8), clf.loss, progress=False, **kwargs)
    with pytest.raises(OrtzoError, match="sized"):
        model.fit(iter(fixed), clf.loss, epochs=1, progress=False)
    with pytest.raises(OrtzoError, match="batch_size 65"):
        clf.batches(rows, 65)


def test_open_takes_weights_it_saved_without_their_hash(tiny_model, tiny_data, tmp_path):
    model = ortzo.open(tiny_model).train(lr=5e-3, seed=2)
    clf = model.classifier("sst2", template="mezo")
    model.fit(clf.batches(_rows(tiny_data), 8), clf.loss, steps=2, progress=False)
    sha = model.save(tmp_path / "tuned.bin")
    feeds = clf.batch(_rows(tiny_data)[:4]).feeds
    for reopened in (ortzo.open(tiny_model, weights=tmp_path / "tuned.bin"),
                     ortzo.open(tiny_model, weights=tmp_path / "tuned.bin", sha256=sha)):
        np.testing.assert_array_equal(reopened.run(feeds)["scores"], model.run(feeds)["scores"])
    with pytest.raises(OrtzoError, match="checksum mismatch"):
        ortzo.open(tiny_model, weights=tmp_path / "tuned.bin", sha256="0" * 64)
    (tmp_path / "short.bin").write_bytes(b"abc")
    with pytest.raises(OrtzoError, match="has 3 bytes"):
        ortzo.open(tiny_model, weights=tmp_path / "short.bin")
    data = bytearray((tiny_model / "weights.bin").read_bytes())
    data[100] ^= 1
    corrupt = tmp_path / "copy"
    shutil.copytree(tiny_model, corrupt)
    (corrupt / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(OrtzoError, match="checksum mismatch"):  # the folder's own file: always its manifest's hash
        ortzo.open(corrupt)


def test_the_root_exports_keep_builtins_and_name_the_version():
    code = """
import builtins, importlib.metadata, importlib.resources
from ortzo import *
import ortzo
assert open is builtins.open, open
assert issubclass(OrtzoError, Exception) and OrtzoError is ortzo.errors.OrtzoError
assert ortzo.__version__ == importlib.metadata.version("ortzo")
assert importlib.resources.files("ortzo").joinpath("py.typed").is_file()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert callable(ortzo.open) and ortzo.open is not open


def test_a_prepared_causal_lm_generates_what_transformers_does(tiny_hf, tmp_path):
    """`generate` on someone else's causal LM (`ortzo prepare` of Optimum's plain export): its
    own graph gives the logits, greedy tokens equal transformers' over the same weights."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    main_export(str(tiny_hf), output=str(tmp_path / "onnx"), task="text-generation", no_post_process=True)
    folder = ortzo.prepare(tmp_path / "onnx" / "model.onnx", tmp_path / "prepared",
                           tokenizer=tiny_hf / "tokenizer.json")
    model = ortzo.open(folder)
    text = model.generate("great movie and the", max_new_tokens=6)
    tok = AutoTokenizer.from_pretrained(tiny_hf)
    ids = tok("great movie and the", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_hf).generate(ids, max_new_tokens=6, do_sample=False,
                                                                     eos_token_id=None, pad_token_id=0)
    assert model.tokenizer.encode("great movie and the") == ids[0].tolist()
    assert text == model.tokenizer.decode(ref[0, ids.shape[1]:].tolist()) and text
