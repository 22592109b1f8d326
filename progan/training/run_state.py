"""What a run is on one worker at one moment: the networks, the generator's moving average and
the counters, and the plain dict a checkpoint holds of them (with the optimisers and every
rank's random streams). No collectives here: the loop gathers what comes from other ranks."""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from progan.model.config import Config
from progan.model.ema import make_ema
from progan.model.networks import Discriminator, Generator
from progan.model.schedule import Phase
from progan.training.training_step import memory_format


def build_networks(cfg: Config) -> tuple[Generator, Discriminator]:
    m = cfg.model
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    G = Generator(m.max_resolution, m.latent_size, m.fmap_base, m.fmap_max, m.num_channels)
    D = Discriminator(m.max_resolution, m.fmap_base, m.fmap_max, m.num_channels, m.mbstd_group_size)
    return G, D


def weights_digest(*modules: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal digests on all ranks mean bit-identical weights."""
    h = hashlib.sha1()
    for module in modules:
        for p in module.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's CPU generator state, and CUDA's when training on a GPU (latents and
    penalty mixes are drawn there)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_rng(state: dict, rank: int, world: int, device: torch.device) -> bool:
    """Puts back this rank's generator states from a checkpoint of the same world size (False
    for another size). Checkpoints of CPU training hold no CUDA states, older ones no list."""
    cpu_states, cuda_states = state["rng_states"], state.get("cuda_rng_states")
    if len(cpu_states) != world:
        return False
    torch.set_rng_state(cpu_states[rank])
    if device.type == "cuda" and cuda_states and cuda_states[rank] is not None:
        torch.cuda.set_rng_state(cuda_states[rank], device)
    return True


@dataclasses.dataclass
class SavedOptimizers:
    """Adam's state from a checkpoint, for the first phase the resumed loop enters."""
    phase_index: int
    g: dict
    d: dict


class RunState:
    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.G, self.D = build_networks(cfg)
        for net in (self.G, self.D):
            net.to(device, memory_format=memory_format(cfg.model.channels_last))
        self.G_ema = make_ema(self.G)
        self.images_seen = self.step = 0

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000.0

    def to_checkpoint(self, phase: Phase, alpha: float, opt_g, opt_d, rng_states: list) -> dict:
        """`rng_states`: every rank's (CPU, CUDA or None) generator states, in rank order."""
        return {
            "config": self.cfg.to_dict(),
            "generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
            "generator_ema": self.G_ema.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "images_seen": self.images_seen, "step": self.step,
            "phase_index": phase.index, "resolution": phase.resolution, "fading": phase.fading, "alpha": alpha,
            "rng_states": [cpu for cpu, _ in rng_states], "cuda_rng_states": [cuda for _, cuda in rng_states],
            "world_size": len(rng_states),
        }

    def load(self, state: dict, rank: int, world: int) -> SavedOptimizers:
        """Weights, counters and this rank's random streams from a checkpoint. At the same world
        size every rank continues its own streams; at another they are seeded afresh from the
        images seen (a different but reproducible continuation)."""
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        self.G_ema.load_state_dict(state["generator_ema"])
        self.images_seen, self.step = state["images_seen"], state["step"]
        if not restore_rng(state, rank, world, self.device):
            self.seed_rank(rank)
        return SavedOptimizers(state["phase_index"], state["opt_g"], state["opt_d"])

    def seed_rank(self, rank: int) -> None:
        """Each rank's own stream of latents and penalty mixes, from the seed and the images seen."""
        torch.manual_seed(self.cfg.seed * 1000 + 1 + rank + self.images_seen)
