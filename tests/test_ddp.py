"""One model on N processes: ``torchrun --nproc_per_node 2 -m pipeline train CONFIG`` (gloo on CPU).

The end-to-end tests start the real torchrun launcher as a subprocess. What makes a 2-rank run
comparable with one process: dropout off (``model.drop_rate: 0``) and BatchNorm statistics frozen
(``train.freeze_bn: true``: per-rank batch statistics would differ from the global batch's), with
``train.batch_size`` the global batch in both. A batch size of 15 gives the ranks shares of 8 and 7
rows, so the per-share loss weights are exercised too.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cli_error, run_cli
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.errors import PipelineError
from pipeline.train.distributed import DistContext, convert_sync_bn

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = {
    "model": {"backbone": "test_efficientnet", "pretrained": False, "drop_rate": 0.0, "input_size": 32},
    "train": {
        "epochs": 2,
        "batch_size": 15,
        "lr": 0.01,
        "optimizer": "adam",
        "scheduler": "cosine",
        "patience": 0,
        "device": "cpu",
        "freeze_bn": True,
    },
}


# ---- DistContext on its own ---------------------------------------------------------------------


def test_one_process_is_inert():
    d = DistContext()
    assert (d.rank, d.world_size, d.is_main, d.active) == (0, 1, True, False)
    rows, batches = np.arange(10), [np.arange(5), np.arange(5, 9)]
    assert d.shard(rows) is rows and d.gather_rows(rows) is rows
    assert d.shard_batches(batches) == (batches, None)
    assert d.broadcast_decision(lambda: "stop") == "stop" and d.all_reduce_sum([1.5, 2]) == [1.5, 2]
    made = []
    assert d.main_first(lambda: made.append(1) or "table") == "table" and made == [1]  # once, not twice
    with pytest.raises(ValueError):  # a decision's exception is raised as it is
        d.broadcast_decision(lambda: int("x"))
    d.barrier()
    d.init(torch.device("cpu"))  # no process group for a world of one
    assert not torch.distributed.is_initialized()


def test_world_from_torchrun_environment():
    assert DistContext.from_env({}) == DistContext()
    assert DistContext.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == DistContext(
        rank=3, world_size=4, local_rank=1
    )
    assert not DistContext.from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}).active  # nproc_per_node 1
    for env, culprit in [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0"),
    ]:
        with pytest.raises(PipelineError, match=culprit):
            DistContext.from_env(env)


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6), world=st.integers(2, 5), seed=st.integers(0, 99))
def test_shares_cover_each_global_batch_and_weight_to_its_mean(sizes, world, seed):
    """Every row of a global batch is trained by exactly one rank, in order; DDP's average of the
    ranks' weighted share means is the global batch's mean (what one process computes)."""
    rng = np.random.default_rng(seed)
    batches = [np.sort(rng.choice(1000, n, replace=False)) for n in sizes]
    values = rng.normal(size=1000)
    per_rank = [DistContext(rank=r, world_size=world).shard_batches(batches) for r in range(world)]
    for b, batch in enumerate(batches):
        shares = [shards[b] for shards, _ in per_rank]
        np.testing.assert_array_equal(np.concatenate(shares), batch)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        ddp_mean = sum(w[b] * values[s].mean() for (_, w), s in zip(per_rank, shares) if len(s)) / world
        assert ddp_mean == pytest.approx(values[batch].mean(), rel=1e-9, abs=1e-12)


def test_sync_bn_conversion_keeps_weights_activations_and_checkpoint_keys(make_config, iceberg_dir):
    """SyncBatchNorm runs on CUDA only, so the conversion is what is tested on CPU."""
    from pipeline.config.load import load_config
    from pipeline.models.backbones import build_model
    from pipeline.train.optim import build_optimizer

    cfg = load_config(make_config(iceberg_dir, **TINY))
    model, _ = build_model(cfg, 2, 2, 1, (75, 75))
    opt = build_optimizer(cfg, model)
    before = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    acts = [type(m.act) for m in bn if hasattr(m, "act")]
    assert bn and acts  # timm's BatchNormAct2d: a plain SyncBatchNorm would drop its activation
    out = convert_sync_bn(model)
    assert out is model  # converted in place: the trainer's model, EMA source and checkpoint stay one object
    synced = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(synced) == len(bn) and all(isinstance(m, torch.nn.SyncBatchNorm) for m in synced)
    assert [type(m.act) for m in synced if hasattr(m, "act")] == acts
    assert list(model.state_dict()) == keys
    assert all(p is before[n] for n, p in model.named_parameters())  # the optimizer built before still holds them
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


WORKER = """
import json, sys
import numpy as np, torch
from pipeline.train.distributed import DistContext
from pipeline.core.errors import PipelineError

d = DistContext.from_env()
d.init(torch.device("cpu"))
out = {"rank": d.rank, "decision": d.broadcast_decision(lambda: f"stop at epoch 3 (decided by rank {d.rank})")}
for name, fn in (("pipeline", lambda: (_ for _ in ()).throw(PipelineError("runs/x: held by another machine"))),
                 ("unpicklable", lambda: (_ for _ in ()).throw(type("Local", (Exception,), {})("no pickle")))):
    try:
        d.broadcast_decision(fn)
        out[name] = None
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
rows = np.arange(11)
out["gathered"] = d.gather_rows(rows[d.shard(rows)] * 10).tolist()
out["sum"] = d.all_reduce_sum([d.rank + 1.0, 1.0])
marker = sys.argv[1].rsplit("/", 1)[0] + "/made"  # one file both ranks see
out["first"] = d.main_first(lambda: (open(marker, "a").write(f"{d.rank} "), open(marker).read())[1])
d.barrier()
d.teardown()
json.dump(out, open(sys.argv[1], "w"))
"""


def test_two_real_ranks_agree_on_rank_0s_decisions(tmp_path):
    """A gloo world of two plain processes (no model): rank 0's decision, and its exception, reach
    rank 1; shares come back in row order; sums are the world's."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"r{r}.json")],
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
                "WORLD_SIZE": "2",
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["decision"] == "stop at epoch 3 (decided by rank 0)"
        assert r["pipeline"] == "PipelineError: runs/x: held by another machine"
        assert r["gathered"] == list(range(0, 110, 10)) and r["sum"] == [3.0, 2.0]
    assert (r0["first"], r1["first"]) == ("0 ", "0 1 ")  # rank 1 ran after rank 0 had made it
    assert r0["unpicklable"] == "Local: no pickle"  # rank 0 raises its own; rank 1 gets its text
    assert r1["unpicklable"] == "RuntimeError: rank 0: Local: no pickle"


def test_freeze_bn_keeps_running_statistics_while_weights_train(make_config, iceberg_dir):
    """``train.freeze_bn``: what makes per-rank shares compute what the global batch does."""
    from pipeline.config.load import load_config
    from pipeline.data.folds import load_folds, run_fold
    from pipeline.data.formats import read_table
    from pipeline.plan.store import planned
    from pipeline.runs.layout import RunDir
    from pipeline.train.job import FoldTrainer

    path = make_config(iceberg_dir, folds={"n_splits": 2, "seed": 0}, **TINY)
    run_fold(load_config(path))
    for freeze in (True, False):
        cfg = planned(load_config(path, [f"train.freeze_bn={str(freeze).lower()}", "train.max_steps_per_epoch=2"]))
        table = read_table(cfg, "train")
        tr = FoldTrainer(
            cfg=cfg,
            table=table,
            fold_of=load_folds(cfg, table),
            job=RunDir.of(cfg).job_dir(0, 42),
            device=torch.device("cpu"),
            run_hash="test",
        )
        tr.build()
        stats = lambda tr=tr: [b.clone() for n, b in tr.model.named_buffers() if n.endswith("running_mean")]  # noqa: E731
        weights = lambda tr=tr: [p.detach().clone() for n, p in tr.model.named_parameters() if "bn" in n]  # noqa: E731
        s0, w0 = stats(), weights()
        tr.train_epoch(1)
        assert s0 and all(torch.equal(a, b) for a, b in zip(s0, stats())) == freeze
        assert not all(torch.equal(a, b) for a, b in zip(w0, weights()))  # BatchNorm's own weights still learn


# ---- what a world refuses, before any process group (env-faked main) ------------------------------


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process as rank 0 of 2, without a launcher: anything that reached a process group would
    fail on the missing MASTER_ADDR, so an answer here is the check before it."""
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_ADDR", raising=False)


def _files():
    return sorted(str(p) for p in Path(".").rglob("*") if ".cache" not in p.parts)


@pytest.mark.parametrize(
    "override,culprit",
    [
        ("train.fold_jobs=2", "train.fold_jobs: 2 with torchrun"),
        ("train.sync_bn=true", "train.sync_bn: true on cpu"),
        ("train.batch_size=3", "train.batch_size: 3 is the global batch"),
        ("train.device=cuda:1", "train.device: cuda:1 with torchrun"),
    ],
)
def test_torchrun_refuses_what_a_world_cannot_run(make_config, iceberg_dir, torchrun_env, capsys, override, culprit):
    path = make_config(iceberg_dir, **TINY)
    before = _files()
    err = cli_error(capsys, "train", path, override)
    assert culprit in err and str(path) in err
    assert _files() == before


def test_torchrun_runs_only_train(make_config, iceberg_dir, torchrun_env, capsys):
    path = make_config(iceberg_dir, **TINY)
    before = _files()
    err = cli_error(capsys, "fold", path)
    assert "torchrun: `pipeline fold` runs in one process (WORLD_SIZE=2)" in err
    assert _files() == before


def test_bad_torchrun_environment_is_one_line(make_config, iceberg_dir, monkeypatch, capsys):
    path = make_config(iceberg_dir, **TINY)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    assert "environment: RANK='x' is not a whole number" in cli_error(capsys, "train", path)


def test_each_rank_trains_on_its_local_gpu(make_config, iceberg_dir, monkeypatch):
    """CUDA faked as far as the decisions can tell: rank r of a node uses cuda:LOCAL_RANK (made current),
    sync_bn is allowed there, and an explicit cuda:K (every rank on one GPU) is refused."""
    from pipeline.config.load import load_config
    from pipeline.core import device as dev

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(dev, "apply_cudnn_flags", lambda d, det: None)
    path = make_config(iceberg_dir, **TINY)
    for device in ("auto", "cuda"):
        cfg = load_config(path, [f"train.device={device}", "train.sync_bn=true"])
        assert DistContext(rank=3, world_size=4, local_rank=1).check(cfg) == torch.device("cuda:1")
    assert calls == [torch.device("cuda:1")] * 2
    cfg = load_config(path, ["train.device=cpu", "train.sync_bn=true"])  # gloo on a GPU box: refused as on CPU
    with pytest.raises(PipelineError, match="train.sync_bn: true on cpu"):
        DistContext(rank=0, world_size=2).check(cfg)


def test_sync_bn_in_one_process_changes_nothing(make_config, iceberg_dir):
    """Without torchrun there is nothing to synchronise: the key is accepted and leaves the model alone."""
    from pipeline.config.load import load_config

    cfg = load_config(make_config(iceberg_dir, **{**TINY, "train": {**TINY["train"], "sync_bn": True}}))
    assert DistContext().check(cfg) == torch.device("cpu")


# ---- through the real launcher ------------------------------------------------------------------

SITE = """
import os, signal, sys, atexit
rank, audit = os.environ.get("RANK"), os.environ.get("DDP_TEST_AUDIT")
if rank is not None and audit:
    root, events, busy = os.path.realpath(os.getcwd()), [], []
    mine = os.path.realpath(audit)
    with open(os.path.join(audit, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    kill = os.environ.get("DDP_TEST_KILL_RANK1_AT")  # a path: when rank 0 writes it, rank 1 is killed

    def hook(event, args):
        if busy:
            return
        if event == "open":
            path, writing = args[0], isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
            path, writing = args[0], True
        else:
            return
        if not writing or not isinstance(path, (str, bytes, os.PathLike)):
            return
        busy.append(1)
        try:
            dst = os.path.realpath(os.fsdecode(args[1])) if event in ("os.rename", "os.replace") else ""
            for p in (os.path.realpath(os.fsdecode(path)), dst):
                if p.startswith(root) and not p.startswith(mine):
                    events.append(f"{event} {p}")
            if kill and rank == "0" and dst == os.path.realpath(kill) and not os.path.exists(kill + ".killed"):
                open(kill + ".killed", "w").close()
                os.kill(int(open(os.path.join(audit, "rank1.pid")).read()), signal.SIGKILL)
        finally:
            busy.clear()

    sys.addaudithook(hook)
    atexit.register(lambda: open(os.path.join(audit, f"rank{rank}.log"), "w").write("\\n".join(events)))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, **extra) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    audit = tmp_path / "audit"
    audit.mkdir(exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
        "OMP_NUM_THREADS": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "DDP_TEST_AUDIT": str(audit),
        **extra,
    }


def _torchrun(tmp_path, path, *args, **extra) -> subprocess.CompletedProcess:
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "pipeline",
        "train",
        str(path),
        *args,
    ]
    return subprocess.run(cmd, env=_env(tmp_path, **extra), capture_output=True, text=True, timeout=600)


def _one_process(path, *overrides) -> pd.DataFrame:
    """The same config and folds trained in this process on one thread (as each rank), into another
    runs folder (``paths`` is a runtime key: the same run hash)."""
    from pipeline.config.load import load_config
    from pipeline.train.cv import train_cv

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_cv(load_config(path, ["paths.runs=one_process", *overrides]))
    finally:
        torch.set_num_threads(threads)


def _max_diff(a: pd.DataFrame, b: pd.DataFrame) -> float:
    assert a["id"].tolist() == b["id"].tolist() and a["fold"].tolist() == b["fold"].tolist()
    return float(np.abs(a.filter(like="p_").to_numpy() - b.filter(like="p_").to_numpy()).max())


def _ddp_config(make_config, iceberg_dir):
    path = make_config(iceberg_dir, folds={"n_splits": 2, "seed": 0}, **TINY)
    assert run_cli("fold", path) == 0
    return path


def test_torchrun_two_ranks_match_one_process(make_config, iceberg_dir, tmp_path):
    path = _ddp_config(make_config, iceberg_dir)
    res = _torchrun(tmp_path, path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    run = Path("runs/comp/exp")
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    ids = json.loads((iceberg_dir / "train.json").read_text())
    assert sorted(oof["id"]) == sorted(str(r["id"]) for r in ids) and oof["id"].is_unique  # every row once
    diff = _max_diff(oof, _one_process(path))
    print(f"max |p_ddp - p_one_process| over {len(oof)} OOF rows: {diff:.2e}")
    assert diff < 1e-4
    done = [json.loads(Path(f"{root}/comp/exp/fold_0/done.json").read_text()) for root in ("runs", "one_process")]
    assert done[0]["hash"] == done[1]["hash"]  # the world size is not part of the run hash
    for k in (0, 1):
        assert json.loads((run / f"fold_{k}" / "best.json").read_text())["world_size"] == 2
        assert json.loads((run / f"fold_{k}" / "done.json").read_text())["world_size"] == 2
        assert re.search(rf"fold {k}: best epoch \d, val_loss", res.stdout), res.stdout
    assert res.stdout.count("world_size 2") >= 3  # the run's header line and each fold's line, printed once (rank 0)
    assert res.stdout.count("wrote runs/comp/exp/oof.csv") == 1
    audit = tmp_path / "audit"
    rank0 = (audit / "rank0.log").read_text()
    assert "fold_0/best.json" in rank0 and "fold_1/history.csv" in rank0 and "oof.csv" in rank0 and "lock" in rank0
    assert (audit / "rank1.log").read_text() == ""  # rank 1 wrote nothing under the working folder


@pytest.mark.slow  # two torchrun runs and one single-process run: ~90 s on a loaded 2-core machine
def test_killed_rank_resumes_to_the_same_oof(make_config, iceberg_dir, tmp_path):
    """Rank 1 is SIGKILLed the moment rank 0 writes fold 0's epoch-1 resume state (the file is the
    barrier); the rerun resumes fold 0 after epoch 1 and ends where one process does."""
    path = _ddp_config(make_config, iceberg_dir)
    last = Path("runs/comp/exp/fold_0/last.pt").resolve()
    killed = _torchrun(tmp_path, path, "train.epochs=3", DDP_TEST_KILL_RANK1_AT=str(last))
    assert killed.returncode != 0 and Path(f"{last}.killed").exists()
    assert not Path("runs/comp/exp/fold_0/done.json").exists() and last.exists()
    assert pd.read_csv("runs/comp/exp/fold_0/history.csv")["epoch"].tolist() == [1]
    resumed = _torchrun(tmp_path, path, "train.epochs=3")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "fold 0: resuming after epoch 1" in resumed.stdout
    assert pd.read_csv("runs/comp/exp/fold_0/history.csv")["epoch"].tolist() == [1, 2, 3]
    oof = pd.read_csv("runs/comp/exp/oof.csv", dtype={"id": str})
    diff = _max_diff(oof, _one_process(path, "train.epochs=3"))
    print(f"resumed 2-rank run vs one process: max abs difference {diff:.2e}")
    assert diff < 1e-4
