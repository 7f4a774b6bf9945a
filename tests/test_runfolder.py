"""The run folder's pieces on their own (no ONNX): whole-line logs, atomic checkpoints, the
lock, and what a crash leaves behind."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from filelock import FileLock

from ortzo import jsonl
from ortzo.errors import OrtzoError
from ortzo.files import atomic_open, sha256_file, write_json
from ortzo.model.manifest import Manifest, Parameter
from ortzo.model.weights import WeightStore
from ortzo.optim import steplog
from ortzo.optim.directions import Directions
from ortzo.optim.mezo import StepRecord, decay_mask, mezo_step, replay
from ortzo.run import checkpoint
from ortzo.run.folder import RunFolder


def _record(step: int) -> StepRecord:
    return StepRecord(step, 100 + step, (0.5 * step,), 1e-3, 1e-3, 0.0, (1.0,), (0.9,))


def test_writer_appends_whole_lines_and_reader_returns_them(tmp_path):
    path = tmp_path / "log.jsonl"
    assert jsonl.read(path) == ([], b"")
    with jsonl.Writer(path) as w:
        assert w.dropped == b""
        w.append({"a": 1})
        w.append({"b": [1, 2]})
    assert path.read_bytes() == b'{"a": 1}\n{"b": [1, 2]}\n'
    assert jsonl.read(path) == ([{"a": 1}, {"b": [1, 2]}], b"")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any other file the user writes


@pytest.mark.parametrize("head", [b"", b'{"a": 1}\n{"a": 2}\n'])
@pytest.mark.parametrize("tail", [b'{"b": 2', b'{"b": 2}', b"\0\0\0", b"{"])
def test_a_torn_tail_is_not_a_row_reading_leaves_it_and_writing_cuts_it(tmp_path, head, tail):
    """A last line without its newline, even one that parses, was cut short by a crash."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(head + tail)
    assert jsonl.read(path) == ([json.loads(line) for line in head.splitlines()], tail)
    assert path.read_bytes() == head + tail  # reading changed nothing
    with jsonl.Writer(path) as w:
        assert w.dropped == tail
        w.append({"c": 3})
    assert path.read_bytes() == head + b'{"c": 3}\n'
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


def test_write_json_is_indented_and_sha256_file_hashes_the_bytes(tmp_path):
    write_json(tmp_path / "a.json", {"k": [1, 2]})
    assert (tmp_path / "a.json").read_text() == json.dumps({"k": [1, 2]}, indent=1) + "\n"
    data = os.urandom(5000)
    (tmp_path / "b").write_bytes(data)
    assert sha256_file(tmp_path / "b") == hashlib.sha256(data).hexdigest()


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
    path.write_text(json.dumps(_record(0).to_json()) + "\n")  # a record without its time: 0 s
    assert steplog.read(path).seconds == [0.0]


def test_atomic_write_leaves_the_old_file_when_it_fails(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _store(values: list[float], dtype: str = "float32") -> WeightStore:
    """A two-parameter store with no model folder behind it."""
    size = 2 if dtype == "float16" else 4
    params = (Parameter("a.weight", (2, 2), dtype, 0), Parameter("b.bias", (3,), dtype, 64))
    m = Manifest(graph="g", weights="w", weights_sha256="", weights_bytes=64 + 3 * size, parameters=params,
                 inputs=(), outputs=("scores",), tokenizer={})
    store = WeightStore(m, np.zeros(m.weights_bytes, np.uint8))
    store.arrays["a.weight"][:] = np.reshape(values[:4], (2, 2))
    store.arrays["b.bias"][:] = values[4:7]
    return store


def _loader(initial: WeightStore):
    def load(weights, sha) -> WeightStore:
        if weights is None:
            return _store([*initial.arrays["a.weight"].ravel(), *initial.arrays["b.bias"]])
        return WeightStore.load(weights.parent, initial.manifest, weights, sha)
    return load


def test_checkpoints_sort_by_number_and_keep_the_newest(tmp_path):
    store = _store([1, 2, 3, 4, 5, 6, 7])
    for step in (9_999_999, 10_000_000, 10_000_001):
        checkpoint.save(tmp_path, store, step)  # keeps 2 by default
    assert checkpoint.saved(tmp_path) == [10_000_000, 10_000_001]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    checkpoint.save(tmp_path, store, 10_000_002, keep=5)
    checkpoint.prune(tmp_path, 1)  # as a resume does
    assert checkpoint.saved(tmp_path) == [10_000_002]


def test_saving_a_step_again_replaces_it_and_its_leftovers(tmp_path):
    checkpoint.save(tmp_path, _store([1, 2, 3, 4, 5, 6, 7]), 4)
    (tmp_path / "checkpoints" / ".step-0000004.tmp").mkdir()  # what a killed save of step 4 left
    (tmp_path / "checkpoints" / ".step-0000004.tmp" / "weights.bin").write_bytes(b"half")
    second = _store([7, 6, 5, 4, 3, 2, 1])
    checkpoint.save(tmp_path, second, 4, keep=5)
    got, saved = checkpoint.load(tmp_path, 4, _loader(second))
    np.testing.assert_array_equal(got.arrays["b.bias"], [3, 2, 1])
    assert saved.folder == tmp_path / "checkpoints" / "step-0000004" and saved.meta["steps_applied"] == 4
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000004"]


def test_an_engines_extra_state_goes_into_the_checkpoint(tmp_path):
    def extra(folder):
        (folder / "optimizer.pt").write_bytes(b"state")
        return {"optimizer_sha256": "abc"}

    folder = checkpoint.save(tmp_path, _store([1, 2, 3, 4, 5, 6, 7]), 5, extra=extra)
    assert (folder / "optimizer.pt").read_bytes() == b"state"
    _, saved = checkpoint.load(tmp_path, 5, _loader(_store([0] * 7)))
    assert saved.meta["optimizer_sha256"] == "abc" and (saved.folder / "optimizer.pt").is_file()


def test_fp16_checkpoints_carry_their_fp32_masters(tmp_path):
    store = _store([1, 2, 3, 4, 5, 6, 7], "float16")
    masters = store.trainable(["a.weight"])
    masters[0] += np.float32(1e-4)  # below fp16 resolution at these values
    checkpoint.save(tmp_path, store, 3)
    got, _ = checkpoint.load(tmp_path, 3, _loader(store))
    np.testing.assert_array_equal(got.masters["a.weight"], masters[0])
    np.testing.assert_array_equal(got.arrays["a.weight"], masters[0].astype(np.float16))
    assert "b.bias" not in got.masters


def test_a_half_written_checkpoint_is_not_a_checkpoint(tmp_path):
    store = _store([1, 2, 3, 4, 5, 6, 7])
    checkpoint.save(tmp_path, store, 4)
    (tmp_path / "checkpoints" / ".step-0000008.tmp").mkdir()  # a killed save
    (tmp_path / "checkpoints" / "step-0000009").mkdir()  # no checkpoint.json
    assert checkpoint.saved(tmp_path) == [4]


class _Replayer:
    """The least that restore opens: MeZO's replay over all of a store's buffers."""

    def __init__(self, store, saved, directions):
        self.store, self.saved, self.directions = store, saved, directions

    def replay(self, records):
        buffers = self.store.trainable(list(self.store.arrays))
        replay(buffers, records, self.directions, decay_mask(buffers))


def _opener(d):
    return lambda store, saved: _Replayer(store, saved, d)


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
        got = checkpoint.restore(tmp_path, records, at, _loader(initial), _opener(d)).store
        for a, b in zip(buffers_of(got), states[at]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(OrtzoError, match="has 6 steps"):
        checkpoint.restore(tmp_path, records, 7, _loader(initial), _opener(d))


def test_restore_starts_from_the_newest_checkpoint_at_or_before_the_step(tmp_path):
    """Trusted, not recomputed: a checkpoint marked with other values shows which one was read."""
    initial = _store([0.0] * 7)
    records = []
    w = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    d = Directions(threads=1)
    for t in range(5):
        records.append(mezo_step(w, lambda: float(np.sum(w[0])), step=t, seed=t, eps=1e-3, lr=0.1, directions=d))
    marked = _store([9.0] * 7)
    checkpoint.save(tmp_path, marked, 3, keep=5)
    checkpoint.save(tmp_path, _store([5.0] * 7), 4, keep=5)
    got = checkpoint.restore(tmp_path, records, 3, _loader(initial), _opener(d))
    assert (got.store.arrays["a.weight"] == 9).all() and got.saved.meta["steps_applied"] == 3
    got = checkpoint.restore(tmp_path, records, 2, _loader(initial), _opener(d))
    assert got.saved is None
    got = got.store
    buffers = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]

    replay(buffers, records[:2], d)
    np.testing.assert_array_equal(got.arrays["a.weight"], buffers[0])


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
    for name in ("notes.txt", "a", "b", "c"):
        (tmp_path / name).write_text("mine")
    with pytest.raises(OrtzoError, match=r"not empty \(it has a, b, c, notes.txt\)"), run.locked():
        run.check_new()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    run.write_config({"recorded": {}})
    with pytest.raises(OrtzoError, match="already holds a run"), run.locked():
        run.check_new()
    (tmp_path / "checkpoints" / ".step-0000002.tmp").mkdir(parents=True)  # a killed checkpoint save
    with run.locked():
        run.clean_stale()
    assert not any((tmp_path / "checkpoints").iterdir())


def test_run_config_round_trip_and_corrupt_ones(tmp_path):
    run = RunFolder(tmp_path)
    assert (run.config, run.steps, run.metrics, run.curve) == tuple(
        tmp_path / n for n in ("config.json", "steps.jsonl", "metrics.jsonl", "curve.png"))
    run.write_config({"lr": 0.1, "recorded": {"task": "é"}})
    assert run.read_config() == {"lr": 0.1, "recorded": {"task": "é"}}
    for text in ("{ nope", "[1, 2]", '{"lr": 0.1}', '{"recorded": 3}'):
        run.config.write_text(text)
        with pytest.raises(OrtzoError, match="corrupt run config"):
            run.read_config()
    with pytest.raises(OrtzoError, match="holds no run"):
        RunFolder(tmp_path / "none").read_config()
