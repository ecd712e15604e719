"""pipeline tune against a real PostgreSQL server: concurrent workers share one study.

The server is a throwaway cluster that ``scripts/pg.sh start`` runs on loopback (``.ci/run`` starts
one and sets ``REQUIRE_PG=1``); its URL arrives in ``PIPELINE_TEST_PG``. Without it the tests skip
with one line, unless ``REQUIRE_PG=1``, when they fail.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import run_cli
from optuna.trial import TrialState

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # a real server and real workers: full tier

WORKER_TIMEOUT = 900  # a hang guard, not a speed claim: CI machines may be loaded


@pytest.fixture(scope="session")
def pg_url():
    """The server ``scripts/pg.sh start`` runs (``.ci/run`` starts one): its URL in ``PIPELINE_TEST_PG``."""
    url = os.environ.get("PIPELINE_TEST_PG")
    if not url:
        why = 'PIPELINE_TEST_PG is not set; run eval "$(bash scripts/pg.sh start)" first'
        if os.environ.get("REQUIRE_PG") == "1":
            pytest.fail(f"PostgreSQL unavailable and REQUIRE_PG=1: {why}")
        pytest.skip(f"PostgreSQL unavailable: {why}")
    return url


@pytest.fixture
def pg_config(digits_config):
    """A config whose trials take about a second; the folds file written once up front."""

    def make(epochs=1, steps=2, **tune):
        path = digits_config(
            train={"epochs": epochs, "max_steps_per_epoch": steps, "batch_size": 32},
            tune={
                "folds": [0],
                "plots": False,
                "n_startup_trials": 2,
                "heartbeat_s": 1,
                "grace_s": 2,
                "pruner": "none",
                "space": {
                    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                    "model.drop_rate": {"type": "float", "low": 0.0, "high": 0.5},
                },
                **tune,
            },
        )
        assert run_cli("fold", path) == 0
        return path

    return make


def worker(path, url, study, *args, log=None):
    cmd = [sys.executable, "-m", "pipeline", "tune", str(path), "--storage", url, "--study", study, *map(str, args)]
    out = open(log or f"{study}-{time.monotonic_ns()}.log", "w")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    p.log = out
    return p


def finish(*procs):
    try:
        for p in procs:
            rc = p.wait(timeout=WORKER_TIMEOUT)
            p.log.close()
            log = Path(p.log.name).read_text()
            assert rc == 0, log
    finally:  # a worker left running would hold its connections and fail the next tests
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def trials(url, study):
    return optuna.load_study(
        study_name=study, storage=url.replace("postgresql://", "postgresql+psycopg://")
    ).get_trials()


def test_two_workers_share_one_study(pg_config, pg_url):
    # trials of a few seconds (full epochs), longer than the spread of the two workers' start-up,
    # so their trials overlap in time
    path = pg_config(epochs=6, steps=12)
    a, b = worker(path, pg_url, "pair", "--n-trials", 2), worker(path, pg_url, "pair", "--n-trials", 2)
    finish(a, b)
    ts = trials(pg_url, "pair")
    assert sorted(t.number for t in ts) == [0, 1, 2, 3]  # distinct numbers, none lost
    assert all(t.state == TrialState.COMPLETE for t in ts), [(t.number, t.state) for t in ts]
    by_worker = {}
    for t in ts:
        by_worker.setdefault(t.user_attrs["worker"], []).append(t)
    assert sorted(map(len, by_worker.values())) == [2, 2]
    ta, tb = by_worker.values()
    assert any(
        x.datetime_start < y.datetime_complete and y.datetime_start < x.datetime_complete for x in ta for y in tb
    )
    assert all(Path(f"runs/comp/tune/pair/trial_{t.number}/fold_0/done.json").exists() for t in ts)
    assert len({t.params["train.lr"] for t in ts}) == 4  # same seed on both workers, yet different draws


def test_max_trials_caps_the_study_across_workers(pg_config, pg_url):
    path = pg_config()
    a = worker(path, pg_url, "capped", "--n-trials", 2, "--max-trials", 3)
    b = worker(path, pg_url, "capped", "--n-trials", 2, "--max-trials", 3)
    finish(a, b)
    ts = trials(pg_url, "capped")
    done = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 3
    rest = [t for t in ts if t not in done]  # only a trial that lost a race to the cap, never trained
    assert all(t.state == TrialState.FAIL and t.user_attrs["error"].startswith("OverBudget") for t in rest), rest


def test_killed_worker_trial_is_failed_and_retried(pg_config, pg_url):
    path = pg_config()
    study, url = "killed", pg_url.replace("postgresql://", "postgresql+psycopg://")
    # a long trial (many epochs, no pruning) so it is surely RUNNING when the worker dies
    victim = worker(path, pg_url, study, "--n-trials", 1, "train.epochs=200", "tune.pruner=none")
    deadline = time.time() + WORKER_TIMEOUT
    running = []
    storage = optuna.storages.RDBStorage(url)  # one pool for the polling: a storage per poll leaks connections
    while time.time() < deadline and victim.poll() is None:
        try:
            running = optuna.load_study(study_name=study, storage=storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # study not created yet
            running = []
        if running and running[0].params:
            break
        time.sleep(0.3)
    assert running, f"no trial became RUNNING: {Path(victim.log.name).read_text()}"
    time.sleep(1.5)  # a heartbeat or two
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    victim.log.close()
    dead = running[0]
    assert trials(pg_url, study)[0].state == TrialState.RUNNING  # nobody cleaned up: the worker was killed
    time.sleep(3)  # grace_s 2: the heartbeat is now stale
    follow = worker(path, pg_url, study, "--n-trials", 1)
    finish(follow)
    ts = {t.number: t for t in trials(pg_url, study)}
    assert ts[dead.number].state == TrialState.FAIL
    retry = [t for t in ts.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == pytest.approx(dead.params)  # the same parameters, run again
