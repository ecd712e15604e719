"""The run plan (pipeline/plan/): budgets, auto values, plan.json reuse. Speeds are injected, so
these tests are fast and deterministic; one test measures for real on a tiny model."""

import json
import math
import time

import pytest
from conftest import cli_error, run_cli
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.models.backbones import finetune_stage
from pipeline.models.tta import build_tta
from pipeline.plan.facts import Facts, choose_model
from pipeline.plan.search import (
    FILL,
    MAX_EPOCHS,
    MAX_SEEDS,
    MIN_EPOCHS,
    SEED_EPOCHS,
    TARGET,
    Shape,
    auto_seeds,
    make_plan,
)
from pipeline.plan.speed import Speed
from pipeline.plan.store import parse_budget, planned
from pipeline.train.finished import run_hash

# ---- budgets ------------------------------------------------------------------------------


@given(st.floats(min_value=0.01, max_value=1e5, allow_nan=False), st.sampled_from(["", "s", "m", "h"]))
def test_budget_units(x, unit):
    text = f"{x:.3f}{unit}"
    assert parse_budget(text) == pytest.approx(float(f"{x:.3f}") * {"": 1, "s": 1, "m": 60, "h": 3600}[unit])


@pytest.mark.parametrize("text", ["", "0", "0s", "-5m", "abc", "15x", "nan", "inf", "1e3", "15 minutes", "m"])
def test_bad_budget_is_refused(text):
    with pytest.raises(PipelineError, match=r"^--budget: got .*; expected a positive duration like 900s, 15m or 1h$"):
        parse_budget(text)


def test_bad_budget_on_the_command_line(capsys, make_config, digits_dir, tmp_path):
    cfg = make_config(digits_dir, fmt="pixel_csv")
    before = sorted(p.name for p in tmp_path.iterdir())
    err = cli_error(capsys, "run", cfg, "--budget", "15x")
    assert "--budget: got '15x'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no runs/, folds/, submissions/


# ---- the time model -----------------------------------------------------------------------

speeds = st.builds(
    Speed,
    train_img_s=st.floats(5, 5000),
    val_img_s=st.floats(20, 20000),
    build_s=st.floats(0, 5),
    epoch_s=st.floats(0, 2),
)


@given(
    speeds,
    st.integers(20, 50_000),
    st.integers(2, 10),
    st.integers(1, 3),
    st.integers(1, 4),
    st.booleans(),
    st.floats(30, 20_000),
)
def test_epochs_fill_the_budget(speed, n_rows, n_folds, n_seeds, width, refit, budget):
    shape = Shape(n_rows=n_rows, n_folds=n_folds, n_seeds=n_seeds, refit=refit, width=width, cores=4)
    e = shape.epochs_for(budget, lambda th: speed)
    assert 1 <= e <= MAX_EPOCHS
    if e > 1:  # the plan fits its share of the budget...
        assert shape.seconds(e, lambda th: speed) <= TARGET * budget + 1e-6
    if e < MAX_EPOCHS:  # ...and one more epoch would not
        assert shape.seconds(e + 1, lambda th: speed) > TARGET * budget - 1e-6


@given(
    speeds,
    st.integers(200, 50_000),
    st.integers(2, 10),
    st.integers(1, 3),
    st.booleans(),
    st.sampled_from([16, 32, 64]),
    st.floats(10, 5_000),
)
# found by CI's slow profile: the cut also shortened the refit's epochs on all 4,466 rows, so the cut
# plan, though it trained the folds on more rows, was shorter than the whole epochs
@example(Speed(train_img_s=475.0, val_img_s=242.0, build_s=0.0, epoch_s=2.0), 4466, 2, 2, True, 16, 183.0)
def test_few_long_epochs_are_cut_to_fill_the_budget(speed, n_rows, n_folds, width, refit, batch, budget):
    """Whole epochs filling under FILL of the budget: one more, each cut to the most steps that fit; only
    when that trains more rows in all, and never past TARGET of the budget."""
    from dataclasses import replace

    from pipeline.plan.search import _fill_steps

    shape = Shape(n_rows=n_rows, n_folds=n_folds, n_seeds=1, refit=refit, width=width, cores=4)
    sp = lambda th: speed  # noqa: E731
    e = shape.epochs_for(budget, sp)
    why = []
    steps = _fill_steps(shape, budget, sp, e, batch, why)
    full = math.ceil(shape.train_rows() / batch)
    if shape.seconds(e, sp) >= FILL * budget or e == MAX_EPOCHS:
        assert steps is None and not why
    if steps is not None:
        cut = replace(shape, max_train_rows=steps * batch)
        assert 1 <= steps < full and (e + 1) * steps * batch > e * shape.train_rows()
        assert cut.seconds(e + 1, sp) <= TARGET * budget + 1e-6
        assert cut.seconds(e + 1, sp) > shape.seconds(e, sp)  # more of the budget is spent
        assert (
            replace(shape, max_train_rows=(steps + 1) * batch).seconds(e + 1, sp) > TARGET * budget - 1e-6
            or steps + 1 == full
        )
        assert why and why[0].startswith(f"epochs {e + 1} of {steps} of the {full} steps")


def test_waves_and_threads_are_those_of_the_executor():
    # 5 folds, 2 at a time on 2 cores: waves of (1, 1) threads, then the lone last fold on both cores
    shape = Shape(n_rows=1000, n_folds=5, n_seeds=1, refit=False, width=2, cores=2)
    assert shape.threads() == [1, 1, 1, 1, 2]
    sp = {1: Speed(train_img_s=100, val_img_s=1000), 2: Speed(train_img_s=160, val_img_s=1600)}
    per_epoch_1 = 800 / 100 + 200 / 1000
    per_epoch_2 = 800 / 160 + 200 / 1600
    assert shape.seconds(3, sp.__getitem__) == pytest.approx(8.0 + 2 * 3 * per_epoch_1 + 3 * per_epoch_2)


# ---- choosing: size, backbone, epochs -----------------------------------------------------


@pytest.fixture(autouse=True)
def _weights_installed(monkeypatch):
    """The offline ImageNet weights are installed (the rule's other branch is tested on its own)."""
    monkeypatch.setattr("pipeline.plan.facts._weights_offline", lambda backbone: True)


def _facts(native=128, n_rows=4000, channels=1):
    return Facts(
        n_rows=n_rows,
        class_names=tuple("abcdefghij"),
        channels=channels,
        native=native,
        n_features=0,
        feature_names=(),
        value_range=(0.0, 255.0),
        dtype="uint8",
    )


def _pixels_speed(calls=None, base=120.0):
    """Throughput falling with the pixel count, 1.4x on 2 threads (as measured here for lite0)."""

    def speed(cfg, size, threads):
        if calls is not None:
            calls.append((cfg.model.backbone, size, threads))
        s = base * (64 / size) ** 2 * (1.4 if threads == 2 else 1.0)
        return Speed(train_img_s=s, val_img_s=4 * s, build_s=1.0, epoch_s=0.2)

    return speed


def _folder_cfg(make_config, data_dir, **train):
    p = make_config(
        data_dir,
        fmt="image_folder",
        data={"image_size": "auto", "channels": "auto"},
        model={"backbone": "auto"},
        train={"epochs": "auto", "fold_jobs": 2, **train},
        race={"share": 0},  # the prior's rules and the size search alone (the race: tests/test_race.py)
    )
    return load_config(p)


def test_the_last_waves_job_on_every_core_is_timed_not_estimated(make_config, folder_dir):
    """5 folds 2 at a time on 2 cores: the fifth runs alone on both; its measured speed sets the plan."""
    cfg = _folder_cfg(make_config, folder_dir, time_budget_s=600)

    def speed(two):
        def at(c, size, threads):
            s = 120.0 * (64 / size) ** 2 * (two if threads == 2 else 1.0)
            return Speed(train_img_s=s, val_img_s=4 * s, build_s=1.0, epoch_s=0.2)

        return at

    slow, fast = (make_plan(cfg, _facts(), device_type="cpu", cores=2, speed=speed(two)) for two in (1.0, 1.9))
    size = str(fast["values"]["data.image_size"])
    assert fast["measured"][size]["on_every_core"]["threads"] == 2
    assert fast["measured"][size]["on_every_core"]["train_img_s"] > 1.8 * fast["measured"][size]["train_img_s"]
    assert fast["values"]["train.epochs"] > slow["values"]["train.epochs"]
    assert fast["expected_train_s"] <= TARGET * 600


@pytest.mark.parametrize("budget, size", [(600, 48), (800, 64), (3000, 128)])
def test_image_size_is_the_largest_that_gets_enough_epochs(make_config, folder_dir, budget, size):
    cfg = _folder_cfg(make_config, folder_dir, time_budget_s=budget)
    calls = []
    plan = make_plan(cfg, _facts(), device_type="cpu", cores=2, speed=_pixels_speed(calls))
    v = plan["values"]
    assert v["data.image_size"] == size
    assert v["train.epochs"] >= MIN_EPOCHS
    assert all(s <= 128 for _, s, _ in calls)  # never upscaled
    assert calls[0][1] == 128  # the files' own size is tried first
    # few sizes measured, each at the jobs' thread count; the size chosen also on every core (the last wave, the refit)
    tried = [c for c in calls if c[2] == 1]
    assert len(tried) <= 3 and len({s for _, s, _ in tried}) == len(tried)
    assert [c[1:] for c in calls if c[2] != 1] == [(size, 2)] and calls[-1][1:] == (size, 2)
    assert plan["expected_train_s"] <= TARGET * budget
    if size < 128:
        assert any(f"image size {s}: only" in w for w in plan["why"] for s in (128, 96))


def test_no_size_fits_takes_the_smallest(make_config, folder_dir):
    cfg = _folder_cfg(make_config, folder_dir, time_budget_s=20)
    plan = make_plan(cfg, _facts(), device_type="cpu", cores=2, speed=_pixels_speed())
    # a pretrained backbone never goes below 48 px (its ImageNet features need the pixels) ...
    assert plan["values"]["data.image_size"] == 48 and plan["values"]["train.epochs"] >= 1
    # ... a model from scratch may go down to 32
    scratch = load_config(cfg.path, ["model.backbone=simple_cnn", "model.pretrained=false", "train.time_budget_s=20"])
    plan = make_plan(scratch, _facts(), device_type="cpu", cores=2, speed=_pixels_speed())
    assert plan["values"]["data.image_size"] == 32


def test_without_a_budget_nothing_is_measured(make_config, folder_dir):
    cfg = _folder_cfg(make_config, folder_dir)
    calls = []
    plan = make_plan(cfg, _facts(native=100), device_type="cpu", cores=2, speed=_pixels_speed(calls))
    assert calls == []
    assert plan["values"]["data.image_size"] == 100 and plan["values"]["train.epochs"] == 20
    assert plan["expected_train_s"] is None


def _seeds_plan(make_config, folder_dir, budget, **train):
    cfg = _folder_cfg(make_config, folder_dir, seeds="auto", seed=7, time_budget_s=budget, **train)
    return cfg, make_plan(cfg, _facts(), device_type="cpu", cores=2, speed=_pixels_speed(base=600))


def test_seeds_auto_spends_a_big_budget_on_seeds(make_config, folder_dir):
    """One seed while a second would leave jobs under SEED_EPOCHS; past that as many as still get them,
    at most MAX_SEEDS; each plan fits its budget, and a bigger budget never plans fewer seeds."""
    counts = []
    for budget in (300, 1500, 3000, 6000, 40_000):
        cfg, plan = _seeds_plan(make_config, folder_dir, budget)
        v = plan["values"]
        seeds = v["train.seeds"] or [7]  # one seed is stored unset: the run and hash of a config without seeds
        n = len(seeds)
        assert seeds == auto_seeds(7, n) and plan["seeds"] == seeds and (v["train.seeds"] is None) == (n == 1)
        assert plan["expected_train_s"] <= TARGET * budget
        if n > 1:  # every job still gets its epochs ...
            assert v["train.epochs"] >= SEED_EPOCHS
        if n < MAX_SEEDS:  # ... and one more seed would leave them short
            more = load_config(cfg.path, [f"train.seeds={auto_seeds(7, n + 1)}", f"train.time_budget_s={budget}"])
            mv = make_plan(more, _facts(), device_type="cpu", cores=2, speed=_pixels_speed(base=600))["values"]
            assert (
                mv["train.epochs"] - ("train.max_steps_per_epoch" in mv) < SEED_EPOCHS
            )  # whole epochs: a cut one is not
        assert any(w.startswith(f"seeds {seeds}") for w in plan["why"])
        counts.append(n)
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == MAX_SEEDS, counts


def test_seeds_auto_with_fixed_epochs_and_without_budget(make_config, folder_dir):
    _, plan = _seeds_plan(make_config, folder_dir, 6000, epochs=10)
    n = len(plan["values"]["train.seeds"])
    assert 1 < n <= MAX_SEEDS and "train.epochs" not in plan["values"] and plan["expected_train_s"] <= TARGET * 6000
    cfg = _folder_cfg(make_config, folder_dir, seeds="auto")
    plan = make_plan(cfg, _facts(), device_type="cpu", cores=2, speed=_pixels_speed())
    assert plan["values"]["train.seeds"] is None and plan["seeds"] == [42] and plan["expected_train_s"] is None
    # seeds 1 and 2 (a zoo's two members) plan disjoint sets, not 1, 2, 3 and 2, 3, 4
    assert auto_seeds(1, 3)[0] == 1 and not set(auto_seeds(1, 3)) & set(auto_seeds(2, 3))


def test_seeds_auto_is_resolved_before_any_job(make_config, digits_dir, capsys):
    from pipeline.runs.layout import RunDir

    cfg = _digits_cfg(make_config, digits_dir, "train.seeds=auto", "train.time_budget_s=2000")
    assert (
        run_cli("status", cfg.path, "train.seeds=auto", "train.time_budget_s=2000") == 0
    )  # unplanned: nothing to list
    with pytest.raises(PipelineError, match="train.seeds is auto"):
        _ = RunDir.of(cfg).seeds
    run = RunDir.of(planned(cfg, speed=_pixels_speed(base=3000)))
    assert len(run.seeds) > 1 and run.job_dir(0, run.seeds[1]).path.name.endswith(f"seed{run.seeds[1]}")
    # without a budget: the one seed, nothing measured
    plain = planned(
        _digits_cfg(
            make_config,
            digits_dir,
            "train.seeds=auto",
            "model.backbone=simple_cnn",
            "train.epochs=3",
            "train.time_budget_s=null",
        ),
        speed=lambda *a: pytest.fail("measured"),
    )
    assert plain.train.seeds is None and RunDir.of(plain).seeds == [42]
    assert (
        plain.hash()
        == load_config(
            plain.path, ["train.seeds=null", "model.backbone=simple_cnn", "train.epochs=3", "train.time_budget_s=null"]
        ).hash()
    )  # as if seeds were left unset
    err = cli_error(capsys, "train", cfg.path, "train.seeds=some")
    assert "train.seeds: Input should be a valid list, or 'auto'" in err, err
    assert "distinct" in cli_error(capsys, "train", cfg.path, "train.seeds=[1,1]")


def test_cut_epochs_reach_the_trainer(make_config, digits_dir):
    """A budget that fits 2.x whole epochs of 2 folds: the plan trains 3 epochs of fewer steps, and the
    trainer's epoch is those steps."""
    from pipeline.train.trainer import steps_per_epoch

    cfg = load_config(
        make_config(
            digits_dir,
            fmt="pixel_csv",
            folds={"n_splits": 2},
            model={"backbone": "auto", "pretrained": False},
            train={"epochs": "auto", "time_budget_s": 60, "batch_size": 64},
            race={"share": 0},
        )
    )

    def speed(c, size, threads):  # ~2.5 whole epochs of 2,400 rows (x 2 folds) fit TARGET of 60 s
        return Speed(train_img_s=240, val_img_s=24_000, build_s=1.0, epoch_s=0.1)

    p = planned(cfg, speed=speed)
    whole = 2400 // 64 + 1
    assert p.train.epochs == 3 and 0 < p.train.max_steps_per_epoch < whole
    assert steps_per_epoch(2400, p.train) == p.train.max_steps_per_epoch
    assert p.plan["expected_train_s"] <= TARGET * 60 + 0.05 and p.plan["expected_train_s"] > 0.85 * 60  # kept to 0.1 s
    assert any(w.startswith("epochs 3 of ") for w in p.plan["why"])
    again = planned(load_config(cfg.path), speed=lambda *a: pytest.fail("planned twice"))
    assert again.train.max_steps_per_epoch == p.train.max_steps_per_epoch and again.hash() == p.hash()


def test_backbone_rule(make_config, folder_dir):
    cfg = _folder_cfg(make_config, folder_dir)
    small, why = choose_model(cfg, _facts(native=28), n_train=5000)
    assert small == {"backbone": "bn_cnn", "pretrained": False} and "28 px" in why[0]
    big, _ = choose_model(cfg, _facts(native=128), n_train=5000)
    assert big == {"backbone": "tf_efficientnet_lite0", "pretrained": True, "finetune": "full"}
    few, why = choose_model(cfg, _facts(native=75), n_train=300)
    assert few["finetune"] == "gradual" and "head first" in why[0]
    # what the config sets is the config's
    mine, why = choose_model(load_config(cfg.path, ["model.finetune=partial"]), _facts(native=75), n_train=300)
    assert "finetune" not in mine and mine["backbone"] == "tf_efficientnet_lite0" and "as the config sets it" in why[-1]


def test_backbone_rule_without_weights(make_config, folder_dir, monkeypatch):
    monkeypatch.setattr("pipeline.plan.facts._weights_offline", lambda backbone: False)
    chosen, why = choose_model(_folder_cfg(make_config, folder_dir), _facts(native=128), n_train=5000)
    assert chosen == {"backbone": "bn_cnn", "pretrained": False} and "no offline weights" in why[0]


def test_explicit_epochs_over_budget_warn(make_config, folder_dir):
    cfg = _folder_cfg(make_config, folder_dir, time_budget_s=60).model_copy()
    cfg = load_config(cfg.path, ["train.epochs=40", "data.image_size=128"])
    plan = make_plan(cfg, _facts(), device_type="cpu", cores=2, speed=_pixels_speed())
    assert "train.epochs" not in plan["values"]
    assert "set train.epochs=auto" in plan["warning"]


def test_gradual_finetune_stages():
    from pipeline.config.sections import ModelConfig

    m = ModelConfig(finetune="gradual")
    assert [finetune_stage(m, e, 9) for e in range(1, 10)] == ["head"] + ["partial"] * 2 + ["full"] * 6
    m = ModelConfig(finetune="gradual", unfreeze_after=5)
    assert [finetune_stage(m, e, 9) for e in (1, 2, 5, 6)] == ["head", "partial", "partial", "full"]
    m = ModelConfig(finetune="head", unfreeze_after=2)
    assert [finetune_stage(m, e, 9) for e in (1, 2, 3)] == ["head", "head", "full"]


# ---- plan.json: made once, reused -----------------------------------------------------------


def _digits_cfg(make_config, digits_dir, *overrides):
    p = make_config(
        digits_dir,
        fmt="pixel_csv",
        folds={"n_splits": 2},
        model={"backbone": "auto", "pretrained": False},
        train={"epochs": "auto", "time_budget_s": 60, "batch_size": 64, "max_steps_per_epoch": 2},
        race={"share": 0},
    )
    return load_config(p, list(overrides))


def test_plan_is_made_once_and_reused(make_config, digits_dir):
    calls = []
    cfg = planned(_digits_cfg(make_config, digits_dir), speed=_pixels_speed(calls, base=30))
    n = len(calls)
    assert n > 0 and cfg.plan is not None
    saved = json.loads(cfg.run_dir.joinpath("plan.json").read_text())
    assert saved["values"] == cfg.plan["values"] and saved["values"]["model.backbone"] == "bn_cnn"
    # a rerun, a resumed fold, another machine with another fold_jobs (a runtime key): the same plan, the same run
    again = planned(
        _digits_cfg(make_config, digits_dir, "train.fold_jobs=1", "train.device=cpu"),
        speed=_pixels_speed(calls, base=3000),
    )
    assert len(calls) == n and again.train.epochs == cfg.train.epochs
    assert again.hash() == cfg.hash()
    assert planned(again) is again  # idempotent
    # a changed budget is another plan
    other = planned(
        _digits_cfg(make_config, digits_dir, "train.time_budget_s=600"), speed=_pixels_speed(calls, base=30)
    )
    assert len(calls) > n and other.train.epochs > cfg.train.epochs and other.hash() != cfg.hash()


def test_status_does_not_plan(make_config, digits_dir, capsys):
    cfg = _digits_cfg(make_config, digits_dir)
    assert run_cli("status", cfg.path) == 0
    assert not cfg.run_dir.joinpath("plan.json").exists()


def test_planned_run_trains_the_planned_epochs(make_config, digits_dir, monkeypatch):
    from pipeline.data.folds import run_fold
    from pipeline.runs.layout import RunDir
    from pipeline.train import cv
    from pipeline.train.cv import train_cv

    cfg = planned(
        _digits_cfg(make_config, digits_dir, "train.patience=0"), speed=_pixels_speed(base=30)
    )  # no early stop
    import torch

    # 2 folds one after the other on every core, 128 rows trained (2 steps of 64) and 2,400 validated per epoch
    speed = _pixels_speed(base=30)(cfg, 28, torch.get_num_threads())
    per_epoch = 2 * (128 / speed.train_img_s + 2400 / speed.val_img_s + speed.epoch_s)
    assert cfg.train.epochs == int((TARGET * 60 - 2 * speed.build_s) // per_epoch) > 1
    run_fold(cfg)
    # the planned epochs reach the trainer; the budget's own deadline (tested elsewhere) would cut
    # this short on a loaded machine, where the injected speed is not the real one
    monkeypatch.setattr(cv, "job_deadline", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.train.executors.job_deadline", lambda *a, **k: None)
    oof = train_cv(cfg)
    assert len(oof) == 4800
    run = RunDir.of(cfg)
    for k in (0, 1):
        assert run.job_dir(k, 42).read_done()["epochs_run"] == cfg.train.epochs
    # the CLI, reading plan.json, finds the run finished
    assert run_cli("train", cfg.path, "train.patience=0") == 0
    assert run.job_dir(0, 42).read_done()["hash"] == run_hash(cfg)


def test_real_measurement_is_cached(make_config, digits_dir, monkeypatch):
    from pipeline.plan.facts import data_facts
    from pipeline.plan.timing import measure_speed

    cfg = load_config(
        make_config(
            digits_dir,
            fmt="pixel_csv",
            model={"backbone": "simple_cnn", "pretrained": False},
            train={"epochs": 1, "batch_size": 16},
        )
    )
    facts = data_facts(cfg)
    assert facts.native == 28 and facts.channels == 1 and facts.n_rows == 4800
    s = measure_speed(cfg, facts, 28, 1, seconds=0.2)
    assert s.train_img_s > 0 and s.val_img_s > 0 and math.isfinite(s.build_s)
    from pipeline.core.io import cache_dir

    cached = json.loads((cache_dir() / "throughput.json").read_text())
    assert len(cached) == 1
    assert measure_speed(cfg, facts, 28, 1, seconds=0.2) == s  # from the cache, not measured again
    import pipeline.plan.timing as plan_mod

    calls = []
    real = plan_mod._time_steps
    monkeypatch.setattr(plan_mod, "_time_steps", lambda *a: calls.append(a) or real(*a))
    assert measure_speed(cfg, facts, 28, 1, seconds=0.2) == s and not calls
    now = time.time()
    monkeypatch.setattr(plan_mod.time, "time", lambda: now + plan_mod.MEASURE_TTL_S + 1)  # the machine's speed drifts
    measure_speed(cfg, facts, 28, 1, seconds=0.2)
    assert len(calls) == 1


def _siblings_alive() -> bool:
    import threading

    return any(t.name == "plan-sibling" for t in threading.enumerate())


def test_side_by_side_jobs_are_timed_beside_each_other(make_config, digits_dir, monkeypatch):
    """With fold_jobs 2 on 2 cores the 1-thread speed is measured while a sibling thread trains the same
    model (without augmentation: the timed thread's augmentation would wait on its interpreter lock);
    its own cache entry; fold_jobs 1 measures alone."""
    import threading

    import pipeline.train.trainer as trainer
    from pipeline.core.io import cache_dir
    from pipeline.plan.facts import data_facts
    from pipeline.plan.timing import measure_speed

    cfg = load_config(
        make_config(
            digits_dir,
            fmt="pixel_csv",
            model={"backbone": "simple_cnn", "pretrained": False},
            train={"epochs": 1, "batch_size": 16},
            augment=[{"name": "HorizontalFlip", "p": 0.5}],
        )
    )
    facts = data_facts(cfg)
    real, seen = trainer.train_one_epoch, set()
    real_build, augmented = trainer.build_components, {}

    def spy(*a, **k):
        seen.add(threading.get_ident())
        return real(*a, **k)

    def build_spy(**k):
        augmented.setdefault(threading.get_ident(), set()).add(k["with_augment"])
        return real_build(**k)

    monkeypatch.setattr(trainer, "train_one_epoch", spy)
    monkeypatch.setattr(trainer, "build_components", build_spy)
    alone = measure_speed(cfg, facts, 28, 1, seconds=0.2)
    assert len(seen) == 1
    beside = measure_speed(cfg, facts, 28, 1, seconds=0.2, siblings=1)
    assert len(seen) == 2 and beside.train_img_s > 0 and not _siblings_alive()  # the sibling stopped
    assert sorted(map(sorted, augmented.values())) == [[False], [True]]  # the timed thread augments, its sibling not
    assert len(json.loads((cache_dir() / "throughput.json").read_text())) == 2
    assert measure_speed(cfg, facts, 28, 1, seconds=0.2, siblings=1) == beside and alone != beside

    asked = []
    monkeypatch.setattr(
        "pipeline.plan.timing.measure_speed",
        lambda c, f, size, th, siblings=0, quick=False: asked.append((th, siblings)) or alone,
    )
    from pipeline.plan.choose import Timer
    from pipeline.plan.speed import PlanClock

    for jobs, want in ((2, (1, 1)), (1, (2, 0))):
        c = load_config(
            make_config(
                digits_dir,
                fmt="pixel_csv",
                model={"backbone": "simple_cnn", "pretrained": False},
                train={"epochs": "auto", "fold_jobs": jobs, "time_budget_s": 60},
            )
        )
        asked.clear()
        timer = Timer(c, facts, PlanClock(60, time.time()), cores=2, device_type="cpu")
        make_plan(c, facts, device_type="cpu", cores=2, speed=timer.speed_fn())
        assert asked[0] == want


def test_a_sibling_that_fails_to_start_fails_the_measurement():
    from pipeline.plan.siblings import _Siblings

    def broken():
        raise ValueError("no model")

    with pytest.raises(ValueError, match="no model"):
        with _Siblings(n=2, make_steps=broken):
            pytest.fail("entered")
    assert not _siblings_alive()


def test_folder_native_size_reads_headers_only(make_config, folder_dir):
    from pipeline.data.formats import build_reader

    cfg = load_config(make_config(folder_dir, fmt="image_folder", data={"image_size": 32}))
    side = build_reader(cfg).native_size()
    assert 28 <= side <= 48  # the demo folder's digits are 28..48 px


def test_auto_config_values_are_checked(make_config, digits_dir):
    p = make_config(digits_dir, fmt="pixel_csv", train={"epochs": "fast"})
    with pytest.raises(PipelineError, match=r"train.epochs: .*or 'auto'"):
        load_config(p)
    p = make_config(digits_dir, fmt="statoil_json", data={"image_size": 64})
    with pytest.raises(PipelineError, match=r"data.image_size: 64; statoil_json images are 75x75"):
        load_config(p)
    load_config(make_config(digits_dir, fmt="statoil_json", data={"image_size": "auto", "channels": "auto"}))


def test_gradual_finetune_trains_head_then_stages_then_all(make_config, iceberg_dir, monkeypatch):
    import pipeline.train.passes as trainer_mod
    from pipeline.data.folds import run_fold
    from pipeline.train.cv import train_cv

    cfg = planned(
        load_config(
            make_config(
                iceberg_dir,
                folds={"n_splits": 2},
                model={
                    "backbone": "tf_efficientnet_lite0",
                    "pretrained": False,
                    "finetune": "gradual",
                    "unfreeze_stages": 1,
                    "unfreeze_after": 2,
                },
                train={"epochs": 3, "batch_size": 8, "max_steps_per_epoch": 1, "patience": 0},
            )
        )
    )
    run_fold(cfg)
    seen, real = [], trainer_mod.train_one_epoch

    def spy(parts, **kw):  # what of the backbone trains in each epoch
        params = list(parts.model.backbone.parameters())
        seen.append((sum(p.requires_grad for p in params), len(params)))
        return real(parts, **kw)

    monkeypatch.setattr(trainer_mod, "train_one_epoch", spy)
    train_cv(cfg, folds=[0])
    (head, n), (partial, _), (full, _) = seen
    assert head == 0 and 0 < partial < full == n  # the head alone, then the last stage, then all


@pytest.mark.parametrize(
    "budget, tta",
    [
        (2000, ["dihedral"]),
        (600, ["identity", "hflip", "vflip", "rot180"]),
        (200, ["identity", "rot180"]),
        (60, ["identity"]),
    ],
)
def test_tta_is_fitted_to_the_budget(make_config, folder_dir, budget, tta):
    flips = [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "RandomRotate90", "p": 0.5},
    ]
    p = make_config(
        folder_dir,
        fmt="image_folder",
        data={"image_size": 32},
        augment=flips,
        model={"backbone": "simple_cnn", "pretrained": False},
        train={"time_budget_s": budget},
    )
    cfg = load_config(p)
    fast = lambda c, size, th: Speed(train_img_s=1e6, val_img_s=400, build_s=0.0, epoch_s=0.0)  # noqa: E731
    facts = Facts(**{**_facts(native=32).__dict__, "n_test": 1000})
    plan = make_plan(cfg, facts, device_type="cpu", cores=1, speed=fast)
    # 5 fold models on 1,000 test images plus the 4,000 OOF rows: 8 / 4 / 2 / 1 transforms at 400 img/s
    assert plan["values"]["predict.tta"] == tta
    # a TTA the config names is the config's, whatever the plan says
    explicit = planned(load_config(p, ["predict.tta=[identity, hflip]"]), speed=fast)
    assert explicit.predict.tta == ["identity", "hflip"]


AFFINE = {"name": "Affine", "rotate": [-10, 10], "scale": [0.9, 1.1], "p": 0.5}  # -> rotate5, zoom5: 4 views


@pytest.mark.parametrize(
    "flips, budget, tta",
    [
        (True, 2000, ["dihedral", "rotate5", "zoom5"]),  # 12 transforms
        (True, 1000, ["dihedral"]),  # 11 fit: the exact symmetries before the affine views
        (True, 600, ["identity", "hflip", "vflip", "rot180"]),  # 6 fit: the group of 4 (with the views it would be 8)
        (True, 300, ["identity", "rot180"]),
        (False, 600, ["identity", "rotate5", "zoom5"]),  # no flips: identity and the 4 views
        (False, 250, ["identity"]),
    ],
)
def test_affine_views_are_cut_before_the_symmetries(make_config, folder_dir, flips, budget, tta):
    augment = (
        [{"name": n, "p": 0.5} for n in ("HorizontalFlip", "VerticalFlip", "RandomRotate90")] if flips else []
    ) + [AFFINE]
    p = make_config(
        folder_dir,
        fmt="image_folder",
        data={"image_size": 32},
        augment=augment,
        model={"backbone": "simple_cnn", "pretrained": False},
        train={"time_budget_s": budget},
    )
    fast = lambda c, size, th: Speed(train_img_s=1e6, val_img_s=400, build_s=0.0, epoch_s=0.0)  # noqa: E731
    facts = Facts(**{**_facts(native=32).__dict__, "n_test": 1000})
    # 22.5 s per transform (5 models x 1,000 test + 4,000 OOF rows at 400 img/s) against a quarter of the budget
    plan = make_plan(load_config(p), facts, device_type="cpu", cores=1, speed=fast)
    assert plan["values"]["predict.tta"] == tta


@pytest.mark.parametrize(
    "planning_s, tta",
    [(0.0, ["identity", "hflip", "vflip", "rot180"]), (150.0, ["identity", "rot180"]), (200.0, ["identity"])],
)
def test_tta_leaves_the_whole_run_within_its_cap(make_config, folder_dir, planning_s, tta):
    """Training fills the budget, so the TTA gets what starting, planning and evaluating leave of 1.4x it."""
    flips = [{"name": n, "p": 0.5} for n in ("HorizontalFlip", "VerticalFlip", "RandomRotate90")]
    p = make_config(
        folder_dir,
        fmt="image_folder",
        data={"image_size": 32},
        augment=flips,
        model={"backbone": "simple_cnn", "pretrained": False},
        train={"time_budget_s": 600},
    )
    speed = lambda c, size, th: Speed(train_img_s=200, val_img_s=400, build_s=0.0, epoch_s=0.0)  # noqa: E731
    facts = Facts(**{**_facts(native=32).__dict__, "n_test": 1000})
    plan = make_plan(load_config(p), facts, device_type="cpu", cores=1, speed=speed, planning_s=planning_s)
    # 22.5 s per transform; evaluate 6 + 5,000 / 400 s and 5 s of start: 0.95 x 1.4 x 600 - train - 23.5 - planning_s
    left = 0.95 * 1.4 * 600 - plan["expected_train_s"] - 23.5 - planning_s
    assert FILL * 600 <= plan["expected_train_s"] <= TARGET * 600 + 0.05 and 22.5 * len(
        build_tta(tta, (32, 32))
    ) <= max(left, 22.5)
    assert plan["values"]["predict.tta"] == tta
    why = " ".join(plan["why"])
    assert ("of 1.33x the budget" in why) == (planning_s > 0)  # the quarter of the budget (150 s) is the limit without
    assert ("the whole run is expected to take" in why) == (tta == ["identity"])


def test_commands_after_a_budgeted_train(make_config, digits_dir, capsys, tmp_path):
    """Only the commands that train make a plan; the others use it, or say in one line that there is none."""
    import shutil

    import pandas as pd

    from pipeline.evaluate.evaluator import evaluate

    p = make_config(
        digits_dir,
        fmt="pixel_csv",
        folds={"n_splits": 2},
        model={"backbone": "auto", "pretrained": False},
        train={"batch_size": 64, "max_steps_per_epoch": 2, "patience": 0},
        race={"share": 0},
    )
    assert run_cli("fold", p, "--budget", "6s") == 0 and run_cli("train", p, "--budget", "6s") == 0
    plan_file = tmp_path / "runs" / "comp" / "exp" / "plan.json"
    made = plan_file.read_bytes()
    err = cli_error(capsys, "evaluate", p)  # no budget: another config, which was never planned
    assert "plan.json: no plan for this config" in err and f"run `pipeline train {p}`" in err
    assert run_cli("evaluate", p, "--budget", "6s") == 0 and run_cli("predict", p, "--budget", "6s") == 0
    assert plan_file.read_bytes() == made
    # the library takes the config as written and finds the same plan
    assert evaluate(load_config(p, ["train.time_budget_s=6"]), report=False)["experiment"] == "exp"
    # a damaged plan.json is planned again, not an internal error
    plan_file.write_text(f'{{"config_hash": "{json.loads(made)["config_hash"]}", "values": 3}}')
    assert run_cli("train", p, "--budget", "6s") == 0 and json.loads(plan_file.read_text())["values"]
    # the same run name on other data (data.dir is a runtime key) is refused, not trained with the old plan
    other = tmp_path / "other"
    shutil.copytree(digits_dir, other)
    pd.read_csv(other / "train.csv").iloc[:3000].to_csv(other / "train.csv", index=False)
    assert run_cli("fold", p, f"data.dir={other}", "--budget", "6s") == 0
    err = cli_error(capsys, "train", p, f"data.dir={other}", "--budget", "6s")
    assert "plan.json: planned for other data (n_rows 4800 -> 3000)" in err


def test_gradual_epochs_are_timed_by_stage():
    from pipeline.config.sections import ModelConfig
    from pipeline.plan.speed import STAGE_SPEEDUP

    sp = Speed(train_img_s=100, val_img_s=1000)
    full = Shape(n_rows=500, n_folds=5, n_seeds=1, refit=False, width=1, cores=2)
    gradual = Shape(
        n_rows=500, n_folds=5, n_seeds=1, refit=False, width=1, cores=2, model=ModelConfig(finetune="gradual")
    )
    # 6 epochs: the head alone, then the last stages for epoch 2, then all for 3..6 (a third of 6 is 2)
    per = [400 / (100 * STAGE_SPEEDUP[s]) + 100 / 1000 for s in ["head", "partial", "full", "full", "full", "full"]]
    assert gradual.seconds(6, lambda th: sp) == pytest.approx(5 * sum(per))
    assert gradual.seconds(6, lambda th: sp) < full.seconds(6, lambda th: sp)
    assert gradual.epochs_for(300, lambda th: sp) >= full.epochs_for(300, lambda th: sp)


def test_auto_size_on_a_folder_of_mixed_sizes(make_config, folder_dir):
    from pipeline.plan.facts import data_facts

    cfg = load_config(make_config(folder_dir, fmt="image_folder", data={"image_size": "auto", "channels": "auto"}))
    facts = data_facts(cfg)  # the demo folder's files are 28..48 px, some RGB
    assert facts.n_rows == 200 and facts.channels == 3 and 28 <= facts.native <= 48
    resolved = planned(cfg)
    assert resolved.data.image_size == facts.native and resolved.data.channels == 3


def test_one_epoch_too_long_for_the_budget_is_cut_to_the_steps_that_fit(make_config, digits_dir):
    """A budget smaller than one whole epoch per fold: one epoch of the steps that fit, never a whole one over it."""
    cfg = _digits_cfg(make_config, digits_dir, "train.max_steps_per_epoch=null", "train.time_budget_s=4")
    slow = lambda c, size, threads: Speed(train_img_s=200.0, val_img_s=4000.0, build_s=0.1, epoch_s=0.05)  # noqa: E731
    p = planned(cfg, speed=slow)
    assert p.train.epochs == 1 and p.train.max_steps_per_epoch is not None
    assert p.train.max_steps_per_epoch < math.ceil(2400 / 64)
    assert any(w.startswith("epochs 1 of ") for w in p.plan["why"]) and p.plan["expected_train_s"] <= 4
