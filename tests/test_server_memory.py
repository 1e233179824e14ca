"""The server's memory at many clients: no client model is kept once it is aggregated.

Flower's ``Strategy.start`` keeps a round's replies until the next round's are in;
``strategies.release_arrays`` empties them of their models after aggregation. The real
pipeline and ClientApp run in this process (``LocalGrid``).
"""

from __future__ import annotations

import pytest

import client_app
from fedaug_flwr import pipeline
from fedaug_flwr.config import AppConfig
from tests.data_files import real_digits, write_npz
from tests.local_grid import SMALL_RUN, LocalGrid

pytestmark = pytest.mark.usefixtures("in_process_run")


class KeepingGrid(LocalGrid):
    """LocalGrid that keeps a reference to every reply it hands to the server."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies += replies
        return replies


def test_no_client_model_is_kept_after_its_round_is_aggregated(tmp_path):
    nodes = [
        {
            "partition-id": i,
            "data-path": str(write_npz(tmp_path / f"site-{i}.npz", *real_digits(90, offset=i))),
        }
        for i in range(3)
    ]
    grid = KeepingGrid(client_app.app, nodes)
    config = {**SMALL_RUN, "clf-rounds": 2, "quality-samples": 0, "output-dir": str(tmp_path)}
    pipeline.run(grid, AppConfig.from_run_config(config), run_id=1)

    train_replies = [r for r in grid.replies if r.metadata.message_type.startswith("train.")]
    assert {r.metadata.message_type for r in train_replies} == {"train.cvae", "train.clf"}
    assert len(train_replies) == 3 * (1 + 2)  # 3 clients, 1 CVAE and 2 classifier rounds
    for reply in train_replies:
        assert not reply.has_error()
        assert len(reply.content.array_records) == 0  # released once aggregated
        assert len(reply.content.metric_records) > 0  # the numbers are kept
