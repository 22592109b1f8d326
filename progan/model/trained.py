"""A trained generator out of a checkpoint, for evaluation, generation, export and serving.

Knows nothing of Ray or of the training loop: it reads the plain-dict checkpoint
(`progan.model.checkpoint`) and rebuilds the networks from the config stored in it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from base.errors import UserError
from progan.model.checkpoint import CheckpointError, load_resolved
from progan.model.config import Config, config_from_dict
from progan.model.networks import Generator


@dataclass
class TrainedGenerator:
    generator: Generator   # the EMA weights, or the trained G's with raw=True; eval mode, no grad
    resolution: int       # the resolution the run had reached at the checkpoint
    alpha: float          # its fade-in weight there (1.0 in a stable phase)
    images_seen: int
    config: Config
    path: Path            # the checkpoint file

    @property
    def latent_size(self) -> int:
        return self.generator.latent_size

    def check_resolution(self, resolution: int) -> None:
        """UserError in one line unless `resolution` is one the run has trained (4 .. resolution)."""
        trained = [2 ** k for k in range(2, self.resolution.bit_length())]
        if resolution not in trained:
            raise UserError(f"resolution {resolution}: this checkpoint has trained {', '.join(map(str, trained))}")

    def alpha_at(self, resolution: int) -> float:
        """The stage's fade-in weight: the checkpoint's own at its resolution, 1 below it."""
        return self.alpha if resolution == self.resolution else 1.0

    @torch.no_grad()
    def generate(self, latents: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """NCHW images in about [-1, 1] (not clamped) at `resolution` (default: the trained one)."""
        resolution = resolution or self.resolution
        self.check_resolution(resolution)
        device = next(self.generator.parameters()).device
        return self.generator(latents.to(device), resolution, self.alpha_at(resolution))


# The command-line arguments of the tools that load a trained generator (evaluate, generate,
# export, serve): the same meaning and help in each
GENERATOR_ARGS = {
    "--checkpoint": {"required": True, "help": "run folder, checkpoint_* folder or checkpoint.pt"},
    "--resolution": {"type": int, "help": "a resolution the run has trained (default: the checkpoint's)"},
    "--raw": {"action": "store_true", "help": "the trained G's weights instead of the EMA's"},
    "--device": {"default": "auto", "help": "auto (a GPU when there is one), cpu, cuda or cuda:N"},
}


def add_generator_args(parser: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        parser.add_argument(flag, **GENERATOR_ARGS[flag])


def pick_device(name: str = "auto") -> torch.device:
    """--device of the CLIs: auto (the GPU when there is one), cpu, cuda or cuda:N; UserError in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no usable CUDA GPU")
    return device


def load_trained_generator(path: str | Path, raw: bool = False, device: str | torch.device = "cpu") -> TrainedGenerator:
    """`path`: a run folder (its latest checkpoint, the newest that loads completely, as --resume
    takes: checkpoint.latest_checkpoint), a `checkpoint_*` folder or a checkpoint file.
    Raises CheckpointError (one line) for anything that is not a usable checkpoint."""
    state, file = load_resolved(path)
    try:
        cfg = config_from_dict(state["config"])
        m = cfg.model
        G = Generator(m.max_resolution, m.latent_size, m.fmap_base, m.fmap_max, m.num_channels)
        G.load_state_dict(state["generator" if raw else "generator_ema"])
        resolution, alpha, images = int(state["resolution"]), float(state["alpha"]), int(state["images_seen"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {file}: not a training checkpoint of this project "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    G.eval().requires_grad_(False).to(device)
    return TrainedGenerator(G, resolution, alpha, images, cfg, file)
