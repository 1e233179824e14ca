"""The app on an existing, two-node Ray cluster (two ``ray start`` processes on this machine).

What ``--ray-address`` must give: Flower's ``ray.init`` attaches to the cluster
instead of starting a Ray of its own, and the client actors run on every node.
The cluster is started once for the module and stopped by process id, also
when a test fails (``tests/ray_cluster.py``).
"""

from __future__ import annotations

import io
import json
import time

import pytest

from fedaug_flwr import launch
from fedaug_flwr.cluster import describe_cluster
from fedaug_flwr.results import SUMMARY
from tests.conftest import TINY
from tests.ray_cluster import LocalRayCluster, processes_with_marker

DESCRIBE = "from fedaug_flwr.cluster import describe_cluster\nprint(json.dumps(describe_cluster()))"
# As the ServerApp would see it: this job's actors (one per 1-CPU node), not other jobs'.
OWN_ACTORS = """
from fedaug_flwr.cluster import actor_nodes

@ray.remote(num_cpus=1)
class ProbeActor:
    def node(self):
        return ray.get_runtime_context().get_node_id()

actors = [ProbeActor.remote() for _ in range(2)]
placed = sorted(ray.get([actor.node.remote() for actor in actors]))
job = ray.get_runtime_context().get_job_id()
print(json.dumps([placed, actor_nodes("ProbeActor", job_id=job), actor_nodes("ProbeActor", "ff")]))
"""
ACTORS = "from fedaug_flwr.cluster import actor_nodes\nprint(json.dumps(actor_nodes()))"


def test_without_ray_initialized_there_is_no_cluster_to_describe():
    assert describe_cluster() is None


@pytest.fixture(scope="module")
def cluster():
    started = time.monotonic()
    running = LocalRayCluster(nodes=2, cpus_per_node=1).start()
    print(f"two-node cluster up in {time.monotonic() - started:.0f} s")
    try:
        yield running
    finally:
        marker = str(running.folder)
        running.stop()
        assert processes_with_marker(marker) == [], "the cluster's processes outlived it"


@pytest.mark.ray_cluster
def test_the_cluster_is_described_with_its_nodes_and_resources(cluster):
    described = cluster.probe(DESCRIBE)
    assert described["num-nodes"] == described["alive-nodes"] == 2
    assert described["resources"]["CPU"] == 2
    assert sorted(node["head"] for node in described["nodes"]) == [False, True]
    for node in described["nodes"]:
        assert node["alive"] and node["address"] == "127.0.0.2"
        assert node["resources"]["CPU"] == 1 and "GPU" not in node["resources"]
        assert not any(key.startswith("node:") for key in node["resources"])
    assert described["client-actors"] == {}  # this job has none
    placed, own, other_job = cluster.probe(OWN_ACTORS)
    assert own == {node: 1 for node in placed} and len(own) == 2 and other_job == {}


@pytest.mark.ray_cluster
def test_a_run_on_the_cluster_uses_client_actors_on_both_nodes(cluster, tmp_path):
    log = io.StringIO()
    started = time.monotonic()
    outcome = launch.simulate(
        {**TINY, "quality-samples": 40, "output-dir": str(tmp_path / "run")},
        num_supernodes=4,
        num_cpus=1,
        ray_address=cluster.address,
        stream=log,
    )
    print(f"run on the cluster: {time.monotonic() - started:.0f} s")
    assert outcome.ok, log.getvalue()[-4000:]
    summary = json.loads((tmp_path / "run" / SUMMARY).read_text())
    assert summary["data"]["num-clients"] == 4
    # Flower's Ray attached to the cluster: the run's actors are in its actor table,
    # one per node (each node has 1 CPU, each client actor needs 1)
    per_node = cluster.probe(ACTORS)
    nodes = {node["node-id"] for node in cluster.probe(DESCRIBE)["nodes"]}
    assert set(per_node) == nodes and all(count >= 1 for count in per_node.values()), per_node
    assert "[ROUND 1/1]" in log.getvalue()
