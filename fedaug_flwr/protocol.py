"""What travels between ServerApp and ClientApp: message types and record keys.

The server sends the whole validated run config (plus the data source it
resolved) in every message, so a client never depends on ``context.run_config``
being filled in (``run_simulation`` leaves it empty) and every SuperNode sees
exactly what the server decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord

from fedaug_flwr.config import DATASETS, AppConfig, ConfigError

# Message types: "<category>.<action>" routes to the ClientApp handler of that name.
TRAIN_CVAE = "train.cvae"
IMPUTE = "query.impute"
TRAIN_CLASSIFIER = "train.clf"
EVALUATE_CLASSIFIER = "evaluate.clf"
FINETUNE_LOCALLY = "train.local"  # fine-tune a copy, evaluate it, send back only metrics

ARRAYS = "arrays"  # the model being trained / evaluated
GENERATOR = "generator"  # the frozen CVAE, for imputation
CONFIG = "config"
METRICS = "metrics"
# Evaluation on receipt (``evaluate-on-receipt``): a train message's config flag asking the
# client to evaluate the model it brings before training, and the reply's record of that.
EVALUATE_RECEIVED = "evaluate-received"
RECEIVED_EVALUATION = "received-evaluation"
SYNTHETIC_STATE = "synthetic"  # key in context.state: this node's synthetic images
GENERATOR_STATE = "generator"  # key in context.state: the global CVAE (synthetic-refresh)
SERVER_ROUND = "server-round"  # set by Flower's strategies in every message's config

DATA_SOURCE = "data-source"  # what the server resolved "dataset" to: one of DATASETS
DATA_LOCATION = "data-location"
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"


@dataclass(frozen=True)
class TaskConfig:
    """What a client needs to know for any task: the run config and the data source."""

    app: AppConfig
    data_source: str
    data_location: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                **self.app.to_run_config(),
                DATA_SOURCE: self.data_source,
                DATA_LOCATION: self.data_location,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TaskConfig:
        """Rebuild and re-validate what the server sent; :class:`ConfigError` if it is bad."""
        values = dict(record)
        missing = [key for key in (DATA_SOURCE, DATA_LOCATION) if key not in values]
        if missing:
            raise ConfigError(f"message config lacks {missing}; the server always sends them")
        source, location = values.pop(DATA_SOURCE), values.pop(DATA_LOCATION)
        if source not in DATASETS or not isinstance(location, str):
            raise ConfigError(
                f"message config '{DATA_SOURCE}' must be one of {list(DATASETS)} and "
                f"'{DATA_LOCATION}' a string; got {source!r}, {location!r}"
            )
        values.pop(SERVER_ROUND, None)  # added by Flower strategies
        values.pop(EVALUATE_RECEIVED, None)  # added by RoutedFedAvg, read by the handler
        return cls(AppConfig.from_run_config(values), source, location)


def server_round(record: ConfigRecord) -> int:
    """The round a message belongs to (0 for messages outside a strategy's rounds)."""
    return int(record.get(SERVER_ROUND, 0))
