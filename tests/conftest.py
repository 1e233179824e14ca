"""Shared test helpers: tiny configs, real Flower Messages and Contexts."""

from __future__ import annotations

import time
import uuid

import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from fedaug_flwr.config import AppConfig

# The files that took longest (--durations, 2-core machine), longest first. `make test` hands
# whole files to two workers in collection order; a long file handed out last keeps one
# worker busy while the other has nothing left, so these are collected first.
LONGEST_FILES = (
    "test_deployment.py",
    "test_experiments_runner.py",
    "test_campaign_jobs.py",
    "test_gpu_check.py",
    "test_flwr_run.py",
    "test_simulation.py",
    "test_notebook.py",
    "test_finetune.py",
    "test_ray_cluster.py",
    "test_resume.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, each file's tests in their own order (a stable sort)."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# Small enough for seconds per phase on 2 CPU cores, big enough to be real.
TINY = {
    "cvae-rounds": 1,
    "clf-rounds": 1,
    "num-synthetic": 40,
    "dirichlet-beta": 0.5,
    "eval-batch-size": 256,
    "quality-samples": 140,
    "quality-epochs": 1,
    "pretrain-samples": 140,
    "pretrain-epochs": 1,
    "finetune-rounds": 2,  # the default preset's 15 made each finetune fixture a minute
    "finetune-local-epochs": 1,
}


@pytest.fixture
def in_process_run():
    """For the real pipeline run in this process (``LocalGrid``): one torch thread (tests
    share 2 cores with other work: more threads only slow each other down) and the task
    identity that building Messages outside a Flower run needs."""
    import torch

    from tests.local_grid import set_task_identity

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_task_identity()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config(tmp_path) -> AppConfig:
    return AppConfig.from_run_config({**TINY, "output-dir": str(tmp_path / "out")})


def make_message(content: RecordDict, message_type: str, dst_node_id: int = 7) -> Message:
    """A real server-to-client Message, built from Metadata (works outside a run)."""
    metadata = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=1,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content, metadata=metadata)


def make_context(partition_id: int, num_partitions: int, node_id: int = 7) -> Context:
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )
