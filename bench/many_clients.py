"""Flower's cost per round and the run's peak memory as the clients grow: 100 to 1,000.

Full MNIST split over ``--clients`` (default 100 and 1,000; 600 and 60 images each),
the app's ServerApp in a real Flower simulation with the ClientApp that answers the
classifier's messages without training (``noop-clf``, ``bench/client_apps.py``): what
is left of a round is Flower's and the app's own cost (messages, checks, aggregation,
the global evaluation is left out as in benchmark 1). The CVAE phase (one round),
imputation and the final evaluation run for real. Near-IID labels (``dirichlet-beta``
100) so that every client of 1,000 holds its 40 images without redrawing for hours.

Reported per scale: the median and mean seconds per classifier round, seconds per
round per 100 clients (linear growth keeps it flat), each phase's seconds, and the
peak memory of the whole process tree (driver, SuperLink, Ray and its actors).
``python -m bench.profile --variant noop-clf --num-supernodes 1000 --dataset mnist``
shows where a round's time goes.

    python -m bench.many_clients --clients 100 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    RESULTS_DIR,
    default_data_dir,
    load_average,
    machine_info,
    print_table,
    ratio,
    save_results,
)
from bench.federated import (
    Scale,
    flower_run,
    has_full_mnist,
    parse_run_config,
    run_config,
    summarize,
)

RESOURCES = {"cpus-per-client": 1, "gpus-per-client": 0.0, "total-cpus": None}
NEAR_IID = {"dirichlet-beta": 100.0, "evaluate-on-receipt": True}


def measure(
    clients: int, rounds: int, data_dir: str, workdir: Path, extra: dict | None = None
) -> dict:
    scale = Scale(clients, "mnist")
    config = run_config("classifier", scale, rounds, data_dir, {**NEAR_IID, **(extra or {})})
    print(f"[bench] {clients} clients, {rounds} classifier rounds", flush=True)
    run = flower_run("noop-clf", scale, config, RESOURCES, "classifier", workdir)
    stats = summarize(run["rounds"], without_global=True)
    return {
        "clients": clients,
        "run-config": config,
        **stats,
        "seconds-per-round-per-100-clients": ratio(stats["seconds-per-round"] * 100, clients),
        "wall-s": run["wall-s"],
        "phase-timing-s": run["phase-timing-s"],
        "memory": run["memory"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many_clients", description=__doc__)
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3, help="classifier rounds per run")
    parser.add_argument("--data-dir", default=default_data_dir(), help="full MNIST folder")
    parser.add_argument(
        "--run-config",
        help="JSON object of extra run-config values, e.g. '{\"sim-message-index\": false}'",
    )
    parser.add_argument("--output", default=str(RESULTS_DIR / "many_clients.json"))
    args = parser.parse_args(argv)
    extra = parse_run_config(parser, "--run-config", args.run_config)
    if args.rounds < 2 or min(args.clients) < 2:
        parser.error("--rounds must be >= 2 and every --clients value >= 2")
    if not has_full_mnist(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} holds no MNIST IDX files")
    before = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="fedaug-bench-many-"))
    try:
        results = [measure(n, args.rounds, args.data_dir, workdir, extra) for n in args.clients]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [
        {
            "clients": r["clients"],
            "median s/round": r["seconds-per-round"],
            "mean s/round": r["seconds-per-round-mean"],
            "s/round per 100 clients": r["seconds-per-round-per-100-clients"],
            "peak PSS GiB": (r["memory"] or {}).get("peak-pss-sum-gib"),
            "peak RSS GiB": (r["memory"] or {}).get("peak-rss-sum-gib"),
            "wall s": r["wall-s"],
        }
        for r in results
    ]
    print_table("Flower's cost per classifier round and peak memory", rows, list(rows[0]))
    save_results(
        args.output,
        {
            "benchmark": "many-clients",
            "machine": machine_info(),
            "rounds": args.rounds,
            "load-average-before-after": [before, load_average()],
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
