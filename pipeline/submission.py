"""Submission files: one writer (never overwrites) and one validator (users can run it on any file).

``<paths.submissions>/<competition>-<experiment>-<UTC YYYYmmddTHHMMSSZ>.csv`` in the competition's columns
(``build_reader(cfg).submission_frame``), with a JSON beside it naming the experiments, weights,
OOF score and config hashes that made it. A name that exists gets a ``-2``, ``-3``... suffix.
"""
from __future__ import annotations

import logging
import datetime as dt
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config
from .errors import PipelineError
from .io import atomic_write_json

log = logging.getLogger(__name__)

_MISSING = {"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None", "<NA>"}


def submissions_dir(cfg: Config) -> Path:
    """Where submission files go (``paths.submissions``)."""
    return Path(cfg.paths.submissions).expanduser()


def utc_stamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def write_submission(cfg: Config, ids, probs: np.ndarray, class_names: list[str], experiment: str, info: dict, *, test_ids=None, now: dt.datetime | None = None) -> Path:
    """Write a validated submission file and its JSON; returns the CSV path.

    ``test_ids`` (the test data's ids, when the caller has just read them) saves re-reading the test set
    for validation; ``now`` fixes the timestamp (tests).
    """
    from .formats import build_reader

    frame = build_reader(cfg).submission_frame(np.asarray(ids), np.asarray(probs), list(class_names))
    root = submissions_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    stamp = utc_stamp(now)
    fd, tmp = tempfile.mkstemp(prefix=".submission.", suffix=".tmp", dir=root)
    os.close(fd)
    tmp = Path(tmp)
    try:
        frame.to_csv(tmp, index=False, float_format="%.8g")
        problems = validate_submission(cfg, tmp, test_ids=test_ids, class_names=class_names)
        if problems:  # a bug upstream, not a user error: never leave an invalid file behind
            what = "; ".join(p.removeprefix(f"{tmp}: ") for p in problems)
            raise PipelineError(f"refusing to write an invalid submission for {experiment}: {what}")
        path = _claim(tmp, root, f"{cfg.competition}-{experiment}-{stamp}")
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"file": path.name, "competition": cfg.competition, "experiment": experiment, "created_utc": stamp,
            "rows": len(frame), "columns": list(frame.columns), **info}
    atomic_write_json(path.with_suffix(".json"), meta)
    log.info(f"wrote {path} ({len(frame)} rows, columns {','.join(frame.columns)}) and {path.with_suffix('.json').name}")
    return path


def _claim(tmp: Path, root: Path, stem: str) -> Path:
    """Hard-link ``tmp`` to the first free name: os.link fails on an existing name, so nothing is overwritten."""
    for i in range(1, 10_000):
        path = root / f"{stem}{'' if i == 1 else f'-{i}'}.csv"
        if path.with_suffix(".json").exists():
            continue
        try:
            os.link(tmp, path)
            return path
        except FileExistsError:
            continue
        except OSError:  # a filesystem without hard links: check-then-rename
            if not path.exists():
                os.replace(tmp, path)
                return path
    raise PipelineError(f"{root}: no free file name for {stem}")  # pragma: no cover


# ---- validation --------------------------------------------------------------------------

def _examples(values, n: int = 3) -> str:
    vals = list(values)[:n]
    return ", ".join(repr(v) for v in vals)


def validate_submission(cfg: Config, path: str | Path, *, test_ids=None, class_names=None) -> list[str]:
    """Problems of a submission file, one line per failed check (a count and up to 3 examples); [] when valid."""
    from .formats import build_reader

    path = Path(path)
    reader = build_reader(cfg)
    id_col, val_col = reader.submission_columns
    kind = reader.submission_kind
    if test_ids is None or class_names is None:
        from .formats import read_table

        test = read_table(cfg, "test")
        test_ids = test.ids if test_ids is None else test_ids
        class_names = test.class_names if class_names is None else class_names
    test_ids = pd.Index(np.asarray(test_ids).astype(str))
    if not path.is_file():
        return [f"{path}: file not found"]
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        return [f"{path}: cannot parse as CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__}); expected a header line {id_col},{val_col}"]
    cols = [str(c) for c in df.columns]
    if cols != [id_col, val_col]:
        return [f"{path}: columns are {','.join(cols) or '(none)'}; expected exactly {id_col},{val_col}"]
    ids = df[id_col].str.strip()
    vals = df[val_col].str.strip()
    problems = []
    if len(df) != len(test_ids):
        problems.append(f"{path}: {len(df)} rows; expected {len(test_ids)} (one per test image)")
    empty_id = ids.isin(_MISSING)
    if empty_id.any():
        problems.append(f"{path}: {int(empty_id.sum())} empty or NaN ids (e.g. data rows {_examples((np.flatnonzero(empty_id) + 1).tolist())})")
    dup = ids[ids.duplicated() & ~empty_id]
    if len(dup):
        problems.append(f"{path}: {len(dup)} duplicate ids (e.g. {_examples(dup.unique())}); expected each test id once")
    missing = test_ids.difference(pd.Index(ids), sort=False)
    if len(missing):
        problems.append(f"{path}: {len(missing)} test ids missing (e.g. {_examples(missing)})")
    extra = pd.Index(ids[~empty_id].unique()).difference(test_ids, sort=False)
    if len(extra):
        problems.append(f"{path}: {len(extra)} ids not in the test data (e.g. {_examples(extra)})")
    nan = vals.isin(_MISSING)
    if nan.any():
        problems.append(f"{path}: {int(nan.sum())} empty or NaN values in {val_col} (e.g. ids {_examples(ids[nan])})")
    ok = vals[~nan]
    if kind == "probability":
        num = pd.to_numeric(ok, errors="coerce")
        bad = num.isna() | ~np.isfinite(num.fillna(0))
        if bad.any():
            problems.append(f"{path}: {int(bad.sum())} non-numeric values in {val_col} "
                            f"(e.g. {_examples(f'{i}: {v}' for i, v in zip(ids[bad.index[bad]], ok[bad]))}); expected probabilities")
        out = ~bad & ((num < 0) | (num > 1))
        if out.any():
            problems.append(f"{path}: {int(out.sum())} probabilities outside [0, 1] in {val_col} "
                            f"(e.g. {_examples(f'{i}: {v}' for i, v in zip(ids[out.index[out]], ok[out]))})")
    else:
        allowed = [str(i) for i in range(len(class_names))] if kind == "index" else [str(c) for c in class_names]
        bad = ~ok.isin(allowed)
        if bad.any():
            shown = ", ".join(allowed[:10]) + (", ..." if len(allowed) > 10 else "")
            problems.append(f"{path}: {int(bad.sum())} labels not among the classes in {val_col} "
                            f"(e.g. {_examples(f'{i}: {v}' for i, v in zip(ids[bad.index[bad]], ok[bad]))}); expected one of {shown}")
    return problems


def check_submission(cfg: Config, path: str | Path, solution: str | Path | None = None) -> float | None:
    """CLI body: print each problem and raise (exit 2), or print a one-line OK.

    With ``solution`` (a file in the submission's own columns holding the true answers, like the
    demos' ``solution.csv``) the file is also scored; returns that score."""
    import sys

    problems = validate_submission(cfg, path)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        raise PipelineError(f"{path}: {len(problems)} check(s) failed; not a valid {cfg.competition} submission")
    with open(path) as f:
        n = sum(1 for _ in f) - 1
    log.info(f"{path}: valid {cfg.competition} submission ({n} rows)")
    if solution is None:
        return None
    name, value = score_submission(cfg, path, solution)
    log.info(f"{path}: {name} {value:.5f} against {solution}")
    return value


def score_submission(cfg: Config, path: str | Path, solution: str | Path) -> tuple[str, float]:
    """(metric name, value) of a valid submission against a solution file with the same columns:
    log-loss for probability submissions, accuracy for label submissions."""
    from sklearn.metrics import accuracy_score, log_loss

    from .formats import build_reader

    id_col, val_col = build_reader(cfg).submission_columns
    solution = Path(solution)
    if not solution.is_file():
        raise PipelineError(f"{solution}: solution file not found")
    sol = pd.read_csv(solution, dtype=str)
    if list(sol.columns) != [id_col, val_col]:
        raise PipelineError(f"{solution}: columns are {','.join(map(str, sol.columns))}; expected {id_col},{val_col}")
    sub = pd.read_csv(path, dtype=str).set_index(id_col)[val_col]
    missing = pd.Index(sol[id_col]).difference(sub.index)
    if len(missing):
        raise PipelineError(f"{solution}: {len(missing)} ids not in {path} (e.g. {_examples(missing)}); expected the same test ids")
    pred = sub.reindex(sol[id_col]).to_numpy()
    if build_reader(cfg).submission_kind == "probability":
        y = sol[val_col].astype(int).to_numpy()
        return "logloss", float(log_loss(y, pred.astype(float), labels=[0, 1]))
    return "accuracy", float(accuracy_score(sol[val_col].str.strip().to_numpy(), np.char.strip(pred.astype(str))))
