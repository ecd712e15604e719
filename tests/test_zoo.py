"""pipeline zoo: members as experiments on one folds file, override precedence, order independence,
resume, the members' table and the blend; bad zoo files; TensorBoard HParams of runs and tuning trials.

Members are tiny: sklearn's 8x8 digits, simple_cnn, 1 epoch, 3 folds.
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import cli_error, run_cli, write_yaml
from hypothesis import given
from hypothesis import strategies as st

from pipeline.zoo import load_zoo

QUICK = {"evaluate": {"gradcam_samples": 0, "adversarial": False}, "predict": {"tta": ["identity"]}}
MEMBERS = {"a": {"train.seed": 1}, "b": {"train.seed": 2, "model.drop_rate": 0.1}}


@pytest.fixture
def zoo(tmp_path, digits_config):
    """Write base.yaml (the digits config) and a zoo file beside it; returns the zoo's path."""
    base = digits_config(name="base", train={"epochs": 1}, **QUICK)

    def make(members=None, name="z", folder=None, **extra):
        folder = Path(folder or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        d = {
            "base": str(base) if folder != tmp_path else base.name,
            "members": MEMBERS if members is None else members,
            **extra,
        }
        return write_yaml(folder / f"{name}.yaml", d)

    return make


def session(folder: Path) -> tuple[dict, dict]:
    """(hyperparameters, metric scalars) of the one HParams session in ``folder``, read with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert metadata.EXPERIMENT_TAG not in content  # one run's summary would hide every other run's columns
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == 1  # STATUS_SUCCESS
    hp = {k: (v.string_value if v.HasField("string_value") else v.number_value) for k, v in start.hparams.items()}
    return hp, {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]}


def mtimes(run: Path) -> dict:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.glob("fold_*/*")) if p.is_file()}


# ---- the stage, end to end ------------------------------------------------------------------


def test_zoo_trains_members_prints_table_blends_and_resumes(zoo, capsys):
    path = zoo()
    assert run_cli("zoo", path, "train.epochs=1", "--ensemble", "weights") == 0
    out = capsys.readouterr().out
    runs = Path("runs/comp")
    assert sorted(p.name for p in runs.iterdir()) == ["z", "z-a", "z-b"]
    assert [p.name for p in Path("folds").glob("*.csv")] == ["comp.csv"]  # one folds file for all members
    table = out[out.index("zoo members") :]
    for m in ("a", "b"):
        run = runs / f"z-{m}"
        for f in ("oof.csv", "metrics.json", "test_pred.csv", "config.train.yaml"):
            assert (run / f).is_file(), run / f
        metrics = json.loads((run / "metrics.json").read_text())
        mean, std = metrics["cv_mean"]["accuracy"], metrics["cv_std"]["accuracy"]
        row = next(line for line in table.splitlines() if re.match(rf"{m}\*?\s+z-{m}\s", line))
        assert f"{mean:.4f}" in row and f"{std:.4f}" in row, row
        assert re.search(r"\d+\.\ds$", row), row  # trained now: this run's seconds
        # the run's TensorBoard HParams session: the headline keys and the CV metric
        hp, scalars = session(run / "tb_hparams")
        assert hp == {
            "model.backbone": "simple_cnn",
            "image_size": 8,
            "train.lr": pytest.approx(3e-3),
            "train.batch_size": 64,
            "train.epochs": 1,
            "train.optimizer": "adam",
        }
        assert scalars["cv_accuracy"] == pytest.approx(mean, abs=1e-6) and "oof_accuracy" in scalars
    assert "cv accuracy" in table and "cv std" in table and "img/s" in table
    # the members' own overrides reached their runs
    snap_b = yaml.safe_load((runs / "z-b/config.train.yaml").read_text())
    assert snap_b["train"]["seed"] == 2 and snap_b["model"]["drop_rate"] == 0.1
    # the blend of every member
    ens = json.loads((runs / "z/ensemble.json").read_text())
    assert (
        ens["method"] == "weights" and ens["experiments"] == ["z-a", "z-b"] and sum(ens["weights"]) == pytest.approx(1)
    )
    assert len(list(Path("submissions").glob("comp-z-2*.csv"))) == 1

    # a rerun trains nothing
    before = {m: mtimes(runs / f"z-{m}") for m in "ab"}
    assert run_cli("zoo", path, "train.epochs=1") == 0
    out = capsys.readouterr().out
    assert out.count("[train] up to date") == 2 and "epoch 1/1" not in out
    assert {m: mtimes(runs / f"z-{m}") for m in "ab"} == before
    assert "blending" not in out  # no --ensemble and no ensemble: section

    # another blend of the same members: ensemble selection, nothing retrained
    assert run_cli("zoo", path, "train.epochs=1", "--ensemble", "hillclimb") == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" not in out and "in-sample accuracy" in out
    ens = json.loads((runs / "z/ensemble.json").read_text())
    assert ens["method"] == "hillclimb" and sum(ens["weights"]) == pytest.approx(1)
    assert {m: mtimes(runs / f"z-{m}") for m in "ab"} == before

    # a member cut short (no oof.csv, one fold unfinished) resumes at that fold alone
    (runs / "z-b/oof.csv").unlink()
    (runs / "z-b/fold_2/done.json").unlink()
    assert run_cli("zoo", path, "train.epochs=1") == 0
    out = capsys.readouterr().out
    assert "fold 0: done, skipping" in out and "fold 1: done, skipping" in out and "fold 2 epoch 1/1" in out
    assert out.count("epoch 1/1") == 1
    after = mtimes(runs / "z-b")
    assert {k: v for k, v in after.items() if not k.startswith("fold_2")} == {
        k: v for k, v in before["b"].items() if not k.startswith("fold_2")
    }
    assert mtimes(runs / "z-a") == before["a"]


# ---- configs: precedence and order ------------------------------------------------------------


def test_member_overrides_beat_command_line_beat_base(zoo):
    path = zoo(members={"fast": {"train.lr": 0.02, "model.drop_rate": 0.3}, "plain": None})
    z = load_zoo(path, ["train.lr=0.01", "train.batch_size=16"])
    fast, plain = z.members["fast"], z.members["plain"]
    assert z.base.train.lr == 0.01 and z.base.train.batch_size == 16  # the command line over the base
    assert plain.train.lr == 0.01 and plain.train.batch_size == 16 and plain.model.drop_rate == 0.0
    assert fast.train.lr == 0.02 and fast.train.batch_size == 16 and fast.model.drop_rate == 0.3  # the member over both
    assert fast.train.optimizer == "adam"  # untouched keys stay the base's
    assert (fast.name, plain.name) == ("z-fast", "z-plain")
    assert fast.run_dir == Path("runs/comp/z-fast") and fast.folds_path == plain.folds_path == z.base.folds_path


@given(order=st.permutations(["c", "a", "b"]), flip=st.booleans())
def test_reordering_members_changes_no_name_or_hash(zoo, tmp_path, order, flip):
    members = {"a": {"train.seed": 1, "train.lr": 0.01}, "b": {"model.drop_rate": 0.2}, "c": None}
    shuffled = {m: (dict(reversed(list(members[m].items()))) if flip and members[m] else members[m]) for m in order}
    first = load_zoo(zoo(members=members, folder=tmp_path / "one"))
    again = load_zoo(zoo(members=shuffled, folder=tmp_path / "two"))
    assert list(first.members) == list(again.members) == ["a", "b", "c"]  # trained in the order of their names
    for m in members:
        x, y = first.members[m], again.members[m]
        assert (x.name, x.run_dir, x.hash(), x.hash("train")) == (y.name, y.run_dir, y.hash(), y.hash("train"))


# ---- bad zoo files: one line naming the key, nothing written ----------------------------------


def _set(**kw):
    return lambda d: d.update(kw)


BAD = {
    "typo": (lambda d: d.update(member=d.pop("members")), "unknown key 'member'; did you mean members?"),
    "no base file": (_set(base="nowhere.yaml"), "base: nowhere.yaml not found"),
    "no base key": (lambda d: d.pop("base"), "missing required key 'base'"),
    "empty members": (_set(members={}), "members: no members"),
    "unknown member key": (
        _set(members={"a": {"model.backbon": "simple_cnn"}}),
        "members.a: unknown config key 'model.backbon'; did you mean model.backbone",
    ),
    "shared folds": (_set(members={"a": {"folds.seed": 3}}), "members.a: folds.seed: members share the base's"),
    "shared data": (_set(members={"a": {"data.dir": "elsewhere"}}), "members.a: data.dir: members share the base's"),
    "bad value": (_set(members={"a": {"train.lr": -1}}), "members.a: train.lr: Input should be greater than 0"),
    "bad name": (
        _set(members={"a": {"train.optimizer": "lion"}}),
        "members.a: train.optimizer: unknown optimizer 'lion'",
    ),
    "not a mapping": (_set(members={"a": [1, 2]}), "members: member a: got [1, 2]; expected a mapping"),
    "member name": (_set(members={"a b": None}), "members: member name 'a b'"),
    "ensemble typo": (_set(ensemble={"methd": "mean"}), "unknown key 'ensemble.methd'; did you mean ensemble.method"),
    "ensemble nested typo": (
        _set(ensemble={"method": "gbm", "gbm": {"num_leavs": 3}}),
        "unknown key 'ensemble.gbm.num_leavs'; did you mean ensemble.gbm.num_leaves",
    ),
    "ensemble filled": (_set(ensemble={"members": ["x", "y"]}), "ensemble.members: the zoo sets it"),
    "ensemble method": (_set(ensemble={"method": "median"}), "ensemble.method: "),
    "one member blend": (
        _set(ensemble={"method": "mean"}, members={"a": None}),
        "ensemble: a blend needs at least 2 members; members has 1",
    ),
}


@pytest.mark.parametrize("mutate, expected", list(BAD.values()), ids=list(BAD))
def test_bad_zoo_file_is_one_line_and_writes_nothing(zoo, tmp_path, capsys, mutate, expected):
    path = zoo()
    d = yaml.safe_load(path.read_text())
    mutate(d)
    write_yaml(path, d)
    before = sorted(p.name for p in tmp_path.iterdir())
    err = cli_error(capsys, "zoo", path)
    assert err.startswith(f"error: {path}: ") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, folds/ or submissions/


def test_bad_command_line_is_one_line_and_writes_nothing(zoo, tmp_path, capsys):
    path = zoo()
    before = sorted(p.name for p in tmp_path.iterdir())
    err = cli_error(capsys, "zoo", path, "--ensemble", "median")
    assert err.startswith("error: command line: --ensemble median: "), err
    err = cli_error(capsys, "zoo", path, "train.lrr=0.1")
    assert "unknown key 'train.lrr'" in err and "base.yaml" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- HParams ------------------------------------------------------------------------------------


def test_hparams_folder_is_replaced_not_appended(tmp_path):
    from pipeline.train.hparams import write_hparams

    folder = tmp_path / "run/tb_hparams"
    write_hparams(folder, {"train.lr": 0.1, "model.backbone": "x", "augment": [1, 2]}, {"cv_logloss": 0.5})
    write_hparams(folder, {"train.lr": 0.2, "model.backbone": "y"}, {"cv_logloss": 0.4, "cv_logloss_std": float("nan")})
    hp, scalars = session(folder)  # one events file, the second session
    assert hp == {"train.lr": pytest.approx(0.2), "model.backbone": "y"} and scalars == {
        "cv_logloss": pytest.approx(0.4)
    }
    assert [p.name for p in folder.parent.iterdir()] == ["tb_hparams"]  # no temporary folder left


def test_tuning_trial_writes_searched_keys_and_cv_metric(digits_config):
    import optuna

    space = {
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "train.optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
        "model.drop_rate": {"type": "float", "low": 0.0, "high": 0.5},
    }
    path = digits_config(
        train={"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 32},
        tune={"folds": [0, 1], "plots": False, "space": space},
    )
    assert run_cli("tune", path, "--n-trials", 1) == 0
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{Path('runs/comp/tune/optuna.db').resolve()}")
    trial = study.trials[0]
    hp, scalars = session(Path("runs/comp/tune/exp/trial_0/tb_hparams"))
    for key, value in trial.params.items():  # the searched keys, as the trial drew them
        assert hp[key] == (pytest.approx(value) if isinstance(value, float) else value)
    assert {"model.backbone", "image_size", "train.batch_size", "train.epochs"} <= set(hp)  # and the headline keys
    assert hp["train.batch_size"] == 32 and hp["image_size"] == 8
    assert scalars["cv_accuracy"] == pytest.approx(trial.value, abs=1e-6)
    assert scalars["cv_accuracy_std"] == pytest.approx(trial.user_attrs["cv_std"], abs=1e-6)


@pytest.mark.parametrize("name, n_members", [("iceberg-demo-zoo", 3), ("iceberg-zoo", 6)])
def test_shipped_zoos_load(iceberg_dir, name, n_members):
    root = Path(__file__).resolve().parents[1] / "competitions"
    z = load_zoo(root / f"{name}.yaml", [f"data.dir={iceberg_dir}"])
    assert len(z.members) == n_members and z.ensemble["name"] == name
    assert all(cfg.name == f"{name}-{m}" and cfg.folds_path == z.base.folds_path for m, cfg in z.members.items())
    if name == "iceberg-zoo":  # the YAML merge keys carry a backbone's keys to its second seed
        assert {(c.model.backbone, c.train.seed, c.model.finetune) for c in z.members.values()} == {
            (f"tf_efficientnet_lite{i}", s, "gradual") for i in range(3) for s in (1, 2)
        }
        assert z.base.train.seeds == "auto" and all(
            c.train.seeds is None for c in z.members.values()
        )  # the zoo's seeds
