"""Nothing the pipeline writes lands in ``data.dir``: a folds file, its snapshot, runs or submissions there
would overwrite the competition's own files (issue 28 item 5: ``folds.file=D/train.csv`` replaced the labels)."""

import shutil

import pytest
from conftest import cli_error, run_cli


def _files(root):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if ".cache" not in p.parts}


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["folds.file={d}/train.csv"], "folds.file"),
        (["paths.folds={d}", "competition=train"], "paths.folds"),
        (["paths.folds={d}/sub/deeper"], "paths.folds"),
        (["paths.runs={d}/runs"], "paths.runs"),
        (["paths.submissions={d}"], "paths.submissions"),
    ],
)
@pytest.mark.parametrize("command", ["fold", "train", "run"])
def test_outputs_inside_the_data_folder_are_refused(
    capsys, make_config, sk_digits_dir, tmp_path, overrides, key, command
):
    d = tmp_path / "data"
    shutil.copytree(sk_digits_dir, d)
    cfg = make_config(d, "pixel_csv")
    before, here = _files(d), _files(tmp_path)
    err = cli_error(capsys, command, cfg, *[o.format(d=d) for o in overrides])
    assert key in err and "inside data.dir" in err and str(d) in err, err
    assert _files(d) == before and _files(tmp_path) == here  # the labels intact, nothing written anywhere


def test_outputs_beside_the_data_folder_are_fine(make_config, sk_digits_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(sk_digits_dir, d)
    assert run_cli("fold", make_config(d, "pixel_csv"), f"paths.folds={tmp_path / 'data-folds'}") == 0
    assert (tmp_path / "data-folds" / "comp.csv").is_file()
