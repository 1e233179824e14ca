"""What the synthetic images and the global CVAE reveal about a client's training images.

Two measurements, both run where the images are (on a client) and both returning
statistics only: counts, shares, distances, AUCs; never an image, never an index
into a client's data.

**Memorization audit** (:func:`memorization_audit`). For each synthetic image of
label ``l``: ``d_train``, the distance to the nearest of the client's training
images of label ``l``, and ``d_heldout``, the distance to the nearest of its held-out
images (val + test, never trained on) of label ``l``; their ratio
``(d_train + 1) / (d_heldout + 1)`` (a pixel added to both: an exact copy gives a
finite ratio and 0/0 cannot occur). The baseline is what a digit the CVAE never saw
gives: the same ratio for every held-out image ``h``, with ``d_heldout`` taken over
the *other* held-out images of its label (leave one out). A synthetic image is
*flagged* when its ratio lies below the 5th percentile of these reference ratios:
closer to a training image than a fresh real digit of the same label comes. A
generator that draws fresh digits from the data distribution has about 5 % flagged
(the reference's own share below its threshold is reported beside it); one that
copies training images has nearly all. The reference uses the same training set
and (one image fewer) the same held-out set as the synthetic images, so that the
sets' unequal sizes (a client's split is 80/10/10) bias both ratios alike; the
leave-one-out makes the reference's ``d_heldout`` slightly larger, its ratios
slightly smaller, and the threshold a little stricter than chance would need:
flags lean to the conservative (fewer). This is the held-out-baseline idea of
Meehan et al.'s data-copying test (AISTATS 2020), per image rather than per cell.

The threshold rests on a client's few held-out images, so one client's flagged
share is noisy around the chance rate even for a generator that copies nothing
(fresh real digits as "synthetic" images, 100 held-out images: a few percent to
well above 10 %, split to split); no per-client p-value is given for that reason.
Read the shares pooled over clients, and the per-client excess over the chance rate
with its standard error across clients (:func:`aggregate_audits`); a copying
generator shows as a flagged share near 1 and exact copies (``d_train = 0``).

Why Hamming distance: the app's real and synthetic digits are both binarized
28x28 images, where Hamming distance (pixels that differ) equals squared Euclidean
and L1 distance, so it is the pixel-space nearest-neighbour distance used in
memorization studies, and what matters here is pixel-level copying of a user's
image. A feature-space distance (e.g. the quality check's classifier features)
would call any two similar-looking 7s close: it measures typicality, not copying.
Only images of the same label are compared: the CVAE is conditioned on the label,
and a copy keeps it.

**Membership inference on the CVAE** (:func:`membership_inference`). Can the global
CVAE tell the client's training images (members) from its held-out ones? Scores,
higher meaning "member":

- ``loss``: minus the per-image negative ELBO (the training loss, averaged over
  several latent draws), the threshold attack of Yeom et al. (CSF 2018) that every
  client holding the global CVAE could run;
- ``generated-nearest``: minus the distance to the nearest of many images the CVAE
  generates for the image's label, the Monte Carlo attack of Hilprecht et al.
  (PoPETs 2019): what anyone who only receives synthetic images can do;
- ``calibrated-loss`` (when a reference CVAE that saw neither set is given): the
  reference's loss minus the target's, difficulty calibration after Watson et al.
  (ICLR 2022), which removes how hard an image is for any CVAE (a 1 is easier than
  an 8).

Each attack's AUC over all thresholds (sklearn's ``roc_auc_score``); 0.5 means the
model tells nothing, 1.0 that it separates members perfectly. Non-members are
weighted so that their label mix equals the members' (a label-dependent score
cannot then gain from a label imbalance between the splits). With a client's few
held-out images a per-client AUC is noisy (its standard error is about
``sqrt((m + n + 1) / (12 m n))`` at 0.5); :func:`aggregate_auc` pools clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from fedaug_flwr.imputation import generate
from fedaug_flwr.models import CVAE, IMAGE_PIXELS, NUM_CLASSES

BIN_EDGES = np.arange(0, IMAGE_PIXELS + 1, 8)  # Hamming distance histograms: 98 bins
# Distance-ratio histograms: 60 bins of 0.05 over [0, 3]; larger ratios (far from any
# training image, nothing to flag) are counted in the last bin.
RATIO_BIN_EDGES = np.round(np.linspace(0.0, 3.0, 61), 2)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
REFERENCE_QUANTILE = 0.05  # flag synthetic images below this quantile of the reference ratios
CLOSEST = 5  # how many of the smallest distances are reported
GENERATED_PER_LABEL = 500  # images the generated-nearest attack draws per label
ELBO_SAMPLES = 8  # latent draws per image in the loss attack
DISTANCE_NOTE = (
    "Hamming distance: pixels that differ between two binarized 28x28 images, to the "
    "nearest image of the same label; ratio = (d_train + 1) / (d_heldout + 1)"
)


# ----------------------------------------------------------------------- distances


def binary_rows(images: np.ndarray | torch.Tensor, name: str = "images") -> np.ndarray:
    """Images of any shape (N, ...) with 784 pixels each, as (N, 784) 0/1 bytes;
    ``ValueError`` if a pixel is neither 0 nor 1 (binarize first)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    rows = np.asarray(images).reshape(len(images), -1)
    if rows.shape[1] != IMAGE_PIXELS:
        raise ValueError(f"{name}: expected {IMAGE_PIXELS} pixels per image, got {rows.shape[1]}")
    if rows.size and not np.isin(rows, (0, 1)).all():
        raise ValueError(f"{name}: pixels must be 0 or 1 (binarize the images first)")
    return rows.astype(np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Hamming distances between rows of 0/1 matrices: ``|a| + |b| -
    2 a.b``, one float32 matrix product (exact: every count is below 2**24)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    both = a32 @ b32.T
    distance = a32.sum(axis=1)[:, None] + b32.sum(axis=1)[None, :] - 2.0 * both
    return np.rint(distance).astype(np.int32)


def nearest(queries: np.ndarray, references: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Each query row's Hamming distance to its nearest reference row."""
    if len(references) == 0:
        raise ValueError("no reference images to measure a distance to")
    parts = [
        hamming(queries[start : start + chunk], references).min(axis=1)
        for start in range(0, len(queries), chunk)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _nearest_other(rows: np.ndarray) -> np.ndarray:
    """Each row's distance to the nearest *other* row (leave one out)."""
    distances = hamming(rows, rows).astype(np.float64)
    np.fill_diagonal(distances, np.inf)
    return distances.min(axis=1).astype(np.int32)


# -------------------------------------------------------------------------- audit


def audit_label_counts(
    train_labels: np.ndarray, heldout_labels: np.ndarray, total: int
) -> list[int]:
    """How many synthetic images of each label to audit: ``total`` split in proportion
    to the client's training labels, over the labels the audit can measure (at least
    two held-out images, for the leave-one-out reference)."""
    train_counts = np.bincount(train_labels, minlength=NUM_CLASSES)
    heldout_counts = np.bincount(heldout_labels, minlength=NUM_CLASSES)
    weights = np.where(heldout_counts >= 2, train_counts, 0)
    if weights.sum() == 0:
        return [0] * NUM_CLASSES
    shares = weights / weights.sum() * total
    counts = np.floor(shares).astype(int)
    for label in np.argsort(-(shares - counts), kind="stable")[: total - counts.sum()]:
        counts[label] += 1
    return [int(c) for c in counts]


def memorization_audit(
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    train: np.ndarray,
    train_labels: np.ndarray,
    heldout: np.ndarray,
    heldout_labels: np.ndarray,
    *,
    reference_quantile: float = REFERENCE_QUANTILE,
    closest: int = CLOSEST,
) -> dict:
    """Distances of synthetic images to a client's training and held-out images (module
    docstring), as a summary of statistics only.

    ``synthetic``, ``train``, ``heldout``: binary images (N, 28, 28) or (N, 784);
    the labels are int arrays. Synthetic images of a label without a training image or
    without a held-out image cannot be measured and are counted as ``unmatched``.
    """
    synthetic, train, heldout = (
        binary_rows(synthetic, "synthetic"),
        binary_rows(train, "train"),
        binary_rows(heldout, "heldout"),
    )
    synthetic_labels, train_labels, heldout_labels = (
        np.asarray(x, dtype=np.int64) for x in (synthetic_labels, train_labels, heldout_labels)
    )
    d_train, d_heldout, r_train, r_heldout = [], [], [], []
    unmatched = 0
    for label in range(NUM_CLASSES):
        own_train = train[train_labels == label]
        own_heldout = heldout[heldout_labels == label]
        own_synthetic = synthetic[synthetic_labels == label]
        if len(own_train) == 0 or len(own_heldout) == 0:
            unmatched += len(own_synthetic)
            continue
        if len(own_synthetic):
            d_train.append(nearest(own_synthetic, own_train))
            d_heldout.append(nearest(own_synthetic, own_heldout))
        if len(own_heldout) >= 2:
            r_train.append(nearest(own_heldout, own_train))
            r_heldout.append(_nearest_other(own_heldout))
    d_train, d_heldout, r_train, r_heldout = (
        np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        for parts in (d_train, d_heldout, r_train, r_heldout)
    )
    ratio = (d_train + 1.0) / (d_heldout + 1.0)
    reference_ratio = (r_train + 1.0) / (r_heldout + 1.0)
    threshold = (
        float(np.quantile(reference_ratio, reference_quantile)) if len(reference_ratio) else None
    )
    flagged = int((ratio < threshold).sum()) if threshold is not None else 0
    flagged_reference = int((reference_ratio < threshold).sum()) if threshold is not None else 0
    return {
        "distance": DISTANCE_NOTE,
        "synthetic-images": len(ratio),
        "synthetic-unmatched": unmatched,
        "train-images": len(train),
        "heldout-images": len(heldout),
        "reference-images": len(reference_ratio),
        "reference-quantile": reference_quantile,
        "ratio-threshold": threshold,
        "flagged-images": flagged,
        "flagged-share": _share(flagged, len(ratio)),
        "flagged-reference-images": flagged_reference,
        "flagged-share-reference": _share(flagged_reference, len(reference_ratio)),
        "flagged-excess": (
            flagged / len(ratio) - reference_quantile
            if threshold is not None and len(ratio)
            else None
        ),
        "closer-to-train-images": int((d_train < d_heldout).sum()),
        "closer-to-train-share": _share(int((d_train < d_heldout).sum()), len(ratio)),
        "closer-to-train-reference-images": int((r_train < r_heldout).sum()),
        "closer-to-train-share-reference": _share(
            int((r_train < r_heldout).sum()), len(reference_ratio)
        ),
        "exact-copies": int((d_train == 0).sum()),
        "exact-copies-reference": int((r_train == 0).sum()),
        "ratio-quantiles": _quantiles(ratio),
        "ratio-quantiles-reference": _quantiles(reference_ratio),
        "closest-train-distances": _smallest(d_train, closest),
        "closest-heldout-distances": _smallest(d_heldout, closest),
        "closest-train-distances-reference": _smallest(r_train, closest),
        "histogram-bin-edges": [int(e) for e in BIN_EDGES],
        "histogram-train": _histogram(d_train),
        "histogram-heldout": _histogram(d_heldout),
        "histogram-reference": _histogram(r_train),
        "ratio-bin-edges": [float(e) for e in RATIO_BIN_EDGES],
        "histogram-ratio": _ratio_histogram(ratio),
        "histogram-ratio-reference": _ratio_histogram(reference_ratio),
    }


def aggregate_audits(audits: Sequence[Mapping], closest: int = CLOSEST) -> dict:
    """Clients' audits pooled: summed counts and histograms, the smallest distances over
    all clients, and the spread of the per-client flagged shares."""
    audits = [a for a in audits if a.get("synthetic-images", 0) > 0]
    if not audits:
        return {"clients": 0}

    def total(key: str) -> int:
        return int(sum(a[key] for a in audits))

    synthetic, reference = total("synthetic-images"), total("reference-images")
    quantile = audits[0]["reference-quantile"]
    shares = np.array([a["flagged-share"] for a in audits if a["flagged-share"] is not None])
    return {
        "clients": len(audits),
        "synthetic-images": synthetic,
        "reference-images": reference,
        "reference-quantile": quantile,
        "flagged-images": total("flagged-images"),
        "flagged-share": _share(total("flagged-images"), synthetic),
        "flagged-share-reference": _share(total("flagged-reference-images"), reference),
        "flagged-share-per-client": _spread(shares),
        # per-client flagged share minus the chance rate: mean and its standard error over
        # clients (clients' data are independent; one client's threshold is noisy)
        "flagged-excess-mean": float((shares - quantile).mean()) if len(shares) else None,
        "flagged-excess-standard-error": (
            float(shares.std(ddof=1) / np.sqrt(len(shares))) if len(shares) > 1 else None
        ),
        "closer-to-train-share": _share(total("closer-to-train-images"), synthetic),
        "closer-to-train-share-reference": _share(
            total("closer-to-train-reference-images"), reference
        ),
        "exact-copies": total("exact-copies"),
        "exact-copies-reference": total("exact-copies-reference"),
        **{
            key: sorted(d for a in audits for d in a[key])[:closest]
            for key in ("closest-train-distances", "closest-train-distances-reference")
        },
        "histogram-bin-edges": audits[0]["histogram-bin-edges"],
        **{
            key: [int(sum(c)) for c in zip(*(a[key] for a in audits), strict=True)]
            for key in ("histogram-train", "histogram-heldout", "histogram-reference")
        },
        **(
            {
                "ratio-bin-edges": audits[0]["ratio-bin-edges"],
                **{
                    key: [int(sum(c)) for c in zip(*(a[key] for a in audits), strict=True)]
                    for key in ("histogram-ratio", "histogram-ratio-reference")
                },
            }
            if all("histogram-ratio" in a for a in audits)
            else {}
        ),
    }


# ---------------------------------------------------------- membership inference


@torch.no_grad()
def negative_elbo(
    model: CVAE,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    recon: str = "bce",
    kl_weight: float = 1.0,
    samples: int = ELBO_SAMPLES,
    seed: int = 0,
    batch_size: int = 512,
) -> np.ndarray:
    """Per-image ``reconstruction + kl_weight * KL`` (the summand of
    :func:`~fedaug_flwr.models.cvae_loss`), the reconstruction averaged over
    ``samples`` draws of z ~ q(z | x) (seeded), the KL exact."""
    model.eval()
    device = next(model.parameters()).device
    x_all = torch.as_tensor(np.asarray(images), dtype=torch.float32).reshape(-1, 1, 28, 28)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for start in range(0, len(y_all), batch_size):
        x = x_all[start : start + batch_size].to(device)
        y = y_all[start : start + batch_size].to(device)
        mean, scale = model.encode(x)
        variance = scale**2
        kl = 0.5 * (variance + mean**2 - 1.0 - torch.log(variance)).sum(dim=1)
        rec = torch.zeros(len(y), device=device)
        for _ in range(samples):
            noise = torch.randn(mean.shape, generator=generator).to(device)
            reconstruction = model.decode(mean + scale * noise, y)
            if recon == "bce":
                error = F.binary_cross_entropy(reconstruction, x, reduction="none")
            elif recon == "sse":
                error = (reconstruction - x) ** 2
            else:
                raise ValueError(f"unknown reconstruction loss {recon!r}")
            rec += error.sum(dim=(1, 2, 3))
        losses.append((rec / samples + kl_weight * kl).cpu())
    return torch.cat(losses).double().numpy() if losses else np.zeros(0)


def generated_nearest_distances(
    model: CVAE,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    per_label: int = GENERATED_PER_LABEL,
    seed: int = 0,
    binarize: str = "rescale",
) -> np.ndarray:
    """Each image's Hamming distance to the nearest of ``per_label`` images the CVAE
    generates for its label (binarized as the run's synthetic images are)."""
    rows = binary_rows(images)
    labels = np.asarray(labels, dtype=np.int64)
    distances = np.zeros(len(rows), dtype=np.int32)
    for label in np.unique(labels):
        generated = generate(
            model,
            np.full(per_label, label, dtype=np.int64),
            seed=seed * NUM_CLASSES + int(label),
            device=next(model.parameters()).device,
            binarize=binarize,
        )
        where = labels == label
        distances[where] = nearest(rows[where], binary_rows(generated))
    return distances


def membership_auc(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    member_labels: np.ndarray | None = None,
    nonmember_labels: np.ndarray | None = None,
) -> float | None:
    """AUC of telling members (higher scores) from non-members; ``None`` when either
    set is empty. With labels, non-members are weighted to the members' label mix and
    labels missing from either set are left out."""
    member_scores, nonmember_scores = np.asarray(member_scores), np.asarray(nonmember_scores)
    member_weights = np.ones(len(member_scores))
    nonmember_weights = np.ones(len(nonmember_scores))
    if member_labels is not None and nonmember_labels is not None:
        member_weights, nonmember_weights = _label_weights(
            np.asarray(member_labels), np.asarray(nonmember_labels)
        )
    if member_weights.sum() == 0 or nonmember_weights.sum() == 0:
        return None
    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    return float(
        roc_auc_score(
            truth,
            np.r_[member_scores, nonmember_scores],
            sample_weight=np.r_[member_weights, nonmember_weights],
        )
    )


def membership_inference(
    model: CVAE,
    members: tuple[np.ndarray, np.ndarray],
    nonmembers: tuple[np.ndarray, np.ndarray],
    *,
    recon: str = "bce",
    kl_weight: float = 1.0,
    samples: int = ELBO_SAMPLES,
    generated_per_label: int = GENERATED_PER_LABEL,
    binarize: str = "rescale",
    reference: CVAE | None = None,
    seed: int = 0,
    keep_scores: bool = False,
) -> dict:
    """The attacks of the module docstring against ``model`` on one client.

    ``members`` / ``nonmembers``: (binary images, labels) of the client's training and
    held-out images. ``generated_per_label`` 0 skips the generated-nearest attack.
    ``keep_scores`` adds each attack's per-image scores (for :func:`aggregate_auc`'s
    pooled AUC); leave it off for what leaves a client.
    """
    (m_images, m_labels), (n_images, n_labels) = members, nonmembers
    m_labels, n_labels = np.asarray(m_labels, np.int64), np.asarray(n_labels, np.int64)

    def loss(net: CVAE, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return negative_elbo(
            net,
            binary_rows(images),
            labels,
            recon=recon,
            kl_weight=kl_weight,
            samples=samples,
            seed=seed,
        )

    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    m_loss, n_loss = loss(model, m_images, m_labels), loss(model, n_images, n_labels)
    scores["loss"] = (-m_loss, -n_loss)
    if reference is not None:
        scores["calibrated-loss"] = (
            loss(reference, m_images, m_labels) - m_loss,
            loss(reference, n_images, n_labels) - n_loss,
        )
    if generated_per_label > 0:
        distances = [
            generated_nearest_distances(
                model,
                images,
                labels,
                per_label=generated_per_label,
                seed=seed,
                binarize=binarize,
            )
            for images, labels in ((m_images, m_labels), (n_images, n_labels))
        ]
        scores["generated-nearest"] = (-distances[0].astype(float), -distances[1].astype(float))
    attacks = {}
    for name, (member_scores, nonmember_scores) in scores.items():
        attacks[name] = {"auc": membership_auc(member_scores, nonmember_scores, m_labels, n_labels)}
        if keep_scores:
            attacks[name]["member-scores"] = [float(s) for s in member_scores]
            attacks[name]["nonmember-scores"] = [float(s) for s in nonmember_scores]
    return {"members": len(m_labels), "non-members": len(n_labels), "attacks": attacks}


def aggregate_auc(
    aucs: Sequence[float | None],
    member_scores: Sequence[Sequence[float]] | None = None,
    nonmember_scores: Sequence[Sequence[float]] | None = None,
) -> dict:
    """Per-client AUCs summarised (mean, spread) and, when every client's scores are
    given, the AUC of all clients' scores pooled. (Pooling mixes clients whose score
    scales differ; the mean of per-client AUCs does not.)"""
    measured = np.array([a for a in aucs if a is not None], dtype=float)
    summary: dict = {"clients": len(measured), **_spread(measured)}
    summary["pooled"] = None
    if member_scores is not None and nonmember_scores is not None:
        members = np.concatenate([np.asarray(s, dtype=float) for s in member_scores] or [[]])
        nonmembers = np.concatenate([np.asarray(s, dtype=float) for s in nonmember_scores] or [[]])
        if len(members) and len(nonmembers):
            summary["pooled"] = membership_auc(members, nonmembers)
    return summary


# ------------------------------------------------------------------------ helpers


def _label_weights(member_labels: np.ndarray, nonmember_labels: np.ndarray):
    """Weights making the non-members' label mix the members' (labels in one set only: 0)."""
    m_counts = np.bincount(member_labels, minlength=NUM_CLASSES).astype(float)
    n_counts = np.bincount(nonmember_labels, minlength=NUM_CLASSES).astype(float)
    both = (m_counts > 0) & (n_counts > 0)
    per_label = np.zeros(NUM_CLASSES)
    per_label[both] = m_counts[both] / n_counts[both]
    return both[member_labels].astype(float), per_label[nonmember_labels]


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    return {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}


def _smallest(values: np.ndarray, k: int) -> list[int]:
    return [int(v) for v in np.sort(values)[:k]]


def _histogram(values: np.ndarray) -> list[int]:
    counts, _ = np.histogram(values, bins=BIN_EDGES)
    return [int(c) for c in counts]


def _ratio_histogram(ratios: np.ndarray) -> list[int]:
    counts, _ = np.histogram(np.minimum(ratios, RATIO_BIN_EDGES[-1]), bins=RATIO_BIN_EDGES)
    return [int(c) for c in counts]


def _spread(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"mean": None, "std": None, "min": None, "median": None, "max": None}
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }
