"""One Flower simulation of the app, in its own process (the benchmarks start it).

The ServerApp is the app's own (``server_app.build_server_app``), the
ClientApp the app's own or a no-op variant (``bench.client_apps``), run by
``flwr.simulation.run_simulation`` on Ray with the given client resources.
The run writes its ``summary.json`` (with per-round timings) to the
``output-dir`` of the run config; the benchmark reads it from there.

    python -m bench.flower_child --variant real --num-supernodes 10 \\
        --run-config '{"dataset": "mnist-5k", "clf-rounds": 2, "output-dir": "/tmp/x"}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench.client_apps import VARIANTS, build_client_app


def backend_config(
    cpus_per_client: int, gpus_per_client: float, total_cpus: int | None, total_gpus: int | None
) -> dict:
    init_args: dict = {"num_cpus": total_cpus or os.cpu_count()}
    if total_gpus is not None:
        init_args["num_gpus"] = total_gpus
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
        "init_args": init_args,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flower_child")
    parser.add_argument("--variant", choices=VARIANTS, default="real")
    parser.add_argument("--num-supernodes", type=int, required=True)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--total-cpus", type=int, default=None)
    parser.add_argument("--total-gpus", type=int, default=None)
    parser.add_argument("--run-config", required=True, help="JSON object of run-config values")
    args = parser.parse_args(argv)
    overrides = json.loads(args.run_config)
    if not overrides.get("output-dir"):
        parser.error("--run-config needs an absolute 'output-dir' to read the results from")

    from flwr.simulation import run_simulation

    from server_app import build_server_app

    run_simulation(
        server_app=build_server_app(overrides),
        client_app=build_client_app(args.variant),
        num_supernodes=args.num_supernodes,
        backend_config=backend_config(
            args.cpus_per_client, args.gpus_per_client, args.total_cpus, args.total_gpus
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
