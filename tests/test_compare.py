"""`ortzo compare` end to end on two tiny models: each arm gets the largest model whose
predicted memory fits, every run stops at its time budget, the curves and the summary come
from the runs' own metrics, over-budget runs are marked, and a second call resumes."""
from __future__ import annotations

import csv
import json

import pytest

from ortzo.cli import main
from ortzo.memory import estimate
from ortzo.model.manifest import hf_config


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny Llama 4x wider than the conftest one: the bigger model of the experiment."""
    from ortzo.model.export import export_model
    from tiny import VOCAB, _build

    folder = tmp_path_factory.mktemp("wide")
    hf = _build("LlamaForCausalLM", "LlamaConfig", folder / "hf", 0, vocab_size=VOCAB, num_key_value_heads=2,
                hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    export_model(str(hf), folder / "out", say=lambda _: None)
    return folder / "out"


def test_compare_picks_fits_runs_and_draws(tiny_model, wide_model, tiny_data, tmp_path, capsys):
    common = {"task": "sst2", "data": str(tiny_data), "batch_size": 8, "train_examples": 48, "eval_every": 4,
              "lr": 1e-3, "max_length": 32}
    bp = {m: estimate(hf_config(m), 8, 32, method="bp", optimizer="sgd").total for m in (tiny_model, wide_model)}
    assert bp[tiny_model] < bp[wide_model]
    budget = (bp[tiny_model] + bp[wide_model]) // 2  # backprop fits the small model only; MeZO both
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
title = "tiny"
memory_budget = "{budget}B"
time_budget = 0.4
seeds = [0, 1]
common = {json.dumps(common).replace('": ', '" = ')}
[arms.mezo]
engine = "ort"
models = ["{tiny_model}", "{wide_model}"]
[arms.bp]
engine = "torch-bp"
optimizer = "sgd"
models = ["{tiny_model}", "{wide_model}"]
""")
    out = tmp_path / "cmp"
    assert main(["compare", str(spec), "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())["arms"]
    assert plan["mezo"]["model"] == str(wide_model) and plan["bp"]["model"] == str(tiny_model)
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    budget_mib = budget / 2**20
    for arm in ("mezo", "bp"):
        for seed in (0, 1):
            metrics = [json.loads(line) for line in (out / arm / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()]
            mine = [r for r in rows if r["arm"] == arm and r["seed"] == str(seed)]
            assert [int(r["step"]) for r in mine] == [m["step"] for m in metrics]
            assert [float(r["eval_accuracy"]) for r in mine] == [m["eval_accuracy"] for m in metrics]
            assert metrics[-1]["train_seconds"] >= 0.4
            over = max(m["peak_rss_mib"] for m in metrics) > budget_mib
            assert all(r["over_budget"] == str(over) for r in mine)
    with open(out / "summary.csv") as f:
        summary = {r["arm"]: r for r in csv.DictReader(f)}
    assert summary["bp"]["engine"] == "torch-bp" and summary["bp"]["seeds"] == "2"
    assert (out / "curves.png").stat().st_size > 5000
    steps_before = (out / "bp" / "seed-1" / "steps.jsonl").read_text()
    assert main(["compare", str(spec), "--out", str(out)]) == 0  # resumes: nothing left to run
    assert (out / "bp" / "seed-1" / "steps.jsonl").read_text() == steps_before


def test_compare_errors_are_one_line(tiny_model, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'memory_budget = "1MB"\ntime_budget = 1\n[arms.a]\nengine = "ort"\nmodels = ["{tiny_model}"]\n'
                    'task = "sst2"\n')
    for text, message in ((None, "no candidate fits 1MB"),
                          ('memory_budget = "lots"\ntime_budget = 1\n[arms.a]\nmodel = "x"\n', "bad memory size"),
                          ('time_budget = 1\n[arms.a]\nmodel = "x"\n', "missing setting 'memory_budget'"),
                          ('memory_budget = "1GB"\ntime_budget = 1\n[arms.a]\nengine = "jax"\nmodel = "x"\n',
                           "--engine"),
                          # an arm names a folder under --out, never a path out of it
                          ('memory_budget = "1GB"\ntime_budget = 1\n[arms."../../escaped"]\nmodel = "x"\n', "arms"),
                          ('memory_budget = "1GB"\ntime_budget = 1\n[arms."/tmp/abs"]\nmodel = "x"\n', "arms")):
        if text is not None:
            spec.write_text(text)
        capsys.readouterr()
        assert main(["compare", str(spec), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]  # nothing written, in --out or beside it


def test_wall_step_counts_steps_and_the_evaluations_before_them():
    from ortzo.recipes.compare import wall_step

    seconds = [1.0, 1.0, 1.0, 1.0]
    history = [{"step": 0, "eval_seconds": 0.5}, {"step": 2, "eval_seconds": 2.0}, {"step": 4, "eval_seconds": 9.0}]
    # after n steps the wall clock reads: 1.5, 2.5, 5.5, 6.5 (the eval after step 2 precedes step 3)
    assert [wall_step(seconds, history, t) for t in (0.4, 1.5, 2.5, 5.4, 5.5, 100)] == [0, 1, 2, 2, 3, 4]


def test_report_minutes_gives_the_whole_split_accuracy_of_the_weights_at_the_mark(tiny_model, tiny_data, tmp_path,
                                                                                 capsys):
    """The summary's accuracy at a mark equals a fresh run stopped at the mark's step: the
    weights rebuilt from the step log are the ones training had there."""
    common = {"task": "sst2", "template": "mezo", "data": str(tiny_data), "batch_size": 8, "train_examples": 48,
              "eval_every": 3, "eval_subset": 8, "lr": 2e-3, "max_length": 32, "clip": 30}
    spec = tmp_path / "spec.toml"

    def write(minutes):
        spec.write_text(f'memory_budget = "4GB"\ntime_budget = 1.5\nseeds = [0]\nreport_minutes = {minutes}\n'
                        f'common = {json.dumps(common).replace(chr(34) + ": ", chr(34) + " = ")}\n'
                        f'[arms.a]\nmodel = "{tiny_model}"\n[arms.b]\nmodel = "{tiny_model}"\n')

    write([])
    out = tmp_path / "cmp"
    assert main(["compare", str(spec), "--out", str(out), "--arms", "a"]) == 0
    assert not (out / "b").exists()
    metrics = [json.loads(line) for line in (out / "a" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    mid = [m for m in metrics if m["eval_examples"] == 8][len(metrics) // 3]  # a subset evaluation's step
    write([mid["wall_seconds"] / 60])  # the mark: right after that evaluation
    assert main(["compare", str(spec), "--out", str(out), "--arms", "a"]) == 0  # the run is done: it only reports
    with open(out / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert list(map(int, json.loads((out / "a" / "seed-0" / "marks.json").read_text()))) == [mid["step"]]
    ref = tmp_path / "ref"
    assert main(["finetune", str(tiny_model), "--out", str(ref), "--steps", str(mid["step"]), "--seed", "0",
                 *[a for k, v in common.items() if k != "eval_subset" for a in (f"--{k.replace('_', '-')}", str(v))]]) == 0
    want = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()][-1]
    assert want["step"] == mid["step"] and want["eval_examples"] == metrics[0]["eval_examples"] == 32
    key = f"acc_{mid['wall_seconds'] / 60:g}min"
    assert float(row[f"{key}_median"]) == pytest.approx(want["eval_accuracy"], abs=1e-4)
    assert row[f"{key}_min"] == row[f"{key}_max"] == row[f"{key}_median"]
    capsys.readouterr()
    assert main(["compare", str(spec), "--out", str(out), "--arms", "c"]) == 2
    assert "has no arm 'c'; its arms: a, b" in capsys.readouterr().err


def test_killing_compare_stops_its_run(tiny_model, tiny_data, tmp_path):
    """`kill` (SIGTERM) on compare also ends the finetune child it waits for: no orphan trains on
    (and holds the run folder's lock) after compare is gone."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from filelock import FileLock

    spec = tmp_path / "spec.toml"
    spec.write_text(f'memory_budget = "4GB"\ntime_budget = 600\nseeds = [0]\n'
                    f'[common]\ntask = "sst2"\ndata = "{tiny_data}"\nsteps = 100000\neval_every = 100000\n'
                    f'[arms.a]\nmodel = "{tiny_model}"\n')
    run = tmp_path / "cmp" / "a" / "seed-0"
    parent = subprocess.Popen([sys.executable, "-m", "ortzo.cli", "compare", str(spec), "--out", str(tmp_path / "cmp")],
                              start_new_session=True)  # its own process group: the cleanup below reaches an orphan
    try:
        deadline = time.monotonic() + 120
        while not ((run / "steps.jsonl").exists() and (run / "steps.jsonl").read_text().count("\n") >= 2):
            assert parent.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        with FileLock(run / ".lock", timeout=10):  # the child let go of the run
            steps = (run / "steps.jsonl").read_text()
            time.sleep(1.0)
            assert (run / "steps.jsonl").read_text() == steps  # and trains no more
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


def test_the_plotted_band_holds_each_seeds_accuracy_between_its_evaluations():
    """Two seeds evaluated at different seconds: at each minute the curve is the mean of the
    accuracies each seed last measured, the band their lowest and highest, up to where the
    shorter run ends. Values worked by hand."""
    from ortzo.run.plots import seed_band

    a = [{"train_seconds": s, "eval_accuracy": acc} for s, acc in ((0, 0.5), (60, 0.7), (150, 0.8))]
    b = [{"train_seconds": s, "eval_accuracy": acc} for s, acc in ((0, 0.4), (90, 0.9), (120, 0.6))]
    grid, mean, low, high = seed_band([a, b], points=5)  # minutes 0, 0.5, 1, 1.5, 2: b ends at 2
    assert grid.tolist() == [0, 0.5, 1, 1.5, 2]
    # a holds 0.5, 0.5, 0.7 (from minute 1), 0.7, 0.7; b holds 0.4, 0.4, 0.4, 0.9 (from 1.5), 0.6 (at 2)
    assert mean == pytest.approx([0.45, 0.45, 0.55, 0.8, 0.65])
    assert low == pytest.approx([0.4, 0.4, 0.4, 0.7, 0.6])
    assert high == pytest.approx([0.5, 0.5, 0.7, 0.9, 0.7])
