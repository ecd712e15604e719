import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests: bounded in the default tier, more examples in the full one (make test-all)
settings.register_profile("fast", max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("slow", max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _lines_to_stdout():
    """The tests read the pipeline's lines as the CLI prints them (the library alone prints nothing)."""
    from pipeline.core.logs import to_stdout

    to_stdout()


@pytest.fixture(autouse=True)
def _cwd_and_cache(tmp_path, monkeypatch):
    """Every test runs in its own directory (outputs resolve against the cwd) with its own cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / ".cache"))


@pytest.fixture(scope="session")
def iceberg_dir(tmp_path_factory) -> Path:
    from pipeline.data.demo_iceberg import write_iceberg

    out = tmp_path_factory.mktemp("iceberg")
    write_iceberg(out, n_train=120, n_test=30, seed=1)
    return out


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from pipeline.data.demo_digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, n_test=200, seed=1)
    return out


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory) -> Path:
    from pipeline.data.demo_digits import write_folder

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
            d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        return write_yaml(tmp_path / f"{name}.yaml", d)

    return make


def run_cli(*argv, capsys=None):
    from pipeline.cli import main

    return main([str(a) for a in argv])


def cli_error(capsys, *argv) -> str:
    """Run the CLI in-process on bad input: exit 2 and exactly one line on stderr, no traceback."""
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def copy_json(src: Path, dst: Path, mutate):
    recs = json.loads(src.read_text())
    mutate(recs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(recs))


@pytest.fixture(scope="session")
def sk_digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's real 8x8 digits as digit-recognizer CSVs (600 train, 100 test): fast to train on."""
    import pandas as pd
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X * 16).clip(0, 255).astype(int)
    out = tmp_path_factory.mktemp("skdigits")
    cols = [f"pixel{i}" for i in range(64)]
    tr = pd.DataFrame(X[:600], columns=cols)
    tr.insert(0, "label", y[:600])
    tr.to_csv(out / "train.csv", index=False)
    pd.DataFrame(X[600:700], columns=cols).to_csv(out / "test.csv", index=False)
    return out


TINY_TRAIN = {"epochs": 2, "batch_size": 64, "lr": 3e-3, "optimizer": "adam", "patience": 0, "device": "cpu"}


@pytest.fixture
def digits_config(make_config, sk_digits_dir):
    """A config for the 8x8 digits with simple_cnn; pass section dicts to change it."""

    def make(name="exp", **sections):
        base = {
            "metric": "accuracy",
            "folds": {"n_splits": 3, "seed": 0},
            "model": {"backbone": "simple_cnn", "pretrained": False, "drop_rate": 0.0},
            "train": dict(TINY_TRAIN),
        }
        for k, v in sections.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        return make_config(sk_digits_dir, "pixel_csv", name=name, **base)

    return make


@contextmanager
def lock_held_elsewhere(path, what: str):
    """``pipeline.core.io.exclusive(path, what)`` held by another live process; yields its Popen (kill it to
    simulate a crash; otherwise it is ended on exit)."""
    import subprocess
    import sys

    code = (
        "import sys, time\nfrom pipeline.core.io import exclusive\n"
        "with exclusive(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), what], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held", "the holder process did not take the lock"
        yield proc
    finally:
        proc.kill()
        proc.wait()
