"""One typed config for a run: dataclasses, loaded from YAML, overridden by `key.sub=value`.

Defaults are the paper's and the official code's (tkarras/progressive_growing_of_gans,
preset v2-8gpus: the global minibatch and learning rate per resolution). Every mistake stops
with a `ConfigError` whose one-line message names the field, what was given and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from base.errors import UserError


class ConfigError(UserError):
    """A bad config value; str() is one line naming the field."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass
class DataConfig:
    path: str = ""                 # shards folder (with manifest.json) or a folder of raw photos
    mirror: bool = True            # random horizontal flip, as the official code for CelebA
    shuffle_buffer: int = 2000     # images held for local shuffling on each worker
    loader_workers: int = 0        # DataLoader processes decoding beside each training worker (large images)
    seed: int = 0                  # the data alone: which shards each rank reads, their order, the mirroring


@dataclass
class ModelConfig:
    max_resolution: int = 1024
    latent_size: int = 512
    fmap_base: int = 8192          # feature maps at stage s: min(fmap_base / 2**s, fmap_max)
    fmap_max: int = 512
    num_channels: int = 3
    mbstd_group_size: int = 4
    # NHWC activations and conv weights: the same maths, faster steps on CPU (oneDNN)
    channels_last: bool = True
    # fp32 | bf16: bf16 runs the networks' forward passes under autocast (weights, optimisers and
    # the EMA stay fp32; progan.training.training_step.in_precision); fast where the hardware has bf16
    # units (GPUs since Ampere, CPUs with AMX/AVX512-BF16), slower than fp32 on other CPUs
    precision: str = "fp32"
    # convolutions whose derivatives of every order are plain convolution kernels, for the
    # penalty's double backward through the critic (progan/model/conv2d_gradfix.py; the same
    # maths): CUDA only, off until the GPU check has measured it on a GPU
    conv_gradfix: bool = False


@dataclass
class ScheduleConfig:
    start_resolution: int = 4
    stabilize_kimg: float = 600.0  # thousands of images per stable phase (and for 4x4 alone)
    fade_kimg: float = 600.0       # thousands of images per fade-in
    total_kimg: float = 12000.0
    # per-resolution overrides of the two durations above (e.g. short phases for a CPU demo)
    stabilize_kimg_at: dict[int, float] = field(default_factory=dict)
    fade_kimg_at: dict[int, float] = field(default_factory=dict)
    # global minibatch per resolution; resolutions missing here use `minibatch_default`
    minibatch: dict[int, int] = field(default_factory=lambda: {4: 512, 8: 256, 16: 128, 32: 64, 64: 32})
    minibatch_default: int = 32
    # learning rate per resolution; missing ones use optimizer.lr
    lr: dict[int, float] = field(default_factory=lambda: {128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003})
    reset_optimizer_on_fade: bool = True  # Adam state reset at the start and end of each fade-in


@dataclass
class LossConfig:
    kind: str = "wgan_gp"          # wgan_gp | logistic_r1 | least_squares
    gp_lambda: float = 10.0
    gp_target: float = 1.0
    drift_epsilon: float = 0.001
    r1_gamma: float = 10.0


@dataclass
class OptimizerConfig:
    lr: float = 0.001
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-8
    ema_beta: float = 0.999        # generator moving average, per generator step
    # when > 0, the EMA is defined by a half-life in thousands of images instead of ema_beta,
    # so a short (demo) run's EMA still moves; 0 keeps the paper's per-step beta
    ema_half_life_kimg: float = 0.0


@dataclass
class ClusterConfig:
    nodes: int = 4                 # local nodes started by launch.py (when no address)
    address: str = ""              # "" = start a local cluster; "auto" or HOST:PORT = join one
    workers: int = 0               # training workers; 0 = one per node
    # elastic: the run trains on with as few as this many workers when some are lost, and grows
    # back when they return; equal to the number of workers for a fixed size
    min_workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool | None = None    # true | false | null (written `auto` too): GPUs if the cluster has any
    # how long Ray Train waits for a worker group to start; after a node is lost the first
    # attempt still counts it, so this bounds recovery time (Ray's default is 60 s)
    worker_start_timeout_s: float = 30.0
    max_failures: int = 10         # worker restarts (crashes, lost nodes, NaN rollbacks) before giving up


@dataclass
class MonitoringConfig:
    log_every_steps: int = 10      # JSON stats line and progress line
    # start a local Prometheus for the run: true | false | null (written `auto` too): if one is installed
    prometheus: bool | None = None
    # images per set for the SWD of the EMA generator against the shards at each phase end and at
    # the end of the run (events.jsonl, Prometheus); -1: 4096 on a GPU, 256 on a CPU; 0: off
    swd_images: int = -1


@dataclass
class CheckpointConfig:
    every_kimg: float = 200.0
    num_to_keep: int = 3
    sample_grid: int = 8           # an N x N grid of fixed latents
    run_root: str = "runs"
    max_nan_rollbacks: int = 3     # rollbacks to the same checkpoint before the run stops


@dataclass
class Config:
    # the networks' initial weights and each rank's random numbers (latents, penalty mixing);
    # data.seed seeds the data alone, so either can change without the other
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- parsing and type checks

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value, tp):
    """Checks `value` against the annotated type `tp`; returns it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: got {value!r}, expected a mapping like {{4: 16, 8: 16}}")
        return {_coerce(f"{name}[{k!r}]", k, key_tp): _coerce(f"{name}[{k!r}]", v, val_tp)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: got {value!r}, expected true or false")
    if tp == bool | None:  # true, false or null = decide at run time; `auto` also means null
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in AUTO_BOOL_WORDS:
            return AUTO_BOOL_WORDS[value.lower()]  # also configs written when these were strings
        raise ConfigError(f"{name}: got {value!r}, expected true, false or auto")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,100}", value.strip()):
            return int(value)  # dict keys written as strings in JSON-like YAML; ASCII digits only:
            # str.isdigit() also passes "²" and other Unicode digits, on which int() raised
        raise ConfigError(f"{name}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > sys.float_info.max:  # float() would overflow
                raise ConfigError(f"{name}: got an integer of {len(str(abs(value)))} digits, expected a finite number")
            if not math.isfinite(value):
                raise ConfigError(f"{name}: got {value!r}, expected a finite number")
            return float(value)
        raise ConfigError(f"{name}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: got {value!r}, expected a string")
    raise TypeError(f"unsupported config type {tp} for {name}")


AUTO_BOOL_WORDS = {"auto": None, "true": True, "false": False}

# Keys that configs and checkpoints written by older versions hold and this one no longer has:
# skipped when read, so those runs still resume and load (model.cpu_winograd: the CPU Winograd
# convolution, removed)
RETIRED_KEYS = frozenset({"model.cpu_winograd"})


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: got {values!r}, expected a mapping")
    for key, value in values.items():
        if f"{prefix}{key}" in RETIRED_KEYS:
            continue
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(f"{prefix}{key}", value, hints[key]))


def parse_override(text: str) -> tuple[list[str], object]:
    """`schedule.fade_kimg=10` -> (['schedule', 'fade_kimg'], 10); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except ValueError as exc:  # YAML syntax, but no number Python reads (an int of over 4300 digits)
        raise ConfigError(f"override {key.strip()}: {str(exc).split(';')[0]}") from None
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: a number Python cannot read (4300+ digits)
            raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0].split(';')[0]})")
        _apply(cfg, data)
    for text in overrides:
        keys, value = parse_override(text)
        nested: object = value
        for key in reversed(keys):
            nested = {key: nested}
        _apply(cfg, nested)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- range checks

def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {value!r}, allowed: {allowed}")


def validate(cfg: Config) -> None:
    m, s, l, o = cfg.model, cfg.schedule, cfg.loss, cfg.optimizer
    _check(_is_pow2(m.max_resolution) and 4 <= m.max_resolution <= 1024,
           "model.max_resolution", m.max_resolution, "a power of two in 4..1024")
    _check(m.latent_size >= 1, "model.latent_size", m.latent_size, ">= 1")
    _check(m.fmap_base >= 1, "model.fmap_base", m.fmap_base, ">= 1")
    _check(m.fmap_max >= 1, "model.fmap_max", m.fmap_max, ">= 1")
    _check(m.num_channels in (1, 3), "model.num_channels", m.num_channels, "1 or 3")
    _check(m.mbstd_group_size >= 0, "model.mbstd_group_size", m.mbstd_group_size, ">= 0 (0 or 1 = off)")
    _check(m.precision in ("fp32", "bf16"), "model.precision", m.precision, "fp32, bf16")
    _check(_is_pow2(s.start_resolution) and 4 <= s.start_resolution <= m.max_resolution,
           "schedule.start_resolution", s.start_resolution,
           f"a power of two in 4..model.max_resolution ({m.max_resolution})")
    _check(s.stabilize_kimg > 0, "schedule.stabilize_kimg", s.stabilize_kimg, "> 0")
    _check(s.fade_kimg >= 0, "schedule.fade_kimg", s.fade_kimg, ">= 0")
    _check(s.total_kimg > 0, "schedule.total_kimg", s.total_kimg, "> 0")
    for name, table in (("schedule.stabilize_kimg_at", s.stabilize_kimg_at), ("schedule.fade_kimg_at", s.fade_kimg_at)):
        for res, kimg in table.items():
            _check(_is_pow2(res) and 4 <= res <= 1024, name, res, "keys: powers of two in 4..1024")
            _check(kimg >= 0, f"{name}[{res}]", kimg, ">= 0")
    for res, batch in s.minibatch.items():
        _check(_is_pow2(res) and 4 <= res <= 1024, "schedule.minibatch", res, "keys: powers of two in 4..1024")
        _check(batch >= 1, f"schedule.minibatch[{res}]", batch, ">= 1")
    _check(s.minibatch_default >= 1, "schedule.minibatch_default", s.minibatch_default, ">= 1")
    for res, lr in s.lr.items():
        _check(_is_pow2(res) and 4 <= res <= 1024, "schedule.lr", res, "keys: powers of two in 4..1024")
        _check(lr > 0, f"schedule.lr[{res}]", lr, "> 0")
    _check(l.kind in ("wgan_gp", "logistic_r1", "least_squares"), "loss.kind", l.kind,
           "wgan_gp, logistic_r1, least_squares")
    _check(l.gp_lambda >= 0, "loss.gp_lambda", l.gp_lambda, ">= 0")
    _check(l.gp_target > 0, "loss.gp_target", l.gp_target, "> 0")
    _check(l.drift_epsilon >= 0, "loss.drift_epsilon", l.drift_epsilon, ">= 0")
    _check(l.r1_gamma >= 0, "loss.r1_gamma", l.r1_gamma, ">= 0")
    _check(o.lr > 0, "optimizer.lr", o.lr, "> 0")
    _check(0 <= o.beta1 < 1, "optimizer.beta1", o.beta1, "0 <= beta1 < 1")
    _check(0 <= o.beta2 < 1, "optimizer.beta2", o.beta2, "0 <= beta2 < 1")
    _check(o.eps > 0, "optimizer.eps", o.eps, "> 0")
    _check(0 <= o.ema_beta < 1, "optimizer.ema_beta", o.ema_beta, "0 <= ema_beta < 1")
    _check(o.ema_half_life_kimg >= 0, "optimizer.ema_half_life_kimg", o.ema_half_life_kimg, ">= 0")
    _check(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", cfg.data.shuffle_buffer, ">= 1")
    _check(cfg.data.loader_workers >= 0, "data.loader_workers", cfg.data.loader_workers, ">= 0")
    c = cfg.cluster
    _check(c.nodes >= 1, "cluster.nodes", c.nodes, ">= 1")
    _check(c.workers >= 0, "cluster.workers", c.workers, ">= 0 (0 = one per node)")
    _check(c.min_workers >= 1, "cluster.min_workers", c.min_workers, ">= 1 (the number of workers for a fixed size)")
    _check(c.cpus_per_worker >= 1, "cluster.cpus_per_worker", c.cpus_per_worker, ">= 1")
    _check(c.worker_start_timeout_s > 0, "cluster.worker_start_timeout_s", c.worker_start_timeout_s, "> 0")
    _check(c.max_failures >= 0, "cluster.max_failures", c.max_failures, ">= 0")
    _check(cfg.monitoring.log_every_steps >= 1, "monitoring.log_every_steps",
           cfg.monitoring.log_every_steps, ">= 1")
    _check(cfg.monitoring.swd_images >= -1, "monitoring.swd_images", cfg.monitoring.swd_images,
           "-1 (auto), 0 (off) or a number of images")
    k = cfg.checkpoint
    _check(k.every_kimg > 0, "checkpoint.every_kimg", k.every_kimg, "> 0")
    _check(k.num_to_keep >= 1, "checkpoint.num_to_keep", k.num_to_keep, ">= 1")
    _check(k.max_nan_rollbacks >= 1, "checkpoint.max_nan_rollbacks", k.max_nan_rollbacks, ">= 1")
    _check(1 <= k.sample_grid <= 32, "checkpoint.sample_grid", k.sample_grid, "1..32")
