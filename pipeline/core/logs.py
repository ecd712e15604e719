"""Progress and results go through the standard ``logging`` module, under the ``pipeline`` logger.

Like optuna, the library gives its own logger one handler, so a notebook calling
``pipeline.train.cv.train_cv(cfg)`` sees the same lines as the CLI: INFO and above to stdout, the
message alone. stderr stays reserved for the one-line error contract. ``to_file`` sends a stretch
of work (one tuning trial's training) to a log file instead.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = "pipeline"


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (pytest's capture, a redirected notebook)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def configure() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        h = _Stdout()
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(logging.INFO)
    root.propagate = False  # a user's root configuration must not print every line twice
    return root


@contextmanager
def to_file(path: str | Path):
    """Within the block, the pipeline's lines go to ``path`` (appended) instead of stdout."""
    root = logging.getLogger(ROOT)
    saved = root.handlers[:]
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(message)s"))
    root.handlers = [fh]
    try:
        yield fh
    finally:
        root.handlers = saved
        fh.close()
