"""The study's two networks: the conditional VAE and ExquisiteNetV1 (1 channel, 10 classes)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedaug_flwr.data import NUM_CLASSES

IMAGE_PIXELS = 28 * 28


class CVAE(nn.Module):
    """Conditional VAE after Sohn et al. (2015), as the study built it.

    The encoder sees only the image; the decoder sees ``[z, one_hot(label)]``.
    With ``latent_dim=3`` it has 1,072,150 parameters.
    """

    def __init__(self, latent_dim: int = 3, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.encoder = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_PIXELS, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim + num_classes, 256),
            nn.ReLU(),
            nn.Linear(256, 512),
            nn.ReLU(),
            nn.Linear(512, IMAGE_PIXELS),
            nn.Sigmoid(),
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (softplus + 1e-6) scale of q(z | x)."""
        mean, raw_scale = self.encoder(images).chunk(2, dim=1)
        return mean, F.softplus(raw_scale) + 1e-6

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities (N, 1, 28, 28) for latent codes and labels."""
        one_hot = F.one_hot(labels, self.num_classes).to(z.dtype)
        return self.decoder(torch.cat([z, one_hot], dim=1)).view(-1, 1, 28, 28)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, scale = self.encode(images)
        z = mean + scale * torch.randn_like(scale)
        return self.decode(z, labels), mean, scale


def cvae_loss(
    model: CVAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    kl_weight: float = 1.0,
    recon: str = "bce",
) -> torch.Tensor:
    """Per-image mean of reconstruction + ``kl_weight`` * KL(q(z|x) || N(0, I)).

    ``recon="bce"`` is binary cross-entropy (natural for 0/1 pixels); ``"sse"``
    is the summed squared error the study used.

    Grey-level images (pixels in [0, 1], e.g. Fashion-MNIST) keep BCE: with a target
    t in [0, 1] the pixel's loss -t log p - (1 - t) log(1 - p) is smallest at p = t,
    so the decoder's sigmoid output learns each pixel's mean intensity, which is what
    grey-level sampling keeps (``generate(..., binarize="off")``). It is the usual
    choice for grey MNIST-like images (Kingma and Welling's VAE), needs no noise scale
    as a Gaussian likelihood (SSE) does, and is the same code for 0/1 and grey pixels;
    only its floor is no longer 0 (the targets' own entropy), which shifts the loss,
    not its gradient. ``"sse"`` stays available for either kind.
    """
    reconstruction, mean, scale = model(images, labels)
    if recon == "bce":
        rec = F.binary_cross_entropy(reconstruction, images, reduction="sum")
    else:
        rec = ((reconstruction - images) ** 2).sum()
    variance = scale**2
    kl = 0.5 * (variance + mean**2 - 1.0 - torch.log(variance)).sum()
    return (rec + kl_weight * kl) / images.shape[0]


class SqueezeExcite(nn.Module):
    """Channel attention: global pool, c -> c/3 -> c (no biases), sigmoid scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, channels // 3, bias=False),
            nn.ReLU(),
            nn.Linear(channels // 3, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None]


def _dfse_unit(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
        nn.Hardswish(),
        SqueezeExcite(channels),
    )


class DFSEBlock(nn.Module):
    """Two depthwise-SE units; both add the block's input (not their own)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = _dfse_unit(channels)
        self.second = _dfse_unit(channels)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = self.first(y) + y
        return self.second(x) + y


def _me_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Max-pool 2x2 (ceil mode), 1x1 conv without bias, batch-norm."""
    return nn.Sequential(
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ExquisiteNetV1(nn.Module):
    """Jou and Su's lightweight CNN as the study used it (927,254 parameters)."""

    STAGES = (12, 50, 100, 200, 350)

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for channels in self.STAGES:
            layers += [_me_block(previous, channels), DFSEBlock(channels)]
            previous = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Conv2d(previous, 640, 1),
            nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(640, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The 640-d pooled features the classifier's linear layer sees (before dropout):
        the feature space of the generator-quality distances. (``features`` is taken: it
        names the convolutional stages, and renaming it would change the weights' keys.)"""
        return self.head[:-2](self.features(images))  # all of the head but dropout, linear


def classifier_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_cvae(weights: Mapping[str, torch.Tensor], latent_dim: int) -> CVAE:
    model = CVAE(latent_dim)
    model.load_state_dict(weights)
    return model


def load_classifier(weights: Mapping[str, torch.Tensor]) -> ExquisiteNetV1:
    model = ExquisiteNetV1()
    model.load_state_dict(weights)
    return model


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's tensors, to show which weights a phase started from."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
