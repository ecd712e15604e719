"""An ensemble's members: each one's run folder and prediction files found from its entry (a run folder or
an experiment config: ``load_member``), its predictions read through the one rule (calibrated as the
member's evaluation kept, else raw: ``Member``), and the members checked to agree on classes, ids,
targets and folds (``check_members``). The blend itself: ``pipeline.ensemble.blend``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.runs.layout import RunDir
from pipeline.runs.predictions import pcols, probs_of, read_classes, read_predictions
from pipeline.runs.records import read_predict_info


def _resolve(p: str, base: Path) -> Path | None:
    """A path as written (relative to the cwd), else relative to the ensemble file."""
    for cand in (Path(p).expanduser(), base / p):
        if cand.exists():
            return cand
    return None


@dataclass
class Member:
    """An experiment in the blend: its run folder, predict.json and (once read) its predictions."""

    name: str
    run: RunDir
    info: dict
    oof_path: Path
    test_path: Path
    oof: pd.DataFrame | None = None
    test: pd.DataFrame | None = None

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def read(self, class_names: list[str]) -> None:
        """OOF and test predictions through the one rule: both calibrated as the member kept."""
        hint = f"pipeline predict <config of {self.name}>"
        self.oof = read_predictions(self.oof_path, "oof", class_names=class_names, scaled=True, hint=hint)
        self.test = read_predictions(self.test_path, "test", class_names=class_names, scaled=True, hint=hint)

    def oof_probs(self, class_names) -> np.ndarray:
        return probs_of(self.oof, class_names)

    def test_probs(self, class_names) -> np.ndarray:
        return probs_of(self.test, class_names)

    def raw_probs(self, path: Path, kind: str, ids: pd.Series, class_names) -> np.ndarray:
        """A prediction file's uncalibrated probabilities in the row order of ``ids``."""
        df = read_predictions(path, kind, class_names=class_names, hint=f"pipeline predict <config of {self.name}>")
        if len(df) != len(ids) or set(df["id"]) != set(ids):
            raise PipelineError(
                f"{path}: predicts other ids than {self.oof_path if kind == 'oof' else self.test_path}; "
                f"rerun `pipeline predict <config of {self.name}>`"
            )
        return probs_of(df.set_index("id").reindex(ids), class_names)


def load_member(entry: str, i: int, path: Path, competition: str, runs_root: Path) -> Member:
    """Find member ``i``'s run folder (``entry``: a run folder or an experiment config) and its prediction files."""
    where = f"{path}: members[{i}]"
    found = _resolve(entry, path.parent)
    if found is None:
        raise PipelineError(
            f"{where}: {entry} not found; expected a run directory ({runs_root}/<competition>/<experiment>) "
            "or an experiment config"
        )
    if found.is_dir():
        run = RunDir(path=found)
        if found.parent.parent.name == runs_root.name and found.parent.name != competition:
            raise PipelineError(
                f"{where}: {entry} is a run of {found.parent.name!r}; expected a run of {competition!r}"
            )
    elif found.suffix in (".yaml", ".yml"):
        mcfg = load_config(found, check_data=False)
        if mcfg.competition != competition:
            raise PipelineError(f"{where}: {entry} is an experiment of {mcfg.competition!r}; expected {competition!r}")
        run = RunDir.of(mcfg)
    else:
        raise PipelineError(f"{where}: {entry} is neither a run directory nor a YAML config")
    info = read_predict_info(run)
    oof_path, test_path = run.oof_file(info.get("oof", "oof.csv")), run.test_pred
    for f in (test_path, oof_path):
        if not f.is_file():
            raise PipelineError(f"{where}: {f} not found; run `pipeline predict` for that experiment first")
    return Member(run.name, run, info, oof_path, test_path)


def check_members(members: list[Member], path: Path) -> list[str]:
    """Same classes, ids, targets and folds; reads every member and aligns it to the first one's row
    order. Returns the class names."""
    first = members[0]
    class_names = read_classes(first.oof_path, "oof")
    for m in members:  # from the headers: a member of other classes is named before its rows are checked
        mc, tc = read_classes(m.oof_path, "oof"), read_classes(m.test_path, "test")
        if mc != class_names or tc != class_names:
            raise PipelineError(
                f"{path}: member {m.name} predicts classes {pcols(mc or tc)}; "
                f"expected {pcols(class_names)} like {first.name}"
            )
    for m in members:
        m.read(class_names)
    ids, tids = pd.Index(first.oof["id"]), pd.Index(first.test["id"])
    for m in members[1:]:
        if set(m.oof["id"]) != set(ids) or len(m.oof) != len(ids):
            raise PipelineError(
                f"{path}: member {m.name} has OOF predictions for other training ids than {first.name}; "
                f"expected experiments of the same training data"
            )
        if set(m.test["id"]) != set(tids) or len(m.test) != len(tids):
            raise PipelineError(
                f"{path}: member {m.name} predicts other test ids than {first.name}; rerun its `pipeline predict`"
            )
        m.oof = m.oof.set_index("id").reindex(ids).reset_index()
        m.test = m.test.set_index("id").reindex(tids).reset_index()
        diff = m.oof["fold"].to_numpy() != first.oof["fold"].to_numpy()
        if diff.any():
            j = int(np.flatnonzero(diff)[0])
            raise PipelineError(
                f"{path}: members {first.name} and {m.name} were trained on different folds "
                f"({int(diff.sum())} rows differ, e.g. id {ids[j]!r}: "
                f"fold {first.oof['fold'][j]} vs {m.oof['fold'][j]}); "
                f"expected experiments that share one folds file"
            )
        if (m.oof["target"].to_numpy() != first.oof["target"].to_numpy()).any():
            raise PipelineError(
                f"{path}: members {first.name} and {m.name} disagree on training labels; "
                "expected the same training data"
            )
    return class_names
