"""Pictures of a run: a grid of CVAE samples, one row per label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from fedaug_flwr.results import write_atomic


def save_sample_grid(images: np.ndarray, per_label: int, path: Path) -> Path:
    """Save (10 * per_label, 28, 28) images, label-major, as a PNG with a row per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tensor = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1)
    grid = make_grid(tensor, nrow=per_label, padding=2, pad_value=0.5)[0].numpy()
    rows = len(images) // per_label
    figure, axis = plt.subplots(figsize=(per_label * 0.45 + 0.8, rows * 0.45 + 0.6))
    axis.imshow(grid, cmap="gray", vmin=0, vmax=1)
    axis.set_yticks([2 + 30 * r + 14 for r in range(rows)], [str(r) for r in range(rows)])
    axis.set_xticks([])
    axis.set_ylabel("label")
    axis.set_title("CVAE samples (binarized)")
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return path
