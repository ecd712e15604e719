"""``train.executor``: which executor runs the jobs (``auto`` keeps the old ``fold_jobs`` rule), its keys
out of the run hash, the one-line errors, and a real two-node Ray cluster losing a node mid-job."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cli_error, run_cli

from pipeline.config.load import load_config
from pipeline.data.formats import read_table
from pipeline.train.executors import ProcessExecutor, RayExecutor, SequentialExecutor, build_executor, executor_width

ROOT = Path(__file__).resolve().parents[1]


def _iceberg(make_config, iceberg_dir, **train):
    return make_config(
        iceberg_dir,
        folds={"n_splits": 2, "seed": 0},
        model={"backbone": "simple_cnn", "pretrained": False, "drop_rate": 0.0},
        train={
            "epochs": 2,
            "batch_size": 32,
            "lr": 3e-3,
            "optimizer": "adam",
            "patience": 0,
            "device": "cpu",
            "precision": "fp32",
            **train,
        },
    )


def _chosen(cfg, n_jobs=4, hooks=False):
    ex = build_executor(
        cfg,
        todo=[None] * n_jobs,
        table=None,
        rows=None,
        device=torch.device("cpu"),
        run_hash="h",
        precision="fp32",
        t_start=0.0,
        n_refit=0,
        on_epoch=None,
        hooks=hooks,
    )
    return type(ex)


def test_executor_follows_train_executor_and_fold_jobs_as_before(make_config, iceberg_dir):
    path = _iceberg(make_config, iceberg_dir)
    cases = {  # overrides -> executor, width the plan counts on
        (): (SequentialExecutor, 1),  # the defaults: as before the key existed
        ("train.fold_jobs=2",): (ProcessExecutor, 2),  # an old config: fold_jobs alone still means processes
        ("train.executor=auto", "train.fold_jobs=2"): (ProcessExecutor, 2),
        ("train.executor=processes", "train.fold_jobs=2"): (ProcessExecutor, 2),
        ("train.executor=local", "train.fold_jobs=2"): (SequentialExecutor, 1),
        ("train.executor=ray", "train.fold_jobs=2"): (RayExecutor, 1),  # the plan cannot see a cluster
    }
    for overrides, (kind, width) in cases.items():
        cfg = load_config(path, list(overrides))
        assert _chosen(cfg) is kind, overrides
        assert executor_width(cfg, 4, "cpu") == width, overrides
    # where the jobs cannot leave this process: tuning's per-epoch hooks, and one job for processes
    assert _chosen(load_config(path, ["train.executor=ray"]), hooks=True) is SequentialExecutor
    assert _chosen(load_config(path, ["train.executor=processes", "train.fold_jobs=2"]), n_jobs=1) is SequentialExecutor
    assert executor_width(load_config(path, ["train.fold_jobs=2"]), 4, "cuda") == 1  # fold_jobs is CPU-only, as before


def test_executor_keys_are_out_of_the_run_hash(make_config, iceberg_dir):
    path = _iceberg(make_config, iceberg_dir)
    base = load_config(path)
    for o in (
        [
            "train.executor=ray",
            "train.ray_address=10.0.0.1:6379",
            "train.ray_num_cpus=4",
            "train.ray_num_gpus=0.5",
            "train.ray_max_retries=0",
        ],
        ["train.executor=processes", "train.fold_jobs=3"],
        ["train.executor=local"],
    ):
        cfg = load_config(path, o)
        assert cfg.hash() == base.hash() and cfg.hash("train") == base.hash("train"), o
    assert load_config(path, ["train.epochs=3"]).hash() != base.hash()  # the hash still sees what is computed


def test_bad_executor_keys_are_one_line(make_config, iceberg_dir, capsys):
    path = _iceberg(make_config, iceberg_dir)
    assert run_cli("fold", path) == 0
    before = sorted(p for p in Path.cwd().rglob("*"))
    err = cli_error(capsys, "train", path, "train.executor=threads")
    assert "train.executor" in err and "'local', 'processes' or 'ray'" in err
    err = cli_error(capsys, "train", path, "train.executor=processes")
    assert "executor is processes but fold_jobs is 1" in err and "train.fold_jobs=2" in err
    err = cli_error(capsys, "train", path, "train.executor=ray", "train.ray_address=head node")
    assert "train.ray_address" in err and "host:port" in err
    with socket.socket() as s:  # a port nobody listens on: refused at once, not after Ray's minutes of retries
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pytest.importorskip("ray")
    err = cli_error(capsys, "train", path, "train.executor=ray", f"train.ray_address=127.0.0.1:{port}")
    assert (
        err.startswith(f"error: train.ray_address: nothing answers at 127.0.0.1:{port}") and "ray start --head" in err
    )
    assert sorted(p for p in Path.cwd().rglob("*")) == before  # no plan, snapshot or run folder


def test_ray_missing_is_one_line_naming_the_key_and_the_install(make_config, iceberg_dir, capsys, monkeypatch):
    path = _iceberg(make_config, iceberg_dir)
    assert run_cli("fold", path) == 0
    before = sorted(p for p in Path.cwd().rglob("*"))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    err = cli_error(capsys, "train", path, "train.executor=ray")
    assert err.startswith("error: train.executor: ray needs the ray package") and "pip install -e .[ray]" in err
    assert sorted(p for p in Path.cwd().rglob("*")) == before


# ---- a real cluster: head and worker node as separate processes on this machine ------------------------

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, ok, timeout: float, logs=()) -> None:
    end = time.time() + timeout
    while not ok():
        if time.time() > end:
            tails = "\n".join(f"--- {p}\n{Path(p).read_text()[-3000:]}" for p in logs if Path(p).exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


class _Node:
    """``ray start --block`` in its own session: killing its process group is a machine going away."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [str(RAY), "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_for(
            f"{log.stem} to start",
            lambda: "Ray runtime started" in log.read_text() or self.proc.poll() is not None,
            240,
            [log],
        )
        assert self.proc.poll() is None, log.read_text()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.slow  # two Ray nodes start and one restarts: about two minutes on a loaded 2-core machine
def test_ray_cluster_survives_a_killed_worker_node(make_config, iceberg_dir, tmp_path, capfd, monkeypatch):
    ray = pytest.importorskip("ray")
    path = _iceberg(make_config, iceberg_dir, refit=True)  # the refit after the folds is a Ray task too
    port, barrier = _free_port(), tmp_path / "barrier"
    barrier.mkdir()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PIPELINE_TEST_BARRIER": str(barrier),
        "RAY_AUTH_MODE": "disabled",
    }  # loopback only; else a token left in ~/.ray by another cluster is demanded
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the driver, this process
    worker_args = [f"--address=127.0.0.1:{port}", "--num-cpus=1"]
    nodes, held = [], []
    try:
        nodes.append(
            _Node(
                ["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp}"],
                env,
                tmp_path / "head.log",
            )
        )
        # only the first worker node holds its job after epoch 1 (pipeline.train.executors._test_barrier)
        nodes.append(_Node(worker_args, {**env, "PIPELINE_TEST_HOLD": "held"}, tmp_path / "worker.log"))
        ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING")
        _wait_for("2 live nodes", lambda: sum(n["Alive"] for n in ray.nodes()) == 2, 120)
        ray.shutdown()

        def kill_worker_when_its_job_is_mid_way():
            try:
                _wait_for(
                    "the worker node's job to finish epoch 1",
                    lambda: any(barrier.glob("*.epoch1.held")),
                    300,
                    [tmp_path / "head.log", tmp_path / "worker.log"],
                )
                f = next(barrier.glob("*.epoch1.held"))
                held.append((f.name.split(".")[0], int(f.read_text())))
                nodes[1].kill()  # the worker node goes away with its job in flight (the job's last.pt is on disk)
                nodes.append(_Node(worker_args, env, tmp_path / "worker2.log"))  # a machine joins again
            except BaseException as e:  # the main thread's assertion shows it
                held.append(e)
                for n in nodes:
                    n.kill()

        watcher = threading.Thread(target=kill_worker_when_its_job_is_mid_way, daemon=True)
        watcher.start()
        os.makedirs("ray_run")
        os.chdir("ray_run")
        assert run_cli("fold", path) == 0
        code = run_cli("train", path, "train.executor=ray", f"train.ray_address=127.0.0.1:{port}")
        watcher.join(300)
        assert held and not isinstance(held[0], BaseException), held
        assert code == 0
        killed_job, killed_pid = held[0]
        _wait_for("the killed node's job process to end", lambda: not _alive(killed_pid), 60)
        out = capfd.readouterr().out
        assert "ray: 2 node(s), 2 CPU 0 GPU: 2 job(s) at once of 1 CPU 0 GPU" in out
        oof = pd.read_csv("runs/comp/exp/oof.csv", dtype={"id": str})
        # the retried job resumed from its last.pt: epoch 1 was not trained again, epoch 2 was
        names = sorted(p.name for p in barrier.iterdir())
        assert f"{killed_job}.epoch1" not in names and f"{killed_job}.epoch2" in names, names
        assert pd.read_csv(f"runs/comp/exp/{killed_job}/history.csv")["epoch"].tolist() == [1, 2]
        # a rerun skips the finished folds without asking the cluster for anything
        assert run_cli("train", path, "train.executor=ray", f"train.ray_address=127.0.0.1:{port}") == 0
        out = capfd.readouterr().out
        assert "fold 0: done, skipping" in out and "refit: done, skipping" in out and "ray:" not in out
    finally:
        for n in reversed(nodes):
            n.kill()
        for item in held:
            if isinstance(item, tuple) and _alive(item[1]):
                os.kill(item[1], signal.SIGKILL)
        subprocess.run(["rm", "-rf", temp], check=False)

    # the same config through the local executor, with the threads a Ray job of 1 CPU gets
    table_ids = read_table(load_config(path), "train").ids.astype(str)
    assert len(oof) == len(table_ids) and oof["id"].is_unique and set(oof["id"]) == set(table_ids)
    os.chdir(tmp_path)
    os.makedirs("local_run")
    os.chdir("local_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli("fold", path) == 0 and run_cli("train", path, "train.executor=local") == 0
    finally:
        torch.set_num_threads(threads)
    local = pd.read_csv("runs/comp/exp/oof.csv", dtype={"id": str})
    pd.testing.assert_frame_equal(local[["id", "fold", "target"]], oof[["id", "fold", "target"]])
    np.testing.assert_allclose(oof.filter(like="p_").to_numpy(), local.filter(like="p_").to_numpy(), atol=1e-6, rtol=0)
    from safetensors.torch import load_file

    a, b = (load_file(f"{root}/runs/comp/exp/refit/best.safetensors") for root in (tmp_path / "ray_run", "."))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


@pytest.mark.slow  # a one-node Ray cluster starts: about a minute on a loaded 2-core machine
def test_ray_pseudo_labels_and_refit_match_local(make_config, iceberg_dir, tmp_path, monkeypatch):
    """Pseudo-labels reach the Ray tasks as they reach fold_jobs' processes (the same rows, the same
    done.json record), and the refit, a Ray task too, trains on them."""
    pytest.importorskip("ray")
    from helpers import RUN, SRC, TRAIN, confident, craft_source

    path = make_config(
        iceberg_dir,
        folds={"n_splits": 3, "seed": 0},
        pseudo={"from": str(SRC), "threshold": 0.95},
        model={"backbone": "simple_cnn", "pretrained": False, "drop_rate": 0.0},
        train={**TRAIN, "refit": True},
    )
    assert run_cli("fold", path) == 0
    n_test = len(read_table(load_config(path), "test"))
    craft_source(path, all_probs=confident(n_test, range(0, n_test, 2), [0, 1] * n_test))  # the refit's rows
    assert run_cli("train", path) == 0
    a = pd.read_csv(RUN / "oof.csv", dtype={"id": str})
    done = {d: (RUN / d / "done.json").read_text() for d in ("fold_1", "refit")}
    for d in ("fold_0", "fold_1", "fold_2", "refit"):
        (RUN / d / "done.json").unlink()
    port, temp = _free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    head = None
    try:
        head = _Node(
            ["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}"],
            env,
            tmp_path / "head.log",
        )
        assert run_cli("train", path, "train.executor=ray", f"train.ray_address=127.0.0.1:{port}") == 0
    finally:
        if head is not None:
            head.kill()
        subprocess.run(["rm", "-rf", temp], check=False)
    b = pd.read_csv(RUN / "oof.csv", dtype={"id": str})
    pd.testing.assert_frame_equal(a, b, atol=1e-4)  # 1 thread per Ray job against all cores here
    import json

    for d, text in done.items():
        assert json.loads((RUN / d / "done.json").read_text())["pseudo"] == json.loads(text)["pseudo"], d
    assert json.loads(done["refit"])["pseudo"]["rows"] > 0


def test_ray_under_torchrun_is_refused_before_any_process_group(make_config, iceberg_dir, capsys, monkeypatch):
    path = _iceberg(make_config, iceberg_dir)
    assert run_cli("fold", path) == 0
    before = sorted(p for p in Path.cwd().rglob("*"))
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():  # what torchrun sets
        monkeypatch.setenv(k, v)
    err = cli_error(capsys, "train", path, "train.executor=ray")
    assert "train.executor: ray with torchrun (world_size 2)" in err and "train.executor=local" in err
    assert sorted(p for p in Path.cwd().rglob("*")) == before
