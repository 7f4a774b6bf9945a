"""The CLI end to end on the tiny model: runs, resumes, evaluations, and every error a user
can make (one line on stderr, exit 2, nothing of theirs touched)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from filelock import FileLock

from ortzo import jsonl
from ortzo.cli import main
from ortzo.model.manifest import Manifest

TRAIN = ["--task", "sst2", "--steps", "12", "--batch-size", "8", "--lr", "5e-3", "--eval-every", "6",
         "--checkpoint-every", "4", "--train-examples", "48", "--schedule", "constant"]
TIMES = ("seconds", "train_seconds", "wall_seconds", "eval_seconds", "peak_rss_mib")


def _finetune(model, data, out, *extra):
    return main(["finetune", str(model), "--data", str(data), "--out", str(out), *TRAIN, *extra])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def _expect_error(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err  # progress bars may come first; the error is one line, the last
    last = err.strip().split("\n")[-1].split("\r")[-1]
    assert last.startswith("ortzo: error: ") and message in last and "Traceback" not in err, err
    return last


def test_finetune_writes_a_run_that_accounts_for_itself(tiny_model, tiny_data, tmp_path):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--dev-examples", "8") == 0
    steps, metrics = _lines(run / "steps.jsonl"), _lines(run / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(12))
    assert [m["step"] for m in metrics] == [0, 6, 12]
    assert all(0 <= m["dev_accuracy"] <= 1 and 0 <= m["eval_accuracy"] <= 1 for m in metrics)
    assert metrics[0]["train_loss"] is None and metrics[0]["train_seconds"] == 0
    for m, since in zip(metrics[1:], (0, 6)):  # each row's numbers, from the step log
        window = steps[since:m["step"]]
        assert m["train_loss"] == pytest.approx(np.mean([(s["loss_plus"][0] + s["loss_minus"][0]) / 2 for s in window]))
        assert m["train_seconds"] == pytest.approx(sum(s["seconds"] for s in steps[:m["step"]]), abs=2e-3)
    for i, m in enumerate(metrics):
        evals = sum(r["eval_seconds"] for r in metrics[:i + 1])
        assert m["wall_seconds"] == pytest.approx(m["train_seconds"] + evals, abs=3e-3)
    assert (run / "curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000008", "step-0000012"]
    cfg = json.loads((run / "config.json").read_text())
    manifest = Manifest.load(tiny_model)
    assert cfg["model"] == str(tiny_model.resolve()) and cfg["data"] == str(tiny_data.resolve())
    assert cfg["recorded"]["model_weights_sha256"] == manifest.weights_sha256
    assert cfg["recorded"]["versions"]["numpy"] == np.__version__ and "ortzo" in cfg["recorded"]["versions"]
    assert cfg["schedule_steps"] == 12
    assert cfg["recorded"]["task"]["template"] == (  # sst2's default prompt: two demonstrations, then the review
        "Review: distanced us from the characters\nSentiment: negative\n\n"
        "Review: is a movie full of grace\nSentiment: positive\n\nReview: {sentence}\nSentiment:")


def test_eval_of_a_run_measures_the_runs_own_evaluation_set(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--eval-examples", "20", "--dev-examples", "8",
                     "--max-length", "12") == 0
    metrics = _lines(run / "metrics.jsonl")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for step, row in ((None, metrics[-1]), (6, metrics[1]), (0, metrics[0])):
        capsys.readouterr()
        assert main(["eval", str(run), *(["--step", str(step)] if step is not None else [])]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["examples"] == 20 and result["steps"] == row["step"]
        assert result["accuracy"] == row["eval_accuracy"]
        assert result["loss"] == pytest.approx(row["eval_loss"], rel=1e-6)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # eval wrote nothing


def test_params_vectors_trains_the_one_dimensional_parameters_only(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--params", "vectors") == 0
    params = json.loads((tiny_model / "manifest.json").read_text())["parameters"]
    vectors = [p for p in params if len(p["shape"]) == 1]
    assert f"{sum(p['shape'][0] for p in vectors):,} of " in capsys.readouterr().err
    before = (tiny_model / "weights.bin").read_bytes()
    after = (run / "checkpoints/step-0000012/weights.bin").read_bytes()
    for p in params:
        n = int(np.prod(p["shape"])) * 4
        same = before[p["offset"]:p["offset"] + n] == after[p["offset"]:p["offset"] + n]
        assert same == (len(p["shape"]) > 1), p["name"]
    capsys.readouterr()
    assert main(["eval", str(run), "--step", "6"]) == 0  # the replay trains the same parameters
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = _lines(run / "metrics.jsonl")[1]
    assert result["accuracy"] == row["eval_accuracy"] and result["loss"] == pytest.approx(row["eval_loss"], rel=1e-6)


def test_a_run_from_before_params_existed_replays_every_parameter(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--params", "all") == 0
    config = json.loads((run / "config.json").read_text())
    del config["params"], config["group_by_length"]
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["eval", str(run), "--step", "6"]) == 0
    result, row = json.loads(capsys.readouterr().out.strip().splitlines()[-1]), _lines(run / "metrics.jsonl")[1]
    assert result["loss"] == pytest.approx(row["eval_loss"], rel=1e-6)
    assert main(["finetune", "--resume", "--out", str(run), "--steps", "14"]) == 0
    assert json.loads((run / "config.json").read_text())["params"] == "all"


def test_eval_of_a_live_run_leaves_its_torn_tail_alone(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run) == 0
    with open(run / "steps.jsonl", "ab") as f:
        f.write(b'{"step": 12, "seed": 1')  # a live run, mid-append
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 12
    assert (run / "steps.jsonl").read_bytes().endswith(b'{"step": 12, "seed": 1')


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_model, tiny_data, tmp_path, capsys):
    """Killed during the evaluation at step 10 with a half-written step 10 record: the
    checkpoint at 10 never made it, the metrics row at 10 is lost, the log has a torn tail."""
    linear = ["--schedule", "linear", "--schedule-steps", "12"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _finetune(tiny_model, tiny_data, whole, *linear, "--eval-every", "5") == 0
    assert _finetune(tiny_model, tiny_data, parts, *linear, "--eval-every", "5", "--steps", "10") == 0
    shutil.rmtree(parts / "checkpoints" / "step-0000010")
    metrics = (parts / "metrics.jsonl").read_text().splitlines()
    (parts / "metrics.jsonl").write_text("\n".join(metrics[:-1]) + "\n" + metrics[-1][:20])
    with open(parts / "steps.jsonl", "a") as f:
        f.write('{"step": 10, "seed"')
    capsys.readouterr()
    assert main(["finetune", "--resume", "--out", str(parts), "--steps", "12"]) == 0
    out = capsys.readouterr().err
    assert "dropped an incomplete last line" in out
    final = "checkpoints/step-0000012/weights.bin"
    assert (whole / final).read_bytes() == (parts / final).read_bytes()
    assert _untimed(_lines(whole / "steps.jsonl")) == _untimed(_lines(parts / "steps.jsonl"))
    assert _untimed(_lines(whole / "metrics.jsonl")) == _untimed(_lines(parts / "metrics.jsonl"))
    assert [m["step"] for m in _lines(parts / "metrics.jsonl")] == [0, 5, 10, 12]


def test_resume_continues_an_fp16_run_through_its_masters(tiny_model_fp16, tiny_data, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _finetune(tiny_model_fp16, tiny_data, whole) == 0
    assert _finetune(tiny_model_fp16, tiny_data, parts, "--steps", "10") == 0
    shutil.rmtree(parts / "checkpoints" / "step-0000010")
    assert main(["finetune", "--resume", "--out", str(parts), "--steps", "12"]) == 0
    for name in ("weights.bin", "masters.bin"):
        assert (whole / "checkpoints/step-0000012" / name).read_bytes() == \
            (parts / "checkpoints/step-0000012" / name).read_bytes()


def test_resume_may_change_the_resumable_settings_only(tiny_model, tiny_data, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--steps", "6", "--schedule", "linear") == 0
    _expect_error(capsys, ["finetune", "--resume", "--out", str(run), "--seed", "3"], "--seed")
    _expect_error(capsys, ["finetune", "--resume", "--out", str(run), "--batch-size", "4", "--task", "rte"],
                  "fixed at the run's start")
    _expect_error(capsys, ["finetune", "--resume", "--out", str(run), "--steps", "5"], "already logged 6 steps")
    assert main(["finetune", "--resume", "--out", str(run), "--steps", "10", "--lr", "1e-3", "--clip", "2"]) == 0
    steps = _lines(run / "steps.jsonl")
    # the schedule spans the 6 steps the run started with: lr 5e-3 (1 - t/6), then 0; never back up
    assert [s["lr"] for s in steps[:6]] == pytest.approx([5e-3 * (1 - t / 6) for t in range(6)])
    assert [s["lr"] for s in steps[6:]] == [0.0] * 4
    assert all(abs(s["grads"][0]) <= 2 for s in steps[6:])
    assert "steps 7-10 run at lr 0 (pass --schedule-steps 10" in caplog.text  # said, not silent
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr"] == 1e-3 and cfg["clip"] == 2 and cfg["steps"] == 10 and cfg["seed"] == 0
    assert cfg["recorded"]["resumes"] == [{"at_step": 6, "changed": {"steps": [6, 10], "lr": [5e-3, 1e-3],
                                                                     "clip": [30.0, 2.0]}}]
    caplog.clear()  # a resume that stretches the schedule: the lr picks up on the new span, no warning
    assert main(["finetune", "--resume", "--out", str(run), "--steps", "14", "--schedule-steps", "20"]) == 0
    assert [s["lr"] for s in _lines(run / "steps.jsonl")[10:]] == pytest.approx([1e-3 * (1 - t / 20)
                                                                                 for t in range(10, 14)])
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "lr 0" in r.getMessage()]


def test_a_non_finite_loss_stops_the_run_and_a_smaller_lr_continues_it(tiny_model, tiny_data, tmp_path, capsys,
                                                                     monkeypatch):
    from ortzo.engines import ort as finetune  # where the ORT engine's loss is looked up

    run = tmp_path / "run"
    real = finetune.loss
    calls = []

    def loss_blowing_up_at_step_5(scores, labels):
        calls.append(1)
        return float("nan") if len(calls) == 11 else real(scores, labels)
    monkeypatch.setattr(finetune, "loss", loss_blowing_up_at_step_5)
    err = _expect_error(capsys, ["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(run), *TRAIN],
                        "non-finite loss at step 5")
    assert "--resume" in err and "--lr" in err
    assert len(_lines(run / "steps.jsonl")) == 5
    monkeypatch.setattr(finetune, "loss", real)
    assert main(["finetune", "--resume", "--out", str(run), "--lr", "1e-3"]) == 0
    assert [s["lr"] for s in _lines(run / "steps.jsonl")] == [5e-3] * 5 + [1e-3] * 7


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real, appended = jsonl._write, []

    def full_after_8(fd, data):
        appended.append(1)
        if len(appended) > 8:
            raise OSError(28, "No space left on device")
        real(fd, data)
    monkeypatch.setattr(jsonl, "_write", full_after_8)
    _expect_error(capsys, ["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(run), *TRAIN],
                  "No space left on device")
    monkeypatch.setattr(jsonl, "_write", real)
    assert main(["finetune", "--resume", "--out", str(run)]) == 0
    assert len(_lines(run / "steps.jsonl")) == 12


def test_inputs_are_checked_before_anything_is_written(tiny_model, tiny_data, tmp_path, capsys):
    """A wrong checksum or pattern leaves no run folder behind: the corrected command just works."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    good = (model / "weights.bin").read_bytes()
    (model / "weights.bin").write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    run = tmp_path / "run"
    argv = ["finetune", str(model), "--data", str(tiny_data), "--out", str(run), *TRAIN]
    _expect_error(capsys, argv, "checksum mismatch")
    assert not run.exists()
    (model / "weights.bin").write_bytes(good)
    _expect_error(capsys, [*argv, "--include", "model.layers.9.*"], "no parameter matches")
    assert not run.exists()
    run.mkdir()  # an empty folder of the user's stays theirs, and stays empty
    _expect_error(capsys, [*argv, "--data", str(tmp_path / "missing")], "data folder not found")
    assert run.is_dir() and not any(run.iterdir())
    assert main(argv) == 0


@pytest.mark.parametrize("option,message", [
    (["--eval-every", "0"], "--eval-every: Input should be greater than or equal to 1 (got '0')"),
    (["--steps", "-5"], "--steps"),
    (["--clip", "-1"], "--clip: Input should be greater than 0"),
    (["--lr", "fast"], "--lr: Input should be a valid number"),
    (["--lr", "1e30"], "--lr: Input should be less than or equal to 1000"),  # it wrecked the weights, logged
    (["--eps", "inf"], "--eps: Input should be less than or equal to 1"),
    (["--weight-decay", "inf"], "--weight-decay: Input should be a finite number"),
    (["--directions", "uniform"], "invalid choice: 'uniform'"),
    (["--lr", "1", "--weight-decay", "2"], "must stay below 1"),
    (["--batch-size", "100"], "more than the 48 training examples"),
    (["--provider", "tpu"], "unknown target/provider 'tpu'"),
    (["--task", "nosuch"], "unknown task"),
    (["--nonsense"], "unrecognized arguments: --nonsense"),
])
def test_bad_option_values_are_one_line(tiny_model, tiny_data, tmp_path, capsys, option, message):
    run = tmp_path / "run"
    _expect_error(capsys, ["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(run), *TRAIN, *option],
                  message)
    assert not run.exists()


def test_bad_files_are_one_line(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["finetune", str(tiny_model), "--task", "sst2", "--steps", "1", "--out", str(run)]
    _expect_error(capsys, ["finetune", str(tmp_path / "nope"), "--task", "sst2", "--out", str(run)], "not found")
    _expect_error(capsys, [*base, "--data", str(tiny_data / "train.jsonl")], "is a file")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "x", "label": 1}\n')
    (bad / "validation.jsonl").write_text('{"text": "x", "label": 1}\n')
    _expect_error(capsys, [*base, "--data", str(bad)], "missing field 'sentence'")
    _expect_error(capsys, ["export", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "x")], "unknown model")
    _expect_error(capsys, ["export", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")], "GGUF file not found")
    _expect_error(capsys, ["eval", str(tmp_path)], "neither")
    _expect_error(capsys, ["eval", str(tiny_model)], "--task is required")
    _expect_error(capsys, ["finetune", "--resume", "--out", str(tmp_path / "none")], "run folder not found")
    _expect_error(capsys, [*base, "--data", str(tiny_data), "--config", str(tmp_path / "c.toml")], "config file not found")
    assert not run.exists()


def test_an_unwritable_out_is_one_line(tiny_model, tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, message in ((blocker / "run", "Not a directory"), ("/proc/ortzo-run", "No such file or directory")):
        _expect_error(capsys, ["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(out), *TRAIN],
                      message)


def test_a_run_folder_in_use_is_refused(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--steps", "4") == 0
    log = (run / "steps.jsonl").read_bytes()
    with FileLock(run / ".lock", timeout=0):  # another ortzo process holds it
        _expect_error(capsys, ["finetune", "--resume", "--out", str(run), "--steps", "8"], "in use by another")
    assert (run / "steps.jsonl").read_bytes() == log


def test_a_reexported_model_cannot_resume_the_run(tiny_model, tiny_data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    run = tmp_path / "run"
    assert _finetune(model, tiny_data, run, "--steps", "4", "--checkpoint-every", "100") == 0
    manifest = json.loads((model / "manifest.json").read_text())
    data = bytearray((model / "weights.bin").read_bytes())
    data[200] ^= 1
    (model / "weights.bin").write_bytes(data)
    import hashlib
    manifest["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (model / "manifest.json").write_text(json.dumps(manifest))
    _expect_error(capsys, ["finetune", "--resume", "--out", str(run), "--steps", "8"], "re-exported")
    _expect_error(capsys, ["eval", str(run)], "re-exported")


def test_a_config_file_with_overrides(tiny_model, tiny_data, tmp_path, capsys):
    spec = tmp_path / "run.toml"
    spec.write_text(f'model = "{tiny_model}"\ntask = "sst2"\ndata = "{tiny_data}"\nsteps = 4\nbatch_size = 8\n'
                    'lr = 1e-3\neval_every = 2\ntrain_examples = 48\n')
    assert main(["finetune", "--config", str(spec), "--out", str(tmp_path / "a"), "--lr", "2e-3"]) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["lr"] == 2e-3 and cfg["steps"] == 4 and cfg["eval_every"] == 2
    # a run's own config.json starts another run like it
    assert main(["finetune", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"),
                 "--seed", "1"]) == 0
    again = json.loads((tmp_path / "b" / "config.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("seed", "recorded")} == \
        {k: v for k, v in cfg.items() if k not in ("seed", "recorded")}
    spec.write_text(spec.read_text() + 'lable_field = "y"\n')
    _expect_error(capsys, ["finetune", "--config", str(spec), "--out", str(tmp_path / "c")],
                  "unknown setting 'lable_field'")
    _expect_error(capsys, ["finetune", "--resume", "--config", str(spec), "--out", str(tmp_path / "a")],
                  "--config starts a new run")


def test_help_shows_every_setting_with_its_default(capsys):
    from ortzo.config import RunConfig, flag

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside words
    for name, field in RunConfig.model_fields.items():
        if name != "model":
            assert flag(name) in text
        assert "".join(field.description.split()) in text
    assert "(default:1000)" in text and "[maychangeon--resume]" in text


def test_existing_run_folder_is_not_overwritten(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "steps.jsonl").write_text("precious\n")
    _expect_error(capsys, ["finetune", str(tiny_model), "--data", str(tiny_data), "--task", "sst2", "--out", str(run)],
                  "not empty")
    assert (run / "steps.jsonl").read_text() == "precious\n"


def test_cli_exit_code_from_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ortzo.cli", "eval", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("ortzo: error:") and r.stderr.count("\n") == 1


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


def test_resume_prunes_what_a_kill_between_save_and_prune_left(tiny_model, tiny_data, tmp_path):
    """Found by the fault injection: killed after the last checkpoint's rename, before pruning."""
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run) == 0
    extra = run / "checkpoints" / "step-0000004"
    shutil.copytree(run / "checkpoints" / "step-0000008", extra)
    meta = json.loads((extra / "checkpoint.json").read_text())
    (extra / "checkpoint.json").write_text(json.dumps(meta | {"steps_applied": 4}))
    assert main(["finetune", "--resume", "--out", str(run)]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000008", "step-0000012"]


def test_a_time_budget_ends_the_run_after_the_step_that_reaches_it(tiny_model, tiny_data, tmp_path):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--steps", "100000", "--time-budget", "0.5") == 0
    steps, metrics = _lines(run / "steps.jsonl"), _lines(run / "metrics.jsonl")
    seconds = [s["seconds"] for s in steps]
    assert sum(seconds[:-1]) < 0.5 <= sum(seconds)
    assert metrics[-1]["step"] == len(steps) and metrics[-1]["train_seconds"] >= 0.5
    assert f"step-{len(steps):07d}" in [p.name for p in (run / "checkpoints").iterdir()]
    assert main(["finetune", "--resume", "--out", str(run)]) == 0  # nothing left to do
    assert len(_lines(run / "steps.jsonl")) == len(steps) and len(_lines(run / "metrics.jsonl")) == len(metrics)
    assert main(["finetune", "--resume", "--out", str(run), "--time-budget", "1.0"]) == 0
    more = _lines(run / "steps.jsonl")
    assert len(more) > len(steps) and sum(s["seconds"] for s in more[:-1]) < 1.0 <= sum(s["seconds"] for s in more)
    assert _lines(run / "metrics.jsonl")[-1]["step"] == len(more)


def test_a_time_budget_spans_the_lr_schedule_and_a_longer_one_never_raises_it(tiny_model, tiny_data, tmp_path,
                                                                              capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--steps", "100000", "--time-budget", "0.5", "--schedule",
                     "linear") == 0
    assert "lr 0.005 (linear over 100000 steps or 0.5 s of steps, whichever ends first)" in capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["schedule_steps"], cfg["schedule_seconds"]) == (100000, 0.5)
    steps = _lines(run / "steps.jsonl")
    before = np.cumsum([0.0] + [s["seconds"] for s in steps])  # seconds of the steps before each step
    want = [5e-3 * min(1 - i / 100000, max(0.0, 1 - before[i] / 0.5)) for i in range(len(steps))]
    assert [s["lr"] for s in steps] == pytest.approx(want, rel=1e-9)
    assert steps[-1]["lr"] < 1e-3  # the last step is near the budget's end: near 0
    assert main(["finetune", "--resume", "--out", str(run), "--time-budget", "1.0"]) == 0
    more = _lines(run / "steps.jsonl")[len(steps):]
    assert more and all(s["lr"] == 0.0 for s in more)  # the schedule spans the budget the run started with


def test_a_resumed_schedule_counts_the_seconds_logged_before_the_resume(tiny_model, tiny_data, tmp_path):
    run = tmp_path / "run"
    span = ["--schedule", "linear", "--schedule-steps", "1000", "--schedule-seconds", "2"]
    assert _finetune(tiny_model, tiny_data, run, "--steps", "6", *span) == 0
    assert main(["finetune", "--resume", "--out", str(run), "--steps", "12"]) == 0
    steps = _lines(run / "steps.jsonl")
    before = np.cumsum([0.0] + [s["seconds"] for s in steps])
    want = [5e-3 * min(1 - i / 1000, max(0.0, 1 - before[i] / 2)) for i in range(12)]
    assert [s["lr"] for s in steps] == pytest.approx(want, rel=1e-9)


def test_schedule_steps_alone_span_the_schedule_under_a_time_budget(tiny_model, tiny_data, tmp_path):
    """Given --schedule-steps, the run's schedule is those steps, and a run written before
    schedule_seconds existed (no such key) keeps its step schedule when resumed with a budget."""
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--steps", "10", "--time-budget", "100", "--schedule", "linear",
                     "--schedule-steps", "20") == 0
    config = run / "config.json"
    cfg = json.loads(config.read_text())
    assert cfg["schedule_seconds"] is None
    del cfg["schedule_seconds"]
    config.write_text(json.dumps(cfg))
    assert main(["finetune", "--resume", "--out", str(run), "--steps", "14", "--time-budget", "200"]) == 0
    assert [s["lr"] for s in _lines(run / "steps.jsonl")] == pytest.approx([5e-3 * (1 - i / 20) for i in range(14)])
    assert json.loads(config.read_text())["schedule_seconds"] is None


def test_meazo_divides_each_lr_by_the_moment_of_the_logged_gradients_and_resumes_exactly(tiny_model, tiny_data,
                                                                                         tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    meazo = ["--adaptive", "meazo", "--lr", "1e-3", "--schedule", "linear"]
    assert _finetune(tiny_model, tiny_data, whole, *meazo) == 0
    assert "MEAZO's adaptive step" in capsys.readouterr().err
    steps = _lines(whole / "steps.jsonl")
    v, want = 0.0, []
    for t, s in enumerate(steps):  # the moment, in the test's own loop over the logged gradients
        g = float(np.mean(s["grads"]))
        v = 0.99 * v + 0.01 * g * g
        want.append(1e-3 * (1 - t / 12) / (np.sqrt(v / (1 - 0.99 ** (t + 1))) + 1e-8))
    assert [s["lr"] for s in steps] == pytest.approx(want, rel=1e-9)
    assert _finetune(tiny_model, tiny_data, parts, *meazo, "--steps", "7", "--schedule-steps", "12") == 0
    assert main(["finetune", "--resume", "--out", str(parts), "--steps", "12"]) == 0
    assert _untimed(_lines(parts / "steps.jsonl")) == _untimed(steps)
    final = "checkpoints/step-0000012/weights.bin"
    assert (whole / final).read_bytes() == (parts / final).read_bytes()


def test_the_defaults_follow_the_estimator_and_engine():
    from ortzo.config import RunConfig

    def built(**given):
        c = RunConfig.build({"model": "m", "task": "sst2"} | given)
        return c.params, c.lr, c.clip, c.schedule

    assert built() == ("vectors", 2e-4, 30.0, "linear")  # MeZO's measured recipe
    assert built(include=["*q_proj*"]) == built(exclude=["*embed*"]) == built(params="all") \
        == ("all", 5e-5, 30.0, "constant")  # patterns choose among all parameters, at every parameter's lr
    assert built(include=["*norm*"], params="vectors") == ("vectors", 2e-4, 30.0, "linear")
    assert built(estimator="fzoo", n_directions=4) == ("all", 1e-6, None, "constant")  # normalized: no clip
    assert built(engine="torch-bp") == ("all", 1e-5, None, "constant") == built(engine="torch-mezo")
    assert built(lr=1e-4, clip="none", schedule="wsd") == ("vectors", 1e-4, None, "wsd")  # what is given wins
    assert built(adaptive="meazo") == ("vectors", 1e-3, 30.0, "linear")  # --lr is a step length there
    assert built(adaptive="meazo", lr=3e-3)[1] == 3e-3


def test_weight_rms_direction_scales_are_recorded_applied_and_replayed(tiny_model, tiny_data, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    scaled = ["--params", "vectors", "--direction-scale", "weight-rms", "--schedule", "linear"]
    assert _finetune(tiny_model, tiny_data, whole, *scaled, "--keep-checkpoints", "3") == 0
    assert "directions scaled by weight-rms" in capsys.readouterr().err
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    vectors = [p for p in manifest["parameters"] if len(p["shape"]) == 1]
    w0 = {p["name"]: np.frombuffer((tiny_model / "weights.bin").read_bytes(), np.float32, p["shape"][0],
                                   p["offset"]).astype(np.float64) for p in vectors}
    rms = {n: np.sqrt((w ** 2).mean()) for n, w in w0.items()}  # the tiny norms are ~1: no floor
    mean = sum(rms[n] * w0[n].size for n in w0) / sum(w.size for w in w0.values())
    recorded = json.loads((whole / "config.json").read_text())["recorded"]["direction_scales"]
    assert recorded == pytest.approx({n: np.sqrt(rms[n] / mean) for n in w0}, rel=1e-9)
    # the first 4 steps' updates, rebuilt by the test from the log: w4 = w0 - sum_t lr_t g_t s z_t
    from ortzo.optim.directions import Directions
    from ortzo.optim.mezo import step_seed
    steps, z = _lines(whole / "steps.jsonl")[:4], Directions("rademacher-counter", threads=1)
    after = (whole / "checkpoints/step-0000004/weights.bin").read_bytes()
    names = list(w0)
    want = {n: w0[n].copy() for n in names}
    for t, s in enumerate(steps):
        assert s["seed"] == step_seed(0, t)
        for n, zn in zip(names, z.sample([w0[n].shape for n in names], s["seed"])):
            want[n] -= s["lr"] * s["grads"][0] * recorded[n] * zn
    for p in vectors:
        got = np.frombuffer(after, np.float32, p["shape"][0], p["offset"])
        np.testing.assert_allclose(got, want[p["name"]], atol=1e-6)
    assert any(abs(recorded[n] - 1) > 1e-3 for n in names)  # the scales matter in this check
    # resumed from a checkpoint the run keeps the scales of its start, so it equals the whole run
    assert _finetune(tiny_model, tiny_data, parts, *scaled, "--steps", "7", "--schedule-steps", "12") == 0
    assert main(["finetune", "--resume", "--out", str(parts), "--steps", "12"]) == 0
    final = "checkpoints/step-0000012/weights.bin"
    assert (whole / final).read_bytes() == (parts / final).read_bytes()
    capsys.readouterr()
    assert main(["eval", str(whole), "--step", "6"]) == 0  # a replay of the log applies them too
    result, row = json.loads(capsys.readouterr().out.strip().splitlines()[-1]), _lines(whole / "metrics.jsonl")[1]
    assert result["loss"] == pytest.approx(row["eval_loss"], rel=1e-6)


def test_corrupt_recorded_direction_scales_are_one_line(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_model, tiny_data, run, "--params", "vectors", "--direction-scale", "weight-rms",
                     "--steps", "4") == 0
    good = json.loads((run / "config.json").read_text())
    for scales, message in (("nope", "corrupt run config"), (None, "corrupt run config"),
                            (dict(list(good["recorded"]["direction_scales"].items())[1:]), "miss 1 of")):
        config = json.loads(json.dumps(good))
        if scales is None:
            del config["recorded"]["direction_scales"]  # a scaled run must not replay unscaled
        else:
            config["recorded"]["direction_scales"] = scales
        (run / "config.json").write_text(json.dumps(config))
        _expect_error(capsys, ["eval", str(run)], message)
        _expect_error(capsys, ["finetune", "--resume", "--out", str(run), "--steps", "6"], message)
    assert len(_lines(run / "steps.jsonl")) == 4  # nothing of the run was touched


# ------------------------------------------------------------------ the CLI's surface (issue 26)

def test_version_is_the_installed_one(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"ortzo {version('ortzo')}\n"


def _bars(err):
    """tqdm's bars in `err`: each shows its elapsed time, [mm:ss."""
    return re.findall(r"\[\d+:\d\d", err)


def test_progress_and_notes_go_to_the_ortzo_logger_on_stderr_and_quiet_silences_them(
        tiny_model, tiny_data, tmp_path, capsys):
    assert _finetune(tiny_model, tiny_data, tmp_path / "a", "--steps", "2") == 0
    out, err = capsys.readouterr()
    assert list(json.loads(out)) and "recipe: prompt" in err and _bars(err)  # stdout: the result alone
    for quiet in (["--quiet"], ["--log-level", "warning"]):
        argv = ["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(tmp_path / quiet[-1]), *TRAIN,
                "--steps", "2"]
        for where in (argv[:1] + quiet + argv[1:], quiet + argv):  # after the command or before it
            shutil.rmtree(tmp_path / quiet[-1], ignore_errors=True)
            assert main(where) == 0
            out, err = capsys.readouterr()
            assert list(json.loads(out)) and "recipe: prompt" not in err
            assert not _bars(err) or quiet == ["--log-level", "warning"], err


def test_tqdm_disable_hides_every_bar(tiny_model, tiny_data, tmp_path):
    """tqdm reads TQDM_* when it is imported, and only for arguments a bar does not pass."""
    import os

    def run(out, **env):
        argv = ["finetune", tiny_model, "--data", tiny_data, "--out", out, *TRAIN, "--steps", "2"]
        r = subprocess.run([sys.executable, "-m", "ortzo.cli", *map(str, argv)], capture_output=True, text=True,
                           env=os.environ | env)
        assert r.returncode == 0, r.stderr
        return r.stderr

    assert _bars(run(tmp_path / "a"))  # the step bar and the evaluations'
    assert not _bars(run(tmp_path / "b", TQDM_DISABLE="1"))


def test_importing_ortzo_configures_no_logging():
    code = ("import logging, ortzo, ortzo.cli\n"
            "assert logging.getLogger('ortzo').handlers == [] and logging.root.handlers == []\n"
            "assert logging.getLogger('ortzo').level == logging.NOTSET")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_export_and_the_ort_converter_silence_only_their_own_loggers(tiny_model, tmp_path, caplog, monkeypatch):
    """No process-wide logging.disable: a host app's records still flow while they run."""
    import logging

    import onnxruntime.tools.convert_onnx_models_to_ort as converter

    from ortzo.model.export import _quiet
    from ortzo.model.mobile import add_ort_graph

    host, exporter = logging.getLogger("host_app"), logging.getLogger("transformers")
    level = exporter.level
    caplog.set_level(logging.INFO)
    with _quiet():
        host.info("during an export")
        assert exporter.getEffectiveLevel() >= logging.ERROR
    real = converter.convert_onnx_models_to_ort
    monkeypatch.setattr(converter, "convert_onnx_models_to_ort", lambda *a, **k: host.info("during a conversion")
                        or real(*a, **k))
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    add_ort_graph(folder)
    assert [r.getMessage() for r in caplog.records if r.name == "host_app"] == ["during an export",
                                                                               "during a conversion"]
    assert logging.root.manager.disable == logging.NOTSET and exporter.level == level


def _one_line(capsys, argv, extra, module):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"ortzo: error: ortzo {argv[0]} needs the {extra!r} extra: pip install 'ortzo[{extra}]' "
                   f"(No module named {module!r})\n"), err


@pytest.mark.parametrize("command", ["prepare", "bake", "mobile", "placement"])
def test_a_command_without_onnx_names_the_onnx_extra(command, tiny_model, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    before = {p: p.read_bytes() for p in folder.rglob("*")if p.is_file()}
    monkeypatch.setitem(sys.modules, "onnx", None)
    argv = {"prepare": [str(folder / "model.onnx"), "--out", str(tmp_path / "out")],
            "bake": [str(folder), "--out", str(tmp_path / "out")], "mobile": [str(folder)],
            "placement": [str(folder)]}[command]
    _one_line(capsys, [command, *argv], "onnx", "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_export_without_torch_names_the_export_extra_and_leaves_nothing(tiny_hf, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    _one_line(capsys, ["export", str(tiny_hf), "--out", str(tmp_path / "out" / "e")], "export", "torch")
    assert list(tmp_path.iterdir()) == []  # no .e.partial, no lock file, no folder


def test_a_torch_engine_without_torch_names_the_export_extra(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    capsys.readouterr()
    assert main(["finetune", str(tiny_model), "--data", str(tiny_data), "--task", "sst2", "--engine", "torch-bp",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("ortzo: error: --engine torch-bp needs the 'export' extra: "
                                       "pip install 'ortzo[export]' (No module named 'torch')\n")
    assert not (tmp_path / "run").exists()


def test_a_run_without_matplotlib_completes_without_its_plot(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _finetune(tiny_model, tiny_data, tmp_path / "run", "--steps", "2") == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "plots" in line] == [
        f"{tmp_path / 'run' / 'curve.png'} not drawn: plots need the 'plots' extra: pip install 'ortzo[plots]'"]
    assert not (tmp_path / "run" / "curve.png").exists() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_eval_batch_size_is_named_as_finetunes_and_the_old_flag_still_works(tiny_model, tiny_data, tmp_path,
                                                                              capsys):
    results = []
    for flag_ in ("--eval-batch-size", "--batch-size"):
        capsys.readouterr()
        assert main(["eval", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--eval-examples", "8",
                     flag_, "3"]) == 0
        out, err = capsys.readouterr()
        results.append(json.loads(out))
        deprecated = [line for line in err.splitlines() if "deprecated" in line]
        assert deprecated == ([] if flag_ == "--eval-batch-size" else
                              ["--batch-size is deprecated and goes in the next release: use --eval-batch-size"])
    assert results[0] == results[1]
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--batch-size" not in capsys.readouterr().out.replace("--eval-batch-size", "")


def test_memory_takes_the_engine_names_and_the_old_method_flag_and_names_with_a_warning(capsys):
    tables = {}
    for argv in (["--engine", "torch-bp"], ["--method", "torch-bp"], ["--method", "bp"], ["--engine", "ort"],
                 ["--method", "ort-mezo"]):
        capsys.readouterr()
        assert main(["memory", "gpt2", *argv]) == 0
        out, err = capsys.readouterr()
        tables[tuple(argv)] = out
        olds = (argv[0] == "--method") + (argv[1] in ("bp", "ort-mezo"))  # the old flag, the old value
        assert err.count("is deprecated") == err.count("\n") == olds, err
    assert tables["--engine", "torch-bp"] == tables["--method", "torch-bp"] == tables["--method", "bp"]
    assert tables["--engine", "ort"] == tables["--method", "ort-mezo"] != tables["--engine", "torch-bp"]
    _expect_error(capsys, ["memory", "gpt2", "--engine", "bogus"], "invalid choice")


def test_placement_takes_the_coreml_target_name(tiny_model, capfd):
    assert main(["placement", str(tiny_model), "--provider", "coreml"]) == 0
    new = capfd.readouterr()
    assert "### coreml\n" in new.out and "deprecated" not in new.err
    assert main(["placement", str(tiny_model), "--provider", "coreml-mlprogram"]) == 0
    old = capfd.readouterr()
    assert old.out == new.out and "--providers coreml-mlprogram is deprecated" in old.err


def test_required_options_show_as_required_and_missing_ones_are_one_line(capsys):
    for command in ("export", "prepare", "bake", "adapter", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        usage = " ".join(capsys.readouterr().out.split("\n\n")[0].split())
        assert " --out OUT" in usage and "[--out OUT]" not in usage, usage
    _expect_error(capsys, ["export", "somewhere"], "the following arguments are required: --out")


def test_help_is_grouped_and_names_extras_that_exist(capsys):
    import tomllib
    from pathlib import Path

    from ortzo.config import RunConfig

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {n for names in RunConfig.groups.values() for n in names} <= set(RunConfig.model_fields)
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for section in ("output:", "task and data:", "training:", "evaluation:", "checkpoints:", "engine and target:",
                    "run folder:"):
        assert f"\n{section}\n" in text
    flat = " ".join(text.split())
    assert "torch extra" not in flat and "the export extra" in flat and "export" in extras
