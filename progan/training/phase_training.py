"""What one phase of the schedule trains with on one rank: DDP wrappers of the layers the phase
uses, the optimisers (reset when the official code resets them) and this rank's share of the
global minibatch."""
from __future__ import annotations

import dataclasses

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from progan.model.networks import set_trainable
from progan.training.run_state import RunState, SavedOptimizers
from progan.model.schedule import Phase, batch_shares, share_weights
from progan.training.training_step import make_optimizer


def wrap_for_phase(G, D, resolution: int, fading: bool, device: torch.device) -> tuple[DDP, DDP]:
    """Freezes the layers this phase does not use and wraps both networks in a new DDP:
    fade-in and stable phases use different parameter sets, and DDP with
    find_unused_parameters=False (and never static_graph, which lets ranks drift under the
    gradient penalty) needs exactly the used ones to require grad (networks.set_trainable)."""
    set_trainable(G, resolution, fading)
    set_trainable(D, resolution, fading)
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(G, device_ids=device_ids), DDP(D, device_ids=device_ids)  # the models have no buffers


@dataclasses.dataclass
class PhaseTraining:
    phase: Phase
    G_ddp: DDP
    D_ddp: DDP
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    batch: int           # this rank's images per step
    global_batch: int    # the schedule's, exactly
    loss_weight: float   # this rank's share, so DDP's averaged gradient is the one-worker gradient


def optimizers_for(run: RunState, phase: Phase, previous: PhaseTraining | None,
                   saved: SavedOptimizers | None) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The official code resets Adam whenever the level of detail starts or stops changing (at
    both ends of a fade-in); a resumed run takes the checkpoint's state where no reset falls
    between the checkpoint and now. Either way the phase's learning rate is set."""
    o, reset = run.cfg.optimizer, run.cfg.schedule.reset_optimizer_on_fade
    if previous is None or reset:
        opt_g = make_optimizer(run.G, phase.lr, o.beta1, o.beta2, o.eps)
        opt_d = make_optimizer(run.D, phase.lr, o.beta1, o.beta2, o.eps)
    else:
        opt_g, opt_d = previous.opt_g, previous.opt_d
    if previous is None and saved is not None and (saved.phase_index == phase.index or not reset):
        opt_g.load_state_dict(saved.g)
        opt_d.load_state_dict(saved.d)
    for opt in (opt_g, opt_d):
        for group in opt.param_groups:
            group["lr"] = phase.lr
    return opt_g, opt_d


def enter_phase(run: RunState, phase: Phase, previous: PhaseTraining | None, saved: SavedOptimizers | None,
                rank: int, world: int) -> PhaseTraining:
    """The previous phase's wrappers are dropped before new ones are made. The schedule's global
    batch is split in whole minibatch-stddev groups (progan.model.schedule.batch_shares)."""
    if previous is not None:
        previous.G_ddp = previous.D_ddp = None
    G_ddp, D_ddp = wrap_for_phase(run.G, run.D, phase.resolution, phase.fading, run.device)
    opt_g, opt_d = optimizers_for(run, phase, previous, saved)
    shares = batch_shares(phase.batch, world, run.cfg.model.mbstd_group_size)
    return PhaseTraining(phase, G_ddp, D_ddp, opt_g, opt_d, batch=shares[rank], global_batch=sum(shares),
                         loss_weight=share_weights(shares)[rank])

