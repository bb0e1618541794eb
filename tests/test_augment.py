import numpy as np
import torch

from cifarlab.data.augment import random_crop, random_hflip
from cifarlab.data.loader import DeviceLoader


def numbered_images(n=6, c=3, h=8, w=8):
    return torch.arange(n * c * h * w, dtype=torch.int64).reshape(n, c, h, w) % 251 + 1


def test_crop_moves_each_image_by_its_drawn_offset():
    images = numbered_images().to(torch.uint8)
    pad = 2
    out = random_crop(images, pad, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 2 * pad + 1, (len(images),), generator=replay)
    dx = torch.randint(0, 2 * pad + 1, (len(images),), generator=replay)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    for i in range(len(images)):
        expected = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        np.testing.assert_array_equal(out[i].numpy(), expected)
        # a shift of (dy - pad, dx - pad): pixel (r, c) of the output is pixel (r + dy - pad, c + dx - pad)
        r, c = 4, 4
        assert out[i, 0, r, c] == images[i, 0, r + dy[i] - pad, c + dx[i] - pad]
    assert len({(int(a), int(b)) for a, b in zip(dy, dx)}) > 1  # per-sample parameters


def test_flip_is_exact_and_per_sample():
    images = numbered_images(n=64)
    out = random_hflip(images, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, i.flip(2))) for o, i in zip(out, images)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


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
