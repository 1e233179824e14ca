"""Pictures of a run: a grid of CVAE samples, one row per label, the quality histograms and
the privacy audit's distance distributions.

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


def save_privacy_distances(section: dict, path: Path) -> Path:
    """The memorization audit pooled over clients (the ``privacy`` section): the distance
    ratios of synthetic images beside those of held-out real images (the baseline a fresh
    digit gives), and the distances to the nearest training image of both."""
    audit = section["audit"]
    figure = Figure(figsize=(11, 3.8))
    left, right = figure.subplots(1, 2)
    pairs = [
        (left, "ratio-bin-edges", "histogram-ratio", "histogram-ratio-reference"),
        (right, "histogram-bin-edges", "histogram-train", "histogram-reference"),
    ]
    for axis, edges_key, synthetic_key, reference_key in pairs:
        edges = np.asarray(audit[edges_key], dtype=float)
        for key, label in (
            (synthetic_key, f"synthetic images (n={audit['synthetic-images']})"),
            (reference_key, f"held-out real images (n={audit['reference-images']})"),
        ):
            counts = np.asarray(audit[key], dtype=float)
            axis.stairs(counts / max(counts.sum(), 1), edges, label=label, linewidth=2)
        axis.set_ylabel("share of images")
    left.set_xlabel("(d_train + 1) / (d_held-out + 1)   (ratios above 3 in the last bin)")
    left.set_title(
        f"flagged: {_share_text(audit['flagged-share'])} of synthetic images, "
        f"{_share_text(audit['flagged-share-reference'])} of held-out ones",
        fontsize=9,
    )
    left.legend(loc="upper right", fontsize=8)
    right.set_xlabel("Hamming distance to the nearest training image of the label")
    used = np.flatnonzero(np.add(audit["histogram-train"], audit["histogram-reference"]))
    if len(used):  # distances cluster far below 784 pixels: show where the images are
        distance_edges = audit["histogram-bin-edges"]
        right.set_xlim(0, distance_edges[min(used[-1] + 2, len(distance_edges) - 1)])
    aucs = section["membership-inference"]
    right.set_title(
        "membership AUC (mean over clients): "
        + ", ".join(f"{name} {_share_text(aucs[name]['mean'], 2)}" for name in aucs),
        fontsize=9,
    )
    figure.suptitle(f"Memorization audit over {audit['clients']} clients", fontsize=10)
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def _share_text(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
