import pytest
import yaml
from conftest import run_cli, write_yaml

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError


@pytest.fixture
def base(tmp_path):
    (tmp_path / "data").mkdir()
    return write_yaml(
        tmp_path / "base.yaml",
        {
            "competition": "iceberg",
            "data": {"format": "statoil_json", "dir": "data"},
            "train": {"lr": "3e-4", "epochs": 3},
        },
    )


def test_defaults_and_keys_every_config_has(base):
    cfg = load_config(base)
    assert cfg.name == "base" and cfg.competition == "iceberg"
    for key in [
        "data.dir",
        "folds.n_splits",
        "folds.seed",
        "model.backbone",
        "model.pretrained",
        "train.epochs",
        "train.batch_size",
        "train.lr",
        "train.patience",
        "train.device",
    ]:
        sec, k = key.split(".")
        assert k in type(getattr(cfg, sec)).model_fields and getattr(getattr(cfg, sec), k) is not None
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string: coerced by the schema


def test_override_is_coerced_through_schema(base):
    cfg = load_config(base, ["train.lr=3e-4", "train.epochs=7", "model.pretrained=false", "train.device=cuda:1"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 7 and cfg.model.pretrained is False and cfg.train.device == "cuda:1"


def test_extends_relative_to_file_and_name_is_stem(tmp_path, base):
    sub = tmp_path / "exps"
    sub.mkdir()
    child = write_yaml(sub / "lite1.yaml", {"extends": "../base.yaml", "model": {"backbone": "tf_efficientnet_lite1"}})
    cfg = load_config(child)
    assert cfg.competition == "iceberg"  # inherited
    assert cfg.name == "lite1" and cfg.model.backbone == "tf_efficientnet_lite1"
    assert cfg.train.epochs == 3
    assert str(cfg.run_dir) == "runs/iceberg/lite1"


def test_data_dir_override_reads_elsewhere(base, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    cfg = load_config(base, [f"data.dir={tmp_path / 'elsewhere'}"])
    assert cfg.data_dir == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], r"base.yaml: unknown key 'train.lrr'; did you mean train.lr"),
        (["train.lr=fast"], r"base.yaml: train.lr: got 'fast'; expected auto or a number > 0"),
        (["train.epochs=0"], r"train.epochs: Input should be greater than or equal to 1"),
        (["train.device=gpu"], r"train.device: got 'gpu'; expected auto, cpu, cuda, cuda:N or mps"),
        (["data.dir=nowhere"], r"base.yaml: data.dir: nowhere does not exist"),
        (
            ["data.format=parquet"],
            r"data.format: unknown format 'parquet'; expected one of image_folder, pixel_csv, statoil_json",
        ),
        (
            ["train.optimizer=lion"],
            r"train.optimizer: unknown optimizer 'lion'; expected one of adadelta, adam, adamw, rmsprop, sgd$",
        ),
        (["nosection=1"], r"unknown key 'nosection'"),
        (["train.lr"], r"override 'train.lr' is not section.key=value"),
        (["model.input_norm=per_image"], r"base.yaml: model.input_norm: Input should be 'dataset', 'image' or 'auto'"),
        (
            ["model.weights=w.safetensors", "model.pretrained=false"],
            r"base.yaml: model: weights is 'w.safetensors' but pretrained is false; "
            r"set model.pretrained=true to load it",
        ),
    ],
)
def test_bad_config_is_one_line(base, overrides, message):
    with pytest.raises(PipelineError, match=message) as e:
        load_config(base, overrides)
    assert "\n" not in str(e.value)


def test_missing_required_and_bad_files(tmp_path):
    p = write_yaml(tmp_path / "x.yaml", {"data": {"format": "pixel_csv", "dir": "."}})
    with pytest.raises(PipelineError, match="x.yaml: missing required key 'competition'"):
        load_config(p)
    p = write_yaml(tmp_path / "y.yaml", {"competition": "c", "data": {"dir": "."}})
    with pytest.raises(PipelineError, match="y.yaml: missing required key 'data.format'"):
        load_config(p)
    with pytest.raises(PipelineError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("competition: [unclosed\n")
    with pytest.raises(PipelineError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    write_yaml(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(PipelineError, match="extends: cycle"):
        load_config(tmp_path / "a.yaml")
    write_yaml(tmp_path / "c.yaml", {"extends": "missing.yaml"})
    with pytest.raises(PipelineError, match="c.yaml: extends: missing.yaml not found"):
        load_config(tmp_path / "c.yaml")


def test_cli_reports_config_error_with_exit_2(base, capsys):
    assert run_cli("fold", base, "train.lr=abc") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "train.lr" in err


def test_hash_changes_with_config_and_sections(base):
    a, b = load_config(base), load_config(base, ["train.lr=0.1"])
    assert a.hash() != b.hash()
    assert a.hash("data", "folds") == b.hash("data", "folds")
    # model.input_norm's default leaves the hash of a config written before the key existed as it was
    assert (
        load_config(base, ["model.input_norm=dataset"]).hash()
        == a.hash()
        != load_config(base, ["model.input_norm=image"]).hash()
    )
    assert a.hash() == "cbeceb4cbd8c"  # the hash this config had before model.input_norm


def test_shipped_configs_validate(monkeypatch):
    from pathlib import Path

    root = Path(__file__).parents[1] / "competitions"
    from pipeline.ensemble.blend import EnsembleConfig

    for p in sorted(root.glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
        if "base" in d:  # a zoo file (tests/test_zoo.py loads them)
            with pytest.raises(PipelineError, match="is a zoo file"):
                load_config(p, check_data=False)
            continue
        if "members" in d:  # an ensemble file
            EnsembleConfig(**d)
            for m in d["members"]:
                assert (root / m).is_file(), m
            with pytest.raises(PipelineError, match="ensemble file: use `pipeline ensemble`"):
                load_config(p, check_data=False)
            continue
        cfg = load_config(p, check_data=False)
        assert cfg.name == p.stem
    demo = load_config(root / "iceberg-demo.yaml", check_data=False)
    assert demo.data.format == "statoil_json" and demo.model.backbone == "tf_efficientnet_lite0"
    assert demo.competition == "iceberg-demo" and demo.data.dir == "data/iceberg-demo"


# ---- names written once: checked against the live registries when the config loads ---------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["metric=acuracy"], r"base.yaml: metric: unknown metric 'acuracy'; did you mean accuracy\?$"),
        (["train.scheduler=cosin"], r"base.yaml: train.scheduler: unknown scheduler 'cosin'; did you mean cosine\?$"),
        (
            ["tune.sampler=grid"],
            r"base.yaml: tune.sampler: unknown sampler 'grid'; expected one of cmaes, random, tpe$",
        ),
        (["tune.pruner=medain"], r"base.yaml: tune.pruner: unknown pruner 'medain'; did you mean median\?$"),
        (["predict.tta=[identity,hflp]"], r"base.yaml: predict.tta: unknown TTA 'hflp'; did you mean hflip, vflip\?$"),
        (["predict.tta=[]"], r"base.yaml: predict.tta: empty list; expected at least one of identity"),
        (["data.format=pixel_cvs"], r"base.yaml: data.format: unknown format 'pixel_cvs'; did you mean pixel_csv\?$"),
        # the format's own options, before a file is read
        (
            ["data.image_size=64"],
            r"base.yaml: data.image_size: 64; statoil_json images are 75x75 "
            r"\(set model.input_size to feed the model another size\)$",
        ),
        (
            ["data.channels=1"],
            r"base.yaml: data.channels: 1; expected 2 \(band_1, band_2\) or 3 \(band_1, band_2 and their mean",
        ),
        # augmentations: names, parameters and (statoil_json fixes 2 channels of 75x75) what the images allow
        (["augment=[{name: Blurr}]"], r"base.yaml: augment\[0\].name: unknown transform 'Blurr'; did you mean Blur"),
        (
            ["augment=[{name: HorizontalFlip}, {name: Affine, rotat: 10}]"],
            r"base.yaml: augment\[1\] \(Affine\): unknown parameter 'rotat'; did you mean rotate",
        ),
        (["augment=[{name: HorizontalFlip, p: 2}]"], r"base.yaml: augment\[0\] \(HorizontalFlip\): p: .*2"),
        (
            ["augment=[{name: HueSaturationValue}]"],
            r"base.yaml: augment\[0\] \(HueSaturationValue\): works on 3-channel images only; these images have 2$",
        ),
        # the search space
        (
            ["tune.space={train.lrr: {type: float, low: 0.1, high: 1}}"],
            r"base.yaml: tune.space.train.lrr: not a config key; did you mean train.lr",
        ),
        (
            ["tune.space={train.optimizer: {choices: [adamw, lion]}}"],
            r"base.yaml: tune.space.train.optimizer: choice 'lion' is not a valid value: unknown optimizer 'lion'",
        ),
        (
            ["augment=[{name: Affine, p: 0.5}]", "tune.space={augment.Affine.p: {type: float, low: 0.0, high: 1.5}}"],
            r"base.yaml: tune.space.augment.Affine.p: high 1.5 is not valid",
        ),
    ],
)
def test_what_needs_no_data_fails_when_the_config_loads(base, overrides, message):
    with pytest.raises(PipelineError, match=message) as e:
        load_config(base, overrides, check_data=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fmt, overrides, message",
    [
        (
            "image_folder",
            ["data.channels=2"],
            r"x.yaml: data.channels: 2 is not supported by image_folder; expected 1 \(grey\), 3 \(RGB\), null or auto",
        ),
        (
            "image_folder",
            ["data.channels=1", "augment=[{name: HueSaturationValue}]"],
            r"augment\[0\] \(HueSaturationValue\): works on 3-channel images only; these images have 1$",
        ),
        (
            "pixel_csv",
            ["data.channels=3"],
            r"x.yaml: data.channels: 3; pixel_csv images are grey \(1 channel\); expected 1, null or auto$",
        ),
        (
            "pixel_csv",
            ["augment=[{name: RGBShift}]"],
            r"augment\[0\] \(RGBShift\): works on 3-channel images only; these images have 1$",
        ),
    ],
)
def test_each_format_checks_its_own_options(tmp_path, fmt, overrides, message):
    (tmp_path / "data").mkdir()  # a folder of its own: nothing is written into data.dir
    p = write_yaml(tmp_path / "x.yaml", {"competition": "c", "data": {"format": fmt, "dir": "data"}})
    load_config(p)  # the defaults are fine
    with pytest.raises(PipelineError, match=message):
        load_config(p, overrides)


def test_unknown_size_and_channels_still_check_augment_names_and_params(tmp_path):
    """image_folder without data.channels / data.image_size: what the files will say is not checked
    yet (the dry run waits for the data), names and parameters are."""
    (tmp_path / "data").mkdir()
    p = write_yaml(
        tmp_path / "x.yaml",
        {
            "competition": "c",
            "data": {"format": "image_folder", "dir": "data"},
            "augment": [{"name": "HueSaturationValue"}, {"name": "RandomResizedCrop", "p": 1.0}],
        },
    )
    assert load_config(p).data.channels is None
    with pytest.raises(
        PipelineError, match=r"augment\[1\] \(RandomResizedCrop\): unknown parameter 'sise'; did you mean size"
    ):
        load_config(p, ["augment=[{name: HueSaturationValue}, {name: RandomResizedCrop, sise: 8}]"])


def test_loading_a_config_imports_no_torch(base):
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.config.load import load_config; "
        f"cfg = load_config({str(base)!r}, ['predict.tta=[identity,hflip]', 'train.optimizer=sgd', "
        "'metric=roc_auc'], check_data=False); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    from pathlib import Path

    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_registered_metric_end_to_end(digits_config, request):
    """A metric is one METRICS.register line: the config accepts it, training reports it per
    epoch, evaluate makes it the headline, tune knows its direction."""
    import json
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from pipeline.core.metrics import METRICS, Metric
    from pipeline.data.folds import run_fold
    from pipeline.evaluate.evaluator import evaluate
    from pipeline.train.cv import train_cv

    path = digits_config(metric="brier", train={"epochs": 1, "max_steps_per_epoch": 2})
    with pytest.raises(PipelineError, match=r"metric: unknown metric 'brier'"):
        load_config(path)
    METRICS.register(
        "brier", Metric(lambda y, p: float(((p - np.eye(p.shape[1])[y]) ** 2).sum(1).mean()), greater_is_better=False)
    )
    request.addfinalizer(lambda: METRICS.unregister("brier"))
    cfg = load_config(path)
    run_fold(cfg)
    oof = train_cv(cfg)
    hist = pd.read_csv("runs/comp/exp/fold_0/history.csv")
    assert "val_brier" in hist.columns and np.isfinite(hist["val_brier"]).all()
    assert 0 < json.loads(Path("runs/comp/exp/fold_1/done.json").read_text())["val_brier"] < 2
    m = evaluate(cfg, report=False)
    probs = oof.filter(like="p_").to_numpy()
    want = ((probs - np.eye(probs.shape[1])[oof["target"].to_numpy()]) ** 2).sum(1).mean()
    assert m["metric"] == "brier" and m["headline"] == pytest.approx(want, rel=1e-6)
    assert np.isfinite(m["cv_mean"]["brier"]) and "brier" in m["folds"][0]
