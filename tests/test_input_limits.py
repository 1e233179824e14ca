"""Input the run cannot work with is refused at once, with the number that is wrong.

- ``num-synthetic`` whose images cannot fit in a client's memory;
- ``min-clients`` above the number of SuperNodes: in a simulation (all nodes
  register at once) the run fails as soon as their number has settled; in a
  deployment the server waits, counting down in the log.
"""

from __future__ import annotations

import logging

import pytest
from flwr.app import Context, RecordDict

import client_app
from fedaug_flwr import federation, phases, pipeline
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.strategies import PhaseError
from server_app import build_server_app
from tests.local_grid import SMALL_RUN, LocalGrid

pytestmark = pytest.mark.usefixtures("in_process_run")

TWO_NODES = [{"partition-id": i, "num-partitions": 2} for i in range(2)]


def test_num_synthetic_that_cannot_fit_in_memory_is_refused_with_the_number(tmp_path):
    too_many = 10**12
    with pytest.raises(ConfigError, match=r"'num-synthetic' = 1000000000000 needs about \d+"):
        build_server_app()(
            UnusedGrid(), _context({"num-synthetic": too_many, "output-dir": str(tmp_path / "run")})
        )
    assert not (tmp_path / "run").exists()
    AppConfig.from_run_config({"num-synthetic": 100_000})  # a large but possible k is fine


class UnusedGrid:
    """A grid the server must not use: the run is refused before."""

    def get_node_ids(self):
        raise AssertionError("the server asked for SuperNodes: the config was not refused")

    send_and_receive = get_node_ids


def _context(run_config: dict) -> Context:
    return Context(1, 1, {}, RecordDict(), run_config)


class SimulatedGrid(LocalGrid):
    """Nodes registered at once, as in Flower's simulation."""


def test_too_few_simulated_supernodes_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(federation, "SIMULATION_GRIDS", (SimulatedGrid,))
    monkeypatch.setattr(phases, "NODE_WAIT_S", 5.0)  # without the check: fail in 5 s
    config = AppConfig.from_run_config(
        {**SMALL_RUN, "min-clients": 3, "output-dir": str(tmp_path / "run")}
    )
    grid = SimulatedGrid(client_app.app, TWO_NODES)
    with pytest.raises(
        PhaseError, match=r"the simulation has 2 SuperNodes, fewer than min-clients=3"
    ):
        pipeline.run(grid, config, run_id=1)
    assert grid.delivered == []


def test_waiting_for_supernodes_counts_down_in_the_log():
    now = [0.0]
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    federation.log.addHandler(handler)
    try:
        grid = LocalGrid(client_app.app, TWO_NODES)  # not a simulation
        with pytest.raises(PhaseError, match=r"only 2 SuperNodes connected after 30 s"):
            federation.wait_for_nodes(
                grid,
                3,
                timeout=30.0,
                clock=lambda: now[0],
                sleep=lambda s: now.__setitem__(0, now[0] + s),
            )
    finally:
        federation.log.removeHandler(handler)
    assert lines == [
        f"[fedaug] waiting for SuperNodes: 2 of min-clients=3 connected; giving up in {s} s"
        for s in (30, 20, 10)
    ]
