"""The run folder's pieces on their own (no ONNX): whole-line logs, atomic checkpoints, the
lock, and what a crash leaves behind."""
from __future__ import annotations

import json

import numpy as np
import pytest
from filelock import FileLock

from ortzo import jsonl
from ortzo.errors import OrtzoError
from ortzo.files import atomic_open, write_json
from ortzo.model.manifest import Manifest, Parameter
from ortzo.model.weights import WeightStore
from ortzo.optim import steplog
from ortzo.optim.directions import Directions
from ortzo.optim.mezo import StepRecord, mezo_step
from ortzo.run import checkpoint
from ortzo.run.folder import RunFolder


def _record(step: int) -> StepRecord:
    return StepRecord(step, 100 + step, (0.5 * step,), 1e-3, 1e-3, 0.0, (1.0,), (0.9,))


def test_writer_appends_whole_lines_and_reader_returns_them(tmp_path):
    path = tmp_path / "log.jsonl"
    with jsonl.Writer(path) as w:
        w.append({"a": 1})
        w.append({"b": [1, 2]})
    assert path.read_bytes() == b'{"a": 1}\n{"b": [1, 2]}\n'
    assert jsonl.read(path) == ([{"a": 1}, {"b": [1, 2]}], b"")


@pytest.mark.parametrize("tail", [b'{"b": 2', b'{"b": 2}', b"\0\0\0"])
def test_a_torn_tail_is_not_a_row_reading_leaves_it_and_writing_cuts_it(tmp_path, tail):
    """A last line without its newline, even one that parses, was cut short by a crash."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a": 1}\n' + tail)
    assert jsonl.read(path) == ([{"a": 1}], tail)
    assert path.read_bytes() == b'{"a": 1}\n' + tail  # reading changed nothing
    with jsonl.Writer(path) as w:
        assert w.dropped == tail
        w.append({"c": 3})
    assert path.read_bytes() == b'{"a": 1}\n{"c": 3}\n'
    assert str(len(tail)) in jsonl.torn_note(path, tail)


def test_a_corrupt_complete_line_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(OrtzoError, match=r"log.jsonl:2: corrupt"):
        jsonl.read(path)


def test_a_failed_append_leaves_no_fragment(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    with jsonl.Writer(path) as w:
        w.append({"a": 1})

        def half_then_full_disk(fd, data):
            import os
            os.write(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(jsonl, "_write", half_then_full_disk)
        with pytest.raises(OSError):
            w.append({"b": "x" * 100})
    assert path.read_bytes() == b'{"a": 1}\n'


def test_step_log_checks_order_and_keeps_seconds(tmp_path):
    path = tmp_path / "steps.jsonl"
    with steplog.StepLog(path) as log:
        for t in range(3):
            log.append_step(_record(t), 0.25 * t)
    got = steplog.read(path)
    assert got.records == [_record(t) for t in range(3)] and got.seconds == [0.0, 0.25, 0.5] and got.torn == b""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    with pytest.raises(OrtzoError, match="step 2 found where step 1"):
        steplog.read(path)
    path.write_text(lines[0] + "\n" + '{"step": 1}\n')
    with pytest.raises(OrtzoError, match="corrupt step record"):
        steplog.read(path)


def test_atomic_write_leaves_the_old_file_when_it_fails(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _store(values: list[float]) -> WeightStore:
    """A two-parameter store with no model folder behind it."""
    params = (Parameter("a.weight", (2, 2), "float32", 0), Parameter("b.bias", (3,), "float32", 64))
    m = Manifest(graph="g", weights="w", weights_sha256="", weights_bytes=76, parameters=params, inputs=(),
                 outputs=("scores",), tokenizer={})
    store = WeightStore(m, np.zeros(76, np.uint8))
    store.arrays["a.weight"][:] = np.reshape(values[:4], (2, 2))
    store.arrays["b.bias"][:] = values[4:7]
    return store


def _loader(initial: WeightStore):
    def load(weights=None, sha=None) -> WeightStore:
        if weights is None:
            return _store([*initial.arrays["a.weight"].ravel(), *initial.arrays["b.bias"]])
        return WeightStore.load(weights.parent, initial.manifest, weights, sha)
    return load


def test_checkpoints_sort_by_number_and_keep_the_newest(tmp_path):
    store = _store([1, 2, 3, 4, 5, 6, 7])
    for step in (9_999_999, 10_000_000, 10_000_001):
        checkpoint.save(tmp_path, store, step, keep=2)
    assert checkpoint.saved(tmp_path) == [10_000_000, 10_000_001]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_half_written_checkpoint_is_not_a_checkpoint(tmp_path):
    store = _store([1, 2, 3, 4, 5, 6, 7])
    checkpoint.save(tmp_path, store, 4)
    (tmp_path / "checkpoints" / ".step-0000008.tmp").mkdir()  # a killed save
    (tmp_path / "checkpoints" / "step-0000009").mkdir()  # no checkpoint.json
    assert checkpoint.saved(tmp_path) == [4]


def test_restore_is_the_checkpoint_plus_the_replayed_records(tmp_path):
    initial = _store([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    live = _store([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    buffers_of = lambda s: s.trainable(list(s.arrays))  # noqa: E731
    d = Directions(threads=1)
    records, states = [], {0: [b.copy() for b in buffers_of(live)]}
    for t in range(6):
        bufs = buffers_of(live)
        records.append(mezo_step(bufs, lambda: float(sum(np.sum(b ** 2) for b in bufs)), step=t, seed=t, eps=1e-3,
                                 lr=0.1, directions=d, weight_decay=0.5, decay=[True, False]))
        states[t + 1] = [b.copy() for b in bufs]
        if t + 1 == 3:
            checkpoint.save(tmp_path, live, 3)
    for at in (0, 2, 3, 5, 6):
        got = checkpoint.restore(tmp_path, records, at, _loader(initial), buffers_of, d)
        for a, b in zip(buffers_of(got), states[at]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(OrtzoError, match="has 6 steps"):
        checkpoint.restore(tmp_path, records, 7, _loader(initial), buffers_of, d)


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    store = _store([1, 2, 3, 4, 5, 6, 7])
    folder = checkpoint.save(tmp_path, store, 2)
    (folder / "weights.bin").write_bytes(b"\0" * 76)
    with pytest.raises(OrtzoError, match="checksum mismatch"):
        checkpoint.load(tmp_path, 2, _loader(store))
    write_json(folder / "checkpoint.json", {"steps_applied": 3, "sha256": "x"})
    with pytest.raises(OrtzoError, match="corrupt checkpoint"):
        checkpoint.load(tmp_path, 2, _loader(store))


def test_the_lock_admits_one_process(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run.locked(create=True):
        with pytest.raises(OrtzoError, match="in use by another ortzo process"), RunFolder(run.path).locked():
            pass
        run.write_config({"recorded": {}})
    with FileLock(run.path / ".lock", timeout=0), pytest.raises(OrtzoError, match="in use"):
        with run.locked():
            pass
    with run.locked():  # released again
        pass


def test_a_failed_start_leaves_no_folder_and_a_run_is_never_removed(tmp_path):
    run = RunFolder(tmp_path / "new")
    with pytest.raises(OrtzoError, match="bad"), run.locked(create=True):
        raise OrtzoError("bad input found late")
    assert not run.path.exists()
    with pytest.raises(OrtzoError, match="bad"), run.locked(create=True):
        run.write_config({"recorded": {}})
        raise OrtzoError("bad after the config")
    assert run.holds_run()


def test_new_runs_need_an_empty_folder_but_ignore_what_a_killed_writer_left(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / ".config.json.abc.tmp").write_text("half")
    (tmp_path / ".lock").write_text("")
    with run.locked():
        run.check_new()
        run.clean_stale()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OrtzoError, match="not empty"), run.locked():
        run.check_new()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    run.write_config({"recorded": {}})
    with pytest.raises(OrtzoError, match="already holds a run"), run.locked():
        run.check_new()


def test_a_corrupt_run_config_is_a_clear_error(tmp_path):
    run = RunFolder(tmp_path)
    run.config.write_text("{ nope")
    with pytest.raises(OrtzoError, match="corrupt run config"):
        run.read_config()
    with pytest.raises(OrtzoError, match="holds no run"):
        RunFolder(tmp_path / "none").read_config()
