"""Progressive training on a real 2-node local Ray cluster, with shards made by the data pipeline
from real faces. One cluster for the whole module: each Ray start costs tens of seconds here."""
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import ray.train
import torch
from PIL import Image
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.local import TRAIN_SLOT
from data_pipeline.loader import BatchReader, FaceStream
from progan.model.checkpoint import check_resume, load_checkpoint, run_checkpoints
from progan.model.config import config_from_dict, save_config
from progan.model.losses import WGANGP
from progan.model.schedule import batch_shares, build_phases, share_weights
from progan.training import run_plan
from progan.training.phase_training import wrap_for_phase
from progan.training.run_state import build_networks
from progan.training.train_loop import build_trainer
from progan.training.training_step import resolution_scale_for

from conftest import read_jsonl, tiny_config
from faults import FaultInjection

REPO = Path(__file__).resolve().parents[1]
TOTAL_IMAGES = 640  # five phases of 128 images: 4 stable, 8 fade, 8 stable, 16 fade, 16 stable


@pytest.fixture(scope="module")
def interrupted_then_resumed(cluster, shards, tmp_path_factory):
    """A run that fails right after its mid-fade-in checkpoint at 0.192 kimg, then a second
    trainer on the same run folder, which resumes from that checkpoint. (The other Ray tests
    decode in the training process, data.loader_workers=0.)"""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_dir.mkdir()
    # decoding in a DataLoader process, inside a Ray worker; a fixed size (cluster.min_workers: elastic by default)
    cfg = tiny_config("data.loader_workers=1", "cluster.min_workers=2")
    first = build_trainer(cfg, run_dir, shards, workers=2, train_slot=TRAIN_SLOT,
                          extra_loop_config={"callback": FaultInjection(fail_after_kimg=0.19)})
    with pytest.raises(ray.train.WorkerGroupError, match="injected failure"):
        first.fit()
    result = build_trainer(cfg, run_dir, shards, workers=2, train_slot=TRAIN_SLOT).fit()
    return run_dir, result


def test_tiny_schedule_grows_4_8_16_and_completes(interrupted_then_resumed):
    run_dir, result = interrupted_then_resumed
    assert result.metrics["images_seen"] == TOTAL_IMAGES
    assert result.metrics["resolution"] == 16 and result.metrics["alpha"] == 1.0
    stats = read_jsonl(run_dir / "stats.jsonl")
    assert {s["resolution"] for s in stats} == {4, 8, 16}
    fading = [s["alpha"] for s in stats if s["phase"] == "fade-in"]
    assert fading and all(0 < a < 1 for a in fading) and fading != sorted(fading)[::-1]
    assert all(s["world_size"] == 2 and s["global_batch"] == 16 for s in stats)
    state = load_checkpoint(result.checkpoint.path)
    assert state["images_seen"] == TOTAL_IMAGES and state["resolution"] == 16
    assert set(state) >= {"generator", "discriminator", "generator_ema", "opt_g", "opt_d", "rng_states", "config"}
    assert len(list(run_dir.glob("checkpoint_*"))) >= 3


def test_ranks_stay_identical_through_fade_in_and_stable_phases(interrupted_then_resumed):
    """Every checkpoint all-gathers a hash of each rank's weights and fails the run if they differ;
    the run passed checkpoints inside fade-ins (0.192, 0.48 kimg) and stable phases (0.288, 0.576)."""
    run_dir, result = interrupted_then_resumed
    events = read_jsonl(run_dir / "events.jsonl")
    assert not [e for e in events if e["event"] == "rank_divergence"]
    checkpoint_kimg = {round(e["kimg"], 3) for e in events if e["event"] == "checkpoint"}
    assert {0.192, 0.48, 0.288, 0.576} <= checkpoint_kimg
    assert result.metrics["ranks_identical"] is True


def test_checkpoints_and_sample_grids_exist(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    grids = sorted((run_dir / "samples").glob("res*_kimg*.png"))
    assert {g.name[:6] for g in grids} == {"res004", "res008", "res016"}
    with Image.open(grids[-1]) as img:
        assert img.size == (64 * 4, 64 * 4)  # 4x4 grid, 16x16 tiles enlarged to 64x64


def test_resume_continues_the_image_count_exactly(interrupted_then_resumed):
    run_dir, result = interrupted_then_resumed
    events = read_jsonl(run_dir / "events.jsonl")
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["kimg"] == pytest.approx(0.192)
    stats = read_jsonl(run_dir / "stats.jsonl")
    steps = [s["step"] for s in stats]
    # the first attempt logged up to step 12 (0.192 kimg); the resumed one goes on from step 13
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert result.metrics["step"] == TOTAL_IMAGES // 16


def critic_and_generator_grads(config: dict) -> None:
    """One critic and one generator backward on a fixed batch, split across the ranks as the
    training loop splits it (progan.model.schedule.batch_shares), each rank's losses weighted as the
    training step weights them (share_weights)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_dict(config["config"])
    G, D = build_networks(cfg)
    G_ddp, D_ddp = wrap_for_phase(G, D, 8, True, torch.device("cpu"))
    data = torch.load(config["data"])
    shares = batch_shares(len(data["z"]), world, cfg.model.mbstd_group_size)
    share = slice(sum(shares[:rank]), sum(shares[:rank + 1]))
    weight = share_weights(shares)[rank]
    loss = WGANGP()
    fakes = G_ddp(data["z"][share], 8, 0.5)
    d_loss, _ = loss.critic_loss(lambda x: D_ddp(x, 8, 0.5), data["reals"][share], fakes.detach(),
                                 resolution_scale=resolution_scale_for(D, 8), mix=data["mix"][share])
    (d_loss * weight).backward()
    D.requires_grad_(False)  # as the training step does: G's loss must not add to D's gradients
    g_loss, _ = loss.generator_loss(lambda x: D(x, 8, 0.5), fakes)
    (g_loss * weight).backward()
    if rank == 0:
        grads = {f"G.{n}": p.grad for n, p in G.named_parameters() if p.grad is not None}
        grads.update({f"D.{n}": p.grad for n, p in D.named_parameters() if p.grad is not None})
        torch.save(grads, config["out"])
    ray.train.report({"done": 1})


def test_two_and_three_workers_with_uneven_shares_match_one_worker(cluster, shards, tmp_path):
    """20 images in minibatch-stddev groups of 4: 12 + 8 on two workers, 8 + 8 + 4 on three (the
    old split trained 18 on three); DDP's averaged gradients equal one worker's on all 20."""
    reals = BatchReader(FaceStream(str(shards), 0, 1, seed=0, shuffle_buffer=1), mirror=False, seed=0).next_batch(20, 8)
    torch.manual_seed(3)
    torch.save({"reals": reals, "z": torch.randn(20, 16), "mix": torch.rand(20, 1, 1, 1)}, tmp_path / "data.pt")
    assert batch_shares(20, 2, 4) == [12, 8] and batch_shares(20, 3, 4) == [8, 8, 4]
    grads = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"grads{workers}.pt"
        TorchTrainer(critic_and_generator_grads, train_loop_config={"data": str(tmp_path / "data.pt"), "out": str(out),
                                                                         "config": tiny_config().to_dict()},
                     scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(storage_path=str(tmp_path), name=f"grads{workers}")).fit()
        grads[workers] = torch.load(out)
    assert grads[1].keys() == grads[2].keys() == grads[3].keys() and len(grads[1]) > 10
    assert any(k.startswith("D.from_rgb.4.") for k in grads[1])  # the fade-in's old path got gradients
    for workers in (2, 3):
        for name in grads[1]:
            torch.testing.assert_close(grads[workers][name], grads[1][name], rtol=1e-4, atol=1e-6,
                                       msg=f"{workers} workers: {name}")


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes: got 0, allowed: >= 1"),
    (["--data", "EMPTY"], "no images found"),
    (["--data", "SHARDS", "model.max_resolution=32"], "shards hold 16x16 images but model.max_resolution is 32"),
    (["--data", "MISSING"], "no such folder"),
    (["model.max_resolution=48"], "model.max_resolution: got 48"),
    (["--data", "SHARDS", "--workers", "1000", "model.max_resolution=16"], "fewer than the 1000 training workers"),
    (["--dashboard-port", "70000"], "--dashboard-port: got 70000, allowed: 1..65535"),
    (["--prometheus-port", "99999"], "--prometheus-port: got 99999, allowed: 1..65535"),
    (["--dashboard-port", "BUSY"], "cannot listen on 127.0.0.1:"),
    (["checkpoint.run_root=AFILE/runs"], "cannot write there"),
    (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there"),
])
def test_launch_rejects_wrong_input_in_one_line(args, message, shards, tmp_path):
    """Each mistake in a second or so, before Ray starts, from a folder other than the project's
    (the default config and its demo photos are the project's own wherever launch.py runs)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    (tmp_path / "afile").write_text("a file where a folder should be")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        subst = {"EMPTY": str(tmp_path / "empty"), "SHARDS": str(shards), "MISSING": str(tmp_path / "nope"),
                 "BUSY": str(busy.getsockname()[1]), "checkpoint.run_root=AFILE/runs": f"checkpoint.run_root={tmp_path}/afile/runs"}
        argv = [subst.get(a, a) for a in args]
        if not any(a.startswith("checkpoint.run_root=") for a in argv):
            argv.append("checkpoint.run_root=" + str(tmp_path / "runs"))
        started = time.monotonic()
        proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *argv], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - started < 15


def test_launch_checks_input_and_readies_the_cluster_without_torch_or_ray_train(shards):
    """What runs before the Ray nodes start stays light: torch and Ray Train (~5 s of imports on
    this CPU) load in a thread while the nodes start, not before them."""
    code = ("import sys, launch; from cluster.local import LocalCluster, _gpus_per_node\n"
            f"args = launch.parse_args(['--data', {str(shards)!r}, '--nodes', '4', 'model.max_resolution=16'])\n"
            "plan = launch.plan_run(args); _gpus_per_node(4)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('ray.train'))\n"
            "print(len(heavy), heavy[:5])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0 "), proc.stdout


def copy_of_run(interrupted_then_resumed, dest: Path) -> Path:
    """The module's finished run, copied with the config launch.py would have written beside it."""
    run_dir, _ = interrupted_then_resumed
    shutil.copytree(run_dir, dest)
    save_config(tiny_config("data.loader_workers=1"), dest / "config.yaml")
    return dest


def test_resume_lists_changed_config_values_and_applies_them_only_when_asked(interrupted_then_resumed, tmp_path, capsys):
    import launch

    run = copy_of_run(interrupted_then_resumed, tmp_path / "tiny")
    asked = ["--resume", str(run), "schedule.total_kimg=1.28", "optimizer.lr=0.01", "cluster.nodes=3"]
    cfg, _ = run_plan.resolve_config(launch.parse_args(asked))
    assert capsys.readouterr().err.splitlines() == [
        "[launch] --resume: schedule.total_kimg is 0.64 in the run, 1.28 asked: not applied (add --override-config to apply it)",
        "[launch] --resume: optimizer.lr is 0.003 in the run, 0.01 asked: not applied (add --override-config to apply it)"]
    assert (cfg.schedule.total_kimg, cfg.optimizer.lr, cfg.cluster.nodes) == (0.64, 0.003, 3)  # runtime values follow
    cfg, _ = run_plan.resolve_config(launch.parse_args([*asked, "--override-config"]))
    assert [line.rsplit(": ", 1)[1] for line in capsys.readouterr().err.splitlines()] == ["applied", "applied"]
    assert (cfg.schedule.total_kimg, cfg.optimizer.lr) == (1.28, 0.01)


def test_resume_goes_on_from_the_newest_checkpoint_that_loads(interrupted_then_resumed, cluster, shards, tmp_path):
    """The newest checkpoint cut short (a crash while the disk was full, say): the resume check
    gives the one line launch.py prints, naming the older one the run continues from, and the
    training does so and records it."""
    run = copy_of_run(interrupted_then_resumed, tmp_path / "tiny")
    newest, older, *_ = run_checkpoints(run)
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 2])
    older_kimg = load_checkpoint(older)["images_seen"] / 1000
    cfg = tiny_config("data.loader_workers=1", "cluster.min_workers=2")
    lines = check_resume(run, cfg.to_dict()["model"])
    assert len(lines) == 1 and f"{newest}: unreadable (" in lines[0], lines
    assert lines[0].endswith(f"); resuming from the older {older.parent.name} (kimg {older_kimg:.3f})"), lines
    result = build_trainer(cfg, run, shards, workers=2, train_slot=TRAIN_SLOT).fit()
    events = read_jsonl(run / "events.jsonl")
    unusable = [e for e in events if e["event"] == "checkpoint_unusable"]
    assert len(unusable) == 1 and unusable[0]["resumed_from"] == older.parent.name
    assert [e for e in events if e["event"] == "resume"][-1]["kimg"] == older_kimg
    assert result.metrics["images_seen"] == TOTAL_IMAGES


def test_three_workers_train_the_schedules_global_batch_exactly(cluster, shards, tmp_path):
    """A global batch of 20 on 3 workers trains 20 images a step (8 + 8 + 4), not 18: the stats,
    the phase event and the image count say so; grad_norm is logged."""
    cfg = tiny_config("schedule.minibatch_default=20", "schedule.total_kimg=0.12", "cluster.min_workers=3")
    phases = build_phases(cfg)
    assert [p.batch for p in phases] == [20]
    run_dir = tmp_path / "three"
    result = build_trainer(cfg, run_dir, shards, workers=3).fit()
    assert result.metrics["images_seen"] == 120 and result.metrics["step"] == 6
    stats = read_jsonl(run_dir / "stats.jsonl")
    assert len(stats) == 3
    assert all(s["world_size"] == 3 and s["global_batch"] == phases[0].batch for s in stats)
    assert all(s["grad_norm"] > 0 for s in stats)
    assert [e["global_batch"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "phase"] == [20]


def test_swd_of_the_ema_generator_at_each_phase_end(interrupted_then_resumed):
    """The paper's SWD against the shards at the end of every phase from 8x8 on (SWD needs 8x8)."""
    run_dir, _ = interrupted_then_resumed
    swds = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "swd"]
    assert [e["resolution"] for e in swds] == [8, 8, 16, 16]
    assert [e["kimg"] for e in swds] == pytest.approx([0.256, 0.384, 0.512, 0.64])
    for event in swds:
        assert list(event["levels"]) == [str(event["resolution"])] and event["num_images"] == 256
        assert 0 < event["avg"] < 1e4 and event["avg"] == pytest.approx(event["levels"][str(event["resolution"])])


def test_nan_between_stats_lines_is_caught_before_the_next_checkpoint(cluster, shards, tmp_path):
    """Non-finite losses are checked on the device and synchronised only every log_every_steps
    steps (5 here) and before each checkpoint: a NaN at step 12, which ends at the 0.192 kimg
    checkpoint, rolls back to the one before (0.128, the end of the 4x4 phase) instead of being
    saved."""
    cfg = tiny_config("monitoring.log_every_steps=5", "schedule.total_kimg=0.224", "cluster.max_failures=1",
                      "cluster.min_workers=2")
    run_dir = tmp_path / "nan"
    result = build_trainer(cfg, run_dir, shards, workers=2, extra_loop_config={"callback": FaultInjection(nan_at_kimg=0.17)}).fit()
    events = read_jsonl(run_dir / "events.jsonl")
    rollbacks = [e for e in events if e["event"] == "nan_rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["kimg"] == pytest.approx(0.192) and rollbacks[0]["checkpoint_kimg"] == pytest.approx(0.128)
    assert [e["kimg"] for e in events if e["event"] == "resume"] == [pytest.approx(0.128)]
    first_attempt = events[:events.index(rollbacks[0])]
    assert [round(e["kimg"], 3) for e in first_attempt if e["event"] == "checkpoint"] == [0.096, 0.128]
    assert result.metrics["images_seen"] == 224


def test_a_fixed_size_the_cluster_cannot_give_ends_after_the_start_timeout(cluster, tmp_path, capsys):
    """Issue 25: three workers with a training slot each on two nodes (as on a cluster started
    elsewhere, which launch.py cannot check beforehand) retried without end ("max allowed: inf");
    the run now ends after one worker start time-out, in one line."""
    from base.errors import UserError
    from progan.training.fit import fit_run

    cfg = tiny_config("cluster.min_workers=3", "cluster.workers=3", "cluster.worker_start_timeout_s=5")
    shards = str(tmp_path / "shards")  # never read: no worker starts
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        fit_run(run_plan.RunPlan(cfg, tmp_path / "fixed", shards, True), shards, train_slot=TRAIN_SLOT)
    message = str(error.value)
    assert message.startswith("the cluster did not start 3 training workers within "
                              "cluster.worker_start_timeout_s=5 s (") and "\n" not in message, message
    assert message.endswith("add nodes, or pass fewer --min-nodes/--workers"), message
    assert time.monotonic() - started < 120
    assert not list((tmp_path / "fixed").glob("checkpoint_*"))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[launch] waiting for the cluster")]
    assert said == ["[launch] waiting for the cluster: its 2 nodes hold 2 of the 3 training workers the run needs at least "
                    f"(each takes 1 CPU, 1 {TRAIN_SLOT}); the run ends if they do not start within "
                    "cluster.worker_start_timeout_s=5 s"], said


def test_the_capacity_note_counts_workers_per_node_and_says_what_the_run_does():
    """Said before training when the nodes cannot hold the fewest workers: an elastic run waits
    (Ray Train says nothing meanwhile), a fixed size ends after the start time-out."""
    from progan.training.fit import capacity_note, workers_that_fit

    gpu_worker = {"CPU": 1, "GPU": 1}
    nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 4.0}, {"CPU": 8.0}]  # the last has no GPU
    assert workers_that_fit(nodes, gpu_worker) == 3  # 2 + 1 (one CPU) + 0
    assert workers_that_fit(nodes, {"CPU": 2}) == 8 + 0 + 4
    elastic = run_plan.RunPlan(tiny_config("cluster.min_workers=4", "cluster.workers=8"), Path("run"), "shards", True)
    assert capacity_note(elastic, nodes, gpu_worker) == (
        "waiting for the cluster: its 3 nodes hold 3 of the 4 training workers the run needs at least (each takes "
        "1 CPU, 1 GPU); the run waits until nodes join (an autoscaler's, or `ray start --address ...`); Ctrl-C stops it")
    enough = run_plan.RunPlan(tiny_config("cluster.min_workers=3", "cluster.workers=8"), Path("run"), "shards", True)
    assert capacity_note(enough, nodes, gpu_worker) is None  # it starts with 3 and grows when nodes join
