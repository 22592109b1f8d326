"""Training checkpoints for tests, made without Ray or a training run.

`make_checkpoint(directory)` writes the dict `progan.training.run_state.RunState.to_checkpoint` makes (config,
the three networks, progress counters) through `progan.model.checkpoint.save_checkpoint`, for a network
small enough for CPU tests. The EMA generator's weights are the trained G's plus noise, so a test
can tell `--raw` from the default.

    from checkpoints import make_checkpoint
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoint_000001", resolution=16, alpha=0.5)
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The model of tests/conftest.py's tiny_config: 16x16, latent 16, 16 feature maps at most.
TINY_MODEL = ("model.max_resolution=16", "model.latent_size=16", "model.fmap_base=64", "model.fmap_max=16")


def tiny_model_config(*overrides: str):
    from progan.model.config import load_config

    return load_config(REPO / "configs" / "demo.yaml", [*TINY_MODEL, *overrides])


def make_checkpoint(directory: str | Path, resolution: int = 16, alpha: float = 1.0, cfg=None,
                    seed: int = 0, images_seen: int = 640) -> Path:
    """directory/checkpoint.pt of a run that has reached `resolution` with fade-in `alpha`; returns the file."""
    from progan.model.checkpoint import save_checkpoint
    from progan.model.networks import Discriminator, Generator

    cfg = cfg or tiny_model_config()
    m = cfg.model
    torch.manual_seed(seed)  # as progan.training.run_state.build_networks, with the test's seed
    G = Generator(m.max_resolution, m.latent_size, m.fmap_base, m.fmap_max, m.num_channels)
    D = Discriminator(m.max_resolution, m.fmap_base, m.fmap_max, m.num_channels, m.mbstd_group_size)
    G_ema = copy.deepcopy(G)
    with torch.no_grad():  # the EMA differs from G, as it does after any training
        for p in G_ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {
        "config": cfg.to_dict(), "generator": G.state_dict(), "generator_ema": G_ema.state_dict(),
        "discriminator": D.state_dict(), "images_seen": images_seen, "step": images_seen // 16,
        "resolution": resolution, "fading": alpha < 1.0, "alpha": alpha,
    }
    return save_checkpoint(state, directory)
