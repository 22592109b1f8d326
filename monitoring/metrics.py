"""Every metric the project publishes, and the objects that publish them.

The metric names live here and in the Grafana dashboard JSON (monitoring/grafana/dashboards/),
nowhere else: other code calls the classes below, tests read the names from `ALL_METRICS`.

Export path. Training workers and the data pipeline's actors record through `ray.util.metrics`;
each node's Ray metrics agent exports them (Prometheus text format) and the head lists every agent
in the service-discovery file that monitoring/prometheus.yml points at. Ray prefixes every name
with `ray_` and gives counters the `_total` suffix, so `progan_images_seen` is scraped as
`ray_progan_images_seen_total{run, rank, node, WorkerId, SessionName, ...}`. `WorkerId` changes
whenever Ray Train restarts a worker: dashboards aggregate by the labels that matter
(`sum by (rank)`, `max by (run)`), never by `WorkerId`. The launcher process is not a Ray worker,
so `LauncherMetrics` serves its few gauges with prometheus_client on 127.0.0.1.

Ray's agent drops a gauge series about two export intervals (2 x 10 s by default) after its last
update, so `TrainingMetrics` re-sets its gauges from a daemon thread every half interval: a slow
step or a long checkpoint leaves no gap. It stops once the worker has called none of its methods
for `max(120 s, 10 x the last step time)`, so a hung worker's gauges age out instead of looking
alive. Counters and histograms are cumulative: Ray's agent keeps them, also those of dead
workers (flat, so their rate is 0), until the node goes away.

Metrics never break training: every public method catches every exception, logs it once (one line,
logger "progan.monitoring") and returns. Recording costs a few microseconds per call
(bench/metrics_overhead.py).
"""
from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass

log = logging.getLogger("progan.monitoring")

RAY_PREFIX = "ray_"

# Bucket upper bounds in seconds: 1-2.5-5 steps from 1 ms to 10 min (a 4x4 GPU step to a
# 1024x1024 CPU step or a large checkpoint).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   25.0, 50.0, 100.0, 250.0, 600.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric. `name` is what the code registers; `exported` is what Prometheus stores."""
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    tags: tuple[str, ...]
    source: str = "ray"  # "ray": ray.util.metrics on a worker; "launcher": prometheus_client
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        base = (RAY_PREFIX if self.source == "ray" else "") + self.name
        return base + "_total" if self.kind == "counter" else base

    @property
    def series(self) -> tuple[str, ...]:
        """The names of the time series Prometheus stores for this metric."""
        if self.kind == "histogram":
            return tuple(self.exported + s for s in ("_bucket", "_sum", "_count"))
        return (self.exported,)


TRAIN_TAGS = ("run", "rank", "node")
PIPELINE_TAGS = ("run", "node")
PHASES = ("fade-in", "stabilise")
OUTCOMES = ("kept", "no_face", "below_threshold", "unreadable", "not_an_image", "duplicate")  # = data_pipeline.manifest's


def _c(name, help, tags=TRAIN_TAGS):
    return MetricSpec(name, "counter", help, tags)


def _g(name, help, tags=TRAIN_TAGS):
    return MetricSpec(name, "gauge", help, tags)


def _h(name, help):
    return MetricSpec(name, "histogram", help, TRAIN_TAGS, boundaries=SECONDS_BUCKETS)


# --- training workers (one series per run/rank/node; Ray adds WorkerId, SessionName, ...)
IMAGES_SEEN = _c("progan_images_seen", "Images this worker trained on (its share of every global batch).")
STEPS = _c("progan_steps", "Training steps (critic + generator update) this worker ran.")
CHECKPOINTS = _c("progan_checkpoints_written", "Checkpoints this worker wrote.")
RESTARTS = _c("progan_restarts", "Times this worker started again from a checkpoint after a failure or resize.")
NAN_ROLLBACKS = _c("progan_nan_rollbacks", "Rollbacks to the last checkpoint after a non-finite loss.")
RESOLUTION = _g("progan_resolution_pixels", "Side of the images the networks train on now (pixels).")
PHASE = _g("progan_phase", "1 for the current phase of the growth schedule, 0 for the other.", TRAIN_TAGS + ("phase",))
ALPHA = _g("progan_alpha_ratio", "Fade-in blend factor of the newest layers, 0..1 (1 when stabilising).")
WORLD_SIZE = _g("progan_world_size", "Training workers in the current attempt.")
LEARNING_RATE = _g("progan_learning_rate", "Adam learning rate of the current phase.")
LOSS_D = _g("progan_discriminator_loss", "Critic loss of the latest logged step (mean over ranks).")
LOSS_G = _g("progan_generator_loss", "Generator loss of the latest logged step (mean over ranks).")
GRADIENT_PENALTY = _g("progan_gradient_penalty", "Gradient penalty (WGAN-GP) or R1 term of the latest logged step.")
SCORE_REAL = _g("progan_critic_score_real", "Mean critic output on real images, latest logged step.")
SCORE_FAKE = _g("progan_critic_score_fake", "Mean critic output on generated images, latest logged step.")
SWD = _g("progan_swd_x1e3", "The paper's sliced Wasserstein distance x 1e3 (average of the pyramid levels) of the "
         "EMA generator against the shards, at the end of each phase of this resolution.", TRAIN_TAGS + ("resolution",))
IMAGES_PER_SECOND = _g("progan_images_per_second", "Throughput the training loop measured over its last log window.")
STEP_SECONDS = _h("progan_step_seconds", "Wall time of one training iteration, data wait included.")
DATA_WAIT_SECONDS = _h("progan_data_wait_seconds", "Time one iteration waited for its batch.")
BACKWARD_SECONDS = _h("progan_backward_seconds", "Time in backward passes during one iteration.")
ALLREDUCE_SECONDS = _h("progan_allreduce_seconds",
                       "Time during one iteration with at least one gradient all-reduce in flight.")
CHECKPOINT_SAVE_SECONDS = _h("progan_checkpoint_save_seconds", "Time to write one checkpoint.")

# --- data pipeline actors
PIPELINE_IMAGES_READ = _c("progan_pipeline_images_read", "Raw images the face pipeline read.", PIPELINE_TAGS)
PIPELINE_FACES = _c("progan_pipeline_faces", "Pipeline results by outcome (kept, no_face, ...).",
                    PIPELINE_TAGS + ("outcome",))

# --- the launcher process (prometheus_client, not Ray)
LAUNCHER_MAX_WORKERS = MetricSpec("progan_launcher_max_workers", "gauge",
                                  "Training workers the run asks for (the most it grows back to).",
                                  ("run",), source="launcher")
LAUNCHER_MIN_WORKERS = MetricSpec("progan_launcher_min_workers", "gauge",
                                  "Fewest workers the run keeps training with (= max when not elastic).",
                                  ("run",), source="launcher")
LAUNCHER_START_TIME = MetricSpec("progan_launcher_start_time_seconds", "gauge",
                                 "Unix time the launcher started the run.", ("run",), source="launcher")

TRAINING_METRICS = (IMAGES_SEEN, STEPS, CHECKPOINTS, RESTARTS, NAN_ROLLBACKS, RESOLUTION, PHASE, ALPHA,
                    WORLD_SIZE, LEARNING_RATE, LOSS_D, LOSS_G, GRADIENT_PENALTY, SCORE_REAL, SCORE_FAKE, SWD,
                    IMAGES_PER_SECOND, STEP_SECONDS, DATA_WAIT_SECONDS, BACKWARD_SECONDS, ALLREDUCE_SECONDS,
                    CHECKPOINT_SAVE_SECONDS)
PIPELINE_METRICS = (PIPELINE_IMAGES_READ, PIPELINE_FACES)
LAUNCHER_METRICS = (LAUNCHER_MAX_WORKERS, LAUNCHER_MIN_WORKERS, LAUNCHER_START_TIME)
ALL_METRICS = TRAINING_METRICS + PIPELINE_METRICS + LAUNCHER_METRICS

# observe_stats(): stats key -> gauge ("phase" is handled apart: it is a label, not a value)
STAT_GAUGES = {"resolution": RESOLUTION, "alpha": ALPHA, "world_size": WORLD_SIZE, "lr": LEARNING_RATE,
               "loss_d": LOSS_D, "loss_g": LOSS_G, "grad_penalty": GRADIENT_PENALTY,
               "score_real": SCORE_REAL, "score_fake": SCORE_FAKE, "img_per_s": IMAGES_PER_SECOND}


# ------------------------------------------------------------------------------------ helpers

class _Once:
    """Logs the first failure of each kind as one line, then stays quiet."""

    def __init__(self, owner: str):
        self.owner, self.seen = owner, set()

    def __call__(self, what: str, exc: BaseException | str) -> None:
        if what in self.seen:
            return
        self.seen.add(what)
        try:
            log.warning("%s.%s: metrics disabled for this call (%s); training goes on",
                        self.owner, what, exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}")
        except Exception:
            pass


def _make(spec: MetricSpec, default_tags: dict):
    from ray.util import metrics as ray_metrics

    cls = {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge}.get(spec.kind)
    if spec.kind == "histogram":
        metric = ray_metrics.Histogram(spec.name, spec.help, boundaries=list(spec.boundaries), tag_keys=spec.tags)
    else:
        metric = cls(spec.name, spec.help, tag_keys=spec.tags)
    return metric.set_default_tags({k: v for k, v in default_tags.items() if k in spec.tags})


def _zero(counter, tags: dict | None = None) -> None:
    """Makes a counter's series appear at 0 before its first event, so `restarts` reads 0
    rather than 'no data'. Counter.inc() refuses 0; this uses the recorder underneath, and
    does nothing if that ever changes."""
    try:
        record = counter._metric.record
        record(0.0, tags={**counter._default_tags, **(tags or {})})
    except Exception:
        pass


def _node_id() -> str:
    try:
        import ray
        if ray.is_initialized():  # never start Ray just to name the node
            return ray.get_runtime_context().get_node_id()[:8]
    except Exception:
        pass
    return "local"


def _report_interval_s() -> float:
    """Ray's metrics export interval in this process (metrics_report_interval_ms, floor 1 s)."""
    try:
        import ray
        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
    except Exception:
        return 10.0


def _refresh_loop(ref: "weakref.ref[TrainingMetrics]", period: float) -> None:
    while True:
        time.sleep(period)
        obj = ref()
        if obj is None or obj._closed:
            return
        obj._refresh()
        del obj


# ------------------------------------------------------------------------------------ training

class TrainingMetrics:
    """One training worker's metrics. Create it once per worker process, inside the train loop:

        m = TrainingMetrics(run=run_name, rank=ctx.get_world_rank(), node=node_id)
        if resumed_after_failure: m.count_restart()
        ... every step:   m.observe_step(local_batch, step_s, wait_s)    # step_s includes wait_s
        ... every log:    m.observe_stats(record)
        ... rank 0 saves: m.observe_checkpoint(save_s)

    `images` is what this worker trained on (its share of the global batch): summed over ranks it is
    the global throughput. `node` may be "" to use the first 8 characters of Ray's node id.
    """

    def __init__(self, run: str, rank: int, node: str):
        self._fail = _Once("TrainingMetrics")
        self._ok = False
        self._closed = False
        self._lock = threading.Lock()
        self._gauge_values: dict[str, float] = {}
        self._phase: str | None = None
        self._swd: dict[str, float] = {}
        self._last_call = time.monotonic()
        self._stale_after_s = 120.0
        try:
            self.tags = {"run": str(run), "rank": str(int(rank)), "node": str(node or _node_id())}
            self._m = {spec.name: _make(spec, self.tags) for spec in TRAINING_METRICS}
            for spec in (STEPS, IMAGES_SEEN, CHECKPOINTS, RESTARTS, NAN_ROLLBACKS):
                _zero(self._m[spec.name])
            self._ok = True
            period = max(_report_interval_s() / 2.0, 0.5)
            threading.Thread(target=_refresh_loop, args=(weakref.ref(self), period),
                             name="progan-metrics-refresh", daemon=True).start()
        except Exception as exc:
            self._fail("__init__", exc)

    # -- counters and histograms

    def observe_step(self, images: int, step_seconds: float, data_wait_seconds: float, *,
                     backward_seconds: float | None = None, allreduce_seconds: float | None = None) -> None:
        """One training iteration: `step_seconds` is its wall time including `data_wait_seconds`.
        `backward_seconds` / `allreduce_seconds` where the loop measures them (see AllReduceTimer)."""
        if not self._ok:
            return
        try:
            self._last_call = time.monotonic()
            self._stale_after_s = max(120.0, 10.0 * float(step_seconds))
            m = self._m
            if images > 0:
                m[IMAGES_SEEN.name].inc(images)
            m[STEPS.name].inc(1)
            m[STEP_SECONDS.name].observe(max(float(step_seconds), 0.0))
            m[DATA_WAIT_SECONDS.name].observe(max(float(data_wait_seconds), 0.0))
            if backward_seconds is not None:
                m[BACKWARD_SECONDS.name].observe(max(float(backward_seconds), 0.0))
            if allreduce_seconds is not None:
                m[ALLREDUCE_SECONDS.name].observe(max(float(allreduce_seconds), 0.0))
        except Exception as exc:
            self._fail("observe_step", exc)

    def observe_checkpoint(self, seconds: float) -> None:
        if not self._ok:
            return
        try:
            self._last_call = time.monotonic()
            self._m[CHECKPOINTS.name].inc(1)
            self._m[CHECKPOINT_SAVE_SECONDS.name].observe(max(float(seconds), 0.0))
        except Exception as exc:
            self._fail("observe_checkpoint", exc)

    def count_restart(self) -> None:
        if self._ok:
            try:
                self._m[RESTARTS.name].inc(1)
            except Exception as exc:
                self._fail("count_restart", exc)

    def count_rollback(self) -> None:
        if self._ok:
            try:
                self._m[NAN_ROLLBACKS.name].inc(1)
            except Exception as exc:
                self._fail("count_rollback", exc)

    # -- gauges

    def observe_stats(self, stats: dict) -> None:
        """Sets the gauges from a stats record; keys it does not know are ignored, missing keys
        keep their last value. Values may be floats, ints or 0-d tensors."""
        if not self._ok:
            return
        try:
            self._last_call = time.monotonic()
            values = {}
            for key, spec in STAT_GAUGES.items():
                if key in stats and stats[key] is not None:
                    values[spec.name] = float(stats[key])
            phase = stats.get("phase")
            with self._lock:
                self._gauge_values.update(values)
                if phase is not None:
                    self._phase = str(phase)
            self._set_gauges(values, self._phase if phase is not None else None)
        except Exception as exc:
            self._fail("observe_stats", exc)

    def observe_swd(self, resolution: int, value: float) -> None:
        """The SWD at a phase end, one series per resolution (kept alive like the other gauges)."""
        if not self._ok:
            return
        try:
            self._last_call = time.monotonic()
            with self._lock:
                self._swd[str(int(resolution))] = float(value)
            self._m[SWD.name].set(float(value), tags={"resolution": str(int(resolution))})
        except Exception as exc:
            self._fail("observe_swd", exc)

    def _set_gauges(self, values: dict, phase: str | None) -> None:
        m = self._m
        with self._lock:
            swd = dict(self._swd)
        for resolution, value in swd.items():
            m[SWD.name].set(value, tags={"resolution": resolution})
        for name, value in values.items():
            m[name].set(value)
        if phase is not None:
            gauge = m[PHASE.name]
            for p in PHASES if phase in PHASES else PHASES + (phase,):
                gauge.set(1.0 if p == phase else 0.0, tags={"phase": p})

    def _refresh(self) -> None:
        """Re-sends the last gauge values so Ray's agent keeps the series (see module doc)."""
        if time.monotonic() - self._last_call > self._stale_after_s:
            return
        try:
            with self._lock:
                values, phase = dict(self._gauge_values), self._phase
            self._set_gauges(values, phase)
        except Exception as exc:
            self._fail("refresh", exc)

    def close(self) -> None:
        """Stops refreshing the gauges (they then age out of Ray's agent within ~20 s)."""
        self._closed = True


# ------------------------------------------------------------------------------------ pipeline

class PipelineMetrics:
    """Counts of the face pipeline: `count("read")` for every raw image read, `count(outcome)`
    for what became of it. One object per process: `PipelineMetrics.shared(run)`."""

    _by_run: dict = {}

    @classmethod
    def shared(cls, run: str) -> "PipelineMetrics":
        """This process's object for `run`: a Ray Data task worker or actor runs many batches,
        and each would otherwise register the metrics again."""
        if run not in cls._by_run:
            cls._by_run[run] = cls(run)
        return cls._by_run[run]

    def __init__(self, run: str):
        self._fail = _Once("PipelineMetrics")
        self._ok = False
        try:
            tags = {"run": str(run), "node": _node_id()}
            self._read = _make(PIPELINE_IMAGES_READ, tags)
            self._faces = _make(PIPELINE_FACES, tags)
            _zero(self._read)
            for outcome in OUTCOMES:
                _zero(self._faces, {"outcome": outcome})
            self._ok = True
        except Exception as exc:
            self._fail("__init__", exc)

    def count(self, outcome: str, n: int = 1) -> None:
        if not self._ok or n <= 0:
            return
        try:
            if outcome == "read":
                self._read.inc(n)
            elif outcome in OUTCOMES:
                self._faces.inc(n, tags={"outcome": outcome})
            else:
                self._fail(f"count({outcome!r})", f"unknown outcome; known: read, {', '.join(OUTCOMES)}")
        except Exception as exc:
            self._fail("count", exc)


# ------------------------------------------------------------------------------------ all-reduce timing

class AllReduceTimer:
    """A DDP communication hook that does the default all-reduce (average over ranks) and
    remembers when each gradient bucket's all-reduce was in flight:

        timer = AllReduceTimer()
        G_ddp.register_comm_hook(None, timer.hook); D_ddp.register_comm_hook(None, timer.hook)
        ... after the step: metrics.observe_step(..., allreduce_seconds=timer.take())

    `take()` returns the time during which at least one all-reduce was in flight since the last
    call (the union of the buckets' intervals, so overlapping buckets count once) and resets."""

    def __init__(self):
        self._lock = threading.Lock()
        self._intervals: list[list[float]] = []

    def hook(self, state, bucket):
        import torch.distributed as dist

        group = state if state is not None else dist.group.WORLD
        tensor = bucket.buffer()
        tensor.div_(dist.get_world_size(group))
        start = time.perf_counter()
        interval = [start, start]
        with self._lock:
            self._intervals.append(interval)
        fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()

        def done(f):
            interval[1] = time.perf_counter()
            return f.value()[0]

        return fut.then(done)

    def take(self) -> float:
        with self._lock:
            intervals, self._intervals = sorted(self._intervals), []
        total, end = 0.0, -math.inf
        for s, e in intervals:
            if e > end:
                total += e - max(s, end)
                end = e
        return total


# ------------------------------------------------------------------------------------ launcher

class LauncherMetrics:
    """The launcher's own gauges on http://127.0.0.1:PORT/metrics (prometheus_client; the launcher
    is not a Ray worker, so Ray's agents do not export it). `address` is "127.0.0.1:PORT" for
    start_prometheus(extra_targets=...), or None when it could not start (one line is logged)."""

    def __init__(self, run: str, max_workers: int, min_workers: int | None = None, port: int = 0):
        self._fail = _Once("LauncherMetrics")
        self.address: str | None = None
        self._server = None
        try:
            from prometheus_client import CollectorRegistry, Gauge, start_http_server

            self.registry = CollectorRegistry(auto_describe=True)
            values = {LAUNCHER_MAX_WORKERS: max_workers, LAUNCHER_MIN_WORKERS: min_workers or max_workers,
                      LAUNCHER_START_TIME: time.time()}
            for spec, value in values.items():
                Gauge(spec.name, spec.help, spec.tags, registry=self.registry).labels(run=str(run)).set(value)
            self._server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
            self.address = f"127.0.0.1:{self._server.server_address[1]}"
        except Exception as exc:
            self._fail("__init__", exc)

    def stop(self) -> None:
        try:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
        except Exception as exc:
            self._fail("stop", exc)


def describe() -> str:
    """A table of every metric as Prometheus stores it (`python -m monitoring.metrics`)."""
    rows = [("name in Prometheus", "type", "labels (besides Ray's)", "meaning")]
    for spec in ALL_METRICS:
        rows.append((spec.exported, spec.kind, ",".join(spec.tags), spec.help))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:{widths[2]}}  {r[3]}" for r in rows)


if __name__ == "__main__":
    print(describe())
