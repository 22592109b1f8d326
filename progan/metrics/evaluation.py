"""Scoring generated images against real faces batch by batch, as `python -m progan.evaluate`
computes it and the training loop's SWD at each phase's end (`swd_at_phase_end`): the two image
sets (reals from the shards brought to a resolution as training sees them, fakes from a trained
generator), and SWD and FID evaluations fed the same batches."""
from __future__ import annotations

import sys
import time
import zlib
from typing import Iterator

import torch
from tqdm import tqdm


# ---------------------------------------------------------------- the two image sets

def seed_for(seed: int, purpose: str) -> int:
    """A separate, reproducible stream of random numbers per use of the one --seed."""
    return zlib.crc32(f"{seed}/{purpose}".encode())


def eval_batch_size(resolution: int) -> int:
    """The official evaluation minibatch: 8192 // resolution, within 4..256."""
    return max(4, min(256, 8192 // resolution))


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grayscale -> RGB by repeating the channel, as the official evaluation does."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def real_batches(shard_dir: str, resolution: int, mirror: bool, seed: int, batch: int,
                 device: torch.device, alpha: float = 1.0) -> Iterator[torch.Tensor]:
    """Endless uint8 NCHW batches of real faces at `resolution` (faded by `alpha`), on `device`."""
    from data_pipeline.loader import FaceStream, mirror_randomly, to_training_range
    from progan.metrics.swd import to_uint8
    from progan.model.layers import fade_reals

    # the shards are written in content-hash order, already unrelated to the source photos' order;
    # a small buffer is enough mixing and keeps the memory small at large resolutions
    stream = iter(FaceStream(shard_dir, rank=0, world_size=1, seed=seed, shuffle_buffer=256, resolution=resolution))
    flips = torch.Generator().manual_seed(seed_for(seed, "mirror"))
    while True:
        images = torch.stack([next(stream) for _ in range(batch)]).to(device)
        images = to_training_range(images, resolution)
        if mirror:
            images = mirror_randomly(images, flips)
        yield as_rgb(to_uint8(fade_reals(images, alpha)))


def fake_batches(trained, seed: int, batch: int) -> Iterator[torch.Tensor]:
    """Endless uint8 NCHW batches from the generator, latents drawn on the CPU from `seed`."""
    from progan.metrics.swd import to_uint8

    latents = torch.Generator().manual_seed(seed_for(seed, "latents"))
    while True:
        z = torch.randn(batch, trained.latent_size, generator=latents)
        yield as_rgb(to_uint8(trained.generate(z)))


# ---------------------------------------------------------------- metrics fed batch by batch

class SWDEvaluation:
    def __init__(self, resolution: int, num_images: int, seed: int, device: torch.device):
        from progan.metrics.swd import DescriptorSet

        self.num_images, self.seed, self.device = num_images, seed, device
        self.sets = {kind: DescriptorSet(resolution, seed_for(seed, f"swd/{kind}")) for kind in ("reals", "fakes")}

    def add(self, kind: str, images: torch.Tensor) -> None:
        self.sets[kind].add(images)

    def result(self, progress: bool = True) -> dict:
        from progan.metrics.swd import NHOODS_PER_IMAGE, DIR_REPEATS, DIRS_PER_REPEAT, swd_of_descriptors

        real, fake = self.sets["reals"], self.sets["fakes"]
        swd = swd_of_descriptors(real.finalize(), fake.finalize(), real.resolutions,
                                 seed_for(self.seed, "swd/directions"), self.device, progress=progress)
        return {**swd.to_dict(), "unit": "SWD x 1e3", "nhoods_per_image": NHOODS_PER_IMAGE,
                "projections": DIR_REPEATS * DIRS_PER_REPEAT}


class FIDEvaluation:
    def __init__(self, extractor, num_images: int):
        self.extractor, self.num_images = extractor, num_images
        self.features: dict[str, list[torch.Tensor]] = {"reals": [], "fakes": []}

    def add(self, kind: str, images: torch.Tensor) -> None:
        from progan.metrics.fid import inception_features

        self.features[kind].append(inception_features(self.extractor, images))

    def result(self) -> dict:
        from progan.metrics.fid import frechet_distance

        return {"fid": frechet_distance(torch.cat(self.features["reals"]), torch.cat(self.features["fakes"]))}


def feed(evaluations: dict, kind: str, batches: Iterator[torch.Tensor], progress: bool = True) -> None:
    """Hands each evaluation the first `num_images` images of `batches` (one pass for all)."""
    total = max(e.num_images for e in evaluations.values())
    label = "real images" if kind == "reals" else "generated images"
    with tqdm(total=total, desc=label, unit="img", file=sys.stderr, disable=not progress) as bar:
        done = 0
        while done < total:
            images = next(batches)[: total - done]
            for evaluation in evaluations.values():
                wanted = evaluation.num_images - done
                if wanted > 0:
                    evaluation.add(kind, images[:wanted])
            done += images.shape[0]
            bar.update(images.shape[0])


@torch.inference_mode()
def swd_at_phase_end(run, phase, shard_dir: str, num_images: int, run_dir) -> dict | None:
    """The training loop's SWD of its EMA generator (`run`: a progan.training.run_state.RunState) at the
    end of `phase` against the shards, computed as this command computes it, without progress
    bars. `num_images` -1: 4096 on a GPU, 256 on a CPU; 0: off. None where it does not run
    (turned off, or below 8x8, the smallest image the descriptors fit)."""
    from progan.model.trained import TrainedGenerator

    if num_images == -1:
        num_images = 4096 if run.device.type == "cuda" else 256
    if num_images == 0 or phase.resolution < 8:
        return None
    started = time.perf_counter()
    trained = TrainedGenerator(run.G_ema, phase.resolution, 1.0, run.images_seen, run.cfg, run_dir)
    seed, batch = run.cfg.data.seed, eval_batch_size(phase.resolution)
    evaluation = SWDEvaluation(phase.resolution, num_images, seed, run.device)
    feed({"swd": evaluation}, "reals", real_batches(shard_dir, phase.resolution, run.cfg.data.mirror, seed,
                                                    batch, run.device, 1.0), progress=False)
    feed({"swd": evaluation}, "fakes", fake_batches(trained, seed, batch), progress=False)
    result = evaluation.result(progress=False)
    return {"avg": result["avg"], "levels": result["levels"], "num_images": num_images,
            "seconds": round(time.perf_counter() - started, 2)}
