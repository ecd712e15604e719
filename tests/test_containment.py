"""Nothing outside the competition's folder is read: image_folder ids are files inside train/ or test/."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli_error, run_cli


@pytest.fixture
def comp(tmp_path, folder_dir):
    """A writable image-folder competition: the demo folder's 200 train and 4 of its test images."""
    d = tmp_path / "comp"
    for split, n in (("train", 200), ("test", 4)):
        df = pd.read_csv(folder_dir / f"{split}.csv").iloc[:n]
        (d / split).mkdir(parents=True)
        for i in df["id"]:
            shutil.copy(folder_dir / split / i, d / split / i)
        df.to_csv(d / f"{split}.csv", index=False)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(d / "train" / pd.read_csv(d / "train.csv")["id"][0], outside / "x.png")
    return d


def _set_id(d: Path, row: int, new_id: str) -> str:
    df = pd.read_csv(d / "train.csv")
    old = df.loc[row, "id"]
    df.loc[row, "id"] = new_id
    df.to_csv(d / "train.csv", index=False)
    return old


def _snapshot(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if ".cache" not in p.parts and p.is_file()}


def _refused(capsys, make_config, tmp_path, d, expect):
    cfg = make_config(d, "image_folder", data={"image_size": 16})
    before = _snapshot(tmp_path)
    err = cli_error(capsys, "fold", cfg)
    assert err.startswith(f"error: {d / 'train.csv'}: row 3: id ") and expect in err, err
    assert _snapshot(tmp_path) == {**before, **{k: v for k, v in _snapshot(tmp_path).items() if k == str(cfg)}}
    assert not Path("folds").exists()


@pytest.mark.parametrize(
    "bad",
    [
        "{outside}/x.png",
        "../elsewhere/x.png",
        "../../x.png",
        "../test/{test0}",
        "sub/../../elsewhere/x.png",
        "\\\\server\\share\\x.png",
    ],
)
def test_ids_that_leave_the_folder_are_refused(comp, tmp_path, make_config, capsys, bad):
    test0 = pd.read_csv(comp / "test.csv")["id"][0]
    _set_id(comp, 2, bad.format(outside=tmp_path / "elsewhere", test0=test0))
    _refused(capsys, make_config, tmp_path, comp, "leaves train/")


@pytest.mark.parametrize("target", ["elsewhere", "test"])
def test_links_that_resolve_outside_the_split_are_refused(comp, tmp_path, make_config, capsys, target):
    """A file link in train/ to another folder (even test/: a leak) is refused; so is a linked sub-folder."""
    name = _set_id(comp, 2, "link.png")
    real = (
        tmp_path / "elsewhere" / "x.png"
        if target == "elsewhere"
        else comp / "test" / pd.read_csv(comp / "test.csv")["id"][0]
    )
    os.symlink(real, comp / "train" / "link.png")
    (comp / "train" / name).unlink()
    _refused(capsys, make_config, tmp_path, comp, f"resolves to {real}")


def test_linked_subfolder_outside_is_refused(comp, tmp_path, make_config, capsys):
    os.symlink(tmp_path / "elsewhere", comp / "train" / "sub")
    _set_id(comp, 2, "sub/x.png")
    _refused(capsys, make_config, tmp_path, comp, "resolves to")


def test_subfolders_and_a_linked_data_root_are_fine(comp, tmp_path, make_config):
    name = pd.read_csv(comp / "train.csv")["id"][2]
    (comp / "train" / "sub").mkdir()
    shutil.move(comp / "train" / name, comp / "train" / "sub" / name)
    _set_id(comp, 2, f"sub/{name}")
    os.symlink(comp, tmp_path / "input")  # as Kaggle's /kaggle/input
    inner = comp / "train" / "inner.png"  # a link inside the split folder stays allowed
    os.symlink(comp / "train" / "sub" / name, inner)
    assert run_cli("fold", make_config(tmp_path / "input", "image_folder", data={"image_size": 16})) == 0
    assert len(pd.read_csv("folds/comp.csv")) == 200
