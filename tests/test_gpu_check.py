"""bench/gpu_check.py's configs: each training run starts, and stays, at the resolution it
measures, for the planned steps (the script itself runs on a GPU machine, or with --quick)."""
import pytest

from bench.gpu_check import GPU_SIZES, QUICK_SIZES, Budget, Context, throughput, write_config
from progan.config import load_config
from progan.schedule import build_phases


@pytest.mark.parametrize("sizes", [GPU_SIZES, QUICK_SIZES], ids=["gpu", "quick"])
def test_each_run_trains_only_at_its_resolution(tmp_path, sizes):
    ctx = Context(sizes, Budget(60), tmp_path, tmp_path, gpu=False)
    for resolution in sizes.resolutions:
        cfg = load_config(write_config(ctx, resolution), ["model.precision=bf16"])
        phases = build_phases(cfg)
        assert [(p.resolution, p.fading, p.batch) for p in phases] == [(resolution, False, sizes.batch)]
        assert phases[0].end_kimg * 1000 == sizes.steps * sizes.batch
        assert cfg.model.precision == "bf16" and cfg.monitoring.swd_images == 0
    if sizes is GPU_SIZES:  # the paper's widths
        assert (cfg.model.latent_size, cfg.model.fmap_base, cfg.model.fmap_max) == (512, 8192, 512)


def test_throughput_leaves_out_the_first_stats_line():
    stats = [{"img_per_s": 5.0, "data_wait_share": 0.5, "step": 20 * i, "kimg": 0.64 * i, "global_batch": 32,
              "loss_d": 1.0, "grad_penalty": 0.1} for i in (1, 2, 3, 4)]
    for line, rate in zip(stats[1:], (100.0, 300.0, 200.0)):
        line["img_per_s"] = rate
    result = throughput(stats)
    assert result["img_per_s"] == 200.0 and result["steps"] == 80 and result["finite"]
