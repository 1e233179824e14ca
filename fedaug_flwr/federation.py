"""The SuperNodes of a run, server side: waiting for those it needs (``min-clients``)
and listing them in partition order.

In a simulation every SuperNode registers at once when the run starts, so the
number of nodes is known as soon as it stops changing: fewer than
``min-clients`` can never become enough, and the run fails at once. In a
deployment SuperNodes may connect later: the server waits up to a timeout and
says in the log how many are connected and how long it will still wait.

Flower's strategies draw each round's nodes with ``random.sample(grid.get_node_ids(), n)``
(``flwr.serverapp.strategy.strategy_utils.sample_nodes``, a module function the
strategies call, with no hook for the order). Node ids are random numbers the SuperLink
gives each SuperNode when it registers, listed in set order, so a seeded ``random`` drew
other partitions in every run of one config: at 100 clients and 10 a round, two runs of
one seed trained their CVAEs on different clients. :class:`PartitionOrderedGrid` lists
the nodes by the partition each holds (asked once, ``query.roster``); with each round's
draw seeded on its own (:func:`fedaug_flwr.strategies.seeded_draw`) the seed fixes the
draw, in a simulation, in a deployment and after a resume (new node ids).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedaug_flwr.strategies import PhaseError

if TYPE_CHECKING:
    from flwr.supercore.run import Run  # the type Grid.run has; Flower exports it nowhere else

log = logging.getLogger("flwr.fedaug")  # printed by Flower's own log handler

# Grids whose nodes are all registered when the run starts (Flower's simulation).
SIMULATION_GRIDS: tuple[type, ...] = (InMemoryGrid,)
NOTICE_EVERY_S = 10.0


def wait_for_nodes(
    grid: Grid,
    minimum: int,
    timeout: float,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Node ids once at least ``minimum`` nodes are connected (they register asynchronously)
    and their number has settled; :class:`PhaseError` when that cannot happen."""
    simulated = isinstance(grid, SIMULATION_GRIDS)
    deadline = clock() + timeout
    next_notice = clock()
    previous = -1
    while True:
        node_ids = sorted(grid.get_node_ids())
        count = len(node_ids)
        settled = count == previous
        if settled and count >= minimum:
            return node_ids
        if simulated and settled and 0 < count < minimum:
            raise PhaseError(
                f"the simulation has {count} SuperNodes, fewer than min-clients={minimum}: "
                f"lower min-clients to at most {count} or start more SuperNodes "
                "(num-supernodes)"
            )
        left = deadline - clock()
        if left <= 0:
            raise PhaseError(
                f"only {count} SuperNodes connected after {timeout:.0f} s; min-clients={minimum}"
            )
        if count < minimum and clock() >= next_notice:
            log.warning(
                "[fedaug] waiting for SuperNodes: %d of min-clients=%d connected; "
                "giving up in %.0f s",
                count,
                minimum,
                left,
            )
            next_notice = clock() + NOTICE_EVERY_S
        previous = count
        sleep(poll_s)


class PartitionOrderedGrid(Grid):
    """``grid`` listing its nodes in the order of the partitions they hold (``partitions``:
    partition id by node id); nodes it does not know (a SuperNode that joined later) come
    last, by node id. Everything else is ``grid``'s own."""

    def __init__(self, grid: Grid, partitions: Mapping[int, int]) -> None:
        self.grid = grid
        self.partitions = dict(partitions)

    def get_node_ids(self) -> list[int]:
        def key(node_id: int) -> tuple[bool, int, int]:
            return (node_id not in self.partitions, self.partitions.get(node_id, 0), node_id)

        return sorted(self.grid.get_node_ids(), key=key)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)
