"""Pictures of a run: a grid of CVAE samples, one row per label, and the quality histograms.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``),
which needs no pyplot state and no global backend switch, so saving them from
inside a notebook leaves its inline plotting alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from fedaug_flwr.results import write_atomic


def save_sample_grid(images: np.ndarray, per_label: int, path: Path) -> Path:
    """Save (10 * per_label, 28, 28) images, label-major, as a PNG with a row per label:
    0/1 images, or uint8 grey levels 0..255 (any pixel above 1)."""
    grey = images.size > 0 and int(images.max()) > 1
    tensor = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / (255.0 if grey else 1.0)
    grid = make_grid(tensor, nrow=per_label, padding=2, pad_value=0.5)[0].numpy()
    rows = len(images) // per_label
    figure = Figure(figsize=(per_label * 0.45 + 0.8, rows * 0.45 + 0.6))
    axis = figure.subplots()
    axis.imshow(grid, cmap="gray", vmin=0, vmax=1)
    axis.set_yticks([2 + 30 * r + 14 for r in range(rows)], [str(r) for r in range(rows)])
    axis.set_xticks([])
    axis.set_ylabel("label")
    axis.set_title("CVAE samples (grey levels)" if grey else "CVAE samples (binarized)")
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def save_probability_histograms(quality: dict, path: Path) -> Path:
    """The quality classifier's confidence on real vs synthetic test images (study Fig. 14)."""
    edges = np.asarray(quality["histogram-bin-edges"])
    figure = Figure(figsize=(10, 3.6))
    axes = figure.subplots(1, 2, sharey=True)
    for axis, (key, title) in zip(
        axes,
        [("real-test", "real MNIST test images"), ("synthetic-test", "synthetic test images")],
        strict=True,
    ):
        scores = quality[key]
        for histogram, label in (
            ("histogram-max-probability", "highest class probability"),
            ("histogram-true-class-probability", "probability of the true class"),
        ):
            counts = np.asarray(scores[histogram], dtype=float)
            axis.stairs(counts / max(counts.sum(), 1), edges, label=label, fill=False, linewidth=2)
        axis.set_title(
            f"{title}\naccuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro-f1']:.3f}"
        )
        axis.set_xlabel("predicted probability")
    axes[0].set_ylabel("share of images")
    axes[0].legend(loc="upper left")
    figure.suptitle(
        f"Classifier trained on synthetic images only: {quality['classifier']}", fontsize=9
    )
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path
