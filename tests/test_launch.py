"""The launcher without a Flower run: what it stops, its deadline, and the checks it makes before
anything starts (environment, --run-config text and files, the output folder)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from fedaug_flwr import launch
from fedaug_flwr.config import ConfigError
from fedaug_flwr.launch import _live_pids, group_members, processes_with_home, stop_process_tree
from fedaug_flwr.processes import environ_value
from fedaug_flwr.results import OutputFolderError, folder_lock

# ---------------------------------------------------------------- stopping a run


def test_stopping_takes_processes_that_left_the_process_group(tmp_path):
    """Flower's SuperExec (and with it flwr-simulation and Ray) starts in a session of its
    own: signalling the SuperLink's process group alone leaves them running."""
    home = tmp_path / "home"
    leader = subprocess.Popen(
        ["sh", "-c", "setsid sleep 300 & sleep 300 & wait"],
        env={**os.environ, "FLWR_HOME": str(home)},
        start_new_session=True,
    )
    # until the setsid'd one has left the group: a busy machine can show its shell forked
    # but not yet in a session of its own
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = set(processes_with_home(home))
        escaped = found - set(group_members(leader.pid))
        if len(found) == 3 and escaped:
            break
        time.sleep(0.1)
    assert len(escaped) == 1  # the setsid'd one
    try:
        stop_process_tree(leader, home, grace_s=5)
        assert processes_with_home(home) == [] and leader.returncode is not None
    finally:
        for pid in processes_with_home(home):
            os.kill(pid, 9)
        leader.wait(timeout=10)


def test_stopping_takes_a_descendant_whose_environment_no_longer_shows_the_home(tmp_path):
    """Ray's agents overwrite their environment with their process title, so FLWR_HOME does
    not find them; stopping still takes them by their parent, and still SIGKILLs one that
    ignores SIGTERM after that parent has gone."""
    home, marker = tmp_path / "home", f"{os.getpid()}-{time.time_ns()}"
    agent = "trap '' TERM; exec sleep 300"  # outlives its parent: it ignores SIGTERM
    raylet = tmp_path / "raylet.sh"
    raylet.write_text(f'env -i FEDAUG_AGENT={marker} /bin/sh -c "{agent}" &\nwait\n')
    leader = subprocess.Popen(
        ["sh", "-c", f"setsid sh {raylet} & wait"],
        env={**os.environ, "FLWR_HOME": str(home)},
        start_new_session=True,
    )

    def agents() -> list[int]:
        return [pid for pid in _live_pids() if environ_value(pid, "FEDAUG_AGENT") == marker]

    deadline = time.monotonic() + 10
    while not agents() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agents() and not set(agents()) & {*group_members(leader.pid)}
    try:
        stop_process_tree(leader, home, grace_s=2)
        time.sleep(0.5)
        assert agents() == []
    finally:
        for pid in agents():
            os.kill(pid, 9)
        leader.wait(timeout=10)


# ------------------------------------------------------------- a hung flwr run


def test_the_timeout_is_a_real_deadline_even_when_the_run_prints_nothing(tmp_path, monkeypatch):
    fake = tmp_path / "flwr"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  run) echo "Successfully started run 5"; exec sleep 20 ;;\n'
        '  stop) echo stopped >> "$(dirname "$0")/stops" ;;\n'
        '  list) echo \'{"runs": [{"status": "finished:stopped", "status-details": ""}]}\' ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(launch, "bin_path", lambda name: str(fake))
    started = time.monotonic()
    outcome = launch.flwr_run(tmp_path, {}, {}, stream=io.StringIO(), timeout_s=2)
    assert time.monotonic() - started < 10
    assert (outcome.run_id, outcome.status) == ("5", "finished:stopped")
    assert "timed out after 2 s" in outcome.details
    assert (tmp_path / "stops").read_text() == "stopped\n"  # the run was stopped, too


# ----------------------------------------------------- checks before anything runs


def no_superlink(monkeypatch):
    def must_not_start(self):
        raise AssertionError("a SuperLink was started")

    monkeypatch.setattr(launch.SuperLink, "start", must_not_start)


def test_a_python_without_flower_is_told_what_to_do_before_anything_is_made(
    tmp_path, monkeypatch, capsys
):
    no_superlink(monkeypatch)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python3"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(launch.tempfile, "mkdtemp", lambda **kw: pytest.fail("made a home"))
    with pytest.raises(
        launch.EnvironmentProblem, match=r"flower-superlink, flower-supernode, flwr"
    ):
        launch.simulate({"output-dir": str(tmp_path / "out")})
    with pytest.raises(SystemExit) as exit_info:
        launch.main([])
    assert exit_info.value.code == 2
    assert "does not have the app's environment" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_dir_in_use_by_another_run_is_refused(tmp_path, monkeypatch):
    no_superlink(monkeypatch)
    with folder_lock(tmp_path / "out", "a simulation"):
        with pytest.raises(OutputFolderError, match=r"out is in use by a simulation \(pid "):
            launch.simulate({"output-dir": str(tmp_path / "out")})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num-synthetic 100", r"'num-synthetic 100' is not key=value"),
        ("clf-rounds=2 seed", r"'seed' is not key=value"),
        ("conf/absent.toml", r"cannot read --run-config file 'conf/absent.toml'"),
    ],
)
def test_run_config_text_that_is_not_key_value_is_refused_by_name(text, expected):
    with pytest.raises(ConfigError, match=expected):
        launch.parse_overrides([text])


def test_run_config_toml_files_are_read_and_passed_on(tmp_path, monkeypatch, capsys):
    preset = tmp_path / "study-as-run.toml"
    preset.write_text("# a preset\nimputation = 'uniform'\nnum-synthetic = 500\ncvae-lr = 0.01\n")
    assert launch.parse_overrides([str(preset), "num-synthetic=7"]) == {
        "imputation": "uniform",
        "num-synthetic": 7,
        "cvae-lr": 0.01,
    }
    nested = tmp_path / "nested.toml"
    nested.write_text("[tool.flwr.app.config]\nseed = 1\n")
    with pytest.raises(SystemExit):  # flattened as flwr does, then refused by name
        launch.main(["--run-config", str(nested)])
    assert "unknown run-config key(s) ['tool.flwr.app.config.seed']" in capsys.readouterr().err

    started = []
    monkeypatch.setattr(launch, "simulate", lambda overrides, *a, **k: started.append(overrides))
    with pytest.raises(AttributeError):  # the stand-in returns no outcome to report
        launch.main(["--run-config", str(preset)])
    assert started == [{"imputation": "uniform", "num-synthetic": 500, "cvae-lr": 0.01}]
