"""The trainable folder computes what the PyTorch model computes, under PyTorch's names."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ortzo.tasks.batches import collate
from ortzo.model.manifest import Manifest

from conftest import open_folder


def _torch_logprobs(hf_dir, feeds):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(feeds["input_ids"]), attention_mask=torch.tensor(feeds["attention_mask"]),
                       position_ids=torch.tensor(feeds["position_ids"])).logits
    return torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1]).numpy()


def test_scores_equal_pytorch_log_probs(tiny_hf, tiny_model):
    _, session = open_folder(tiny_model)
    rng = np.random.default_rng(0)
    encoded = [list(rng.integers(2, 300, size=n)) for n in (5, 11, 2, 8)]  # ragged: left padding matters
    feeds = collate(encoded, 1, np.array([7, 40, 99]))
    ref = _torch_logprobs(tiny_hf, feeds)
    got = session(feeds)
    want = ref[feeds["score_index"]][:, [7, 40, 99]]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_target_span_scores(tiny_hf, tiny_model):
    """Several positions per row with one candidate each: the log-likelihood of a span."""
    _, session = open_folder(tiny_model)
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    feeds = collate([ids[0].tolist()], 1, np.array([0]))
    feeds["score_index"] = np.array([2, 3, 4])  # predict tokens 3..5 from positions 2..4
    feeds["score_ids"] = ids[0, 3:6, None]
    ref = _torch_logprobs(tiny_hf, feeds)
    np.testing.assert_allclose(session(feeds)[:, 0], ref[[2, 3, 4], [8, 9, 10]], atol=2e-5)


def test_parameters_carry_pytorch_names_and_values(tiny_hf, tiny_model):
    store, _ = open_folder(tiny_model)
    m = store.manifest
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    names = [p.name for p in m.parameters]
    assert len(names) == len(set(names))
    assert "lm_head.weight" not in names and m.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(names) == set(state) - {"lm_head.weight"}
    for p in m.parameters:
        want = state[p.name].T if p.transposed else state[p.name]
        np.testing.assert_array_equal(store.arrays[p.name], want)
        assert p.transposed == (p.name.endswith("proj.weight"))
    assert hashlib.sha256((tiny_model / m.weights).read_bytes()).hexdigest() == m.weights_sha256
    assert all(p.offset % 64 == 0 for p in m.parameters)


def test_untied_model_keeps_its_own_lm_head_and_export_shows_only_its_stages(tmp_path, capfd):
    from ortzo.cli import main
    from ortzo.model.manifest import Manifest
    from tiny import make_tiny_llama

    hf = make_tiny_llama(tmp_path / "hf", seed=1, tie=False)
    capfd.readouterr()
    assert main(["export", str(hf), "--out", str(tmp_path / "out")]) == 0
    out, err = capfd.readouterr()
    assert out == ""  # ortzo's stages go to its logger, on stderr
    # Optimum's, torch's and transformers' warnings and progress bars stay hidden; ortzo's own bar shows
    lines = [part for part in err.replace("\r", "\n").splitlines() if part.strip() and not part.startswith("weights: ")]
    assert [line[:5] for line in lines] == ["[1/4]"] * 2 + ["[2/4]"] * 2 + ["[3/4]"] * 2 + ["[4/4]"] * 2 + ["wrote"]
    m = Manifest.load(tmp_path / "out")
    assert m.tied == {}
    assert m.param("lm_head.weight").transposed
    _, session = open_folder(tmp_path / "out")
    feeds = collate([[3, 4, 5, 6]], 1, np.array([1, 2]))
    np.testing.assert_allclose(session(feeds), _torch_logprobs(hf, feeds)[[3]][:, [1, 2]], atol=2e-5)


def test_export_refuses_to_overwrite(tiny_hf, tmp_path):
    from ortzo.errors import OrtzoError
    from ortzo.model.export import export_model

    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OrtzoError, match="--force"):
        export_model(str(tiny_hf), out)
    with pytest.raises(OrtzoError, match="holds other files"):  # --force replaces only an earlier export
        export_model(str(tiny_hf), out, force=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    src = tmp_path / "hf" / "checkpoint"
    shutil.copytree(tiny_hf, src)
    before = sorted((p.name, p.read_bytes()) for p in src.iterdir())
    for into in (src, src.parent):  # an export into its own source, or a folder around it, would delete it
        with pytest.raises(OrtzoError, match="lies inside --out"):
            export_model(str(src), into, force=True)
    assert sorted((p.name, p.read_bytes()) for p in src.iterdir()) == before


def test_fp16_folder_computes_with_fp16_rounded_weights(tiny_hf, tiny_model, tiny_model_fp16):
    m16 = Manifest.load(tiny_model_fp16)
    assert {p.dtype for p in m16.parameters} == {"float16"}
    assert m16.weights_bytes < 0.6 * Manifest.load(tiny_model).weights_bytes
    _, session = open_folder(tiny_model_fp16)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    feeds = collate([[3, 4, 5, 6, 7], [8, 9]], 1, np.array([7, 40]))
    with torch.no_grad():
        logits = model(**{k: torch.tensor(feeds[k]) for k in ("input_ids", "attention_mask", "position_ids")}).logits
    want = torch.log_softmax(logits[:, -1], -1)[:, [7, 40]].numpy()
    np.testing.assert_allclose(session(feeds), want, atol=2e-5)


def test_packaged_gguf_is_assembled_whole_or_not_at_all(tmp_path, monkeypatch):
    """A chunked package's GGUF: a partial file from a killed assembly is never reused."""
    import sys
    import tempfile
    import types

    from ortzo.errors import OrtzoError
    from ortzo.model.export.sources import _assembled

    data = b"GGUF" + bytes(range(256)) * 40
    fake = types.ModuleType("fake_gguf_pkg")
    fake.EXPECTED_SHA256 = hashlib.sha256(data).hexdigest()
    fake.calls = 0

    def assemble(path):
        fake.calls += 1
        with open(path, "wb") as f:
            f.write(data[:100])
            if fake.fail:
                raise OSError("killed half-way")
            f.write(data[100:])
    fake.assemble, fake.fail = assemble, False
    monkeypatch.setitem(sys.modules, "fake_gguf_pkg", fake)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spec = {"module": "fake_gguf_pkg", "package": "fake", "file": "m.gguf", "assemble": "assemble",
            "sha256_attr": "EXPECTED_SHA256"}
    target = tmp_path / "ortzo-gguf" / "m.gguf"
    target.parent.mkdir()
    target.write_bytes(data[:100])  # what the old in-place assembly left after a kill
    assert _assembled(spec) == target and target.read_bytes() == data and fake.calls == 1
    assert _assembled(spec) == target and fake.calls == 1  # whole and checked: reused
    target.unlink()
    fake.fail = True
    with pytest.raises(OSError):
        _assembled(spec)
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.gguf.lock"]
    fake.EXPECTED_SHA256, fake.fail = "0" * 64, False
    with pytest.raises(OrtzoError, match="sha256"):
        _assembled(spec)
    assert not target.exists()
