"""`deploy down` signals only processes it started, recognised by pid, start time and FLWR_HOME.

Uses plain ``sleep`` processes as stand-ins for SuperLink / SuperNode process
groups, so these run in a second.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time

import pytest

from fedaug_flwr.deploy import LocalDeployment, Plan, ProcessRecord, group_members, stop_recorded


def start_group(script: str, home: str) -> subprocess.Popen:
    """A shell in a new process group (like our SuperLink/SuperNodes) with FLWR_HOME set."""
    return subprocess.Popen(
        ["sh", "-c", script], env={**os.environ, "FLWR_HOME": home}, start_new_session=True
    )


@pytest.fixture
def cleanup():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        for pid in group_members(process.pid):
            os.kill(pid, 9)
        process.wait(timeout=10)


def test_a_record_that_no_longer_matches_is_never_signalled(tmp_path, cleanup):
    process = start_group("sleep 300 & wait", str(tmp_path / "home"))
    cleanup.append(process)
    time.sleep(0.3)
    record = ProcessRecord.of("superlink", process, tmp_path / "log", tmp_path / "home")
    # the same pid started at another time, or with another FLWR_HOME, is not ours
    reused = dataclasses.replace(record, start_ticks=record.start_ticks - 1, flwr_home="/other")
    assert not reused.alive() and reused.members() == []
    assert stop_recorded(reused) is False
    assert process.poll() is None and len(group_members(process.pid)) == 2

    assert stop_recorded(record, grace_s=5) is True
    assert group_members(process.pid) == []


def test_leftovers_of_a_dead_leader_are_found_by_their_flwr_home(tmp_path, cleanup):
    home = str(tmp_path / "home")
    process = start_group("sleep 300 & exit 0", home)  # the leader exits, its child stays
    cleanup.append(process)
    process.wait(timeout=10)
    record = ProcessRecord(
        "supernode-0", process.pid, start_ticks=1, log="", flwr_home=home
    )  # leader gone: only its FLWR_HOME tells its leftovers
    assert not record.alive() and len(record.members()) == 1

    assert stop_recorded(record, grace_s=5) is True
    assert group_members(process.pid) == []


def test_down_and_status_without_a_deployment(tmp_path):
    deployment = LocalDeployment(tmp_path / "none")
    assert deployment.down() == []
    assert deployment.status() == {"state-dir": str(tmp_path / "none"), "up": False}


def test_node_configs_follow_the_plan():
    plan = Plan(3, ("/data/a.npz", "", "/data/c"))
    assert plan.node_config(0) == {"partition-id": 0, "data-path": "/data/a.npz"}
    assert plan.node_config(1) == {"partition-id": 1, "num-partitions": 3}
    assert Plan(2).node_config(1) == {"partition-id": 1, "num-partitions": 2}
