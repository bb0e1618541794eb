import math

import numpy as np
import pytest
import torch

from cifarlab.config import load_config
from cifarlab.data.augment import (affine_matrices, build_augment, cutout, draw_affine, jitter_color, mix_batch,
                                   random_crop, random_erasing, random_flip, shift_channels, warp, wrap_coordinates)
from cifarlab.data.loader import DeviceLoader


def numbered_images(n=6, c=3, h=8, w=8):
    return (torch.arange(n * c * h * w, dtype=torch.int64).reshape(n, c, h, w) % 251 + 1).float() / 255


@pytest.mark.parametrize("fill, mode", [("constant", "constant"), ("reflect", "reflect"), ("edge", "edge")])
def test_crop_moves_each_image_by_its_drawn_offset(fill, mode):
    images = numbered_images()
    pad = 2
    out = random_crop(images, pad, torch.Generator().manual_seed(5), fill)
    replay = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 2 * pad + 1, (len(images),), generator=replay)
    dx = torch.randint(0, 2 * pad + 1, (len(images),), generator=replay)
    assert out.shape == images.shape
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=mode)
    for i in range(len(images)):
        np.testing.assert_array_equal(out[i].numpy(), padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])
        # content moved by (pad - dy, pad - dx): output (r, c) is input (r + dy - pad, c + dx - pad)
        assert out[i, 0, 4, 4] == images[i, 0, 4 + dy[i] - pad, 4 + dx[i] - pad]
    assert len({(int(a), int(b)) for a, b in zip(dy, dx)}) > 1  # per-sample parameters


def test_uint8_crop_keeps_dtype():
    images = (numbered_images() * 255).round().to(torch.uint8)
    assert random_crop(images, 4, torch.Generator().manual_seed(0)).dtype == torch.uint8


@pytest.mark.parametrize("dim", [2, 3])
def test_flips_are_exact_and_per_sample(dim):
    images = numbered_images(n=64)
    out = random_flip(images, torch.Generator().manual_seed(0), dim=dim)
    flipped = [bool(torch.equal(o, i.flip(dim - 1))) for o, i in zip(out, images)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def affine(n, angle=0.0, shear=0.0, zoom_x=1.0, zoom_y=1.0, shift_x=0.0, shift_y=0.0, h=8, w=8):
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return affine_matrices(h, w, full(angle), full(shear), full(zoom_x), full(zoom_y), full(shift_x), full(shift_y))


def test_rotation_by_90_degrees_equals_rot90():
    images = torch.rand(3, 3, 9, 9)
    ccw = warp(images, affine(3, angle=90, h=9, w=9))
    torch.testing.assert_close(ccw, torch.rot90(images, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    cw = warp(images, affine(3, angle=-90, h=9, w=9))
    torch.testing.assert_close(cw, torch.rot90(images, -1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_integer_shift_moves_pixels_by_the_drawn_offsets():
    c = load_config(overrides=["augment.width_shift=3", "augment.height_shift=2"]).augment
    params = draw_affine(5, 8, 8, c, torch.Generator().manual_seed(1), "cpu")
    assert all(float(v).is_integer() and abs(v) <= 3 for v in params["shift_x"])
    images = torch.rand(5, 1, 8, 8)
    out = warp(images, affine_matrices(8, 8, **params), fill="constant", cval=-1.0)
    for i in range(5):
        dx, dy = int(params["shift_x"][i]), int(params["shift_y"][i])
        for r in range(8):
            for col in range(8):
                src_r, src_c = r - dy, col - dx
                inside = 0 <= src_r < 8 and 0 <= src_c < 8
                expected = images[i, 0, src_r, src_c] if inside else -1.0
                assert out[i, 0, r, col].item() == pytest.approx(float(expected), abs=1e-5)


def bilinear(image: np.ndarray, x: float, y: float) -> float:
    """Sample a (H, W) image at pixel coordinates (x right, y down) about the top-left pixel center."""
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    v = image[y0:y0 + 2, x0:x0 + 2]
    return (v[0, 0] * (1 - fx) * (1 - fy) + v[0, 1] * fx * (1 - fy) + v[1, 0] * (1 - fx) * fy + v[1, 1] * fx * fy)


@pytest.mark.parametrize("params", [dict(zoom_x=0.5, zoom_y=0.8), dict(shear=20.0), dict(angle=33.0, zoom_x=1.2),
                                    dict(shear=-12.0, zoom_y=0.7, shift_x=1.5)])
def test_zoom_and_shear_map_points_where_the_matrix_says(params):
    h = w = 16
    image = np.random.default_rng(0).random((h, w)).astype(np.float32)
    matrix = affine(1, h=h, w=w, **params)
    out = warp(torch.from_numpy(image)[None, None], matrix)[0, 0].numpy()
    m = matrix[0].double().numpy()
    checked = 0
    for r in range(h):
        for col in range(w):
            # output pixel center about the image center -> input pixel, per the matrix
            x_in, y_in, _ = m @ np.array([col + 0.5 - w / 2, r + 0.5 - h / 2, 1.0])
            x, y = x_in + w / 2 - 0.5, y_in + h / 2 - 0.5
            if 0 <= x < w - 1 and 0 <= y < h - 1:
                assert out[r, col] == pytest.approx(bilinear(image, x, y), abs=1e-4)
                checked += 1
    assert checked > 60


def test_zoom_below_one_enlarges_and_fill_modes_differ():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0  # one bright center pixel
    zoomed = warp(image, affine(1, zoom_x=0.5, zoom_y=0.5, h=9, w=9))
    assert (zoomed > 0.2).sum() > 1  # the dot got bigger
    shifted = torch.ones(1, 1, 4, 4)
    m = affine(1, shift_x=2, h=4, w=4)
    assert warp(shifted, m, "constant", 0.25)[0, 0, :, 0].tolist() == [0.25] * 4
    assert warp(shifted, m, "nearest")[0, 0, :, 0].tolist() == [1.0] * 4


def test_brightness_scales_each_image_by_its_factor():
    images = torch.full((8, 3, 4, 4), 0.5)
    out = jitter_color(images, torch.Generator().manual_seed(2), 0.4, 0, 0)
    factors = out[:, 0, 0, 0] / 0.5
    assert ((factors >= 0.6) & (factors <= 1.4)).all() and factors.std() > 0.05
    assert torch.allclose(out, 0.5 * factors.view(8, 1, 1, 1))


def test_cutout_and_erasing_set_boxes_to_the_fill():
    images = torch.rand(16, 3, 32, 32) + 2  # never equal to the fill
    fill = torch.tensor([0.1, 0.2, 0.3])
    cut = cutout(images, 8, torch.Generator().manual_seed(0), fill)
    holes = (cut[:, 0] == 0.1).sum(dim=(1, 2))
    assert (holes >= 16).all() and (holes <= 64).all() and (holes == 64).any()
    assert torch.equal(random_erasing(images, 0.0, torch.Generator().manual_seed(0), fill), images)
    erased = (random_erasing(images, 1.0, torch.Generator().manual_seed(0), fill)[:, 2] == 0.3).sum(dim=(1, 2))
    assert (erased >= 1).all() and (erased <= 0.4 * 32 * 32).all()


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0)])
def test_mixed_targets_sum_to_one_and_match_the_pixels(mixup, cutmix):
    n = 32
    labels = torch.arange(n) % 10
    images = (labels.float() + 1).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()  # image i is all (label_i + 1)
    mixed, targets = mix_batch(images, labels, 10, torch.Generator().manual_seed(3), mixup, cutmix)
    assert targets.shape == (n, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(n))
    own = targets[torch.arange(n), labels]
    if mixup:
        own_value = labels.float() + 1
        # pixels are lam * own + (1 - lam) * partner; targets put lam on the own label
        partner_value = (mixed[:, 0, 0, 0] - own * own_value) / (1 - own).clamp_min(1e-6)
        assert ((own > 0) & (own <= 1)).all()
        assert torch.allclose(partner_value[own < 0.99].round(), partner_value[own < 0.99], atol=1e-3)
    else:
        kept = (mixed[:, 0] == (labels.float() + 1).view(n, 1, 1)).float().mean(dim=(1, 2))
        same_label_partner = own == 1
        torch.testing.assert_close(kept[~same_label_partner], own[~same_label_partner])


def test_presets_and_explicit_keys():
    assert build_augment(load_config().augment) is None
    affine_cfg = load_config(overrides=["augment.preset=keras-affine"]).augment
    assert (affine_cfg.rotation, affine_cfg.shear, affine_cfg.zoom, affine_cfg.width_shift) == (15, 0.2, 0.2, 0.1)
    assert affine_cfg.fill_mode == "nearest" and affine_cfg.flip
    out = build_augment(affine_cfg)(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
                                    torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (4, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_loader_normalizes_permutes_and_covers_every_image():
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(50)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    loader = DeviceLoader(images, labels, 16, mean, std, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(loader) == 4 and [len(b[1]) for b in batches] == [16, 16, 16, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(50)) and seen.tolist() != list(range(50))
    x, y = batches[0]
    expected = (images[y].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loader.normalize(images[:4].float() / 255), loader.normalize(images[:4]))


def test_zca_whitens_the_training_split():
    from cifarlab.data.splits import channel_stats, zca_matrix

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(4000, 1, 1, 1))
    images = np.clip(base + rng.integers(-20, 21, size=(4000, 2, 3, 3)), 0, 255).astype(np.uint8)  # correlated pixels
    mean, std = channel_stats(images)
    w = zca_matrix(images, mean, std, epsilon=1e-6)
    x = ((images / 255 - np.array(mean).reshape(1, -1, 1, 1)) / np.array(std).reshape(1, -1, 1, 1)).reshape(4000, -1)
    before = np.cov(x, rowvar=False, bias=True)
    after = np.cov(x @ w, rowvar=False, bias=True)
    assert np.abs(before - np.diag(np.diag(before))).max() > 0.5  # strongly correlated to begin with
    np.testing.assert_allclose(after, np.eye(18), atol=2e-3)
    np.testing.assert_allclose(w, w.T, atol=1e-5)  # ZCA (unlike PCA whitening) is symmetric


def test_wrap_moves_outside_points_by_periods_of_size_minus_one():
    # scipy.ndimage's "wrap" (Keras' fill_mode="wrap"): the first and last pixel centers coincide
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    line = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    points = np.array([-9.5, -4.0, -1.0, -0.4, -1e-15, 0.0, 2.25, 4.0, 4 + 1e-15, 4.6, 8.0, 9.0, 13.3])
    expected = scipy_ndimage.map_coordinates(line, [points], order=1, mode="wrap")
    wrapped = wrap_coordinates(torch.from_numpy(points), 5).numpy()
    assert wrapped.min() >= 0 and wrapped.max() <= 4
    np.testing.assert_allclose(np.interp(wrapped, np.arange(5), line), expected, atol=1e-12)
    assert wrap_coordinates(torch.tensor([-3.0, 7.0]), 1).tolist() == [0.0, 0.0]


def test_wrap_fill_takes_the_pixels_from_the_other_side():
    images = numbered_images(n=1, c=1, h=8, w=8)
    out = warp(images, affine(1, shift_x=2), "wrap")[0, 0]
    torch.testing.assert_close(out[:, 2:], images[0, 0, :, :6], atol=1e-6, rtol=0)
    # column 1 samples x = -1: one period (7) on, column 6; column 0 samples x = -2: column 5
    torch.testing.assert_close(out[:, :2], images[0, 0, :, 5:7], atol=1e-6, rtol=0)


def test_zoom_above_one_zooms_out():
    images = torch.ones(1, 1, 9, 9)
    out = warp(images, affine(1, zoom_x=2.0, zoom_y=2.0, h=9, w=9), "constant", 0.0)[0, 0]
    assert out[2:7, 2:7].min() == 1.0 and out[0].max() == 0.0 and out[:, 0].max() == 0.0  # content in the middle
    bigger = warp(images, affine(1, zoom_x=0.5, zoom_y=0.5, h=9, w=9), "constant", 0.0)[0, 0]
    assert bigger.min() == 1.0  # zoom < 1 enlarges: nothing from outside


def test_zoom_pair_draws_inside_it_and_a_number_around_one():
    c = load_config(overrides=["augment.zoom=[1.1,1.4]"]).augment
    p = draw_affine(4000, 8, 8, c, torch.Generator().manual_seed(0), "cpu")
    for key in ("zoom_x", "zoom_y"):
        assert 1.1 <= float(p[key].min()) < 1.12 and 1.38 < float(p[key].max()) <= 1.4
    assert not torch.equal(p["zoom_x"], p["zoom_y"])  # each axis its own draw
    p = draw_affine(4000, 8, 8, load_config(overrides=["augment.zoom=0.25"]).augment, torch.Generator(), "cpu")
    assert 0.75 <= float(p["zoom_x"].min()) < 0.77 and 1.23 < float(p["zoom_x"].max()) <= 1.25


def test_channel_shift_adds_one_value_per_image_inside_its_own_range():
    images = torch.stack([torch.linspace(0.2, 0.6, 3 * 4 * 4).view(3, 4, 4), torch.linspace(0.1, 0.9, 48).view(3, 4, 4)])
    out = shift_channels(images, torch.tensor([0.05, -0.3]))
    torch.testing.assert_close(out[0], (images[0] + 0.05).clamp(0.2, 0.6))
    torch.testing.assert_close(out[1], (images[1] - 0.3).clamp(0.1, 0.9))
    assert out[1].min() == pytest.approx(0.1) and out[0].max() == pytest.approx(0.6)  # the image's bounds, not [0, 1]
