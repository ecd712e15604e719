import yaml
import pytest

from conftest import run_cli, write_yaml
from pipeline.config import load_config
from pipeline.errors import PipelineError


@pytest.fixture
def base(tmp_path):
    (tmp_path / "data").mkdir()
    return write_yaml(tmp_path / "base.yaml", {
        "competition": "iceberg",
        "data": {"format": "statoil_json", "dir": "data"},
        "train": {"lr": "3e-4", "epochs": 3},
    })


def test_defaults_and_keys_every_config_has(base):
    cfg = load_config(base)
    assert cfg.name == "base" and cfg.competition == "iceberg"
    for key in ["data.dir", "folds.n_splits", "folds.seed", "model.backbone", "model.pretrained",
                "train.epochs", "train.batch_size", "train.lr", "train.patience", "train.device"]:
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


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], r"base.yaml: unknown key 'train.lrr'; did you mean train.lr"),
    (["train.lr=fast"], r"base.yaml: train.lr: Input should be a valid number.*'fast'"),
    (["train.epochs=0"], r"train.epochs: Input should be greater than or equal to 1"),
    (["train.device=gpu"], r"train.device: got 'gpu'; expected auto, cpu, cuda, cuda:N or mps"),
    (["data.dir=nowhere"], r"base.yaml: data.dir: nowhere does not exist"),
    (["data.format=parquet"], r"data.format: unknown format 'parquet'; expected one of image_folder, pixel_csv, statoil_json"),
    (["train.optimizer=lion"], r"train.optimizer: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
    (["nosection=1"], r"unknown key 'nosection'"),
    (["train.lr"], r"override 'train.lr' is not section.key=value"),
    (["model.weights=w.safetensors", "model.pretrained=false"],
     r"base.yaml: model: weights is 'w.safetensors' but pretrained is false; set model.pretrained=true to load it"),
])
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


def test_shipped_configs_validate(monkeypatch):
    from pathlib import Path

    root = Path(__file__).parents[1] / "competitions"
    from pipeline.ensemble import EnsembleConfig

    for p in sorted(root.glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
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
