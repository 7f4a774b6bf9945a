"""Run `ortzo` and SIGKILL this very process at the N-th arrival at one place.

    python tests/crash.py SITE N ortzo-arguments...

Sites: `forward` (a forward of the session: inside a MeZO step between its two forwards, or
inside an evaluation), `append` (half of a log line written), `checkpoint` (half of a weight
file written), `rename` (a file or checkpoint renamed into place, its folder not yet fsynced). `none` runs
to the end. The fault-injection test (test_crashes.py) drives it.
"""
from __future__ import annotations

import os
import signal
import sys

from ortzo import files, jsonl
from ortzo.cli import main
from ortzo.model import weights
from ortzo.model.session import ScoringSession
from ortzo.run import checkpoint


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(site: str, n: int) -> None:
    count = 0

    def arrived() -> bool:
        nonlocal count
        count += 1
        return count == n

    if site == "forward":
        forward = ScoringSession.__call__

        def call(self, feeds):
            if arrived():
                die()
            return forward(self, feeds)
        ScoringSession.__call__ = call
    elif site == "append":
        write = jsonl._write

        def torn_write(fd, data):
            if arrived():
                os.write(fd, data[: len(data) // 2])
                die()
            write(fd, data)
        jsonl._write = torn_write
    elif site == "checkpoint":
        write_hashed = weights._write_hashed

        def half_file(path, blocks):
            if not arrived():
                return write_hashed(path, blocks)

            def halves():
                for block in blocks:
                    yield block[: len(block) // 2]
                    die()
            return write_hashed(path, halves())
        weights._write_hashed = half_file
    elif site == "rename":
        fsync_dir = files.fsync_dir

        def after_rename(path):
            if arrived():
                die()
            fsync_dir(path)
        files.fsync_dir = checkpoint.fsync_dir = after_rename
    elif site != "none":
        raise SystemExit(f"unknown site {site}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
