"""fedaug-flwr: generative data augmentation (federated CVAE imputation) for non-IID FL."""

import logging

__version__ = "0.1.0"

# The package's one logger. A child of Flower's "flwr" logger, so what it logs (phase
# times, per-round client failures) is printed by Flower's own handler, in Flower's format.
log = logging.getLogger("flwr.fedaug")
