"""Times a 3x3 convolution's forward + backward (input and weight gradients) by F.conv2d's direct
kernels and by Winograd F(2x2, 3x3) (progan/winograd.py), one JSON line per shape: the figures
behind winograd.MIN_CHANNELS and MIN_TILES.

    python -m bench.conv [--threads T] [--repeats N] [--shape N,C,H ...]

Inputs and weights are channels-last, as in training; each time is the best of three medians of
--repeats calls. `uses_winograd` says whether the networks would take the Winograd path there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from progan.winograd import winograd_conv3x3, winograd_pays

# (batch, channels, map size): the paper's widths at small maps and batches, and the demo's
DEFAULT_SHAPES = ["32,512,8", "32,512,4", "8,512,8", "4,512,8", "4,512,4", "2,512,16", "8,512,32",
                  "16,256,8", "4,256,16", "8,128,8", "8,64,32"]


def _fwd_bwd_seconds(conv, x: torch.Tensor, w: torch.Tensor, repeats: int) -> float:
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def once():
        y = conv(x, w)
        y.backward(torch.ones_like(y))

    once()
    medians = []
    for _ in range(3):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, c, s = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected batch,channels,size, e.g. 32,512,8") from None
    if min(n, c, s) < 1 or s % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive numbers and an even size")
    return n, c, s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shape", nargs="*", type=_shape, default=[_shape(s) for s in DEFAULT_SHAPES],
                    help="batch,channels,size (size even)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for n, c, s in args.shape:
        x = torch.randn(n, c, s, s).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(c, c, 3, 3) * 0.02).contiguous(memory_format=torch.channels_last)
        direct = _fwd_bwd_seconds(lambda a, b: F.conv2d(a, b, padding=1), x, w, args.repeats)
        winograd = _fwd_bwd_seconds(winograd_conv3x3, x, w, args.repeats)
        print(json.dumps({"batch": n, "channels": c, "size": s, "threads": args.threads,
                          "direct_ms": round(direct * 1e3, 2), "winograd_ms": round(winograd * 1e3, 2),
                          "speedup": round(direct / winograd, 2),
                          "uses_winograd": winograd_pays(x, w, padding=1)}), flush=True)


if __name__ == "__main__":
    main()
