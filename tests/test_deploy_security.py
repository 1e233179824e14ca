"""`deploy up` is secure unless told otherwise, keeps its state folder private, refuses folders
that are not its own, checks the environment first and does not trip over TIME-WAIT ports.

No Flower process is started: the SuperLink's start is replaced by a stand-in that records
its arguments and stops the deployment there.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys

import pytest

from fedaug_flwr import deploy
from fedaug_flwr.deploy import LocalDeployment, State, port_is_free
from fedaug_flwr.launch import RunOutcome, free_port


def mode(path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


class Started(Exception):
    """The stand-in SuperLink stops `up` here."""


@pytest.fixture
def superlink_args(monkeypatch) -> list[list[str]]:
    started: list[list[str]] = []

    def start(self):
        started.append(list(self.extra_args))
        raise Started

    monkeypatch.setattr(deploy.SuperLink, "start", start)
    return started


def up(state_dir, *extra: str) -> None:
    port = free_port()
    node_port = free_port()
    while node_port == port:
        node_port = free_port()
    ports = ["--superlink-port", str(port), "--supernode-port", str(node_port)]
    deploy.main(["--state-dir", str(state_dir), "up", "--num-supernodes", "1", *ports, *extra])


def test_up_is_secure_by_default_private_and_keeps_no_ca_key(tmp_path, superlink_args, capsys):
    state_dir = tmp_path / "state"
    with pytest.raises(Started):
        up(state_dir)
    args = superlink_args[0]
    assert "--ssl-certfile" in args and "--enable-supernode-auth" in args
    assert "WARNING" not in capsys.readouterr().err
    assert mode(state_dir) == 0o700 and mode(state_dir / "tls") == 0o700
    assert mode(state_dir / "tls" / "server.key") == 0o600
    assert not (state_dir / "tls" / "ca.key").exists()

    with pytest.raises(Started):
        up(state_dir, "--keep-ca-key")
    assert mode(state_dir / "tls" / "ca.key") == 0o600


def test_insecure_must_be_asked_for_and_is_warned_about_on_every_start(
    tmp_path, superlink_args, capsys
):
    for _ in range(2):
        with pytest.raises(Started):
            up(tmp_path / "state", "--insecure")
        assert "WARNING: starting an INSECURE: no TLS" in capsys.readouterr().err
    assert superlink_args == [[], []]
    assert not (tmp_path / "state" / "tls").exists()


def test_status_and_run_say_which_mode_is_up(tmp_path, monkeypatch, capsys):
    deployment = LocalDeployment(tmp_path / "state")
    deployment.make_state_dir()
    plan = {"secure": False, "data_paths": [], "data_sizes": []}
    State(plan, "127.0.0.1:1", str(tmp_path / "cli")).save(deployment.state_dir)
    assert deployment.status()["mode"] == "INSECURE: no TLS, no SuperNode authentication"

    monkeypatch.setattr(LocalDeployment, "running", lambda self: ["superlink"])
    monkeypatch.setattr(
        deploy, "flwr_run", lambda *a: RunOutcome("1", "finished:completed", "", "")
    )
    deployment.run({})
    assert "is INSECURE: no TLS, no SuperNode authentication" in capsys.readouterr().err

    State({**plan, "secure": True}, "127.0.0.1:1", "").save(deployment.state_dir)
    assert deployment.status()["mode"] == "secure: TLS + SuperNode authentication"
    deployment.run({})
    assert "is secure: TLS + SuperNode authentication" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["notes.txt", "keys"])
def test_a_state_dir_with_other_content_is_refused_and_never_cleaned(
    tmp_path, superlink_args, capsys, content
):
    state_dir = tmp_path / "project"
    state_dir.mkdir()
    if content == "keys":  # a name `up` uses, in a folder `up` did not make
        (state_dir / "keys").mkdir()
        (state_dir / "keys" / "id_ecdsa").write_text("someone's key")
    else:
        (state_dir / content).write_text("mine")
    before = sorted(str(p) for p in state_dir.rglob("*"))
    for command in (["up"], ["down", "--clean"]):
        with pytest.raises(SystemExit) as exit_info:
            deploy.main(["--state-dir", str(state_dir), *command])
        assert exit_info.value.code == 2
        assert "holds files that `deploy up` did not make" in capsys.readouterr().err
    assert sorted(str(p) for p in state_dir.rglob("*")) == before
    assert superlink_args == []


def test_a_state_dir_that_is_a_link_or_someone_elses_is_refused(tmp_path, superlink_args, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(SystemExit):
        deploy.main(["--state-dir", str(tmp_path / "link"), "up"])
    assert "is a symbolic link" in capsys.readouterr().err
    if os.geteuid() == 0:  # only root can give a folder away
        os.chown(target, 65534, 65534)
        with pytest.raises(SystemExit):
            deploy.main(["--state-dir", str(target), "status"])
        assert "belongs to uid 65534, not to you" in capsys.readouterr().err
    assert superlink_args == [] and list(target.iterdir()) == []


def test_a_python_without_flower_is_told_what_to_do_and_nothing_is_made(
    tmp_path, monkeypatch, superlink_args, capsys
):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python3"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_info:
        up(tmp_path / "state")
    assert exit_info.value.code == 2
    assert "flower-superlink, flower-supernode, flwr not found" in capsys.readouterr().err
    assert not (tmp_path / "state").exists() and superlink_args == []


def test_a_port_whose_last_connection_is_in_time_wait_is_free():
    """`down` then `up` at once: the SuperLink's port still has connections in TIME-WAIT."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC do
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end waits in TIME-WAIT
        client.close()
        assert not port_is_free(port)  # still listening
    assert "TIME_WAIT" in time_wait_states(port)
    assert port_is_free(port)


def time_wait_states(port: int) -> set[str]:
    states = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            states.add("TIME_WAIT" if fields[3] == "06" else fields[3])
    return states


def test_a_saved_state_records_the_mode(tmp_path):
    state = State({"secure": True}, "127.0.0.1:1", "")
    state.save(tmp_path)
    assert json.loads((tmp_path / deploy.STATE_FILE).read_text())["plan"]["secure"] is True
