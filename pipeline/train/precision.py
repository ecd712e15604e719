"""``train.precision: auto``: on CUDA the GPU's capability decides (bf16 where native, else fp16:
``pipeline.core.device.auto_precision``); on CPU and mps a few steps in fp32 and bf16 are timed once per
machine, model and shape."""

from __future__ import annotations

import json
import logging
import math
import platform
import time

import torch

from pipeline.core.device import auto_precision, bf16_supported
from pipeline.core.io import atomic_write_json, cache_dir
from pipeline.models.inference import autocast
from pipeline.runs.layout import RunDir

log = logging.getLogger(__name__)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def measure(
    model: torch.nn.Module,
    x: torch.Tensor,
    feats: torch.Tensor | None,
    precision: str,
    steps: int = 3,
    give_up_after: float = math.inf,
) -> float:
    """Median seconds per forward/backward step (after one warm-up step); the model's weights are
    restored. Stops early once ``give_up_after`` seconds are spent (bf16 emulated on a CPU without
    native support runs ~10x slower: two steps tell)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model.train()
    y = torch.zeros(len(x), dtype=torch.long, device=x.device)
    times, spent = [], 0.0
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(x.device, precision):
            loss = torch.nn.functional.cross_entropy(model(x, feats).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > give_up_after and len(times) >= 2:
            break
    model.load_state_dict(state)
    timed = sorted(times[1:])
    return timed[len(timed) // 2]


def resolve_precision(requested: str, model, x, feats, key: str) -> str:
    """The precision to train in; ``auto`` measures once and caches the choice per machine/model/shape."""
    if requested != "auto":
        return requested
    decided = auto_precision(x.device.type, bf16_supported(x.device))
    if decided is not None:
        log.info(f"precision auto on {x.device}: {decided} (native bf16: {decided == 'bf16'})")
        return decided
    path = cache_dir() / "precision.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    full_key = f"{_machine()}|{key}|{tuple(x.shape)}|{x.device.type}"
    if full_key not in table:
        fp32 = measure(model, x, feats, "fp32")
        t = {"fp32": fp32, "bf16": measure(model, x, feats, "bf16", give_up_after=8 * fp32)}
        choice = min(t, key=t.get)
        table[full_key] = {"choice": choice, "seconds_per_step": t}
        atomic_write_json(path, table)
        log.info(
            f"precision auto: fp32 {t['fp32'] * 1e3:.0f} ms/step, "
            f"bf16 {t['bf16'] * 1e3:.0f} ms/step -> {choice} (cached in {path})"
        )
    return table[full_key]["choice"]


def read_precision(run: RunDir, train_hash: str | None = None) -> str | None:
    """The precision resolved for ``run`` (``precision.json``; for ``train_hash`` when given); None when not
    resolved."""
    p = run.precision_json
    if not p.is_file():
        return None
    try:
        saved = json.loads(p.read_text())
        choice = saved["precision"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # resolved again
    return choice if train_hash is None or saved.get("hash") == train_hash else None


def write_precision(run: RunDir, precision: str, train_hash: str) -> None:
    atomic_write_json(run.precision_json, {"precision": precision, "hash": train_hash})
