"""pipeline tune on SQLite: space validation, pinning, resume, pruning, outputs, samplers, stale trials.

Trials are tiny: sklearn's 8x8 digits, simple_cnn, 1-2 epochs of 2 steps, one fold.
"""

import sqlite3
import threading
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import run_cli
from optuna.trial import TrialState

from pipeline.config.load import load_config

SPACE = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "train.optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
    "train.momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"train.optimizer": "sgd"}},
}
FAST = {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 32}
DB = Path("runs/comp/tune/optuna.db")


@pytest.fixture
def tune_config(digits_config):
    def make(space=None, train=None, tune=None, **sections):
        t = {
            "folds": [0],
            "plots": False,
            "n_startup_trials": 2,
            "space": SPACE if space is None else space,
            **(tune or {}),
        }
        return digits_config(train={**FAST, **(train or {})}, tune=t, **sections)

    return make


def load(study="exp"):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{DB.resolve()}")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ---- space validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, spec, expected",
    [
        (
            "train.lrr",
            {"type": "float", "low": 1e-4, "high": 1e-2},
            "tune.space.train.lrr: not a config key; did you mean train.lr",
        ),
        ("train.optimizer", {"type": "categorical", "choices": []}, "tune.space.train.optimizer: choices: empty"),
        ("train.lr", {"type": "float", "low": 0.1, "high": 0.01}, "tune.space.train.lr: low 0.1 > high 0.01"),
        (
            "train.lr",
            {"type": "float", "low": 0.0, "high": 0.01, "log": True},
            "tune.space.train.lr: log range needs low > 0, got low 0",
        ),
        (
            "train.lr",
            {"type": "gaussian", "low": 0.0, "high": 0.01},
            "tune.space.train.lr: unknown type 'gaussian'; expected one of float, int, categorical",
        ),
        (
            "train.lr",
            {"type": "float", "lo": 0.0, "high": 0.01},
            "tune.space.train.lr: unknown field 'lo'; did you mean low?",
        ),
        (
            "train.lr",
            {"type": "float", "low": -1.0, "high": 0.01},
            "tune.space.train.lr: low -1.0 is not a valid value: Input should be greater than 0",
        ),
        (
            "train.optimizer",
            {"type": "categorical", "choices": ["adamw", "sgdd"]},
            "tune.space.train.optimizer: choice 'sgdd' is not a valid value",
        ),
        (
            "train.epochs",
            {"type": "float", "low": 1, "high": 5},
            "tune.space.train.epochs: the config key holds integers; use type: int",
        ),
        (
            "folds.seed",
            {"type": "int", "low": 1, "high": 5},
            "tune.space.folds.seed: cannot be searched: every trial must use the same folds",
        ),
        (
            "augment.Rotate.limit",
            {"type": "int", "low": 1, "high": 5},
            "tune.space.augment.Rotate.limit: no augment entry named 'Rotate'",
        ),
        (
            "train.momentum",
            {"type": "float", "low": 0.8, "high": 0.9, "when": {"train.optimiser": "sgd"}},
            "tune.space.train.momentum: when: unknown key 'train.optimiser'; did you mean train.optimizer?",
        ),
    ],
)
def test_bad_space_is_one_line_naming_file_and_key(tune_config, capsys, key, spec, expected):
    path = tune_config(space={key: spec}, augment=[{"name": "Affine", "rotate": [-10, 10], "p": 0.5}])
    assert run_cli("tune", path, "--n-trials", 1) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {path}: ") and expected in err, err
    assert not DB.exists()  # refused before any storage or training


def test_augment_value_checked_against_albumentations(tune_config, capsys):
    path = tune_config(
        space={"augment.Affine.p": {"type": "float", "low": 0.0, "high": 1.5}},
        augment=[{"name": "Affine", "rotate": [-10, 10], "p": 0.5}],
    )
    assert run_cli("tune", path, "--n-trials", 1) == 2
    err = one_line_error(capsys)
    assert f"{path}: tune.space.augment.Affine.p: high 1.5 is not valid" in err, err


def test_empty_space_and_bad_flags(tune_config, capsys):
    path = tune_config(space={"train.lr": SPACE["train.lr"]})
    assert run_cli("tune", path, "train.lr=0.001") == 2
    assert "tune.space: nothing to search (every key is pinned on the command line)" in one_line_error(capsys)
    assert run_cli("tune", path, "--n-trials", 0) == 2
    assert "--n-trials 0; expected a positive number" in one_line_error(capsys)
    assert run_cli("tune", path, "--study", "a/b") == 2
    assert "--study 'a/b'" in one_line_error(capsys)


# ---- storage errors ---------------------------------------------------------------------


def test_unreachable_or_bad_storage_is_one_line(tune_config, capsys):
    path = tune_config()
    assert run_cli("tune", path, "--n-trials", 1, "--storage", "postgresql://nobody:secret@127.0.0.1:1/nodb") == 2
    err = one_line_error(capsys)
    assert (
        err.startswith("error: --storage postgresql+psycopg://nobody:***@127.0.0.1:1/nodb: cannot connect (")
        and "secret" not in err
    ), err
    assert run_cli("tune", path, "--n-trials", 1, "--storage", "not a url") == 2
    assert "--storage 'not a url': not a database URL" in one_line_error(capsys)
    assert run_cli("tune", path, "--n-trials", 1, "--storage", "nosuchdb://x/y") == 2
    assert "unknown database kind 'nosuchdb'" in one_line_error(capsys)


def test_study_with_other_direction_is_refused(tune_config, capsys):
    path = tune_config()  # metric accuracy: maximize
    DB.parent.mkdir(parents=True)
    optuna.create_study(study_name="exp", storage=f"sqlite:///{DB.resolve()}", direction="minimize")
    assert run_cli("tune", path, "--n-trials", 1) == 2
    err = one_line_error(capsys)
    assert (
        "--study exp: exists in sqlite:///" in err
        and "and minimizes, but metric accuracy is maximized; use another --study name" in err
    )


# ---- resume, pinning, budget ------------------------------------------------------------


def test_resume_and_pinned_key(tune_config, capsys):
    path = tune_config()
    assert run_cli("tune", path, "--n-trials", 3, "train.optimizer=sgd") == 0
    out = capsys.readouterr().out
    assert "pinned on the command line, left out of the search: train.optimizer=sgd" in out
    assert "objective maximize mean val_accuracy over folds [0] (a subset (tune.folds) of 3)" in out
    assert out.count("COMPLETE") >= 3 and "| best " in out
    assert run_cli("tune", path, "--n-trials", 2, "train.optimizer=sgd") == 0
    assert "resuming with 3 trials" in capsys.readouterr().out
    study = load()
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        assert "train.optimizer" not in t.params and "train.momentum" in t.params  # pinned sgd: momentum is active
        snap = yaml.safe_load(Path(f"runs/comp/tune/exp/trial_{t.number}/config.train.yaml").read_text())
        assert snap["train"]["optimizer"] == "sgd" and snap["train"]["lr"] == pytest.approx(t.params["train.lr"])
    df = pd.read_csv("runs/comp/tune/exp/trials.csv")
    assert df["number"].tolist() == [0, 1, 2, 3, 4] and "params_train.lr" in df.columns
    # best.yaml alone reproduces the best trial: the pinned key is in it; a copy sits at tune/best.yaml
    best = yaml.safe_load(Path("runs/comp/tune/exp/best.yaml").read_text())
    assert best["train.optimizer"] == "sgd" and best["train.lr"] == pytest.approx(study.best_trial.params["train.lr"])
    assert Path("runs/comp/tune/best.yaml").read_text() == Path("runs/comp/tune/exp/best.yaml").read_text()


def test_max_trials_caps_the_study(tune_config, capsys):
    path = tune_config()
    assert run_cli("tune", path, "--n-trials", 5, "--max-trials", 2) == 0
    assert len(load().trials) == 2
    assert run_cli("tune", path, "--n-trials", 5, "--max-trials", 2) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert len(load().trials) == 2


def test_trial_over_the_cap_in_a_race_is_failed_without_training(tune_config, monkeypatch, capsys):
    """Another worker's trial started between this worker's budget check and its ask(): the cap holds."""
    import pipeline.tune.study as study_mod
    import pipeline.tune.tuner as tune_mod

    path = tune_config(tune={"heartbeat_s": 600})
    DB.parent.mkdir(parents=True)
    storage = study_mod.open_storage(f"sqlite:///{DB.resolve()}", load_config(path).tune)
    study = optuna.create_study(study_name="exp", storage=storage, direction="maximize")
    other = storage.create_new_trial(study._study_id)  # RUNNING in "another worker", heartbeat fresh
    storage.record_heartbeat(other)
    real = study_mod._counted
    monkeypatch.setattr(tune_mod, "_counted", lambda s, before=None: 0 if before is None else real(s, before))
    assert run_cli("tune", path, "--n-trials", 3, "--max-trials", 1) == 0
    out = capsys.readouterr().out
    assert "trial   1 FAIL     OverBudget: over --max-trials 1" in out
    trials = load().trials
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL]
    assert not Path("runs/comp/tune/exp/trial_1").exists()


# ---- pruning ------------------------------------------------------------------------------


def test_pruned_trial_stops_training_at_once(tune_config, monkeypatch, capsys):
    import pipeline.tune.tuner as tune_mod

    path = tune_config(train={"epochs": 3}, tune={"folds": [0, 1]})
    monkeypatch.setattr(
        tune_mod, "build_pruner", lambda *a: optuna.pruners.ThresholdPruner(lower=2.0)
    )  # accuracy < 2: always
    threads = threading.active_count()
    assert run_cli("tune", path, "--n-trials", 2) == 0
    out = capsys.readouterr().out
    assert out.count("PRUNED   at fold 0 epoch 1") == 2, out
    for t in load().trials:
        assert t.state == TrialState.PRUNED and list(t.intermediate_values) == [1]
        run = Path(f"runs/comp/tune/exp/trial_{t.number}")
        assert pd.read_csv(run / "fold_0" / "history.csv")["epoch"].tolist() == [1]  # stopped after epoch 1 of 3
        assert not (run / "fold_1").exists()  # and never started the next fold
        assert not list(run.rglob("*.pt")) and not list(run.rglob("*.safetensors"))
    assert threading.active_count() <= threads + 1  # the pruned folds' TensorBoard writers were closed


def test_intermediate_values_per_epoch_or_per_fold(tune_config):
    path = tune_config(train={"epochs": 2}, tune={"folds": [0, 1], "pruner": "median"})
    assert run_cli("tune", path, "--n-trials", 1, "--study", "ep") == 0
    assert list(load("ep").trials[0].intermediate_values) == [1, 2]  # epochs of fold 0
    path = tune_config(train={"epochs": 2}, tune={"folds": [2, 0], "pruner": "wilcoxon"})
    assert run_cli("tune", path, "--n-trials", 1, "--study", "wx") == 0
    t = load("wx").trials[0]
    assert sorted(t.intermediate_values) == [0, 2]  # one value per fold, step = fold number
    assert t.value == pytest.approx(sum(t.intermediate_values.values()) / 2)
    assert t.user_attrs["folds"] == [2, 0]


@pytest.mark.parametrize(
    "pruner, cls", [("halving", optuna.pruners.SuccessiveHalvingPruner), ("hyperband", optuna.pruners.HyperbandPruner)]
)
def test_halving_and_hyperband_prune_on_epochs(tune_config, pruner, cls, capsys):
    path = tune_config(train={"epochs": 3}, tune={"pruner": pruner, "n_startup_trials": 1})
    assert run_cli("tune", path, "--n-trials", 4, "--study", pruner) == 0
    assert f"{cls.__name__} on the epochs of fold 0" in capsys.readouterr().out
    study = load(pruner)
    states = [t.state for t in study.trials]
    assert len(states) == 4 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in study.trials:  # epoch values of the first fold, reported for the pruner to compare
        assert list(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        assert len(t.intermediate_values) == 3 or t.state == TrialState.PRUNED


def test_timeout_budget(tune_config, capsys):
    path = tune_config()
    assert run_cli("tune", path, "--timeout", 0.5, "--study", "budget") == 0
    n = len(load("budget").trials)
    assert 1 <= n < 10  # stops after the trial running when the time is up, not after tune.n_trials


# ---- samplers -----------------------------------------------------------------------------


def test_tpe_is_seeded_and_conditions_switch_parameters_off(tune_config, capsys):
    path = tune_config(tune={"sampler": "tpe", "seed": 3, "n_startup_trials": 2})
    for study in ("t1", "t2"):
        assert run_cli("tune", path, "--n-trials", 4, "--study", study) == 0
    p1, p2 = [t.params for t in load("t1").trials], [t.params for t in load("t2").trials]
    assert p1 == p2 and len({str(p) for p in p1}) == 4  # TPE after its startup trials reproduces too
    for t in load("t1").trials:  # momentum exists only when the optimizer is sgd
        assert ("train.momentum" in t.params) == (t.params["train.optimizer"] == "sgd")
    assert run_cli("tune", path, "--n-trials", 2, "--study", "adamw", "train.optimizer=adamw") == 0
    assert all(set(t.params) == {"train.lr"} for t in load("adamw").trials)


def test_sampler_choice_and_seeding(tune_config, capsys):
    space = {
        "train.lr": SPACE["train.lr"],
        "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    }
    path = tune_config(space=space, tune={"sampler": "random", "seed": 7})
    assert run_cli("tune", path, "--n-trials", 2, "--study", "r1") == 0
    assert run_cli("tune", path, "--n-trials", 2, "--study", "r2") == 0
    p1, p2 = [t.params for t in load("r1").trials], [t.params for t in load("r2").trials]
    assert p1 == p2 and p1[0] != p1[1]  # same seed, same search; trials differ
    assert "sampler random (seed 7)" in capsys.readouterr().out

    path = tune_config(tune={"sampler": "cmaes"})  # SPACE has a categorical
    assert run_cli("tune", path, "--n-trials", 1) == 2
    assert "tune.space.train.optimizer: tune.sampler cmaes searches numeric spaces only" in one_line_error(capsys)
    pytest.importorskip("cmaes")
    path = tune_config(space=space, tune={"sampler": "cmaes", "n_startup_trials": 1})
    assert run_cli("tune", path, "--n-trials", 3, "--study", "cma") == 0
    trials = load("cma").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert any(k.startswith("cma:") for k in trials[-1].system_attrs)  # sampled by CMA-ES, not at random


# ---- outputs ------------------------------------------------------------------------------


def test_best_yaml_round_trips_through_train_params(tune_config, capsys):
    space = {
        **SPACE,
        "augment.Affine.p": {"type": "float", "low": 0.1, "high": 0.9},
        "augment.0.rotate": {"type": "int", "low": 0, "high": 20},
    }
    path = tune_config(
        space=space,
        augment=[{"name": "Affine", "rotate": [-10, 10], "p": 0.5}],
        tune={"plots": True},
        train={"max_steps_per_epoch": 6, "batch_size": 64},
    )
    assert run_cli("tune", path, "--n-trials", 3) == 0
    out = capsys.readouterr().out
    study = load()
    best = study.best_trial
    best_yaml = Path("runs/comp/tune/exp/best.yaml")
    d = yaml.safe_load(best_yaml.read_text())
    assert (
        d["train.lr"] == pytest.approx(best.params["train.lr"])
        and d["train.optimizer"] == best.params["train.optimizer"]
    )
    assert d["augment"] == [
        {
            "name": "Affine",
            "rotate": best.params["augment.0.rotate"],
            "p": pytest.approx(best.params["augment.Affine.p"]),
        }
    ]
    assert f"use: pipeline train {path} --params {best_yaml}" in out
    assert run_cli("train", path, "--params", best_yaml, "--folds", "0") == 0
    snap = yaml.safe_load(Path("runs/comp/exp/config.train.yaml").read_text())
    assert (
        snap["train"]["lr"] == pytest.approx(best.params["train.lr"])
        and snap["train"]["optimizer"] == best.params["train.optimizer"]
    )
    assert snap["augment"][0]["rotate"] == best.params["augment.0.rotate"]
    # trials.csv lists the study; plots as HTML (offline plotly) and PNG
    df = pd.read_csv("runs/comp/tune/exp/trials.csv")
    assert len(df) == 3 and set(df["state"]) == {"COMPLETE"} and "params_augment.Affine.p" in df.columns
    plots = Path("runs/comp/tune/exp/plots")
    names = ["history", "parallel", "slice"] + (["importances"] if df["value"].nunique() > 1 else [])  # needs variation
    for name in names:
        assert (plots / f"{name}.html").stat().st_size > 1000 and (plots / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (plots / "plotly.min.js").exists() and 'src="plotly.min.js"' in (plots / "history.html").read_text()


# ---- dead workers ---------------------------------------------------------------------------


def test_stale_running_trial_is_failed_and_retried(tune_config, capsys):
    """A trial left RUNNING by a killed process (heartbeat long silent) is marked FAIL and re-run
    with the same parameters by the next worker."""
    import pipeline.tune.study as study_mod

    path = tune_config(tune={"heartbeat_s": 1})
    DB.parent.mkdir(parents=True)
    storage = study_mod.open_storage(f"sqlite:///{DB.resolve()}", load_config(path).tune)
    study = optuna.create_study(study_name="exp", storage=storage, direction="maximize")
    dead = storage.create_new_trial(study._study_id)
    dist = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    storage.set_trial_param(dead, "train.lr", dist.to_internal_repr(0.003), dist)
    storage.set_trial_param(dead, "train.optimizer", 0, optuna.distributions.CategoricalDistribution(["adamw", "sgd"]))
    storage.record_heartbeat(dead)
    with sqlite3.connect(DB) as db:  # the worker died an hour ago
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    assert run_cli("tune", path, "--n-trials", 1) == 0
    out = capsys.readouterr().out
    assert "trial   1 COMPLETE" in out and "(retry of trial 0)" in out
    t0, t1 = load().trials
    assert t0.state == TrialState.FAIL
    assert t1.state == TrialState.COMPLETE and t1.system_attrs["failed_trial"] == 0
    assert t1.params == {"train.lr": pytest.approx(0.003), "train.optimizer": "adamw"}


def test_failing_trials_stop_the_search(tune_config, capsys):
    path = tune_config(
        space={"train.batch_size": {"type": "categorical", "choices": [100000]}, "train.lr": SPACE["train.lr"]},
        model={"backbone": "no_such_net"},
    )
    assert run_cli("tune", path, "--n-trials", 10) == 2
    captured = capsys.readouterr()
    assert captured.out.count(" FAIL ") == 3
    assert "tune stopped: 3 trials in a row failed; last trial 2:" in captured.err
    assert len(load().trials) == 3


@pytest.mark.parametrize(
    "searched, cut_kept",
    [
        (SPACE, True),
        ({**SPACE, "train.epochs": {"type": "int", "low": 1, "high": 9}}, False),
        ({"train.batch_size": {"type": "categorical", "choices": [16, 32]}}, False),
    ],
)
def test_trials_drop_the_plans_epoch_cut_when_epochs_or_batch_are_searched(tune_config, searched, cut_kept):
    """The plan cut each epoch to fit its own epoch count and batch (plan._fill_steps); a trial that
    searches either trains whole epochs, as the final `pipeline train --params` of its best values does."""
    from pipeline.tune.space import parse_space
    from pipeline.tune.tuner import trial_base

    cfg = load_config(tune_config(space=searched, train={"max_steps_per_epoch": 7, "seeds": [1, 2], "refit": True}))
    planned_cut = cfg.model_copy(update={"plan": {"values": {"train.epochs": 3, "train.max_steps_per_epoch": 7}}})
    base = trial_base(planned_cut, parse_space(planned_cut))
    assert base["train"]["seeds"] is None and base["train"]["refit"] is False
    assert base["train"]["max_steps_per_epoch"] == (7 if cut_kept else None)
    # a cut the user set (not the plan's) is theirs to keep
    assert trial_base(cfg, parse_space(cfg))["train"]["max_steps_per_epoch"] == 7
