"""Every metric the project publishes, and the objects that publish them.

The metric names live here and in the Grafana dashboard JSON (monitoring/grafana/dashboards/),
nowhere else: other code calls the classes below, tests read the names from `ALL_METRICS`.

Training workers and the data pipeline's actors record through `ray.util.metrics`; each node's
Ray metrics agent exports them and the head lists every agent in the service-discovery file that
monitoring/prometheus.yml points at. Ray prefixes every name with `ray_` and gives counters the
`_total` suffix, so `progan_images_seen` is scraped as `ray_progan_images_seen_total{run, rank,
node, WorkerId, SessionName, ...}`. `WorkerId` changes whenever Ray Train restarts a worker:
the dashboard aggregates by the labels that matter (`sum by (rank)`, `max by (run)`).

Gauges are set when their value changes: the worker's Ray core re-exports a gauge's last value
every export interval while the process lives (checked with Ray 2.60: a gauge set once was still
scraped 10 s later at a 1 s interval), and its series ages out about two intervals after the
process is gone. Counters start at their first event; the dashboard reads a missing counter as 0
(`or on() vector(0)`).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

log = logging.getLogger("progan.monitoring")

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

    @property
    def exported(self) -> str:
        return "ray_" + self.name + ("_total" if self.kind == "counter" else "")

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
    return MetricSpec(name, "histogram", help, TRAIN_TAGS)


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
GRADIENT_NORM = _g("progan_critic_gradient_norm", "The critic's mean input-gradient norm on the penalty's images, "
                   "latest logged step (near max_resolution / resolution once the penalty holds).")
SCORE_REAL = _g("progan_critic_score_real", "Mean critic output on real images, latest logged step.")
SCORE_FAKE = _g("progan_critic_score_fake", "Mean critic output on generated images, latest logged step.")
SWD = _g("progan_swd_x1e3", "The paper's sliced Wasserstein distance x 1e3 (average of the pyramid levels) of the "
         "EMA generator against the shards, at the end of each phase of this resolution.", TRAIN_TAGS + ("resolution",))
IMAGES_PER_SECOND = _g("progan_images_per_second", "Throughput the training loop measured over its last log window.")
STEP_SECONDS = _h("progan_step_seconds", "Wall time of one training iteration, data wait included.")
DATA_WAIT_SECONDS = _h("progan_data_wait_seconds", "Time one iteration waited for its batch.")
BACKWARD_SECONDS = _h("progan_backward_seconds", "Time in backward passes during one iteration.")
CHECKPOINT_SAVE_SECONDS = _h("progan_checkpoint_save_seconds", "Time to write one checkpoint.")

# --- data pipeline actors
PIPELINE_IMAGES_READ = _c("progan_pipeline_images_read", "Raw images the face pipeline read.", PIPELINE_TAGS)
PIPELINE_FACES = _c("progan_pipeline_faces", "Pipeline results by outcome (kept, no_face, ...).",
                    PIPELINE_TAGS + ("outcome",))

TRAINING_METRICS = (IMAGES_SEEN, STEPS, CHECKPOINTS, RESTARTS, NAN_ROLLBACKS, RESOLUTION, PHASE, ALPHA,
                    WORLD_SIZE, LEARNING_RATE, LOSS_D, LOSS_G, GRADIENT_PENALTY, GRADIENT_NORM, SCORE_REAL,
                    SCORE_FAKE, SWD, IMAGES_PER_SECOND, STEP_SECONDS, DATA_WAIT_SECONDS, BACKWARD_SECONDS,
                    CHECKPOINT_SAVE_SECONDS)
PIPELINE_METRICS = (PIPELINE_IMAGES_READ, PIPELINE_FACES)
ALL_METRICS = TRAINING_METRICS + PIPELINE_METRICS

# observe_stats(): stats key -> gauge ("phase" is handled apart: it is a label, not a value)
STAT_GAUGES = {"resolution": RESOLUTION, "alpha": ALPHA, "world_size": WORLD_SIZE, "lr": LEARNING_RATE,
               "loss_d": LOSS_D, "loss_g": LOSS_G, "grad_penalty": GRADIENT_PENALTY, "grad_norm": GRADIENT_NORM,
               "score_real": SCORE_REAL, "score_fake": SCORE_FAKE, "img_per_s": IMAGES_PER_SECOND}


def never_raises(method):
    """Metrics must not stop training: a run holds hours of accelerator time, a metric is a line
    on a dashboard. A failure (a value that is no number, Ray's metrics agent gone) logs one
    warning per object and method (logger "progan.monitoring"); the call then returns None."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            failed = self.__dict__.setdefault("_failed", set())
            if method.__name__ not in failed:
                failed.add(method.__name__)
                log.warning("%s.%s: %s: %s; training goes on without this metric",
                            type(self).__name__, method.__name__, type(exc).__name__, exc)
    return guarded


def _make(spec: MetricSpec, default_tags: dict):
    from ray.util import metrics as ray_metrics

    if spec.kind == "histogram":
        metric = ray_metrics.Histogram(spec.name, spec.help, boundaries=list(SECONDS_BUCKETS), tag_keys=spec.tags)
    else:
        cls = ray_metrics.Counter if spec.kind == "counter" else ray_metrics.Gauge
        metric = cls(spec.name, spec.help, tag_keys=spec.tags)
    return metric.set_default_tags({k: v for k, v in default_tags.items() if k in spec.tags})


def _node_id() -> str:
    """The first 8 characters of Ray's node id ("local" without Ray: never start Ray to name it)."""
    import ray

    return ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else "local"


class TrainingMetrics:
    """One training worker's metrics. Create it once per worker process, inside the train loop:

        m = TrainingMetrics(run=run_name, rank=ctx.get_world_rank(), node="")  # "": Ray's node id
        if resumed_after_failure: m.count_restart()
        ... every step:   m.observe_step(local_batch, step_s, wait_s)    # step_s includes wait_s
        ... every log:    m.observe_stats(record)
        ... rank 0 saves: m.observe_checkpoint(save_s)

    `images` is what this worker trained on (its share of the global batch): summed over ranks it
    is the global throughput."""

    @never_raises
    def __init__(self, run: str, rank: int, node: str):
        self.tags = {"run": str(run), "rank": str(int(rank)), "node": str(node or _node_id())}
        self._m = {spec.name: _make(spec, self.tags) for spec in TRAINING_METRICS}

    @never_raises
    def observe_step(self, images: int, step_seconds: float, data_wait_seconds: float, *,
                     backward_seconds: float | None = None) -> None:
        """One training iteration: `step_seconds` is its wall time including `data_wait_seconds`."""
        m = self._m
        if images > 0:
            m[IMAGES_SEEN.name].inc(int(images))
        m[STEPS.name].inc(1)
        m[STEP_SECONDS.name].observe(float(step_seconds))
        m[DATA_WAIT_SECONDS.name].observe(float(data_wait_seconds))
        if backward_seconds is not None:
            m[BACKWARD_SECONDS.name].observe(float(backward_seconds))

    @never_raises
    def observe_checkpoint(self, seconds: float) -> None:
        self._m[CHECKPOINTS.name].inc(1)
        self._m[CHECKPOINT_SAVE_SECONDS.name].observe(float(seconds))

    @never_raises
    def count_restart(self) -> None:
        self._m[RESTARTS.name].inc(1)

    @never_raises
    def count_rollback(self) -> None:
        self._m[NAN_ROLLBACKS.name].inc(1)

    @never_raises
    def observe_stats(self, stats: dict) -> None:
        """Sets the gauges from a stats record; keys it does not know are ignored, missing keys
        keep their last value."""
        values = {spec.name: float(stats[key]) for key, spec in STAT_GAUGES.items() if stats.get(key) is not None}
        for name, value in values.items():
            self._m[name].set(value)
        phase = stats.get("phase")
        if phase is not None:
            for p in dict.fromkeys(PHASES + (str(phase),)):
                self._m[PHASE.name].set(float(p == phase), tags={"phase": p})

    @never_raises
    def observe_swd(self, resolution: int, value: float) -> None:
        """The SWD at a phase end, one series per resolution."""
        self._m[SWD.name].set(float(value), tags={"resolution": str(int(resolution))})


class PipelineMetrics:
    """Counts of the face pipeline: `count("read")` for every raw image read, `count(outcome)`
    for what became of it. One object per process and run: `PipelineMetrics.shared(run)` (a Ray
    Data worker runs many batches, and each would otherwise register the metrics again)."""

    _by_run: dict = {}

    @classmethod
    def shared(cls, run: str) -> "PipelineMetrics":
        if run not in cls._by_run:
            cls._by_run[run] = cls(run)
        return cls._by_run[run]

    @never_raises
    def __init__(self, run: str):
        tags = {"run": str(run), "node": _node_id()}
        self._read, self._faces = _make(PIPELINE_IMAGES_READ, tags), _make(PIPELINE_FACES, tags)

    @never_raises
    def count(self, outcome: str, n: int = 1) -> None:
        if outcome not in ("read",) + OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; known: read, {', '.join(OUTCOMES)}")
        if n > 0 and outcome == "read":
            self._read.inc(n)
        elif n > 0:
            self._faces.inc(n, tags={"outcome": outcome})


def describe() -> str:
    """A table of every metric as Prometheus stores it (`python -m monitoring.metrics`)."""
    rows = [("name in Prometheus", "type", "labels (besides Ray's)", "meaning")]
    rows += [(spec.exported, spec.kind, ",".join(spec.tags), spec.help) for spec in ALL_METRICS]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:{widths[2]}}  {r[3]}" for r in rows)


if __name__ == "__main__":
    print(describe())
