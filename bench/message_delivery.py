"""Flower's simulation engine handing out messages: its own walk against the app's index.

The engine's thread asks the in-memory link state for every node's next message, every
node in turn, then waits 0.1 s, for as long as the simulation runs
(``fedaug_flwr/message_index.py``). This measures one such poll cycle (the wall time of
one thread that only computes: measure on a quiet machine) with a round's messages
stored, one per node as a strategy's round sends them: the first cycle, which hands them
out, and a cycle after that, which is what runs for the rest of the round while the
clients train. Both methods run on link states set up
as Flower's simulation sets them up, with the same messages.

    python -m bench.message_delivery --nodes 100 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from types import MethodType

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from bench.common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    print_table,
    ratio,
    save_results,
)
from fedaug_flwr import message_index

RUN_ID, TASK_ID = 7, 11
POLL_WAIT_S = 0.1  # the engine's wait between two cycles (vce_api.add_messages_to_queue)
CYCLES_PER_SAMPLE = 5


class SimulationLinkState:
    """An in-memory link state with ``num_nodes`` nodes and a run, set up as Flower's
    simulation sets it up, whose message methods are Flower's (``indexed=False``) or the
    app's index, whatever the class has now."""

    def __init__(self, num_nodes: int, indexed: bool) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id = TASK_ID, RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        self.nodes = list(_register_nodes(num_nodes, factory))
        self.state: InMemoryLinkState = factory.state()
        run = Run.create_empty(run_id=RUN_ID)
        run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
        self.state.run_ids[RUN_ID] = RunRecord(run=run)
        self.state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
        self.grid = InMemoryGrid(state_factory=factory)
        self.grid.set_run(run)
        self.use(indexed)

    def use(self, indexed: bool) -> None:
        get = message_index.get_message_ins if indexed else message_index._flower_get_message_ins
        store = (
            message_index.store_message_ins if indexed else message_index._flower_store_message_ins
        )
        self.state.get_message_ins = MethodType(get, self.state)
        self.state.store_message_ins = MethodType(store, self.state)

    def push(self, node: int, marker: int, ttl: float | None = None) -> None:
        """A message to the ``node``-th node, told apart by ``marker``."""
        content = RecordDict({"c": ConfigRecord({"marker": marker})})
        message = Message(content, dst_node_id=self.nodes[node], message_type="train", ttl=ttl)
        if not self.grid.push_messages([message]):
            raise RuntimeError("the link state refused a message")

    def poll(self, node: int, limit: int | None = 1, **kwargs) -> list[int]:
        """The markers of the messages handed out to the ``node``-th node."""
        got = self.state.get_message_ins(node_id=self.nodes[node], limit=limit, **kwargs)
        return [m.content["c"]["marker"] for m in got]

    def cycle(self) -> int:
        """One cycle of the engine's thread: every node's next message; how many."""
        return sum(len(self.poll(node)) for node in range(len(self.nodes)))


def measure(num_nodes: int, indexed: bool, repeats: int) -> dict:
    link = SimulationLinkState(num_nodes, indexed)
    for node in range(num_nodes):
        link.push(node, node)
    start = time.perf_counter()
    handed_out = link.cycle()
    first = time.perf_counter() - start
    if handed_out != num_nodes:
        raise RuntimeError(f"{handed_out} of {num_nodes} messages handed out")
    samples = []
    for _ in range(repeats):  # each sample: CYCLES_PER_SAMPLE cycles, for the clock's sake
        start = time.perf_counter()
        for _ in range(CYCLES_PER_SAMPLE):
            link.cycle()
        samples.append((time.perf_counter() - start) / CYCLES_PER_SAMPLE)
    after = statistics.median(samples)
    return {
        "nodes": num_nodes,
        "delivery": "indexed" if indexed else "Flower",
        "first cycle s": round(first, 7),
        "cycle after delivery s": round(after, 7),
        "share of a core in a round": round(after / (after + POLL_WAIT_S), 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.message_delivery", description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS_DIR / "message-delivery.json"))
    args = parser.parse_args(argv)
    rows = []
    for num_nodes in args.nodes:
        flower = measure(num_nodes, False, args.repeats)
        indexed = measure(num_nodes, True, args.repeats)
        speedup = ratio(flower["cycle after delivery s"], indexed["cycle after delivery s"])
        rows += [flower, {**indexed, "Flower / indexed": speedup}]
        print(f"[bench] {num_nodes} nodes: a cycle {speedup}x faster indexed", flush=True)
    columns = [*rows[0], "Flower / indexed"]
    print_table(f"a poll cycle, seconds (median of {args.repeats})", rows, columns)
    save_results(
        args.output,
        {
            "benchmark": "message-delivery",
            "machine": machine_info(),
            "repeats": args.repeats,
            "rows": rows,
            "load-average-at-end": load_average(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
