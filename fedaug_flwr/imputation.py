"""Which synthetic labels a client asks for (uniform / minority) and batched generation.

The label plan is pure numpy and seeded; generation decodes every requested
image in a few large batches with the frozen CVAE and binarizes them like the
real digits, or keeps them as grey levels like real grey-level images
(``binarize="off"``).
"""

from __future__ import annotations

import numpy as np
import torch

from fedaug_flwr.data import GREY_LEVELS, NUM_CLASSES
from fedaug_flwr.models import CVAE

SYNTHETIC_MODES = ("round", "rescale", "off")


def minority_counts(
    label_counts: list[int] | np.ndarray, k: int, rounding: str = "nearest"
) -> np.ndarray | None:
    """The study's deficit rule: label l gets k * (max c - c_l) / (sum of deficits), rounded.

    ``rounding="nearest"`` rounds half to even, as the paper's Algorithm 1 writes
    Round(.); ``"up"`` is its authors' code, Python's round(x + 0.5), which is nearly
    the ceiling (every label in deficit gets at least one image; the total exceeds k
    by up to the number of labels). Returns ``None`` when the labels are already
    balanced (no deficit to share).
    """
    counts = np.asarray(label_counts, dtype=np.int64)
    deficit = counts.max() - counts
    total = int(deficit.sum())
    if total == 0:
        return None
    share = k * deficit / total
    if rounding == "up":
        share = share + 0.5  # np.rint, like Python's round, takes a half to the even side
    elif rounding != "nearest":
        raise ValueError(f"unknown minority rounding {rounding!r}")
    return np.rint(share).astype(np.int64)


def synthetic_labels(
    mode: str,
    k: int,
    label_counts: list[int] | np.ndarray,
    rng: np.random.Generator,
    rounding: str = "nearest",
) -> np.ndarray:
    """The labels of the k synthetic images a client generates (shuffled)."""
    if mode == "none" or k == 0:
        return np.zeros(0, dtype=np.int64)
    if mode == "minority":
        counts = minority_counts(label_counts, k, rounding)
        if counts is not None:
            return rng.permutation(np.repeat(np.arange(NUM_CLASSES), counts))
        # balanced client: nothing is a minority, so draw uniformly instead
    elif mode != "uniform":
        raise ValueError(f"unknown imputation mode {mode!r}")
    return rng.integers(0, NUM_CLASSES, size=k, dtype=np.int64)


@torch.no_grad()
def generate(
    cvae: CVAE,
    labels: np.ndarray,
    seed: int,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    binarize: str = "round",
) -> np.ndarray:
    """Images (N, 28, 28) of ``uint8``, z ~ N(0, I), decoded per label.

    ``binarize="round"`` rounds each pixel probability at 0.5; ``"rescale"`` first
    divides an image by its brightest pixel, as the study does (so a faint image still
    has pixels at 1): both give 0/1 bytes. ``"off"`` keeps the decoder's pixel means p
    in [0, 1] as grey levels, round(p * 255) (wrap them as ``Digits(..., grey=True)``).
    All latent codes are drawn up front, so the images do not depend on ``batch_size``
    (torch draws normals differently for short and long runs).
    """
    if binarize not in SYNTHETIC_MODES:
        raise ValueError(f"unknown binarization {binarize!r}; known: {list(SYNTHETIC_MODES)}")
    cvae = cvae.to(device).eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    label_tensor = torch.as_tensor(labels, dtype=torch.long)
    codes = torch.randn(len(labels), cvae.latent_dim, generator=generator)
    images = np.empty((len(labels), 28, 28), dtype=np.uint8)
    for start in range(0, len(labels), batch_size):
        batch = label_tensor[start : start + batch_size]
        z = codes[start : start + batch_size]
        probabilities = cvae.decode(z.to(device), batch.to(device))
        if binarize == "rescale":
            brightest = probabilities.amax(dim=(1, 2, 3), keepdim=True)
            probabilities = probabilities / brightest.clamp_min(torch.finfo(torch.float32).tiny)
        elif binarize == "off":
            probabilities = probabilities.clamp(0.0, 1.0) * GREY_LEVELS
        images[start : start + len(batch)] = (
            torch.round(probabilities).squeeze(1).to(torch.uint8).cpu().numpy()
        )
    return images


@torch.no_grad()
def generate_one_at_a_time(
    cvae: CVAE,
    labels: np.ndarray,
    seed: int,
    device: str | torch.device = "cpu",
    binarize: str = "round",
) -> np.ndarray:
    """The same images, one decoder call each: the benchmark's (slow) reference."""
    return generate(cvae, labels, seed, batch_size=1, device=device, binarize=binarize)
