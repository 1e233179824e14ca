"""fedaug-flwr: generative data augmentation (federated CVAE imputation) for non-IID FL."""

__version__ = "0.1.0"
