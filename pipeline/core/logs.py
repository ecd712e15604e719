"""Progress and results go through the standard ``logging`` module, under the ``pipeline`` logger.

The library configures nothing: ``import pipeline`` adds a ``NullHandler`` only, so an application or
a notebook routes the lines as it routes its own (``logging.basicConfig(level=logging.INFO)`` shows
them). The CLI calls ``to_stdout()``: INFO and above to stdout, the message alone, flushed line by line
so a pipe or a file sees each line as it happens; stderr stays reserved for the one-line error
contract. Worker processes the library spawns (``train.fold_jobs``, Ray tasks) copy the parent's
choice (``worker_setup``). ``to_file`` sends a stretch of work (one tuning trial's training) to a log
file instead.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = "pipeline"


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (pytest's capture, a redirected notebook) and
    flushes each line, so progress reaches a pipe or a file as it happens."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def library_default() -> None:
    """What ``import pipeline`` does: a ``NullHandler``, so a library user's logging is left alone."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())


def to_stdout() -> logging.Logger:
    """The CLI's output: INFO and above to stdout, the message alone, not repeated by the root logger."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        h = _Stdout()
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(logging.INFO)
    root.propagate = False  # the application chose stdout: a root configuration must not print every line twice
    return root


def on_stdout() -> bool:
    """Whether this process sends the pipeline's lines to stdout (``to_stdout``): its workers do the same."""
    return any(isinstance(h, _Stdout) for h in logging.getLogger(ROOT).handlers)


def worker_setup(stdout: bool) -> None:
    """In a worker process: the parent's output (``on_stdout()`` there), else the library default."""
    if stdout:
        to_stdout()
    else:
        library_default()


@contextmanager
def to_file(path: str | Path):
    """Within the block, the pipeline's lines go to ``path`` (appended) instead of stdout."""
    root = logging.getLogger(ROOT)
    saved, level = root.handlers[:], root.level
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(message)s"))
    root.handlers = [fh]
    root.setLevel(logging.INFO)
    try:
        yield fh
    finally:
        root.handlers = saved
        root.setLevel(level)
        fh.close()
