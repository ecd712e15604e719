"""Prediction files, read, written and checked in one place.

  oof*.csv         id,fold,target,p_<class>...   out-of-fold: one row per training image, the fold it
                                                  was held out in and its class index (integers)
  test_pred*.csv   id,p_<class>...                one row per test image

Both kinds: ids unique and non-empty; probabilities finite, in [0, 1], each row summing to 1
within ``SUM_TOL``. The reader refuses anything else with one line naming the file, the CSV line
and what to rerun; the writer runs the same checks first (it never writes an invalid file) and
writes atomically with 8 significant digits.

Files hold RAW probabilities, the models' own. The calibration kept by the evaluate stage (a
temperature, and for log-loss a shrink toward the class prior) lives only in the run's
``calibration.json``; ``read_predictions(path, kind, scaled=True)`` returns the probabilities
calibrated by it (``calibration.Calibration.apply``), so every stage scales the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_csv
from pipeline.runs.layout import RunDir
from pipeline.tasks.calibration import SHRINK_MAX, Calibration

PREFIX = "p_"
SUM_TOL = 1e-3  # probabilities written with 8 significant digits sum to 1 far closer than this
KEYS = {"oof": ("id", "fold", "target"), "test": ("id",)}
_ROWS = {"oof": "training", "test": "test"}
_HINTS = {"oof": "pipeline train CONFIG", "test": "pipeline predict CONFIG"}
_MAX_FOLD = 2**31


# ---- columns and frames ------------------------------------------------------------------


def pcols(class_names) -> list[str]:
    """The probability columns of ``class_names``: p_<class>."""
    return [f"{PREFIX}{c}" for c in class_names]


def prob_columns(df: pd.DataFrame) -> list[str]:
    """A frame's p_<class> columns, in its order."""
    return [c for c in df.columns if str(c).startswith(PREFIX)]


def class_names_of(df: pd.DataFrame) -> list[str]:
    """The classes a frame predicts, from its p_<class> columns."""
    return [str(c)[len(PREFIX) :] for c in prob_columns(df)]


def probs_of(df: pd.DataFrame, class_names=None) -> np.ndarray:
    """(N, K) float64 probabilities of ``class_names`` (default: every p_ column, in order)."""
    cols = pcols(class_names) if class_names is not None else prob_columns(df)
    return df[cols].to_numpy(np.float64)


def pred_frame(ids, probs: np.ndarray, class_names, *, fold=None, target=None) -> pd.DataFrame:
    """A prediction frame: id (as text), fold and target when given (OOF), then p_<class>."""
    df = pd.DataFrame({"id": np.asarray(ids).astype(str)})
    if fold is not None:
        df["fold"] = np.asarray(fold)
    if target is not None:
        df["target"] = np.asarray(target)
    probs = np.asarray(probs)
    for k, c in enumerate(pcols(class_names)):
        df[c] = probs[:, k]
    return df


def csv_line(i: int) -> int:
    """CSV line of data row i (line 1 is the header)."""
    return int(i) + 2


# ---- reading ------------------------------------------------------------------------------


def _kind(kind: str) -> str:
    if kind not in KEYS:
        raise ValueError(f"prediction kind {kind!r}; expected 'oof' or 'test'")
    return kind


def _expected(kind: str) -> str:
    return ",".join(KEYS[kind]) + ",p_<class>..."


def _parse(path: Path, kind: str, hint: str, **kw) -> pd.DataFrame:
    if not path.is_file():
        what = "out-of-fold" if kind == "oof" else "test"
        raise PipelineError(f"{path}: file not found; expected {what} predictions from `{hint}`")
    try:  # text as written: numbers are parsed and checked below, ids are never turned into NaN
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kw)
    except (ValueError, UnicodeDecodeError, OverflowError) as e:  # ParserError, EmptyDataError are ValueErrors
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise PipelineError(
            f"{path}: not a readable CSV ({first}); expected {_expected(kind)}; rerun `{hint}`"
        ) from None


def read_classes(path: str | Path, kind: str, *, hint: str | None = None) -> list[str]:
    """The classes a prediction file's header names (its p_<class> columns), without reading its rows."""
    kind, path = _kind(kind), Path(path)
    return class_names_of(_parse(path, kind, hint or _HINTS[kind], nrows=0))


def read_predictions(
    path: str | Path, kind: str, *, class_names=None, scaled: bool = False, hint: str | None = None
) -> pd.DataFrame:
    """A checked prediction file: columns id (text), [fold, target (int64)], p_<class> (float64).

    ``kind``: "oof" or "test". ``class_names``: the config's classes (None: the file's own p_
    columns, at least 2). ``scaled``: probabilities calibrated as the run kept (temperature and
    shrink, ``calibration.json`` beside the file), else raw. ``hint``: the command that remakes the file.
    """
    kind, path = _kind(kind), Path(path)
    hint = hint or _HINTS[kind]
    df = check_predictions(_parse(path, kind, hint), kind, class_names=class_names, where=str(path), hint=hint)
    return scale(df, load_calibration(path.parent)) if scaled else df


def scale(df: pd.DataFrame, calibration: Calibration | float | None) -> pd.DataFrame:
    """A checked prediction frame with its probabilities calibrated (a ``Calibration``, a bare
    temperature, or None: as it is), the way ``read_predictions(..., scaled=True)`` applies what a run kept."""
    if calibration is None:
        return df
    if not isinstance(calibration, Calibration):
        calibration = Calibration(temperature=float(calibration))
    df, cols = df.copy(), prob_columns(df)
    if calibration.prior is not None and len(calibration.prior) != len(cols):
        raise PipelineError(
            f"calibration.json: shrink.prior has {len(calibration.prior)} classes, the predictions {len(cols)}; "
            f"rerun `pipeline evaluate`"
        )
    df[cols] = calibration.apply(df[cols].to_numpy(np.float64))
    return df


def check_predictions(
    df: pd.DataFrame, kind: str, *, class_names=None, where: str = "predictions", hint: str | None = None
) -> pd.DataFrame:
    """``df`` (as parsed text, or as built in memory) checked and in canonical form; raises a one-line
    PipelineError naming ``where``, the CSV line and (``hint``) what to rerun."""
    kind = _kind(kind)
    rerun = f"; rerun `{hint}`" if hint else ""

    def fail(msg: str):
        raise PipelineError(f"{where}: {msg}{rerun}")

    for col in KEYS[kind]:
        if col not in df.columns:
            fail(f"missing column {col!r}; expected {_expected(kind)}")
    names = _classes(df, class_names, fail)
    want = pcols(names)
    rows = _ROWS[kind]
    if len(df) == 0:
        fail(f"no rows; expected one row per {rows} image")
    ids = df["id"]
    text = ids.astype(str).str.strip()
    blank = ids.isna().to_numpy() | (text == "").to_numpy()
    if blank.any():
        fail(f"line {csv_line(np.flatnonzero(blank)[0])}: id is empty; expected the {rows} image's id")
    ids = ids.astype(str)
    dup = ids.duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        fail(
            f"line {csv_line(i)}: id {ids.iloc[i]!r} appears {int((ids == ids.iloc[i]).sum())} times; "
            f"expected each {rows} id once"
        )
    out = pd.DataFrame({"id": ids.to_numpy(dtype=object)})
    if kind == "oof":
        for col in ("fold", "target"):
            out[col] = _integers(df, col, ids, len(names), names, fail)
    probs = _probabilities(df, want, ids, fail)
    for j, c in enumerate(want):
        out[c] = probs[:, j]
    return out


def _classes(df: pd.DataFrame, class_names, fail) -> list[str]:
    have = prob_columns(df)
    if class_names is None:
        if len(have) < 2:
            fail(f"{len(have)} p_<class> column(s); expected one per class, at least 2")
        return class_names_of(df)
    names = [str(c) for c in class_names]
    want, classes = pcols(names), ", ".join(names)
    for c in have:
        if c not in want:
            fail(f"column {c!r} is not a class of the config; expected p_<class> for the classes {classes}")
    for c in want:
        if c not in have:
            fail(
                f"missing column {c!r} (class {c[len(PREFIX) :]!r}); "
                f"expected one p_<class> column per class: {', '.join(want)}"
            )
    return names


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def _show(v) -> str:
    """A cell as the user wrote it: numbers plain (never numpy's repr), other text quoted."""
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError, OverflowError):
        return repr(v)


def _integers(df, col, ids, k, names, fail) -> np.ndarray:
    what = "a fold number 0, 1, ..." if col == "fold" else f"a class index 0..{k - 1} (classes {', '.join(names)})"
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(v) | (v != np.round(v)) | (v < 0) | (v >= (k if col == "target" else _MAX_FOLD))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raw = df[col].iloc[i]
        if _blank(raw) or (np.isnan(v[i]) and str(raw).strip().lower() == "nan"):
            problem = f"{col} is empty or NaN"
        elif col == "target" and np.isfinite(v[i]) and v[i] == round(v[i]) and v[i] >= k:
            problem = f"target {_show(raw)} is not a class of the config"
        else:
            problem = f"{col} {_show(raw)} is not valid"
        fail(f"line {csv_line(i)} (id {ids.iloc[i]!r}): {problem}; expected {what}")
    return v.astype(np.int64)


def _probabilities(df, want, ids, fail) -> np.ndarray:
    probs = np.column_stack([pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float) for c in want])
    bad = ~np.isfinite(probs)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raw = df[want[j]].iloc[i]
        what = "is NaN or empty" if _blank(raw) or str(raw).strip().lower() == "nan" else f"is {_show(raw)}"
        fail(f"line {csv_line(i)} (id {ids.iloc[i]!r}): {want[j]} {what}; expected a probability in [0, 1]")
    bad = (probs < 0) | (probs > 1)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        fail(f"line {csv_line(i)} (id {ids.iloc[i]!r}): {want[j]} is {probs[i, j]:g}; expected a probability in [0, 1]")
    s = probs.sum(1)
    bad = np.abs(s - 1) > SUM_TOL
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        fail(
            f"line {csv_line(i)} (id {ids.iloc[i]!r}): probabilities sum to {s[i]:.6g}; "
            f"expected 1 (within {SUM_TOL:g}) over {', '.join(want)}"
        )
    return probs


# ---- writing and averaging ------------------------------------------------------------------


def write_predictions(path: str | Path, df: pd.DataFrame, kind: str, *, class_names=None) -> pd.DataFrame:
    """Check ``df`` and write it atomically (8 significant digits); returns the frame as written.
    An invalid frame is a bug upstream: it is refused and nothing is written."""
    path = Path(path)
    try:
        checked = check_predictions(df, kind, class_names=class_names, where=str(path))
    except PipelineError as e:
        raise PipelineError(f"refusing to write invalid predictions: {e}") from None
    atomic_write_csv(path, checked, float_format="%.8g")
    return checked


def average_predictions(paths: list[Path], kind: str, *, class_names=None, hint: str | None = None) -> pd.DataFrame:
    """The mean probabilities of prediction files over the same ids (e.g. one fold's seeds), in the
    first file's row order; OOF files must also agree on fold and target."""
    frames = [read_predictions(p, kind, class_names=class_names, hint=hint) for p in paths]
    first = frames[0]
    cols = prob_columns(first)
    keys = [c for c in KEYS[kind] if c != "id"]
    ids = pd.Index(first["id"])
    acc = first[cols].to_numpy(np.float64).copy()
    for p, f in zip(paths[1:], frames[1:]):
        if prob_columns(f) != cols or len(f) != len(ids) or set(f["id"]) != set(ids):
            raise PipelineError(
                f"{p}: other ids or classes than {paths[0]}; "
                f"expected predictions of the same rows; rerun `{hint or _HINTS[kind]}`"
            )
        f = f.set_index("id").reindex(ids)
        for c in keys:
            if (f[c].to_numpy() != first[c].to_numpy()).any():
                raise PipelineError(
                    f"{p}: {c} differs from {paths[0]} for the same ids; rerun `{hint or _HINTS[kind]}`"
                )
        acc += f[cols].to_numpy(np.float64)
    out = first.copy()
    out[cols] = acc / len(frames)
    return out


# ---- OOF against the training data ----------------------------------------------------------


def check_oof_against_data(
    path: Path,
    df: pd.DataFrame,
    ids: np.ndarray,
    labels: np.ndarray,
    fold_of: np.ndarray,
    class_names: list[str],
    folds_path: Path,
    train_hint: str,
) -> pd.DataFrame:
    """Every training id exactly once, with the data's label and the folds file's fold; rows in data order."""
    ids = pd.Index(np.asarray(ids).astype(str))
    have = pd.Index(df["id"])
    extra = have.difference(ids, sort=False)
    if len(extra):
        i = int(np.flatnonzero(have.isin(extra))[0])
        raise PipelineError(
            f"{path}: line {csv_line(i)}: id {df['id'].iloc[i]!r} is not in the training data "
            f"({len(extra)} such ids); expected the training ids; rerun `{train_hint}`"
        )
    missing = ids.difference(have, sort=False)
    if len(missing):
        raise PipelineError(
            f"{path}: {len(missing)} training row(s) missing (e.g. id {missing[0]!r}); "
            f"expected every training id exactly once; rerun `{train_hint}`"
        )
    pos = have.get_indexer(ids)  # oof row of each training row
    df = df.iloc[pos].reset_index(drop=True)
    lines = pos  # CSV row of each (reordered) row, for messages
    bad = np.flatnonzero(df["target"].to_numpy() != labels)
    if len(bad):
        i = int(bad[0])
        raise PipelineError(
            f"{path}: line {csv_line(lines[i])} (id {ids[i]!r}): target {df['target'].iloc[i]} but the training data "
            f"has class {labels[i]} ({class_names[labels[i]]!r}); expected oof.csv from this data; rerun `{train_hint}`"
        )
    bad = np.flatnonzero(df["fold"].to_numpy() != fold_of)
    if len(bad):
        i = int(bad[0])
        raise PipelineError(
            f"{path}: line {csv_line(lines[i])} (id {ids[i]!r}): fold {df['fold'].iloc[i]} but {folds_path} puts it "
            f"in fold {fold_of[i]}; expected the folds training used; rerun `{train_hint}`"
        )
    return df


# ---- calibration.json: what evaluate kept, applied by every reader of prediction files ----


def load_temperature(run_dir: str | Path) -> float | None:
    """T from the run's ``calibration.json`` ({"temperature": T, "kept": bool}) when evaluation kept it, else None."""
    path = RunDir(path=run_dir).calibration_json
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        t, kept = d["temperature"], d.get("kept", False)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise PipelineError(
            f'{path}: expected JSON {{"temperature": T, "kept": true|false}}; rerun `pipeline evaluate`'
        ) from None
    if not kept:
        return None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise PipelineError(f"{path}: temperature is {t!r}; expected a positive number")
    return float(t)


def load_calibration(run_dir: str | Path) -> Calibration | None:
    """The run's kept calibration (``calibration.json``), or None when it kept nothing or has none."""
    t = load_temperature(run_dir)
    path = RunDir(path=run_dir).calibration_json
    d = json.loads(path.read_text()) if path.is_file() else {}  # readable: load_temperature checked it
    shrink = d.get("shrink") if isinstance(d.get("shrink"), dict) else {}
    if not shrink.get("kept"):
        return Calibration(temperature=t) if t is not None else None
    a, prior = shrink.get("a"), shrink.get("prior")
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a <= SHRINK_MAX:
        raise PipelineError(
            f"{path}: shrink.a is {a!r}; expected a number in [0, {SHRINK_MAX}]; rerun `pipeline evaluate`"
        )
    if (
        not isinstance(prior, list)
        or len(prior) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in prior)
        or abs(sum(prior) - 1) > 1e-6
    ):
        raise PipelineError(
            f"{path}: shrink.prior is {prior!r}; expected class frequencies summing to 1; rerun `pipeline evaluate`"
        )
    return Calibration(temperature=t, shrink=float(a), prior=tuple(float(v) for v in prior))
