"""N Ray nodes on this machine, all on loopback: the one way this project starts local Ray nodes
(`launch.py --nodes N`, `python -m data_pipeline`, the tests).

Each node is a real raylet (`ray.cluster_utils.Cluster`). By default every node gets two logical
CPUs and one `trainslot`: the training worker takes a CPU and the slot, so workers spread one per
node and each node keeps a CPU for Ray Data's tasks (with one CPU per node, Ray Data's tasks
found no CPU beside the training workers and the ingest hung). Ray must be kept on loopback
(`keep_ray_on_loopback`) before it is first imported, or every node advertises the machine's
network address instead of 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from base.errors import UserError
from base.ports import check_port_free, free_port

CPUS_PER_NODE = 2
# A custom resource that these nodes carry, one per node: it pins one training worker per node
# and leaves the node's other CPU to the data pipeline's Ray Data tasks. launch.py passes its
# name to progan.training.train_loop.build_trainer for these nodes; cluster/'s configs for real clusters give
# their worker nodes one each too.
TRAIN_SLOT = "trainslot"
METRIC_PORT_VARIABLES = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")
# The cluster that Ray's own processes query when given no address: Ray Train's placement-group
# cleaner asks the state API whether the run's controller is alive with no address, which, without
# this variable, is "the latest cluster started on this machine" (/tmp/ray/ray_current_cluster):
# another run's, which did not know the controller, so the cleaner removed this run's placement group.
ADDRESS_VARIABLE = "RAY_ADDRESS"
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str | None) -> bool:
    """Whether the Ray cluster at `address` is this machine's own on loopback: none given (local
    nodes to start), or 127.x / localhost."""
    return not address or address.startswith(("127.", "localhost"))


def keep_ray_on_loopback(address: str | None = None) -> None:
    """For local nodes or a cluster joined on loopback (`is_loopback(address)`), makes every Ray
    process started from here bind and advertise 127.0.0.1 only. Ray reads the variable once,
    when it is first imported: call this before anything imports ray (a late call would leave
    gcs_server, the raylets and the agents listening on every interface)."""
    if is_loopback(address):
        os.environ[LOOPBACK_VARIABLE] = "0"


def local_gpu_count() -> int:
    """This machine's GPUs as Ray counts them (NVML, within CUDA_VISIBLE_DEVICES). Ray's own count
    rather than torch's: importing torch here would hold up the cluster's start. Imports Ray: call
    keep_ray_on_loopback() first."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    try:
        manager = get_accelerator_manager_for_resource("GPU")
        count = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
    except Exception:
        return 0
    return count if visible is None else min(count, len(visible))


def _gpus_per_node(nodes: int) -> int:
    """The machine's GPUs shared out evenly among the nodes (check_gpus_for_nodes has refused
    fewer GPUs than nodes when they are to be used)."""
    return local_gpu_count() // nodes


def check_gpus_for_nodes(nodes: int, use_gpu: bool | None) -> None:
    """Refuses, before Ray starts, local nodes that could not each get a GPU: with fewer GPUs than
    nodes every node would get none and the run would quietly train on the CPUs. `use_gpu`:
    cluster.use_gpu (true, false, or None: auto). Raises a one-line UserError saying what to pass."""
    if use_gpu is False:
        return
    keep_ray_on_loopback()  # the count imports Ray; these nodes are local
    gpus = local_gpu_count()
    if gpus == 0 and use_gpu:
        raise UserError("cluster.use_gpu=true: Ray sees no GPU on this machine; "
                        "add cluster.use_gpu=auto or cluster.use_gpu=false to train on the CPUs")
    if 0 < gpus < nodes:
        raise UserError(f"--nodes {nodes}: this machine has {gpus} GPU{'s' * (gpus > 1)}, fewer than the nodes, "
                        f"so no node would get one and training would run on the CPUs; pass --nodes {gpus} "
                        f"(one GPU per node) or add cluster.use_gpu=false to train on the CPUs")


def check_address(address: str) -> None:
    """A cluster to join must answer at HOST:PORT within seconds (Ray itself would wait minutes)."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected 'auto' or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                         f"start one with `ray start --head`, or leave out --address for a local one")


def check_cluster(address: str | None, nodes: int, use_gpu: bool | None, dashboard_port: int) -> None:
    """Before Ray starts: a cluster to join answers, or local nodes can get their dashboard port
    and, when they are to use GPUs, a GPU each."""
    if address:
        check_address(address)
    else:
        check_port_free("--dashboard-port", dashboard_port)
        check_gpus_for_nodes(nodes, use_gpu)


@contextlib.contextmanager
def temporary_environ(values: dict[str, str | None]) -> Iterator[None]:
    """Sets environment variables (None: unsets one) for the processes started inside the block,
    then puts back what was there before (unset ones are unset again)."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def token_folder() -> Path:
    """Where the launcher keeps its runs' tokens: a folder only the user can open, under the user's
    cache folder (never a run folder: no secret goes there)."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "progan" / "ray-auth"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    return folder


@contextlib.contextmanager
def token_authentication(name: str) -> Iterator[Path | None]:
    """Token authentication for the local nodes this process is about to start: without it their
    dashboard ran any job that anyone on this machine POSTed to 127.0.0.1. A fresh random token
    per run, in a file only the user can read (0600, in token_folder()), is named to every Ray
    process started inside the block and to this driver; the file is removed and the variables
    put back at the end. Ray reads them once, when it is first imported, so this must come before
    anything imports ray (the GPU check does): yields None, changing nothing, when Ray is already
    imported here or the user has chosen RAY_AUTH_MODE themselves (theirs to keep). (With
    RAY_AUTH_MODE=token, Ray's dashboard HTTP API, job submission included, and its gRPC servers ask
    every client for the token that RAY_AUTH_TOKEN_PATH names; a RAY_AUTH_TOKEN set would win.)"""
    if os.environ.get("RAY_AUTH_MODE") is not None or "ray" in sys.modules:
        yield None
        return
    handle, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".token", dir=token_folder())  # mode 0600
    with os.fdopen(handle, "w") as file:
        file.write(secrets.token_urlsafe(32))
    try:
        with temporary_environ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path, "RAY_AUTH_TOKEN": None}):
            yield Path(path)
    finally:
        Path(path).unlink(missing_ok=True)


def token_hint(token: Path) -> str:
    """How a person reaches a run whose Ray asks for the token in `token`."""
    return (f"this run's Ray asks for its token (a new one each run): paste the contents of {token} "
            f"when the dashboard asks; for `ray` commands set RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}")


class LocalCluster:
    """Context manager: starts the head (with the dashboard on 127.0.0.1) and N-1 worker nodes,
    connects this process as the driver, and tears everything down on exit."""

    def __init__(self, nodes: int, dashboard_port: int = 8265, include_dashboard: bool = True,
                 system_config: dict | None = None, free_metric_ports: bool = False,
                 cpus_per_node: int = CPUS_PER_NODE, log_to_driver: bool = True):
        """`system_config`: Ray's `_system_config` for the head (e.g. a shorter
        metrics_report_interval_ms). `free_metric_ports`: the dashboard and the autoscaler export
        their metrics on fixed ports (44227, 44217) that another cluster on this machine may hold;
        with this, the head takes free loopback ports instead (they are in the session's Prometheus
        discovery file either way). `cpus_per_node`: logical CPUs of each node (the data pipeline
        shares the machine's out). `log_to_driver`: the workers' output on this process's console."""
        if nodes < 1:
            raise ValueError(f"--nodes: got {nodes}, allowed: >= 1")
        self.nodes, self.dashboard_port, self.include_dashboard = nodes, dashboard_port, include_dashboard
        self.system_config, self.free_metric_ports = dict(system_config or {}), free_metric_ports
        self.cpus_per_node, self.log_to_driver = cpus_per_node, log_to_driver
        self.cluster = None
        self.dashboard_url = ""
        self._pinned_address = contextlib.ExitStack()  # RAY_ADDRESS for start(), put back by shutdown()

    def _node_args(self) -> dict:
        return {"num_cpus": self.cpus_per_node, "num_gpus": _gpus_per_node(self.nodes),
                "resources": {TRAIN_SLOT: 1}}

    def start(self) -> "LocalCluster":
        keep_ray_on_loopback()  # effective only if ray is not imported yet: see the function
        # Train's print patch sends each worker print to the driver twice; plain stdout is enough
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        # no usage reporting from a local cluster: one actor process less to start
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Train's preemption watcher polls for cloud nodes being drained; these nodes are processes
        # here, and its actor would only take CPU time while the workers start
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # the head prestarts a Python worker per CPU for the first driver, but Train's actors each
        # start their own process (checked: those stayed idle), and starting them takes CPU time
        # just as Train's controller starts
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # Ray shows its own RayDeprecationWarnings once per module unless Python's warning options
        # are set (ray.util.annotations); the one it printed at every start came from Train's own
        # state export (ExecutionOptions.exclude_resources), nothing a user can act on. Python's
        # default filter, stated, leaves them to the defaults: hidden outside __main__.
        os.environ.setdefault("PYTHONWARNINGS", "default::DeprecationWarning:__main__")
        if self.include_dashboard:
            os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # Train runs in the dashboard
        import ray
        from ray.cluster_utils import Cluster

        head = {**self._node_args(), "include_dashboard": self.include_dashboard,
                "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port}
        if self.system_config:
            head["_system_config"] = self.system_config
        # read by the head's dashboard and autoscaler processes as they start
        ports = {key: str(free_port()) for key in METRIC_PORT_VARIABLES} if self.free_metric_ports else {}
        # The GCS port is chosen here so that every process of these nodes (raylets, and the
        # workers and actors they start) and this driver have RAY_ADDRESS pinned to this cluster
        # from the start: see ADDRESS_VARIABLE.
        gcs_port = free_port()
        head["gcs_server_port"] = gcs_port
        self._pinned_address.enter_context(temporary_environ({ADDRESS_VARIABLE: f"127.0.0.1:{gcs_port}"}))
        try:
            with temporary_environ(ports):
                self.cluster = Cluster(initialize_head=True, head_node_args=head)
            os.environ[ADDRESS_VARIABLE] = self.cluster.address  # the same, as Ray writes it
            for _ in range(self.nodes - 1):
                self.cluster.add_node(**self._node_args())
            context = ray.init(address=self.cluster.address, logging_level="WARNING", log_to_driver=self.log_to_driver)
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()  # the nodes started so far, and RAY_ADDRESS as it was
            raise
        self.dashboard_url = f"http://{context.dashboard_url}" if context.dashboard_url else ""
        return self

    def add_node(self):
        return self.cluster.add_node(**self._node_args())

    def remove_node(self, node) -> None:
        self.cluster.remove_node(node)

    @property
    def address(self) -> str:
        """The GCS address of these nodes (HOST:PORT)."""
        return self.cluster.address

    def shutdown(self) -> None:
        import ray
        try:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
                self.cluster = None
        finally:
            self._pinned_address.close()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


@contextlib.contextmanager
def ray_cluster(address: str | None, nodes: int, log_to_driver: bool = True, **local_args):
    """Joins the cluster at `address` ("auto": the running one), or starts `nodes` LocalCluster
    nodes (nothing beyond 127.0.0.1; `local_args` go to LocalCluster). Yields (the dashboard's
    URL or "", whether the nodes were started here); shuts down or disconnects at the end."""
    import ray

    if address:
        try:
            context = ray.init(address=address, logging_level="WARNING", log_to_driver=log_to_driver)
        except ConnectionError as exc:
            raise UserError(f"--address {address}: {str(exc).splitlines()[0]}")
        try:
            yield (f"http://{context.dashboard_url}" if context.dashboard_url else ""), False
        finally:
            ray.shutdown()
        return
    with LocalCluster(nodes, log_to_driver=log_to_driver, **local_args) as local:
        yield local.dashboard_url, True
