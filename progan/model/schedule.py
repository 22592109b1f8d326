"""Images seen -> resolution, phase, fade-in alpha, global minibatch and learning rate.

The official schedule (TrainingSchedule in tkarras/progressive_growing_of_gans): the start
resolution trains alone for `stabilize_kimg`, then each new resolution fades in over
`fade_kimg` (alpha rising linearly with images seen) and stabilises for `stabilize_kimg`. The
last resolution keeps training until `total_kimg`. Minibatch and learning rate are keyed by the
new resolution, already during its fade-in.
"""
from __future__ import annotations

from dataclasses import dataclass

from progan.model.config import Config


@dataclass(frozen=True)
class Phase:
    index: int            # 0, 1, 2, ... in schedule order
    resolution: int
    fading: bool
    start_kimg: float
    end_kimg: float
    batch: int            # global minibatch
    lr: float

    @property
    def name(self) -> str:
        return "fade-in" if self.fading else "stabilise"

    def alpha(self, kimg: float) -> float:
        if not self.fading:
            return 1.0
        return min(max((kimg - self.start_kimg) / (self.end_kimg - self.start_kimg), 0.0), 1.0)


def build_phases(cfg: Config) -> list[Phase]:
    s = cfg.schedule
    res, phases, start = s.start_resolution, [], 0.0

    def add(resolution: int, fading: bool, kimg: float) -> None:
        nonlocal start
        end = min(start + kimg, s.total_kimg)
        if end > start:
            phases.append(Phase(len(phases), resolution, fading, start, end,
                                s.minibatch.get(resolution, s.minibatch_default),
                                s.lr.get(resolution, cfg.optimizer.lr)))
        start = end

    add(res, False, s.stabilize_kimg_at.get(res, s.stabilize_kimg))
    while res < cfg.model.max_resolution:
        res *= 2
        add(res, True, s.fade_kimg_at.get(res, s.fade_kimg))
        add(res, False, s.stabilize_kimg_at.get(res, s.stabilize_kimg))
    if start < s.total_kimg:  # the last resolution trains on, stable, until total_kimg
        last = phases[-1]
        if last.fading:
            add(res, False, s.total_kimg - start)
        else:
            phases[-1] = Phase(last.index, last.resolution, False, last.start_kimg, s.total_kimg,
                               last.batch, last.lr)
    return phases


def phase_at(phases: list[Phase], kimg: float) -> Phase:
    for phase in phases:
        if kimg < phase.end_kimg:
            return phase
    return phases[-1]


def total_kimg(phases: list[Phase]) -> float:
    return phases[-1].end_kimg




def batch_shares(global_batch: int, world_size: int, group_size: int = 1) -> list[int]:
    """Each rank's share of the global minibatch, in rank order, summing to it exactly.

    Whole minibatch-stddev groups (`group_size` consecutive images) are dealt out as evenly as
    possible, so the shares differ by at most one group and every rank's groups are the ones
    the whole batch forms on one worker (progan/model/layers.py MinibatchStddev): 32 images in
    groups of 4 on 3 workers are 12 + 12 + 8. When the global batch is not a whole number of
    groups, or has fewer groups than there are ranks, single images are dealt out instead
    (shares differ by at most one image; the layer then takes the largest group dividing each
    share). Every rank needs an image: with fewer images than ranks each gets one, and the
    global batch trained is the world size."""
    if global_batch < world_size:
        return [1] * world_size
    unit = group_size if group_size > 1 and global_batch % group_size == 0 \
        and global_batch // group_size >= world_size else 1
    units = global_batch // unit
    return [unit * (units // world_size + (rank < units % world_size)) for rank in range(world_size)]


def share_weights(shares: list[int]) -> list[float]:
    """Per-rank factors for the losses (per-sample means over each rank's share) such that DDP's
    gradient, the average over ranks, equals one worker's gradient on the whole global batch:
    sum_r w_r * mean_r / world = sum_r share_r * mean_r / global, so w_r = share_r * world / global.
    All 1.0 when the shares are equal."""
    total, world = sum(shares), len(shares)
    return [share * world / total for share in shares]
