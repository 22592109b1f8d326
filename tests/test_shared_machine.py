"""Runs that share a machine stay independent (issue 25): Ray's processes asked for "the cluster"
without an address (Ray Train's placement-group cleaner asks the state API whether the run's
controller is alive) found the cluster started last on the machine, another run's, which did not
know the controller, and the cleaner removed the run's placement group. A LocalCluster pins
RAY_ADDRESS to itself for everything it starts, and puts the variable back when it shuts down."""
import os
import subprocess
import sys
from pathlib import Path

from base.ports import free_port

REPO = Path(__file__).resolve().parents[1]

# another run's cluster on the same machine, started after ours, up until its stdin closes
OTHER_RUN = """
import sys
from base.ports import free_port
from cluster.local import LocalCluster
with LocalCluster(1, dashboard_port=free_port(), free_metric_ports=True, log_to_driver=False):
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_what_a_cluster_starts_asks_its_own_cluster_even_after_another_run_started(monkeypatch):
    import ray
    from ray.train.v2._internal.state.util import is_actor_alive
    from ray.util.placement_group import placement_group, placement_group_table

    from cluster.local import LocalCluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_STATE_TRACKING", raising=False)  # put back as it was afterwards
    local = LocalCluster(1, dashboard_port=free_port(), free_metric_ports=True)
    with local:
        assert os.environ["RAY_ADDRESS"] == local.address

        @ray.remote(num_cpus=0)
        class Probe:
            def ping(self):
                return True

        @ray.remote(num_cpus=0)
        def alive(actor_id: str):
            """What Train's PlacementGroupCleaner asks, from a process of this cluster."""
            return bool(is_actor_alive(actor_id=actor_id, timeout=30)), os.environ.get("RAY_ADDRESS")

        probe = Probe.remote()
        assert ray.get(probe.ping.remote())
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready(), timeout=60)
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a fresh shell
        other = subprocess.Popen([sys.executable, "-c", OTHER_RUN], cwd=REPO, env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert other.stdout.readline().strip() == "ready", "the other run's cluster did not start"
            found, address = ray.get(alive.remote(probe._actor_id.hex()), timeout=120)
            assert found, "a process of this cluster asked another run's cluster about its own actor"
            assert address == local.address
            assert placement_group_table(group)["state"] == "CREATED"
        finally:
            other.stdin.close()
            other.wait(timeout=120)
        assert other.returncode == 0
    assert "RAY_ADDRESS" not in os.environ  # as it was before the cluster started
