"""A round's messages sent in waves: at most ``max-in-flight`` waiting at once.

Flower's strategies and the app's own phases hand a whole round to
``grid.send_and_receive``, which stores every message in the SuperLink before the
first reply comes back. With two actors training and 1,000 clients, 998 model-sized
messages (3.7 MB each for ExquisiteNet) wait their turn, on top of the replies the
round needs anyway: the server's memory grows by two models per client
(``bench.many_clients``, docs/performance.md). :class:`WavedGrid` wraps the run's
grid and sends a round ``max_in_flight`` messages at a time, each wave's replies
collected before the next wave goes out, within the round's one timeout. The clients
compute exactly what they would have (nothing they do depends on when a message
arrives) and the phases sort replies by partition, so results do not change.

Flower's ``Grid`` has no such option, and its strategies call ``send_and_receive``
themselves: wrapping the grid is the one place that covers every phase.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class WavedGrid(Grid):
    """``grid`` with ``send_and_receive`` in waves of ``max_in_flight`` messages; every
    other call goes to ``grid`` unchanged."""

    def __init__(self, grid: Grid, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.grid = grid
        self.max_in_flight = max_in_flight
        self.waves_sent = 0

    def set_run(self, run_id: Any) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """The replies of every wave, all of them within ``timeout`` seconds (one deadline
        for the round, as an unwaved call has); a wave that finds the deadline passed is
        not sent, and its nodes count as not having answered."""
        pending = list(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            wave = pending[: self.max_in_flight]
            del pending[: self.max_in_flight]  # a sent wave is not kept here
            replies.extend(self.grid.send_and_receive(wave, timeout=left))
            self.waves_sent += 1
        return replies


def in_waves(grid: Grid, max_in_flight: int) -> Grid:
    """``grid`` itself when ``max_in_flight`` is 0 (everything at once), else waved."""
    return grid if max_in_flight == 0 else WavedGrid(grid, max_in_flight)
