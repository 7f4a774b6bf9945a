"""What ortzo says while it works: the `ortzo` logger and the progress bars.

Progress and results go to the `ortzo` logger (each module logs to its child,
`logging.getLogger(__name__)`) at INFO; notes that a result may be off at WARNING. Importing
ortzo configures nothing: an app that imports it decides what is shown. `ortzo`'s `main()`
calls `configure`: one line per record on stderr, at --log-level (INFO), or WARNING with
--quiet, which also hides the progress bars. The bars honour tqdm's own environment
variables (`TQDM_DISABLE=1`): no bar passes an argument those set.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

LOGGER = "ortzo"
LEVELS = ("debug", "info", "warning", "error")

_bars = True  # False: --quiet
_handler: logging.Handler | None = None


def configure(level: str = "info", quiet: bool = False) -> None:
    """The CLI's logging: records of the `ortzo` logger as lines on stderr (replacing what an
    earlier call set up), and progress bars unless `quiet`."""
    global _bars, _handler
    logger = logging.getLogger(LOGGER)
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.WARNING if quiet else level.upper())
    _bars = not quiet


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a record comes (a redirect, a test's capture)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def progress(iterable: Iterable[Any] | None = None, *, hide: bool = False, **options: Any) -> Any:
    """A tqdm bar; hidden if `hide` or --quiet, else as tqdm's environment variables say."""
    from tqdm import tqdm

    if hide or not _bars:
        options["disable"] = True
    return tqdm(iterable, **options)


@contextmanager
def silenced(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Only records at `level` and above from the named third-party loggers and their
    children for the duration, their levels restored after: never process-wide. A handler
    that an import inside adds to the root logger (`logging.basicConfig`) is removed again."""
    manager = logging.root.manager
    loggers = [logging.getLogger(n) for n in names]
    loggers += [lg for key, lg in list(manager.loggerDict.items()) if isinstance(lg, logging.Logger)
                and key.startswith(tuple(f"{n}." for n in names))]
    saved, handlers = [lg.level for lg in loggers], logging.root.handlers[:]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, was in zip(loggers, saved):
            lg.setLevel(was)
        logging.root.handlers[:] = handlers
