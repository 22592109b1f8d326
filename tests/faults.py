"""Faults injected into real training runs through the loop's test-only callback.

    build_trainer(cfg, run_dir, shards, workers=2, extra_loop_config={"callback": FaultInjection(nan_at_kimg=0.2)})

Ray sends the callback to the workers by value (registered below), so they need not import tests/.
"""
from __future__ import annotations

import sys

import ray.cloudpickle
import ray.train
import torch

from progan.training.train_loop import Callback


class FaultInjection(Callback):
    """nan_at_kimg: loss_d becomes NaN from that point on, in the first attempt only (every
    attempt with nan_every_attempt). fail_after_kimg: every rank fails right after the first
    checkpoint at or past that point, in the first attempt only. error_after_kimg: the same
    error after every checkpoint past that point, in every attempt."""

    def __init__(self, nan_at_kimg: float | None = None, nan_every_attempt: bool = False,
                 fail_after_kimg: float | None = None, error_after_kimg: float | None = None):
        self.nan_at_kimg, self.nan_every_attempt = nan_at_kimg, nan_every_attempt
        self.fail_after_kimg, self.error_after_kimg = fail_after_kimg, error_after_kimg

    def on_losses(self, losses: torch.Tensor, kimg: float, resumed: bool) -> torch.Tensor:
        if self.nan_at_kimg is not None and (not resumed or self.nan_every_attempt) and kimg >= self.nan_at_kimg:
            losses = losses.clone()
            losses[0] = float("nan")
        return losses

    def after_checkpoint(self, kimg: float, resumed: bool) -> None:
        if self.fail_after_kimg is not None and not resumed and kimg >= self.fail_after_kimg:
            # wait until Ray Train has registered the checkpoint just reported: failing before
            # that (a busy machine) would restart from the one before it
            ray.train.get_all_reported_checkpoints()
            raise RuntimeError(f"test hook: injected failure after the checkpoint at kimg {kimg:.3f}")
        if self.error_after_kimg is not None and kimg >= self.error_after_kimg:
            raise ValueError(f"test hook: the same error on every attempt, at kimg {kimg:.3f}")


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
