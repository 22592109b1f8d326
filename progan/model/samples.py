"""Sample grids from fixed latents, as PNG files a person can look at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from base.storage import atomic_path

MIN_TILE = 64  # small resolutions are enlarged (nearest neighbour) to at least this many pixels


def fixed_latents(count: int, latent_size: int, seed: int = 123) -> torch.Tensor:
    return torch.randn(count, latent_size, generator=torch.Generator().manual_seed(seed))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW floats in [-1, 1] -> NHWC uint8."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def grid_image(images: torch.Tensor, columns: int, min_tile: int = MIN_TILE) -> Image.Image:
    """NCHW floats in [-1, 1] -> one image, `columns` tiles a row; tiles smaller than `min_tile`
    pixels are enlarged by a whole factor (nearest neighbour); min_tile=1 keeps the pixels as they are."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    grid = Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
    scale = max(1, min_tile // h)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


@torch.no_grad()
def write_sample_grid(generator: torch.nn.Module, latents: torch.Tensor, resolution: int, alpha: float,
                      path: str | Path) -> Path:
    """Renders `latents` through `generator` and writes the grid (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(generator.parameters()).device
    images = torch.cat([generator(z.to(device), resolution, alpha) for z in latents.split(64)])
    columns = int(round(len(latents) ** 0.5))
    with atomic_path(path) as temporary:
        grid_image(images, columns).save(temporary, format="PNG")
    return path


def sample_name(resolution: int, images_seen: int) -> str:
    return f"res{resolution:03d}_kimg{images_seen // 1000:05d}.png"
