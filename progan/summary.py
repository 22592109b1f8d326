"""`python -m progan.summary --resolution 1024`: a per-layer table of both networks and their totals.

Counts the networks as the paper's Table 2 does: every block up to the resolution and the one
toRGB / fromRGB of that resolution (the others exist only for earlier phases and fade-ins).
"""
from __future__ import annotations

import argparse
import sys

from torch import nn

from base.errors import OneLineParser, UserError, run_cli
from progan.model.networks import Discriminator, Generator, resolutions_up_to

PROG = "python -m progan.summary"


def _rows(net: nn.Module, resolution: int, io_name: str) -> list[tuple[str, str, int]]:
    rows = []
    for name, module in net.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        parts = name.split(".")
        if parts[0] == io_name and parts[1] != str(resolution):
            continue
        if parts[0] == "blocks" and int(parts[1]) > resolution:
            continue
        shape = "x".join(str(d) for d in params[0].shape)
        rows.append((name, f"{type(module).__name__}({shape})", sum(p.numel() for p in params)))
    return rows


def summarize(net: nn.Module, resolution: int, io_name: str, title: str) -> int:
    rows = _rows(net, resolution, io_name)
    width = max(len(r[0]) for r in rows)
    print(f"\n{title} at {resolution}x{resolution}")
    print(f"{'layer':<{width}}  {'type(weight shape)':<34} {'params':>12}")
    for name, kind, n in rows:
        print(f"{name:<{width}}  {kind:<34} {n:>12,}")
    total = sum(r[2] for r in rows)
    print(f"{'total':<{width}}  {'':<34} {total:>12,}  ({total / 1e6:.1f}M)")
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--latent-size", type=int, default=512)
    parser.add_argument("--fmap-base", type=int, default=8192)
    parser.add_argument("--fmap-max", type=int, default=512)
    return parser.parse_args(argv)


def summarize_both(args: argparse.Namespace) -> int:
    if args.resolution not in resolutions_up_to(1024):
        raise UserError(f"--resolution: got {args.resolution}, allowed: a power of two in 4..1024")
    kw = dict(max_resolution=args.resolution, fmap_base=args.fmap_base, fmap_max=args.fmap_max)
    g = summarize(Generator(latent_size=args.latent_size, **kw), args.resolution, "to_rgb", "Generator")
    d = summarize(Discriminator(**kw), args.resolution, "from_rgb", "Discriminator")
    print(f"\nGenerator {g:,} + Discriminator {d:,} = {g + d:,} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: summarize_both(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
