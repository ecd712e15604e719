"""Kaggle image-competition pipeline: library first, CLI thin."""

__version__ = "0.1.0"

from pipeline.core import logs as _logs

_logs.library_default()  # a NullHandler: the application (or the CLI) chooses where lines go
