"""The submission a competition asks for, read from its ``sample_submission.csv``.

Kaggle ships a sample file whose header is the submission's: the id column first, then either the
target column (``label``, ``is_iceberg``, ``Label``) or one probability column per class (dog breeds,
State Farm drivers), and whose rows are the test ids. ``submission_spec`` turns that header into the
columns, their order and the encoding the writer and the validator use; without a sample file the format's
own columns stand (``Reader.submission_columns`` and ``submission_kind``).

``data.sample_submission``: ``auto`` (``sample_submission.csv`` in ``data.dir`` when it exists), a file
name under ``data.dir`` (or a path), or null (the format's columns even when a sample exists).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.data.formats.base import Reader

SAMPLE = "sample_submission.csv"
# a submission's encodings: P(class 1) (binary), the class index, the class name, one probability per class
ENCODINGS = ("probability", "index", "name", "per_class")
# the texts a CSV cell holds when it is empty or NaN (submissions, samples and solutions alike)
MISSING = {"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None", "<NA>"}


@dataclass(frozen=True, kw_only=True)
class SubmissionSpec:
    """The columns a submission holds and how a prediction becomes their values."""

    id_col: str
    columns: tuple[str, ...]
    encoding: str
    ids: tuple[str, ...] | None = None  # the sample's test ids, in its order (None: no sample file)
    source: Path | None = None

    @property
    def header(self) -> list[str]:
        return [self.id_col, *self.columns]

    def frame(self, ids, probs: np.ndarray, class_names: list[str], encode) -> pd.DataFrame:
        """(N, K) class probabilities -> the submission's rows, in the sample's id order when there is one.
        ``encode(probs, class_names, encoding)`` is the task's (one column's values)."""
        ids = np.asarray(ids).astype(str)
        if self.encoding == "per_class":
            p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
            p = p / p.sum(1, keepdims=True)  # a clipped or rounded row still sums to 1
            col = {c: i for i, c in enumerate(class_names)}
            frame = pd.DataFrame({self.id_col: ids, **{c: p[:, col[c]] for c in self.columns}})
        else:
            frame = pd.DataFrame({self.id_col: ids, self.columns[0]: encode(probs, class_names, self.encoding)})
        if self.ids is None:
            return frame
        check_ids(self, ids)
        return frame.set_index(self.id_col).loc[list(self.ids)].reset_index()


def sample_path(cfg) -> Path | None:
    """The sample file the config points at, or None (no file, or ``data.sample_submission: null``)."""
    setting = getattr(cfg.data, "sample_submission", "auto")
    if setting is None:
        return None
    if setting == "auto":
        p = cfg.data_dir / SAMPLE
        return p if p.is_file() else None
    p = Path(setting).expanduser()
    p = p if p.is_absolute() else cfg.data_dir / p
    if not p.is_file():
        raise PipelineError(
            f"{p}: sample submission not found (data.sample_submission is {setting!r}); "
            "expected a CSV whose header is the submission's, or null for the format's own columns"
        )
    return p


def read_sample(path: Path) -> tuple[list[str], list[str], list[str]]:
    """The sample's header, its ids (first column) and its second column's values, checked: one line naming
    the file when unreadable."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"{path}: cannot read the sample submission ({type(e).__name__}: {e})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise PipelineError(f"{path}: empty; expected a header (id column, then the target columns) and the test ids")
    header = [c.strip() for c in rows[0]]
    if len(header) < 2 or not all(header):
        raise PipelineError(
            f"{path}: header is {', '.join(map(repr, rows[0])) or '(none)'}; "
            "expected an id column and at least one target column"
        )
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise PipelineError(f"{path}: column {dup[0]!r} appears more than once in the header; expected unique columns")
    if len(rows) < 2:
        raise PipelineError(f"{path}: no rows; expected one row per test id")
    ids, values = [], []
    for line, r in enumerate(rows[1:], start=2):
        values.append(r[1].strip() if len(r) > 1 else "")
        i = r[0].strip() if r else ""
        if i in MISSING:
            raise PipelineError(f"{path}: line {line}: the id ({header[0]}) is empty or NaN; expected a test id")
        ids.append(i)
    seen: set[str] = set()
    for line, i in enumerate(ids, start=2):
        if i in seen:
            raise PipelineError(f"{path}: line {line}: id {i!r} appears more than once; expected each test id once")
        seen.add(i)
    return header, ids, values


def submission_spec(reader: Reader, class_names: list[str]) -> SubmissionSpec:
    """What the submission holds: the sample file's header when the competition ships one, else the format's
    columns. A sample whose columns name a class train does not have, or match no target kind, is one line
    naming the file."""
    id_col, target = reader.submission_columns
    path = sample_path(reader.cfg)
    if path is None:
        return SubmissionSpec(id_col=id_col, columns=(target,), encoding=reader.submission_kind)
    header, ids, values = read_sample(path)
    cols = header[1:]
    names = [str(c) for c in class_names]
    common = dict(id_col=header[0], ids=tuple(ids), source=path)
    if len(cols) == 1 and cols[0].lower() == target.lower() and cols[0] not in names:
        encoding = _one_column_encoding(path, cols[0], values, reader.submission_kind, names)
        return SubmissionSpec(columns=(cols[0],), encoding=encoding, **common)
    known = [c for c in cols if c in names]
    if len(cols) == 1 and not known:
        raise PipelineError(
            f"{path}: column {cols[0]!r} matches no target kind; expected the target column ({target}) "
            f"or one probability column per class ({shown(names)})"
        )
    unknown = [c for c in cols if c not in names]
    if unknown:
        what = "names a class train does not have" if known else "matches no target kind"
        raise PipelineError(
            f"{path}: column {unknown[0]!r} {what} ({len(unknown)} such column(s)); expected one probability "
            f"column per class of train ({shown(names)})" + ("" if known else f" or the target column ({target})")
        )
    missing = [c for c in names if c not in cols]
    if missing:
        raise PipelineError(
            f"{path}: no column for class {missing[0]!r} ({len(missing)} of train's {len(names)} classes missing); "
            "expected one probability column per class"
        )
    return SubmissionSpec(columns=tuple(cols), encoding="per_class", **common)


def _one_column_encoding(path: Path, column: str, texts: list[str], default: str, names: list[str]) -> str:
    """A single target column holds a probability (binary: the sample's values are fractions such as 0.5,
    or the format says so) or a label (the format's: class name or index)."""
    values = pd.to_numeric(pd.Series(texts, dtype=object), errors="coerce")
    fractions = values.notna().all() and ((values > 0) & (values < 1)).any() and values.between(0, 1).all()
    if default == "probability" or fractions:
        from pipeline.tasks import build_task

        if "probability" not in build_task(len(names)).encodings:
            raise PipelineError(
                f"{path}: column {column!r} holds probabilities (e.g. {values.iloc[0]:g}) but train has "
                f"{len(names)} classes; expected one probability column per class ({shown(names)})"
            )
        return "probability"
    return default


def check_ids(spec: SubmissionSpec, test_ids) -> None:
    """The sample's ids must be the test set's: a sample of another split or competition is one line."""
    if spec.ids is None:
        return
    have = pd.Index(np.asarray(test_ids).astype(str))
    want = pd.Index(spec.ids)
    missing, extra = want.difference(have, sort=False), have.difference(want, sort=False)
    if len(missing) or len(extra):
        raise PipelineError(
            f"{spec.source}: {len(missing)} ids not in the test data (e.g. {shown(list(missing))}) and "
            f"{len(extra)} test ids not in the sample (e.g. {shown(list(extra))}); "
            "expected the sample to list every test id once"
        )


def shown(values: list, n: int = 5) -> str:
    """Up to ``n`` values for a message, ``...`` when there are more."""
    vals = [str(v) for v in values]
    return ", ".join(vals[:n]) + (", ..." if len(vals) > n else "") if vals else "none"
