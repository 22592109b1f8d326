"""What the benchmarks share: one training step set up as the training loop runs it, and the
JSON-line output."""
from __future__ import annotations

import json
import os

import torch

from progan.model import conv2d_gradfix
from progan.model.losses import WGANGP
from progan.model.networks import Discriminator, Generator, set_trainable
from progan.model.layers import fade_reals
from progan.training.training_step import make_optimizer, memory_format, train_step

# The paper's Adam (lr, beta1, beta2, eps), as configs/paper_celeba.yaml sets it.
ADAM = (0.001, 0.0, 0.99, 1e-8)


def cores() -> int:
    """The cores this process may use (torch's default thread count may differ)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class StepSetup:
    """G, D, their Adams and WGAN-GP at one resolution, the layers above it frozen as the training
    loop freezes them, and a fixed batch of random reals; `step()` is one `train_step` (critic
    then generator), with `fade_reals` inside it during a fade-in (alpha < 1).

    `widths`: Generator keyword arguments (max_resolution, latent_size, fmap_base, fmap_max; the
    Discriminator takes the same less latent_size); empty: the paper's networks. `precision`:
    model.precision (fp32 | bf16); `conv_gradfix`: model.conv_gradfix (on CUDA)."""

    def __init__(self, resolution: int, batch: int, alpha: float = 1.0, device: str | torch.device = "cpu",
                 channels_last: bool = True, widths: dict | None = None, precision: str = "fp32",
                 conv_gradfix: bool = False):
        widths = dict(widths or {})
        d_widths = {k: v for k, v in widths.items() if k != "latent_size"}
        layout = memory_format(channels_last)
        if torch.device(device).type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes are fixed within a phase: autotune each conv once
        conv2d_gradfix.use_on_cuda(conv_gradfix)
        torch.manual_seed(0)
        self.G = Generator(**widths).to(device, memory_format=layout)
        self.D = Discriminator(**d_widths).to(device, memory_format=layout)
        fading = alpha < 1.0 and resolution > 4
        set_trainable(self.G, resolution, fading)
        set_trainable(self.D, resolution, fading)
        self.opt_g, self.opt_d = (make_optimizer(net, *ADAM) for net in (self.G, self.D))
        self.loss = WGANGP()
        self.resolution, self.alpha, self.precision = resolution, alpha, precision
        self.reals = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1

    def step(self) -> dict:
        reals = fade_reals(self.reals, self.alpha)
        return train_step(self.G, self.D, self.D, self.opt_g, self.opt_d, self.loss, reals,
                          self.resolution, self.alpha, self.G.latent_size, precision=self.precision)


def emit(result: dict, as_json: bool = True) -> None:
    """One JSON line on stdout (what `make bench` and bench/table.py read), or key: value lines."""
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")


def add_width_args(parser) -> None:
    """--max-resolution, --latent-size, --fmap-base, --fmap-max: the networks' model.* fields
    (defaults: the paper's; configs/demo.yaml's are 32, 128, 512, 128)."""
    for flag, default in (("--max-resolution", 1024), ("--latent-size", 512), ("--fmap-base", 8192),
                          ("--fmap-max", 512)):
        parser.add_argument(flag, type=int, default=default, help=f"model.{flag[2:].replace('-', '_')}")


def widths(args) -> dict:
    """The networks' keyword arguments from add_width_args' flags."""
    return {"max_resolution": args.max_resolution, "latent_size": args.latent_size,
            "fmap_base": args.fmap_base, "fmap_max": args.fmap_max}


# A reference, not a measurement: the order of one ProGAN training step at 128x128 on a current
# data-centre GPU (tens of milliseconds); its low end, so shares of it err on the large side.
# Used where a CPU-only machine must say what a cost means beside a GPU step.
GPU_STEP_MS_REFERENCE = 20.0
