"""The one-shot GPU check: one JSON line per check, the whole script within a time budget.

    python -m bench.gpu_check [--quick] [--budget 570] [--photos data/demo_faces] [--workdir DIR]

Made to run in one go on a machine with one NVIDIA GPU (default budget 300 s); `--quick` runs the
same checks at tiny sizes on a CPU machine (most of its time goes to starting Ray four times), so
the script is known to work before a GPU ever runs it. Everything goes through the project's
public entry points, so it follows the training loop's internals as they change. The checks, in
their order (what the budget must never cut comes first):
- environment: torch, CUDA, NCCL and Ray versions, the GPU's name, bf16 support;
- mtcnn_1024: bench.mtcnn (in this process) on `mtcnn_1024_photos` photos scaled to a long side
  of 1024 px, the most the pipeline's detector sees: that detector on one CPU thread (as each of
  the pipeline's CPU actors runs it) and on the GPU, in the same turns, faces/s each.
  gpu_vs_all_cpus = the GPU's faces/s / (one thread's x the cores): above 1, one GPU detector
  outruns a single-threaded one on every core (assuming the CPU figure scales with the cores),
  which is what data_pipeline.prepare.detector_resources chooses between;
- step: bench.train_step (in this process, no Ray) at 64, 128 and 256 in fp32, bf16, and bf16
  with model.conv_gradfix: the bare step's images/s at the paper's widths and minibatch sizes;
- step_vs_pro_gan: bench.train_step --compare-pro-gan at 32x32, batch 64, paper widths, fp32: our
  step and pro_gan_pytorch 3.4's alternating in this process (images/s each, `speedup`); the
  peer comes from --peer-path (default .gpu/peer, which travels with .gpu: pip install --no-deps
  --target .gpu/peer pro-gan-pth==3.4 tensorboard==2.21.0 absl-py==2.5.1); without it the check
  says so in its error field;
- shards: `python -m data_pipeline` on the photos (face shards at the largest resolution);
- train: `launch.py --nodes 1` (Ray Train, one GPU worker, NCCL for CUDA tensors) from a config
  written to the work folder, at the paper's widths (fmap_base 8192, fmap_max 512, latent 512):
  one run per precision (fp32, then `model.precision=bf16` on the command line) that starts at
  64x64 (schedule.start_resolution), trains `steps` steps there, fades 128x128 in over a quarter
  of that and trains `steps` steps at 128x128. Figures per resolution from its stable phase:
  images/s and data_wait_share are medians of stats.jsonl's lines after the phase's first
  (warm-up: cuDNN's autotuning, the first allocations). Three Ray starts in all, not six: the
  fp32 run stops at the end of its fade-in, and its resume trains the 128x128 phase;
- resume: `launch.py --resume` of that fp32 run with the full total_kimg (--override-config): it
  must go on from the saved kimg with the next step;
- evaluate: `python -m progan.evaluate --json` (SWD) of the last 128x128 run's checkpoint,
  images/s = the real and generated images scored / seconds;
- mtcnn: the pipeline's face detector (data_pipeline.faces.build_detector, bench/mtcnn.py's
  photo loading) on the CPU and on the GPU, faces/s over the photos it gets through in its time.

Each check has a time limit (its own, cut to what is left of the budget); one that fails or runs
out of time prints its line with an "error" field, and the script goes on. The subprocesses'
output goes to log files in the work folder (kept with --workdir, else a temporary folder that is
deleted at the end).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from base import storage
from base.ports import free_port

PROJECT = Path(__file__).resolve().parents[1]
PAPER_WIDTHS = {"latent_size": 512, "fmap_base": 8192, "fmap_max": 512}


@dataclasses.dataclass(frozen=True)
class Sizes:
    resolutions: tuple[int, int]  # the run starts at the first and grows to the second
    steps: int                 # training steps per stable phase (the fade-in takes a quarter of that)
    batch: int                 # global minibatch
    widths: dict
    log_every: int             # steps per stats line
    loader_workers: int
    photos: int                # photos for the shards and for MTCNN
    mtcnn_1024_photos: int     # photos for MTCNN at a 1024 px long side, CPU vs GPU
    eval_images: int           # SWD images per set
    train_limit_s: float       # per training run, Ray's start included
    bare_steps: dict           # bench.train_step: resolution -> batch (the paper's minibatch there)
    peer_step: tuple[int, int]  # bench.train_step --compare-pro-gan: (resolution, batch), paper widths


GPU_SIZES = Sizes(resolutions=(64, 128), steps=100, batch=32, widths=PAPER_WIDTHS, log_every=20,
                  loader_workers=4, photos=100, mtcnn_1024_photos=32, eval_images=4096, train_limit_s=120,
                  bare_steps={64: 32, 128: 32, 256: 16}, peer_step=(32, 64))
QUICK_SIZES = Sizes(resolutions=(8, 16), steps=12, batch=8, widths={"latent_size": 32, "fmap_base": 256, "fmap_max": 32},
                    log_every=3, loader_workers=0, photos=16, mtcnn_1024_photos=4, eval_images=64, train_limit_s=240,
                    bare_steps={8: 8, 16: 8}, peer_step=(8, 8))


class Budget:
    """The script's deadline; each check gets its own limit, cut to what is left."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def limit(self, wanted: float) -> float:
        return max(0.0, min(wanted, self.deadline - time.monotonic()))


@dataclasses.dataclass
class Context:
    sizes: Sizes
    budget: Budget
    work: Path
    photos: Path
    gpu: bool
    peer_path: Path
    shards: Path | None = None
    runs: dict = dataclasses.field(default_factory=dict)  # precision -> run folder


class CheckFailed(Exception):
    """A check that could not produce its figures; `partial` holds what it did measure."""

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial or {}


# ---------------------------------------------------------------- subprocesses with a time limit

def run_logged(args: list[str], log: Path, limit_s: float) -> float:
    """Runs a command from the project folder, its output to `log`; returns its seconds. Past
    `limit_s` it gets SIGINT (launch.py and the pipeline then shut their Ray nodes down), then
    after 30 s its whole process group is killed. Raises CheckFailed on a timeout or an error."""
    if limit_s < 5:
        raise CheckFailed("skipped: the time budget is spent")
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise CheckFailed(f"timed out after {limit_s:.0f} s (log: {log})")
    if status != 0:
        raise CheckFailed(f"exit status {status}: {last_line(log)} (log: {log})")
    return time.monotonic() - started


def stop_group(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the nodes it started, if still there
    except ProcessLookupError:
        pass
    proc.wait()


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error") or "Error" in line]
    return (errors or lines or [""])[-1][:300]


def read_jsonl(path: Path) -> list[dict]:
    return storage.read_jsonl(path) if path.is_file() else []  # a torn last line is skipped


# ---------------------------------------------------------------- the checks

def check_environment(ctx: Context) -> dict:
    import ray
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "gpus": torch.cuda.device_count()}
    if ctx.gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())), cudnn=torch.backends.cudnn.version())
    return info


def check_shards(ctx: Context) -> dict:
    """Face shards at the larger resolution from the first `photos` photos, by the pipeline's CLI."""
    photos = ctx.work / "photos"
    photos.mkdir(exist_ok=True)
    for path in sorted(p for p in ctx.photos.iterdir() if p.is_file())[:ctx.sizes.photos]:
        shutil.copy(path, photos)
    out, resolution = ctx.work / "shards", max(ctx.sizes.resolutions)
    seconds = run_logged([sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", str(out),
                          "--resolution", str(resolution), "--nodes", "1", "--quiet"],
                         ctx.work / "shards.log", ctx.budget.limit(180))
    ctx.shards = out
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    return {"resolution": resolution, "photos": counts["files_seen"], "faces": counts["faces_kept"],
            "seconds": round(seconds, 1)}


def phase_kimg(ctx: Context) -> tuple[float, float]:
    """(kimg of a stable phase, kimg of the fade-in)."""
    s = ctx.sizes
    return s.steps * s.batch / 1000, s.steps // 4 * s.batch / 1000


def write_config(ctx: Context) -> Path:
    """The runs' config: the first resolution stable for `steps` steps, the second faded in over a
    quarter of that, then stable for `steps` steps; checkpoints at the end of each phase."""
    s = ctx.sizes
    low, high = s.resolutions
    stable, fade = phase_kimg(ctx)
    config = {
        "model": {"max_resolution": high, **s.widths},
        "schedule": {"start_resolution": low, "total_kimg": 2 * stable + fade,
                     "stabilize_kimg_at": {low: stable, high: stable}, "fade_kimg_at": {high: fade},
                     "minibatch": {low: s.batch, high: s.batch}, "minibatch_default": s.batch},
        "data": {"loader_workers": s.loader_workers},
        "checkpoint": {"every_kimg": fade, "num_to_keep": 2, "sample_grid": 4, "run_root": str(ctx.work / "runs")},
        "monitoring": {"log_every_steps": s.log_every, "swd_images": 0, "prometheus": False},
    }
    path = ctx.work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    check_phases(path, ctx)
    return path


def check_phases(path: Path, ctx: Context) -> None:
    """The config trains what the figures are of: the two resolutions' stable phases of `steps`
    steps of `batch`, with the fade-in between."""
    from progan.model.config import load_config
    from progan.model.schedule import build_phases

    s, (low, high) = ctx.sizes, ctx.sizes.resolutions
    fade_steps = s.steps // 4
    phases = [(p.resolution, p.fading, p.batch, round((p.end_kimg - p.start_kimg) * 1000))
              for p in build_phases(load_config(path))]
    expected = [(low, False, s.batch, s.steps * s.batch), (high, True, s.batch, fade_steps * s.batch),
                (high, False, s.batch, s.steps * s.batch)]
    if phases != expected:
        raise RuntimeError(f"{path}: phases {phases}, expected {expected}")


def launch_args(ctx: Context, *extra: str) -> list[str]:
    return [sys.executable, str(PROJECT / "launch.py"), "--nodes", "1", "--no-prometheus",
            "--dashboard-port", str(free_port()), *extra]


def throughput(stats: list[dict]) -> dict:
    """Images/s after the first stats line (warm-up), and what the run logged."""
    steady = stats[1:] or stats
    if not steady:
        return {}
    return {"img_per_s": round(statistics.median(s["img_per_s"] for s in steady), 1),
            "data_wait_share": round(statistics.median(s["data_wait_share"] for s in steady), 3),
            "steps": stats[-1]["step"], "kimg": round(stats[-1]["kimg"], 3), "global_batch": stats[-1]["global_batch"],
            "loss_d_last": round(stats[-1]["loss_d"], 4), "grad_penalty_last": round(stats[-1]["grad_penalty"], 4),
            "finite": not any(s.get("nonfinite") for s in stats)}


def per_resolution(stats: list[dict], resolutions: tuple[int, ...]) -> dict:
    """throughput() of each resolution's stable phase: {"64": {...}, "128": {...}}."""
    return {str(r): throughput([s for s in stats if s["resolution"] == r and s["phase"] == "stabilise"])
            for r in resolutions}


def trained_on_gpu(run: Path) -> bool | None:
    """Whether the run's newest checkpoint holds CUDA RNG states, which only a GPU worker saves."""
    import torch

    found = sorted(run.glob("checkpoint_*/checkpoint.pt"))
    if not found:
        return None
    state = torch.load(found[-1], map_location="cpu", weights_only=True)
    return any(s is not None for s in state["cuda_rng_states"])


def check_train(ctx: Context, precision: str) -> dict:
    """One run from the first resolution to the second; fp32's stops at the end of the fade-in,
    and check_resume trains its last phase."""
    if ctx.shards is None:
        raise CheckFailed("no shards (the shards check failed)")
    name = f"train-{precision}"
    run = ctx.work / "runs" / name
    stable, fade = phase_kimg(ctx)
    stop_early = ["schedule.total_kimg=" + str(stable + fade)] if precision == "fp32" else []
    args = launch_args(ctx, "--config", str(write_config(ctx)), "--data", str(ctx.shards),
                       "--run-name", name, f"model.precision={precision}", *stop_early)
    measured = ctx.sizes.resolutions[:1] if stop_early else ctx.sizes.resolutions
    try:
        seconds = run_logged(args, ctx.work / f"{name}.log", ctx.budget.limit(ctx.sizes.train_limit_s))
    except CheckFailed as exc:
        raise CheckFailed(str(exc), per_resolution(read_jsonl(run / "stats.jsonl"), measured))
    ctx.runs[precision] = run
    result = {**per_resolution(read_jsonl(run / "stats.jsonl"), measured), "on_gpu": trained_on_gpu(run),
              "seconds": round(seconds, 1)}
    fp32 = ctx.runs.get("fp32")
    if precision != "fp32" and fp32 is not None:
        base = per_resolution(read_jsonl(fp32 / "stats.jsonl"), ctx.sizes.resolutions)
        result["speedup_over_fp32"] = {r: round(result[r]["img_per_s"] / base[r]["img_per_s"], 2)
                                       if result[r].get("img_per_s") and base[r].get("img_per_s") else None
                                       for r in base}
    return result


def check_resume(ctx: Context) -> dict:
    """The fp32 run, stopped at the end of its fade-in, resumed to its full total_kimg: from its
    saved kimg, with the next step (the first stats line after it is `log_every` steps on from
    the last one before); its second resolution's figures come from this part."""
    run = ctx.runs.get("fp32")
    if run is None:
        raise CheckFailed("no finished fp32 run to resume")
    before = read_jsonl(run / "stats.jsonl")
    stable, fade = phase_kimg(ctx)
    seconds = run_logged(launch_args(ctx, "--resume", str(run), "--override-config",
                                     f"schedule.total_kimg={2 * stable + fade}"),
                         ctx.work / "resume.log", ctx.budget.limit(ctx.sizes.train_limit_s))
    resumes = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    after = read_jsonl(run / "stats.jsonl")[len(before):]
    result = {"run": run.name, "resumed_at_kimg": resumes[-1]["kimg"] if resumes else None, "saved_kimg": before[-1]["kimg"],
              "first_step_after": after[0]["step"] if after else None, "last_step_before": before[-1]["step"],
              **per_resolution(after, ctx.sizes.resolutions[1:]), "seconds": round(seconds, 1)}
    if result["resumed_at_kimg"] != result["saved_kimg"] \
            or result["first_step_after"] != result["last_step_before"] + ctx.sizes.log_every:
        raise CheckFailed("did not continue from the saved kimg", result)
    return result


def run_train_step(ctx: Context, log_name: str, args: list[str]) -> dict:
    """bench.train_step in this process (no Ray, no second CUDA start) with `args` after the
    check's step counts; its JSON line goes to a log file in the work folder."""
    import contextlib
    import io

    from bench import train_step

    if ctx.budget.limit(60) < 10:
        raise CheckFailed("skipped: the time budget is spent")
    counts = ["--steps", "10" if ctx.gpu else "2", "--warmup", "3" if ctx.gpu else "1", "--peak-seconds", "0.05", "--json"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train_step.main([*counts, *args])
    (ctx.work / log_name).write_text(out.getvalue())
    if ctx.gpu:  # the training runs that follow are other processes on the same GPU
        import torch

        torch.cuda.empty_cache()
    return result


def check_bare_step(ctx: Context, resolution: int, precision: str, gradfix: bool = False) -> dict:
    """The bare step at `resolution` with the run's widths and the paper's minibatch there."""
    widths = ctx.sizes.widths
    result = run_train_step(ctx, f"step{resolution}-{precision}{'-gradfix' * gradfix}.log", [
        "--resolution", str(resolution), "--batch", str(ctx.sizes.bare_steps[resolution]),
        "--max-resolution", str(max(ctx.sizes.bare_steps)), "--precision", precision,
        "--latent-size", str(widths["latent_size"]), "--fmap-base", str(widths["fmap_base"]),
        "--fmap-max", str(widths["fmap_max"]), *(["--conv-gradfix"] if gradfix else [])])
    return {key: result.get(key) for key in ("batch", "device", "img_per_s", "step_s", "fraction_of_peak",
                                             "peak_gflop_per_s")}


def check_step_vs_peer(ctx: Context) -> dict:
    """Our bare step against pro_gan_pytorch 3.4's (bench.train_step --compare-pro-gan: the two
    alternate step by step in this process) at the paper's widths, fp32."""
    from bench.train_step import PEER_PIP

    if not (ctx.peer_path / "pro_gan_pytorch").is_dir():
        raise CheckFailed(f"skipped: no pro_gan_pytorch under {ctx.peer_path}; install it there with: "
                          f"{PEER_PIP.format(path=ctx.peer_path)}")
    resolution, batch = ctx.sizes.peer_step
    result = run_train_step(ctx, f"step{resolution}-vs-pro_gan.log", [
        "--resolution", str(resolution), "--batch", str(batch), "--compare-pro-gan", "--peer-path", str(ctx.peer_path)])
    return {key: result.get(key) for key in ("resolution", "batch", "device", "img_per_s", "pro_gan_img_per_s",
                                             "speedup", "speedup_paired", "pro_gan_version")}


def check_evaluate(ctx: Context) -> dict:
    resolution = max(ctx.sizes.resolutions)
    run = ctx.runs.get("bf16") or ctx.runs.get("fp32")
    if run is None or ctx.shards is None:
        raise CheckFailed(f"no {resolution}x{resolution} run to evaluate")
    log = ctx.work / "evaluate.log"
    n = ctx.sizes.eval_images
    run_logged([sys.executable, "-m", "progan.evaluate", "--checkpoint", str(run), "--data", str(ctx.shards),
                "--num-images", str(n), "--json"], log, ctx.budget.limit(120))
    result = json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])
    return {"metric": "swd", "resolution": result["resolution"], "device": result["device"], "num_images": n,
            "swd_avg_x1e3": result.get("avg"), "seconds": result["seconds"],
            "img_per_s": round(2 * n / result["seconds"], 1) if result["seconds"] else None}


def detect_for(mtcnn, photos: list, limit_s: float, min_prob: float) -> dict:
    """Faces/s of the pipeline's detector over the photos it gets through within `limit_s`,
    after one warm-up unit (CUDA's start, cuDNN's and oneDNN's kernel choice)."""
    from bench.mtcnn import chosen_boxes
    from data_pipeline.faces import DETECT_BATCH, detect_in_size_groups

    detect_in_size_groups(mtcnn, photos[:DETECT_BATCH])
    started, done, faces = time.monotonic(), 0, 0
    for start in range(0, len(photos), DETECT_BATCH):
        if time.monotonic() - started > limit_s:
            break
        unit = photos[start:start + DETECT_BATCH]
        faces += sum(box is not None for box in chosen_boxes(detect_in_size_groups(mtcnn, unit), min_prob))
        done += len(unit)
    seconds = time.monotonic() - started
    return {"photos": done, "faces": faces, "faces_per_s": round(faces / seconds, 2)}


def check_mtcnn(ctx: Context) -> dict:
    import torch

    from bench.mtcnn import load_photos
    from data_pipeline.faces import FaceSettings, build_detector

    settings = FaceSettings()
    photos = load_photos(str(ctx.photos), ctx.sizes.photos, settings.max_side)
    limit = ctx.budget.limit(90) / 3
    if limit < 5:
        raise CheckFailed("skipped: the time budget is spent")
    result = {"threads": torch.get_num_threads()}
    for device in ("cpu", "cuda") if ctx.gpu else ("cpu",):
        result[device] = detect_for(build_detector(settings, device), photos, limit, settings.min_prob)
    if ctx.gpu:
        result["gpu_speedup"] = round(result["cuda"]["faces_per_s"] / max(result["cpu"]["faces_per_s"], 1e-9), 2)
    return result


def check_mtcnn_1024(ctx: Context) -> dict:
    """bench.mtcnn's pipeline detector at a 1024 px long side, on one CPU thread and on the GPU
    (module docstring, mtcnn_1024); its JSON line goes to a log file."""
    import contextlib
    import io

    import torch

    from bench import mtcnn

    if ctx.budget.limit(60) < 20:
        raise CheckFailed("skipped: the time budget is spent")
    args = ["--input", str(ctx.photos), "--limit", str(ctx.sizes.mtcnn_1024_photos), "--long-side", "1024",
            "--variants", "pipeline", "--devices", "cpu,cuda" if ctx.gpu else "cpu", "--rounds", "1",
            "--threads", "1", "--json"]
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            found = mtcnn.main(args)
    finally:
        torch.set_num_threads(threads)  # the bare steps after it run on every core
    (ctx.work / "mtcnn-1024.log").write_text(out.getvalue())
    cpus = len(os.sched_getaffinity(0))
    result = {"long_side": 1024, "photos": found["photos"], "cpus": cpus, "cpu_threads": 1,
              "cpu_faces_per_s": found["pipeline_faces_per_s"], "cpu_faces_kept": found["pipeline_faces_kept"]}
    if ctx.gpu:
        cuda = found["pipeline_cuda_faces_per_s"]
        result.update(gpu=found.get("gpu"), cuda_faces_per_s=cuda, cuda_faces_kept=found["pipeline_cuda_faces_kept"],
                      cuda_agreement=found["pipeline_cuda_agreement"], gpu_vs_one_cpu=found["cuda_speedup"],
                      gpu_vs_all_cpus=round(cuda / max(found["pipeline_faces_per_s"] * cpus, 1e-9), 2))
    return result


# ---------------------------------------------------------------- the script

def checks(ctx: Context) -> list[tuple[str, dict, object]]:
    """(name, fields that name the case, the check), in order: later checks use earlier results.
    What the budget must never cut comes first: MTCNN at 1024 px, then the bare steps and the
    comparison with pro_gan_pytorch (the figures issue 23's goals are stated in, in this process,
    before any Ray start); then the Ray runs, the resume, the evaluation and MTCNN."""
    listed = [("environment", {}, check_environment), ("mtcnn_1024", {}, check_mtcnn_1024)]
    for resolution in ctx.sizes.bare_steps:
        for precision, gradfix in (("fp32", False), ("bf16", False), ("bf16", True)):
            listed.append(("step", {"resolution": resolution, "precision": precision, "conv_gradfix": gradfix},
                           lambda c, r=resolution, p=precision, g=gradfix: check_bare_step(c, r, p, g)))
    listed += [("step_vs_pro_gan", {}, check_step_vs_peer), ("shards", {}, check_shards),
               ("train", {"precision": "fp32"}, lambda c: check_train(c, "fp32")), ("resume", {}, check_resume),
               ("train", {"precision": "bf16"}, lambda c: check_train(c, "bf16")),
               ("evaluate", {}, check_evaluate), ("mtcnn", {}, check_mtcnn)]
    return listed


def run_check(ctx: Context, name: str, case: dict, check) -> dict:
    started = time.monotonic()
    line = {"check": name, **case}
    try:
        line.update(check(ctx))
    except CheckFailed as exc:
        line.update(exc.partial, error=str(exc))
    except SystemExit as exc:  # a bench's own one-line refusal, run in this process
        line["error"] = str(exc.code)[:400]
    except Exception as exc:  # a check's bug or a CUDA error: reported, and the script goes on
        line["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
    line["check_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(line), flush=True)
    return line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, on the CPU when there is no GPU")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole script")
    p.add_argument("--photos", default=str(PROJECT / "data" / "demo_faces"), help="a folder of face photos")
    p.add_argument("--workdir", default=None, help="keep shards, runs and logs here (default: a temporary folder)")
    p.add_argument("--peer-path", default=str(PROJECT / ".gpu" / "peer"),
                   help="where pro_gan_pytorch 3.4 is installed, for the step_vs_pro_gan check")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.quick:
        print(json.dumps({"check": "environment", "error": "no CUDA GPU here: on a CPU machine pass --quick"}))
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(QUICK_SIZES if args.quick else GPU_SIZES, Budget(args.budget), work, Path(args.photos).resolve(), gpu,
                  Path(args.peer_path).resolve())
    try:
        lines = [run_check(ctx, name, case, check) for name, case, check in checks(ctx)]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any("error" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
