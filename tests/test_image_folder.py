"""image_folder reader: the demo folder, id styles, the memory-mapped cache and every bad input."""

import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli
from PIL import Image

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.formats import build_reader, read_table
from pipeline.data.formats import image_folder as imf


def _cfg(make_config, d, *overrides, **data):
    return load_config(make_config(d, "image_folder", data={"image_size": 32, **data}), list(overrides))


@pytest.fixture
def small(tmp_path, folder_dir):
    """A writable copy of the first 12 train and 4 test images of the demo folder."""
    d = tmp_path / "small"
    tr = pd.read_csv(folder_dir / "train.csv").iloc[:12]
    te = pd.read_csv(folder_dir / "test.csv").iloc[:4]
    for split, df in (("train", tr), ("test", te)):
        (d / split).mkdir(parents=True)
        for i in df["id"]:
            shutil.copy(folder_dir / split / i, d / split / i)
        df.to_csv(d / f"{split}.csv", index=False)
    return d


def _count_decodes(monkeypatch):
    calls = []
    real = imf._decode

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(imf, "_decode", counting)
    return calls


def test_reads_demo_folder(make_config, folder_dir):
    cfg = _cfg(make_config, folder_dir)
    tr, te = read_table(cfg, "train"), read_table(cfg, "test")
    raw = pd.read_csv(folder_dir / "train.csv")
    assert tr.images.shape == (len(raw), 3, 32, 32) and tr.images.dtype == np.uint8  # some files are RGB
    assert isinstance(tr.images, np.memmap) and tr.value_range == (0.0, 255.0)
    assert tr.class_names == sorted(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    assert (np.asarray(tr.class_names)[tr.labels] == raw["label"]).all()
    assert list(tr.ids) == raw["id"].tolist()
    want = Image.open(folder_dir / "train" / raw["id"][0]).convert("RGB").resize((32, 32), Image.BILINEAR)
    np.testing.assert_array_equal(tr.images[0], np.asarray(want).transpose(2, 0, 1))
    assert list(te.ids) == pd.read_csv(folder_dir / "test.csv")["id"].tolist()
    assert te.labels is None and te.class_names == tr.class_names and te.images.shape[1:] == (3, 32, 32)
    grey = read_table(load_config(cfg.path, ["data.channels=1"]), "test")
    assert grey.images.shape[1:] == (1, 32, 32)
    sub = build_reader(cfg).submission_frame(te.ids[:2], np.eye(10)[[0, 9]], te.class_names)
    assert list(sub.columns) == ["id", "label"] and sub["label"].tolist() == ["eight", "zero"]


def test_ids_as_stems_integer_labels_and_test_folder_listing(make_config, small):
    tr = pd.read_csv(small / "train.csv")
    before = read_table(_cfg(make_config, small), "train")
    # Stems (histopathologic style) and integer labels (numeric class order, not string order).
    pd.DataFrame({"id": tr["id"].str.removesuffix(".png"), "label": [10, 2] * 6}).to_csv(
        small / "train.csv", index=False
    )
    (small / "test.csv").unlink()
    cfg = _cfg(make_config, small)
    after = read_table(cfg, "train")
    np.testing.assert_array_equal(after.images, before.images)
    assert after.class_names == ["2", "10"] and list(after.labels[:2]) == [1, 0]
    for p, n in zip(sorted((small / "test").iterdir()), (10, 2, 1, 11)):  # dogs-vs-cats style names
        p.rename(p.with_name(f"{n}.png"))
    (small / "test" / "notes.txt").write_text("not an image")
    te = read_table(cfg, "test")  # no test.csv: every image in test/ in natural order, ids in train's style
    assert list(te.ids) == ["1", "2", "10", "11"]


def test_auto_size_and_channels(make_config, small):
    for p in (small / "train").iterdir():
        Image.open(p).convert("L").resize((30, 30)).save(p)
    for p in (small / "test").iterdir():
        p.unlink()
    pd.read_csv(small / "train.csv").iloc[:2][["id"]].to_csv(small / "test.csv", index=False)
    for p in pd.read_csv(small / "test.csv")["id"]:
        shutil.copy(small / "train" / p, small / "test" / p)
    cfg = load_config(_cfg(make_config, small).path, ["data.image_size=null"])
    assert read_table(cfg, "train").images.shape[1:] == (1, 30, 30)  # every file grey and 30x30
    Image.new("RGB", (30, 30)).save(small / "test" / "extra.png")
    assert read_table(cfg, "train").images.shape[1:] == (3, 30, 30)  # a colour file anywhere: RGB


def test_cache_hit_skips_decoding(make_config, folder_dir, monkeypatch):
    cfg = _cfg(make_config, folder_dir)
    first = np.array(read_table(cfg, "test").images)

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(imf, "_decode", boom)
    second = read_table(cfg, "test")
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(second.images, first)
    with pytest.raises(PipelineError, match="cannot read image"):  # data.cache: false always decodes
        read_table(load_config(cfg.path, ["data.cache=false"]), "test")


def test_cache_invalidated_when_a_file_changes(make_config, small, monkeypatch, tmp_path):
    cfg = _cfg(make_config, small)
    calls = _count_decodes(monkeypatch)
    old = np.array(read_table(cfg, "train").images)
    assert len(calls) == 12
    name = pd.read_csv(small / "train.csv")["id"][0]
    Image.new("L", (40, 40), 200).save(small / "train" / name)
    new = read_table(cfg, "train").images
    assert len(calls) == 24 and (new[0] == 200).all()
    np.testing.assert_array_equal(new[1:], old[1:])
    caches = list((tmp_path / ".cache" / "image_folder").rglob("*.npy"))
    assert len(caches) == 1  # the stale cache of the same folder and size was removed


def test_killed_decode_leaves_no_cache(make_config, small, monkeypatch, tmp_path):
    cfg = _cfg(make_config, small)
    real, n = imf._decode, []

    def dies(*a, **k):
        n.append(1)
        if len(n) == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(imf, "CHUNK", 4)
    monkeypatch.setattr(imf, "_decode", dies)
    with pytest.raises(KeyboardInterrupt):
        read_table(cfg, "train")
    assert not [p for p in (tmp_path / ".cache").rglob("*") if p.is_file()]
    monkeypatch.setattr(imf, "_decode", real)
    assert read_table(cfg, "train").images.shape == (12, 3, 32, 32)


# ---- bad input: one line naming the file, row or id ---------------------------------------


def _first(d, split="train"):
    return pd.read_csv(d / f"{split}.csv")["id"][0]


def _edit_csv(split, fn):
    def mutate(d):
        fn(pd.read_csv(d / f"{split}.csv")).to_csv(d / f"{split}.csv", index=False)

    return mutate


def _set_cell(split, row, col, value):
    def fn(df):
        df = df.astype(object)
        df.loc[row, col] = value
        return df

    return _edit_csv(split, fn)


def _write(split, data):
    def mutate(d):
        p = d / split / _first(d, split)
        p.write_bytes(data(p.read_bytes()))

    return mutate


def _two_images_one_stem(d):
    tr = pd.read_csv(d / "train.csv")
    tr.loc[0, "id"] = "twin"
    tr.to_csv(d / "train.csv", index=False)
    Image.new("L", (28, 28)).save(d / "train" / "twin.png")
    Image.new("L", (28, 28)).save(d / "train" / "twin.jpg")


BAD = [
    (lambda d: (d / "train.csv").unlink(), "train", r"train.csv: file not found"),
    (
        lambda d: shutil.rmtree(d / "train"),
        "train",
        r"train: folder not found \(data.dir is .*\); expected train/ holding the train images",
    ),
    (
        _edit_csv("train", lambda df: df.drop(columns="label")),
        "train",
        r"train.csv: missing column 'label'; expected columns id,label \(found id\)",
    ),
    (
        _edit_csv("train", lambda df: df.rename(columns={"id": "file"})),
        "train",
        r"train.csv: missing column 'id'; expected columns id,label",
    ),
    (
        _edit_csv("test", lambda df: df.rename(columns={"id": "name"})),
        "test",
        r"test.csv: missing column 'id'; expected columns id \(found name\)",
    ),
    (
        _set_cell("train", 2, "id", "nope.png"),
        "train",
        r"train.csv: row 3: id 'nope.png' has no image file in .*train; expected train/nope.png",
    ),
    (
        _set_cell("test", 1, "id", "nope"),
        "test",
        r"test.csv: row 2: id 'nope' has no image file in .*test; "
        r"expected test/nope or test/nope.<png\|jpg\|jpeg\|...>",
    ),
    (_set_cell("train", 1, "id", ""), "train", r"train.csv: row 2 has an empty id"),
    (
        _set_cell("train", 3, "label", ""),
        "train",
        r"train.csv: row 4 \(id '\w+.png'\) has an empty label; expected a class name or integer",
    ),
    (
        lambda d: _set_cell("train", 4, "id", _first(d))(d),
        "train",
        r"train.csv: duplicate id '\w+.png' \(rows 1 and 5\); expected unique ids",
    ),
    (
        _write("train", lambda b: b"not an image"),
        "train",
        r"train/\w+.png: id '\w+.png': cannot read image \(UnidentifiedImageError: .*\); "
        r"expected an image file Pillow can decode",
    ),
    (
        _write("test", lambda b: b[: len(b) // 2]),
        "test",
        r"test/\w+.png: id '\w+.png': cannot read image \(OSError: image file is truncated\)",
    ),
    (_edit_csv("test", lambda df: df.iloc[:0]), "test", r"test.csv: the test set is empty; expected at least one row"),
    (
        lambda d: [(d / "test.csv").unlink(), shutil.rmtree(d / "test"), (d / "test").mkdir()],
        "test",
        r"test: the test set is empty \(no test.csv and no image files\); expected image files \(.png, .jpg, ...\)",
    ),
    (
        _two_images_one_stem,
        "train",
        r"train.csv: row 1: id 'twin' matches twin.jpg and twin.png in train/; expected one image file per id",
    ),
    (
        lambda d: (d / "train.csv").write_text('id,label\n"a.png,one\nb.png,two,extra\n'),
        "train",
        r"train.csv: cannot parse CSV \(.*\); expected",
    ),
]


@pytest.mark.parametrize(
    "mutate, split, message",
    BAD,
    ids=[
        "no-train-csv",
        "no-train-folder",
        "no-label-column",
        "no-id-column",
        "no-test-id-column",
        "missing-file",
        "missing-stem",
        "empty-id",
        "empty-label",
        "duplicate-id",
        "unreadable",
        "truncated",
        "empty-test-csv",
        "empty-test-folder",
        "ambiguous-stem",
        "malformed-csv",
    ],
)
def test_bad_input(make_config, small, mutate, split, message, capsys):
    mutate(small)
    cfg = _cfg(make_config, small)
    if split == "train":  # through the CLI, as a user meets it
        assert re.search(message, cli_error(capsys, "fold", cfg.path))
    with pytest.raises(PipelineError, match=message) as e:
        read_table(cfg, split)
    assert "\n" not in str(e.value)


def test_sizes_differ_without_image_size(make_config, small):
    cfg = load_config(_cfg(make_config, small).path, ["data.image_size=null"])
    with pytest.raises(
        PipelineError,
        match=r"\w+.png: image is (\d+)x\1 but .*\w+.png is (\d+)x\2; expected data.image_size set to resize",
    ):
        read_table(cfg, "train")
    with pytest.raises(
        PipelineError, match=r"data.channels: 2 is not supported by image_folder; expected 1 \(grey\), 3 \(RGB\)"
    ):
        read_table(load_config(cfg.path, ["data.channels=2", "data.image_size=32"]), "train")


def test_cli_one_line_exit_2(make_config, small, capsys):
    cfg = make_config(small, "image_folder", data={"image_size": 32}, folds={"n_splits": 2})
    _edit_csv("train", lambda df: df.drop(columns="label"))(small)
    assert run_cli("fold", cfg) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.csv: missing column 'label'" in err
    pd.DataFrame({"id": os.listdir(small / "train"), "label": ["a", "b"] * 6}).to_csv(small / "train.csv", index=False)
    assert run_cli("fold", cfg) == 0
    assert len(pd.read_csv("folds/comp.csv")) == 12
