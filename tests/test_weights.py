"""The weight store is what ORT computes with: zero-copy, in place, checked on load."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ortzo.tasks.batches import collate
from ortzo.errors import OrtzoError

from conftest import open_folder

FEEDS = collate([[3, 4, 5, 6, 7], [8, 9]], 1, np.array([1, 2, 3]))


def test_weights_are_bound_zero_copy(tiny_model):
    store, session = open_folder(tiny_model)
    for name, arr in store.arrays.items():
        assert session.weight_ptr(name) == arr.ctypes.data


def test_in_place_change_is_seen_and_equals_a_fresh_session(tiny_model, tmp_path):
    store, session = open_folder(tiny_model)
    before = session(FEEDS)
    rng = np.random.default_rng(1)
    for arr in store.arrays.values():  # every weight, the tied embedding included
        arr += rng.normal(0, 0.05, arr.shape).astype(np.float32)
    after = session(FEEDS)
    assert np.abs(after - before).max() > 1e-3
    sha = store.save(tmp_path / "changed.bin")
    _, fresh = open_folder(tiny_model, tmp_path / "changed.bin", sha)
    np.testing.assert_array_equal(after, fresh(FEEDS))


def test_checksum_mismatch_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    data = bytearray((folder / "weights.bin").read_bytes())
    data[100] ^= 1
    (folder / "weights.bin").write_bytes(data)
    with pytest.raises(OrtzoError, match="checksum mismatch"):
        open_folder(folder)


@pytest.mark.parametrize("damage", ["not json", "offset", "missing key", "truncated file"])
def test_corrupt_folder_gets_a_clear_error(tiny_model, tmp_path, damage):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    if damage == "not json":
        path.write_text("{ nope")
    elif damage == "offset":
        d["parameters"][1]["offset"] = 3
        path.write_text(json.dumps(d))
    elif damage == "missing key":
        del d["parameters"]
        path.write_text(json.dumps(d))
    else:
        (folder / "weights.bin").write_bytes((folder / "weights.bin").read_bytes()[:1000])
    with pytest.raises(OrtzoError):
        open_folder(folder)


def test_select_by_patterns(tiny_model):
    store, _ = open_folder(tiny_model)
    names = store.select(["*layers.1*"], ["*norm*"])
    assert names and all("layers.1" in n and "norm" not in n for n in names)
    with pytest.raises(OrtzoError, match="no parameter"):
        store.select(["nothing*"])


def test_select_vectors_takes_the_one_dimensional_parameters(tiny_model):
    shapes = {p["name"]: p["shape"] for p in json.loads((tiny_model / "manifest.json").read_text())["parameters"]}
    store, _ = open_folder(tiny_model)
    assert store.select(vectors=True) == [n for n, s in shapes.items() if len(s) == 1] != []
    assert store.select(["*layers.0*"], vectors=True) == [n for n, s in shapes.items()
                                                         if len(s) == 1 and "layers.0." in n]
    with pytest.raises(OrtzoError, match="no one-dimensional parameter"):
        store.select(["*mlp*"], vectors=True)


def test_fp16_weights_train_through_fp32_masters(tiny_model_fp16):
    """Updates far below fp16 resolution accumulate in the masters; the session reads their rounding."""
    from ortzo.optim.directions import Directions

    store, session = open_folder(tiny_model_fp16)
    names = store.select(["*mlp*"])
    before = {n: store.arrays[n].astype(np.float32) for n in names}
    masters = store.trainable(names)
    assert all(m.dtype == np.float32 for m in masters)
    d = Directions()
    for t in range(20):
        d.add(masters, seed=t, scale=1e-6)
    session(FEEDS)  # a forward syncs the masters into the bound fp16 arrays
    for n, m in zip(names, masters):
        assert np.abs(m - before[n]).max() > 1e-5  # moved, in fp32
        np.testing.assert_array_equal(store.arrays[n], m.astype(np.float16))


def test_the_torch_layout_is_in_place_and_saves_in_the_folders_layout(tiny_model, tmp_path):
    store, _ = open_folder(tiny_model)
    file_layout = {n: a.copy() for n, a in store.arrays.items()}
    address = store.buffer.ctypes.data
    store.to_torch_layout()
    transposed = [p.name for p in store.manifest.parameters if p.transposed]
    assert transposed and store.buffer.ctypes.data == address
    for p in store.manifest.parameters:
        a = store.arrays[p.name]
        want = file_layout[p.name].T if p.transposed else file_layout[p.name]
        np.testing.assert_array_equal(a, want)
        assert a.flags.c_contiguous and store.buffer.ctypes.data <= a.ctypes.data < address + store.buffer.nbytes
    name = transposed[0]
    store.arrays[name][0, 1] = 7.0  # PyTorch's [out, in]: row 0, column 1
    sha = store.save(tmp_path / "w.bin")
    saved, _ = open_folder(tiny_model, tmp_path / "w.bin", sha)
    assert saved.arrays[name][1, 0] == 7.0  # the folder's [in, out]
    for n, a in saved.arrays.items():
        if n != name:
            np.testing.assert_array_equal(a, file_layout[n])
