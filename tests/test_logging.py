"""The library leaves logging to its user; the CLI's progress reaches a pipe line by line, as it happens."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_cli_progress_reaches_a_pipe_before_the_command_ends(sk_digits_dir, tmp_path):
    """`pipeline train` on a pipe: each epoch's line is readable while training goes on (no buffer held to exit)."""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "competition": "pipe",
                "metric": "accuracy",
                "data": {"format": "pixel_csv", "dir": str(sk_digits_dir)},
                "folds": {"n_splits": 3, "seed": 0},
                "model": {"backbone": "simple_cnn", "pretrained": False},
                "train": {
                    "epochs": 12,
                    "batch_size": 32,
                    "lr": 3e-3,
                    "optimizer": "adam",
                    "patience": 0,
                    "device": "cpu",
                },
            }
        )
    )
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONUNBUFFERED", None)
    assert (
        subprocess.run(
            [sys.executable, "-m", "pipeline", "fold", str(cfg)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=120,
        ).returncode
        == 0
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", str(cfg)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen_while_running = None
        for line in proc.stdout:
            if "fold 0 epoch 1/" in line:
                seen_while_running = proc.poll() is None
                break
        assert seen_while_running, "the first epoch's line arrived only when the command ended"
        rest = proc.stdout.read()
        assert proc.wait(timeout=240) == 0, proc.stderr.read()
        assert "fold 2 epoch 12/12" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_library_prints_nothing_unless_asked(tmp_path):
    code = (
        "import logging, pipeline\n"
        "logging.getLogger('pipeline.x').info('hidden')\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n"
        "logging.getLogger('pipeline.x').info('routed')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "pipeline.x routed\n", (res.stdout, res.stderr)
