"""Flower's own cost of a classifier round: evaluation on receipt against evaluate messages.

Benchmark 1's ``overhead`` run (the app's ServerApp with a ClientApp that
answers without training or evaluating, ``bench/client_apps.py``) with each of
the app's two ways to evaluate the clients, alternately, ``--repeats`` times:

- **on receipt** (``evaluate-on-receipt = true``, the default): each round's
  global model is evaluated by the next round's train messages; the last one
  gets evaluate messages of its own;
- **evaluate messages** (``false``): Flower's separate evaluate round after
  every training round.

Seconds per round exclude the server's own model evaluation, as in benchmark 1.
Reported per scheme: the median round and the mean round (the mean counts the
last round's separate evaluation, which a longer run spreads over more rounds).

    python -m bench.overhead --scales 100:mnist-5k 100:mnist --repeats 3
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
from bench.federated import Scale, flower_run, has_full_mnist, run_config, summarize

SCHEMES = {
    "on receipt": {"evaluate-on-receipt": True},
    "evaluate messages": {"evaluate-on-receipt": False},
}
RESOURCES = {"cpus-per-client": 1, "gpus-per-client": 0.0, "total-cpus": None}


def measure(scale: Scale, rounds: int, repeats: int, data_dir: str, workdir: Path) -> dict:
    """Both schemes' no-op runs at one scale, interleaved so that load changes hit both."""
    base = run_config("classifier", scale, rounds, data_dir, {})
    runs: dict[str, list[dict]] = {scheme: [] for scheme in SCHEMES}
    load_before = load_average()
    for repeat in range(repeats):
        for scheme, extra in SCHEMES.items():
            print(f"[bench] overhead {scale} repeat {repeat + 1}/{repeats}: {scheme}", flush=True)
            config = {**base, **extra}
            runs[scheme].append(
                flower_run("noop-clf", scale, config, RESOURCES, "classifier", workdir)
            )
    stats = {
        scheme: summarize([r for run in runs[scheme] for r in run["rounds"]], without_global=True)
        for scheme in SCHEMES
    }
    per_run_means = {
        scheme: [summarize(run["rounds"], True)["seconds-per-round-mean"] for run in runs[scheme]]
        for scheme in SCHEMES
    }
    return {
        "scale": str(scale),
        "run-config": base,
        **stats,
        "run-mean-seconds-per-round": per_run_means,
        "on-receipt-over-evaluate-messages-mean": ratio(
            stats["on receipt"]["seconds-per-round-mean"],
            stats["evaluate messages"]["seconds-per-round-mean"],
        ),
        "load-average-before-after": [load_before, load_average()],
        "runs": runs,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument(
        "--scales",
        nargs="+",
        type=Scale.parse,
        default=[Scale.parse(s) for s in ("100:mnist-5k", "100:mnist")],
        help="CLIENTS:DATASET pairs (default: 100 clients on mnist-5k and on mnist)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="classifier rounds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each scheme per scale")
    parser.add_argument("--data-dir", default=default_data_dir(), help="full MNIST folder")
    parser.add_argument("--output", default=str(RESULTS_DIR / "overhead.json"))
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.repeats < 1:
        parser.error(
            "--rounds must be >= 2 (a single round evaluates on its own) and --repeats >= 1"
        )
    if any(s.dataset == "mnist" for s in args.scales) and not has_full_mnist(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} holds no MNIST IDX files")
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="fedaug-bench-overhead-"))
    try:
        results = [
            measure(s, args.rounds, args.repeats, args.data_dir, workdir) for s in args.scales
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [
        {
            "scale": result["scale"],
            "scheme": scheme,
            "rounds": result[scheme]["rounds-measured"],
            "median s/round": result[scheme]["seconds-per-round"],
            "mean s/round": result[scheme]["seconds-per-round-mean"],
            "per-run means": " ".join(
                f"{s:.2f}" for s in result["run-mean-seconds-per-round"][scheme]
            ),
        }
        for result in results
        for scheme in SCHEMES
    ]
    report = {
        "benchmark": "overhead",
        "machine": machine,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "results": results,
        "load-average-at-end": load_average(),
    }
    print_table(
        f"Flower-only classifier round (no-op clients), {args.rounds} rounds x {args.repeats} runs",
        rows,
        list(rows[0]),
    )
    save_results(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
