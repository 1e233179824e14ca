"""Interrupted runs resume from their checkpoint and end with the results of an
uninterrupted run, bit for bit; a write that fails mid-run ends the run with a
failure.json that says so.

The real pipeline and the real ClientApp run in this process (``LocalGrid``). A
Ctrl-C is raised when the server sends a chosen round's messages; the resumed run
gets a new grid whose nodes hold nothing (new SuperNodes, as after a restart). The
same through real Flower simulations is in test_experiments_runner.py.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os

import pytest

import client_app
from fedaug_flwr import pipeline, results
from fedaug_flwr.checkpoint import CHECKPOINT, Checkpoint, CheckpointError
from fedaug_flwr.config import AppConfig
from fedaug_flwr.protocol import message_round
from fedaug_flwr.results import FAILURE, SUMMARY
from tests.data_files import real_digits, write_npz
from tests.local_grid import SMALL_RUN, LocalGrid

pytestmark = pytest.mark.usefixtures("in_process_run")


@pytest.fixture(scope="module")
def four_nodes(tmp_path_factory) -> list[dict]:
    """Nodes with 100 real digits of their own each: a run of seconds."""
    folder = tmp_path_factory.mktemp("node-data")
    return [
        {"partition-id": i, "data-path": str(write_npz(folder / f"{i}.npz", *real_digits(100, i)))}
        for i in range(4)
    ]


@pytest.fixture(scope="module")
def nodes(four_nodes) -> list[dict]:
    return four_nodes[:3]


# Two rounds of each phase, generator quality on: every step of a run checkpoints once.
RUN = {**SMALL_RUN, "cvae-rounds": 2, "clf-rounds": 3, "quality-samples": 60}
# What differs between any two runs of one config: when, where, how long, which Flower run.
VOLATILE = ("run-id", "started-at", "finished-at", "output-dir", "timing-s", "resumed")


class Interrupted(LocalGrid):
    """Ctrl-C when the server sends the messages of ``message_type`` in ``server_round``."""

    def __init__(self, nodes: list[dict], message_type: str, server_round: int) -> None:
        super().__init__(client_app.app, nodes)
        self.stop_at = (message_type, server_round)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            if (message.metadata.message_type, message_round(message)) == self.stop_at:
                raise KeyboardInterrupt
        return super().send_and_receive(messages, timeout=timeout)


def comparable(summary: dict) -> dict:
    """The summary without what differs between two runs of one config anyway."""
    summary = copy.deepcopy(summary)
    for key in VOLATILE:
        summary.pop(key, None)
    summary["config"].pop("output-dir")
    for phase in ("cvae", "classifier"):
        summary.get(phase, {}).pop("round-timing-s", None)
    return summary


def run(tmp_path, name: str, overrides: dict, grid: LocalGrid) -> dict:
    config = AppConfig.from_run_config({**RUN, **overrides, "output-dir": str(tmp_path / name)})
    pipeline.run(grid, config, run_id=7)
    return json.loads((tmp_path / name / SUMMARY).read_text())


def interrupted_then_resumed(tmp_path, overrides: dict, at: tuple[str, int], nodes: list[dict]):
    """The summary of a run interrupted at ``at`` and started again, and the messages of
    its second attempt."""
    folder = tmp_path / "resumed"
    config = AppConfig.from_run_config({**RUN, **overrides, "output-dir": str(folder)})
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Interrupted(nodes, *at), config, run_id=1)
    assert (folder / CHECKPOINT).exists() and not (folder / SUMMARY).exists()
    failure = json.loads((folder / FAILURE).read_text())
    assert failure["status"] == "interrupted"
    second = LocalGrid(client_app.app, nodes)  # new nodes: no synthetic images kept
    pipeline.run(second, config, run_id=2)
    assert not (folder / CHECKPOINT).exists()  # not a result: gone once the run completed
    assert not (folder / FAILURE).exists()
    return json.loads((folder / SUMMARY).read_text()), second.delivered


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, nodes) -> dict:
    """One run never interrupted, with the torch threads of ``in_process_run`` (another
    number of threads may sum in another order: other bits)."""
    import torch

    from tests.local_grid import set_task_identity

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_task_identity()
    try:
        grid = LocalGrid(client_app.app, nodes)
        return run(tmp_path_factory.mktemp("whole"), "whole", {}, grid)
    finally:
        torch.set_num_threads(threads)


def sent(delivered: list[tuple[int, str]], message_type: str) -> int:
    return sum(kind == message_type for _, kind in delivered)


def test_a_run_interrupted_in_the_classifier_phase_resumes_with_the_same_results(
    tmp_path, uninterrupted, nodes
):
    resumed, delivered = interrupted_then_resumed(tmp_path, {}, ("train.clf", 3), nodes)
    assert comparable(resumed) == comparable(uninterrupted)
    assert resumed["resumed"][0]["from"] == "classifier round 2"
    # no CVAE round again, the imputation again (the nodes' synthetic images), one round
    assert sent(delivered, "train.cvae") == 0
    assert sent(delivered, "query.impute") == len(nodes)
    assert sent(delivered, "train.clf") == len(nodes)
    # the per-round timings of the rounds before the interruption are kept
    rounds = [row["round"] for row in resumed["classifier"]["round-timing-s"]]
    assert rounds == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "strategy",
    [
        {"clf-strategy": "fedavgm", "clf-fedavgm-lr": 0.5, "clf-fedavgm-momentum": 0.5},
        {"clf-strategy": "fedadam", "clf-fedadam-eta": 0.01},
    ],
    ids=["fedavgm", "fedadam"],
)
def test_a_server_optimizer_resumes_with_its_own_state(tmp_path, nodes, strategy):
    """FedAvgM's momentum and FedAdam's moments go into the checkpoint: without them the
    rounds after a resume would step from zero and end elsewhere."""
    settings = {**strategy, "clf-rounds": 3, "quality-samples": 0}
    whole = run(tmp_path, "whole", settings, LocalGrid(client_app.app, nodes))
    resumed, _ = interrupted_then_resumed(tmp_path, settings, ("train.clf", 3), nodes)
    assert resumed["resumed"][0]["from"] == "classifier round 2"
    assert comparable(resumed) == comparable(whole)


def test_a_run_interrupted_in_the_cvae_phase_resumes_with_the_same_results(
    tmp_path, uninterrupted, nodes
):
    resumed, delivered = interrupted_then_resumed(tmp_path, {}, ("train.cvae", 2), nodes)
    assert comparable(resumed) == comparable(uninterrupted)
    assert resumed["resumed"][0]["from"] == "cvae round 1"
    assert sent(delivered, "train.cvae") == len(nodes)


def test_a_run_interrupted_between_phases_takes_the_finished_ones_from_the_checkpoint(
    tmp_path, uninterrupted, nodes
):
    resumed, delivered = interrupted_then_resumed(tmp_path, {}, ("query.impute", 0), nodes)
    assert comparable(resumed) == comparable(uninterrupted)
    assert resumed["resumed"][0]["from"] == "after privacy-audit"  # the last step before
    assert sent(delivered, "train.cvae") == 0
    assert "generator-quality" in resumed["timing-s"]  # the time of the attempt that did it
    assert sent(delivered, "query.privacy") == 0  # the audit, too, is not done again


def test_the_nodes_sampled_after_a_resume_are_those_of_the_uninterrupted_run(tmp_path, four_nodes):
    """Flower samples each round's nodes with ``random``: 2 of 4 per round here, so a
    resume that did not restore the generator's state would train other nodes."""
    nodes = four_nodes
    sampled = {"fraction-train": 0.5, "clf-rounds": 4, "quality-samples": 0}
    whole = run(tmp_path, "whole", sampled, LocalGrid(client_app.app, nodes))
    resumed, _ = interrupted_then_resumed(tmp_path, sampled, ("train.clf", 3), nodes)
    assert comparable(resumed) == comparable(whole)
    trained = [len(r["train-per-client"]) for r in whole["classifier"]["rounds"]]
    assert trained == [2, 2, 2, 2]


def test_a_checkpoint_of_another_config_is_refused_and_kept(tmp_path, nodes):
    folder = tmp_path / "run"
    config = AppConfig.from_run_config({**RUN, "output-dir": str(folder)})
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Interrupted(nodes, "train.clf", 2), config, run_id=1)
    other = AppConfig.from_run_config({**RUN, "clf-rounds": 4, "output-dir": str(folder)})
    with pytest.raises(CheckpointError, match="clf-rounds: checkpoint 3, this run 4"):
        pipeline.run(LocalGrid(client_app.app, nodes), other, run_id=2)
    failure = json.loads((folder / FAILURE).read_text())
    assert "belongs to a run with another config" in failure["error"]
    assert Checkpoint.load(folder, config.to_run_config()).where() == "classifier round 1"


def test_a_checkpoint_from_before_a_new_key_resumes_when_the_key_keeps_its_default(tmp_path):
    folder = tmp_path / "run"
    config = AppConfig.from_run_config({**RUN, "output-dir": str(folder)}).to_run_config()
    older = {key: value for key, value in config.items() if key != "clf-compile"}
    Checkpoint(folder, older, 0.0).save()  # written before the app had clf-compile
    assert Checkpoint.load(folder, config).where() == "at the start"
    with pytest.raises(CheckpointError, match="clf-compile: checkpoint False, this run True"):
        Checkpoint.load(folder, {**config, "clf-compile": True})


def test_a_model_file_changed_since_the_checkpoint_is_refused(tmp_path, nodes):
    folder = tmp_path / "run"
    config = AppConfig.from_run_config({**RUN, "output-dir": str(folder)})
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Interrupted(nodes, "train.clf", 2), config, run_id=1)
    results.save_state_dict(folder / "cvae.pt", {"other": results.torch.zeros(1)})
    with pytest.raises(CheckpointError, match="cvae.pt is not the model the step 'cvae' saved"):
        pipeline.run(LocalGrid(client_app.app, nodes), config, run_id=2)


# ------------------------------------------------------------------ a full disk mid-run


def failing_writes(monkeypatch, after: int, spare: tuple[str, ...] = ()) -> list[str]:
    """From the ``after``-th write on, every file the run writes (but those named in
    ``spare``) fails half-way with ENOSPC, as on a full disk; returns the files written."""
    original, written = results.write_atomic, []

    def write_atomic(path, write):
        if len(written) >= after and path.name not in spare:

            def half_then_full(tmp):
                tmp.write_bytes(b"half a file")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            return original(path, half_then_full)
        written.append(path.name)
        return original(path, write)

    monkeypatch.setattr(results, "write_atomic", write_atomic)
    return written


def test_a_full_disk_mid_run_ends_it_with_a_failure_json_that_says_so(tmp_path, monkeypatch, nodes):
    written = failing_writes(monkeypatch, after=4, spare=(FAILURE,))
    folder = tmp_path / "run"
    config = AppConfig.from_run_config({**RUN, "output-dir": str(folder)})
    with pytest.raises(OSError, match="No space left on device"):
        pipeline.run(LocalGrid(client_app.app, nodes), config, run_id=1)
    failure = json.loads((folder / FAILURE).read_text())
    assert failure["status"] == "failed"
    assert "No space left on device" in failure["error"] and str(folder) in failure["error"]
    # nothing half-written: no temporary file left, no file with the half of the bytes
    names = {path.name for path in folder.iterdir()}
    assert not [name for name in names if name.endswith(".tmp")]
    assert names - {FAILURE} <= set(written) | {"cvae_samples.png", "probability_histograms.png"}
    assert SUMMARY not in names
    # the checkpoint written before is whole: the run resumes from it once there is space
    assert Checkpoint.load(folder, config.to_run_config()) is not None


def test_where_not_even_failure_json_can_be_written_the_error_goes_to_the_log(
    tmp_path, monkeypatch, caplog, capsys, nodes
):
    failing_writes(monkeypatch, after=2)
    folder = tmp_path / "run"
    config = AppConfig.from_run_config({**RUN, "output-dir": str(folder)})
    with caplog.at_level(logging.ERROR, logger="flwr"):
        with pytest.raises(OSError, match="No space left on device"):  # the run's own error
            pipeline.run(LocalGrid(client_app.app, nodes), config, run_id=1)
    assert not (folder / FAILURE).exists()
    said = f"{FAILURE} could not be written in {folder} either"
    assert said in caplog.text and said in capsys.readouterr().err


def test_the_launcher_refuses_a_checkpoint_of_another_config_before_starting_flower(
    tmp_path, capsys
):
    from fedaug_flwr import launch

    folder = tmp_path / "run"
    config = AppConfig.from_run_config({**RUN, "output-dir": str(folder)})
    Checkpoint(folder, config.to_run_config(), 0.0).save()
    overrides = " ".join(f"{key}={value!r}" for key, value in {**RUN, "clf-rounds": 4}.items())
    with pytest.raises(SystemExit) as stopped:
        launch.main(["--run-config", f"{overrides} output-dir='{folder}'"])
    assert stopped.value.code == 2
    assert "clf-rounds: checkpoint 3, this run 4" in capsys.readouterr().err
