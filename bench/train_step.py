"""Times one full ProGAN training step at the paper's widths and prints one JSON line.

    python -m bench.train_step --resolution 32 --batch 8 --json [--steps N] [--warmup N]
                               [--alpha A] [--threads T] [--nchw]
                               [--max-resolution R] [--latent-size L] [--fmap-base B] [--fmap-max M]
                               [--compare-pro-gan [--peer-path DIR]]

What one step is (ours): `progan.training_step.train_step` with `WGANGP` (lambda 10, drift
0.001) and Adam(lr 0.001, betas (0, 0.99), eps 1e-8) for both networks: a critic step (G
forward without grad, D on reals, D on fakes, D on the interpolates with the input-gradient
penalty, backward, Adam) then a generator step (G forward, D with its parameters frozen,
backward, Adam). The networks are `Generator()` / `Discriminator()` at their defaults
(max_resolution 1024, latent 512, fmap_base 8192, fmap_max 512; --max-resolution,
--latent-size, --fmap-base and --fmap-max set them as the model.* fields do, e.g. 32, 128, 512,
128 for configs/demo.yaml), in channels-last layout as
the training loop puts them (model.channels_last; --nchw for the other); only the layers up to
--resolution run, and `set_trainable` restricts gradients to them as the training loop does.
The reals are a fixed batch of random images; during a fade-in (--alpha < 1) `fade_reals`
runs inside the timed step. The step runs on cuda when available, else on the CPU with
torch.set_num_threads(--threads, default: the cores this process may use).

Numbers: `step_s` is the median wall time of --steps timed steps after --warmup untimed ones,
`img_per_s` = batch / step_s. `gflop_per_s` is the floating-point work of one step, counted
once by torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls and their backward
and double-backward passes; element-wise work and Adam are not counted), divided by step_s.
`peak_gflop_per_s` is the machine's convolution throughput measured in the same run: a
forward-only 3x3 convolution 512 -> 512 channels on 32x32 maps (--peak-batch, default 8: about
0.2 s on two idle Zen 4 cores; 0 searches for a batch taking ~0.2 s), in both NCHW and
channels-last layouts, whichever is faster; its FLOPs also come from FlopCounterMode and its
time is the median of calls interleaved with the steps, so the load from other jobs on a
shared machine hits both alike. `fraction_of_peak` is gflop_per_s / peak_gflop_per_s.
(FlopCounterMode's per-module tracker is swapped for a stub that counts the total only: its
hooks make autograd.grad on the penalty's leaf input raise.) `loadavg_1min` is the machine's
load average before and after the timed steps.

How the peer is measured (--compare-pro-gan): the `pro-gan-pth` 3.4 package (akanimax's
pro_gan_pytorch) is imported from --peer-path (default /tmp/progan_peer; install it there with
the pip command printed when it is missing; it is not a project dependency). Its networks are
built as `Generator(depth=log2(R), latent_size=512, use_eql=True)` and
`Discriminator(depth=log2(R), latent_size=512, use_eql=True)`: in that package depth d means
2**d x 2**d images (depth 2 is 4x4), and its default fmap_base 16384 gives 512 channels at every
resolution up to 64x64, the same as the paper's 512 up to 32x32. They are wrapped in its own
`ProGAN(gen, dis, device, use_ema=False)` and one step is exactly what its training loop does per
batch with batch_repeats=1, less the EMA update (our step has none either): fresh latents,
`ProGAN.optimize_discriminator(WganGP(), dis_optim, noise, reals, depth, alpha)` then
`ProGAN.optimize_generator(WganGP(), gen_optim, noise, reals, depth, alpha)`, with Adam set up
as its `ProGAN.train` sets it (betas (0, 0.99), eps 1e-8; lr 0.001 like ours). Two shims let
the 2021 code run on this torch without changing what it computes: the betas are passed as
floats (this Adam refuses the int 0 next to 0.99), and its EqualizedConvTranspose2d's call of
`_output_padding` gets the `num_spatial_dims` argument newer torch requires. Those methods
include what the package always does: the real-batch downsample/fade, the NaN/Inf check of every
gradient before each optimiser step, `.item()` of the loss, critic weight gradients during the
generator step, and the fade-in branches of both networks even at alpha 1. The reals are the
same tensor as ours at full resolution (its downsample factor is 1), the alpha is the same
(fixed), and so are batch, threads and device. Ours and the peer alternate step by step in
this one process (ours, peer, peak conv, peer, ours, peak conv, ...) and each side's median
is taken;
`speedup` = img_per_s / pro_gan_img_per_s, and `speedup_paired` is the median over rounds of
the peer's step time over ours in the same round.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from progan.losses import WGANGP
from progan.networks import Discriminator, Generator, set_trainable
from progan.training_step import fade_reals, make_optimizer, memory_format, train_step

PEER_PIP = (".venv/bin/pip install --no-deps --target {path} pro-gan-pth==3.4 "
            "tensorboard==2.21.0 absl-py==2.5.1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks make
    autograd.grad on a leaf (the gradient penalty's input) raise; only the total is needed."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return counter.get_total_flops()


class _Ours:
    name = "ours"

    def __init__(self, resolution: int, batch: int, alpha: float, device: torch.device,
                 reals: torch.Tensor, channels_last: bool = True, widths: dict | None = None):
        """`widths`: Generator/Discriminator keyword arguments (max_resolution, fmap_base, ...)."""
        widths = widths or {}
        d_widths = {k: v for k, v in widths.items() if k != "latent_size"}
        self.G = Generator(**widths).to(device, memory_format=memory_format(channels_last))
        self.D = Discriminator(**d_widths).to(device, memory_format=memory_format(channels_last))
        fading = alpha < 1.0 and resolution > 4
        set_trainable(self.G, resolution, fading)
        set_trainable(self.D, resolution, fading)
        self.opt_g = make_optimizer(self.G, 0.001, 0.0, 0.99, 1e-8)
        self.opt_d = make_optimizer(self.D, 0.001, 0.0, 0.99, 1e-8)
        self.loss = WGANGP()
        self.resolution, self.alpha, self.reals = resolution, alpha, reals
        self.latent_size = self.G.latent_size

    def step(self) -> None:
        reals = fade_reals(self.reals, self.alpha)
        train_step(self.G, self.D, self.D, self.opt_g, self.opt_d, self.loss, reals,
                   self.resolution, self.alpha, self.latent_size)


def _patch_output_padding(cls) -> None:
    """The package's EqualizedConvTranspose2d.forward calls `_output_padding` with the five
    arguments of torch 1.10; later torch added `num_spatial_dims`. Supply it (2): with no
    output_size the answer is the layer's own output_padding, as before. Nothing else changes."""
    base = torch.nn.ConvTranspose2d._output_padding
    if "num_spatial_dims" not in base.__code__.co_varnames or "_compat" in cls.__dict__:
        return

    def _output_padding(self, input, output_size, stride, padding, kernel_size,  # noqa: A002
                        num_spatial_dims=2, dilation=None):
        return base(self, input, output_size, stride, padding, kernel_size, num_spatial_dims, dilation)

    cls._output_padding = _output_padding
    cls._compat = True


class _Peer:
    name = "pro_gan"

    def __init__(self, resolution: int, batch: int, alpha: float, device: torch.device,
                 reals: torch.Tensor, peer_path: str):
        if not os.path.isdir(os.path.join(peer_path, "pro_gan_pytorch")):
            sys.exit(f"--compare-pro-gan: no pro_gan_pytorch under {peer_path}; install it with: "
                     + PEER_PIP.format(path=peer_path))
        sys.path.append(peer_path)  # after the venv's packages, so its copies never shadow ours
        from pro_gan_pytorch import custom_layers
        from pro_gan_pytorch.gan import ProGAN
        from pro_gan_pytorch.losses import WganGP
        from pro_gan_pytorch.networks import Discriminator as PDiscriminator
        from pro_gan_pytorch.networks import Generator as PGenerator

        _patch_output_padding(custom_layers.EqualizedConvTranspose2d)
        self.depth = int(math.log2(resolution))
        gen = PGenerator(depth=self.depth, latent_size=512, use_eql=True)
        dis = PDiscriminator(depth=self.depth, latent_size=512, use_eql=True)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints both networks
            self.gan = ProGAN(gen, dis, device=device, use_ema=False)
        # its ProGAN.train passes betas=(0, 0.99), which this torch's Adam refuses (int and float)
        self.gen_optim = torch.optim.Adam(self.gan.gen.parameters(), lr=0.001, betas=(0.0, 0.99), eps=1e-8)
        self.dis_optim = torch.optim.Adam(self.gan.dis.parameters(), lr=0.001, betas=(0.0, 0.99), eps=1e-8)
        self.loss = WganGP()
        self.alpha, self.reals, self.batch, self.device = alpha, reals, batch, device
        self.latent_size = gen.latent_size
        try:
            from importlib.metadata import version
            self.version = version("pro-gan-pth")
        except Exception:  # noqa: BLE001 - only informative
            self.version = "3.4?"

    def step(self) -> None:
        noise = torch.randn(self.batch, self.latent_size).to(self.device)
        self.gan.optimize_discriminator(self.loss, self.dis_optim, noise, self.reals, self.depth, self.alpha)
        self.gan.optimize_generator(self.loss, self.gen_optim, noise, self.reals, self.depth, self.alpha)


class _PeakConv:
    """Forward 3x3 conv 512 -> 512 on 32x32 maps, the machine's best case for the conv kernels."""

    def __init__(self, device: torch.device, batch: int = 8, target_s: float = 0.2):
        torch.manual_seed(0)
        self.w = torch.randn(512, 512, 3, 3, device=device) * 0.02
        self.b = torch.zeros(512, device=device)
        self.device = device
        if batch <= 0:  # grow the batch until one call takes about target_s
            batch = 1
            while batch < 256:
                x = torch.randn(batch, 512, 32, 32, device=device)
                with torch.no_grad():
                    self._run(x)
                    t = min(_timed(lambda: self._run(x), device) for _ in range(2))
                if t >= target_s / 2:
                    break
                batch = min(256, max(batch * 2, int(batch * target_s / max(t, 1e-6))))
        self.batch = batch
        x = torch.randn(batch, 512, 32, 32, device=device)
        self.inputs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
        with torch.no_grad():
            self.flop = _flops(lambda: self._run(x))
            for x in self.inputs.values():
                self._run(x)  # first call of each layout: oneDNN primitive creation
        self.times: dict[str, list[float]] = {k: [] for k in self.inputs}

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=1)

    def measure(self) -> None:
        with torch.no_grad():
            for layout, x in self.inputs.items():
                self.times[layout].append(_timed(lambda: self._run(x), self.device))

    def result(self) -> tuple[float, str]:
        best = max(self.times, key=lambda k: self.flop / statistics.median(self.times[k]))
        return self.flop / statistics.median(self.times[best]) / 1e9, best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--alpha", type=float, default=1.0, help="fade-in alpha, fixed for the run")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch.set_num_threads (default: the cores this process may use)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--peak-batch", type=int, default=8,
                    help="batch of the peak convolution (8: ~0.2 s on 2 idle Zen 4 cores); 0: find one taking ~0.2 s")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--nchw", action="store_true",
                    help="our networks in NCHW layout (default: channels-last, as model.channels_last)")
    ap.add_argument("--max-resolution", type=int, default=1024, help="model.max_resolution of our networks")
    ap.add_argument("--latent-size", type=int, default=512, help="model.latent_size of our generator")
    ap.add_argument("--fmap-base", type=int, default=8192, help="model.fmap_base of our networks")
    ap.add_argument("--fmap-max", type=int, default=512, help="model.fmap_max of our networks")
    ap.add_argument("--compare-pro-gan", action="store_true",
                    help="also time the pro-gan-pth 3.4 package's step, interleaved with ours")
    ap.add_argument("--peer-path", default="/tmp/progan_peer",
                    help="where pro-gan-pth was pip-installed with --target")
    args = ap.parse_args(argv)
    if args.compare_pro_gan and (args.latent_size, args.fmap_base, args.fmap_max) != (512, 8192, 512):
        ap.error("--compare-pro-gan builds the peer at the paper's widths: leave --latent-size, "
                 "--fmap-base and --fmap-max at their defaults")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    reals = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)

    widths = {"max_resolution": args.max_resolution, "latent_size": args.latent_size,
              "fmap_base": args.fmap_base, "fmap_max": args.fmap_max}
    runners = [_Ours(args.resolution, args.batch, args.alpha, device, reals, channels_last=not args.nchw,
                     widths=widths)]
    if args.compare_pro_gan:
        runners.append(_Peer(args.resolution, args.batch, args.alpha, device, reals, args.peer_path))

    for r in runners:
        for _ in range(args.warmup):
            r.step()
    flops = {r.name: _flops(r.step) for r in runners}
    peak = _PeakConv(device, args.peak_batch)

    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(args.steps):
        for r in (runners if i % 2 == 0 else runners[::-1]):  # alternate who goes first
            times[r.name].append(_timed(r.step, device))
        peak.measure()

    step_s = statistics.median(times["ours"])
    peak_gflop_per_s, peak_layout = peak.result()
    out = {
        "resolution": args.resolution, "batch": args.batch, "alpha": args.alpha,
        "device": str(device), "threads": torch.get_num_threads(), "channels_last": not args.nchw,
        **widths,
        "steps": args.steps, "warmup": args.warmup,
        "step_s": round(step_s, 5), "step_s_min": round(min(times["ours"]), 5),
        "img_per_s": round(args.batch / step_s, 2),
        "gflop_per_step": round(flops["ours"] / 1e9, 3),
        "gflop_per_s": round(flops["ours"] / step_s / 1e9, 2),
        "peak_gflop_per_s": round(peak_gflop_per_s, 2),
        "peak_conv": f"3x3 512->512 on {peak.batch}x512x32x32, forward, {peak_layout}",
        "fraction_of_peak": round(flops["ours"] / step_s / 1e9 / peak_gflop_per_s, 3),
        "torch": torch.__version__,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if args.compare_pro_gan:
        peer = runners[1]
        p_step = statistics.median(times["pro_gan"])
        out.update({
            "pro_gan_version": peer.version,
            "pro_gan_step_s": round(p_step, 5),
            "pro_gan_img_per_s": round(args.batch / p_step, 2),
            "pro_gan_gflop_per_step": round(flops["pro_gan"] / 1e9, 3),
            "pro_gan_step_s_min": round(min(times["pro_gan"]), 5),
            "pro_gan_gflop_per_s": round(flops["pro_gan"] / p_step / 1e9, 2),
            "pro_gan_fraction_of_peak": round(flops["pro_gan"] / p_step / 1e9 / peak_gflop_per_s, 3),
            "speedup": round(p_step / step_s, 3),
            "speedup_paired": round(statistics.median(p / o for p, o in zip(times["pro_gan"], times["ours"])), 3),
        })
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")
    return out


if __name__ == "__main__":
    main()
