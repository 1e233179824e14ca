"""Benchmark 5: benchmark 1 at paper scale on a CUDA machine, fractional GPUs per client.

One command, sized to finish in under 5 minutes on one H100 (16 CPU cores):
100 clients on full MNIST, 1 CVAE round, 2 classifier rounds; the Flower
simulation gives every client actor 1 CPU core and ``--gpus-per-client`` of
the GPU (0.1: ten actors share it), the plain loop runs on the same GPU with
torch's default threads. The card's name goes into the JSON (``machine.gpus``).

    FEDAUG_DATA_DIR=/path/to/mnist python -m bench.gpu
    python -m bench.gpu --data-dir /path/to/mnist --gpus-per-client 0.2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench import federated
from bench.common import RESULTS_DIR, default_data_dir, gpu_names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--data-dir", default=default_data_dir(), help="full MNIST folder")
    parser.add_argument("--gpus-per-client", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2, help="classifier rounds")
    parser.add_argument("--output", default=str(RESULTS_DIR / "gpu-classifier-round.json"))
    args = parser.parse_args(argv)
    if not gpu_names():
        print("bench.gpu: torch sees no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    if not 0 < args.gpus_per_client <= 1:
        parser.error("--gpus-per-client must be in (0, 1]")
    print(f"[bench] GPU: {', '.join(gpu_names())}", flush=True)
    return federated.main(
        "classifier",
        [
            "--scales",
            "100:mnist",
            "--rounds",
            str(args.rounds),
            "--repeats",
            "1",
            "--cpus-per-client",
            "1",
            "--gpus-per-client",
            str(args.gpus_per_client),
            "--loop-threads",
            "0",
            "--data-dir",
            args.data_dir,
            "--output",
            args.output,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
