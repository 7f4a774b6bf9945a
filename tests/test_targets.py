"""Execution-provider targets: every file loads, availability is what a session really gets,
and a target this build cannot run is one line and exit 2 before anything is written."""
from __future__ import annotations

import onnxruntime as ort
import pytest

from ortzo.cli import main
from ortzo.errors import OrtzoError
from ortzo.model import targets
from ortzo.model.targets import known_targets, load_target

EXPECTED = {"cpu": ("onnx", "host"), "cuda": ("onnx", "cuda"), "mobile-cpu": ("ort", "host"),
            "xnnpack": ("onnx", "host"), "nnapi": ("onnx", "host"), "coreml": ("onnx", "host"), "qnn": ("onnx", "host")}


def test_every_target_loads_with_cpu_fallback_last():
    assert set(EXPECTED) <= set(known_targets())
    for name, (fmt, device) in EXPECTED.items():
        t = load_target(name)
        assert (t.format, t.device) == (fmt, device), name
        assert t.providers[-1] == "CPUExecutionProvider" and t.description, name
        assert not t.provider_options or len(t.provider_options) == len(t.providers), name
        t.session_options()  # every session setting is one ORT knows


def test_availability_is_what_a_session_starts_on():
    have = ort.get_available_providers()
    for name in EXPECTED:
        t = load_target(name)
        why = t.unavailable()
        if all(p in have for p in t.providers) and t.device == "host":
            assert why is None, (name, why)
        elif any(p not in have for p in t.providers):
            assert why is not None and "this onnxruntime build has no" in why and "CPUExecutionProvider" in why


def test_a_listed_provider_that_cannot_start_is_unavailable(monkeypatch):
    """onnxruntime-gpu on a machine without a GPU lists CUDA, then silently runs on the CPU:
    that must count as unavailable (simulated: this build is told it has CUDA)."""
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    targets._unavailable.cache_clear()
    try:
        with pytest.warns(UserWarning):
            why = load_target("cuda").unavailable()
    finally:
        targets._unavailable.cache_clear()
    assert why is not None and "could not start here" in why and "sessions would run on CPUExecutionProvider" in why


def test_bad_target_files(tmp_path):
    with pytest.raises(OrtzoError, match="unknown target/provider 'tpu'; known: coreml, cpu, cuda"):
        load_target("tpu")
    with pytest.raises(OrtzoError, match="target file not found"):
        load_target(str(tmp_path / "none.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nproviders = ["CPUExecutionProvider"]\nformat = "tflite"\n')
    with pytest.raises(OrtzoError, match="format must be one of onnx, ort"):
        load_target(str(bad))
    bad.write_text('name = "x"\nproviders = ["A", "CPUExecutionProvider"]\n[[provider_options]]\n')
    with pytest.raises(OrtzoError, match="1 provider_options tables for 2 providers"):
        load_target(str(bad))
    bad.write_text("providers = [")
    with pytest.raises(OrtzoError, match="bad target file"):
        load_target(str(bad))


def test_targets_command_lists_every_target(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[3] for line in out.splitlines()[1:] if not line.startswith(" ")}
    assert rows["cpu"] == "yes" and rows["mobile-cpu"] == "yes"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert rows["cuda"] == "no"
    assert set(EXPECTED) <= set(rows)


@pytest.mark.parametrize("flag", ["--provider", "--target"])
def test_an_unavailable_target_fails_before_any_write(tiny_model, tiny_data, tmp_path, capsys, flag):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this build has CUDA")
    out = tmp_path / "run"
    assert main(["finetune", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--out", str(out),
                 flag, "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ortzo: error: target cuda: this onnxruntime build has no "
                                               "CUDAExecutionProvider"), err
    assert "pip install 'ortzo[cuda]'" in err[0]
    assert not out.exists()


def test_a_target_file_runs_a_finetune(tiny_model, tiny_data, tmp_path):
    """--target FILE: a user's own target (here the CPU one, one thread) drives a real run."""
    own = tmp_path / "mine.toml"
    own.write_text('name = "mine"\nproviders = ["CPUExecutionProvider"]\n[session]\nintra_op_num_threads = 1\n')
    assert main(["finetune", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--out",
                 str(tmp_path / "run"), "--target", str(own), "--steps", "2", "--batch-size", "4",
                 "--train-examples", "8", "--eval-examples", "8"]) == 0


def test_direction_kinds_without_a_device_kernel_are_refused_first(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["finetune", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--out", str(out),
                 "--provider", "cuda", "--directions", "gaussian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "directions 'gaussian' have no device kernel: use --directions rademacher-counter" in err[0]
    assert not out.exists()
