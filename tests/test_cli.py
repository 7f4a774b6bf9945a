"""The CLI end to end on the tiny model, resume, and the errors a user can make."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ortzo.cli import main

TRAIN = ["--task", "sst2", "--steps", "12", "--batch-size", "8", "--lr", "5e-3", "--eval-every", "6",
         "--checkpoint-every", "4", "--train-examples", "48"]


def _finetune(model, data, out, *extra):
    return main(["finetune", str(model), "--data", str(data), "--out", str(out), *TRAIN, *extra])


def test_finetune_then_eval(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--dev-examples", "8") == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 6, 12]
    assert all(0 <= m["dev_accuracy"] <= 1 for m in metrics)
    assert metrics[0]["train_loss"] is None and metrics[-1]["train_seconds"] > 0
    assert len((run / "steps.jsonl").read_text().splitlines()) == 12
    assert (run / "curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000008", "step-0000012"]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 12
    assert result["accuracy"] == pytest.approx(metrics[-1]["eval_accuracy"])
    assert result["loss"] == pytest.approx(metrics[-1]["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_resume_equals_an_uninterrupted_run(tiny_model, tiny_model_fp16, tiny_data, tmp_path, dtype):
    """float16: the checkpoint must carry the fp32 masters, not only their fp16 rounding."""
    if dtype == "float16":
        tiny_model = tiny_model_fp16
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _finetune(tiny_model, tiny_data, whole) == 0
    assert main(["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(parts),
                 *TRAIN[:2], "--steps", "10", *TRAIN[4:]]) == 0
    shutil.rmtree(parts / "checkpoints" / "step-0000010")  # as if it crashed after logging step 10
    assert main(["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(parts),
                 *TRAIN, "--resume"]) == 0
    final = "checkpoints/step-0000012"
    for name in ("weights.bin", "masters.bin") if dtype == "float16" else ("weights.bin",):
        assert (whole / final / name).read_bytes() == (parts / final / name).read_bytes()
    assert (whole / "steps.jsonl").read_text().splitlines()[5] == (parts / "steps.jsonl").read_text().splitlines()[5]


def test_resume_refuses_changed_settings(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run) == 0
    capsys.readouterr()
    assert _finetune(tiny_model, tiny_data, run, "--resume", "--eps", "1e-2") == 2
    assert "settings differ" in capsys.readouterr().err


def _expect_error(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_bad_inputs_get_one_line_and_exit_2(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["finetune", str(tiny_model), "--data", str(tiny_data), "--steps", "1"]
    _expect_error(capsys, ["finetune", str(tmp_path / "nope"), "--task", "sst2", "--out", str(run)], "not found")
    _expect_error(capsys, [*base, "--task", "nosuch", "--out", str(run)], "unknown task")
    _expect_error(capsys, [*base, "--task", "sst2", "--provider", "tpu", "--out", str(run)], "unknown target/provider")
    _expect_error(capsys, [*base[:3], str(tmp_path / "missing"), "--steps", "1", "--task", "sst2", "--out", str(run)],
                  "data folder not found")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "x", "label": 1}\n')
    (bad / "validation.jsonl").write_text('{"text": "x", "label": 1}\n')
    _expect_error(capsys, [*base[:3], str(bad), "--steps", "1", "--task", "sst2", "--out", str(run)], "missing field")
    _expect_error(capsys, ["export", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "x")], "unknown model")
    _expect_error(capsys, ["export", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")], "GGUF file not found")
    _expect_error(capsys, ["eval", str(tmp_path)], "neither")


def test_existing_run_folder_is_not_overwritten(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "steps.jsonl").write_text("precious\n")
    _expect_error(capsys, ["finetune", str(tiny_model), "--data", str(tiny_data), "--task", "sst2", "--out", str(run)],
                  "not empty")
    assert (run / "steps.jsonl").read_text() == "precious\n"


def test_cli_exit_code_from_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ortzo.cli", "eval", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("ortzo: error:")


def test_training_and_evaluation_import_no_torch(tiny_model, tiny_data, tmp_path):
    """The on-device path: onnxruntime + numpy + tokenizers. Importing torch would fail here."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from ortzo.cli import main\n"
        f"assert main(['finetune', {str(tiny_model)!r}, '--task', 'sst2', '--data', {str(tiny_data)!r}, "
        f"'--out', {str(tmp_path / 'run')!r}, '--steps', '3', '--eval-every', '3']) == 0\n"
        f"assert main(['eval', {str(tmp_path / 'run')!r}]) == 0\n"
        "assert sys.modules['torch'] is None\n"
        "assert not any(m.split('.')[0] in ('transformers', 'optimum') for m in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
