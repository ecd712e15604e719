"""The GPU paths' decisions, on CPU: precision -> (autocast dtype, loss scaling), ``auto`` on CUDA,
fp16 refused off CUDA, device strings, pinned/non-blocking copies, the cuDNN flags, the GradScaler
in the training step and in the resume state, and benchmarks/gpu_smoke.py's CPU mode.

CUDA is faked where a decision reads it (``torch.cuda.is_available`` & co. monkeypatched); nothing
here allocates on a GPU, so the suite means the same on a machine with or without one."""

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cli_error, run_cli
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.load import load_config
from pipeline.core import device as dev
from pipeline.core.device import Amp, amp_plan, auto_precision, cudnn_flags, loader_kwargs, non_blocking, parse_device
from pipeline.core.errors import PipelineError
from pipeline.data.folds import run_fold
from pipeline.train.cv import train_cv

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("runs/comp/exp")


def _fake_cuda(monkeypatch, n: int = 2, bf16: bool = True) -> list:
    """CUDA with ``n`` devices as far as the decisions can tell; returns the set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    return calls


def _files(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ---- precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device_type,precision,bf16,expected",
    [
        ("cpu", "fp32", True, Amp(None, False)),
        ("cpu", "bf16", True, Amp(torch.bfloat16, False)),
        ("mps", "bf16", True, Amp(torch.bfloat16, False)),
        ("cuda", "fp32", True, Amp(None, False)),
        ("cuda", "bf16", True, Amp(torch.bfloat16, False)),  # bf16 has fp32's exponent range: no scaler
        ("cuda", "fp16", True, Amp(torch.float16, True)),  # fp16 underflows small gradients: scaled
        ("cuda", "auto", True, Amp(torch.bfloat16, False)),
        ("cuda", "auto", False, Amp(torch.float16, True)),  # a GPU without native bf16 (V100, T4)
    ],
)
def test_amp_plan(device_type, precision, bf16, expected):
    assert amp_plan(device_type, precision, bf16) == expected


@pytest.mark.parametrize("device_type", ["cpu", "mps"])
def test_fp16_off_cuda_is_refused_and_auto_there_is_measured(device_type):
    with pytest.raises(
        PipelineError, match=f"train.precision: fp16 needs a CUDA device .* the device is {device_type}"
    ):
        amp_plan(device_type, "fp16")
    assert auto_precision(device_type, True) is None and auto_precision(device_type, False) is None
    with pytest.raises(ValueError, match="resolve it first"):  # a caller that skipped the measurement: a bug
        amp_plan(device_type, "auto")


def test_auto_on_cuda_follows_native_bf16_without_measuring(monkeypatch):
    import pipeline.train.precision as prec

    monkeypatch.setattr(prec, "measure", lambda *a, **k: pytest.fail("measured on CUDA"))

    class OnCuda:  # resolve_precision reads only the batch's device before deciding
        device, shape = torch.device("cuda:1"), (4, 1, 8, 8)

    for native, choice in ((True, "bf16"), (False, "fp16")):
        _fake_cuda(monkeypatch, bf16=native)
        assert prec.resolve_precision("auto", None, OnCuda(), None, "key") == choice
    assert not (Path(os.environ["PIPELINE_CACHE"]) / "precision.json").exists()  # nothing to cache
    assert prec.resolve_precision("fp16", None, OnCuda(), None, "key") == "fp16"  # explicit: as asked


def test_a_budget_plan_times_the_precision_the_gpu_will_train_in(monkeypatch, digits_config):
    from pipeline.plan.timing import _timed_precision

    cfg = load_config(digits_config(train={"precision": "auto"}))
    assert _timed_precision(cfg, torch.device("cpu")) == "fp32"  # the CPU's choice is measured after the plan
    _fake_cuda(monkeypatch, bf16=False)
    assert _timed_precision(cfg, torch.device("cuda")) == "fp16"
    assert _timed_precision(load_config(digits_config(train={"precision": "bf16"})), torch.device("cuda")) == "bf16"


def test_inference_autocast_runs_fp16_weights_in_fp32_off_cuda():
    """Trained in fp16 on a GPU, predicted here: no scaler is needed, so fp32 instead of a refusal."""
    from pipeline.models.inference import autocast

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for precision, dtype in (("fp16", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast(torch.device("cpu"), precision):
            assert (a @ b).dtype == dtype, precision


@pytest.mark.parametrize("device_flag", ["cpu", "auto"])
def test_fp16_training_on_cpu_is_one_line_and_writes_nothing(digits_config, capsys, tmp_path, device_flag):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    path = digits_config()
    assert run_cli("fold", path) == 0
    before = _files(tmp_path)
    for extra in ([], ["--budget", "60"]):  # the budget's plan trains too: refused before it is made
        err = cli_error(capsys, "train", path, f"train.device={device_flag}", "train.precision=fp16", *extra)
        assert (
            "train.precision: fp16 needs a CUDA device" in err
            and f"the device is {dev.resolve_device(device_flag).type}" in err
        )
    assert _files(tmp_path) == before and not RUN.exists()


def test_precision_key_accepts_fp16_and_names_other_values(digits_config, capsys):
    path = digits_config()
    assert load_config(path, ["train.precision=fp16"]).train.precision == "fp16"
    err = cli_error(capsys, "fold", path, "train.precision=fp8")
    assert "train.precision" in err and "fp16" in err


# ---- devices -------------------------------------------------------------------------------

DEVICES = st.one_of(st.sampled_from(["auto", "cpu", "mps", "cuda"]), st.integers(0, 10**6).map(lambda k: f"cuda:{k}"))


@given(DEVICES)
def test_device_strings_parse(name):
    kind, idx = parse_device(name)
    assert kind == name.split(":")[0] and (idx is None) == (":" not in name)
    assert idx is None or f"cuda:{idx}" == name


@given(st.one_of(DEVICES, st.text(alphabet="acdpumsto:0123456789 ", max_size=8)))
def test_config_and_device_module_accept_the_same_device_strings(name):
    from pipeline.config.sections import TrainConfig

    try:
        TrainConfig(device=name)
        config_ok = True
    except ValueError:
        config_ok = False
    assert config_ok == bool(dev.DEVICE_RE.fullmatch(name))
    if not config_ok:
        with pytest.raises(PipelineError, match="train.device"):
            parse_device(name)


def test_cuda_index_is_checked_against_the_device_count(monkeypatch):
    _fake_cuda(monkeypatch, n=2)
    assert dev.resolve_device("cuda:1") == torch.device("cuda:1")
    assert dev.resolve_device("cuda") == torch.device("cuda") and dev.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(PipelineError, match=r"train.device: cuda:2 but only 2 CUDA device\(s\); expected cuda:0..1"):
        dev.resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="train.device: cuda requested but CUDA is not available"):
        dev.resolve_device("cuda")  # no silent fallback to CPU: as before
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_cuda_index_beyond_the_machine_is_one_line_and_writes_nothing(digits_config, capsys, tmp_path):
    path = digits_config()
    assert run_cli("fold", path) == 0
    before = _files(tmp_path)
    n = torch.cuda.device_count()
    err = cli_error(capsys, "train", path, f"train.device=cuda:{n}")
    assert f"train.device: cuda:{n}" in err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("name,pinned", [("cpu", False), ("mps", False), ("cuda", True), ("cuda:3", True)])
def test_pinned_batches_and_non_blocking_copies_only_for_cuda(name, pinned):
    d = torch.device(name)  # a device object needs no device behind it
    assert loader_kwargs(d) == {"pin_memory": pinned} and non_blocking(d) is pinned


def test_loader_pins_memory_on_cuda_only(monkeypatch, digits_config):
    """The trainer's DataLoader gets ``pin_memory`` from the device (inspected, not iterated)."""
    from pipeline.data.formats import read_table
    from pipeline.runs.layout import RunDir
    from pipeline.train import job

    cfg = load_config(digits_config(train={"num_workers": 1}))
    table = read_table(cfg, "train")
    seen = []
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda ds, **kw: seen.append(kw["pin_memory"]) or [])
    for name in ("cpu", "cuda:1"):
        ft = job.FoldTrainer(
            cfg=cfg,
            table=table,
            fold_of=np.arange(len(table)) % 3,
            job=RunDir.of(cfg).job_dir(0, 42),
            device=torch.device(name),
            run_hash="h",
        )
        ft.parts = type("P", (), {"augment": None})()
        ft.loader([np.arange(4)], 1)
    assert seen == [False, True]


# ---- determinism ---------------------------------------------------------------------------


def test_cudnn_flags():
    assert cudnn_flags(True) == {
        "benchmark": False,
        "deterministic": True,
        "use_deterministic_algorithms": True,
        "warn_only": True,
    }
    assert cudnn_flags(False) == {
        "benchmark": True,
        "deterministic": False,
        "use_deterministic_algorithms": False,
        "warn_only": True,
    }


def test_flags_touch_nothing_on_cpu_and_are_applied_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only: calls.append((on, warn_only)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after the test
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    for deterministic in (True, False):
        assert dev.apply_cudnn_flags(torch.device("cpu"), deterministic) is None
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == before and calls == []
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    dev.apply_cudnn_flags(torch.device("cuda"), False)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic and calls == [(False, True)]
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    dev.apply_cudnn_flags(torch.device("cuda"), True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic and calls[-1] == (True, True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_the_training_boundary_selects_cuda_k_and_sets_its_flags(monkeypatch, digits_config):
    set_calls = _fake_cuda(monkeypatch, n=2)
    applied = []
    monkeypatch.setattr(dev, "apply_cudnn_flags", lambda d, det: applied.append((d, det)))
    cfg = load_config(digits_config(), ["train.device=cuda:1", "train.deterministic=false", "train.precision=fp16"])
    assert dev.prepare_training_device(cfg.train) == torch.device("cuda:1")
    assert set_calls == [torch.device("cuda:1")] and applied == [(torch.device("cuda:1"), False)]
    with pytest.raises(PipelineError, match="cuda:2 but only 2"):
        dev.prepare_training_device(load_config(digits_config(), ["train.device=cuda:2"]).train)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    applied.clear()
    assert dev.prepare_training_device(load_config(digits_config(), ["train.device=cpu"]).train) == torch.device("cpu")
    assert applied == []


def test_deterministic_is_a_runtime_key(digits_config):
    """It changes nothing on CPU and on CUDA only the kernels (as the device does): the same run."""
    path = digits_config()
    assert load_config(path, ["train.deterministic=false"]).hash() == load_config(path).hash()
    assert load_config(path).train.deterministic is True


# ---- the GradScaler in the step and in the resume state ------------------------------------


def _reference_epoch(parts, batches, table, t) -> float:
    """The training step as it was before the scaler: backward, clip, step."""
    model, opt = parts.model, parts.opt
    total, seen = 0.0, 0
    opt.zero_grad(set_to_none=True)
    for i, (idx, x) in enumerate(batches):
        y = torch.from_numpy(table.labels[idx])
        loss = parts.loss_fn(model(x, None).float(), y)
        (loss / t.accum_steps).backward()
        if (i + 1) % t.accum_steps == 0 or i + 1 == len(batches):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if parts.per_step:
                parts.sched.step()
        total, seen = total + loss.item() * len(idx), seen + len(idx)
    return total / seen


def test_a_disabled_scaler_trains_exactly_as_no_scaler(digits_config):
    from pipeline.data.formats import read_table
    from pipeline.train.trainer import BatchSource, build_components, train_one_epoch

    cfg = load_config(digits_config(train={"grad_clip": 0.5, "accum_steps": 2, "channels_last": False}))
    table = read_table(cfg, "train")
    idx = np.arange(len(table))
    batches = [idx[i : i + 64] for i in range(0, 320, 64)]
    runs = []
    for with_scaler in (True, False):
        parts = build_components(
            cfg=cfg,
            table=table,
            tr_idx=idx,
            seed=0,
            device=torch.device("cpu"),
            channels_last=False,
            with_augment=False,
        )
        assert not parts.scaler.is_enabled()
        parts.model.train()
        src = BatchSource(images=table.images, batches=batches, augment=None, seeds=[0] * len(batches))
        source = [src[b] for b in range(len(batches))]
        if with_scaler:
            loss, _ = train_one_epoch(
                parts,
                source=source,
                n_batches=len(batches),
                table=table,
                t=cfg.train,
                device=torch.device("cpu"),
                precision="fp32",
                channels_last=False,
                rng=np.random.default_rng(0),
            )
        else:
            loss = _reference_epoch(parts, source, table, cfg.train)
        runs.append((loss, [p.detach().clone() for p in parts.model.parameters()]))
    (a, wa), (b, wb) = runs
    assert a == b and all(torch.equal(x, y) for x, y in zip(wa, wb))


def test_components_for_another_precision_are_a_bug_not_a_silent_fp32(digits_config):
    from pipeline.data.formats import read_table
    from pipeline.train.trainer import build_components, train_one_epoch

    cfg = load_config(digits_config())
    table = read_table(cfg, "train")
    parts = build_components(
        cfg=cfg,
        table=table,
        tr_idx=np.arange(len(table)),
        seed=0,
        device=torch.device("cpu"),
        channels_last=False,
        with_augment=False,
    )
    parts.scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match="GradScaler is on"):
        train_one_epoch(
            parts,
            source=[],
            n_batches=0,
            table=table,
            t=cfg.train,
            device=torch.device("cpu"),
            precision="fp32",
            channels_last=False,
            rng=np.random.default_rng(0),
        )


def _scaled_run(digits_config, stop_after: int | None = None) -> tuple[list, pd.DataFrame]:
    """Fold 0 for 2 epochs with loss scaling on (fp16's path, computed in fp32 on CPU); the scaler state
    in last.pt after each epoch."""
    cfg = load_config(digits_config(train={"epochs": 2, "grad_clip": 1.0, "max_steps_per_epoch": 3}))
    run_fold(cfg)
    states = []

    def record(job, epoch, row):
        states.append(torch.load(job.last, weights_only=True)["scaler"])
        if epoch == stop_after:
            raise KeyboardInterrupt

    try:
        train_cv(cfg, folds=[0], on_epoch=record)
    except KeyboardInterrupt:
        train_cv(cfg, folds=[0], on_epoch=record)
    return states, pd.read_csv(RUN / "fold_0" / "oof.csv")


def test_scaler_state_is_saved_in_the_resume_state_and_restored(digits_config, monkeypatch, tmp_path):
    from pipeline.train import trainer

    # fp16 as a GPU runs it, minus the half-precision compute: the scaler on, on a CPU
    monkeypatch.setattr(trainer, "amp_plan", lambda device_type, precision, bf16_supported=True: Amp(None, True))
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=2))
    whole, oof = _scaled_run(digits_config)
    steps = 2 * 3  # train.max_steps_per_epoch, per epoch
    assert whole[-1]["scale"] == 65536.0 * 2 ** (steps // 2)  # it grew every 2 steps: the state moves
    (tmp_path / "resumed").mkdir()
    os.chdir(tmp_path / "resumed")  # a fresh run folder; the same data and config
    resumed, oof2 = _scaled_run(digits_config, stop_after=1)
    assert resumed == whole  # epoch 1's state, then epoch 2's continued from it (not from a fresh scaler)
    pd.testing.assert_frame_equal(oof, oof2)


def test_a_resume_state_without_scaler_state_resumes(digits_config, capsys):
    """last.pt written before the scaler existed (no "scaler" entry) resumes as before."""
    cfg = load_config(digits_config(train={"epochs": 2}))
    run_fold(cfg)

    def stop(job, epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cv(cfg, folds=[0], on_epoch=stop)
    last = RUN / "fold_0" / "last.pt"
    st_ = torch.load(last, weights_only=True)
    assert st_.pop("scaler") == {}  # disabled: an empty state
    torch.save(st_, last)
    train_cv(cfg, folds=[0])
    assert "fold 0: resuming after epoch 1" in capsys.readouterr().out


# ---- benchmarks/gpu_smoke.py ---------------------------------------------------------------


def _smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_smoke_cpu_mode_runs_one_fold_per_precision(tmp_path, capsys):
    res = _smoke().main(
        [
            "--device",
            "cpu",
            "--backbone",
            "simple_cnn",
            "--input-size",
            "16",
            "--n-train",
            "40",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--num-workers",
            "0",
            "--work",
            str(tmp_path / "w"),
            "--json",
            str(tmp_path / "r.jsonl"),
        ]
    )
    out = capsys.readouterr().out
    rows = {r["precision"]: r for r in res["rows"]}
    assert res["ok"] and rows["fp32"]["ok"] and rows["bf16"]["ok"] and rows["fp32"]["train_img_s"] > 0
    assert "needs a CUDA device" in rows["fp16"]["skipped"] and "skipped: train.precision: fp16" in out
    assert "gpu smoke on cpu" in out and "bf16 vs fp32: x" in out
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1


def test_gpu_smoke_skips_bf16_on_a_gpu_without_it(monkeypatch):
    _fake_cuda(monkeypatch, bf16=False)
    skip = _smoke().skip_reason
    assert "Fake GPU has no native bf16" in skip(torch.device("cuda"), "bf16")
    assert skip(torch.device("cuda"), "fp16") is None and skip(torch.device("cuda"), "fp32") is None
    assert "fp16 needs a CUDA device" in skip(torch.device("mps"), "fp16")
