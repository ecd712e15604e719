"""Every script in benchmarks/ still runs end to end, so none can rot: each is started as a user starts it
(``python benchmarks/X.py ...`` in a fresh process) with its tiny ``--smoke`` settings, and must exit 0
having printed something. Nothing is asserted about the figures it prints: at these sizes they mean nothing.

Each case runs in its own folder, which is also its TMPDIR (the scripts' default work folders land there
and go with it), with its own cache (PIPELINE_CACHE) and this checkout first on PYTHONPATH.
"""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> (arguments, timeout in seconds). The limits are several times what a run takes on a loaded
# 2-core machine; the figures in the comments are one such run (each pays ~5 s of importing torch per process).
CASES = {
    # resnet10t from scratch at 16 px, 2 folds x 1 epoch on 34 shift-folder images (written below): ~10 s
    "baseline_loop": (["--smoke", "--data", "{shift_folder}"], 120),
    # HEAD (exported with git archive) against this working tree: fold_jobs 1, 60 chips, 1 step: ~40 s
    "before_after": (["--base", "HEAD", "--smoke"], 300),
    # image-folder.yaml planned for a 5 s budget on 60 images, 2 folds: ~25 s
    "budget": (["--smoke"], 240),
    # the CPU path (no GPU is faked): fp32 and bf16 on simple_cnn at 16 px, fp16 skipped with its reason: ~10 s
    "gpu_smoke": (["--smoke", "--device", "cpu"], 120),
    # 40 JPEGs read at 32 px, then fold 0 of simple_cnn for 1 step, each phase in its own process: ~10 s
    "inference": (["--smoke"], 120),
    "memory": (["--smoke"], 120),
    # local and torchrun 2 on 60 chips, 2 folds x 1 epoch of simple_cnn (fold_jobs and ray: the slow case below): ~40 s
    "scale": (["--smoke"], 240),
    # a 3-member zoo, 3 blends and a pseudo-labelled member, simple_cnn, 2 folds x 1 epoch, 60 chips: ~25 s
    "second_stage": (["--smoke"], 240),
    # folder-demo.yaml and the baseline on 34 shift-folder images, 5 s budget: ~35 s
    "shift_folder": (["--smoke"], 240),
    # raw (fp32), naive and pipeline loops (fold_jobs 1 and 2) of tf_efficientnet_lite0, 1 step of batch 8: ~70 s
    "train_throughput": (["--smoke"], 360),
    # pruned and plain searches of 3 s each, simple_cnn, fold 0, 2 epochs: ~15 s
    "tune_pruning": (["--smoke"], 120),
    # the suite's real runs take hours and stay out of make test-all; its smoke is one tiny set at 8 s
    "suite": (["--smoke"], 300),
}


def run_script(tmp_path: Path, script: str, args: list[str], timeout: float) -> str:
    """Run benchmarks/<script>.py in ``tmp_path``; its stdout. On timeout its whole process group is ended (the
    scripts start workers of their own: fold_jobs processes, torchrun ranks), SIGTERM first so that scale.py
    ends the Ray nodes it started in their own sessions."""
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "PIPELINE_CACHE": str(tmp_path / ".cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group
        pytest.fail(f"benchmarks/{script}.py {' '.join(args)}: no exit after {timeout} s\n{out[-2000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, (
        f"benchmarks/{script}.py {' '.join(args)}: exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    )
    assert out.strip(), f"benchmarks/{script}.py {' '.join(args)} printed nothing\n{err[-3000:]}"
    return out


def _args(args: list[str], tmp_path: Path) -> list[str]:
    if "{shift_folder}" in args:
        from pipeline.data.demo import WRITERS

        WRITERS["shift-folder"](tmp_path / "shift-folder", n_train=34, n_test=10, seed=0)
    return [a.format(shift_folder=tmp_path / "shift-folder") for a in args]


def test_every_benchmark_has_a_smoke_case():
    assert sorted(CASES) == sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize(
    "script", [pytest.param(name, marks=pytest.mark.timeout(limit + 60)) for name, (_, limit) in CASES.items()]
)
def test_benchmark_smoke(script, tmp_path):
    args, limit = CASES[script]
    if script == "before_after":
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD"], capture_output=True, check=False
        )
        if head.returncode:
            pytest.skip("before_after.py compares git revisions: this checkout is not a git repository with a commit")
    run_script(tmp_path, script, _args(args, tmp_path), limit)


@pytest.mark.slow  # a two-node Ray cluster starts (ray start --block): about a minute on a loaded 2-core machine
@pytest.mark.timeout(540)
def test_scale_every_contestant_smoke(tmp_path):
    """scale.py's four contestants: local, fold_jobs 2, torchrun 2 and ray 2x1 (the default tier skips the last two)."""
    pytest.importorskip("ray")
    run_script(tmp_path, "scale", ["--smoke", "--skip", "none"], 510)
