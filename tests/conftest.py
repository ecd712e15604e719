import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _cwd_and_cache(tmp_path, monkeypatch):
    """Every test runs in its own directory (outputs resolve against the cwd) with its own cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / ".cache"))


@pytest.fixture(scope="session")
def iceberg_dir(tmp_path_factory) -> Path:
    from pipeline.demo_data import write_iceberg

    out = tmp_path_factory.mktemp("iceberg")
    write_iceberg(out, n_train=120, n_test=30, seed=1)
    return out


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from pipeline.demo_data import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, n_test=200, seed=1)
    return out


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory) -> Path:
    from pipeline.demo_data import write_folder

    out = tmp_path_factory.mktemp("folder")
    write_folder(out, n_train=200, n_test=40, seed=1)
    return out


def write_yaml(path: Path, d: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture
def make_config(tmp_path):
    """Write a config YAML for a data dir; returns its path."""

    def make(data_dir, fmt="statoil_json", name="exp", **sections):
        d = {"competition": sections.pop("competition", "comp"), "data": {"format": fmt, "dir": str(data_dir)}}
        for k, v in sections.items():
            d[k] = v
        return write_yaml(tmp_path / f"{name}.yaml", d)

    return make


def run_cli(*argv, capsys=None):
    from pipeline.cli import main

    return main([str(a) for a in argv])


def copy_json(src: Path, dst: Path, mutate):
    recs = json.loads(src.read_text())
    mutate(recs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(recs))
