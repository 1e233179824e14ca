"""Several runs of a campaign at once (``campaign --jobs N``), each in a child process.

One run does not always fill a machine: between rounds its server works alone
(aggregation, global evaluation, the CVAE's images) while the client actors wait, and
on a GPU one run's actors use a fraction of it. With ``--jobs N`` this parent keeps N
runs going. It holds the sweep folder (its lock) for all of them and hands each
unpublished run, in the campaign's order, to a child ``campaign`` process
(``--run CELL/seed-S --held-by PID``) that runs, publishes and commits it exactly as the
one-job campaign does (commits are serialised, :func:`campaign.commit`); the children's
output comes through with a ``[job n]`` prefix. SIGTERM or Ctrl-C is passed to every
child, and the parent returns only when each has stopped its simulation: as with one
job, at most the runs in progress are lost, and each resumes from its checkpoint.

Child processes, not threads: a run is stopped through the signal handling of the
process that runs it (``launch.signals_interrupt``), which only a process's
main thread gets, and each run's Flower and Ray processes are the launcher's to stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fedaug_flwr.experiments.campaign import published
from fedaug_flwr.experiments.grid import Run, SweepError, SweepSpec
from fedaug_flwr.results import OutputFolderError, folder_lock

POLL_S = 0.5
# A child's own stop (its simulation's processes) takes seconds; past this it is killed.
STOP_GRACE_S = 300.0
# exit codes of ``python -m fedaug_flwr.experiments campaign``
EXIT_FAILED, EXIT_ERROR = 1, 2


@dataclass
class JobsReport:
    done: list[Run] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)
    left: list[Run] = field(default_factory=list)
    error: str | None = None  # a child stopped with an error that stops the campaign


@dataclass
class _Job:
    number: int
    run: Run
    process: subprocess.Popen
    reader: threading.Thread


def run_campaign_in_jobs(
    spec: SweepSpec,
    experiment: Path,
    scratch_dir: Path,
    publish_dir: Path,
    runs: Sequence[Run],
    jobs: int,
    child_args: Sequence[str] = (),
    out: TextIO | None = None,
    max_runs: int | None = None,
) -> JobsReport:
    """The campaign's unpublished ``runs``, ``jobs`` at a time, each by a child
    ``python -m fedaug_flwr.experiments campaign <experiment> --run CELL/seed-S`` given
    ``child_args`` too (--federation, --ray-address, --no-commit), while this process
    holds ``scratch_dir``."""
    out = sys.stdout if out is None else out
    scratch_dir, publish_dir = Path(scratch_dir).resolve(), Path(publish_dir).resolve()
    todo = [run for run in runs if not published(publish_dir, run)]
    out.write(
        f"campaign '{spec.name}': {len(runs)} runs, {len(runs) - len(todo)} published in "
        f"{publish_dir}, {len(todo)} to run, {jobs} at a time\n"
    )

    def command_for(run: Run) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fedaug_flwr.experiments",
            "campaign",
            str(Path(experiment).resolve()),
            "--out",
            str(scratch_dir),
            "--publish",
            str(publish_dir),
            "--run",
            str(run.relative_dir),
            "--held-by",
            str(os.getpid()),
            *child_args,
        ]

    try:
        with folder_lock(scratch_dir, f"campaign '{spec.name}' in {jobs} jobs"):
            report = run_jobs(todo, jobs, command_for, out, max_runs)
    except OutputFolderError as error:
        raise SweepError(str(error)) from error
    out.write(
        f"campaign '{spec.name}': {len(report.done)} published now, {len(report.failed)} "
        f"failed, {len(report.left)} still to run\n"
    )
    for run, reason in report.failed:
        out.write(f"  FAILED {run.label}: {reason}\n")
    if report.error:
        out.write(f"  STOPPED {report.error}\n")
    return report


def run_jobs(
    runs: Sequence[Run],
    jobs: int,
    command_for: Callable[[Run], list[str]],
    out: TextIO,
    max_runs: int | None = None,
    stop_grace_s: float = STOP_GRACE_S,
) -> JobsReport:
    """Run ``command_for(run)`` for every run, at most ``jobs`` at a time, in order.

    A child that ends with exit code 2 (an error of the campaign, e.g. a run fell back to
    other data) stops the handing out of runs; the others finish. KeyboardInterrupt
    passes through once every child has stopped.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    report = JobsReport()
    pending = list(runs)
    if max_runs is not None:
        pending, report.left = pending[:max_runs], pending[max_runs:]
    active: list[_Job] = []
    printing = threading.Lock()
    number = 0
    try:
        while active or (pending and report.error is None):
            while pending and len(active) < jobs and report.error is None:
                number += 1
                active.append(_start(number, pending.pop(0), command_for, out, printing))
            time.sleep(POLL_S)
            for job in [job for job in active if job.process.poll() is not None]:
                active.remove(job)
                job.reader.join()
                _record(job, report, out, printing)
    except KeyboardInterrupt:
        _stop_all(active, out, printing, stop_grace_s)
        raise
    report.left.extend(pending)
    return report


def _start(
    number: int,
    run: Run,
    command_for: Callable[[Run], list[str]],
    out: TextIO,
    printing: threading.Lock,
) -> _Job:
    with printing:
        out.write(f"[job {number}] starts {run.label}\n")
        out.flush()
    process = subprocess.Popen(
        command_for(run),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # lines as they come, not at exit
    )
    reader = threading.Thread(
        target=_relay, args=(process, f"[job {number}] ", out, printing), daemon=True
    )
    reader.start()
    return _Job(number, run, process, reader)


def _relay(process: subprocess.Popen, prefix: str, out: TextIO, printing: threading.Lock) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        with printing:
            out.write(prefix + line)
            out.flush()


def _record(job: _Job, report: JobsReport, out: TextIO, printing: threading.Lock) -> None:
    code = job.process.returncode
    if code == 0:
        report.done.append(job.run)
        verdict = "done"
    elif code == EXIT_ERROR:
        stopped = f"{job.run.label}: the campaign stopped (see job {job.number})"
        report.error = report.error or stopped
        report.left.append(job.run)
        verdict = "stopped the campaign"
    else:
        reason = "failed" if code == EXIT_FAILED else f"ended with exit code {code}"
        report.failed.append((job.run, reason))
        verdict = reason
    with printing:
        out.write(f"[job {job.number}] {verdict}: {job.run.label}\n")
        out.flush()


def _stop_all(
    active: list[_Job], out: TextIO, printing: threading.Lock, stop_grace_s: float
) -> None:
    """SIGTERM to every child (each stops its own simulation), then wait for them all.
    (The command line ignores a second signal meanwhile, as it does with one job.)"""
    for job in active:
        if job.process.poll() is None:
            job.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + stop_grace_s
    for job in active:
        try:
            job.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
            with printing:
                out.write(f"[job {job.number}] did not stop in {stop_grace_s:.0f} s: killed\n")
        job.reader.join(timeout=5)
