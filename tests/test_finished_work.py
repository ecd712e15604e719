"""Finished work survives a mistyped command: every name is checked before training looks at (let alone
retrains) a finished fold (issue 28 item 1; backbone names where training starts, the others when the
config loads), and a changed config keeps the finished folds aside (item 2)."""

from pathlib import Path

import pytest
from conftest import cli_error, run_cli


def _files(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if ".cache" not in p.parts}


@pytest.mark.parametrize(
    "typo, needle",
    [
        ("model.backbone=no_such_net_xyz", "model.backbone: timm does not know 'no_such_net_xyz'"),
        ("model.backbone=resnet81", "close matches: resnet18"),
        ("adversarial.backbone=tf_efficientnet_lite9", "adversarial.backbone: timm does not know"),
        ("train.optimizer=adamx", "train.optimizer: unknown optimizer 'adamx'"),
    ],
)
def test_a_typo_leaves_the_finished_fold_finished(capsys, digits_config, typo, needle):
    cfg = digits_config()
    assert run_cli("fold", cfg) == 0
    assert run_cli("train", cfg, "--folds", "0") == 0
    done = Path("runs/comp/exp/fold_0/done.json")
    assert done.is_file()
    before = _files(Path.cwd())
    err = cli_error(capsys, "train", cfg, "--folds", "0", typo)
    assert needle in err, err
    assert _files(Path.cwd()) == before  # fold 0 still finished: nothing removed, nothing written


def test_an_override_keeps_the_finished_folds_and_switching_back_restores_them(digits_config, capsys):
    """A changed training key trains a fold again but keeps the finished one aside (issue 28 item 2); going back
    to the earlier config restores it instead of training it a third time."""
    cfg = digits_config()
    assert run_cli("fold", cfg) == 0 and run_cli("train", cfg, "--folds", "0") == 0
    job = Path("runs/comp/exp/fold_0")
    first = (job / "best.safetensors").read_bytes()
    first_hash = __import__("json").loads((job / "done.json").read_text())["hash"]
    capsys.readouterr()
    assert run_cli("train", cfg, "--folds", "0", "train.lr=0.01") == 0
    out = capsys.readouterr().out
    kept = Path("runs/comp/exp/kept") / first_hash / "fold_0"
    assert "fold 0: finished under another config; kept in" in out and (kept / "best.safetensors").read_bytes() == first
    second = (job / "best.safetensors").read_bytes()
    assert run_cli("experiments", cfg) == 0
    assert f"1 of {first_hash}" in capsys.readouterr().out  # the experiments table shows what was kept
    assert run_cli("train", cfg, "--folds", "0") == 0
    out = capsys.readouterr().out
    assert "fold 0: finished under this config before; restored from" in out and "epoch 1/" not in out
    assert (job / "best.safetensors").read_bytes() == first and not kept.exists()
    others = [p for p in Path("runs/comp/exp/kept").iterdir()]
    assert len(others) == 1 and (others[0] / "fold_0" / "best.safetensors").read_bytes() == second
