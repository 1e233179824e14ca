"""Benchmark 2: the CVAE phase's rounds, Flower simulation against the plain sequential loop.

    python -m bench.cvae_phase --scales 10:mnist-5k 100:mnist --rounds 3

See ``bench.federated`` for what is run and measured.
"""

from __future__ import annotations

import sys

from bench.federated import main

if __name__ == "__main__":
    sys.exit(main("cvae"))
