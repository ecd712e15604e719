"""Augmentation pipelines: every registry transform on SAR dB, grey and RGB images; value mapping
(the zeros bug), border fills, seeding (also across DataLoader workers), messages, preview."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.data.augment import AUGMENTS, build_augment, preview_grid
from pipeline.data.augmenter import worker_init_fn

SAR_RANGE = (-50.0, 50.0)


def sar_images(n=4, seed=0):
    """2-band 75x75 dB images: speckled background near -25 dB and a bright blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:75, :75]
    blob = 18 * np.exp(-((yy - 37) ** 2 + (xx - 40) ** 2) / 40)
    x = -25 + 1.5 * rng.standard_normal((n, 2, 75, 75)) + blob
    x[:, 1] -= 5
    return x.astype(np.float32)


def grey_images(n=4, seed=0):
    """1-channel uint8 digit-like images: black with a white stroke."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, 28, 28), np.uint8)
    for i in range(n):
        r = rng.integers(6, 12)
        x[i, 0, 6:22, r : r + 4] = 255
        x[i, 0, 6:9, 8:20] = 200
    return x


def rgb_images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    base = np.stack([yy * 6, xx * 6, (yy + xx) * 3], 0)
    return np.clip(base[None] + rng.integers(0, 40, (n, 3, 32, 32)), 0, 255).astype(np.uint8)


KINDS = {"sar": (sar_images, SAR_RANGE), "grey": (grey_images, (0.0, 255.0)), "rgb": (rgb_images, (0.0, 255.0))}


def params_for(name, size):
    h, w = size
    extra = {
        "RandomCrop": {"height": h - 4, "width": w - 4},
        "CenterCrop": {"height": h - 4, "width": w - 4},
        "PadIfNeeded": {"min_height": h + 4, "min_width": w + 4},
        "CropAndPad": {"percent": 0.1},
        "RandomSizedCrop": {"min_max_height": [h // 2, h]},
        "XYMasking": {"num_masks_x": 1, "mask_x_length": 5},
    }
    return {"name": name, "p": 1.0, **extra.get(name, {})}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_every_transform_keeps_range_shape_and_content(name, kind):
    make, vr = KINDS[kind]
    x = make()
    c, size = x.shape[1], x.shape[2:]
    allowed = AUGMENTS.get(name)
    if allowed is not None and c not in allowed:
        with pytest.raises(
            PipelineError, match=rf"^augment\[0\] \({name}\): works on .*-channel images only; these images have {c}$"
        ):
            build_augment([params_for(name, size)], vr, c, size, seed=0)
        return
    aug = build_augment([params_for(name, size)], vr, c, size, seed=0)
    y = aug.batch(x)
    assert y.dtype == np.float32 and y.shape == (len(x), c, *aug.output_size)
    tol = 1e-4 * (vr[1] - vr[0])
    assert y.min() >= vr[0] - tol and y.max() <= vr[1] + tol
    for img in y:
        assert img.std() > 0 and np.ptp(img) > 0 and np.any(img != 0)
    one = aug(x[0])  # the single-image call agrees in shape and dtype
    assert one.dtype == np.float32 and one.shape == y.shape[1:]


@pytest.mark.parametrize("operation, grows", [("dilation", True), ("erosion", False)])
def test_morphological_changes_the_stroke_width(operation, grows):
    """A bolder or finer pen: the white stroke's area grows under dilation and shrinks under erosion."""
    x = grey_images()
    aug = build_augment(
        [{"name": "Morphological", "scale": [3, 3], "operation": operation, "p": 1.0}],
        (0.0, 255.0),
        1,
        (28, 28),
        seed=0,
    )
    before, after = (x > 127).sum((1, 2, 3)), (aug.batch(x) > 127).sum((1, 2, 3))
    assert ((after > before) if grows else (after < before)).all(), (before, after)


def test_brightness_works_in_db_instead_of_zeroing():
    """albumentations alone returns zeros on raw dB floats; mapped, +0.1 brightness is +10 dB."""
    x = sar_images()
    aug = build_augment(
        [{"name": "RandomBrightnessContrast", "brightness_limit": [0.1, 0.1], "contrast_limit": 0.0, "p": 1.0}],
        SAR_RANGE,
        2,
        (75, 75),
        seed=0,
    )
    y = aug.batch(x)
    np.testing.assert_allclose(y, x + 10, atol=1e-3)


def test_gauss_noise_is_a_fraction_of_the_range():
    x = sar_images()
    aug = build_augment([{"name": "GaussNoise", "std_range": [0.02, 0.02], "p": 1.0}], SAR_RANGE, 2, (75, 75), seed=0)
    d = aug.batch(x) - x
    assert 1.6 < d.std() < 2.4 and abs(d.mean()) < 0.2  # 0.02 * 100 dB = 2 dB, around the input
    assert np.all(aug.batch(x) != 0)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "Affine", "translate_percent": [0.2, 0.2], "p": 1.0},
        {"name": "ShiftScaleRotate", "shift_limit": [0.2, 0.2], "scale_limit": 0.0, "rotate_limit": 0, "p": 1.0},
    ],
)
def test_shift_makes_no_bright_frame(spec):
    x = sar_images()
    y = build_augment([spec], SAR_RANGE, 2, (75, 75), seed=0).batch(x)
    assert y.max() <= x.max() + 1e-3
    background = np.median(x[:, 0])
    strip = np.concatenate([y[:, 0, :8, :].ravel(), y[:, 0, :, :8].ravel()])
    assert abs(strip.mean() - background) < 2.0  # reflected background, not 0 dB


def test_constant_fill_is_in_image_units():
    x = sar_images()
    spec = {"name": "Affine", "translate_percent": [0.2, 0.2], "border_mode": "constant", "fill": -30, "p": 1.0}
    y = build_augment([spec], SAR_RANGE, 2, (75, 75), seed=0).batch(x)
    assert np.mean(np.abs(y + 30) < 1e-3) > 0.2  # the shifted-in band is exactly -30 dB
    assert y.max() <= x.max() + 1e-3


def test_identity_is_cheap_and_float32():
    x = sar_images()
    aug = build_augment([], SAR_RANGE, 2, (75, 75))
    assert aug.is_identity and aug.batch(x) is x
    g = grey_images()
    np.testing.assert_array_equal(aug.batch(g), g.astype(np.float32))
    assert aug(g[0]).dtype == np.float32


SPEC = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "Affine", "rotate": [-20, 20], "scale": [0.9, 1.1], "p": 0.8},
    {"name": "GaussNoise", "std_range": [0.01, 0.03], "p": 0.5},
]


def test_same_seed_same_outputs_different_seed_different():
    x = sar_images(8)
    a = build_augment(SPEC, SAR_RANGE, 2, (75, 75), seed=3)
    b = build_augment(SPEC, SAR_RANGE, 2, (75, 75), seed=3)
    first = a.batch(x)
    np.testing.assert_array_equal(first, b.batch(x))
    assert not np.array_equal(first, build_augment(SPEC, SAR_RANGE, 2, (75, 75), seed=4).batch(x))
    assert not np.array_equal(first, a.batch(x))  # the stream moves on
    a.set_seed(3)
    np.testing.assert_array_equal(first, a.batch(x))  # and restarts


def test_flips_fire_independently():
    """Compose(seed=s) seeds each transform alike, so two p=0.5 flips always fired together."""
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    aug = build_augment(
        [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}], (0, 15), 1, (4, 4), seed=1
    )
    seen = set()
    for _ in range(64):
        y = aug(x[0])[0]
        seen.add(
            (
                bool(np.allclose(y[0], x[0, 0, 0, ::-1]) or np.allclose(y[0], x[0, 0, 3, ::-1])),
                bool(np.allclose(y[0], x[0, 0, 3]) or np.allclose(y[0], x[0, 0, 3, ::-1])),
            )
        )
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


class _Repeat(torch.utils.data.Dataset):
    """The same image n times, augmented; ``seeded`` seeds each item like the train loop does."""

    def __init__(self, aug, img, n=8, seeded=False):
        self.aug, self.img, self.n, self.seeded = aug, img, n, seeded

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.seeded:
            self.aug.set_seed(100 + i)
        return torch.from_numpy(self.aug(self.img))


def _batches(ds, torch_seed, init=None):
    torch.manual_seed(torch_seed)
    return [b for b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, worker_init_fn=init)]


@pytest.mark.parametrize("init", [None, worker_init_fn], ids=["auto", "worker_init_fn"])
def test_workers_draw_different_reproducible_streams(init):
    aug = build_augment(SPEC, SAR_RANGE, 2, (75, 75), seed=0)
    ds = _Repeat(aug, sar_images(1)[0])
    run1, run2 = _batches(ds, 0, init), _batches(ds, 0, init)
    for a, b in zip(run1, run2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # batch 0 comes from worker 0, batch 1 from worker 1: copies of one Augmenter must not repeat each other
    assert not torch.equal(run1[0], run1[1])
    assert not all(torch.equal(a, b) for a, b in zip(run1, _batches(ds, 1, init)))


def test_explicit_seed_in_worker_wins():
    """The train loop seeds every batch itself: workers must then match the main process."""
    aug = build_augment(SPEC, SAR_RANGE, 2, (75, 75), seed=0)
    ds = _Repeat(aug, sar_images(1)[0], seeded=True)
    local = torch.stack([ds[i] for i in range(len(ds))])
    torch.testing.assert_close(torch.cat(_batches(ds, 5, worker_init_fn)), local, rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            [{"name": "HorizontalFlipp", "p": 0.5}],
            r"^augment\[0\]\.name: unknown transform 'HorizontalFlipp'; did you mean HorizontalFlip\?$",
        ),
        (
            [{"name": "HorizontalFlip"}, {"name": "Zoomify"}],
            r"^augment\[1\]\.name: unknown transform 'Zoomify'; expected one of .*Affine.*",
        ),
        (
            ["HorizontalFlip"],
            r"^augment\[0\]: expected a mapping like \{name: HorizontalFlip, p: 0\.5\}, got 'HorizontalFlip'$",
        ),
        ([{"p": 0.5}], r"^augment\[0\]: missing 'name'; expected the transform's name"),
        ({"name": "HorizontalFlip"}, r"^augment: expected a list of \{name: Transform, \.\.\.\} entries, got dict$"),
        (
            [{"name": "Affine", "scal": [0.9, 1.1]}],
            r"^augment\[0\] \(Affine\): unknown parameter 'scal'; did you mean scale\?$",
        ),
        (
            [{"name": "Affine", "scale": "big"}],
            r"^augment\[0\] \(Affine\): scale: got 'big'; expected a valid tuple or a valid number",
        ),
        (
            [{"name": "Affine", "p": 2}],
            r"^augment\[0\] \(Affine\): p: Input should be less than or equal to 1 \(got 2\)$",
        ),
        (
            [{"name": "GaussNoise", "std_range": [0.5, 0.1]}],
            r"^augment\[0\] \(GaussNoise\): std_range: First value should be less than the second",
        ),
        ([{"name": "CropAndPad"}], r"^augment\[0\] \(CropAndPad\): Both px and percent parameters cannot be None"),
        (
            [{"name": "Affine", "border_mode": "mirror"}],
            r"^augment\[0\] \(Affine\): border_mode: unknown 'mirror'; expected one of constant, ",
        ),
        (
            [{"name": "Affine", "fill": {"a": 1}}],
            r"^augment\[0\] \(Affine\): fill: got \{'a': 1\}; expected a number .* between -50 and 50$",
        ),
        (
            [{"name": "MedianBlur", "blur_limit": 7}],
            r"^augment\[0\] \(MedianBlur\): blur_limit: got 7; expected kernel sizes of at most 5",
        ),
        (
            [{"name": "ColorJitter"}],
            r"^augment\[0\] \(ColorJitter\): works on 1 or 3-channel images only; these images have 2$",
        ),
        (
            [{"name": "RandomCrop", "height": 64, "width": 64, "p": 0.5}],
            r"^augment\[0\] \(RandomCrop\): changes the image size 75x75 -> 64x64 with p=0\.5, "
            r"so a batch would mix sizes; expected p: 1",
        ),
        (
            [{"name": "RandomCrop", "height": 80, "width": 80}],
            r"^augment\[0\] \(RandomCrop\): fails on 2-channel 75x75 images: Crop size",
        ),
    ],
)
def test_bad_spec_is_one_line(spec, message):
    with pytest.raises(PipelineError, match=message) as err:
        build_augment(spec, SAR_RANGE, 2, (75, 75))
    assert "\n" not in str(err.value)


def test_where_prefix_and_size_changing_pipeline():
    with pytest.raises(PipelineError, match=r"^train\.augment\[0\]\.name: unknown"):
        build_augment([{"name": "Nope"}], SAR_RANGE, 2, (75, 75), where="train.augment")
    aug = build_augment(
        [{"name": "PadIfNeeded", "min_height": 80, "min_width": 80}, {"name": "RandomCrop", "height": 64, "width": 64}],
        SAR_RANGE,
        2,
        (75, 75),
        seed=0,
    )
    assert aug.output_size == (64, 64) and aug.batch(sar_images()).shape == (4, 2, 64, 64)


def test_shipped_configs_and_brief_example_build():
    root = Path(__file__).resolve().parents[1] / "competitions"
    from pipeline.plan.recipes import AUG_FAMILIES

    shipped = [yaml.safe_load(p.read_text()).get("augment") or [] for p in sorted(root.glob("*.yaml"))]
    # augment: auto races the plan's families: each of them must build as a shipped list does
    specs = [s for s in shipped if s != "auto"] + list(AUG_FAMILIES.values())
    specs.append(
        yaml.safe_load("""
- {name: HorizontalFlip, p: 0.5}
- {name: VerticalFlip, p: 0.5}
- {name: RandomRotate90, p: 0.5}
- {name: Affine, translate_percent: 0.1, scale: [0.9, 1.1], rotate: [-20, 20], p: 0.5}
- {name: RandomBrightnessContrast, brightness_limit: 0.1, contrast_limit: 0.1, p: 0.3}
- {name: GaussNoise, std_range: [0.01, 0.03], p: 0.2}
- {name: CoarseDropout, num_holes_range: [1, 4], hole_height_range: [0.05, 0.15],
   hole_width_range: [0.05, 0.15], p: 0.3}
- {name: RandomResizedCrop, size: [75, 75], scale: [0.8, 1.0], p: 0.3}
""")
    )
    x = sar_images(8)
    for spec in specs:
        y = build_augment(spec, SAR_RANGE, 2, (75, 75), seed=0).batch(x)
        assert y.shape == x.shape and y.min() >= -50 - 1e-3 and y.max() <= 50 + 1e-3


@pytest.mark.parametrize("kind", ["sar", "rgb"])
def test_preview_grid_writes_png(kind, tmp_path):
    make, vr = KINDS[kind]
    x = make(3)
    aug = build_augment(SPEC[:3], vr, x.shape[1], x.shape[2:], seed=0)
    out = preview_grid(x, aug, tmp_path / "sub" / "preview.png", n=3, per_image=2, value_range=vr)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (480, 480)  # 3 columns x 3 rows of 1.6 in at 100 dpi
        assert np.asarray(im.convert("L")).std() > 0
    assert [p.name for p in out.parent.iterdir()] == ["preview.png"]  # no temporary left behind


def test_augment_preview_cli(digits_config, capsys):
    from conftest import run_cli

    path = digits_config(augment=[{"name": "Affine", "rotate": [-20, 20], "p": 1.0}])
    assert run_cli("augment", path, "--n", "3") == 0
    out = Path("runs/comp/exp/augment_preview.png")
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (800, 480)  # original + 4 augmented columns, 3 rows
    assert run_cli("augment", path, "augment=[{name: Blurr}]") == 2
    assert "augment[0].name: unknown transform 'Blurr'; did you mean Blur" in capsys.readouterr().err


@pytest.mark.parametrize(
    "entry, key",
    [({"name": "HorizontalFlip", "p": True}, "p"), ({"name": "GaussianBlur", "blur_limit": False}, "blur_limit")],
)
def test_a_boolean_is_not_a_number_parameter(entry, key):
    from pipeline.data.augment import validate_augment

    with pytest.raises(
        PipelineError, match=rf"augment\[0\] \({entry['name']}\): {key}: got (True|False); expected a number"
    ):
        validate_augment([entry])
