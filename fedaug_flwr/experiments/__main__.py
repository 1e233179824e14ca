"""Command line for sweeps.

    python -m fedaug_flwr.experiments run conf/smoke.yaml [--out DIR] [--only seed=0]
    python -m fedaug_flwr.experiments list conf/smoke.yaml [--out DIR] [--only ...]
    python -m fedaug_flwr.experiments campaign conf/paper-scale.yaml [--max-runs N] [--jobs N]
    python -m fedaug_flwr.experiments aggregate results/sweeps/smoke
    python -m fedaug_flwr.experiments plot results/sweeps/smoke

``campaign`` runs an experiment file's stages in order and publishes (and commits)
each completed run's compact results (see :mod:`fedaug_flwr.experiments.campaign`);
``--jobs N`` keeps N runs going at once (:mod:`fedaug_flwr.experiments.jobs`).
``--federation num-gpus=0.1`` (run, campaign) overrides the file's simulation size for
this machine; results do not depend on it. ``--ray-address HOST:PORT`` (run, campaign;
default ``$RAY_ADDRESS``) runs the simulations on an existing Ray cluster
(docs/scale-out.md). ``run`` aggregates the tables when it
finishes; ``plot`` aggregates, then draws every figure the results support into
``<sweep folder>/figures/``.
Exit status: 0 when everything asked for is complete, 1 when a run failed,
2 for a bad experiment file or argument, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedaug_flwr import launch
from fedaug_flwr.experiments import aggregate, campaign, figures, jobs, runner
from fedaug_flwr.experiments.grid import (
    SweepError,
    SweepSpec,
    load_spec,
    override_federation,
    parse_filters,
    select,
    validate,
)


def _sweep_dir(spec_output: str, out: str | None) -> Path:
    return Path(out if out else spec_output).expanduser().resolve()


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="experiment file (YAML), e.g. conf/smoke.yaml")
    parser.add_argument(
        "--out", help="sweep folder (default: the file's 'output', relative to the current dir)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="AXIS=V1[,V2]",
        help="run only cells with these axis values (repeatable; 'seed=0,1' selects seeds)",
    )


def _add_federation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--federation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the file's federation (num-supernodes, num-cpus, num-gpus) here",
    )


def _spec(args: argparse.Namespace) -> SweepSpec:
    spec = load_spec(args.experiment)
    return override_federation(spec, parse_filters(getattr(args, "federation", [])))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedaug_flwr.experiments",
        description="Run fedaug-flwr sweeps from YAML, aggregate them over seeds, draw figures.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run every incomplete (cell, seed) of a sweep")
    _add_selection(run)
    run.add_argument("--verbose", action="store_true", help="echo each run's Flower log")
    _add_federation(run)
    launch.add_ray_arguments(run)
    long = commands.add_parser(
        "campaign", help="run a campaign's stages in order, publishing and committing each run"
    )
    _add_selection(long)
    _add_federation(long)
    launch.add_ray_arguments(long)
    long.add_argument("--publish", help="published results folder (default: the file's 'publish')")
    long.add_argument("--max-runs", type=int, help="stop after this many runs")
    long.add_argument(
        "--stages",
        type=_stage_numbers,
        help="run only these stages of the file's 'stages' (e.g. 1,2; 1 = the first)",
    )
    long.add_argument(
        "--no-commit", action="store_true", help="publish the results but do not git-commit them"
    )
    long.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in a process of its own (default 1; see docs/experiments.md)",
    )
    # one job's run, given by a campaign with --jobs (fedaug_flwr.experiments.jobs)
    long.add_argument("--run", help=argparse.SUPPRESS)
    long.add_argument("--held-by", type=int, help=argparse.SUPPRESS)
    listing = commands.add_parser("list", help="show the runs of a sweep and their status")
    _add_selection(listing)
    for name, text in (
        ("aggregate", "write tables/*.csv of a sweep folder"),
        ("plot", "aggregate, then draw figures/*.png and table1.md of a sweep folder"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("sweep_dir", help="a sweep folder (holds sweep.yaml)")
    return parser


def _stage_numbers(text: str) -> list[int]:
    """``--stages 1,2`` as [1, 2]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"stages are numbers separated by commas (e.g. 1,2), got {text!r}"
        ) from None


def _child_args(args: argparse.Namespace) -> list[str]:
    """What a campaign's jobs get of its command line besides their run."""
    child = [f"--federation={value}" for value in args.federation]
    if args.ray_address:
        child.append(f"--ray-address={args.ray_address}")
    if args.no_commit:
        child.append("--no-commit")
    return child


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "campaign":
            spec = _spec(args)
            publish_dir = Path(args.publish or spec.publish or f"results/published/{spec.name}")
            runs = campaign.ordered_runs(spec)
            if args.stages:
                runs = campaign.runs_of_stages(spec, args.stages)
            if args.only:
                chosen = set(select(spec, parse_filters(args.only)))
                runs = [r for r in runs if r in chosen]
            if args.run is not None:
                runs = [r for r in runs if str(r.relative_dir) == args.run]
                if not runs:
                    raise SweepError(f"{args.experiment} has no run {args.run!r}")
            if args.jobs < 1:
                raise SweepError(f"--jobs must be at least 1, got {args.jobs}")
            # SIGTERM and SIGINT end the campaign through KeyboardInterrupt, so that every
            # process of the running simulation is stopped and its run is left to resume.
            with launch.signals_interrupt():
                if args.jobs > 1:
                    outcome = jobs.run_campaign_in_jobs(
                        spec,
                        Path(args.experiment),
                        _sweep_dir(spec.output, args.out),
                        publish_dir,
                        runs,
                        args.jobs,
                        _child_args(args),
                        max_runs=args.max_runs,
                    )
                    return 2 if outcome.error else 1 if outcome.failed else 0
                report = campaign.run_campaign(
                    spec,
                    _sweep_dir(spec.output, args.out),
                    publish_dir.resolve(),
                    runs,
                    commit_results=not args.no_commit,
                    max_runs=args.max_runs,
                    ray_address=launch.resolve_ray_address(args.ray_address),
                    held_by=args.held_by,
                )
            return 0 if not report.failed else 1
        if args.command in ("run", "list"):
            spec = _spec(args)
            runs = select(spec, parse_filters(args.only))
            sweep_dir = _sweep_dir(spec.output, args.out)
            if args.command == "list":
                validate(spec, runs)
                for row in runner.statuses(sweep_dir, runs):
                    print(f"{row['status']:9} {row['folder']}  {row['error']}".rstrip())
                return 0
            with launch.signals_interrupt():  # as for a campaign
                report = runner.run_sweep(
                    spec,
                    sweep_dir,
                    runs,
                    echo_logs=args.verbose,
                    ray_address=launch.resolve_ray_address(args.ray_address),
                )
            aggregate.write_tables(sweep_dir)
            print(f"tables in {sweep_dir / aggregate.TABLES_DIR}")
            return 0 if report.ok else 1
        sweep_dir = Path(args.sweep_dir).expanduser().resolve()
        if args.command == "aggregate":
            tables = aggregate.write_tables(sweep_dir)
            print(
                f"{len(tables.final_runs)} complete runs in {len(tables.final_cells)} cells; "
                f"tables in {sweep_dir / aggregate.TABLES_DIR}"
            )
            return 0
        drawn = figures.draw_all(sweep_dir)
        for path in drawn.written:
            print(f"wrote {path}")
        for name, reason in drawn.skipped.items():
            print(f"skipped {name}: {reason}")
        return 0
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
