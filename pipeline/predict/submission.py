"""Submission files: one writer (never overwrites) and one validator (users can run it on any file).

``<paths.submissions>/<competition>-<experiment>-<UTC YYYYmmddTHHMMSSZ>.csv`` in the competition's columns
(``build_reader(cfg).submission_frame``), with a JSON beside it (the *sidecar*) naming the experiments,
weights, OOF score and config hashes that made it, and the CSV's ``sha256``: ``read_sidecar`` tells a
file the pipeline wrote, unchanged, from any other. A name that exists gets a ``-2``, ``-3``... suffix.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, file_sha256, read_json_object
from pipeline.data.sample import MISSING, shown

log = logging.getLogger(__name__)

# a row of per-class probabilities written with 8 significant digits sums to 1 within this
ROW_SUM_TOLERANCE = 1e-4


def submissions_dir(cfg: Config) -> Path:
    """Where submission files go (``paths.submissions``)."""
    return Path(cfg.paths.submissions).expanduser()


def utc_stamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def write_submission(
    cfg: Config,
    ids,
    probs: np.ndarray,
    class_names: list[str],
    experiment: str,
    info: dict,
    *,
    test_ids=None,
    now: dt.datetime | None = None,
) -> Path:
    """Write a validated submission file and its JSON; returns the CSV path.

    ``test_ids`` (the test data's ids, when the caller has just read them) saves re-reading the test set
    for validation; ``now`` fixes the timestamp (tests).
    """
    from pipeline.data.formats import build_reader

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
        digest = file_sha256(tmp)
        path = _claim(tmp, root, f"{cfg.competition}-{experiment}-{stamp}")
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "file": path.name,
        "competition": cfg.competition,
        "experiment": experiment,
        "created_utc": stamp,
        "rows": len(frame),
        "columns": list(frame.columns),
        **info,
        "sha256": digest,
    }
    try:
        atomic_write_json(path.with_suffix(".json"), meta)
    except BaseException:
        path.unlink(missing_ok=True)  # a CSV without its sidecar is not a file the pipeline wrote
        raise
    log.info(
        f"wrote {path} ({len(frame)} rows, columns {','.join(frame.columns)}) and {path.with_suffix('.json').name}"
    )
    return path


def remove_submission(path: str | Path) -> None:
    """Take back a submission file and its sidecar (a stage that wrote it failed afterwards)."""
    path = Path(path)
    path.with_suffix(".json").unlink(missing_ok=True)
    path.unlink(missing_ok=True)


_REMAKE = "a submission file comes with its JSON from `pipeline predict CONFIG` or `pipeline ensemble FILE`"


def read_sidecar(path: str | Path) -> dict:
    """The JSON beside submission file ``path``, checked: an object naming the file, its experiment
    and competition, with numbers where scores are (``check_own`` also compares the CSV's sha256)."""
    path = Path(path)
    j = path.with_suffix(".json")
    if not j.is_file():
        raise PipelineError(f"{j}: not found beside {path.name}; {_REMAKE}")
    d = read_json_object(j, _REMAKE)
    for key in ("file", "competition", "experiment"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise PipelineError(f"{j}: no {key}; {_REMAKE}")
    for key in ("oof_score", "lb_score"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise PipelineError(f"{j}: {key} is {v!r}; expected a finite number; {_REMAKE}")
    return d


def check_own(path: str | Path) -> dict:
    """The sidecar of a submission file the pipeline wrote and nobody changed since; else one line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: submission file not found")
    d = read_sidecar(path)
    if not isinstance(d.get("sha256"), str):
        raise PipelineError(
            f"{path.with_suffix('.json')}: no sha256 of {path.name} "
            f"(written before submission files recorded it); {_REMAKE}"
        )
    if d["file"] != path.name:
        raise PipelineError(f"{path.with_suffix('.json')}: describes {d['file']!r}, not {path.name}; {_REMAKE}")
    if file_sha256(path) != d["sha256"]:
        raise PipelineError(
            f"{path}: its sha256 differs from the one {path.with_suffix('.json').name} recorded: the file was "
            f"changed after the pipeline wrote it; {_REMAKE}"
        )
    return d


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
    """Problems of a submission file, one line per failed check (a count and up to 3 examples); [] when valid.
    The columns, ids and encoding are the sample submission's when the competition ships one
    (``pipeline/data/sample.py``), else the format's."""
    from pipeline.data.formats import build_reader
    from pipeline.data.sample import check_ids
    from pipeline.plan.store import planned

    cfg = planned(cfg, create=False)  # the test images are read at the size the run was planned at
    path = Path(path)
    reader = build_reader(cfg)
    if test_ids is None or class_names is None:
        from pipeline.data.formats import read_table

        test = read_table(cfg, "test")
        test_ids = test.ids if test_ids is None else test_ids
        class_names = test.class_names if class_names is None else class_names
    spec = reader.submission_spec(class_names)
    check_ids(spec, test_ids)
    test_ids = pd.Index(np.asarray(test_ids).astype(str))
    if not path.is_file():
        return [f"{path}: file not found"]
    try:
        df = _read_text_csv(path)
    except (ValueError, OverflowError) as e:  # ParserError, EmptyDataError and UnicodeDecodeError are ValueErrors
        return [
            f"{path}: cannot parse as CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"expected a header line {','.join(spec.header)}"
        ]
    cols = [str(c) for c in df.columns]
    if cols != spec.header:
        return [f"{path}: columns are {_cols(cols)}; expected exactly {_cols(spec.header)}"]
    ids = df[spec.id_col].str.strip()
    problems = []
    if len(df) != len(test_ids):
        problems.append(f"{path}: {len(df)} rows; expected {len(test_ids)} (one per test image)")
    empty_id = ids.isin(MISSING)
    if empty_id.any():
        problems.append(
            f"{path}: {int(empty_id.sum())} empty or NaN ids "
            f"(e.g. data rows {_examples((np.flatnonzero(empty_id) + 1).tolist())})"
        )
    dup = ids[ids.duplicated() & ~empty_id]
    if len(dup):
        problems.append(
            f"{path}: {len(dup)} duplicate ids (e.g. {_examples(dup.unique())}); expected each test id once"
        )
    missing = test_ids.difference(pd.Index(ids), sort=False)
    if len(missing):
        problems.append(f"{path}: {len(missing)} test ids missing (e.g. {_examples(missing)})")
    extra = pd.Index(ids[~empty_id].unique()).difference(test_ids, sort=False)
    if len(extra):
        problems.append(f"{path}: {len(extra)} ids not in the test data (e.g. {_examples(extra)})")
    return problems + _value_problems(path, df, ids, spec, class_names)


def _cols(cols) -> str:
    shown = ",".join(cols[:12]) + (",..." if len(cols) > 12 else "")
    return shown or "(none)"


def _value_problems(path: Path, df: pd.DataFrame, ids: pd.Series, spec, class_names) -> list[str]:
    """The values' problems for the spec's encoding: probabilities in [0, 1] (summing to 1 over the class
    columns), or labels among the classes."""
    problems = []
    probs = spec.encoding in ("probability", "per_class")
    for col in spec.columns:
        vals = df[col].str.strip()
        nan = vals.isin(MISSING)
        if nan.any():
            problems.append(f"{path}: {int(nan.sum())} empty or NaN values in {col} (e.g. ids {_examples(ids[nan])})")
        ok = vals[~nan]
        if probs:
            num = pd.to_numeric(ok, errors="coerce")
            bad = num.isna() | ~np.isfinite(num.fillna(0))
            if bad.any():
                problems.append(
                    f"{path}: {int(bad.sum())} non-numeric values in {col} "
                    f"(e.g. {_examples(f'{i}: {v}' for i, v in zip(ids[bad.index[bad]], ok[bad]))}); "
                    "expected probabilities"
                )
            out = ~bad & ((num < 0) | (num > 1))
            if out.any():
                problems.append(
                    f"{path}: {int(out.sum())} probabilities outside [0, 1] in {col} "
                    f"(e.g. {_examples(f'{i}: {v}' for i, v in zip(ids[out.index[out]], ok[out]))})"
                )
        else:
            allowed = _allowed_labels(spec.encoding, class_names)
            bad = ~ok.isin(allowed)
            if bad.any():
                problems.append(
                    f"{path}: {int(bad.sum())} labels not among the classes in {col} "
                    f"(e.g. {_examples(f'{i}: {v}' for i, v in zip(ids[bad.index[bad]], ok[bad]))}); "
                    f"expected one of {shown(allowed, 10)}"
                )
    if spec.encoding == "per_class" and not problems:
        total = df[list(spec.columns)].apply(pd.to_numeric).sum(axis=1)
        off = (total - 1).abs() > ROW_SUM_TOLERANCE
        if off.any():
            problems.append(
                f"{path}: {int(off.sum())} rows whose class probabilities do not sum to 1 "
                f"(e.g. {_examples(f'{i}: {t:.4g}' for i, t in zip(ids[off], total[off]))})"
            )
    return problems


def check_submission(cfg: Config, path: str | Path, solution: str | Path | None = None) -> float | None:
    """CLI body: print each problem and raise (exit 2), or print a one-line OK.

    With ``solution`` (a file in the submission's own columns holding the true answers, like the
    demos' ``solution.csv``) the file is also scored; returns that score."""
    import sys

    from pipeline.data.formats import read_table
    from pipeline.plan.store import planned

    test = read_table(planned(cfg, create=False), "test")
    problems = validate_submission(cfg, path, test_ids=test.ids, class_names=test.class_names)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        raise PipelineError(f"{path}: {len(problems)} check(s) failed; not a valid {cfg.competition} submission")
    with open(path) as f:
        n = sum(1 for _ in f) - 1
    log.info(f"{path}: valid {cfg.competition} submission ({n} rows)")
    if solution is None:
        return None
    name, value = score_submission(cfg, path, solution, class_names=test.class_names)
    log.info(f"{path}: {name} {value:.5f} against {solution}")
    return value


def _allowed_labels(kind: str, class_names) -> list[str]:
    """The values a label submission may hold: class indices or class names."""
    return [str(i) for i in range(len(class_names))] if kind == "index" else [str(c) for c in class_names]


def _read_text_csv(path: Path) -> pd.DataFrame:
    """A CSV as the text it holds (no NaN guessing; missing cells are empty); raises ValueError when unreadable."""
    return pd.read_csv(path, dtype=str, keep_default_na=False).fillna("")


_SOLUTION_FIX = (
    "expected the true answers in the submission's columns "
    "(a demo's solution.csv is rebuilt by `pipeline demo-data KIND --out DIR`)"
)


def read_solution(cfg: Config, solution: str | Path, class_names=None) -> pd.DataFrame:
    """A checked ``--solution`` file in the submission's columns: the true answers (text, stripped), indexed by
    id. Probability submissions need 0/1 answers (one 1 per row over per-class columns); label submissions the
    class names (or indices) they hold."""
    from pipeline.data.formats import build_reader

    if class_names is None:
        from pipeline.data.formats import read_table

        class_names = read_table(cfg, "test").class_names
    spec = build_reader(cfg).submission_spec(class_names)
    id_col = spec.id_col
    solution = Path(solution)
    if not solution.is_file():
        raise PipelineError(f"{solution}: solution file not found")
    try:
        sol = _read_text_csv(solution)
    except (ValueError, OverflowError) as e:
        raise PipelineError(
            f"{solution}: not a readable CSV ({(str(e).splitlines() or [type(e).__name__])[0][:120]}); {_SOLUTION_FIX}"
        ) from None
    if [str(c) for c in sol.columns] != spec.header:
        raise PipelineError(
            f"{solution}: columns are {_cols(list(map(str, sol.columns)))}; expected {_cols(spec.header)}"
        )
    if sol.empty:
        raise PipelineError(f"{solution}: no rows; {_SOLUTION_FIX}")
    sol = sol.apply(lambda c: c.str.strip())
    ids = sol[id_col]
    line = lambda i: int(i) + 2  # noqa: E731 - CSV line of data row i
    bad = np.flatnonzero(ids.isin(MISSING).to_numpy())
    if len(bad):
        raise PipelineError(f"{solution}: line {line(bad[0])}: {id_col} is empty or NaN; {_SOLUTION_FIX}")
    dup = np.flatnonzero(ids.duplicated().to_numpy())
    if len(dup):
        raise PipelineError(
            f"{solution}: line {line(dup[0])}: {id_col} {ids.iloc[dup[0]]!r} appears more than once; {_SOLUTION_FIX}"
        )
    probability = spec.encoding in ("probability", "per_class")
    allowed = ["0", "1"] if probability else _allowed_labels(spec.encoding, class_names)
    for col in spec.columns:
        vals = sol[col]
        bad = np.flatnonzero(~vals.isin(allowed).to_numpy())
        if len(bad):
            i = bad[0]
            what = "is empty or NaN" if vals.iloc[i] in MISSING else f"{vals.iloc[i]!r} is not a true answer"
            raise PipelineError(
                f"{solution}: line {line(i)} ({id_col} {ids.iloc[i]!r}): {col} {what}; "
                f"expected one of {shown(allowed, 10)}; {_SOLUTION_FIX}"
            )
    if spec.encoding == "per_class":
        ones = (sol[list(spec.columns)] == "1").sum(axis=1).to_numpy()
        bad = np.flatnonzero(ones != 1)
        if len(bad):
            i = bad[0]
            raise PipelineError(
                f"{solution}: line {line(i)} ({id_col} {ids.iloc[i]!r}): {ones[i]} classes marked 1; "
                f"expected exactly one per row; {_SOLUTION_FIX}"
            )
    return sol.set_index(id_col)


def score_submission(cfg: Config, path: str | Path, solution: str | Path, *, class_names=None) -> tuple[str, float]:
    """(metric name, value) of a valid submission against a solution file with the same columns:
    log-loss for probability submissions, accuracy for label submissions."""
    from sklearn.metrics import accuracy_score, log_loss

    from pipeline.data.formats import build_reader

    if class_names is None:
        from pipeline.data.formats import read_table

        class_names = read_table(cfg, "test").class_names
    spec = build_reader(cfg).submission_spec(class_names)
    truth = read_solution(cfg, solution, class_names)
    sub = _read_text_csv(Path(path)).apply(lambda c: c.str.strip()).set_index(spec.id_col)
    missing = truth.index.difference(sub.index)
    if len(missing):
        raise PipelineError(
            f"{solution}: {len(missing)} ids not in {path} (e.g. {_examples(missing)}); expected the same test ids"
        )
    cols = list(spec.columns)
    pred = sub.reindex(truth.index)[cols]
    if spec.encoding == "per_class":
        y = truth[cols].astype(int).to_numpy().argmax(1)
        p = pred.astype(float).to_numpy()
        return "logloss", float(log_loss(y, p / p.sum(1, keepdims=True), labels=list(range(len(cols)))))
    if spec.encoding == "probability":
        return "logloss", float(
            log_loss(truth[cols[0]].astype(int).to_numpy(), pred[cols[0]].astype(float), labels=[0, 1])
        )
    return "accuracy", float(accuracy_score(truth[cols[0]].to_numpy(), pred[cols[0]].astype(str).to_numpy()))
