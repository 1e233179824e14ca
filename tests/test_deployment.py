"""The real thing on loopback: a SuperLink and three SuperNodes as separate processes.

Each test brings a deployment up with ``fedaug_flwr.deploy`` (its own state
folder, Flower homes and free ports), runs the app end to end with ``flwr
run`` and checks the results folder. One deployment is insecure and has
clients that fail on purpose (one raises, one SuperNode is killed mid-round);
the other uses TLS and SuperNode authentication and refuses a SuperNode whose
key was never registered. Every process is stopped by its own process group,
even when a test fails, and the tests check that nothing is left and that
nothing listened beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedaug_flwr.credentials import make_node_keys
from fedaug_flwr.deploy import (
    CONNECTION,
    DeploymentError,
    LocalDeployment,
    Plan,
    group_members,
    port_is_free,
)
from fedaug_flwr.faults import ENV_VAR
from fedaug_flwr.launch import (
    APP_DIR,
    SuperNode,
    SuperNodeRefused,
    flwr_env,
    free_port,
    run_status,
    to_overrides,
)
from fedaug_flwr.results import SUMMARY
from tests.data_files import real_digits, write_idx_folder, write_npz
from tests.sockets import is_loopback, listening_addresses

pytestmark = pytest.mark.deployment

RUN_TIMEOUT_S = 480
# Small but complete; generous round-timeout: honest clients on a busy 2-core box can be slow.
# No generator-quality check or privacy audit: each spawns ClientApp processes for nothing this
# file tests (together 49 s of a 177 s run once measured); test_privacy_wiring.py and
# test_quality.py cover them.
TINY_RUN = {
    "cvae-rounds": 1,
    "clf-rounds": 1,
    "num-synthetic": 10,
    "fraction-evaluate": 0.0,  # clients are still evaluated once, at the end
    "eval-batch-size": 500,
    "round-timeout": 300.0,
    "quality-samples": 0,
    "privacy-audit": False,
}


def free_port_run(count: int) -> int:
    """A first port such that it and the next ``count - 1`` are free on loopback."""
    for _ in range(50):
        first = free_port()
        if first + count < 65535 and all(port_is_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports")


def loopback_plan(data_paths: tuple[str, ...], secure: bool = False) -> Plan:
    first = free_port_run(len(data_paths) + 1)  # the SuperLink, then one per SuperNode
    return Plan(len(data_paths), data_paths, first, first + 1, secure)


def our_processes(deployment: LocalDeployment) -> list[int]:
    state = deployment.state()
    return [pid for record in state.processes for pid in group_members(record.pid)]


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    """A LocalDeployment in tmp_path; always brought down, and checked to leave nothing."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.flwr must stay untouched
    (tmp_path / "home").mkdir()
    local = LocalDeployment(tmp_path / "deployment")
    yield local
    local.down()
    groups = [p.process.pid for p in (local.superlink, *local.supernodes) if p and p.process]
    leftovers = [pid for group in groups for pid in group_members(group)]
    assert leftovers == [], f"processes left behind: {leftovers}"
    assert not (tmp_path / "home" / ".flwr").exists()


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("sites")
    first, second, third = (real_digits(150, offset=10 + i) for i in range(3))
    return [
        str(write_npz(folder / "site-0.npz", *first)),
        str(write_idx_folder(folder / "site-1", *second)),
        str(write_npz(folder / "site-2.npz", *third)),
    ]


def run_and_read(deployment: LocalDeployment, tmp_path: Path, overrides: dict) -> dict:
    output_dir = tmp_path / "results"
    log = (tmp_path / "flwr-run.log").open("w")
    outcome = deployment.run(
        {**TINY_RUN, **overrides, "output-dir": str(output_dir)},
        stream=log,
        timeout_s=RUN_TIMEOUT_S,
    )
    log.close()
    assert outcome.ok, f"{outcome}; see {tmp_path / 'flwr-run.log'}"
    assert outcome.output_dir == str(output_dir)
    return json.loads((output_dir / SUMMARY).read_text())


def interrupt_a_run(deployment: LocalDeployment, run_config: dict) -> str:
    """Start ``deploy run`` as a user would, press Ctrl-C once the ServerApp works; its run id."""
    command = [
        sys.executable,
        "-m",
        "fedaug_flwr.deploy",
        "--state-dir",
        str(deployment.state_dir),
        "run",
        "--run-config",
        to_overrides(run_config),
    ]
    process = subprocess.Popen(
        command,
        cwd=APP_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # A terminal's Ctrl-C reaches a process that handles SIGINT; a test run started
        # in the background ignores SIGINT, and its children would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    run_id = ""
    try:
        for line in process.stdout:
            if match := re.search(r"Successfully started run (\d+)", line):
                run_id = match.group(1)
            # The first lines the server logs can be missed by `flwr run --stream`, which
            # attaches after the run starts: any of the run's own log lines will do.
            if "writes its results to" in line or "[fedaug] phase '" in line:
                os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
                break
        rest = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, rest
    assert "interrupted" in rest and run_id
    return run_id


def failed(failures: list[dict]) -> dict[int, str]:
    return {failure["node-id"]: failure["reason"] for failure in failures}


def test_insecure_deployment_survives_a_raising_client_and_a_killed_supernode(
    deployment, site_data, tmp_path
):
    # node 0: own .npz, killed (its whole SuperNode) during the CVAE round;
    # node 1: own IDX folder, raises in the final evaluation;
    # node 2: no data path, Dirichlet partition 2 of 3 of the bundled digits.
    plan = loopback_plan((site_data[0], site_data[1], ""))
    faults = {0: {ENV_VAR: "train.cvae@0=kill"}, 1: {ENV_VAR: "evaluate.clf@1:0"}}
    state = deployment.up(plan, node_env=faults)
    assert len(set(state.node_ids)) == 3
    addresses = listening_addresses(our_processes(deployment))
    assert {port for _, port in addresses} >= {plan.superlink_port, plan.supernode_port}
    assert addresses and all(is_loopback(address) for address, _ in addresses)

    summary = run_and_read(deployment, tmp_path, {"min-clients": 2})

    node_0, node_1, node_2 = state.node_ids
    assert summary["status"] == "completed" and summary["data"]["num-clients"] == 3
    assert node_0 in failed(summary["cvae"]["rounds"][0]["failures"])
    assert len(summary["cvae"]["rounds"][0]["train-per-client"]) == 2
    assert node_0 in failed(summary["imputation"]["failures"])
    final_failures = failed(summary["final"]["failures"])
    assert final_failures.keys() == {node_0, node_1}
    assert "injected test fault: evaluate.clf on partition 1" in final_failures[node_1]
    assert summary["final"]["clients"]["num-clients"] == 1.0
    clients = {client["node-id"]: client for client in summary["clients"]}
    assert clients.keys() == {node_1, node_2}
    assert clients[node_1]["own-data"] and not clients[node_2]["own-data"]
    assert sum(clients[node_1][k] for k in ("real-train", "val", "test")) == 150
    assert "final-test" in clients[node_2]
    assert not deployment.status()["processes"][1]["running"]  # node 0's SuperNode is dead

    # `down` works from another shell, by the recorded process ids
    down = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedaug_flwr.deploy",
            "--state-dir",
            str(deployment.state_dir),
            "down",
        ],
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert down.returncode == 0, down.stderr
    assert "stopped supernode-2, supernode-1, superlink" in down.stdout
    assert deployment.state() is None


def test_secure_deployment_with_supernode_auth_refuses_an_unknown_key(
    deployment, site_data, tmp_path
):
    plan = loopback_plan(tuple(site_data), secure=True)
    state = deployment.up(plan)
    with pytest.raises(DeploymentError, match="a deployment is already up in"):
        deployment.up(plan)
    tls = deployment.tls_dir
    assert "Uvicorn running on https://127.0.0.1" in Path(state.processes[0].log).read_text()
    cli_config = (Path(state.flwr_home) / "config.toml").read_text()
    assert "root-certificates" in cli_config and "insecure" not in cli_config

    intruder = SuperNode(
        tmp_path / "intruder",
        state.superlink_address,
        {"partition-id": 0, "num-partitions": 3},
        root_certificates=tls / "ca.crt",
        auth_private_key=make_node_keys(tmp_path / "intruder-keys", "intruder").private_key,
    )
    try:
        intruder.start()
        with pytest.raises(SuperNodeRefused, match="Failed to activate SuperNode"):
            intruder.wait_until_connected()
    finally:
        intruder.stop()

    # Ctrl-C on `deploy run` stops the run in the SuperLink too and leaves no summary ...
    interrupted_dir = tmp_path / "interrupted"
    run_id = interrupt_a_run(deployment, {**TINY_RUN, "output-dir": str(interrupted_dir)})
    env = flwr_env(Path(state.flwr_home))
    assert run_status(env, CONNECTION, run_id)[0] == "finished:stopped"
    assert not (interrupted_dir / SUMMARY).exists()

    # ... and the deployment runs the app again, to the end
    summary = run_and_read(deployment, tmp_path, {"min-clients": 3, "imputation": "none"})

    assert summary["status"] == "completed"
    assert summary["data"]["num-clients"] == 3  # the intruder never joined
    assert {client["node-id"] for client in summary["clients"]} == set(state.node_ids)
    assert all(client["own-data"] and "final-test" in client for client in summary["clients"])
    assert summary["imputation"]["failures"] == [] and summary["final"]["failures"] == []
    addresses = listening_addresses(our_processes(deployment))
    assert addresses and all(is_loopback(address) for address, _ in addresses)
