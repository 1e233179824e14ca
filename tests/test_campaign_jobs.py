"""A campaign with several jobs: runs handed out in order, N at a time, each published and
committed alone; errors and interrupts reach every child."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from yaml import safe_load as yaml_safe_load

from fedaug_flwr.experiments.campaign import commit
from fedaug_flwr.experiments.grid import SweepError, parse_spec
from fedaug_flwr.experiments.jobs import run_jobs
from fedaug_flwr.experiments.runner import run_dir, run_sweep
from fedaug_flwr.results import SUMMARY, folder_lock, lock_holder, read_summary
from tests.test_campaign import SPEC, git, repo  # noqa: F401 - repo is a fixture
from tests.test_experiments_runner import RecordingLauncher

ROOT = Path(__file__).resolve().parent.parent

# A stand-in child: writes "<name>.start", sleeps, writes "<name>.end" and exits with its
# code; on SIGTERM it writes "<name>.stopped" and exits 130 as the campaign does.
CHILD = """
import signal, sys, time
from pathlib import Path
name, seconds, code = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
def stop(signum, frame):
    name.with_suffix(".stopped").write_text("")
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
name.with_suffix(".start").write_text(str(time.time()))
print("working on", name.name, flush=True)
time.sleep(seconds)
name.with_suffix(".end").write_text(str(time.time()))
sys.exit(code)
"""


def fake_children(folder: Path, seconds: dict[int, float], codes: dict[int, int] | None = None):
    """command_for: run number i (by its seed) sleeps seconds[i] and exits with codes[i]."""
    script = folder / "child.py"
    script.write_text(CHILD)

    def command_for(run) -> list[str]:
        name = folder / f"run{run.seed}"
        code = (codes or {}).get(run.seed, 0)
        return [sys.executable, str(script), str(name), str(seconds[run.seed]), str(code)]

    return command_for


def one_cell_runs(seeds: int):
    spec = {key: value for key, value in SPEC.items() if key != "stages"}
    return parse_spec({**spec, "axes": {}, "seeds": list(range(seeds))}).runs()


def times(folder: Path, seed: int) -> tuple[float, float]:
    return (
        float((folder / f"run{seed}.start").read_text()),
        float((folder / f"run{seed}.end").read_text()),
    )


def test_runs_are_handed_out_in_order_and_never_more_than_the_jobs_at_once(tmp_path):
    runs = one_cell_runs(4)
    out = io.StringIO()
    report = run_jobs(runs, 2, fake_children(tmp_path, {0: 3.0, 1: 0.3, 2: 0.3, 3: 0.3}), out)
    assert sorted(report.done, key=runs.index) == runs and not report.failed
    spans = {seed: times(tmp_path, seed) for seed in range(4)}
    # at every start, at most one other run is going
    for seed, (start, _) in spans.items():
        others = [s for s, (a, b) in spans.items() if s != seed and a <= start < b]
        assert len(others) <= 1, (seed, others)
    # run 2 waits for a free job: it starts after run 1 ended, while run 0 still runs
    assert spans[1][1] <= spans[2][0] < spans[0][1]
    text = out.getvalue()
    assert "[job 1] working on run0" in text and "[job 2] working on run1" in text
    assert text.index("[job 3] starts") > text.index("[job 2] done")


def test_a_failed_run_is_reported_and_an_error_stops_the_handing_out(tmp_path):
    runs = one_cell_runs(4)
    command_for = fake_children(tmp_path, {0: 0.2, 1: 1.0, 2: 0.2, 3: 0.2}, {0: 1, 2: 2})
    report = run_jobs(runs, 2, command_for, io.StringIO())
    # 0 failed; 2 (started when 0 ended) stopped the campaign; 1 was let finish; 3 never ran
    assert report.failed == [(runs[0], "failed")]
    assert report.done == [runs[1]]
    assert report.error is not None and runs[2].label in report.error
    assert report.left == [runs[2], runs[3]]
    assert not (tmp_path / "run3.start").exists()


def test_max_runs_limits_what_is_started(tmp_path):
    runs = one_cell_runs(3)
    report = run_jobs(
        runs, 2, fake_children(tmp_path, dict.fromkeys(range(3), 0.1)), io.StringIO(), 2
    )
    assert report.done == runs[:2] and report.left == runs[2:]


def test_an_interrupt_stops_every_child_before_it_passes_on(tmp_path):
    runs = one_cell_runs(3)
    command_for = fake_children(tmp_path, dict.fromkeys(range(3), 60.0))

    # SIGINT to this process once both jobs have started: KeyboardInterrupt in run_jobs.
    # Python's own handler, as a terminal's Ctrl-C finds it: pytest started in the
    # background ignores SIGINT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt_when_started() -> None:
        while not all((tmp_path / f"run{seed}.start").exists() for seed in (0, 1)):
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_jobs(runs, 2, command_for, io.StringIO(), stop_grace_s=20)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "run0.stopped").exists() and (tmp_path / "run1.stopped").exists()
    assert not (tmp_path / "run2.start").exists()


def test_a_run_under_another_process_lock_is_refused(tmp_path):
    spec = parse_spec(SPEC)
    launcher = RecordingLauncher()
    # nobody holds the folder
    with pytest.raises(SweepError, match="not held by this process's parent"):
        run_sweep(spec, tmp_path, spec.runs()[:1], launcher=launcher, held_by=os.getppid())
    # this process holds it, but it is not this process's parent
    with folder_lock(tmp_path, "test"):
        assert lock_holder(tmp_path) == os.getpid()
        with pytest.raises(SweepError, match="not held by this process's parent"):
            run_sweep(spec, tmp_path, spec.runs()[:1], launcher=launcher, held_by=os.getpid())
    assert lock_holder(tmp_path) is None
    assert launcher.calls == []


def test_commits_of_jobs_finishing_together_all_land(repo, tmp_path):  # noqa: F811
    paths = []
    for index in range(6):
        path = repo / "published" / f"run{index}" / SUMMARY
        path.parent.mkdir(parents=True)
        path.write_text("{}\n")
        paths.append(path)
    outs = [io.StringIO() for _ in paths]
    threads = [
        threading.Thread(target=commit, args=(repo, [path], f"run {index}", outs[index]))
        for index, path in enumerate(paths)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(out.getvalue() == "" for out in outs), [o.getvalue() for o in outs]
    log = git(repo, "log", "--format=%s").split("\n")
    assert sorted(line for line in log if line.startswith("run ")) == [f"run {i}" for i in range(6)]


@pytest.mark.simulation
def test_two_real_runs_at_once_are_published_and_committed_each_alone(repo, tmp_path):  # noqa: F811
    experiment = tmp_path / "two.yaml"
    experiment.write_text(
        "name: two\n"
        "federation: {num-supernodes: 2}\n"
        "base: {cvae-rounds: 1, clf-rounds: 1, imputation: none, num-synthetic: 0,\n"
        "       quality-samples: 0, privacy-audit: false}\n"
        "axes: {dirichlet-beta: [0.5, 100.0]}\n"
        "seeds: [0]\n"
    )
    spec = parse_spec(yaml_safe_load(experiment.read_text()))
    scratch, published = tmp_path / "scratch", repo / "published"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedaug_flwr.experiments",
            "campaign",
            str(experiment),
            "--jobs",
            "2",
            "--out",
            str(scratch),
            "--publish",
            str(published),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    # both started before either ended
    assert text.index("[job 2] starts") < text.index("[job 1] done")
    assert "[job 1] [1/1]" in text and "[job 2] [1/1]" in text  # the children's own lines
    assert "2 published now, 0 failed, 0 still to run" in text
    for run in spec.runs():
        assert (
            read_summary(run_dir(published, run))["config"]["dirichlet-beta"]
            == (run.run_config["dirichlet-beta"])
        )
    commits = [
        line.split(" ", 1)
        for line in git(repo, "log", "--format=%H %s").splitlines()
        if " two: " in line
    ]
    assert len(commits) == 2
    for sha, message in commits:
        files = git(repo, "show", "--name-only", "--format=", sha).split()
        cell = next(run.cell.name for run in spec.runs() if run.cell.name in message)
        assert {f for f in files if f != "published/sweep.yaml"} == {
            f"published/{cell}/seed-0/{name}" for name in (SUMMARY, "clients.csv")
        }, files
    assert lock_holder(scratch) is None
