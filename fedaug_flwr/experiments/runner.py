"""Run a sweep: one real Flower simulation per (cell, seed), resumable, one at a time.

A run is *complete* when its folder holds a readable ``summary.json`` (the app
writes it last, atomically) and the launch that wrote it ended normally: the
runner records each launch in ``run-state.json`` (``running`` before it
starts, then Flower's final status, or ``interrupted``), so a summary that
appears after an interruption does not count. Complete runs are skipped, so an
interrupted sweep continues where it stopped. A run that stopped half-way
(killed, interrupted or failed) resumes from the last round its checkpoint holds
(:mod:`fedaug_flwr.checkpoint`); a folder without one is cleared and run again.
A failing run does not stop the sweep: it leaves ``failure.json`` and is
reported at the end. One sweep at a time holds a sweep folder (a lock file with
its pid).

Each run goes through :func:`fedaug_flwr.launch.simulate` (``flwr run`` on a
private SuperLink); its log goes to ``flwr.log`` in the run's folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from fedaug_flwr import launch
from fedaug_flwr.checkpoint import CHECKPOINT, CheckpointError, check_folder
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import IDX_DATASETS, DataError, resolve_source
from fedaug_flwr.experiments.grid import (
    Run,
    SweepError,
    SweepSpec,
    load_spec,
    same_value,
    validate,
)
from fedaug_flwr.results import (
    FAILURE,
    SUMMARY,
    OutputFolderError,
    folder_lock,
    launch_state,
    lock_holder,
    read_summary,
    write_atomic,
    write_json,
    write_launch_state,
)

SPEC_FILE = "sweep.yaml"
RUN_LOG = "flwr.log"
# Which code each launch of a run used: a run resumed after a code change was made by both.
CODE_RECORD = "code.json"
# Keys that legitimately differ between a stored summary and the cell's config.
_NOT_COMPARED = {"output-dir"}

Launcher = Callable[..., launch.RunOutcome]


@dataclass
class SweepReport:
    """What one invocation of :func:`run_sweep` did."""

    selected: int = 0
    skipped: list[Run] = field(default_factory=list)
    completed: list[Run] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def run_dir(sweep_dir: Path, run: Run) -> Path:
    return Path(sweep_dir) / run.relative_dir


def run_status(sweep_dir: Path, run: Run) -> str:
    """``complete``, ``failed`` (failure.json, no summary), ``interrupted`` (its launch was
    interrupted or never ended), ``partial`` or ``pending``."""
    folder = run_dir(sweep_dir, run)
    if read_summary(folder) is not None:
        return "complete"
    if launch_state(folder).get("status") in ("running", "interrupted"):
        return "interrupted"
    if (folder / FAILURE).is_file():
        return "failed"
    if folder.exists() and any(folder.iterdir()):
        return "partial"
    return "pending"


def config_mismatch(summary: dict, run: Run) -> list[str]:
    """Keys whose stored value differs from what the experiment file asks for now."""
    expected = AppConfig.from_run_config(run.run_config).to_run_config()
    stored = summary.get("config", {})
    return [
        f"{key}: stored {stored[key]!r}, wanted {value!r}"
        for key, value in expected.items()
        if key in stored and key not in _NOT_COMPARED and not same_value(stored[key], value)
    ]


def write_spec(sweep_dir: Path, spec: SweepSpec) -> Path:
    """Keep the experiment file with its results: aggregation and plots read it."""
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    return write_atomic(Path(sweep_dir) / SPEC_FILE, lambda tmp: tmp.write_text(text))


def read_spec(sweep_dir: Path) -> SweepSpec:
    path = Path(sweep_dir) / SPEC_FILE
    if not path.is_file():
        raise SweepError(
            f"{sweep_dir} is not a sweep folder: it has no {SPEC_FILE} "
            "(it is written when a sweep is run)"
        )
    return load_spec(path)


def run_sweep(
    spec: SweepSpec,
    sweep_dir: Path,
    runs: Sequence[Run] | None = None,
    launcher: Launcher = launch.simulate,
    out: TextIO | None = None,
    echo_logs: bool = False,
    ray_address: str | None = None,
    held_by: int | None = None,
) -> SweepReport:
    """Run ``runs`` (default: the whole grid) that are not complete yet, one at a time.

    ``ray_address`` runs every simulation on that Ray cluster (the launcher's
    ``ray_address``; unset, the launcher reads ``$RAY_ADDRESS``).

    ``held_by``: the pid of this process's parent, which holds ``sweep_dir`` for it and
    for its siblings (a campaign with several jobs, :mod:`fedaug_flwr.experiments.jobs`);
    each run's own folder is still locked by the launcher. Refused unless that parent
    holds it now.

    :class:`SweepError` when another sweep holds ``sweep_dir``, or when this
    Python cannot start Flower; KeyboardInterrupt (Ctrl-C, SIGTERM) passes
    through once the running simulation is stopped.
    """
    out = sys.stdout if out is None else out
    sweep_dir = Path(sweep_dir).resolve()
    validate(spec)  # the whole grid, even when running part of it
    runs = list(spec.runs() if runs is None else runs)
    if launcher is launch.simulate:
        try:
            launch.check_environment()
        except launch.EnvironmentProblem as error:
            raise SweepError(str(error)) from error
        check_data(runs)
    with contextlib.ExitStack() as held:
        if held_by is None:
            try:
                held.enter_context(folder_lock(sweep_dir, f"sweep '{spec.name}'"))
            except OutputFolderError as error:
                raise SweepError(str(error)) from error
        elif held_by != os.getppid() or lock_holder(sweep_dir) != held_by:
            raise SweepError(
                f"{sweep_dir} is not held by this process's parent (pid {held_by}): a run "
                "is started with --held-by only by a campaign with several jobs"
            )
        return _run_held(spec, sweep_dir, runs, launcher, out, echo_logs, ray_address)


def check_data(runs: Sequence[Run]) -> None:
    """Every data set the runs ask for is where each run will look for it, before any run
    starts: a grid over ``dataset`` takes each IDX folder from ``data-dir`` or the data
    set's own variable ($FEDAUG_DATA_DIR, $FEDAUG_FASHION_DATA_DIR), and an ``mnist`` run
    that would fall back to the bundled digits, or a missing Fashion-MNIST, stops the
    sweep here instead of spoiling (or failing) its runs one by one."""
    wanted = {(run.run_config.get("dataset"), run.run_config.get("data-dir")) for run in runs}
    for dataset, data_dir in sorted(wanted, key=str):
        # a key a run leaves out takes the app's default (None is no value to validate)
        given = {"dataset": dataset, "data-dir": data_dir}
        config = AppConfig.from_run_config({k: v for k, v in given.items() if v is not None})
        try:
            source, folder, fallback = resolve_source(config.dataset, config.data_dir)
        except DataError as error:
            raise SweepError(f"dataset '{config.dataset}': {error}") from error
        if source != config.dataset:
            variable = IDX_DATASETS[config.dataset].env_var
            raise SweepError(
                f"dataset '{config.dataset}' would run on '{source}' ({fallback}): point "
                f"data-dir or ${variable} at an IDX folder of it"
            )


def _run_held(
    spec: SweepSpec,
    sweep_dir: Path,
    runs: list[Run],
    launcher: Launcher,
    out: TextIO,
    echo_logs: bool,
    ray_address: str | None = None,
) -> SweepReport:
    _check_stored_configs(sweep_dir, runs)
    write_spec(sweep_dir, spec)

    report = SweepReport(selected=len(runs))
    report.skipped = [r for r in runs if run_status(sweep_dir, r) == "complete"]
    todo = [r for r in runs if r not in report.skipped]
    _say(
        out,
        f"sweep '{spec.name}' in {sweep_dir}: {len(runs)} runs selected, "
        f"{len(report.skipped)} already complete, {len(todo)} to run",
    )
    started = time.monotonic()
    durations: list[float] = []
    for index, run in enumerate(todo, start=1):
        _say(out, f"[{index}/{len(todo)}] {run.label} ...")
        run_start = time.monotonic()
        echo = out if echo_logs else None
        error = _execute(run, sweep_dir, spec, launcher, echo, ray_address)
        durations.append(time.monotonic() - run_start)
        if error is None:
            report.completed.append(run)
            verdict = "done"
        else:
            report.failed.append((run, error))
            verdict = f"FAILED: {error}"
        _say(
            out,
            f"[{index}/{len(todo)}] {run.label} {verdict} in {durations[-1]:.0f} s; "
            f"{_progress(len(report.skipped) + index, len(runs), durations, len(todo) - index)}",
        )
    report.seconds = time.monotonic() - started
    _say(out, _closing_lines(report, sweep_dir))
    return report


def _execute(
    run: Run,
    sweep_dir: Path,
    spec: SweepSpec,
    launcher: Launcher,
    echo: TextIO | None,
    ray_address: str | None = None,
) -> str | None:
    """One run in a clean folder; returns None on success, else the reason it failed."""
    cluster = {} if ray_address is None else {"ray_address": ray_address}
    folder = run_dir(sweep_dir, run)
    resumes = (folder / CHECKPOINT).is_file()  # its config was checked before the sweep
    if resumes:  # the run goes on from its checkpoint; the earlier attempt's end is void
        for stale in (SUMMARY, FAILURE):
            (folder / stale).unlink(missing_ok=True)
    elif folder.exists():
        shutil.rmtree(folder)  # half-written or failed before: start from nothing
    folder.mkdir(parents=True, exist_ok=True)
    record_launch_code(folder, resumed=resumes)
    # Until the launcher returns, nothing in this folder counts as a completed run.
    write_launch_state(folder, "running", pid=os.getpid(), started=time.strftime("%F %T"))
    run_config = {**run.run_config, "output-dir": str(folder)}
    try:
        # a resumed run's log goes on after the interrupted attempt's
        with (folder / RUN_LOG).open("a" if resumes else "w") as log:
            if resumes:
                log.write(f"\n---- resumed {time.strftime('%F %T')} ----\n")
            stream = _Tee(log, echo) if echo is not None else log
            outcome = launcher(
                run_config,
                num_supernodes=spec.num_supernodes,
                num_cpus=int(spec.federation["num-cpus"]),
                num_gpus=float(spec.federation["num-gpus"]),
                stream=stream,
                **cluster,
            )
    except KeyboardInterrupt:
        write_launch_state(folder, "interrupted", ended=time.strftime("%F %T"))
        raise
    except Exception as error:  # noqa: BLE001 - one broken run must not end the sweep
        reason = f"{type(error).__name__}: {error}"
        write_launch_state(folder, "failed", error=reason)
        _record_failure(folder, run, reason)
        return reason
    write_launch_state(
        folder, outcome.status, **{"run-id": outcome.run_id, "details": outcome.details}
    )
    if outcome.ok and read_summary(folder) is not None:
        return None
    if outcome.ok:
        reason = f"run {outcome.run_id} finished but wrote no {SUMMARY} in {folder}"
    else:
        reason = f"run {outcome.run_id or '(none)'} {outcome.status} {outcome.details}".strip()
    _record_failure(folder, run, reason)
    return _failure_reason(folder) or reason


def _record_failure(folder: Path, run: Run, reason: str) -> None:
    """Leave failure.json (the app writes its own when its ServerApp failed)."""
    if not (folder / FAILURE).is_file():
        write_json(
            folder / FAILURE,
            {"status": "failed", "error": reason, "config": run.run_config, "log": RUN_LOG},
        )


def _failure_reason(folder: Path) -> str:
    try:
        return str(json.loads((folder / FAILURE).read_text()).get("error", ""))
    except (OSError, json.JSONDecodeError):
        return ""


def _check_stored_configs(sweep_dir: Path, runs: Sequence[Run]) -> None:
    """Refuse to mix results of another configuration into this sweep folder: completed
    runs, and interrupted ones that would resume from their checkpoint."""
    for run in runs:
        folder = run_dir(sweep_dir, run)
        summary = read_summary(folder)
        if summary is None:
            config = {**run.run_config, "output-dir": str(folder)}
            try:
                check_folder(folder, AppConfig.from_run_config(config).to_run_config())
            except CheckpointError as error:
                raise SweepError(
                    f"{folder} holds an interrupted run that cannot be resumed: {error}"
                ) from error
            continue
        differences = config_mismatch(summary, run)
        if differences:
            raise SweepError(
                f"{run_dir(sweep_dir, run)} holds a completed run of a different configuration "
                f"({'; '.join(differences)}); use another sweep folder (--out) or delete it"
            )


def _progress(done: int, total: int, durations: Sequence[float], remaining: int) -> str:
    mean = sum(durations) / len(durations)
    eta = _duration(mean * remaining) if remaining else "0 s"
    return f"{done}/{total} complete, ETA {eta}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _closing_lines(report: SweepReport, sweep_dir: Path) -> str:
    lines = [
        f"sweep finished in {_duration(report.seconds)}: {len(report.completed)} ran, "
        f"{len(report.skipped)} skipped (already complete), {len(report.failed)} failed"
    ]
    for run, reason in report.failed:
        lines.append(f"  FAILED {run.label}: {reason} (see {run_dir(sweep_dir, run) / RUN_LOG})")
    return "\n".join(lines)


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


class _Tee:
    """A write-only stream that copies to two streams (run log and console)."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def statuses(sweep_dir: Path, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: cell, seed, folder and status (for ``list`` and aggregation)."""
    return [
        {
            "cell": run.cell.name,
            "seed": run.seed,
            "folder": str(run.relative_dir),
            "status": run_status(sweep_dir, run),
            "error": _failure_reason(run_dir(sweep_dir, run)),
        }
        for run in runs
    ]


def code_version(folder: Path | None = None) -> dict[str, Any]:
    """The git commit of the code in ``folder`` (default: this package's checkout) and
    whether it had uncommitted changes; ``unknown`` outside a git checkout."""
    folder = Path(__file__).resolve().parent if folder is None else folder

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "fedaug_flwr", "*.py")
    return {"code-commit": commit or "unknown", "code-changed": bool(changed)}


def record_launch_code(folder: Path, resumed: bool) -> Path:
    """Add this launch's code version to the run folder's ``code.json`` (a fresh run
    starts the list anew), so that whoever publishes the run later names the code that
    made it, not the code that happens to publish it."""
    path = Path(folder) / CODE_RECORD
    launches = read_launch_code(folder) if resumed else []
    launches.append({"started": time.strftime("%F %T"), "resumed": resumed, **code_version()})
    return write_json(path, {"launches": launches})


def read_launch_code(folder: Path) -> list[dict[str, Any]]:
    """The launches recorded by :func:`record_launch_code` (empty for older run folders)."""
    try:
        return list(json.loads((Path(folder) / CODE_RECORD).read_text())["launches"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
