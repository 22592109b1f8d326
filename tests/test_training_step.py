"""A short single-process CPU training at 8x8 on real faces: does G move towards the data?

Measure: the per-pixel mean image and per-pixel stddev image of 256 generated samples against
those of the real images (8x8x3 each); the distance is the L2 norm of both differences added.
An untrained G gives near-constant grey images, far from the faces' skin-toned mean and their
spread; after 200 steps the distance must drop to under half.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan.losses import WGANGP
from progan.networks import Discriminator, Generator
from progan.training_step import fade_reals, make_optimizer, train_step


def load_faces(folder: Path, count: int, size: int) -> torch.Tensor:
    images = []
    for path in sorted(folder.glob("*.jpg"))[:count]:
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        images.append(np.asarray(img))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def distance_to_reals(fakes: torch.Tensor, reals: torch.Tensor) -> float:
    return ((fakes.mean(0) - reals.mean(0)).norm() + (fakes.std(0) - reals.std(0)).norm()).item()


def test_short_training_at_8x8_moves_generator_towards_faces(faces_dir):
    torch.manual_seed(0)
    reals = load_faces(faces_dir / "aligned", 256, 8)
    G = Generator(max_resolution=8, latent_size=64, fmap_base=256, fmap_max=32)
    D = Discriminator(max_resolution=8, fmap_base=256, fmap_max=32)
    opt_g, opt_d = (make_optimizer(m, 0.001, 0.0, 0.99, 1e-8) for m in (G, D))
    loss = WGANGP()
    z_eval = torch.randn(256, 64)
    with torch.no_grad():
        before = distance_to_reals(G(z_eval, 8), reals)
    for step in range(200):
        batch = reals[torch.randint(0, len(reals), (16,))]
        alpha = min(1.0, step / 50)  # fade 8x8 in over the first 50 steps, then stable
        stats = train_step(G, D, D, opt_g, opt_d, loss, fade_reals(batch, alpha), 8, alpha, 64)
        assert all(torch.isfinite(stats[k]) for k in ("loss_d", "loss_g", "grad_penalty"))
    with torch.no_grad():
        after = distance_to_reals(G(z_eval, 8), reals)
    print(f"distance to real statistics: before {before:.3f}, after {after:.3f}")
    assert after < 0.5 * before, (before, after)


def test_fade_reals_blends_the_half_resolution_image():
    x = torch.randn(2, 3, 8, 8)
    low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2)
    torch.testing.assert_close(fade_reals(x, 0.0), low)
    torch.testing.assert_close(fade_reals(x, 0.25), low + 0.25 * (x - low))
    assert fade_reals(x, 1.0) is x
