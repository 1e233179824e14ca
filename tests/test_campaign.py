"""Campaigns: stage order, compact published results committed one run at a time, resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from fedaug_flwr.experiments import __main__ as cli
from fedaug_flwr.experiments.campaign import (
    CLIENTS_TABLE,
    CampaignReport,
    campaign_progress,
    compact_summary,
    ordered_runs,
    run_campaign,
    runs_of_stages,
)
from fedaug_flwr.experiments.grid import SweepError, parse_spec
from fedaug_flwr.experiments.runner import (
    CODE_RECORD,
    code_version,
    read_launch_code,
    record_launch_code,
    run_dir,
    run_sweep,
    write_spec,
)
from fedaug_flwr.results import SUMMARY, read_summary, write_json
from tests.sweep_fixtures import fake_summary
from tests.test_experiments_runner import RecordingLauncher

SPEC = {
    "name": "campaign",
    "federation": {"num-supernodes": 3},
    "base": {"cvae-rounds": 1, "clf-rounds": 1},
    "axes": {"dirichlet-beta": [0.1, 100.0], "num-synthetic": [0, 100]},
    "seeds": [0, 1, 2],
    "stages": [
        {"only": {"dirichlet-beta": 0.1}, "seeds": [0, 1]},
        {"seeds": [0, 1]},
        {"seeds": [2]},
    ],
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    folder = tmp_path / "repo"
    folder.mkdir()
    git(folder, "init", "-q")
    git(folder, "config", "user.email", "test@example.org")
    git(folder, "config", "user.name", "test")
    (folder / "unrelated.txt").write_text("staged, not part of any result\n")
    git(folder, "add", "unrelated.txt")
    return folder


def test_runs_go_stage_by_stage_and_seed_by_seed():
    labels = [run.label for run in ordered_runs(parse_spec(SPEC))]
    assert labels == [
        "dirichlet-beta=0.1__num-synthetic=0 seed=0",
        "dirichlet-beta=0.1__num-synthetic=100 seed=0",
        "dirichlet-beta=0.1__num-synthetic=0 seed=1",
        "dirichlet-beta=0.1__num-synthetic=100 seed=1",
        "dirichlet-beta=100.0__num-synthetic=0 seed=0",
        "dirichlet-beta=100.0__num-synthetic=100 seed=0",
        "dirichlet-beta=100.0__num-synthetic=0 seed=1",
        "dirichlet-beta=100.0__num-synthetic=100 seed=1",
        "dirichlet-beta=0.1__num-synthetic=0 seed=2",
        "dirichlet-beta=0.1__num-synthetic=100 seed=2",
        "dirichlet-beta=100.0__num-synthetic=0 seed=2",
        "dirichlet-beta=100.0__num-synthetic=100 seed=2",
    ]


def test_progress_counts_published_runs_per_stage_and_estimates_the_rest_by_kind(tmp_path):
    spec = parse_spec(SPEC)
    runs = ordered_runs(spec)
    # published: stage 1's seed 0 (k = 0: 30 min, resumed once; k = 100: 90 min on a GPU)
    # and stage 2's first run (k = 0: 60 min); the k = 0 runs had 2 cores, the GPU run 16
    for run, minutes, extra in (
        (runs[0], 30, {"resumed": [{"from": "classifier round 3"}]}),
        (runs[1], 90, {"compact": {"made-on": {"gpus": ["NVIDIA H200"]}}}),
        (runs[4], 60, {}),
    ):
        summary = fake_summary(run.run_config, f1=0.5, loss=1.0)
        gpu = run is runs[1]
        resources = {"CPU": 16, "GPU": 1} if gpu else {"CPU": 2}
        summary.update(
            timing_s_total(minutes), **extra, **{"ray-cluster": {"resources": resources}}
        )
        write_json(run_dir(tmp_path, run) / SUMMARY, summary)
    write_spec(tmp_path, spec)
    assert cli.main(["plot", str(tmp_path)]) == 0  # `make campaign-report` for a campaign
    text = (tmp_path / "figures" / "progress.md").read_text()
    assert text == campaign_progress(spec, tmp_path)
    assert text.startswith("# Campaign 'campaign': 3 of 12 runs published")
    # stage 1: 2 left, k = 0 (mean of 30 and 60 min) + k = 100 (90 min) = 2.25 h
    assert "| 1 | 4 | 2 | 2 | 2.2 |" in text
    assert "| 2 | 4 | 1 | 3 | 3.8 |" in text  # k = 100 twice, k = 0 once
    assert "| 3 | 4 | 0 | 4 | 4.5 |" in text
    # CPU-hours: 0.5 h x 2 + 1.5 h x 16 + 1 h x 2 = 27; GPU: 90 min
    assert "3.0 wall hours; 27.0 CPU-hours" in text and "; 90 minutes of runs with a GPU" in text
    assert "1. dirichlet-beta=0.1__num-synthetic=0 seed=1" in text
    assert "9. dirichlet-beta=100.0__num-synthetic=100 seed=2" in text
    assert "| dirichlet-beta=0.1__num-synthetic=0 | 0 | 30 | 2 | - | 1.00 | 1 |" in text
    assert (
        "| dirichlet-beta=0.1__num-synthetic=100 | 0 | 90 | 16 | NVIDIA H200 | 24.00 | 0 |" in text
    )

    # only the first run, and a run that did not record its cores
    only_k0 = tmp_path / "only-k0"
    write_json(run_dir(only_k0, runs[0]) / SUMMARY, read_summary(run_dir(tmp_path, runs[0])))
    no_cores = fake_summary(runs[4].run_config, f1=0.5, loss=1.0)  # no "ray-cluster" record
    write_json(run_dir(only_k0, runs[4]) / SUMMARY, {**no_cores, **timing_s_total(60)})
    text = campaign_progress(spec, only_k0)
    # k = 0: 45 min on average; no k = 100 run is published here
    assert "| 1 | 4 | 1 | 3 | 0.8 + 2 runs of a kind not run yet |" in text
    assert "| 2 | 4 | 1 | 3 | 0.8 + 2 runs of a kind not run yet |" in text
    assert "1.5 wall hours; 1.0 CPU-hours (" in text and "for the 1 runs that recorded" in text
    row = "| dirichlet-beta=100.0__num-synthetic=0 | 0 | 60 | not recorded | - | - | 0 |"
    assert row in text


def test_progress_names_the_variable_of_each_data_set_its_runs_read(tmp_path):
    """The command that continues a campaign needs every data set's folder, not only those
    of the runs published so far."""
    both = {**SPEC, "axes": {**SPEC["axes"], "dataset": ["mnist", "fashion-mnist"]}}
    text = campaign_progress(parse_spec(both), tmp_path)
    assert (
        "with the data its runs read: `FEDAUG_DATA_DIR=<MNIST IDX folder>` "
        "`FEDAUG_FASHION_DATA_DIR=<Fashion-MNIST IDX folder>`." in text
    )
    clothing = {**SPEC, "base": {**SPEC["base"], "dataset": "fashion-mnist"}}
    text = campaign_progress(parse_spec(clothing), tmp_path)
    assert "read: `FEDAUG_FASHION_DATA_DIR=<Fashion-MNIST IDX folder>`." in text
    # runs that name their folder, or read the bundled digits, need no variable
    named = {**clothing, "base": {**clothing["base"], "data-dir": "/data/fashion"}}
    for spec in (named, SPEC):
        text = campaign_progress(parse_spec(spec), tmp_path)
        assert "with nothing to set (its runs use the bundled digits" in text


def timing_s_total(minutes: float) -> dict:
    return {"timing-s": {"total": minutes * 60.0}}


def test_stages_select_part_of_a_campaign_in_its_order(tmp_path, monkeypatch):
    spec = parse_spec(SPEC)
    labels = [run.label for run in runs_of_stages(spec, [1, 3])]
    assert labels == [
        "dirichlet-beta=0.1__num-synthetic=0 seed=0",
        "dirichlet-beta=0.1__num-synthetic=100 seed=0",
        "dirichlet-beta=0.1__num-synthetic=0 seed=1",
        "dirichlet-beta=0.1__num-synthetic=100 seed=1",
        "dirichlet-beta=0.1__num-synthetic=0 seed=2",
        "dirichlet-beta=0.1__num-synthetic=100 seed=2",
        "dirichlet-beta=100.0__num-synthetic=0 seed=2",
        "dirichlet-beta=100.0__num-synthetic=100 seed=2",
    ]
    with pytest.raises(SweepError, match="stages 1 to 3; no stage 4"):
        runs_of_stages(spec, [2, 4])
    # the command line hands the campaign only stage 2's runs
    experiment = tmp_path / "campaign.yaml"
    experiment.write_text(json.dumps(SPEC))  # JSON is YAML
    given = []

    def record(spec, scratch, publish, runs, **_) -> CampaignReport:
        given.extend(runs)
        return CampaignReport()

    monkeypatch.setattr(cli.campaign, "run_campaign", record)
    assert cli.main(["campaign", str(experiment), "--stages", "2", "--no-commit"]) == 0
    assert [run.label for run in given] == [
        "dirichlet-beta=100.0__num-synthetic=0 seed=0",
        "dirichlet-beta=100.0__num-synthetic=100 seed=0",
        "dirichlet-beta=100.0__num-synthetic=0 seed=1",
        "dirichlet-beta=100.0__num-synthetic=100 seed=1",
    ]
    with pytest.raises(SystemExit):
        cli.main(["campaign", str(experiment), "--stages", "one"])


def test_sigterm_ends_the_campaign_command_which_then_restores_the_signal_handlers(
    tmp_path, monkeypatch
):
    experiment = tmp_path / "campaign.yaml"
    experiment.write_text(json.dumps(SPEC))
    started = []

    def terminated(spec, scratch, publish, runs, **_) -> CampaignReport:
        started.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler's KeyboardInterrupt cuts this short
        raise AssertionError("SIGTERM did not end the campaign")

    monkeypatch.setattr(cli.campaign, "run_campaign", terminated)
    names = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.getsignal(signum) for signum in names}
    assert cli.main(["campaign", str(experiment), "--no-commit"]) == 130
    assert started
    # a caller in the same process (a notebook, a test) gets its own handlers back
    assert {signum: signal.getsignal(signum) for signum in names} == before


def test_stage_naming_a_value_outside_the_grid_is_refused():
    bad = {**SPEC, "stages": [{"only": {"dirichlet-beta": 0.5}, "seeds": [0]}]}
    with pytest.raises(SweepError, match="matches nothing"):
        parse_spec(bad)
    with pytest.raises(SweepError, match="not all in 'seeds'"):
        parse_spec({**SPEC, "stages": [{"seeds": [7]}]})


def test_compact_summary_drops_only_the_per_client_rows_of_every_round():
    summary = fake_summary({"cvae-rounds": 1, "clf-rounds": 2}, f1=0.5, loss=1.0)
    for row in summary["classifier"]["rounds"]:
        row["train-per-client"] = [{"partition-id": 0}] * 100
        row["evaluate-per-client"] = [{"partition-id": 0}] * 100
    compact = compact_summary(summary)
    assert all("evaluate-per-client" not in r for r in compact["classifier"]["rounds"])
    assert all("train-per-client" not in r for r in compact["classifier"]["rounds"])
    assert compact["clients"] == summary["clients"] and compact["final"] == summary["final"]
    summary["output-dir"] = summary["config"]["output-dir"] = "/home/someone/runs/a"
    summary["data"]["location"] = "/home/someone/mnist"
    compact = compact_summary(summary, {"code-commit": "abc", "code-changed": False})
    assert "/home/someone" not in json.dumps(compact)
    assert compact["compact"]["code-commit"] == "abc"
    assert "evaluate-per-client" in summary["classifier"]["rounds"][0]  # the run's own copy


def test_each_run_is_published_and_committed_alone_then_skipped(repo, tmp_path):
    spec = parse_spec(SPEC)
    publish = repo / "docs" / "results" / "campaign"
    launcher = RecordingLauncher()
    out = io.StringIO()
    report = run_campaign(
        spec, tmp_path / "scratch", publish, max_runs=3, launcher=launcher, out=out
    )
    assert len(report.done) == 3 and len(report.left) == 9 and not report.failed
    commits = git(repo, "log", "--format=%s").splitlines()
    assert commits == [f"campaign: {run.label} (0 min)" for run in reversed(report.done)]
    first = report.done[0]
    files = git(repo, "show", "--name-only", "--format=", "HEAD~2").split()
    folder = f"docs/results/campaign/{first.relative_dir.as_posix()}"
    assert sorted(files) == sorted(
        ["docs/results/campaign/sweep.yaml", f"{folder}/{CLIENTS_TABLE}", f"{folder}/{SUMMARY}"]
    )
    assert "unrelated.txt" in git(repo, "diff", "--cached", "--name-only")  # left staged
    clients = pd.read_csv(publish / first.relative_dir / CLIENTS_TABLE)
    assert list(clients["partition-id"]) == [0, 1, 2] and "test-macro-f1" in clients
    published = read_summary(run_dir(publish, first))
    assert published["compact"]["code-commit"] != "unknown"  # this checkout's commit
    assert str(tmp_path) not in json.dumps(published)

    again = RecordingLauncher()
    report = run_campaign(spec, tmp_path / "scratch", publish, launcher=again, out=io.StringIO())
    assert len(report.skipped) == 3 and len(again.calls) == 9
    assert len(git(repo, "log", "--format=%s").splitlines()) == 12


def test_a_run_that_fell_back_to_other_data_is_not_published(repo, tmp_path):
    spec = parse_spec({**SPEC, "base": {**SPEC["base"], "dataset": "mnist"}})
    publish = repo / "published"
    with pytest.raises(SweepError, match="instead of 'mnist'"):
        run_campaign(
            spec, tmp_path / "scratch", publish, launcher=RecordingLauncher(), out=io.StringIO()
        )
    assert not list(publish.glob("*/seed-*/summary.json"))


def test_a_published_run_names_the_code_that_made_it_not_the_code_that_publishes(repo, tmp_path):
    spec = parse_spec(SPEC)
    scratch, publish = tmp_path / "scratch", repo / "docs" / "results" / "campaign"
    first, second = ordered_runs(spec)[:2]
    run_sweep(spec, scratch, [first, second], launcher=RecordingLauncher(), out=io.StringIO())
    ours = code_version()["code-commit"]
    launches = read_launch_code(run_dir(scratch, first))
    assert len(launches) == 1 and launches[0]["code-commit"] == ours
    assert launches[0]["resumed"] is False
    # the first run was made by older code and resumed by this one; the second predates
    # the record (no code.json)
    older = {"code-commit": "0ld", "code-changed": False, "resumed": False}
    record = {"launches": [older, {**launches[0], "resumed": True}]}
    (run_dir(scratch, first) / CODE_RECORD).write_text(json.dumps(record))
    (run_dir(scratch, second) / CODE_RECORD).unlink()
    run_campaign(spec, scratch, publish, runs=[first, second], out=io.StringIO())
    made = read_summary(run_dir(publish, first))["compact"]
    assert made["code-commits"] == ["0ld", ours] and made["code-commit"] == ours
    unrecorded = read_summary(run_dir(publish, second))["compact"]
    assert unrecorded["code-commit"] == ours and "at publishing" in unrecorded["code-recorded"]


def test_a_resumed_launch_adds_to_the_code_record_and_a_fresh_one_starts_it_anew(tmp_path):
    record_launch_code(tmp_path, resumed=False)
    record_launch_code(tmp_path, resumed=True)
    assert [launch["resumed"] for launch in read_launch_code(tmp_path)] == [False, True]
    record_launch_code(tmp_path, resumed=False)
    assert [launch["resumed"] for launch in read_launch_code(tmp_path)] == [False]
