"""Property tests of every data reader: random corruptions of a valid file never end in a traceback,
and never in a table with wrong content. Bounded examples here; ``HYPOTHESIS_PROFILE=slow`` runs more."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from helpers import CORRUPTIONS, corrupt
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.formats import read_table


def _read_both(cfg):
    """Every outcome is a table or a PipelineError; anything else (a traceback) fails the test."""
    try:
        return read_table(cfg, "train"), read_table(cfg, "test")
    except PipelineError as e:
        assert "\n" not in str(e) and str(e)
        return None


def _fresh(tmp_path, src: Path, name: str) -> Path:
    d = tmp_path / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(src, d)
    return d


@given(how=CORRUPTIONS, split=st.sampled_from(["train", "test"]))
def test_pixel_csv_corruptions(sk_digits_dir, tmp_path_factory, make_config, how, split):
    d = _fresh(tmp_path_factory.getbasetemp(), sk_digits_dir, "pixel-prop")
    f = d / f"{split}.csv"
    raw = f.read_bytes()
    f.write_bytes(corrupt(raw, how))
    out = _read_both(load_config(make_config(d, "pixel_csv")))
    if out is not None:  # accepted: every value really is an integer pixel of the file as written
        tr, te = out
        df = pd.read_csv(d / "train.csv")
        assert tr.images.dtype == np.uint8 and len(tr) == len(df)
        np.testing.assert_array_equal(tr.images.reshape(len(tr), -1), df.drop(columns="label").to_numpy())
        assert [tr.class_names[k] for k in tr.labels] == [str(v) for v in df["label"]]


@given(how=CORRUPTIONS, split=st.sampled_from(["train", "test"]))
def test_statoil_json_corruptions(iceberg_dir, tmp_path_factory, make_config, how, split):
    d = _fresh(tmp_path_factory.getbasetemp(), iceberg_dir, "statoil-prop")
    f = d / f"{split}.json"
    f.write_bytes(corrupt(f.read_bytes(), how))
    out = _read_both(load_config(make_config(d)))
    if out is not None:
        tr, _ = out
        recs = json.loads((d / "train.json").read_text())
        assert len(tr) == len(recs) and [r["id"] for r in recs] == list(tr.ids)
        assert np.isfinite(tr.images).all()
        assert tr.labels.tolist() == [int(r["is_iceberg"]) for r in recs]
        np.testing.assert_allclose(
            tr.images[:, 0].reshape(len(tr), -1), np.array([r["band_1"] for r in recs]), rtol=1e-6
        )


@given(how=CORRUPTIONS, split=st.sampled_from(["train", "test"]))
def test_image_folder_label_csv_corruptions(folder_dir, tmp_path_factory, make_config, how, split):
    d = _fresh(tmp_path_factory.getbasetemp(), folder_dir, "folder-prop")
    f = d / f"{split}.csv"
    f.write_bytes(corrupt(f.read_bytes(), how))
    out = _read_both(load_config(make_config(d, "image_folder", data={"image_size": 16, "cache": False})))
    if out is not None:
        tr, te = out
        df = pd.read_csv(d / "train.csv", dtype=str, skipinitialspace=True)
        assert list(tr.ids) == df["id"].str.strip().tolist()
        assert [tr.class_names[k] for k in tr.labels] == df["label"].str.strip().tolist()
        for i in list(tr.ids) + list(te.ids):  # every image read is a file inside its split folder
            assert ".." not in Path(i).parts and not Path(i).is_absolute()
