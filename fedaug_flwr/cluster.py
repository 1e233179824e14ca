"""The Ray cluster a simulation runs on, described for ``summary.json``.

In a simulation, Flower's ``flwr-simulation`` process initializes Ray (a new,
local Ray, or the cluster named by ``RAY_ADDRESS``: ``docs/scale-out.md``) and
runs the ServerApp in the same process, so the ServerApp can ask Ray which
nodes it had. Flower initializes Ray when its simulation engine starts, which
may be after the ServerApp's ``main`` has begun: call :func:`describe_cluster`
when the run ends (when the summary is written). Everywhere else (a
deployment's ServerApp, a test, the notebook) Ray is not initialized and it
returns None; it never starts or attaches to a Ray itself.

For the pipeline (to be wired where the summary is assembled)::

    from fedaug_flwr.cluster import describe_cluster
    cluster = describe_cluster()
    if cluster is not None:
        summary["ray-cluster"] = cluster
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

CLIENT_ACTOR_CLASS = "ClientAppActor"  # Flower's actor class for simulated clients


def describe_cluster(actors: bool = True) -> dict[str, Any] | None:
    """The Ray cluster this process is connected to, or None when Ray is not initialized.

    ``{"address", "num-nodes", "alive-nodes", "resources", "nodes", "client-actors"}``:
    ``resources`` are the cluster's totals (CPU, GPU, memory, object store
    memory in bytes, ...); each node has its ``node-id``, ``address``,
    ``hostname``, ``alive``, ``head`` (the node the cluster was started on) and
    ``resources``. ``client-actors`` (with ``actors``) counts this job's
    Flower client actors per node id: where the clients of this run were
    trained (None if Ray cannot tell).
    """
    ray = sys.modules.get("ray")  # not imported: certainly not initialized (and stays so)
    if ray is None or not ray.is_initialized():
        return None
    nodes = [_node(node) for node in ray.nodes()]
    description: dict[str, Any] = {
        "address": ray.get_runtime_context().gcs_address,
        "num-nodes": len(nodes),
        "alive-nodes": sum(node["alive"] for node in nodes),
        "resources": _resources(ray.cluster_resources()),
        "nodes": nodes,
    }
    if actors:
        description["client-actors"] = actor_nodes(job_id=ray.get_runtime_context().get_job_id())
    return description


def actor_nodes(
    class_name: str = CLIENT_ACTOR_CLASS, job_id: str | None = None
) -> dict[str, int] | None:
    """How many actors of ``class_name`` (alive or ended) each node id ran, from Ray's GCS
    (no dashboard needed); only job ``job_id`` (hex) when given. None if Ray cannot
    tell (this reads Ray's internal actor table)."""
    try:
        from ray._private import state

        table = state.actors()
    except Exception:  # noqa: BLE001 - an internal API: a description without it is fine
        return None
    return dict(
        Counter(
            info["Address"]["NodeID"]
            for info in table.values()
            if info.get("ActorClassName", "").endswith(class_name)
            and (job_id is None or info.get("JobID") == job_id)
        )
    )


def _node(node: dict[str, Any]) -> dict[str, Any]:
    resources = node.get("Resources") or {}
    return {
        "node-id": node.get("NodeID"),
        "address": node.get("NodeManagerAddress"),
        "hostname": node.get("NodeManagerHostname"),
        "alive": bool(node.get("Alive")),
        "head": "node:__internal_head__" in resources,
        "resources": _resources(resources),
    }


def _resources(resources: dict[str, float]) -> dict[str, float]:
    """Ray's resource totals without its per-node marker resources (``node:<ip>``)."""
    return {
        key: (int(value) if float(value).is_integer() else value)
        for key, value in sorted(resources.items())
        if not key.startswith("node:")
    }
