"""A short single-process CPU training at 8x8 on real faces: does G move towards the data?

Measure: the per-pixel mean image and per-pixel stddev image of 256 generated samples against
those of the real images (8x8x3 each); the distance is the L2 norm of both differences added.
An untrained G gives near-constant grey images, far from the faces' skin-toned mean and their
spread; after 200 steps the distance must drop to under half.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from base.ports import free_port
from progan.model.losses import WGANGP
from progan.model.networks import Discriminator, Generator
from progan.training.phase_training import wrap_for_phase
from progan.training.run_state import weights_digest
from progan.model.layers import fade_reals
from progan.training.training_step import make_optimizer, train_step


def load_faces(folder: Path, count: int, size: int) -> torch.Tensor:
    images = []
    for path in sorted(folder.glob("*.jpg"))[:count]:
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        images.append(np.asarray(img))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def distance_to_reals(fakes: torch.Tensor, reals: torch.Tensor) -> float:
    return ((fakes.mean(0) - reals.mean(0)).norm() + (fakes.std(0) - reals.std(0)).norm()).item()


def test_short_training_at_8x8_moves_generator_towards_faces(faces_dir):
    torch.manual_seed(0)
    reals = load_faces(faces_dir / "aligned", 256, 8)
    G = Generator(max_resolution=8, latent_size=64, fmap_base=256, fmap_max=32)
    D = Discriminator(max_resolution=8, fmap_base=256, fmap_max=32)
    opt_g, opt_d = (make_optimizer(m, 0.001, 0.0, 0.99, 1e-8) for m in (G, D))
    loss = WGANGP()
    z_eval = torch.randn(256, 64)
    with torch.no_grad():
        before = distance_to_reals(G(z_eval, 8), reals)
    for step in range(200):
        batch = reals[torch.randint(0, len(reals), (16,))]
        alpha = min(1.0, step / 50)  # fade 8x8 in over the first 50 steps, then stable
        stats = train_step(G, D, D, opt_g, opt_d, loss, fade_reals(batch, alpha), 8, alpha, 64)
        assert all(torch.isfinite(stats[k]) for k in ("loss_d", "loss_g", "grad_penalty"))
    with torch.no_grad():
        after = distance_to_reals(G(z_eval, 8), reals)
    print(f"distance to real statistics: before {before:.3f}, after {after:.3f}")
    assert after < 0.5 * before, (before, after)


def test_fade_reals_blends_the_half_resolution_image():
    x = torch.randn(2, 3, 8, 8)
    low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2)
    torch.testing.assert_close(fade_reals(x, 0.0), low)
    torch.testing.assert_close(fade_reals(x, 0.25), low + 0.25 * (x - low))
    assert fade_reals(x, 1.0) is x


def tiny_pair(resolution: int, seed: int = 0) -> tuple[Generator, Discriminator]:
    torch.manual_seed(seed)
    return (Generator(max_resolution=resolution, latent_size=32, fmap_base=128, fmap_max=32),
            Discriminator(max_resolution=resolution, fmap_base=128, fmap_max=32))


def steps_in(precision: str, reals: torch.Tensor, resolution: int, alpha: float, steps: int) -> list[dict]:
    """`steps` training steps from the same initial weights and the same random draws."""
    G, D = tiny_pair(resolution)
    opt_g, opt_d = (make_optimizer(m, 0.001, 0.0, 0.99, 1e-8) for m in (G, D))
    torch.manual_seed(1)
    out = [train_step(G, D, D, opt_g, opt_d, WGANGP(), fade_reals(reals, alpha), resolution, alpha, 32,
                      precision=precision) for _ in range(steps)]
    assert all(p.dtype == torch.float32 for p in (*G.parameters(), *D.parameters()))
    assert all(v.dtype == torch.float32 for state in opt_d.state.values() for v in state.values())
    return out


@pytest.mark.parametrize("resolution, alpha", [(8, 0.5), (16, 1.0)])
def test_bf16_steps_are_finite_and_close_to_fp32(faces_dir, resolution, alpha):
    """bf16 autocasts the networks' forward passes (the penalty's double backward included): the
    losses stay finite and fp32, and the first step's penalty (same weights, same draws) is
    within a few percent of fp32's but not equal to it (so the forward really ran in bf16)."""
    reals = load_faces(faces_dir / "aligned", 16, resolution)
    fp32, bf16 = (steps_in(p, reals, resolution, alpha, steps=3) for p in ("fp32", "bf16"))
    for stats in bf16:
        assert all(torch.isfinite(stats[k]) and stats[k].dtype == torch.float32
                   for k in ("loss_d", "loss_g", "grad_penalty", "grad_norm"))
    first32, first16 = fp32[0]["grad_penalty"].item(), bf16[0]["grad_penalty"].item()
    assert first16 != first32
    assert first16 == pytest.approx(first32, rel=0.05)
    assert bf16[0]["grad_norm"].item() == pytest.approx(fp32[0]["grad_norm"].item(), rel=0.05)


def test_unknown_precision_is_refused():
    G, D = tiny_pair(8)
    with pytest.raises(ValueError, match="precision: got 'fp16'"):
        train_step(G, D, D, None, None, WGANGP(), torch.zeros(4, 3, 8, 8), 8, 1.0, 32, precision="fp16")


def _bf16_ddp_rank(rank: int, world: int, port: int, reals: torch.Tensor, out: str) -> None:
    """One rank of a two-process gloo group: the loop's DDP wrapping of an 8x8 fade-in, three bf16
    steps on this rank's half of the batch (own latents), then the digest of every parameter."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        G, D = tiny_pair(8)
        G_ddp, D_ddp = wrap_for_phase(G, D, 8, True, torch.device("cpu"))
        opt_g, opt_d = (make_optimizer(m, 0.001, 0.0, 0.99, 1e-8) for m in (G, D))
        torch.manual_seed(100 + rank)
        share = reals.chunk(world)[rank]
        for _ in range(3):
            stats = train_step(G_ddp, D_ddp, D, opt_g, opt_d, WGANGP(), fade_reals(share, 0.5), 8, 0.5, 32,
                               precision="bf16")
            assert torch.isfinite(stats["loss_d"]) and torch.isfinite(stats["loss_g"])
        Path(out, f"rank{rank}").write_text(weights_digest(G, D))
    finally:
        dist.destroy_process_group()


def test_bf16_ddp_ranks_stay_bit_identical(faces_dir, tmp_path):
    reals = load_faces(faces_dir / "aligned", 16, 8)
    G, D = tiny_pair(8)
    before = weights_digest(G, D)
    mp.spawn(_bf16_ddp_rank, args=(2, free_port(), reals, str(tmp_path)), nprocs=2, join=True)
    digests = [(tmp_path / f"rank{rank}").read_text() for rank in range(2)]
    assert digests[0] == digests[1] != before
