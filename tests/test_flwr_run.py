"""The app through Flower's own CLI: `flwr run --stream` on a private SuperLink."""

from __future__ import annotations

import io
import json
import os
import zipfile

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

from fedaug_flwr import launch
from fedaug_flwr.processes import APP_DIR
from fedaug_flwr.results import FAILURE, SUMMARY
from tests.conftest import TINY


def test_the_app_bundle_holds_the_code_and_not_the_published_results():
    """`flwr run` packs the app with Flower's builder, which takes every .md, .json and
    .yaml by default: the results published under docs/ would grow the bundle past
    Flower's 10 MB limit, and every run of a campaign would then fail to start."""
    bundle = build_fab_from_disk(APP_DIR)
    names = zipfile.ZipFile(io.BytesIO(bundle)).namelist()
    code = {"server_app.py", "client_app.py", "fedaug_flwr/node.py", "fedaug_flwr/phases.py"}
    assert code | {"pyproject.toml", "fedaug_flwr/experiments/campaign.py"} <= set(names)
    others = [n for n in names if not n.endswith(".py") and n not in {"pyproject.toml"}]
    assert others == [".info/CONTENT"]
    assert len(bundle) < FAB_MAX_SIZE / 4


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def superlink_groups(monkeypatch):
    """Record the process group of every SuperLink the launcher starts."""
    groups = []
    original = launch.SuperLink.start

    def start(self):
        started = original(self)
        groups.append(os.getpgid(self.process.pid))
        return started

    monkeypatch.setattr(launch.SuperLink, "start", start)
    return groups


@pytest.mark.flwr_run
def test_flwr_run_completes_and_stops_its_superlink(tmp_path, superlink_groups):
    log = io.StringIO()
    outcome = launch.simulate(
        {**TINY, "imputation": "uniform", "output-dir": str(tmp_path / "run")},
        num_supernodes=3,
        stream=log,
    )
    assert outcome.ok, log.getvalue()[-3000:]
    assert outcome.output_dir == str(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / SUMMARY).read_text())
    assert summary["data"]["num-clients"] == 3
    assert summary["config"]["imputation"] == "uniform"
    assert "[fedaug] sim-message-index: each node's messages are handed out" in log.getvalue()
    assert superlink_groups and not any(group_alive(g) for g in superlink_groups)


@pytest.mark.flwr_run
def test_failed_run_is_reported_and_leaves_no_summary(tmp_path, superlink_groups):
    # 4,000 images cannot give 3 clients 2,000 each: every client fails in phase 1
    outcome = launch.simulate(
        {**TINY, "min-partition-size": 2000, "output-dir": str(tmp_path / "run")},
        num_supernodes=3,
        stream=io.StringIO(),
    )
    assert not outcome.ok and outcome.status == "finished:failed"
    assert not (tmp_path / "run" / SUMMARY).exists()
    failure = json.loads((tmp_path / "run" / FAILURE).read_text())
    assert "fewer clients" in failure["error"]
    assert not any(group_alive(g) for g in superlink_groups)


def test_cli_rejects_bad_config_before_starting_anything(capsys, superlink_groups):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--run-config", "imputation='majority'"])
    assert exit_info.value.code == 2
    assert "'imputation'" in capsys.readouterr().err
    assert superlink_groups == []


def test_run_config_strings_parse_like_flwr():
    parsed = launch.parse_overrides(["imputation='minority' num-synthetic=100", "cvae-lr=0.5"])
    assert parsed == {"imputation": "minority", "num-synthetic": 100, "cvae-lr": 0.5}
    assert launch.parse_overrides([launch.to_overrides(parsed)]) == parsed
