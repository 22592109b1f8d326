"""Multi-scale sliced Wasserstein distance (SWD), as the paper (Karras et al. 2018, section 5) and
the official `metrics/sliced_wasserstein.py` define it, in batched torch:

1. Each image (uint8 values 0..255 as float32) becomes a Laplacian pyramid built with the 5x5
   binomial filter [1, 4, 6, 4, 1]^2 / 256 and mirror borders (cv2.pyrDown/pyrUp), from the image
   resolution down to 16x16; the 16x16 level is the low-pass remainder, the others are band-pass.
   An image below 16x16 gives a single level: the image itself.
2. Each level contributes 128 random 7x7 neighbourhoods per image (7x7x3 = 147 numbers each).
3. Each level's descriptors are normalised per colour channel by the mean and standard deviation
   of that set's own descriptors (real and generated sets separately).
4. Per level, 4 repeats of 128 random unit directions (512 projections); the distance is the mean
   absolute difference of the sorted projections, averaged over the repeats.
5. Reported x 1e3 per level, and their average.

The paper evaluates 16384 images per set (2^21 descriptors per level). The descriptors are held in
host memory: about 1.2 GB per level and per set at 16384 images, as in the official code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

NHOOD_SIZE = 7            # neighbourhood side in pixels
NHOODS_PER_IMAGE = 128    # neighbourhoods drawn per image and level
DIR_REPEATS = 4           # repeats of random directions ...
DIRS_PER_REPEAT = 128     # ... of this many each (512 projections)
LOWEST_LEVEL = 16         # the pyramid stops at 16x16
PAPER_NUM_IMAGES = 16384  # images per set in the paper and the official 'metric-swd-16k'
DIRS_PER_SORT = 32        # directions projected and sorted at once (bounds the memory of a sort)

# the 5x5 binomial filter of cv2.pyrDown / the official gaussian_filter
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
BINOMIAL_5X5 = torch.outer(_BINOMIAL, _BINOMIAL) / 256.0


@dataclass
class SWDResult:
    levels: dict[int, float]  # resolution -> SWD x 1e3, highest resolution first
    avg: float                # mean over the levels

    def to_dict(self) -> dict:
        return {"levels": {str(res): value for res, value in self.levels.items()}, "avg": self.avg}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 0..255, as the official code hands generated images to its
    metrics (x * 127.5 + 127.5, rounded, saturated)."""
    return images.mul(127.5).add_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def pyramid_resolutions(resolution: int) -> list[int]:
    """The pyramid's levels for images of `resolution`: it, halved down to 16 (highest first);
    a single level at the image's own resolution below 16. ValueError below 8x8, where no 7x7
    neighbourhood with a centre away from the border fits."""
    if resolution < NHOOD_SIZE + 1:
        raise ValueError(f"SWD needs images of at least 8x8 for its 7x7 neighbourhoods, not {resolution}x{resolution}")
    levels = [resolution]
    while levels[-1] // 2 >= LOWEST_LEVEL:
        levels.append(levels[-1] // 2)
    return levels


def _filter(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with the symmetric 5x5 `kernel`, mirror borders (scipy's 'mirror'
    is torch's 'reflect': the edge pixel is not repeated)."""
    n, c, h, w = images.shape
    x = F.pad(images.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    return F.conv2d(x, kernel.to(images.device, images.dtype)[None, None]).reshape(n, c, h, w)


def pyr_down(images: torch.Tensor) -> torch.Tensor:
    """Blur, then every second pixel (cv2.pyrDown)."""
    return _filter(images, BINOMIAL_5X5)[:, :, ::2, ::2]


def pyr_up(images: torch.Tensor) -> torch.Tensor:
    """Zeros between the pixels, then blur with 4x the filter (cv2.pyrUp)."""
    n, c, h, w = images.shape
    spread = images.new_zeros(n, c, 2 * h, 2 * w)
    spread[:, :, ::2, ::2] = images
    return _filter(spread, BINOMIAL_5X5 * 4.0)


def laplacian_pyramid(images: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """float32 NCHW images -> `num_levels` levels, highest resolution first: band-pass
    differences, then the low-pass remainder."""
    pyramid = [images.float()]
    for _ in range(1, num_levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])
    return pyramid


def neighbourhoods(level: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """`per_image` random 7x7 neighbourhoods of every image -> (N * per_image, C, 7, 7). Centres
    lie at least 3 pixels from the border (official get_descriptors_for_minibatch). The positions
    come from `generator` (a CPU one), so the same seed picks the same ones on any device."""
    n, c, h, w = level.shape
    half = NHOOD_SIZE // 2
    count = n * per_image
    y = torch.randint(half, h - half, (count, 1, 1, 1), generator=generator).to(level.device)
    x = torch.randint(half, w - half, (count, 1, 1, 1), generator=generator).to(level.device)
    offsets = torch.arange(-half, half + 1, device=level.device)
    image = (torch.arange(count, device=level.device) // per_image).view(count, 1, 1, 1)
    channel = torch.arange(c, device=level.device).view(1, c, 1, 1)
    index = ((image * c + channel) * h + y + offsets.view(1, 1, -1, 1)) * w + x + offsets.view(1, 1, 1, -1)
    return level.reshape(-1)[index]


def normalize_descriptors(descriptors: torch.Tensor) -> torch.Tensor:
    """(N, C, 7, 7) -> (N, C*49), each channel shifted and scaled to mean 0 and standard deviation
    1 over the whole set (population std, as numpy's), in place. A channel without any spread (a
    generator that paints one flat colour) is only shifted: the official code would divide by
    zero there."""
    std, mean = torch.std_mean(descriptors, dim=(0, 2, 3), correction=0, keepdim=True)
    descriptors.sub_(mean).div_(torch.where(std > 0, std, torch.ones_like(std)))
    return descriptors.reshape(descriptors.shape[0], -1)


def random_directions(dims: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(dims, count) random unit vectors, one per column."""
    dirs = torch.randn(dims, count, generator=generator)
    return dirs / dirs.norm(dim=0, keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator,
                       dir_repeats: int = DIR_REPEATS, dirs_per_repeat: int = DIRS_PER_REPEAT) -> float:
    """Sliced Wasserstein distance between two equally large (N, D) descriptor sets: per repeat,
    project both on random unit directions, sort each direction's projections, take the mean
    absolute difference; then the mean over the repeats. Computed on a's device."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"descriptor sets of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    repeats = []
    for _ in range(dir_repeats):
        dirs = random_directions(a.shape[1], dirs_per_repeat, generator).to(a.device)
        total = 0.0
        for part in dirs.split(DIRS_PER_SORT, dim=1):
            # (directions, N): each direction's projections contiguous, which sorts faster
            sorted_a = torch.sort(part.T @ a.T, dim=1).values
            sorted_b = torch.sort(part.T @ b.T, dim=1).values
            total += (sorted_a - sorted_b).abs().sum(dtype=torch.float64).item()
        repeats.append(total / (a.shape[0] * dirs_per_repeat))
    return sum(repeats) / len(repeats)


class DescriptorSet:
    """The neighbourhood descriptors of one image set (the reals, or the generated images), level by
    level, collected batch by batch. Images go in as uint8 NCHW (any device; the pyramid is built
    there), the descriptors are kept in host memory."""

    def __init__(self, resolution: int, seed: int):
        self.resolutions = pyramid_resolutions(resolution)
        self.generator = torch.Generator().manual_seed(seed)
        self.parts: list[list[torch.Tensor]] = [[] for _ in self.resolutions]
        self.num_images = 0

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != self.resolutions[0]:
            raise ValueError(f"expected uint8 NCHW images at {self.resolutions[0]}x{self.resolutions[0]}, "
                             f"got {images.dtype} {tuple(images.shape)}")
        for parts, level in zip(self.parts, laplacian_pyramid(images, len(self.resolutions))):
            parts.append(neighbourhoods(level, NHOODS_PER_IMAGE, self.generator).cpu())
        self.num_images += images.shape[0]

    def finalize(self) -> list[torch.Tensor]:
        """The normalised (N, 147) descriptors of every level; the set is emptied."""
        levels = [normalize_descriptors(torch.cat(parts)) for parts in self.parts]
        self.parts = [[] for _ in self.resolutions]
        return levels


def swd_of_descriptors(real: list[torch.Tensor], fake: list[torch.Tensor], resolutions: list[int], seed: int,
                       device: str | torch.device = "cpu", progress: bool = False) -> SWDResult:
    """SWD x 1e3 per level between two finalised descriptor sets, and their average."""
    generator = torch.Generator().manual_seed(seed)
    levels = {}
    for res, a, b in tqdm(list(zip(resolutions, real, fake)), desc="SWD levels", unit="level",
                          disable=not progress, leave=False):
        levels[res] = 1e3 * sliced_wasserstein(a.to(device), b.to(device), generator)
    return SWDResult(levels, sum(levels.values()) / len(levels))


def descriptors_of(images: torch.Tensor, seed: int, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> DescriptorSet:
    """A DescriptorSet of uint8 NCHW images held in memory, fed in batches."""
    descriptors = DescriptorSet(images.shape[-1], seed)
    for batch in images.split(batch_size):
        descriptors.add(batch.to(device))
    return descriptors


def sliced_wasserstein_distance(reals: torch.Tensor, fakes: torch.Tensor, seed: int = 0,
                                device: str | torch.device = "cpu") -> SWDResult:
    """SWD x 1e3 between two equally large sets of uint8 NCHW images held in memory (use
    `to_uint8` for images in [-1, 1]). The same seed gives the same number."""
    if reals.shape != fakes.shape:
        raise ValueError(f"image sets of different shapes: {tuple(reals.shape)} and {tuple(fakes.shape)}")
    real = descriptors_of(reals, seed, device=device)
    fake = descriptors_of(fakes, seed + 1, device=device)
    return swd_of_descriptors(real.finalize(), fake.finalize(), real.resolutions, seed + 2, device)
