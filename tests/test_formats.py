"""Readers on real files written by the demo generators, and every bad input named in the issue."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli
from helpers import _bad_statoil, _set

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.formats import build_reader, read_table


def _cfg(make_config, d, fmt, **kw):
    return load_config(make_config(d, fmt, **kw))


# ---- statoil_json ---------------------------------------------------------------------


def test_statoil_reads_demo_files(make_config, iceberg_dir):
    cfg = _cfg(make_config, iceberg_dir, "statoil_json")
    tr, te = read_table(cfg, "train"), read_table(cfg, "test")
    recs = json.loads((iceberg_dir / "train.json").read_text())
    assert tr.images.shape == (len(recs), 2, 75, 75) and tr.images.dtype == np.float32
    np.testing.assert_allclose(tr.images[3, 1].ravel(), recs[3]["band_2"], rtol=1e-6)
    assert tr.class_names == ["ship", "iceberg"]
    assert list(tr.labels) == [r["is_iceberg"] for r in recs]
    na = np.array([r["inc_angle"] == "na" for r in recs])
    assert na.any()
    assert tr.feature_names == ["inc_angle", "inc_angle_missing"]
    np.testing.assert_array_equal(tr.features[:, 1] == 1, na)
    assert np.isnan(tr.meta["inc_angle"].to_numpy()[na]).all()
    assert te.labels is None and te.images.shape[1:] == (2, 75, 75)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set(2, "band_1", [0.0] * 5624), r"train.json: id '\w+': band_1 has 5624 values; expected 5625 \(75x75\)"),
        (_set(1, "inc_angle", "unknown"), r"train.json: id '\w+': inc_angle is 'unknown'; expected a number or \"na\""),
        (_set(0, "band_2", ["x"] * 5625), r"band_2 has non-numeric values"),
        (_set(4, "is_iceberg", 2), r"is_iceberg is 2; expected 0 or 1"),
        (
            lambda recs: recs[1].update(id=recs[0]["id"]),
            r"train.json: duplicate id '\w+' \(1 duplicates\); expected unique ids",
        ),
        (lambda recs: recs.clear(), r"train.json: the train set is empty"),
        (lambda recs: recs[0].pop("band_2"), r"missing or non-list 'band_2'"),
    ],
)
def test_statoil_bad_train(tmp_path, make_config, iceberg_dir, mutate, message, capsys):
    d = _bad_statoil(tmp_path, iceberg_dir, mutate)
    assert re.search(message, cli_error(capsys, "fold", make_config(d, "statoil_json")))


def test_statoil_nan_pixels_and_empty_test(tmp_path, make_config, iceberg_dir):
    def nan(recs):
        recs[0]["band_1"][10] = float("nan")

    d = _bad_statoil(tmp_path, iceberg_dir, nan)  # json.dumps writes NaN, json.load reads it
    with pytest.raises(PipelineError, match=r"band_1 has NaN or inf pixels; expected finite dB values"):
        read_table(_cfg(make_config, d, "statoil_json"), "train")
    d = _bad_statoil(tmp_path, iceberg_dir, lambda r: r.clear(), split="test")
    with pytest.raises(PipelineError, match=r"test.json: the test set is empty; expected at least one row"):
        read_table(_cfg(make_config, d, "statoil_json"), "test")


def test_statoil_missing_label_and_inf_pixels(tmp_path, make_config, iceberg_dir):
    d = _bad_statoil(tmp_path, iceberg_dir, lambda recs: recs[3].pop("is_iceberg"))
    with pytest.raises(
        PipelineError,
        match=r"train.json: id '\w+': missing 'is_iceberg'; expected the label 0 or 1 in every train record",
    ):
        read_table(_cfg(make_config, d, "statoil_json"), "train")

    def inf(recs):
        recs[5]["band_2"][7] = float("-inf")  # json.dumps writes -Infinity, json.load reads it

    d = _bad_statoil(tmp_path, iceberg_dir, inf, split="test")
    with pytest.raises(
        PipelineError, match=r"test.json: id '\w+': band_2 has NaN or inf pixels; expected finite dB values"
    ):
        read_table(_cfg(make_config, d, "statoil_json"), "test")


def test_statoil_size_and_channels(make_config, iceberg_dir, capsys):
    path = make_config(iceberg_dir, "statoil_json")
    assert run_cli("fold", path, "data.image_size=64") == 2
    assert "data.image_size: 64; statoil_json images are 75x75 (set model.input_size" in capsys.readouterr().err
    assert run_cli("fold", path, "data.channels=1") == 2
    assert "data.channels: 1; expected 2 (band_1, band_2) or 3" in capsys.readouterr().err
    three = read_table(load_config(path, ["data.channels=3"]), "train")
    assert three.images.shape[1] == 3 and three.channels == 3
    np.testing.assert_allclose(three.images[:, 2], three.images[:, :2].mean(1), rtol=1e-6)


def test_statoil_truncated_and_missing(tmp_path, make_config, iceberg_dir):
    d = tmp_path / "trunc"
    d.mkdir()
    text = (iceberg_dir / "train.json").read_text()
    (d / "train.json").write_text(text[: len(text) // 2])
    cfg = _cfg(make_config, d, "statoil_json")
    with pytest.raises(PipelineError, match=r"train.json: malformed or truncated JSON at line \d+ column \d+"):
        read_table(cfg, "train")
    with pytest.raises(PipelineError, match=r"test.json: file not found"):
        read_table(cfg, "test")
    (d / "test.json").write_text('{"id": 1}')
    with pytest.raises(PipelineError, match=r"test.json: top level is a dict; expected a JSON list of records"):
        read_table(cfg, "test")


def test_statoil_submission_frame(make_config, iceberg_dir):
    reader = build_reader(_cfg(make_config, iceberg_dir, "statoil_json"))
    sub = reader.submission_frame(np.array(["a", "b"]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["ship", "iceberg"])
    assert list(sub.columns) == ["id", "is_iceberg"] and sub["is_iceberg"].tolist() == [0.1, 0.8]


# ---- pixel_csv ------------------------------------------------------------------------


def test_pixel_csv_reads_demo_files(make_config, digits_dir):
    cfg = _cfg(make_config, digits_dir, "pixel_csv")
    tr, te = read_table(cfg, "train"), read_table(cfg, "test")
    raw = pd.read_csv(digits_dir / "train.csv")
    assert tr.images.shape == (len(raw), 1, 28, 28) and tr.images.dtype == np.uint8
    np.testing.assert_array_equal(tr.images[5, 0].ravel(), raw.iloc[5, 1:].to_numpy())
    assert tr.class_names == [str(i) for i in range(10)]
    assert (np.asarray(tr.class_names)[tr.labels] == raw["label"].astype(str)).all()
    assert te.ids[0] == "1" and te.labels is None and te.class_names == tr.class_names
    sub = build_reader(cfg).submission_frame(te.ids[:2], np.eye(10)[[3, 7]], te.class_names)
    assert list(sub.columns) == ["ImageId", "Label"] and sub["Label"].tolist() == ["3", "7"]


def test_pixel_csv_resize(make_config, digits_dir):
    cfg = _cfg(make_config, digits_dir, "pixel_csv", **{})
    cfg = load_config(cfg.path, ["data.image_size=32"])
    assert read_table(cfg, "test").images.shape[1:] == (1, 32, 32)


def _bad_csv(tmp_path, digits_dir, split, mutate):
    d = tmp_path / "badcsv"
    d.mkdir(exist_ok=True)
    for s in ("train", "test"):
        df = pd.read_csv(digits_dir / f"{s}.csv", nrows=50)
        if s == split:
            df = mutate(df)
        df.to_csv(d / f"{s}.csv", index=False)
    return d


@pytest.mark.parametrize(
    "split, mutate, message",
    [
        (
            "train",
            lambda df: df.drop(columns="label"),
            r"train.csv: missing column 'label'; expected columns label,pixel0..pixelN",
        ),
        (
            "train",
            lambda df: df.assign(label=df["label"].astype(object).where(df.index != 3, "seven")),
            r"train.csv: row 4 has label 'seven'; expected an integer class",
        ),
        (
            "train",
            lambda df: df.assign(pixel5=df["pixel5"].where(df.index != 7, np.nan)),
            r"train.csv: row 8 has a pixel that is missing or outside 0..255",
        ),
        (
            "train",
            lambda df: df.assign(pixel5=df["pixel5"].where(df.index != 2, 300)),
            r"row 3 has a pixel that is missing or outside 0..255",
        ),
        ("test", lambda df: df.drop(columns="pixel783"), r"test.csv: 783 pixel columns is not a square image"),
        ("test", lambda df: df.iloc[:0], r"test.csv: the test set is empty"),
        (
            "test",
            lambda df: df.assign(pixel0=df["pixel0"].astype(object).where(df.index != 1, "x")),
            r"test.csv: row 2 has a non-numeric pixel",
        ),
    ],
)
def test_pixel_csv_bad_input(tmp_path, make_config, digits_dir, split, mutate, message, capsys):
    d = _bad_csv(tmp_path, digits_dir, split, mutate)
    if split == "train":  # through the CLI, as a user meets it
        assert re.search(message, cli_error(capsys, "fold", make_config(d, "pixel_csv")))
    with pytest.raises(PipelineError, match=message):
        read_table(_cfg(make_config, d, "pixel_csv"), split)


def test_pixel_csv_malformed_and_truncated(tmp_path, make_config, digits_dir):
    d = _bad_csv(tmp_path, digits_dir, "train", lambda df: df)
    lines = (d / "train.csv").read_text().splitlines()
    (d / "train.csv").write_text(
        "\n".join(lines[:4] + [lines[4] + ",0,0"] + lines[5:]) + "\n"
    )  # a row with extra fields
    with pytest.raises(
        PipelineError,
        match=r"train.csv: cannot parse CSV \(Error tokenizing data.*line 5.*\); "
        r"expected a header and one row per image",
    ):
        read_table(_cfg(make_config, d, "pixel_csv"), "train")
    text = "\n".join(lines) + "\n"
    (d / "train.csv").write_text(text[: len(text) - 40])  # cut inside the last row, as an interrupted download
    with pytest.raises(PipelineError, match=r"train.csv: row 50 has a pixel that is missing or outside 0..255"):
        read_table(_cfg(make_config, d, "pixel_csv"), "train")


def test_pixel_csv_train_test_sizes_differ(tmp_path, make_config, digits_dir):
    d = tmp_path / "sizes"
    d.mkdir()
    pd.read_csv(digits_dir / "train.csv", nrows=20).to_csv(d / "train.csv", index=False)
    test = pd.DataFrame(np.zeros((5, 16 * 16), np.uint8), columns=[f"pixel{i}" for i in range(256)])
    test.to_csv(d / "test.csv", index=False)
    with pytest.raises(
        PipelineError,
        match=r"train.csv: images are 28x28 but test.csv has 256 pixel columns; "
        r"expected train and test of the same size",
    ):
        read_table(_cfg(make_config, d, "pixel_csv"), "train")


def test_cli_bad_data_exit_2(tmp_path, make_config, iceberg_dir, capsys):
    d = _bad_statoil(tmp_path, iceberg_dir, _set(0, "inc_angle", "n/a"))
    assert run_cli("fold", make_config(d, "statoil_json")) == 2
    err = capsys.readouterr().err
    assert "inc_angle is 'n/a'" in err and err.count("\n") == 1


# ---- a format registered in a few lines --------------------------------------------------


def test_registered_format_end_to_end(tmp_path, make_config, iceberg_dir, request):
    """A reader class and one FORMATS.register line: the config validates data: against the
    reader's own Options (its keys, hashed with the rest), and `pipeline fold` reads it."""
    from pipeline.config.options import DataOptions
    from pipeline.config.registries import FORMATS
    from pipeline.data.formats.base import Reader
    from pipeline.data.table import Table

    class NpzOptions(DataOptions):
        file: str = "train.npz"

    class Npz(Reader):
        Options = NpzOptions

        def _read(self, split):
            d = np.load(self.path(self.cfg.data.file if split == "train" else "test.npz"))
            return Table(
                ids=d["ids"].astype(object),
                images=d["images"],
                class_names=["a", "b"],
                labels=d["labels"] if "labels" in d else None,
            )

    FORMATS.register("npz", Npz)
    request.addfinalizer(lambda: FORMATS.unregister("npz"))

    rng = np.random.default_rng(0)
    data = tmp_path / "npz"
    data.mkdir()
    np.savez(
        data / "rows.npz",
        ids=np.array([f"r{i}" for i in range(30)]),
        images=rng.random((30, 1, 16, 16), dtype=np.float32),
        labels=np.arange(30) % 2,
    )
    path = make_config(data, "npz", folds={"n_splits": 3})
    with pytest.raises(PipelineError, match=r"data.file: "):  # its own key exists...
        load_config(path, ["data.file=[1, 2]"])
    with pytest.raises(PipelineError, match=r"unknown key 'data.sheet'"):  # ...and nothing else
        load_config(path, ["data.sheet=x"])
    cfg = load_config(path, ["data.file=rows.npz"])
    assert isinstance(cfg.data, NpzOptions) and cfg.to_dict()["data"]["file"] == "rows.npz"
    assert cfg.hash("data") != load_config(path, ["data.file=other.npz"]).hash("data")
    assert run_cli("fold", path, "data.file=rows.npz") == 0
    folds = pd.read_csv("folds/comp.csv", dtype={"id": str})
    assert sorted(folds["id"]) == sorted(f"r{i}" for i in range(30)) and folds["fold"].nunique() == 3
    # ... and it trains like any other format: every row gets an out-of-fold prediction
    np.savez(
        data / "test.npz",
        ids=np.array([f"t{i}" for i in range(5)]),
        images=rng.random((5, 1, 16, 16), dtype=np.float32),
    )
    assert (
        run_cli(
            "train",
            path,
            "data.file=rows.npz",
            "model.backbone=simple_cnn",
            "model.pretrained=false",
            "train.epochs=1",
            "train.batch_size=8",
            "train.device=cpu",
        )
        == 0
    )
    oof = pd.read_csv("runs/comp/exp/oof.csv", dtype={"id": str})
    assert sorted(oof["id"]) == sorted(folds["id"]) and list(oof.columns) == ["id", "fold", "target", "p_a", "p_b"]


def test_built_in_formats_keep_the_data_keys_their_runs_are_hashed_with(
    make_config, iceberg_dir, digits_dir, folder_dir
):
    for d, fmt in ((iceberg_dir, "statoil_json"), (digits_dir, "pixel_csv"), (folder_dir, "image_folder")):
        assert list(load_config(make_config(d, fmt)).to_dict()["data"]) == [
            "format",
            "dir",
            "image_size",
            "channels",
            "cache",
            "sample_submission",  # a runtime key: not in the hashes (tests/test_sample_submission.py)
        ]
