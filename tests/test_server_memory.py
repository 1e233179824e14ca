"""The server's memory at many clients: a round's messages in waves (``max-in-flight``)
with the same results, and no client model kept once it is aggregated.

The real pipeline and ClientApp run in this process (``LocalGrid``).
"""

from __future__ import annotations

import json

import pytest

import client_app
from fedaug_flwr import pipeline, waves
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.results import SUMMARY
from tests.data_files import real_digits, write_npz
from tests.local_grid import SMALL_RUN, LocalGrid

pytestmark = pytest.mark.usefixtures("in_process_run")

SMALL = {**SMALL_RUN, "clf-rounds": 2, "quality-samples": 0}


class CountingGrid(LocalGrid):
    """LocalGrid that remembers how many messages each ``send_and_receive`` carried."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sizes: list[int] = []
        self.replies: list = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.batch_sizes.append(len(messages))
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies += [(reply.metadata.message_type, reply) for reply in replies]
        return replies


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("node-data")
    return [
        {
            "partition-id": i,
            "data-path": str(write_npz(folder / f"site-{i}.npz", *real_digits(90, offset=i))),
        }
        for i in range(3)
    ]


def run(nodes, tmp_path, max_in_flight: int) -> tuple[dict, CountingGrid]:
    grid = CountingGrid(client_app.app, nodes)
    config = AppConfig.from_run_config(
        {**SMALL, "max-in-flight": max_in_flight, "output-dir": str(tmp_path / str(max_in_flight))}
    )
    output_dir = pipeline.run(grid, config, run_id=1)
    return json.loads((output_dir / SUMMARY).read_text()), grid


def without_timing(section: dict) -> dict:
    return {k: v for k, v in section.items() if "timing" not in k and k != "seconds"}


def test_waves_of_one_message_give_the_results_of_whole_rounds(nodes, tmp_path):
    whole, whole_grid = run(nodes, tmp_path, max_in_flight=0)
    waved, waved_grid = run(nodes, tmp_path, max_in_flight=1)

    assert max(whole_grid.batch_sizes) == 3  # a round's messages at once
    assert max(waved_grid.batch_sizes) == 1  # never more than one waiting
    assert sum(waved_grid.batch_sizes) == sum(whole_grid.batch_sizes)
    for phase in ("cvae", "classifier"):
        for a, b in zip(whole[phase]["rounds"], waved[phase]["rounds"], strict=True):
            assert without_timing(a) == without_timing(b)
    assert whole["clients"] == waved["clients"]
    assert whole["final"] == waved["final"]


class SlowGrid:
    """Each call takes 6 s of a fake clock and answers every message."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.calls: list[tuple[list, float | None]] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.calls.append((list(messages), timeout))
        self.clock[0] += 6.0
        return [f"reply to {m}" for m in messages]


def test_the_round_keeps_one_deadline_and_late_waves_are_not_sent(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(waves.time, "monotonic", lambda: clock[0])
    inner = SlowGrid(clock)
    replies = waves.WavedGrid(inner, max_in_flight=2).send_and_receive(
        ["a", "b", "c", "d", "e"], timeout=10.0
    )
    # the second wave gets what is left of the 10 s; the third finds the deadline passed
    assert [(sent, timeout) for sent, timeout in inner.calls] == [
        (["a", "b"], 10.0),
        (["c", "d"], 4.0),
    ]
    assert replies == ["reply to a", "reply to b", "reply to c", "reply to d"]


def test_max_in_flight_zero_is_the_grid_itself_and_negative_is_refused():
    grid = object()
    assert waves.in_waves(grid, 0) is grid  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max-in-flight"):
        AppConfig.from_run_config({"max-in-flight": -1})


def test_no_client_model_is_kept_after_its_round_is_aggregated(nodes, tmp_path):
    _, grid = run(nodes, tmp_path, max_in_flight=0)
    train_replies = [reply for kind, reply in grid.replies if kind.startswith("train.")]
    assert {kind for kind, _ in grid.replies if kind.startswith("train.")} == {
        "train.cvae",
        "train.clf",
    }
    assert len(train_replies) == 3 * (1 + 2)  # 3 clients, 1 CVAE and 2 classifier rounds
    for reply in train_replies:
        assert not reply.has_error()
        assert len(reply.content.array_records) == 0  # released once aggregated
        assert len(reply.content.metric_records) > 0  # the numbers are kept
