"""Images from a trained checkpoint: python -m progan.generate

    python -m progan.generate --checkpoint CKPT --num 64 --seed 0 --out grid.png
        [--resolution R] [--single DIR] [--truncation PSI] [--raw] [--device auto|cpu|cuda]
    python -m progan.generate --checkpoint CKPT --interpolate [--num 4] [--frames 60] --out walk.gif

--checkpoint is a run folder (its newest checkpoint), a checkpoint_* folder or a checkpoint.pt.
The EMA generator draws by default (--raw: the trained G's weights), at the checkpoint's
resolution and fade-in alpha, or at any lower resolution the run has trained (the generator
as it is now, run up to that stage, alpha 1).

Outputs:
  --out grid.png   one grid of --num images (default 64), about square; tiles under 64 pixels
                   are enlarged (nearest neighbour) so small resolutions stay visible
  --single DIR     one PNG per image at the generator's own pixels, DIR/000000.png, ...
  --interpolate    a looping latent-space walk through --num keyframe latents (default 4):
                   --frames frames (default 60), spherical interpolation (slerp) between
                   consecutive keyframes, back to the first; --out walk.gif is an animated GIF
                   (20 frames/s), --out walk.png a strip of the frames in one row

Latents are drawn from N(0, I) by a generator seeded with --seed: the same seed gives the same
images (on the same device).

Truncation: ProGAN has no mapping network, and its generator first scales every latent to one
fixed length (pixelwise normalisation), so scaling z itself would change nothing. --truncation PSI
instead pulls the output of G's first block (the 4x4 features made from the latent, the nearest
thing to StyleGAN's w) toward their average over 1024 fixed latents:
features = mean + PSI * (features - mean). 1.0 (default) is off; smaller values trade variety
for typical-looking faces; 0 gives the one average face.

Mistakes (a missing or damaged checkpoint, a resolution the run has not trained, an output that
cannot be written, --num outside 1..1024 (a walk: 2..100 keyframes), --frames outside 2..1200)
give one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from base.errors import OneLineParser, UserError, run_cli
from base.storage import atomic_path
from progan.model.samples import fixed_latents, grid_image
from progan.model.trained import TrainedGenerator, add_generator_args, load_trained_generator, pick_device

PROG = "python -m progan.generate"
BATCH = 32                  # latents per forward pass
GIF_FRAME_MS = 50           # 20 frames per second
TRUNCATION_LATENTS = 1024   # latents whose average first-block features --truncation pulls toward
TRUNCATION_SEED = 0x5eed    # fixed, so the average (and so every truncated image) is reproducible
MAX_SEED = 2 ** 63 - 1
# Upper bounds of the counts (every image is held in memory as float32 before it is written, so
# a count without a bound ran on into gigabytes): a 32x32 grid (12.9 GB at 1024x1024, 200 MB at
# 128x128); a walk of one minute at 20 frames/s through up to 100 keyframes
MAX_IMAGES = 1024
MAX_KEYFRAMES = 100
MAX_FRAMES = 1200


# ---------------------------------------------------------------- generation (shared with progan.serve)

def seeded_latents(count: int, latent_size: int, seed: int) -> torch.Tensor:
    """`count` latents from N(0, I), the same for the same seed on any device (drawn on the CPU)."""
    return fixed_latents(count, latent_size, seed)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation between latents a and b (rows) at t in [0, 1]; linear where they
    are (nearly) parallel. Keeps a latent's length about that of a Gaussian sample's."""
    t = torch.as_tensor(t, dtype=a.dtype)
    if t.dim() == 1:
        t = t[:, None]
    cos = ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1, keepdim=True)
    omega = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / safe
    return torch.where(parallel, torch.lerp(a, b, t), spherical)


def walk_latents(keyframes: torch.Tensor, frames: int) -> torch.Tensor:
    """`frames` latents on a closed loop through the keyframes (rows), evenly spaced, each
    segment a slerp; the frame after the last would be the first keyframe again."""
    position = torch.arange(frames, dtype=torch.float64) * len(keyframes) / frames
    index = position.floor().long()
    t = (position - index).to(keyframes.dtype)
    return slerp(keyframes[index], keyframes[(index + 1) % len(keyframes)], t)


_feature_means: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def mean_features(generator: torch.nn.Module) -> torch.Tensor:
    """The average output of G's first block (4x4 features) over fixed latents, once per generator."""
    if generator not in _feature_means:
        device = next(generator.parameters()).device
        z = seeded_latents(TRUNCATION_LATENTS, generator.latent_size, TRUNCATION_SEED)
        first = generator.blocks["4"]
        features = [first(generator.normalize_latent(chunk.to(device))) for chunk in z.split(256)]
        _feature_means[generator] = torch.cat(features).mean(0, keepdim=True)
    return _feature_means[generator]


@contextmanager
def truncated(generator: torch.nn.Module, psi: float) -> Iterator[None]:
    """Within the block, G's first-block features are mean + psi * (features - mean); psi 1 is off."""
    if psi == 1.0:
        yield
        return
    mean = mean_features(generator)
    handle = generator.blocks["4"].register_forward_hook(lambda _m, _in, out: torch.lerp(mean, out, psi))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def render(trained: TrainedGenerator, latents: torch.Tensor, resolution: int | None = None,
           psi: float = 1.0) -> torch.Tensor:
    """NCHW images in [-1, 1] (clamped), on the CPU, at `resolution` (default: the trained one)."""
    resolution = resolution or trained.resolution
    trained.check_resolution(resolution)
    with truncated(trained.generator, psi):
        images = [trained.generate(chunk, resolution).float().clamp(-1, 1).cpu() for chunk in latents.split(BATCH)]
    return torch.cat(images)


def grid_columns(count: int) -> int:
    """About square, as the training sample grids."""
    return max(1, int(round(math.sqrt(count))))


def pixels_image(image: torch.Tensor) -> Image.Image:
    """One CHW image in [-1, 1] at its own pixels."""
    return grid_image(image[None], 1, min_tile=1)


def save_image(image: Image.Image, path: Path, **save_args) -> None:
    """Writes `image` (the format from the suffix) atomically."""
    with atomic_path(path) as temporary:
        image.save(temporary, format=path.suffix[1:].upper(), **save_args)


def save_gif(frames: list[Image.Image], path: Path) -> None:
    save_image(frames[0], path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description="Images, grids and latent walks from a trained checkpoint.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    add_generator_args(p, "--checkpoint")
    p.add_argument("--num", type=int, help=f"images in the grid (default 64, at most {MAX_IMAGES}); "
                                           f"with --interpolate: keyframes (default 4, at most {MAX_KEYFRAMES})")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    p.add_argument("--out", type=Path, help="grid .png; with --interpolate: walk .gif or a .png strip")
    p.add_argument("--single", type=Path, metavar="DIR", help="also (or instead) one PNG per image into DIR")
    add_generator_args(p, "--resolution")
    p.add_argument("--interpolate", action="store_true", help="a looping latent-space walk instead of a grid")
    p.add_argument("--frames", type=int, default=60, help=f"frames of the walk (default 60, at most {MAX_FRAMES})")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI",
                   help="pull first-block features toward their mean: 1 = off (default), 0 = the average face")
    add_generator_args(p, "--raw", "--device")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Mistakes in the arguments alone, before anything is loaded."""
    args.num = args.num if args.num is not None else (4 if args.interpolate else 64)
    if args.num < 1:
        raise UserError(f"--num {args.num}: must be at least 1")
    check_at_most("--num", args.num, MAX_KEYFRAMES if args.interpolate else MAX_IMAGES,
                  "keyframes" if args.interpolate else "images")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed {args.seed}: must be in 0..{MAX_SEED}")
    if not math.isfinite(args.truncation):
        raise UserError(f"--truncation {args.truncation}: must be a finite number (1 = off)")
    if args.interpolate:
        if args.num < 2:
            raise UserError(f"--num {args.num}: a walk needs at least 2 keyframes")
        if args.frames < 2:
            raise UserError(f"--frames {args.frames}: must be at least 2")
        check_at_most("--frames", args.frames, MAX_FRAMES, "frames")
        if args.out is None or args.out.suffix.lower() not in (".gif", ".png"):
            raise UserError("--interpolate needs --out ending .gif (animation) or .png (strip)")
        if args.single is not None:
            raise UserError("--single writes grid images; it does not go with --interpolate")
    else:
        if args.out is None and args.single is None:
            raise UserError("nothing to write: give --out grid.png and/or --single DIR")
        if args.out is not None and args.out.suffix.lower() != ".png":
            raise UserError(f"--out {args.out}: a grid is written as PNG; end the name .png")


def check_at_most(flag: str, value: int, bound: int, what: str) -> None:
    """A count's upper bound: all of them are rendered in memory at once."""
    if value > bound:
        raise UserError(f"{flag} {value}: at most {bound} {what} (all are held in memory at once)")


def prepare_outputs(args: argparse.Namespace) -> None:
    """Creates the output folders and checks they take files, before any image is made."""
    if args.out is not None:
        check_output_file(args.out)
    if args.single is not None:
        make_output_folder(args.single)


def make_output_folder(folder: Path) -> None:
    """Creates `folder` (and those above it) unless it exists; UserError if no files can go there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot write to {folder}: it, or a folder above it, is a file") from None
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write to {folder}: permission denied")


def check_output_file(path: Path) -> None:
    """The folder of an output file exists (made if need be) and takes files; the name is no folder."""
    make_output_folder(path.parent)
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; give a file name")


def write_grid(images: torch.Tensor, path: Path) -> None:
    save_image(grid_image(images, grid_columns(len(images))), path)


def write_singles(images: torch.Tensor, folder: Path) -> list[Path]:
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:06d}.png")
        save_image(pixels_image(image), paths[-1])
    return paths


def write_walk(frames: torch.Tensor, path: Path) -> None:
    if path.suffix.lower() == ".gif":
        save_gif([grid_image(frame[None], 1) for frame in frames], path)
    else:
        save_image(grid_image(frames, len(frames)), path)


def generate(args: argparse.Namespace) -> list[Path]:
    check_args(args)
    device = pick_device(args.device)
    trained = load_trained_generator(args.checkpoint, raw=args.raw, device=device)
    resolution = args.resolution or trained.resolution
    trained.check_resolution(resolution)
    prepare_outputs(args)
    latents = seeded_latents(args.num, trained.latent_size, args.seed)
    written = []
    try:
        if args.interpolate:
            write_walk(render(trained, walk_latents(latents, args.frames), resolution, args.truncation), args.out)
            return [args.out]
        images = render(trained, latents, resolution, args.truncation)
        if args.out is not None:
            write_grid(images, args.out)
            written.append(args.out)
        if args.single is not None:
            written += write_singles(images, args.single)
    except OSError as exc:
        raise UserError(f"cannot write {exc.filename or 'the output'}: {exc.strerror or exc}") from None
    return written


def generate_and_report(args: argparse.Namespace) -> int:
    written = generate(args)
    shown = written if len(written) <= 2 else [written[0], f"... {len(written) - 1} more"]
    print("wrote " + ", ".join(map(str, shown)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: generate_and_report(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
