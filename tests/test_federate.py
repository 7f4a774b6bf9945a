"""Fleets on Flower's simulation engine: the shards, a device's probe, and a whole run whose
devices all hold the same weights after every round, whose global log is an ordinary run that
another process replays to the same scores, and whose messages stay within a few KB."""
from __future__ import annotations

import csv
import json
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ortzo.cli import main
from ortzo.config import RunConfig
from ortzo.fleet.replica import Replica
from ortzo.fleet.plan import Fleet, shards
from ortzo.recipes.bake import weights_at
from ortzo.tasks.objective import loss

from fleet_checks import check_hashes, read_log, read_rows

CLIENTS, ROUNDS = 3, 3
CONTRACT = ["round", "clients", "bytes_up", "bytes_down", "eval_accuracy", "weights_sha256"]


def _cfg(tiny_model, tiny_data) -> RunConfig:
    return RunConfig.build({"model": str(tiny_model), "task": "sst2", "data": str(tiny_data), "batch_size": 4,
                            "lr": 5e-3, "train_examples": 48, "eval_examples": 16})


def test_shards_are_disjoint_cover_everything_and_dirichlet_skews_the_labels():
    labels = [i % 2 for i in range(400)]
    iid = shards(labels, 8)
    assert sorted(i for s in iid for i in s) == list(range(400)) and {len(s) for s in iid} == {50}
    skewed = shards(labels, 8, alpha=0.1, seed=3)
    assert sorted(i for s in skewed for i in s) == list(range(400)) and all(skewed)
    assert skewed == shards(labels, 8, alpha=0.1, seed=3) and skewed != shards(labels, 8, alpha=0.1, seed=4)

    def majority(parts):  # mean share of each shard's most common label
        return np.mean([Counter(labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts])
    assert majority(iid) < 0.65 < 0.9 < majority(skewed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 2000), min_size=1, max_size=16), st.integers(0, 64))
def test_a_steps_batch_is_dealt_in_proportion_to_the_shards(sizes, extra):
    """Every device forwards at least one example, the parts make up the batch, a bigger shard
    never gets fewer, and a part is within one example of its proportional quota wherever the
    quotas are at least one."""
    batch = len(sizes) + extra
    parts = Fleet(len(sizes), 1).shares(batch, sizes)
    assert sum(parts) == batch and min(parts) >= 1
    by_size = sorted(zip(sizes, parts))
    assert all(a[1] <= b[1] for a, b in zip(by_size, by_size[1:]) if a[0] < b[0])
    quota = [batch * n / sum(sizes) for n in sizes]
    if min(quota) >= 1:
        assert all(abs(p - q) < 1 for p, q in zip(parts, quota))
    assert Fleet(len(sizes), 1, merge="append").shares(batch, sizes) == [batch] * len(sizes)


def _spsa(replica: Replica, seed: int, batch, eps: float) -> tuple[float, float]:
    """L(w + eps z) and L(w - eps z) on `batch` at the weights `replica` holds, computed here;
    the weights are left as they were, byte for byte."""
    engine, kept = replica.engine, [b.copy() for b in replica.engine.buffers]
    engine.directions.add(engine.buffers, seed, eps)  # w + eps z, then w + eps z - 2 eps z
    plus = loss(batch.candidate_scores(engine.score(batch.feeds)), batch.labels)
    engine.directions.add(engine.buffers, seed, -2 * eps)
    minus = loss(batch.candidate_scores(engine.score(batch.feeds)), batch.labels)
    for b, k in zip(engine.buffers, kept):
        np.copyto(b, k)
    return plus, minus


@pytest.mark.parametrize("merge, slots, batch_of, batch_size", [
    ("average", (0, 1), lambda slot: slot, 2),  # every device probes slot r on its share (4 // 3 + 1) of the batch
    ("append", (0, CLIENTS), lambda slot: slot // CLIENTS, 4)])  # device 0's slots in rounds 0 and 1: whole batches
def test_a_probe_is_spsa_at_the_shared_weights_and_leaves_them_bit_for_bit(tiny_model, tiny_data, merge, slots,
                                                                            batch_of, batch_size):
    """A round's MeZO step on the device's own batch: its record's projected gradient is
    (L(w + eps z) - L(w - eps z)) / 2 eps at the weights the device holds, which it holds
    again afterwards, byte for byte; so the next round's probe starts from them too."""
    cfg = _cfg(tiny_model, tiny_data)
    replica = Replica(cfg, Fleet(CLIENTS, ROUNDS, merge=merge), 0)
    before = [b.copy() for b in replica.engine.buffers]
    for slot in slots:
        (record,) = replica.probe([slot], lr=0.5)
        assert all(np.array_equal(a, b) for a, b in zip(before, replica.engine.buffers))
        batch = replica.setup.train_batch(batch_of(slot))  # its round's batch of its own examples
        assert len(batch.labels) == batch_size and set(batch.labels.tolist()) <= {0, 1}
        plus, minus = _spsa(replica, record.seed, batch, cfg.eps)
        assert (record.loss_plus[0], record.loss_minus[0]) == (plus, minus)
        assert record.grads[0] == pytest.approx((plus - minus) / (2 * cfg.eps), rel=1e-9)


def test_a_batch_too_small_to_deal_out_is_one_line(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "fleet"
    assert main(["federate", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--clients", "8",
                 "--rounds", "1", "--batch-size", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 4" in err and "--merge append" in err and not out.exists()


def _argv(tiny_model, tiny_data, out, *more: str) -> list[str]:
    return ["federate", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--clients", str(CLIENTS),
            "--rounds", str(ROUNDS), "--alpha", "0.5", "--eval-every-rounds", "1", "--batch-size", "4",
            "--lr", "5e-3", "--train-examples", "48", "--eval-examples", "16", "--out", str(out), "--quiet", *more]


def _federate(argv: list[str]) -> dict:
    """Run `ortzo federate` here; what it printed. The process environment must come back as it
    was: Ray sets PYTHONPATH and more for its workers, which a later subprocess must not inherit."""
    import contextlib
    import io

    printed, environment = io.StringIO(), dict(os.environ)
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    assert dict(os.environ) == environment
    return json.loads(printed.getvalue())


@pytest.fixture(scope="module")
def fleet_run(tiny_model, tiny_data, tmp_path_factory):
    """A 3-device, 3-round fleet (estimates averaged) on the simulation engine: (its run folder,
    what it printed)."""
    out = tmp_path_factory.mktemp("fleet") / "run"
    return out, _federate(_argv(tiny_model, tiny_data, out))


def _seed(step: int) -> int:
    """The seed a single-device run of seed 0 draws at `step`."""
    return int(np.random.SeedSequence([0, step]).generate_state(1)[0])


def test_a_simulated_fleet_shares_one_set_of_weights_and_its_log_is_a_run(fleet_run, tiny_model, tiny_data, capsys):
    out, result = fleet_run
    recorded = json.loads((out / "config.json").read_text())["recorded"]["fleet"]
    assert recorded == {"clients": CLIENTS, "rounds": ROUNDS, "per_round": 1, "alpha": 0.5, "eval_every": 1,
                        "merge": "average"}
    rows = read_rows(out)
    assert CONTRACT == list(rows[0])[:6] and [int(r["round"]) for r in rows] == [1, 2, 3]
    assert all(int(r["clients"]) == CLIENTS for r in rows)
    per_device = [max(int(r["bytes_up"]), int(r["bytes_down"])) / CLIENTS for r in rows]
    assert max(per_device[1:]) <= 4096 and per_device[0] <= 8192  # the first carries the run's settings
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(ROUNDS)) and [r["seed"] for r in log] == list(map(_seed, range(3)))
    # the recipe's linear decay spans the run's ROUNDS steps, one a round
    assert [r["lr"] for r in log] == pytest.approx([5e-3 * (1 - r / ROUNDS) for r in range(ROUNDS)], rel=1e-12)
    check_hashes(out, tiny_model, rows)
    assert result["weights_sha256"] == rows[-1]["weights_sha256"]
    # round r's step is the fleet's estimate along slot r's direction at the weights of round r: the
    # devices' (L+ - L-) / 2 eps on their own batches, weighted by their examples, computed here
    cfg, fleet = _cfg(tiny_model, tiny_data), Fleet(CLIENTS, ROUNDS, alpha=0.5)
    devices = [Replica(cfg, fleet, k) for k in range(CLIENTS)]
    assert sum(d.examples for d in devices) == 48 and len({d.examples for d in devices}) > 1
    # the step's batch of 4 dealt in proportion to the shards of 1, 22 and 25 (quotas 0.08, 1.83, 2.08)
    assert sorted(zip((d.examples for d in devices), (len(d.setup.train_batch(0).labels) for d in devices))) == \
        [(1, 1), (22, 1), (25, 2)]
    from ortzo.optim.mezo import StepRecord

    for r, step in enumerate(log):
        estimates = []
        for d in devices:
            plus, minus = _spsa(d, _seed(r), d.setup.train_batch(r), cfg.eps)
            estimates.append((d.examples, (plus - minus) / (2 * cfg.eps), (plus + minus) / 2))
            d.catch_up([StepRecord.from_json(step)])
        n = sum(e for e, _, _ in estimates)
        assert step["grads"][0] == pytest.approx(sum(e * g for e, g, _ in estimates) / n, rel=1e-9, abs=1e-12)
        assert np.mean(step["loss_plus"] + step["loss_minus"]) == pytest.approx(
            sum(e * m for e, _, m in estimates) / n, rel=1e-9)
    # another process's replay of the run scores what the server scored
    assert main(["eval", str(out), "--quiet"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert (scored["accuracy"], scored["loss"]) == (float(rows[-1]["eval_accuracy"]), float(rows[-1]["eval_loss"]))


def test_appended_records_are_each_devices_own_steps(tiny_model, tiny_data, tmp_path):
    """--merge append: round r's device k takes slot r N + k with that slot's seed; the log holds
    N steps a round, and every device ends each round with the weights the log gives."""
    out = tmp_path / "run"
    result = _federate(_argv(tiny_model, tiny_data, out, "--merge", "append", "--rounds", "2"))
    rows, log = read_rows(out), read_log(out)
    assert [int(r["steps"]) for r in rows] == [CLIENTS, 2 * CLIENTS] and result["steps"] == 2 * CLIENTS
    assert [r["seed"] for r in log] == list(map(_seed, range(2 * CLIENTS)))
    # N steps a round, all at the round's lr: the linear decay over the run's 2 N steps
    assert [r["lr"] for r in log] == pytest.approx([5e-3 * (1 - (s // CLIENTS) / 2) for s in range(2 * CLIENTS)],
                                                   rel=1e-12)
    assert len({tuple(r["grads"]) for r in log}) == 2 * CLIENTS  # on different devices' batches
    check_hashes(out, tiny_model, rows)


def test_a_fleet_trains_lora_over_a_frozen_int4_base(tiny_model, tiny_data, tmp_path):
    """The quantized base with adapters out: the devices replay and probe the LoRA factors and
    vectors of an int4 folder, and every round's hash is that of the weights its log gives."""
    from ortzo.model.frozen import freeze
    from ortzo.model.lora import LoraSpec
    from ortzo.model.quantize import QuantSpec

    base = tmp_path / "int4-lora"
    manifest = freeze(tiny_model, base, QuantSpec(4, 16, accuracy_level=0), LoraSpec(r=2, alpha=2))
    out = tmp_path / "run"
    argv = _argv(base, tiny_data, out, "--params", "all", "--rounds", "2")
    assert _federate(argv)["steps"] == 2
    rows = read_rows(out)
    assert [int(r["clients"]) for r in rows] == [CLIENTS, CLIENTS]
    check_hashes(out, base, rows, every=True)
    _, store, names = weights_at(out)
    assert sorted(names) == sorted(p.name for p in manifest.parameters) and any("lora_B" in n for n in names)
    assert all(np.abs(store.arrays[n]).max() > 0 for n in names if "lora_B" in n)  # B moved off its zero start


def test_a_restarted_server_resumes_from_the_global_log(fleet_run, tiny_model, tiny_data, tmp_path, capsys):
    """Killed after appending the last round's records but before its row: --resume writes the
    row from the log (no step twice, the same weights) and the devices confirm them."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(fleet_run[0], out)
    rows = read_rows(out)
    with (out / "rounds.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:-1])
    steps = (out / "steps.jsonl").read_bytes()
    assert main(_argv(tiny_model, tiny_data, out) + ["--resume"]) == 0
    again = read_rows(out)
    assert (out / "steps.jsonl").read_bytes() == steps and len(again) == ROUNDS
    assert again[-1]["weights_sha256"] == rows[-1]["weights_sha256"] and again[-1]["steps"] == rows[-1]["steps"]
    more = _argv(tiny_model, tiny_data, out) + ["--resume"]
    more[more.index("--rounds") + 1] = "9"
    assert main(more) == 2 and "other settings" in capsys.readouterr().err  # its settings are the run's


def test_a_corrupt_rounds_file_is_one_line_and_nothing_is_written(fleet_run, tiny_model, tiny_data, tmp_path,
                                                                   capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(fleet_run[0], out)
    (out / "rounds.csv").write_text("round,steps\n1,three\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(_argv(tiny_model, tiny_data, out) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt" in err and "rounds.csv" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_federate_sets_its_own_steps_and_refuses_them_in_one_line(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "fleet"
    assert main(["federate", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--clients", "2",
                 "--rounds", "1", "--steps", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps" in err and not out.exists()


def test_the_flower_apps_run_config_is_checked_before_anything_is_written(tiny_model, tiny_data, tmp_path):
    """The ServerApp `flwr run` starts: `out` is required, `resume` must be a boolean (the
    string "false" once read as true), and unknown or fixed settings are one line; nothing is
    written."""
    from types import SimpleNamespace

    from ortzo.errors import OrtzoError
    from ortzo.fleet import app

    out = tmp_path / "fleet"
    base = {"model": str(tiny_model), "data": str(tiny_data), "clients": 2, "rounds": 1}
    for config, message in (({}, "`out`"), ({"out": str(out), "resume": "false"}, "true or false"),
                            ({"out": str(out), "steps": 5}, "--steps"), ({"out": str(out), "colour": 1}, "colour")):
        with pytest.raises(OrtzoError, match=message):
            app.main(None, SimpleNamespace(run_config=base | config))
    assert not out.exists()
