"""The recipe race and the bounded planning around it: the prior's portfolio, successive halving's rounds and
schedules, the cost model, and a real race on scikit-learn's 8x8 digits through ``pipeline run``."""

import json
import math
import time

import numpy as np
import pytest
from conftest import run_cli
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.load import load_config
from pipeline.plan.facts import Facts
from pipeline.plan.race import holdout, rounds, schedule
from pipeline.plan.recipes import AUG_FAMILIES, AUG_ORDER, image_kind, portfolio
from pipeline.plan.speed import CostModel, PlanClock, Speed


def _facts(native=128, channels=3, n_rows=3000, dtype="uint8"):
    return Facts(
        n_rows=n_rows,
        class_names=tuple("abcde"),
        channels=channels,
        native=native,
        n_features=0,
        feature_names=(),
        value_range=(0.0, 255.0),
        dtype=dtype,
    )


@pytest.fixture
def auto_cfg(make_config, folder_dir):
    def make(**sections):
        base = {
            "data": {"image_size": "auto", "channels": "auto"},
            "model": {"backbone": "auto", "input_norm": "auto"},
            "augment": "auto",
            "train": {"time_budget_s": 600},
        }
        for k, v in sections.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        return load_config(make_config(folder_dir, fmt="image_folder", **base))

    return make


@pytest.fixture(autouse=True)
def _weights(monkeypatch):
    monkeypatch.setattr("pipeline.plan.recipes._weights_offline", lambda backbone: True)


def test_the_prior_orders_flips_by_the_kind_of_images():
    assert image_kind(_facts(channels=3)) == "photo" and AUG_ORDER["photo"][0] == "hflip+affine"
    assert image_kind(_facts(channels=2, dtype="float32")) == "sar" and AUG_ORDER["sar"][0] == "d4+affine"
    assert image_kind(_facts(channels=1)) == "grey" and AUG_ORDER["grey"][0] == "affine"
    assert all(f in AUG_FAMILIES for order in AUG_ORDER.values() for f in order)
    assert AUG_FAMILIES["none"] == [] and {e["name"] for e in AUG_FAMILIES["d4"]} == {
        "HorizontalFlip",
        "VerticalFlip",
        "RandomRotate90",
    }


def test_portfolio_changes_one_axis_at_a_time_from_the_priors_first_choice(auto_cfg):
    cfg = auto_cfg()
    recipes = portfolio(cfg, _facts(native=128, channels=1), n=6, largest_size=lambda b, p, f: 128)
    names = [r.name for r in recipes]
    assert len(names) == len(set(names)) == 6 and [r.rank for r in recipes] == sorted(r.rank for r in recipes)
    base = recipes[0]
    assert (base.backbone, base.pretrained, base.size, base.augment, base.input_norm) == (
        "tf_efficientnet_lite0",
        True,
        128,
        "affine",
        "dataset",
    )
    for r in recipes[1:]:  # each candidate differs from the base on one axis
        diff = [a for a in ("augment", "input_norm", "size") if getattr(r, a) != getattr(base, a)]
        assert len(diff) <= 1 or r.backbone != base.backbone or r.finetune != base.finetune, r.name
    assert not [r for r in recipes if r.finetune == "head"]  # a frozen head only when the config asks for one
    asked = portfolio(
        auto_cfg(model={"finetune": "head"}), _facts(native=128, channels=1), n=3, largest_size=lambda b, p, f: 128
    )
    assert all(r.finetune == "head" and r.augment == "none" for r in asked if r.pretrained)
    assert any(r.input_norm == "image" for r in recipes)  # grey images race the per-image norm


def test_only_the_axes_the_config_leaves_auto_vary(auto_cfg):
    cfg = auto_cfg(model={"backbone": "bn_cnn", "pretrained": False, "input_norm": "dataset"}, data={"image_size": 32})
    recipes = portfolio(cfg, _facts(native=128, channels=3), n=6, largest_size=lambda b, p, f: 128)
    assert {(r.backbone, r.size, r.input_norm) for r in recipes} == {("bn_cnn", 32, "dataset")}
    assert [r.augment for r in recipes] == AUG_ORDER["photo"]
    values = recipes[1].config_values(cfg)
    assert set(values) == {"augment"} and values["augment"] == AUG_FAMILIES[AUG_ORDER["photo"][1]]


def test_sizes_follow_what_the_budget_affords_and_never_upscale(auto_cfg):
    cfg = auto_cfg(model={"input_norm": "dataset"}, augment=[])
    big = portfolio(cfg, _facts(native=400), n=4, largest_size=lambda b, p, f: 160 if p else 48)
    assert big[0].size == 160 and all(r.size <= 160 for r in big)
    assert {r.size for r in big if r.backbone == "bn_cnn"} <= {48}
    small = portfolio(cfg, _facts(native=28, channels=1), n=4, largest_size=lambda b, p, f: 512)
    assert {r.backbone for r in small} == {"bn_cnn"} and {r.size for r in small} == {28}


@given(st.integers(1, 12), st.integers(2, 4))
def test_halving_rounds_end_with_one_decision(n, eta):
    rs = rounds(n, eta)
    assert rs[0] == n and rs[-1] <= max(2, eta) and all(a > b for a, b in zip(rs, rs[1:]))  # the last round picks one


@given(st.integers(1, 100_000), st.integers(10, 5000))
def test_a_schedule_trains_about_its_images_in_whole_epochs_or_one_cut_epoch(images, n_train):
    epochs, steps = schedule(images, n_train=n_train, batch_size=32)
    assert epochs >= 1
    if steps is None:
        assert images >= n_train and epochs * n_train <= max(images, n_train)
    else:
        assert epochs == 1 and steps >= 2 and (steps * 32 <= images or steps == 2)


@given(st.floats(5.0, 2000.0), st.integers(3, 6))
def test_round_one_images_fill_the_race_share(seconds, n):
    from pipeline.plan.race import job_seconds, unit_images
    from pipeline.plan.recipes import Recipe

    cfg = load_config_cached()
    facts = _facts(n_rows=3000)
    recipes = [
        Recipe(
            backbone=f"n{i}",
            pretrained=True,
            finetune="head" if i == 1 else "full",
            size=64,
            augment="none",
            input_norm="dataset",
            rank=i,
        )
        for i in range(n)
    ]
    speeds = {
        r.name: Speed(train_img_s=100.0 * (i + 1), val_img_s=400.0, build_s=0.5, epoch_s=0.2)
        for i, r in enumerate(recipes)
    }
    images = unit_images(cfg, facts, recipes, speeds, seconds)
    n_val = math.ceil(3000 * cfg.race.holdout)

    def total(im):
        return sum(
            k
            * np.mean(
                [
                    job_seconds(
                        speeds[r.name],
                        im * cfg.race.eta**j,
                        n_train=3000 - n_val,
                        n_val=n_val,
                        batch_size=cfg.train.batch_size,
                        head_only=r.finetune == "head",
                        n_rows=3000,
                        features=j == 0,
                    )
                    for r in recipes
                ]
            )
            for j, k in enumerate(rounds(n, cfg.race.eta))
        )

    assert images == 0 or total(images) <= seconds + 1e-6
    assert total(images + 1) > seconds or images >= 10**8


_CFG = {}


def load_config_cached():
    if "cfg" not in _CFG:
        import tempfile
        from pathlib import Path

        import yaml

        d = Path(tempfile.mkdtemp())
        (d / "c.yaml").write_text(yaml.safe_dump({"competition": "c", "data": {"format": "pixel_csv", "dir": str(d)}}))
        _CFG["cfg"] = load_config(d / "c.yaml")
    return _CFG["cfg"]


def test_holdout_is_stratified_and_seeded():
    y = np.repeat(np.arange(5), 40)
    a, b, c = holdout(y, 0.2, 7), holdout(y, 0.2, 7), holdout(y, 0.2, 8)
    assert (a == b).all() and not (a == c).all()
    assert [(y[a == 0] == k).sum() for k in range(5)] == [8] * 5
    lone = holdout(np.array([0, 0, 0, 1]), 0.5, 0)  # a class of one row cannot be stratified: a plain split
    assert (lone == 0).sum() == 2


def test_cost_model_fits_its_exponent_and_scales_threads():
    m = CostModel(threads=1)
    m.add(("net", True), 32, Speed(train_img_s=800, val_img_s=3200))
    assert m.speed(("net", True), 64).train_img_s == pytest.approx(800 / 2**1.75)  # the prior's exponent
    m.add(("net", True), 64, Speed(train_img_s=800 / 4, val_img_s=800))  # 4x the pixels, 4x slower: exponent 2
    assert m.exponents[("net", True)] == pytest.approx(2.0)
    m.add(("other", False), 32, Speed(train_img_s=800, val_img_s=3200))  # another network keeps the prior's
    assert m.speed(("other", False), 64).train_img_s == pytest.approx(800 / 2**1.75)
    assert m.speed(("net", True), 128).train_img_s == pytest.approx(200 / 4)
    assert m.speed(("net", True), 64, threads=4).train_img_s == pytest.approx(200 * 2)


def test_planning_clock_is_a_share_of_the_budget_with_a_floor():
    t0 = time.time()
    assert PlanClock(90, t0).limit == 10 and PlanClock(800, t0).limit == 40 and PlanClock(None, t0).limit == math.inf
    assert 9 < PlanClock(90, t0).left() <= 10


@pytest.mark.timeout(600)
def test_a_real_race_chooses_and_trains_its_winner_and_reruns_reuse_it(make_config, sk_digits_dir, capsys):
    """scikit-learn's 8x8 digits, the augmentation and the input norm raced: the table is in plan.json, the log
    and report.html; the race's jobs stay in their scratch folder; a rerun neither plans nor races again."""
    p = make_config(
        sk_digits_dir,
        fmt="pixel_csv",
        metric="accuracy",
        folds={"n_splits": 3, "seed": 0},
        model={"backbone": "bn_cnn", "pretrained": False, "input_norm": "auto"},
        augment="auto",
        train={
            "epochs": "auto",
            "time_budget_s": 60,
            "batch_size": 64,
            "lr": 3e-3,
            "optimizer": "adam",
            "fold_jobs": 1,
            "device": "cpu",
        },
        race={"share": 0.5, "candidates": 3},
        evaluate={"adversarial": False, "gradcam_samples": 0},
    )
    from pipeline.plan.store import planned
    from pipeline.stages import run_all

    fast = lambda c, size, threads: Speed(train_img_s=2000.0, val_img_s=8000.0, build_s=0.3, epoch_s=0.2)  # noqa: E731
    times = run_all(planned(load_config(p), speed=fast))  # the speed injected: the schedules do not hang on the load
    out = capsys.readouterr().out
    assert list(times)[:3] == ["plan", "race", "fold"] and times["race"] > 0
    run = p.parent / "runs" / "comp" / "exp"
    plan = json.loads((run / "plan.json").read_text())
    table = plan["race"]["table"]
    # round two runs unless round one already spent the race's time (the injected speed is not the machine's)
    assert {r["round"] for r in table} <= {1, 2} and len([r for r in table if r["round"] == 1]) == 3
    assert sum(r["verdict"].startswith("won") for r in table) == 1 and plan["race"]["winner"] in out
    assert all(isinstance(r["score"], float) and r["epochs"] >= 1 for r in table)
    assert "race round 1:" in out and "stage times: plan" in out
    assert plan["train_budget_s"] < plan["budget_s"] == 60
    cfg = load_config(p)
    assert (run / "race").is_dir() and len(list((run / "race").iterdir())) == len(table)
    assert {d.name for d in run.iterdir() if d.name.startswith("fold_")} == {"fold_0", "fold_1", "fold_2"}
    assert "Recipe race" in (run / "report" / "report.html").read_text()
    capsys.readouterr()
    assert run_cli("run", p) == 0  # everything fresh: the plan is read, not made, and no race runs
    again = capsys.readouterr().out
    assert "race round" not in again and "timing" not in again
    assert json.loads((run / "plan.json").read_text()) == plan and cfg.augment == "auto"


def test_without_a_race_the_priors_first_choice_trains(make_config, sk_digits_dir):
    """augment and input norm auto, no budget: nothing to race; the prior's first family and dataset norm."""
    from pipeline.plan.store import planned

    p = make_config(
        sk_digits_dir,
        fmt="pixel_csv",
        model={"backbone": "bn_cnn", "pretrained": False, "input_norm": "auto"},
        augment="auto",
    )
    cfg = planned(load_config(p), speed=lambda c, size, th: Speed(train_img_s=1000.0, val_img_s=4000.0))
    assert cfg.augment == AUG_FAMILIES[AUG_ORDER["grey"][0]] and cfg.model.input_norm == "dataset"
    assert "race" not in cfg.plan and cfg.plan["values"]["augment"] == cfg.augment


def test_planning_times_networks_only_while_its_share_of_the_budget_allows(auto_cfg, monkeypatch):
    """The first network is always timed; the others only while the clock has room for a timing."""
    from pipeline.plan import choose

    timed = []
    monkeypatch.setattr(
        "pipeline.plan.timing.measure_speed",
        lambda c, f, size, th, siblings=0, quick=False: (
            timed.append((c.model.backbone, size)) or Speed(train_img_s=100.0, val_img_s=400.0)
        ),
    )
    cfg, facts = auto_cfg(), _facts(native=128, channels=3)
    clock = PlanClock(600, time.time() - 29)  # 29 of the 30 s planning share spent already
    timer = choose.Timer(cfg, facts, clock, cores=2, device_type="cpu")
    why = []
    recipes = choose.race_portfolio(cfg, facts, timer, why)
    assert timed == [("tf_efficientnet_lite0", 64)]  # the prior's first network, at <= 64 px; no room for more
    assert {r.backbone for r in recipes} == {"tf_efficientnet_lite0"} and why
    assert all(size <= 64 for _, size in timed)


def test_the_prior_keeps_a_final_the_measurement_cannot_separate():
    """A challenger must beat the prior's favourite by more than one standard error of the paired difference."""
    from pipeline.plan.race import Entry, _prior_unless_beaten
    from pipeline.plan.recipes import Recipe

    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 400)
    fav = Recipe(backbone="a", pretrained=True, finetune="full", size=64, augment="none", input_norm="dataset", rank=0)
    other = Recipe(
        backbone="b", pretrained=True, finetune="full", size=64, augment="none", input_norm="dataset", rank=1
    )

    def entries(shift: float, noise: float):
        e = [Entry(name=r.name, rank=r.rank, round=2, epochs=1, steps=None, planned_s=1.0) for r in (fav, other)]
        e[0].losses, e[1].losses = base, base + shift + rng.normal(0, noise, len(base))
        e[0].score, e[1].score = float(e[0].losses.mean()), float(e[1].losses.mean())
        return e

    close = entries(-0.002, 0.2)  # the challenger scores a little better, within the noise
    order, note = _prior_unless_beaten([1, 0], close, [fav, other])
    assert order[0] == 0 and "prior's" in note
    clear = entries(-0.1, 0.05)  # clearly better: it wins
    order, note = _prior_unless_beaten([1, 0], clear, [fav, other])
    assert order[0] == 1 and "over the prior's" in note
