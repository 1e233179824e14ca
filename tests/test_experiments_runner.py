"""The sweep runner: resume, half-written runs, failures, and one real Flower sweep."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedaug_flwr.data import IDX_FILES
from fedaug_flwr.experiments.grid import SweepError, parse_spec
from fedaug_flwr.experiments.runner import RUN_LOG, run_dir, run_status, run_sweep
from fedaug_flwr.launch import RunOutcome
from fedaug_flwr.processes import (
    _live_pids,
    command_line,
    environ_value,
    flwr_home_of,
    stat_fields,
)
from fedaug_flwr.results import FAILURE, SUMMARY, folder_lock, read_summary, write_json
from tests.sweep_fixtures import fake_summary, write_failure

ROOT = Path(__file__).resolve().parent.parent

SPEC = {
    "name": "runner",
    "federation": {"num-supernodes": 3},
    "base": {"cvae-rounds": 1, "clf-rounds": 1},
    "axes": {"num-synthetic": [0, 100]},
    "seeds": [0, 1],
}


class RecordingLauncher:
    """Stands in for launch.simulate: records calls, writes what a run would leave behind."""

    def __init__(self, fail_when=None, raise_when=None):
        self.calls: list[dict] = []
        self.fail_when = fail_when or (lambda config: False)
        self.raise_when = raise_when or (lambda config: False)

    def __call__(self, run_config, num_supernodes, num_cpus, num_gpus, stream):
        self.calls.append(dict(run_config))
        assert (num_supernodes, num_cpus, num_gpus) == (3, 1, 0.0)
        stream.write("flower log line\n")
        folder = Path(run_config["output-dir"])
        if self.raise_when(run_config):
            raise RuntimeError("flower-superlink did not start")
        if self.fail_when(run_config):
            write_json(folder / FAILURE, {"status": "failed", "error": "PhaseError: no clients"})
            return RunOutcome("7", "finished:failed", "ServerApp error", str(folder))
        write_json(folder / SUMMARY, fake_summary(run_config, f1=0.5, loss=1.0))
        return RunOutcome("7", "finished:completed", "", str(folder))


def test_every_run_gets_its_own_folder_log_and_output_dir(tmp_path):
    spec = parse_spec(SPEC)
    launcher = RecordingLauncher()
    out = io.StringIO()
    report = run_sweep(spec, tmp_path, launcher=launcher, out=out)
    assert report.ok and len(report.completed) == 4 and not report.skipped
    folders = {call["output-dir"] for call in launcher.calls}
    assert folders == {str(run_dir(tmp_path, r)) for r in spec.runs()}
    for run in spec.runs():
        assert run_status(tmp_path, run) == "complete"
        assert (run_dir(tmp_path, run) / RUN_LOG).read_text() == "flower log line\n"
    assert (tmp_path / "sweep.yaml").is_file()
    assert "[4/4]" in out.getvalue() and "ETA" in out.getvalue()
    assert "4/4 complete" in out.getvalue()


def test_complete_runs_are_skipped_and_left_untouched(tmp_path):
    spec = parse_spec(SPEC)
    done = spec.runs()[1]
    summary = fake_summary({**done.run_config, "output-dir": "elsewhere"}, f1=0.9, loss=0.1)
    write_json(run_dir(tmp_path, done) / SUMMARY, summary)
    launcher = RecordingLauncher()
    report = run_sweep(spec, tmp_path, launcher=launcher, out=io.StringIO())
    assert report.skipped == [done]
    assert len(launcher.calls) == 3
    assert str(run_dir(tmp_path, done)) not in {c["output-dir"] for c in launcher.calls}
    assert read_summary(run_dir(tmp_path, done))["final"]["clients"]["macro-f1"] == 0.9
    # a second invocation has nothing left to do
    again = RecordingLauncher()
    assert len(run_sweep(spec, tmp_path, launcher=again, out=io.StringIO()).skipped) == 4
    assert again.calls == []


def test_half_written_and_failed_runs_are_cleared_and_run_again(tmp_path):
    spec = parse_spec(SPEC)
    half, failed = spec.runs()[0], spec.runs()[1]
    (run_dir(tmp_path, half)).mkdir(parents=True)
    (run_dir(tmp_path, half) / "cvae.pt").write_bytes(b"partial")
    (run_dir(tmp_path, half) / ".summary.json.123.tmp").write_text("{")  # an unfinished write
    write_failure(run_dir(tmp_path, failed))
    assert run_status(tmp_path, half) == "partial"
    assert run_status(tmp_path, failed) == "failed"
    launcher = RecordingLauncher()
    report = run_sweep(spec, tmp_path, runs=[half, failed], launcher=launcher, out=io.StringIO())
    assert report.completed == [half, failed]
    assert not (run_dir(tmp_path, half) / "cvae.pt").exists()
    assert not (run_dir(tmp_path, failed) / FAILURE).exists()
    assert run_status(tmp_path, half) == run_status(tmp_path, failed) == "complete"


def checkpoint_of(folder: Path, run_config: dict) -> Path:
    """A checkpoint (after the CVAE) of ``run_config`` in ``folder``, as a run leaves it."""
    from fedaug_flwr.checkpoint import Checkpoint
    from fedaug_flwr.config import AppConfig

    config = AppConfig.from_run_config({**run_config, "output-dir": str(folder)})
    checkpoint = Checkpoint(folder, config.to_run_config(), time.time())
    checkpoint.steps["cvae"] = {"value": {"section": {}}}
    return checkpoint.save()


def test_an_interrupted_run_with_a_checkpoint_is_resumed_not_cleared(tmp_path):
    spec = parse_spec(SPEC)
    run = spec.runs()[0]
    folder = run_dir(tmp_path, run)
    checkpoint = checkpoint_of(folder, run.run_config)
    (folder / "cvae.pt").write_bytes(b"the model the checkpoint refers to")
    (folder / RUN_LOG).write_text("the interrupted attempt\n")
    write_failure(folder)
    write_json(folder / "run-state.json", {"status": "interrupted"})
    launcher = RecordingLauncher()
    report = run_sweep(spec, tmp_path, runs=[run], launcher=launcher, out=io.StringIO())
    assert report.completed == [run]
    assert checkpoint.exists() and (folder / "cvae.pt").exists()  # kept for the run to resume
    log = (folder / RUN_LOG).read_text()
    assert log.startswith("the interrupted attempt\n") and "---- resumed" in log
    assert not (folder / FAILURE).exists()


def test_a_checkpoint_of_another_configuration_stops_the_sweep(tmp_path):
    spec = parse_spec(SPEC)
    run = spec.runs()[0]
    checkpoint_of(run_dir(tmp_path, run), {**run.run_config, "clf-rounds": 15})
    launcher = RecordingLauncher()
    with pytest.raises(SweepError, match="clf-rounds: checkpoint 15, this run 1"):
        run_sweep(spec, tmp_path, launcher=launcher, out=io.StringIO())
    assert launcher.calls == []


def test_an_unreadable_summary_does_not_count_as_complete(tmp_path):
    spec = parse_spec(SPEC)
    run = spec.runs()[0]
    run_dir(tmp_path, run).mkdir(parents=True)
    (run_dir(tmp_path, run) / SUMMARY).write_text('{"status": "compl')
    assert run_status(tmp_path, run) == "partial"


def test_one_failing_run_does_not_stop_the_sweep_and_is_reported(tmp_path):
    spec = parse_spec(SPEC)
    launcher = RecordingLauncher(
        fail_when=lambda c: c["num-synthetic"] == 100 and c["seed"] == 0,
        raise_when=lambda c: c["num-synthetic"] == 100 and c["seed"] == 1,
    )
    out = io.StringIO()
    report = run_sweep(spec, tmp_path, launcher=launcher, out=out)
    assert not report.ok
    assert len(launcher.calls) == 4 and len(report.completed) == 2
    failed = {run.label: reason for run, reason in report.failed}
    assert failed == {
        "num-synthetic=100 seed=0": "PhaseError: no clients",
        "num-synthetic=100 seed=1": "RuntimeError: flower-superlink did not start",
    }
    for run, _ in report.failed:
        folder = run_dir(tmp_path, run)
        assert not (folder / SUMMARY).exists()
        assert json.loads((folder / FAILURE).read_text())["status"] == "failed"
    assert "2 failed" in out.getvalue()
    assert "FAILED num-synthetic=100 seed=1: RuntimeError" in out.getvalue()


def test_a_launcher_reporting_failure_without_failure_file_gets_one(tmp_path):
    spec = parse_spec(SPEC)

    def launcher(run_config, num_supernodes, num_cpus, num_gpus, stream):
        return RunOutcome("9", "finished:stopped", "stopped by user", run_config["output-dir"])

    run = spec.runs()[0]
    report = run_sweep(spec, tmp_path, runs=[run], launcher=launcher, out=io.StringIO())
    assert report.failed == [(run, "run 9 finished:stopped stopped by user")]
    stored = json.loads((run_dir(tmp_path, run) / FAILURE).read_text())
    assert stored["error"] == "run 9 finished:stopped stopped by user"


def test_a_summary_written_around_an_interruption_does_not_count(tmp_path):
    """Ctrl-C mid-run: even if the run's summary.json appears (late, from a process that
    outlived the sweep), the run is not complete and the next sweep runs it again."""
    spec = parse_spec(SPEC)
    run = spec.runs()[0]

    def interrupted(run_config, num_supernodes, num_cpus, num_gpus, stream):
        write_json(Path(run_config["output-dir"]) / SUMMARY, fake_summary(run_config, 0.5, 1.0))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path, runs=[run], launcher=interrupted, out=io.StringIO())
    assert (run_dir(tmp_path, run) / SUMMARY).is_file()
    assert read_summary(run_dir(tmp_path, run)) is None
    assert run_status(tmp_path, run) == "interrupted"

    launcher = RecordingLauncher()
    report = run_sweep(spec, tmp_path, runs=[run], launcher=launcher, out=io.StringIO())
    assert report.completed == [run] and len(launcher.calls) == 1
    assert run_status(tmp_path, run) == "complete"


def test_a_sweep_folder_in_use_by_another_sweep_is_refused(tmp_path):
    spec = parse_spec(SPEC)
    launcher = RecordingLauncher()
    with folder_lock(tmp_path, "sweep 'other'"):
        with pytest.raises(SweepError, match=rf"in use by sweep 'other' \(pid {os.getpid()} "):
            run_sweep(spec, tmp_path, launcher=launcher, out=io.StringIO())
    assert launcher.calls == [] and not (tmp_path / "sweep.yaml").exists()
    assert run_sweep(spec, tmp_path, launcher=launcher, out=io.StringIO()).ok  # free again


def test_results_of_another_configuration_are_not_mixed_in(tmp_path):
    spec = parse_spec(SPEC)
    run = spec.runs()[0]
    stored = fake_summary({**run.run_config, "clf-rounds": 15}, f1=0.9, loss=0.1)
    write_json(run_dir(tmp_path, run) / SUMMARY, stored)
    launcher = RecordingLauncher()
    with pytest.raises(SweepError, match="clf-rounds: stored 15, wanted 1"):
        run_sweep(spec, tmp_path, launcher=launcher, out=io.StringIO())
    assert launcher.calls == []


def test_an_invalid_grid_runs_nothing_not_even_its_valid_cells(tmp_path):
    spec = parse_spec({**SPEC, "axes": {"num-synthetic": [0, -5]}})
    launcher = RecordingLauncher()
    valid = [run for run in spec.runs() if run.run_config["num-synthetic"] == 0]
    with pytest.raises(SweepError, match="num-synthetic=-5"):
        run_sweep(spec, tmp_path, runs=valid, launcher=launcher, out=io.StringIO())
    assert launcher.calls == [] and not (tmp_path / "sweep.yaml").exists()


@pytest.mark.simulation
def test_a_real_sweep_runs_through_flower_and_resumes(tmp_path):
    """Two real runs: one completes, one fails in its ServerApp (unreadable MNIST files).
    Rounds draw 2 of the 3 nodes: the nodes are listed by partition (``query.roster``)."""
    broken = tmp_path / "broken-mnist"
    broken.mkdir()
    for name in IDX_FILES.values():
        (broken / name).write_bytes(b"not an IDX file")
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(
        "federation: {num-supernodes: 3}\n"
        "base: {cvae-rounds: 1, clf-rounds: 1, imputation: none, quality-samples: 0,\n"
        "       fraction-train: 0.67,\n"
        f"       privacy-audit: false, data-dir: '{broken}'}}\n"
        "axes: {dataset: [mnist-5k, mnist]}\n"
        "seeds: [0]\n"
    )
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "fedaug_flwr.experiments", "run", str(experiment)]
    command += ["--out", str(sweep)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 1, first.stdout + first.stderr
    good, bad = sweep / "dataset=mnist-5k/seed-0", sweep / "dataset=mnist/seed-0"
    summary = read_summary(good)
    assert summary is not None and summary["data"]["num-clients"] == 3
    assert [len(r["train-per-client"]) for r in summary["classifier"]["rounds"]] == [2]
    assert "query.roster" in (good / "flwr.log").read_text()
    assert summary["config"]["output-dir"] == str(good)
    assert not (bad / SUMMARY).exists()
    assert "not an IDX file" in json.loads((bad / FAILURE).read_text())["error"]
    assert "FAILED dataset=mnist seed=0: DataError" in first.stdout
    assert (sweep / "tables" / "final_runs.csv").read_text().count("\n") == 2  # header + 1 run

    # resuming the good cell starts no Flower run at all
    stamp = (good / SUMMARY).stat().st_mtime_ns
    again = subprocess.run(
        [*command, "--only", "dataset=mnist-5k"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 already complete, 0 to run" in again.stdout
    assert (good / SUMMARY).stat().st_mtime_ns == stamp


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment holds ``FEDAUG_TEST_TAG=tag`` (all a sweep started)."""
    return [pid for pid in _live_pids() if environ_value(pid, "FEDAUG_TEST_TAG") == tag]


def describe(pids: list[int]) -> str:
    """Each process's state, parent, group and command line (why it was left)."""
    lines = []
    for pid in pids:
        fields, arguments = stat_fields(pid), command_line(pid)
        if fields is None or arguments is None:
            lines.append(f"{pid}: gone")
        else:
            command = b" ".join(arguments).decode(errors="replace")[:300]
            lines.append(f"{pid}: {fields[:3]} {command} home={flwr_home_of(pid)}")
    return "\n".join(lines)


@pytest.mark.simulation
def test_sigterm_stops_every_process_of_the_running_simulation(tmp_path):
    """SIGTERM mid-run: the sweep exits 130 only once flwr-simulation, Ray and the SuperLink
    are gone, and nothing writes a summary afterwards; the run is recorded as interrupted."""
    experiment = tmp_path / "long.yaml"
    experiment.write_text(
        "federation: {num-supernodes: 2}\n"
        "base: {cvae-rounds: 50, clf-rounds: 1, imputation: none, quality-samples: 0}\n"
        "seeds: [0]\n"
    )
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDAUG_TEST_TAG": tag}
    command = [sys.executable, "-m", "fedaug_flwr.experiments", "run", str(experiment)]
    sweep = subprocess.Popen(
        [*command, "--out", str(tmp_path / "sweep"), "--verbose"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in sweep.stdout:
            if "[fedaug] phase '" in line or "[fedaug] run " in line:  # the ServerApp works
                break
        time.sleep(3)
        assert len(tagged_processes(tag)) > 4  # the sweep, SuperLink, SuperExec, Ray...
        sweep.send_signal(signal.SIGTERM)
        rest = sweep.communicate(timeout=120)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
        leftovers = tagged_processes(tag)
        left_described = describe(leftovers)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert sweep.returncode == 130, rest[-3000:]
    assert "interrupted" in rest
    assert leftovers == [], left_described
    run = parse_spec(yaml_safe_load(experiment)).runs()[0]
    time.sleep(5)  # a run left going would still be training now
    assert not (run_dir(tmp_path / "sweep", run) / SUMMARY).exists()
    assert run_status(tmp_path / "sweep", run) == "interrupted"


def yaml_safe_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def without_volatile(value):
    """A summary without what differs between two real runs of one config anyway: times,
    Flower's run and node ids (random in every simulation), folders, the Ray cluster."""
    volatile = {
        "run-id",
        "node-id",
        "started-at",
        "finished-at",
        "output-dir",
        "timing-s",
        "round-timing-s",
        "resumed",
        "ray-cluster",
    }
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


@pytest.mark.simulation
def test_a_real_run_stopped_mid_phase_resumes_with_the_same_command_and_results(tmp_path):
    """A real sweep is stopped (SIGTERM) once its run has checkpointed a classifier round;
    the same command again resumes that run, and its summary equals that of the same
    run never stopped, bit for bit (node ids and times aside)."""
    experiment = tmp_path / "resume.yaml"
    experiment.write_text(
        "federation: {num-supernodes: 2}\n"
        "base: {cvae-rounds: 1, clf-rounds: 3, num-synthetic: 20, quality-samples: 0,\n"
        "       privacy-audit: false}\n"
        "seeds: [0]\n"
    )
    run = parse_spec(yaml_safe_load(experiment)).runs()[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "fedaug_flwr.experiments", "run", str(experiment)]

    # The same run never stopped, for reference, runs beside the stopped one: each run
    # leaves a core idle while its processes start, and the suite's time is what it costs.
    whole_log = tmp_path / "whole.log"
    with whole_log.open("w") as log:
        whole = subprocess.Popen(
            [*command, "--out", str(tmp_path / "whole")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        resumed = stop_and_resume(command, env, run, tmp_path / "stopped")
        assert whole.wait(timeout=400) == 0, whole_log.read_text()[-3000:]
    finally:
        if whole.poll() is None:
            whole.terminate()  # the runner stops its simulation's processes on SIGTERM
            whole.wait(timeout=120)
    uninterrupted = read_summary(run_dir(tmp_path / "whole", run))
    assert without_volatile(resumed) == without_volatile(uninterrupted)
    assert len(resumed["classifier"]["rounds"]) == 3


def stop_and_resume(command: list[str], env: dict, run, stopped: Path) -> dict:
    """Stop the sweep once its run has checkpointed a classifier round, run the same command
    again; the resumed run's summary."""
    from fedaug_flwr.checkpoint import CHECKPOINT, Checkpoint
    from fedaug_flwr.config import AppConfig

    folder = run_dir(stopped, run)
    config = AppConfig.from_run_config({**run.run_config, "output-dir": str(folder)})
    sweep = subprocess.Popen(
        [*command, "--out", str(stopped)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and sweep.poll() is None:
            if (folder / CHECKPOINT).exists():
                where = Checkpoint.load(folder, config.to_run_config()).where()
                if where.startswith("classifier round"):
                    break
            time.sleep(0.2)
        sweep.send_signal(signal.SIGTERM)
        first = sweep.communicate(timeout=120)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 130, first[-3000:]
    assert run_status(stopped, run) == "interrupted" and (folder / CHECKPOINT).exists()

    again = subprocess.run(
        [*command, "--out", str(stopped)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = read_summary(folder)
    assert resumed["resumed"][0]["from"].startswith("classifier round")
    assert "---- resumed" in (folder / RUN_LOG).read_text()
    assert not (folder / CHECKPOINT).exists()
    return resumed
