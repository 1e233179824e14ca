"""Waiting for the SuperNodes a run needs (``min-clients``), server side.

In a simulation every SuperNode registers at once when the run starts, so the
number of nodes is known as soon as it stops changing: fewer than
``min-clients`` can never become enough, and the run fails at once. In a
deployment SuperNodes may connect later: the server waits up to a timeout and
says in the log how many are connected and how long it will still wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedaug_flwr.strategies import PhaseError

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
