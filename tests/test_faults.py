"""Clients that fail mid-run: the run goes on, records each failure, and fails only without a model.

The real pipeline and the real ClientApp run in this process (``LocalGrid``).
Failures are injected with the test-only ``FEDAUG_TEST_FAULTS`` hook, a node
whose data path is missing, and a node that never answers (a dead SuperNode).
The same faults against real SuperNode processes are in test_deployment.py.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import client_app
from fedaug_flwr import phases, pipeline
from fedaug_flwr.config import AppConfig
from fedaug_flwr.faults import ENV_VAR, InjectedFault, parse_faults
from fedaug_flwr.results import FAILURE, SUMMARY, load_state_dict
from fedaug_flwr.strategies import PhaseError
from tests.data_files import real_digits, write_idx_folder, write_npz
from tests.local_grid import FIRST_NODE_ID, SMALL_RUN, LocalGrid

pytestmark = pytest.mark.usefixtures("in_process_run")


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> list[str]:
    """Three nodes' own data: two .npz files (grey levels, and 0/1) and one IDX folder."""
    folder = tmp_path_factory.mktemp("node-data")
    first, second, third = (real_digits(120, offset=i) for i in range(3))
    return [
        str(write_npz(folder / "site-0.npz", *first)),
        str(write_idx_folder(folder / "site-1", *second)),
        str(write_npz(folder / "site-2.npz", (third[0] > 127).astype("uint8"), third[1])),
    ]


def node_id(index: int) -> int:
    return FIRST_NODE_ID + index


def failed_nodes(failures: list[dict]) -> dict[int, str]:
    return {failure["node-id"]: failure["reason"] for failure in failures}


def test_run_survives_failing_clients_and_records_each_failure(own_data, tmp_path, monkeypatch):
    # node 0 raises in the CVAE round, node 1 in the classifier's evaluation,
    # node 3's data path is gone, node 4 never answers: 3 of 5 always remain.
    monkeypatch.setenv(ENV_VAR, "train.cvae@0,evaluate.clf@1:1")
    nodes = [{"partition-id": i, "data-path": path} for i, path in enumerate(own_data)]
    nodes += [{"partition-id": 3, "data-path": str(tmp_path / "gone.npz")}]
    nodes += [{"partition-id": 4, "num-partitions": 5}]
    grid = LocalGrid(client_app.app, nodes, silent=[node_id(4)])
    config = AppConfig.from_run_config({**SMALL_RUN, "output-dir": str(tmp_path / "run")})

    output_dir = pipeline.run(grid, config, run_id=1)

    summary = json.loads((output_dir / SUMMARY).read_text())
    assert summary["status"] == "completed" and not (output_dir / FAILURE).exists()
    missing = f"data-path '{tmp_path / 'gone.npz'}' does not exist"
    no_reply = "no reply within round-timeout (30 s): node down or too slow"
    cvae_failures = failed_nodes(summary["cvae"]["rounds"][0]["failures"])
    assert cvae_failures.keys() == {node_id(0), node_id(3), node_id(4)}
    assert "injected test fault: train.cvae on partition 0" in cvae_failures[node_id(0)]
    assert missing in cvae_failures[node_id(3)]
    assert cvae_failures[node_id(4)] == no_reply
    assert len(summary["cvae"]["rounds"][0]["train-per-client"]) == 2
    assert failed_nodes(summary["imputation"]["failures"]).keys() == {node_id(3), node_id(4)}
    classifier_round = summary["classifier"]["rounds"][0]
    assert sorted(failure["node-id"] for failure in classifier_round["failures"]) == sorted(
        [node_id(3), node_id(4)]  # training
        + [node_id(1), node_id(3), node_id(4)]  # evaluation
    )
    assert len(classifier_round["evaluate-per-client"]) == 2
    assert classifier_round["evaluate"]["num-clients"] == 2.0
    assert failed_nodes(summary["final"]["failures"]).keys() == {node_id(3), node_id(4)}
    # the three healthy nodes, on their own data, are fully reported
    clients = summary["clients"]
    assert [c["node-id"] for c in clients] == [node_id(0), node_id(1), node_id(2)]
    assert all(c["own-data"] and "final-test" in c for c in clients)
    assert [c["real-train"] + c["val"] + c["test"] for c in clients] == [120, 120, 120]
    assert summary["final"]["clients"]["num-clients"] == 3.0


def test_run_fails_with_a_reason_when_a_phase_gets_too_few_clients(own_data, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "train.cvae@0, train.cvae@1")
    nodes = [{"partition-id": i, "data-path": path} for i, path in enumerate(own_data)]
    grid = LocalGrid(client_app.app, nodes)
    config = AppConfig.from_run_config({**SMALL_RUN, "output-dir": str(tmp_path / "run")})

    with pytest.raises(PhaseError, match=r"train.cvae round 1: only 1 of 3 clients answered"):
        pipeline.run(grid, config, run_id=2)

    failure = json.loads((tmp_path / "run" / FAILURE).read_text())
    assert failure["status"] == "failed"
    assert "need 2" in failure["error"] and "injected test fault" in failure["error"]
    assert not (tmp_path / "run" / SUMMARY).exists()
    assert not (tmp_path / "run" / "cvae.pt").exists()
    # nothing was asked of the clients after the failed phase
    assert {kind for _, kind in grid.delivered} == {"train.cvae"}


class InterruptedGrid(LocalGrid):
    """Ctrl-C arrives while the classifier phase is under way."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train.clf" for m in messages):
            raise KeyboardInterrupt
        return super().send_and_receive(messages, timeout=timeout)


def test_interrupted_run_leaves_only_whole_files_and_can_be_rerun(own_data, tmp_path):
    nodes = [{"partition-id": i, "data-path": path} for i, path in enumerate(own_data)]
    config = AppConfig.from_run_config({**SMALL_RUN, "output-dir": str(tmp_path / "run")})
    output_dir = tmp_path / "run"

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(InterruptedGrid(client_app.app, nodes), config, run_id=3)

    assert not (output_dir / SUMMARY).exists()  # no summary: not a completed run
    assert json.loads((output_dir / FAILURE).read_text())["status"] == "interrupted"
    assert load_state_dict(output_dir / "cvae.pt")  # written whole, loadable as weights only
    assert not [p.name for p in output_dir.iterdir() if p.name.endswith(".tmp")]

    pipeline.run(LocalGrid(client_app.app, nodes), config, run_id=4)

    summary = json.loads((output_dir / SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["run-id"] == 4
    assert not (output_dir / FAILURE).exists()
    assert load_state_dict(output_dir / "classifier.pt")


@pytest.mark.parametrize(
    "spec", ["train.cvae", "train.cvae@x", "train.cvae@0=explode", "train@0", "train.cvae@0:r1"]
)
def test_fault_hook_rejects_a_malformed_spec(spec):
    with pytest.raises(ValueError, match=rf"{ENV_VAR} entry '.+' must look like"):
        parse_faults(spec)


def test_fault_hook_matches_type_partition_and_round():
    (any_round, one_round) = parse_faults("query.impute@2=kill, evaluate.clf@1:3")
    assert any_round.action == "kill" and any_round.matches("query.impute", 2, 0)
    assert not any_round.matches("query.impute", 1, 0)
    assert one_round.matches("evaluate.clf", 1, 3) and not one_round.matches("evaluate.clf", 1, 0)


def test_kill_fault_outside_a_deployment_raises_instead(monkeypatch):
    from tests.conftest import make_context, make_message

    monkeypatch.setenv(ENV_VAR, "query.impute@0=kill")
    from flwr.app import RecordDict

    with pytest.raises(InjectedFault, match="needs a flower-supernode parent"):
        client_app.app(make_message(RecordDict(), "query.impute"), make_context(0, 3))


def test_two_supernodes_with_the_same_partition_id_are_refused(own_data, tmp_path):
    nodes = [{"partition-id": 0, "data-path": path} for path in own_data[:2]]
    config = AppConfig.from_run_config(
        {**SMALL_RUN, "imputation": "none", "output-dir": str(tmp_path / "run")}
    )
    with pytest.raises(PhaseError, match=r"SuperNodes 1000 and 1001 both have partition-id 0"):
        pipeline.run(LocalGrid(client_app.app, nodes), config, run_id=5)
    assert not (tmp_path / "run" / SUMMARY).exists()


class ReversedGrid(LocalGrid):
    """Replies arrive in the opposite order of the nodes (as they may from a SuperLink)."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(super().send_and_receive(messages, timeout=timeout)))


def test_answers_to_every_node_come_in_partition_order_whatever_the_arrival_order():
    echo = ClientApp()

    @echo.query("echo")
    def answer(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        metrics = MetricRecord({"partition-id": partition})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    grid = ReversedGrid(echo, [{"partition-id": i} for i in (2, 0, 1)])
    answers, failures = phases.send_to_all(
        grid, grid.get_node_ids(), "query.echo", RecordDict, 30.0, 3
    )
    assert [a["partition-id"] for a in answers] == [0, 1, 2] and failures == []
