"""Benchmark 1: the classifier round, Flower simulation against the plain sequential loop.

    python -m bench.classifier_round                       # 10/100 clients, mnist-5k and mnist
    python -m bench.classifier_round --scales 10:mnist-5k --rounds 2 --repeats 3

See ``bench.federated`` for what is run and measured.
"""

from __future__ import annotations

import sys

from bench.federated import main

if __name__ == "__main__":
    sys.exit(main("classifier"))
