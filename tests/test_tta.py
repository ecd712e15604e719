"""TTA registry: names, de-duplication, crops, errors, and invariance of group-averaged predictions."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.config.registries import TTA
from pipeline.core.errors import PipelineError
from pipeline.models.backbones import build_model
from pipeline.models.tta import build_tta, model_input_size, predict_tta


def real_model(img_size=(8, 8), in_chans=1, num_classes=4, seed=0):
    """A real simple_cnn Net with a random (non-zero) head, so its predictions depend on orientation."""
    torch.manual_seed(seed)
    cfg = SimpleNamespace(
        model=SimpleNamespace(
            backbone="simple_cnn", pretrained=False, weights=None, use_features=True, input_size=None, drop_rate=0.0
        )
    )
    model, _ = build_model(cfg, in_chans, num_classes, 0, img_size, load_weights=False)
    torch.nn.init.normal_(model.head[1].weight, std=0.5)
    return model.eval()


def images(n=6, side=8, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, 1, side, side)).astype(np.float32)


def apply(t, x: np.ndarray) -> np.ndarray:
    return t(torch.from_numpy(x)).numpy()


def test_unknown_name_lists_known_ones():
    with pytest.raises(
        PipelineError,
        match=r"^predict.tta: unknown TTA 'spin'; known: identity, hflip, vflip, rot90, rot180, rot270, dihedral, "
        r"fivecrop, tencrop, rotate<N>, zoom<N>$",
    ):
        build_tta(["identity", "spin"], (8, 8))
    with pytest.raises(PipelineError, match=r"^predict.tta: unknown TTA 'rotat6'; did you mean rotate"):
        build_tta(["rotat6"], (8, 8))
    for bad, family, hi in (
        ("rotate0", "rotate", 45),
        ("rotate46", "rotate", 45),
        ("zoom0", "zoom", 50),
        ("zoom51", "zoom", 50),
    ):
        with pytest.raises(PipelineError, match=rf"^predict.tta: '{bad}': {family}<N> takes N from 1 to {hi}$"):
            build_tta(["identity", bad], (8, 8))
    with pytest.raises(PipelineError, match=r"predict.tta: empty list; expected at least one of identity"):
        build_tta([], (8, 8))


def test_dihedral_has_8_distinct_elements_and_names_dedupe():
    x = images(1)
    ts = build_tta(["dihedral"], (8, 8))
    assert len(ts) == 8
    outs = [apply(t, x) for t in ts]
    assert len({o.tobytes() for o in outs}) == 8
    # hflip, vflip and the rotations are members of the group: declared again, they are not counted twice
    assert len(build_tta(["identity", "dihedral", "hflip", "vflip", "rot90", "rot180", "rot270"], (8, 8))) == 8
    named = {t.name: t for t in build_tta(["identity", "hflip", "vflip", "rot90", "rot180", "rot270"], (8, 8))}
    np.testing.assert_array_equal(apply(named["identity"], x), x)
    np.testing.assert_array_equal(apply(named["hflip"], x), x[..., ::-1])
    np.testing.assert_array_equal(apply(named["vflip"], x), x[..., ::-1, :])
    np.testing.assert_array_equal(apply(named["rot180"], x), x[..., ::-1, ::-1])
    np.testing.assert_array_equal(apply(named["rot90"], x), np.rot90(x, 1, axes=(-2, -1)))
    np.testing.assert_array_equal(apply(named["rot270"], x), np.rot90(x, 3, axes=(-2, -1)))


def _blob(h, w, dy, dx, sd=1.5):
    """(1, 1, h, w) image: a Gaussian spot at (dy, dx) px from the centre."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.exp(-((yy - (h - 1) / 2 - dy) ** 2 + (xx - (w - 1) / 2 - dx) ** 2) / (2 * sd**2))[None, None].astype(
        np.float32
    )


def _centroid(img):
    """(dy, dx) of an image's mass from its centre."""
    h, w = img.shape[-2:]
    yy, xx = np.mgrid[0:h, 0:w]
    m = img[0, 0] / img[0, 0].sum()
    return float((m * yy).sum() - (h - 1) / 2), float((m * xx).sum() - (w - 1) / 2)


@pytest.mark.parametrize("h, w", [(41, 41), (41, 61)])  # non-square too: a turn stays a turn, no shear
def test_affine_views_turn_and_scale_about_the_centre(h, w):
    views = build_tta(["identity", "rotate30", "zoom20", "rotate30"], (h, w))
    assert [t.name for t in views] == [
        "identity",
        "rotate+30",
        "rotate-30",
        "zoom-20",
        "zoom+20",
    ]  # declared twice, made once
    x = _blob(h, w, 0.0, 12.0)
    np.testing.assert_array_equal(apply(views[0], x), x)
    (py, px), (my, mx) = (_centroid(apply(t, x)) for t in views[1:3])
    for dy, dx in ((py, px), (my, mx)):  # the spot moved along its circle by 30 degrees, the views in opposite senses
        assert np.hypot(dy, dx) == pytest.approx(12.0, abs=0.3)
        assert abs(np.degrees(np.arctan2(dy, dx))) == pytest.approx(30.0, abs=1.5)
    assert np.sign(py) == -np.sign(my)
    for t, factor in zip(views[3:], (0.8, 1.2)):  # zoom-P shrinks the content about the centre, zoom+P enlarges it
        dy, dx = _centroid(apply(t, x))
        assert dx == pytest.approx(12.0 * factor, abs=0.3) and abs(dy) < 0.05
    flat = np.full((2, 3, h, w), 7.0, np.float32)  # reflected borders: no dark frame of zeros
    for t in views:
        np.testing.assert_allclose(apply(t, flat), flat, rtol=1e-5)


def test_crops_cut_the_model_size_from_larger_images():
    x = images(2, side=10)
    five = build_tta(["fivecrop"], (10, 10), (8, 8))
    assert [t.name for t in five] == ["crop_tl", "crop_tr", "crop_bl", "crop_br", "crop_c"]
    got = [apply(t, x) for t in five]
    for g, (r, c) in zip(got, [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]):
        np.testing.assert_array_equal(g, x[..., r : r + 8, c : c + 8])
    ten = build_tta(["tencrop"], (10, 10), (8, 8))
    assert len(ten) == 10 and ten[5].name == "crop_tl+hflip"
    np.testing.assert_array_equal(apply(ten[5], x), x[..., ::-1][..., 0:8, 0:8])  # the mirror's top-left corner
    assert model_input_size({"model": {"input_size": 6}, "img_size": [10, 10]}) == (6, 6)
    assert model_input_size({"model": {"input_size": None}, "img_size": [10, 12]}) == (10, 12)


def test_bad_geometry_is_one_line_error():
    with pytest.raises(
        PipelineError,
        match=r"predict.tta: fivecrop cuts 8x8 crops \(the model's input size\) "
        r"from the test images, which are 8x8; expected test images larger",
    ):
        build_tta(["fivecrop"], (8, 8), (8, 8))
    with pytest.raises(PipelineError, match=r"predict.tta: tencrop cuts 12x12 crops .* which are 8x8"):
        build_tta(["tencrop"], (8, 8), 12)
    with pytest.raises(
        PipelineError,
        match=r"predict.tta: rot90 rotates by 90 degrees, which needs square images; the test images are 75x60",
    ):
        build_tta(["rot90"], (75, 60))
    with pytest.raises(PipelineError, match=r"predict.tta: dihedral rotates"):
        build_tta(["dihedral"], (75, 60))
    assert len(build_tta(["hflip", "vflip", "rot180"], (75, 60))) == 3  # flips need no square


GROUPS = [  # (declared TTA, the group elements g to test invariance under, image side, model side)
    (["dihedral"], ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "rot90+hflip", "rot270+hflip"], 8, None),
    (["identity", "hflip"], ["hflip"], 8, None),
    (["identity", "vflip"], ["vflip"], 8, None),
    (["identity", "rot90", "rot180", "rot270"], ["rot90", "rot180", "rot270"], 8, None),
    (["identity", "hflip", "vflip", "rot180"], ["hflip", "vflip", "rot180"], 8, None),
    (["tencrop"], ["hflip"], 10, 8),
    (["tencrop"], ["hflip"], 11, 8),  # odd margin: the centre crop sits off-centre by one pixel
]


@pytest.mark.parametrize("declared,elements,side,model_side", GROUPS)
@pytest.mark.parametrize("average", ["prob", "logit"])
def test_tta_prediction_is_invariant_under_its_group(declared, elements, side, model_side, average):
    model = real_model((model_side or side,) * 2)
    x = images(6, side, seed=len(declared))
    ts = build_tta(declared, (side, side), model_side)
    ref = predict_tta(model, x, None, ts, average)
    assert ref.shape == (6, 4)
    plain = predict_tta(
        model, x, None, build_tta(["identity"], (side, side)) if model_side is None else ts[:1], average
    )
    assert not np.allclose(plain, ref, atol=1e-4)  # TTA changes the prediction: the model is orientation-sensitive
    g_all = {t.name: t for t in build_tta(["dihedral"], (side, side))}
    for name in elements:
        gx = apply(g_all[name], x)
        np.testing.assert_allclose(predict_tta(model, gx, None, ts, average), ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_set_that_is_not_a_group_is_not_invariant():
    """The invariance test has teeth: {identity, rot90} is not closed under rot90."""
    model = real_model()
    x = images(6)
    ts = build_tta(["identity", "rot90"], (8, 8))
    rot = build_tta(["rot90"], (8, 8))[0]
    assert not np.allclose(predict_tta(model, apply(rot, x), None, ts), predict_tta(model, x, None, ts), atol=1e-4)


def test_registry_names_are_the_documented_ones():
    assert list(TTA) == ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "dihedral", "fivecrop", "tencrop"]
