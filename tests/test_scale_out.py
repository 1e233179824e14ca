"""How the launcher and the sweeps pass a Ray cluster's address on (no processes started)."""

from __future__ import annotations

import io

import pytest

from fedaug_flwr import launch
from fedaug_flwr.experiments import __main__ as cli
from fedaug_flwr.experiments import runner
from fedaug_flwr.experiments.grid import parse_spec
from tests.sweep_fixtures import IMPUTATION_SPEC


@pytest.mark.parametrize(
    ("explicit", "environment", "expected"),
    [
        (None, None, None),
        (None, "10.0.0.5:6379", "10.0.0.5:6379"),
        ("10.0.0.7:6379", "10.0.0.5:6379", "10.0.0.7:6379"),  # the option wins
        (None, "local", None),  # Ray's word for "start a new one here"
        ("", " ", None),
    ],
)
def test_the_address_comes_from_the_option_else_ray_address(
    monkeypatch, explicit, environment, expected
):
    if environment is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", environment)
    assert launch.resolve_ray_address(explicit) == expected


def test_a_local_simulation_never_attaches_to_a_cluster_started_here(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # resolved before: None means local
    env = launch.flwr_env(tmp_path)
    assert env["RAY_ADDRESS"] == "local"  # not the address `ray start` leaves in /tmp/ray
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # loopback only


def test_the_superlink_of_a_cluster_run_names_the_cluster_and_this_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/extra")
    env = launch.flwr_env(tmp_path, ray_address="10.0.0.5:6379")
    assert env["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"  # multi-node Ray allowed
    assert env["PYTHONPATH"].split(":") == [str(launch.APP_DIR), "/opt/extra"]
    superlink = launch.SuperLink(tmp_path, ray_address="10.0.0.5:6379")
    assert superlink.ray_address == "10.0.0.5:6379"


def test_init_args_are_only_set_for_a_ray_of_our_own():
    assert launch.federation_config(4, 1, 0.0) == {
        "num-supernodes": 4,
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.0,
    }
    local = launch.federation_config(4, 1, 0.5, ray_num_cpus=2, ray_num_gpus=1)
    assert (local["init-args-num-cpus"], local["init-args-num-gpus"]) == (2, 1)
    on_cluster = launch.federation_config(4, 2, 0.5, ray_address="10.0.0.5:6379")
    assert not any(key.startswith("init-args") for key in on_cluster)
    assert on_cluster["client-resources-num-gpus"] == 0.5
    with pytest.raises(ValueError, match="cannot be set for a run on the Ray cluster"):
        launch.federation_config(4, ray_address="10.0.0.5:6379", ray_num_cpus=2)


def test_simulate_passes_the_address_to_the_superlink_and_no_init_args(tmp_path, monkeypatch):
    seen = {}

    class FakeSuperLink:
        def __init__(self, home, ray_address=None):
            seen["ray_address"] = ray_address
            self.address = "127.0.0.1:1"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    def fake_run(home, run_config, federation, stream=None):
        seen["federation"] = federation
        return launch.RunOutcome("1", "finished:completed", "", "")

    monkeypatch.setattr(launch, "SuperLink", FakeSuperLink)
    monkeypatch.setattr(launch, "flwr_run", fake_run)
    monkeypatch.setattr(launch, "check_environment", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert launch.simulate({}, num_supernodes=3).ok
    assert seen["ray_address"] == "10.0.0.5:6379"
    assert not any(key.startswith("init-args") for key in seen["federation"])
    monkeypatch.delenv("RAY_ADDRESS")
    launch.simulate({}, num_supernodes=3, ray_num_cpus=2)
    assert seen["ray_address"] is None and seen["federation"]["init-args-num-cpus"] == 2


def test_the_launcher_refuses_a_local_ray_size_with_a_cluster(capsys, monkeypatch):
    monkeypatch.setattr(launch, "simulate", lambda *a, **k: pytest.fail("started a run"))
    with pytest.raises(SystemExit):
        launch.main(["--ray-address", "10.0.0.5:6379", "--ray-num-cpus", "2"])
    assert "cannot be set for a run on the Ray cluster" in capsys.readouterr().err


def test_a_sweep_passes_the_address_to_every_run(tmp_path):
    spec = parse_spec(IMPUTATION_SPEC)
    calls = []

    def launcher(run_config, num_supernodes, num_cpus, num_gpus, stream, ray_address):
        calls.append(ray_address)
        return launch.RunOutcome("1", "finished:failed", "no summary here", "")

    run = next(iter(spec.runs()))
    runner.run_sweep(spec, tmp_path / "s", [run], launcher, io.StringIO(), ray_address="h:1")
    assert calls == ["h:1"]


@pytest.mark.parametrize("command", ["run", "campaign"])
def test_the_sweep_commands_take_a_ray_address(command, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    args = cli.build_parser().parse_args([command, "conf/smoke.yaml"])
    assert launch.resolve_ray_address(args.ray_address) == "10.0.0.5:6379"
    args = cli.build_parser().parse_args([command, "conf/smoke.yaml", "--ray-address", "h:2"])
    assert launch.resolve_ray_address(args.ray_address) == "h:2"
