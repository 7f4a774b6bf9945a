"""Outputs are regular files: a symlink, a FIFO or a folder named as an output is refused in
one line and left as it was (renamed over, it would have become a file: as root, `--out
/dev/null` would replace the device node). A regular file is replaced atomically as before."""
from __future__ import annotations

import os
import stat

import pytest

import ortzo
from ortzo.cli import main
from ortzo.errors import OrtzoError
from ortzo.files import atomic_open


def _kinds(tmp_path):
    """Each kind of path an output must not replace, and how to tell it is unchanged."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    return {link: stat.S_ISLNK, fifo: stat.S_ISFIFO, folder: stat.S_ISDIR}, target


def test_an_output_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path):
    kinds, target = _kinds(tmp_path)
    for path, is_kind in kinds.items():
        with pytest.raises(OrtzoError, match="regular files"):
            with atomic_open(path, "w") as f:
                f.write("overwritten")
        assert is_kind(path.lstat().st_mode)
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "folder", "link", "precious.txt"]  # no temp left
    plain = tmp_path / "plain.txt"
    plain.write_text("old")
    with atomic_open(plain, "w") as f:
        f.write("new")
    assert plain.read_text() == "new"


def test_model_save_and_the_memory_rows_refuse_a_symlink_in_one_line(tiny_model, tmp_path, capsys):
    kinds, target = _kinds(tmp_path)
    model = ortzo.open(tiny_model)
    for path, is_kind in kinds.items():
        with pytest.raises(OrtzoError, match="regular files"):
            model.save(path)
        assert is_kind(path.lstat().st_mode)
    link = tmp_path / "link"
    assert main(["bench", str(tiny_model), "--memory", "1x8", "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "symlink" in err
    assert link.is_symlink() and target.read_text() == "keep me"
