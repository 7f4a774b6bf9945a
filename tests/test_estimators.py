"""`--estimator fzoo` end to end: a run's step log rebuilds its checkpoints exactly, and its
settings are checked before anything is written."""
from __future__ import annotations

import json

import pytest

from ortzo.cli import main
from ortzo.engines.base import record_type
from ortzo.model.manifest import Manifest
from ortzo.model.weights import WeightStore
from ortzo.optim import steplog
from ortzo.optim.directions import Directions
from ortzo.optim.mezo import decay_mask, replay
from ortzo.run import checkpoint

RUN = ["--task", "sst2", "--steps", "4", "--batch-size", "4", "--train-examples", "16", "--eval-examples", "8",
       "--checkpoint-every", "2", "--keep-checkpoints", "3"]


def test_an_fzoo_run_replays_from_its_log(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(out), *RUN,
                 "--estimator", "fzoo", "--n-directions", "3", "--lr", "1e-5", "--weight-decay", "0.1"]) == 0
    assert "fzoo with 3 x rademacher-counter directions" in capsys.readouterr().err
    log = steplog.read(out / "steps.jsonl", record_type("ort"))
    assert [r.estimator for r in log.records] == ["fzoo"] * 4
    assert all(len(r.loss_plus) == 3 and len(r.loss_minus) == 1 and r.norm > 0 for r in log.records)
    two, four = (out / "checkpoints" / checkpoint.name(k) for k in (2, 4))
    meta = json.loads((two / checkpoint.META).read_text())
    store = WeightStore.load(tiny_model, Manifest.load(tiny_model), two / checkpoint.WEIGHTS, meta["sha256"])
    buffers = store.trainable(list(store.arrays))
    replay(buffers, log.records[2:], Directions("rademacher-counter"), decay_mask(buffers))
    assert store.buffer.tobytes() == (four / checkpoint.WEIGHTS).read_bytes() != (two / checkpoint.WEIGHTS).read_bytes()


@pytest.mark.parametrize("extra,message", [
    (["--estimator", "fzoo"], "--estimator fzoo needs --n-directions of 2 or more"),
    (["--estimator", "fzoo", "--n-directions", "4", "--clip", "5"], "--clip: not used by --estimator fzoo"),
    (["--estimator", "fzoo", "--n-directions", "4", "--engine", "torch-mezo"], "--estimator: not used by --engine"),
    (["--estimator", "fzoo", "--n-directions", "4", "--clip", "none", "--adaptive", "meazo"],
     "--adaptive: not used by --estimator fzoo"),
    (["--engine", "torch-bp", "--adaptive", "meazo"], "--adaptive: not used by --engine torch-bp"),
    (["--adaptive", "adam"], "--adaptive"),
])
def test_bad_estimator_settings_are_one_line(tiny_model, tiny_data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(out), *RUN, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
