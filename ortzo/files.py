"""Atomic writes and checksums: a crash or a bad input never leaves half a file behind.

A write goes to a temporary file beside its target (named `.NAME.*.tmp`, so a folder's owner
can recognise and remove what a killed writer left), is fsynced, renamed over the target,
and the folder is fsynced so the rename itself survives a power cut.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import OrtzoError

TMP_SUFFIX = ".tmp"
READ_BLOCK = 1 << 24


def check_target(path: Path) -> None:
    """An output replaces a regular file or nothing: renamed over a symlink, a FIFO or a device
    (`/dev/null` as root), it would replace the link or the device node with a file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise OrtzoError(f"{path} is {kind}: ortzo writes its outputs as regular files (name a new file, or "
                         "remove it first)")


def check_output_folder(out: Path, force: bool, reads: Iterable[Path], holds: str) -> None:
    """`out` may become a command's output folder (built beside it, then renamed over it): absent
    or empty, or with `force` an earlier output of the command, which holds `holds`; never a
    folder of other files (--force once deleted whatever it was given), nor one that is or holds
    a path the command reads (an export into its own source deleted the source)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OrtzoError(f"--out {out} is not a folder")
    for p in reads:
        if p.resolve().is_relative_to(out.resolve()):
            raise OrtzoError(f"{p} lies inside --out {out}: replacing the folder would delete it; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OrtzoError(f"{out} exists and is not empty; pass --force to replace it")
        if not (out / holds).is_file():
            raise OrtzoError(f"--force replaces only an earlier output of this command (a folder with {holds}); "
                             f"{out} holds other files: choose another --out")


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path`, fsync, rename over it, fsync the folder."""
    path = Path(path)
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make renames and new entries in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
