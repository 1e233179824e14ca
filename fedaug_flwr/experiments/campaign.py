"""A campaign: a grid too long for one sitting, run stage by stage and published as it goes.

An experiment file with ``publish: <folder>`` and ``stages`` describes it::

    publish: docs/results/paper-scale     # compact results, kept in the repository
    stages:                               # in order; within a stage seed by seed
      - {only: {dirichlet-beta: [0.1, 100.0]}, seeds: [0, 1, 2]}
      - {seeds: [0, 1, 2]}                # every other cell
      - {seeds: [3, 4]}

Each run goes through the sweep runner (a real Flower run, in a scratch sweep folder
that keeps its weights and logs). When it completes, its compact results (``summary.json``
without the per-client rows of every round, and ``clients.csv``: one row per client with
its data, label counts and final metrics) are written to ``<publish>/<cell>/seed-<s>/``
and committed with git at once, with nothing else. A run whose compact results are
already there is skipped, so the campaign stops anywhere (losing at most the run in
progress) and continues on any machine that has the repository, with the same command.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from fedaug_flwr.data import IDX_DATASETS
from fedaug_flwr.experiments.aggregate import client_rows
from fedaug_flwr.experiments.grid import Run, SweepError, SweepSpec, select
from fedaug_flwr.experiments.runner import (
    SPEC_FILE,
    Launcher,
    code_version,
    read_launch_code,
    run_dir,
    run_sweep,
    write_spec,
)
from fedaug_flwr.launch import simulate
from fedaug_flwr.results import SUMMARY, read_summary, write_atomic, write_json

CLIENTS_TABLE = "clients.csv"
COMMIT_LOCK = "fedaug-campaign-commit.lock"
# Per-client rows of every round: most of a 100-client summary, and in no table.
_PER_ROUND_DETAIL = ("train-per-client", "evaluate-per-client")
# Folders of the machine that made the run: meaningless elsewhere, and not published.
_LOCAL_PATHS = (
    ("output-dir",),
    ("config", "output-dir"),
    ("config", "data-dir"),
    ("data", "location"),
)


def compact_summary(summary: dict[str, Any], code: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary without the per-client rows of every round (a few hundred kB instead of
    MBs) and without the machine's folders; the aggregated rounds, every client's final
    numbers and all the rest stay. ``code`` says which code made the run."""
    compact = copy.deepcopy(summary)
    for phase in ("cvae", "classifier"):
        for row in (compact.get(phase) or {}).get("rounds", []):
            for key in _PER_ROUND_DETAIL:
                row.pop(key, None)
    for *parents, key in _LOCAL_PATHS:
        section = compact
        for parent in parents:
            section = section.get(parent) or {}
        if section.get(key):
            section[key] = "(local folder, not published)"
    compact["compact"] = {"dropped-per-round": list(_PER_ROUND_DETAIL), **(code or {})}
    return compact


def run_code(run_folder: Path) -> dict[str, Any]:
    """Which code made the run in ``run_folder``: the commit of its launches (the sweep
    runner records each in ``code.json``; a run resumed under other code lists every
    commit in ``code-commits``, the last in ``code-commit``). A run folder from before
    that record gets the publishing checkout's version, marked as recorded at publishing."""
    launches = read_launch_code(run_folder)
    if not launches:
        return {**code_version(), "code-recorded": "at publishing (the run did not record it)"}
    commits = list(dict.fromkeys(launch["code-commit"] for launch in launches))
    code: dict[str, Any] = {
        "code-commit": commits[-1],
        "code-changed": any(launch["code-changed"] for launch in launches),
    }
    if len(commits) > 1:
        code["code-commits"] = commits
    return code


def publish(run_folder: Path, target: Path, code: dict[str, Any] | None = None) -> list[Path]:
    """Write a completed run's compact results to ``target``; returns the files."""
    summary = read_summary(run_folder)
    if summary is None:
        raise SweepError(f"{run_folder} holds no completed run to publish")
    table = pd.DataFrame(client_rows(summary))
    clients = write_atomic(target / CLIENTS_TABLE, lambda tmp: table.to_csv(tmp, index=False))
    # the summary last: a folder with it is a published run
    return [clients, write_json(target / SUMMARY, compact_summary(summary, code))]


def published(publish_dir: Path, run: Run) -> bool:
    return read_summary(run_dir(publish_dir, run)) is not None


def staged_runs(spec: SweepSpec) -> list[list[Run]]:
    """The campaign's runs stage by stage, seed by seed within a stage; a run belongs to
    the first stage that selects it."""
    stages: list[list[Run]] = []
    seen: set[Run] = set()
    for stage in spec.stages or [{"seeds": list(spec.seeds)}]:
        runs = select(spec, {**stage.get("only", {}), "seed": list(stage["seeds"])})
        ordered = [r for seed in stage["seeds"] for r in runs if r.seed == seed and r not in seen]
        seen.update(ordered)
        stages.append(ordered)
    return stages


def ordered_runs(spec: SweepSpec) -> list[Run]:
    """Every run of the campaign, in stage order, seed by seed within a stage, once."""
    return [run for stage in staged_runs(spec) for run in stage]


def runs_of_stages(spec: SweepSpec, stages: Sequence[int]) -> list[Run]:
    """The runs of the numbered stages (1 = the first), in campaign order; lets one command
    run part of a campaign (say stages 1 and 2) and hand over to another campaign."""
    staged = staged_runs(spec)
    wrong = sorted({number for number in stages if not 1 <= number <= len(staged)})
    if wrong:
        raise SweepError(
            f"campaign '{spec.name}' has stages 1 to {len(staged)}; no stage {wrong[0]}"
        )
    return [
        run for number, stage in enumerate(staged, start=1) if number in stages for run in stage
    ]


def _kind(run: Run) -> tuple[int, str]:
    """What a run's cost depends on: its synthetic images per client and its pretraining."""
    config = run.run_config
    k = 0 if config.get("imputation") == "none" else int(config.get("num-synthetic", 0))
    return k, str(config.get("pretrain", "off"))


def _cost(summary: dict[str, Any]) -> dict[str, Any]:
    """A published run's wall time and the cores (and GPUs) its simulation held."""
    resources = (summary.get("ray-cluster") or {}).get("resources") or {}
    made_on = (summary.get("compact") or {}).get("made-on") or {}
    hours = float((summary.get("timing-s") or {}).get("total", 0.0)) / 3600
    return {
        "hours": hours,
        "cpus": float(resources.get("CPU", 0.0)),
        "gpus": float(resources.get("GPU", 0.0)),
        "gpu-names": made_on.get("gpus"),
        "resumed": len(summary.get("resumed") or []),
    }


def _data_note(runs: Sequence[Run]) -> str:
    """Where the campaign's runs read their data: the variable of each IDX data set that a
    run without a ``data-dir`` of its own asks for, in the spec's order."""
    from_variables = dict.fromkeys(
        str(run.run_config.get("dataset"))
        for run in runs
        if not run.run_config.get("data-dir") and str(run.run_config.get("dataset")) in IDX_DATASETS
    )
    if not from_variables:
        return "with nothing to set (its runs use the bundled digits or name their folders)"
    folders = " ".join(
        f"`{IDX_DATASETS[name].env_var}=<{IDX_DATASETS[name].title} IDX folder>`"
        for name in from_variables
    )
    return f"with the data its runs read: {folders}"


def campaign_progress(spec: SweepSpec, folder: Path) -> str:
    """Markdown: what the campaign in ``folder`` has published and what it cost, what is
    still to run stage by stage with an estimate, and the runs that come next.

    The cost is each run's recorded wall time (``timing-s.total``; a resumed run's is the
    sum of its attempts) times the cores its Ray cluster had: the CPU-hours the run held,
    whether or not other work shared those cores. The estimate for a run still to run is
    the mean wall time of the published runs of its kind (k, pretraining)."""
    folder = Path(folder)
    stages = staged_runs(spec)
    costs = {
        run: _cost(summary)
        for stage in stages
        for run in stage
        if (summary := read_summary(run_dir(folder, run))) is not None
    }
    by_kind: dict[tuple[int, str], list[float]] = {}
    for run, cost in costs.items():
        by_kind.setdefault(_kind(run), []).append(cost["hours"])
    total = sum(len(stage) for stage in stages)
    lines = [
        f"# Campaign '{spec.name}': {len(costs)} of {total} runs published",
        "",
        "| stage | runs | published | still to run | estimated wall hours left |",
        "|---:|---:|---:|---:|---|",
    ]
    for number, stage in enumerate(stages, start=1):
        pending = [run for run in stage if run not in costs]
        known = [by_kind[_kind(r)] for r in pending if _kind(r) in by_kind]
        hours = sum(sum(h) / len(h) for h in known)
        unknown = len(pending) - len(known)
        estimate = " + ".join(
            ([f"{hours:.1f}"] if known else [])
            + ([f"{unknown} runs of a kind not run yet"] * bool(unknown))
        )
        lines.append(
            f"| {number} | {len(stage)} | {len(stage) - len(pending)} | {len(pending)} "
            f"| {estimate if pending else '-'} |"
        )
    recorded = [c for c in costs.values() if c["cpus"] > 0]
    cpu_hours = sum(c["hours"] * c["cpus"] for c in recorded)
    gpu_minutes = sum(c["hours"] * 60 for c in costs.values() if c["gpus"] > 0)
    unrecorded = len(costs) - len(recorded)
    lines += [
        "",
        f"Cost so far: {sum(c['hours'] for c in costs.values()):.1f} wall hours; "
        f"{cpu_hours:.1f} CPU-hours (wall time x the cores of the run's Ray cluster)"
        + (f" for the {len(recorded)} runs that recorded their cores" if unrecorded else "")
        + f"; {gpu_minutes:.0f} minutes of runs with a GPU. Wall times are as recorded: a "
        "run that shared its machine with other work took longer than it would alone.",
        "",
        "Continue it from the repository's root (it runs what is not published yet, in "
        "this order; the experiment file is kept with the results): `python -m "
        f"fedaug_flwr.experiments campaign {spec.publish or '<this folder>'}/{SPEC_FILE}`, "
        f"{_data_note([run for stage in stages for run in stage])}.",
        "",
        "## Next runs, in order",
        "",
    ]
    upcoming = [run for stage in stages for run in stage if run not in costs]
    lines += [f"{i}. {run.label}" for i, run in enumerate(upcoming[:10], start=1)]
    if len(upcoming) > 10:
        lines.append(f"\n... and {len(upcoming) - 10} more.")
    if not upcoming:
        lines.append("None: every run is published.")
    lines += [
        "",
        "## Published runs",
        "",
        "| cell | seed | wall min | cores | GPU | CPU-hours | resumed |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for run, cost in costs.items():
        gpu = ", ".join(cost["gpu-names"] or []) if cost["gpus"] > 0 else "-"
        cores, core_hours = "not recorded", "-"
        if cost["cpus"] > 0:
            cores, core_hours = f"{cost['cpus']:g}", f"{cost['hours'] * cost['cpus']:.2f}"
        lines.append(
            f"| {run.cell.name} | {run.seed} | {cost['hours'] * 60:.0f} | {cores} "
            f"| {gpu or 'yes'} | {core_hours} | {cost['resumed']} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class CampaignReport:
    done: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)
    left: list[Run] = field(default_factory=list)


def commit(repo: Path, paths: Sequence[Path], message: str, out: TextIO) -> bool:
    """Commit exactly ``paths`` (nothing else that is staged); False, said, if git fails.

    One commit at a time per checkout: the jobs of a campaign (and two campaigns in one
    checkout) finish runs at any moment, and git refuses a second writer of the index
    instead of waiting for it."""
    relative = [str(Path(p).resolve().relative_to(repo)) for p in paths]
    with _commit_lock(repo):
        for command in (
            ["add", "--", *relative],
            ["commit", "-q", "-m", message, "--", *relative],
        ):
            result = subprocess.run(
                ["git", "-C", str(repo), *command], capture_output=True, text=True
            )
            if result.returncode != 0:
                out.write(f"  git {command[0]} failed: {result.stderr.strip()}\n")
                return False
    return True


@contextlib.contextmanager
def _commit_lock(repo: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a file in the checkout's git folder (a worktree has its
    own, with its own index), held while git writes the index and the commit."""
    git_dir = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--absolute-git-dir"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    handle = os.open(Path(git_dir) / COMMIT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _repository(folder: Path) -> Path | None:
    result = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "--show-toplevel"], capture_output=True, text=True
    )
    return Path(result.stdout.strip()).resolve() if result.returncode == 0 else None


def run_campaign(
    spec: SweepSpec,
    scratch_dir: Path,
    publish_dir: Path,
    runs: Sequence[Run] | None = None,
    commit_results: bool = True,
    max_runs: int | None = None,
    launcher: Launcher = simulate,
    out: TextIO | None = None,
    ray_address: str | None = None,
    held_by: int | None = None,
) -> CampaignReport:
    """Run the campaign's unpublished runs in order, publishing (and committing) each
    (on the Ray cluster at ``ray_address`` when given; ``held_by``: one job of a campaign
    with several, see :func:`run_sweep`)."""
    out = sys.stdout if out is None else out
    runs = ordered_runs(spec) if runs is None else list(runs)
    publish_dir = Path(publish_dir).resolve()
    publish_dir.mkdir(parents=True, exist_ok=True)
    repo = _repository(publish_dir) if commit_results else None
    if commit_results and repo is None:
        raise SweepError(f"{publish_dir} is not inside a git repository (use --no-commit)")
    spec_file = write_spec(publish_dir, spec)
    report = CampaignReport(skipped=[r for r in runs if published(publish_dir, r)])
    todo = [r for r in runs if r not in report.skipped]
    out.write(
        f"campaign '{spec.name}': {len(runs)} runs, {len(report.skipped)} published in "
        f"{publish_dir}, {len(todo)} to run\n"
    )
    for index, run in enumerate(todo, start=1):
        if max_runs is not None and len(report.done) + len(report.failed) >= max_runs:
            report.left = todo[index - 1 :]
            break
        out.write(f"campaign [{index}/{len(todo)}] {run.label}\n")
        sweep = run_sweep(
            spec,
            scratch_dir,
            [run],
            launcher=launcher,
            out=out,
            ray_address=ray_address,
            held_by=held_by,
        )
        if not sweep.ok:
            report.failed.extend(sweep.failed)
            continue
        summary = read_summary(run_dir(scratch_dir, run)) or {}
        wanted, got = run.run_config.get("dataset"), summary.get("data", {}).get("source")
        if wanted and got != wanted:
            raise SweepError(
                f"{run.label} ran on '{got}' instead of '{wanted}' "
                f"({summary['data'].get('fallback-reason')}): not published; point data-dir "
                "or $FEDAUG_DATA_DIR ($FEDAUG_FASHION_DATA_DIR for fashion-mnist) at the data "
                "set and run the campaign again"
            )
        code = run_code(run_dir(scratch_dir, run))
        files = publish(run_dir(scratch_dir, run), run_dir(publish_dir, run), code)
        minutes = float(summary.get("timing-s", {}).get("total", 0.0)) / 60
        if repo is not None:
            message = f"{spec.name}: {run.label} ({minutes:.0f} min)"
            if commit(repo, [spec_file, *files], message, out):
                out.write(f"  committed: {message}\n")
        report.done.append(run)
    out.write(
        f"campaign '{spec.name}': {len(report.done)} published now, {len(report.skipped)} "
        f"before, {len(report.failed)} failed, "
        f"{len(todo) - len(report.done) - len(report.failed)} still to run\n"
    )
    for run, reason in report.failed:
        out.write(f"  FAILED {run.label}: {reason}\n")
    return report
