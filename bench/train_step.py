"""Times one full ProGAN training step at the paper's widths and prints one JSON line.

    python -m bench.train_step --resolution 32 --batch 8 --json [--steps N] [--warmup N]
                               [--alpha A] [--threads T] [--nchw] [--peak-seconds S]
                               [--precision fp32|bf16] [--conv-gradfix]
                               [--max-resolution R] [--latent-size L] [--fmap-base B] [--fmap-max M]
                               [--compare-pro-gan [--peer-path DIR]]

What one step is (ours): `progan.training.training_step.train_step` with `WGANGP` (lambda 10, drift
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
`img_per_s` = batch / step_s. `gflop_per_step` is the floating-point work of one step as torch
executes it, counted once by torch.utils.flop_counter.FlopCounterMode: every convolution and
matrix product the dispatcher runs, forward, backward and the gradient penalty's double backward
(autograd.grad(create_graph=True) runs convolution_backward, and the backward of that runs
further convolution and convolution_backward calls, all counted); `gflop_by_op` splits it by
aten op. Element-wise work (activations, pixel norm, equalised-lr scaling, losses) and Adam are
not counted. `gflop_per_s` = gflop_per_step / step_s.
`peak_gflop_per_s` is the machine's best measured rate on the kernels a step is made of, in the
same run: a 3x3 convolution 512 -> 512 on 32x32 maps, forward alone and forward plus both
gradients (input and weight), each in NCHW and channels-last, and a square fp32 matrix product;
each is sized to take about --peak-seconds per call, its FLOPs are counted by the same
FlopCounterMode, and its time is the median of calls interleaved with the steps, so the load
from other jobs on a shared machine hits both alike; the fastest kernel (`peak_kernel`) is the
peak. `fraction_of_peak` = gflop_per_s / peak_gflop_per_s; it is left out (null, with
`fraction_of_peak_dropped` saying why) if the step ran faster than every measured kernel, since
then the peak measurement, not the step, is wrong.
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
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.common import ADAM, StepSetup, add_width_args, cores, emit, widths

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


def _flops(fn) -> dict[str, int]:
    """FLOPs of one call of fn, by aten op (convolution, convolution_backward, mm, ...)."""
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}


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
        lr, beta1, beta2, eps = ADAM
        self.gen_optim, self.dis_optim = (torch.optim.Adam(net.parameters(), lr=lr, betas=(beta1, beta2), eps=eps)
                                          for net in (self.gan.gen, self.gan.dis))
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


def _conv_kernel(layout: str, backward: bool):
    """3x3 convolution 512 -> 512 on batch x 512 x 32 x 32: forward, or forward + both gradients."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def make(batch: int, device: torch.device):
        x = torch.randn(batch, 512, 32, 32, device=device).contiguous(memory_format=fmt)
        w = (torch.randn(512, 512, 3, 3, device=device) * 0.02).contiguous(memory_format=fmt)
        if not backward:
            return lambda: F.conv2d(x, w, padding=1)
        x.requires_grad_(True)
        w.requires_grad_(True)
        grad_out = torch.ones_like(x)
        return lambda: torch.autograd.grad(F.conv2d(x, w, padding=1), (x, w), grad_out)
    return make


def _gemm(n: int, device: torch.device):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return lambda: torch.mm(a, b)


PEAK_KERNELS = {  # name -> (make(size, device), first size, largest size)
    "conv3x3_512_fwd_nchw": (_conv_kernel("nchw", False), 1, 256),
    "conv3x3_512_fwd_channels_last": (_conv_kernel("channels_last", False), 1, 256),
    "conv3x3_512_fwd_bwd_nchw": (_conv_kernel("nchw", True), 1, 256),
    "conv3x3_512_fwd_bwd_channels_last": (_conv_kernel("channels_last", True), 1, 256),
    "gemm_fp32": (_gemm, 256, 8192),
}


class _Peak:
    """The fastest of PEAK_KERNELS, each sized (its batch or side doubled) until one call takes
    about target_s, timed between the steps."""

    def __init__(self, device: torch.device, target_s: float):
        self.device = device
        self.kernels, self.sizes, self.flop = {}, {}, {}
        for name, (make, size, largest) in PEAK_KERNELS.items():
            run = make(size, device)
            while True:
                run()  # first call of a shape: oneDNN / cuDNN set-up
                if size >= largest or _timed(run, device) >= target_s / 2:
                    break
                size *= 2
                run = make(size, device)
            self.kernels[name], self.sizes[name] = run, size
            self.flop[name] = sum(_flops(run).values())
        self.times: dict[str, list[float]] = {name: [] for name in self.kernels}

    def measure(self) -> None:
        for name, run in self.kernels.items():
            self.times[name].append(_timed(run, self.device))

    def rates(self) -> dict[str, float]:
        """GFLOP/s of each kernel, from its median time."""
        return {name: self.flop[name] / statistics.median(t) / 1e9 for name, t in self.times.items()}


def _fraction(gflop_per_s: float, peak: float) -> dict:
    if gflop_per_s > peak:
        return {"fraction_of_peak": None, "fraction_of_peak_dropped":
                f"{gflop_per_s:.1f} GFLOP/s is above every measured kernel's rate: the peak is wrong"}
    return {"fraction_of_peak": round(gflop_per_s / peak, 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--alpha", type=float, default=1.0, help="fade-in alpha, fixed for the run")
    ap.add_argument("--threads", type=int, default=cores(),
                    help="torch.set_num_threads (default: the cores this process may use)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--peak-seconds", type=float, default=0.1,
                    help="about how long one call of each peak kernel takes (its size is grown to it)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="model.precision of our step")
    ap.add_argument("--conv-gradfix", action="store_true", help="model.conv_gradfix (CUDA only)")
    ap.add_argument("--nchw", action="store_true",
                    help="our networks in NCHW layout (default: channels-last, as model.channels_last)")
    add_width_args(ap)
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
    nets = widths(args)
    ours = StepSetup(args.resolution, args.batch, args.alpha, device, channels_last=not args.nchw, widths=nets,
                     precision=args.precision, conv_gradfix=args.conv_gradfix)
    runners = {"ours": ours.step}
    if args.compare_pro_gan:
        peer = _Peer(args.resolution, args.batch, args.alpha, device, ours.reals, args.peer_path)
        runners["pro_gan"] = peer.step

    for step in runners.values():
        for _ in range(args.warmup):
            step()
    flops = {name: _flops(step) for name, step in runners.items()}
    peak = _Peak(device, args.peak_seconds)

    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for i in range(args.steps):
        for name in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
            times[name].append(_timed(runners[name], device))
        peak.measure()

    rates = peak.rates()
    peak_kernel = max(rates, key=rates.get)
    out = {
        "bench": "train_step", "resolution": args.resolution, "batch": args.batch, "alpha": args.alpha,
        "device": str(device), "threads": torch.get_num_threads(), "channels_last": not args.nchw,
        "precision": args.precision, "conv_gradfix": args.conv_gradfix,
        **nets, "steps": args.steps, "warmup": args.warmup,
        **_figures("", times["ours"], flops["ours"], args.batch, rates[peak_kernel]),
        "gflop_by_op": {op: round(n / 1e9, 3) for op, n in flops["ours"].items()},
        "peak_gflop_per_s": round(rates[peak_kernel], 2),
        "peak_kernel": f"{peak_kernel} (size {peak.sizes[peak_kernel]})",
        "kernel_gflop_per_s": {name: round(rate, 2) for name, rate in rates.items()},
        "torch": torch.__version__,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if args.compare_pro_gan:
        out.update({
            "pro_gan_version": peer.version,
            **_figures("pro_gan_", times["pro_gan"], flops["pro_gan"], args.batch, rates[peak_kernel]),
            "speedup": round(statistics.median(times["pro_gan"]) / statistics.median(times["ours"]), 3),
            "speedup_paired": round(statistics.median(p / o for p, o in zip(times["pro_gan"], times["ours"])), 3),
        })
    emit(out, args.json)
    return out


def _figures(prefix: str, times: list[float], flops: dict[str, int], batch: int, peak: float) -> dict:
    """step_s, img_per_s, GFLOP per step and per second, share of the peak; names after `prefix`."""
    step_s = statistics.median(times)
    gflop = sum(flops.values()) / 1e9
    figures = {"step_s": round(step_s, 5), "step_s_min": round(min(times), 5),
               "img_per_s": round(batch / step_s, 2), "gflop_per_step": round(gflop, 3),
               "gflop_per_s": round(gflop / step_s, 2), **_fraction(gflop / step_s, peak)}
    return {prefix + key: value for key, value in figures.items()}


if __name__ == "__main__":
    main()
