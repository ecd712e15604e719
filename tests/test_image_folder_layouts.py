"""image_folder layouts besides train.csv + flat train/: class folders (``train/<class>/<image>``, no
train.csv, ``test/`` flat) and train.csv ids that are paths under ``train/``; the same containment rules
(nothing outside the data folder, no test image in training) and one-line refusals of an ambiguous layout."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.formats import build_reader, read_table
from pipeline.data.formats import image_folder as imf

FLOWERS = Path("/work/shared/data/flowers")


def _png(path: Path, value: int, size=(8, 8), mode="L") -> None:
    """A tiny uniform image whose pixel value tells which file it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)


def _cfg(make_config, d, **data):
    return load_config(make_config(d, "image_folder", data={"image_size": 8, "channels": 1, **data}))


def _snapshot(root: Path) -> dict:
    """Every file and folder under ``root`` (the per-test cache aside) and its mtime."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if ".cache" not in p.parts}


@pytest.fixture
def classes(tmp_path) -> Path:
    """train/{01,1,b}/ (text classes: "01" and "1" are two), hidden and non-image files to ignore; test/ flat."""
    d = tmp_path / "comp"
    for cls, files in {"01": ["x10.png", "x2.png"], "1": ["a.jpg"], "b": ["z.png", "y1.png", "y01.png"]}.items():
        for k, f in enumerate(files):
            _png(d / "train" / cls / f, 10 * len(cls) + 40 * ord(cls[-1]) % 97 + k)
    (d / "train" / "b" / "notes.txt").write_text("not an image")
    (d / "train" / "b" / ".DS_Store").write_bytes(b"\0\1")
    _png(d / "train" / ".ipynb_checkpoints" / "q.png", 1)  # a hidden folder is no class
    (d / "train" / "README.txt").write_text("a non-image file beside the class folders is ignored")
    for k, f in enumerate(["t10.png", "t2.png", "t1.jpg"]):
        _png(d / "test" / f, 200 + k)
    return d


def _value(d: Path, split: str, rid: str) -> int:
    return int(np.asarray(Image.open(d / split / rid).convert("L"))[0, 0])


# ---- class folders --------------------------------------------------------------------------


def test_class_folders_ids_labels_and_text_classes(make_config, classes):
    cfg = _cfg(make_config, classes)
    tr, te = read_table(cfg, "train"), read_table(cfg, "test")
    assert tr.class_names == ["01", "1", "b"]  # the folder names, as text
    assert list(tr.ids) == ["01/x2.png", "01/x10.png", "1/a.jpg", "b/y01.png", "b/y1.png", "b/z.png"]
    assert [tr.class_names[k] for k in tr.labels] == [i.split("/")[0] for i in tr.ids]
    assert [int(a[0, 0, 0]) for a in tr.images] == [_value(classes, "train", i) for i in tr.ids]
    # test/ stays flat: every image in natural order, ids are file names (train's ids carry an extension)
    assert list(te.ids) == ["t1.jpg", "t2.png", "t10.png"] and te.labels is None and te.class_names == tr.class_names
    assert [int(a[0, 0, 0]) for a in te.images] == [_value(classes, "test", i) for i in te.ids]
    assert build_reader(cfg).native_size() == 8
    pd.DataFrame({"id": ["t2", "t10"]}).to_csv(classes / "test.csv", index=False)  # a test.csv works as ever
    assert list(read_table(cfg, "test").ids) == ["t2", "t10"]


def test_class_folders_through_fold(make_config, classes):
    cfg = make_config(classes, "image_folder", data={"image_size": 8, "channels": 1}, folds={"n_splits": 2})
    for cls in ("01", "1"):  # two rows per class at least, for two folds
        for k in range(3):
            _png(classes / "train" / cls / f"extra{k}.png", 50 + k)
    assert run_cli("fold", cfg) == 0
    folds = pd.read_csv("folds/comp.csv", dtype=str)
    assert folds["id"].tolist() == list(read_table(load_config(cfg), "train").ids)


def test_auto_size_and_channels_count_class_files(make_config, classes):
    """The size/channels from the files (and the cache key of both splits) include the class folders' files."""
    cfg = load_config(make_config(classes, "image_folder", data={"image_size": None, "channels": None}))
    assert read_table(cfg, "test").images.shape[1:] == (1, 8, 8)
    _png(classes / "train" / "1" / "a.jpg", 90, mode="RGB")  # one colour training file: every split is RGB
    assert read_table(cfg, "test").images.shape[1:] == (3, 8, 8)
    _png(classes / "train" / "1" / "a.jpg", 90, size=(9, 9))
    with pytest.raises(PipelineError, match=r"1/a.jpg: image is 9x9 but .* is 8x8|is 8x8 but .*1/a.jpg is 9x9"):
        read_table(cfg, "test")


def test_cache_key_follows_the_layout(make_config, classes, monkeypatch):
    """Two files swapping class folders keep their sizes and times: the ids in the key re-key the cache."""
    cfg = _cfg(make_config, classes)
    first = read_table(cfg, "train")
    t = classes / "train"
    os.rename(t / "b" / "z.png", t / "01" / "z.png")
    os.rename(t / "01" / "x10.png", t / "b" / "x10.png")
    calls = []
    real = imf._decode
    monkeypatch.setattr(imf, "_decode", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    second = read_table(cfg, "train")
    assert calls and list(second.ids) != list(first.ids)
    assert [int(a[0, 0, 0]) for a in second.images] == [_value(classes, "train", i) for i in second.ids]
    # the same images listed by a train.csv of file names: another key again, same pixels per file
    flat = classes.parent / "flat"
    (flat / "train").mkdir(parents=True)
    shutil.copytree(classes / "test", flat / "test")
    for i in second.ids:
        shutil.copy2(t / i, flat / "train" / i.replace("/", "_"))
    ids = [i.replace("/", "_") for i in second.ids]
    pd.DataFrame({"id": ids, "label": [i.split("/")[0] for i in second.ids]}).to_csv(flat / "train.csv", index=False)
    third = read_table(_cfg(make_config, flat), "train")
    assert third.class_names == ["01", "1", "b"] and list(third.labels) == list(second.labels)
    np.testing.assert_array_equal(third.images, second.images)


@pytest.mark.skipif(not FLOWERS.is_dir(), reason="no /work/shared/data/flowers")
def test_real_flowers_as_class_folders(make_config, tmp_path):
    d = tmp_path / "flowers"
    for c in sorted(p for p in FLOWERS.iterdir() if p.is_dir())[:3]:
        files = sorted(c.glob("*.jpg"))[:5]
        for f in files[:4]:
            (d / "train" / c.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, d / "train" / c.name / f.name)  # copies: a link would lead outside the data folder
        (d / "test").mkdir(exist_ok=True)
        shutil.copy(files[4], d / "test" / files[4].name)
    cfg = load_config(make_config(d, "image_folder", data={"image_size": 32, "channels": 3}))
    tr, te = read_table(cfg, "train"), read_table(cfg, "test")
    assert tr.images.shape == (12, 3, 32, 32) and len(te) == 3 and len(tr.class_names) == 3
    sides = [min(Image.open(d / "train" / i).size) for i in tr.ids]
    assert build_reader(cfg).native_size() == max(set(sides), key=lambda s: (sides.count(s), s))


def test_hidden_folders_alone_keep_the_csv_layout(make_config, classes):
    """Without a visible class folder, a train/ of images needs train.csv, as ever."""
    shutil.rmtree(classes / "train")
    _png(classes / "train" / "a.png", 1)
    _png(classes / "train" / ".cache" / "b.png", 2)
    with pytest.raises(PipelineError, match=r"train.csv: file not found"):
        read_table(_cfg(make_config, classes), "train")


# ---- train.csv ids that are paths under train/ -------------------------------------------------


@pytest.fixture
def paths(tmp_path) -> Path:
    d = tmp_path / "comp"
    rows = [("daisy/123.jpg", "daisy"), ("daisy/124", "daisy"), ("sub/dir/x.png", "rose"), ("top.png", "rose")]
    for k, (rid, _) in enumerate(rows):
        _png(d / "train" / (rid if Path(rid).suffix else rid + ".png"), 20 + k)
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(d / "train.csv", index=False)
    _png(d / "test" / "t.png", 99)
    return d


def test_csv_ids_that_are_paths(make_config, paths):
    cfg = _cfg(make_config, paths)
    tr = read_table(cfg, "train")
    assert list(tr.ids) == ["daisy/123.jpg", "daisy/124", "sub/dir/x.png", "top.png"]  # as written: stems too
    assert [int(a[0, 0, 0]) for a in tr.images] == [20, 21, 22, 23] and tr.class_names == ["daisy", "rose"]
    assert list(read_table(cfg, "test").ids) == ["t.png"]
    (paths / "train" / "top.png").unlink()  # every training image in a sub-folder: the native size still reads
    pd.read_csv(paths / "train.csv").iloc[:3].to_csv(paths / "train.csv", index=False)
    _png(paths / "train" / "daisy" / "123.jpg", 20, size=(12, 20))
    assert build_reader(cfg).native_size() == 8
    auto = load_config(cfg.path, ["data.image_size=null", "data.channels=null"])
    with pytest.raises(PipelineError, match=r"daisy/123.jpg: image is 12x20 but .* is 8x8"):
        read_table(auto, "test")  # the training files in sub-folders count for the size from the files


# ---- bad input: one line naming the culprit, exit code 2, nothing written -----------------------


def _beside(d):
    _png(d / "train" / "stray.png", 3)


def _nested(d):
    _png(d / "train" / "b" / "deeper" / "k.png", 3)


def _empty_class(d):
    (d / "train" / "c").mkdir()
    (d / "train" / "c" / "notes.txt").write_text("no image")


def _test_in_classes(d):
    _png(d / "test" / "cat" / "k.png", 3)  # cifar10 style test/<class>/: test/ must be flat
    for k in range(4):  # enough rows for adversarial folds, which read test/
        _png(d / "train" / "1" / f"more{k}.png", 60 + k)


def _class_link(target):
    def mutate(d):
        out = d.parent / "elsewhere"
        _png(out / "o.png", 3)
        os.symlink(out if target == "outside" else d / "test", d / "train" / "c")

    return mutate


def _file_link_to_test(d):
    os.symlink(d / "test" / "t2.png", d / "train" / "b" / "leak.png")


def _csv(rows):
    def mutate(d):
        _png(d.parent / "elsewhere" / "o.png", 3)
        if "out/" in rows[-1][0]:
            os.symlink(d.parent / "elsewhere", d / "train" / "out")
        pd.DataFrame(rows, columns=["id", "label"]).to_csv(d / "train.csv", index=False)

    return mutate


OK_ROWS = [("01/x2.png", "a"), ("1/a.jpg", "b")]
REFUSED = {
    "image-beside-class-folders": (
        _beside,
        r"train/stray.png: an image file directly in train/ beside the class folders 01/, 1/, b/; "
        r"expected either only class folders \(train/<class>/<image>\) or train.csv \(id,label\)",
    ),
    "nested-folder": (
        _nested,
        r"train/b/deeper: a folder inside the class folder b/; expected image files directly in train/<class>/",
    ),
    "empty-class-folder": (
        _empty_class,
        r"train/c: a class folder with no image files; expected at least one image file \(.png, .jpg, ...\)",
    ),
    "test-not-flat": (
        _test_in_classes,
        r"test/cat: a sub-folder of images in test/; expected the test images directly in test/ "
        r"\(only train/ holds class folders\) or test.csv",
    ),
    "class-link-outside": (
        _class_link("outside"),
        r"train/c/ \(class folder\) resolves to .*elsewhere, outside .*train; expected image files inside",
    ),
    "class-link-to-test": (
        _class_link("test"),
        r"train/c/ \(class folder\) resolves to .*comp/test, outside .*train; expected image files inside",
    ),
    "file-link-to-test": (
        _file_link_to_test,
        r"train/b/leak.png: id 'b/leak.png' resolves to .*test/t2.png, outside .*train; expected",
    ),
    "csv-path-up": (
        _csv([*OK_ROWS, ("01/../../test/t2.png", "a")]),
        r"train.csv: row 3: id '01/../../test/t2.png' leaves train/; expected a file name or a path inside",
    ),
    "csv-absolute-path": (
        _csv([*OK_ROWS, ("/etc/hostname", "a")]),
        r"train.csv: row 3: id '/etc/hostname' leaves train/",
    ),
    "csv-linked-folder-outside": (
        _csv([*OK_ROWS, ("out/o.png", "a")]),
        r"train.csv: row 3: id 'out/o.png' resolves to .*elsewhere/o.png, outside .*train",
    ),
    "csv-stem-in-linked-folder-outside": (
        _csv([*OK_ROWS, ("out/o", "a")]),
        r"train.csv: row 3: id 'out/o' resolves to .*elsewhere, outside .*train",
    ),
    "csv-same-file-twice": (
        _csv([*OK_ROWS, ("./1/a.jpg", "a")]),
        r"train.csv: row 3: id './1/a.jpg' is the same file as row 2 \(id '1/a.jpg'\); expected one row per image",
    ),
    "csv-path-missing": (
        _csv([*OK_ROWS, ("b/nope", "a")]),
        r"train.csv: row 3: id 'b/nope' has no image file in .*train; expected train/b/nope or train/b/nope.<png",
    ),
    "csv-stem-ambiguous": (
        lambda d: [_png(d / "train" / "b" / "z.jpg", 5), _csv([*OK_ROWS, ("b/z", "a")])(d)],
        r"train.csv: row 3: id 'b/z' matches b/z.jpg and b/z.png in train/; expected one image file per id",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_in_one_line_writing_nothing(make_config, classes, tmp_path, capsys, name):
    mutate, message = REFUSED[name]
    mutate(classes)
    # test/ is read by adversarial folds (plain folds need only train/; predict reads test/ too)
    folds = {"adversarial": True, "n_splits": 2} if name == "test-not-flat" else {}
    cfg = make_config(classes, "image_folder", data={"image_size": 8, "channels": 1}, folds=folds)
    before = _snapshot(tmp_path)
    err = cli_error(capsys, "fold", cfg)
    assert re.search(message, err), err
    assert _snapshot(tmp_path) == before  # no folds, no plan, no run folder
    with pytest.raises(PipelineError, match=message):  # the library says the same, reading either split
        read_table(load_config(cfg), "train" if name != "test-not-flat" else "test")


def test_native_size_refuses_the_same(make_config, classes):
    _nested(classes)
    with pytest.raises(PipelineError, match=r"train/b/deeper: a folder inside the class folder b/"):
        build_reader(_cfg(make_config, classes)).native_size()


# ---- property: any class and file names --------------------------------------------------------

NAME = st.text(st.sampled_from("abAB019_- é"), min_size=1, max_size=6).filter(lambda s: s.strip() == s)
CLASS = st.one_of(NAME, st.sampled_from(["0", "1", "01", "001", "10", "1.0", "nan", "True"]))


@given(
    layout=st.dictionaries(
        CLASS,
        st.lists(st.tuples(NAME, st.sampled_from([".png", ".jpg", ".PNG"])), min_size=1, max_size=3),
        min_size=1,
        max_size=6,
    )
)
def test_any_class_and_file_names(make_config, tmp_path_factory, layout):
    d = tmp_path_factory.mktemp("prop")
    want, value = {}, 0
    for cls, files in layout.items():
        for stem, ext in dict(files).items():  # one extension per stem
            value += 3  # apart: a JPEG may be one grey level off
            _png(d / "train" / cls / f"{stem}{ext}", value)
            want[f"{cls}/{stem}{ext}"] = value
    _png(d / "test" / "t.png", 0)
    tr = read_table(_cfg(make_config, d, cache=False), "train")
    assert sorted(tr.ids) == sorted(want) and len(set(tr.ids)) == len(tr)
    assert tr.class_names == sorted(layout)  # text: "01", "1" and "1.0" are three classes
    assert [tr.class_names[k] for k in tr.labels] == [i.rsplit("/", 1)[0] for i in tr.ids]
    assert all(abs(int(a[0, 0, 0]) - want[i]) <= 1 for a, i in zip(tr.images, tr.ids))
    assert list(tr.labels) == sorted(tr.labels)  # rows grouped by class, in the class order


def test_an_image_too_large_to_decode_is_one_line(capsys, make_config, classes, monkeypatch):
    """Pillow's decompression-bomb limit holds: one line naming the file, nothing written (issue 28 item 4)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x this is the refusal: a 64x64 file is a "bomb" here
    Image.new("L", (64, 64), 7).save(classes / "train" / "b" / "huge.png")
    cfg = make_config(classes, "image_folder", data={"image_size": 8, "channels": 1}, folds={"n_splits": 2})
    before = _snapshot(classes.parent)
    err = cli_error(capsys, "fold", cfg)
    assert "huge.png" in err and "DecompressionBomb" in err, err
    assert _snapshot(classes.parent) == before
