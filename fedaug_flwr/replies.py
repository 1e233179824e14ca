"""What a client sends back, checked before it counts.

The server trusts no reply. Flower's own check (``InconsistentMessageReplies``)
looks only at record and key names, and raises for the whole round, so one
malformed reply would end the run; a wrong but broadcastable shape, a NaN or a
client claiming a billion examples would silently spoil the global model. Here
every reply is checked on its own first; one that fails is that client's
failure for that round (recorded with the reason, like an error reply), and
only the good ones reach Flower's check and the aggregation.

A good reply holds exactly the records its message kind answers with:

- a model (train replies): one ArrayRecord ``arrays`` with the same array
  names, shapes and dtypes as the model the server sent, every value finite;
- one MetricRecord ``metrics`` with exactly the keys of :data:`REPLY_METRICS`
  (so Flower's check, which wants the same keys in every reply, always passes),
  every value a finite number;
- ``num-examples``, the client's weight, a positive integer no larger than what
  the client said it owns at the imputation (:class:`NodeSizes`): for training
  all its images (real train + val + test + synthetic), for evaluation its test
  split. Before the imputation (the CVAE phase) the server knows no client's
  size: the count must then only be plausible, a positive integer of at most
  :data:`MAX_PLAUSIBLE_EXAMPLES`. The sizes are what the client claims, so this
  bounds a client's weight by its own earlier statement; it does not make a
  lying client honest (the robust ``clf-aggregation`` rules are for that);
- ``partition-id`` the one it reported at the imputation.

A roster reply (:func:`roster_check`) holds the node's ``partition-id`` only. The
imputation reply itself (:func:`imputation_problem`) must hold every size,
as non-negative integers whose label counts add up. A privacy reply
(:func:`privacy_problem`) must hold statistics only: counts, short lists of
distances, fixed-length histograms, AUCs in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedaug_flwr.data import NUM_CLASSES
from fedaug_flwr.metrics import METRIC_NAMES
from fedaug_flwr.privacy import BIN_EDGES, CLOSEST, QUANTILES, RATIO_BIN_EDGES
from fedaug_flwr.protocol import (
    ARRAYS,
    DP_METRICS,
    EVALUATE_CLASSIFIER,
    FINETUNE_LOCALLY,
    IMPUTE,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    ROSTER,
    TRAIN_CLASSIFIER,
    TRAIN_CVAE,
    PrivacyAnswer,
)
from fedaug_flwr.transport import from_array

# 10^8 28x28 digits are 78 GB: more than any client of this app holds in memory.
MAX_PLAUSIBLE_EXAMPLES = 10**8

_TEST_METRICS = (*METRIC_NAMES, NUM_EXAMPLES, PARTITION_ID)
IMPUTE_SIZES = ("real-train", "val", "test", "synthetic-train")
IMPUTE_METRICS = (
    PARTITION_ID,
    "own-data",
    "partition-draws",
    NUM_PARTITIONS,
    *IMPUTE_SIZES,
    "real-label-counts",
    "synthetic-label-counts",
)
# The exact metric keys of each reply kind (what client_app.py's handlers send).
REPLY_METRICS: dict[str, frozenset[str]] = {
    TRAIN_CVAE: frozenset({"train-loss", "val-loss", NUM_EXAMPLES, PARTITION_ID}),
    TRAIN_CLASSIFIER: frozenset({"train-loss", NUM_EXAMPLES, PARTITION_ID}),
    EVALUATE_CLASSIFIER: frozenset(_TEST_METRICS),
    FINETUNE_LOCALLY: frozenset({*_TEST_METRICS, "train-loss", "train-examples"}),
    IMPUTE: frozenset(IMPUTE_METRICS),
    ROSTER: frozenset({PARTITION_ID}),
}
# A train.cvae reply under sample-level DP-SGD (cvae-dp = "sample") adds the client's epsilon.
CVAE_DP_SAMPLE_METRICS = REPLY_METRICS[TRAIN_CVAE] | frozenset(DP_METRICS)
MODEL_REPLIES = frozenset({TRAIN_CVAE, TRAIN_CLASSIFIER})  # replies that carry a model
TRAIN, TEST = "train", "test"  # what a reply's num-examples counts


@dataclass(frozen=True)
class NodeSizes:
    """What a client reported owning at the imputation."""

    partition_id: int
    real_train: int
    val: int
    test: int
    synthetic_train: int

    @property
    def owned(self) -> int:
        return self.real_train + self.val + self.test + self.synthetic_train

    def most_examples(self, counts: str) -> tuple[int, str]:
        """The largest ``num-examples`` a reply may claim, and where that bound comes from."""
        if counts == TEST:
            return self.test, f"the {self.test} test images it reported at the imputation"
        return self.owned, (
            f"the {self.owned} images it reported owning at the imputation "
            "(real-train + val + test + synthetic-train)"
        )


def sizes_by_node(clients: Mapping[int, Mapping[str, object]]) -> dict[int, NodeSizes]:
    """Each node's :class:`NodeSizes`, by Flower node id, from the imputation's clients."""
    return {
        int(client["node-id"]): NodeSizes(
            int(client[PARTITION_ID]), *(int(client[key]) for key in IMPUTE_SIZES)
        )
        for client in clients.values()
    }


class ReplyRules:
    """How the replies to one message kind are checked, for every node."""

    def __init__(
        self,
        message_type: str,
        sizes: Mapping[int, NodeSizes] | None = None,
        counts: str = TRAIN,
        metric_keys: frozenset[str] | None = None,
    ) -> None:
        """``metric_keys``: the exact keys of a reply, when not the kind's usual ones."""
        self.message_type = message_type
        # a kind with no entry (e.g. evaluate.cvae) is never sent: no reply to it can count
        self.metric_keys = metric_keys or REPLY_METRICS.get(message_type)
        self.sizes = sizes
        self.counts = counts

    def metrics_problem(self, record: MetricRecord, node_id: int) -> str | None:
        """Why the metrics of ``node_id``'s reply cannot count, or ``None``."""
        if self.metric_keys is None:
            return f"the server sends no {self.message_type} messages"
        problem = metrics_problem(record, self.metric_keys)
        if problem is not None or NUM_EXAMPLES not in self.metric_keys:
            return problem
        if self.sizes is None:  # before the imputation: only a plausible count
            most = (MAX_PLAUSIBLE_EXAMPLES, "what is plausible for one client")
        elif node_id not in self.sizes:
            return "the server has no sizes for this node: it missed the imputation"
        else:
            reported = self.sizes[node_id]
            if record[PARTITION_ID] != reported.partition_id:
                return (
                    f"partition-id {record[PARTITION_ID]} differs from the "
                    f"{reported.partition_id} it reported at the imputation"
                )
            most = reported.most_examples(self.counts)
        return example_count_problem(record[NUM_EXAMPLES], *most)

    def problem(
        self,
        reply: Message,
        node_id: int,
        sent: ArrayRecord | None = None,
        this_round: ArrayRecord | None = None,
    ) -> str | None:
        """Why ``reply`` cannot count, or ``None``; ``sent``: the model it must match
        (``this_round``: the model sent in this round, see :func:`arrays_problem`)."""
        content = reply.content
        carries_model = self.message_type in MODEL_REPLIES
        expected = {METRICS, ARRAYS} if carries_model else {METRICS}
        if set(content.keys()) != expected:
            return f"records {sorted(content.keys())}, expected {sorted(expected)}"
        if not isinstance(content[METRICS], MetricRecord):
            return f"'{METRICS}' is not a MetricRecord"
        if carries_model:
            if not isinstance(content[ARRAYS], ArrayRecord):
                return f"'{ARRAYS}' is not an ArrayRecord"
            problem = None if sent is None else arrays_problem(content[ARRAYS], sent, this_round)
            if problem is not None:
                return problem
        return self.metrics_problem(content[METRICS], node_id)


def metrics_problem(record: MetricRecord, keys: Collection[str]) -> str | None:
    """Exactly ``keys``, each value a finite number (or a list of them)."""
    missing, unexpected = sorted(set(keys) - set(record)), sorted(set(record) - set(keys))
    if missing or unexpected:
        return f"metrics missing {missing} / unexpected {unexpected}"
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        for number in values:
            if isinstance(number, bool) or not isinstance(number, int | float):
                return f"metric '{key}' is not a number: {value!r}"
            if not math.isfinite(number):
                return f"metric '{key}' is not finite: {value!r}"
    return None


def example_count_problem(value: object, most: int, bound: str) -> str | None:
    """``num-examples`` must be a positive integer of at most ``most`` (``bound`` says why)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{NUM_EXAMPLES} must be a positive integer; got {value!r}"
    if value <= 0 or not float(value).is_integer():
        return f"{NUM_EXAMPLES} must be a positive integer; got {value!r}"
    if value > most:
        return f"{NUM_EXAMPLES}={value:g} is more than {bound} ({most})"
    return None


def arrays_problem(
    record: ArrayRecord, sent: ArrayRecord, this_round: ArrayRecord | None = None
) -> str | None:
    """The same array names, shapes and dtypes as the model sent; every value finite.

    ``this_round``: the model sent in this round, whose dtypes are accepted too (FedAvg's
    mean turns an int64 counter into float64, as Flower's does, and a client may answer
    with the dtype it received).
    """
    missing = [name for name in sent if name not in record]
    unexpected = [name for name in record if name not in sent]
    if missing or unexpected:
        return f"arrays missing {missing[:5]} / unexpected {unexpected[:5]} (the model sent)"
    for name, model in sent.items():
        array = record[name]
        got, want = (array.dtype, tuple(array.shape)), (model.dtype, tuple(model.shape))
        if this_round is not None and name in this_round and got[0] == this_round[name].dtype:
            want = (got[0], want[1])
        if got != want:
            return f"array '{name}' is {got[0]} {got[1]}; the model sent has {want[0]} {want[1]}"
        try:
            values = from_array(array, copy=False)
        except Exception as error:  # noqa: BLE001 - any unreadable array is the client's fault
            return f"array '{name}' cannot be read: {type(error).__name__}: {error}"
        if values.shape != want[1] or str(values.dtype) != want[0]:
            return f"array '{name}' holds {values.dtype} {values.shape}, not what it says"
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"array '{name}' holds non-finite values (NaN or infinity)"
    return None


def imputation_problem(
    record: MetricRecord, synthetic_per_client: int, num_classes: int = NUM_CLASSES
) -> str | None:
    """An imputation reply: every size a non-negative integer, label counts that add up."""
    problem = metrics_problem(record, REPLY_METRICS[IMPUTE])
    if problem is not None:
        return problem
    lowest = {PARTITION_ID: 0, "own-data": 0, "partition-draws": 0, NUM_PARTITIONS: 1}
    lowest |= {"real-train": 1, "val": 0, "test": 0, "synthetic-train": 0}
    for key, least in lowest.items():
        value = record[key]
        if isinstance(value, list) or not float(value).is_integer():
            return f"'{key}' must be an integer; got {value!r}"
        if not least <= value <= MAX_PLAUSIBLE_EXAMPLES:
            return f"'{key}' must lie in {least}..{MAX_PLAUSIBLE_EXAMPLES}; got {value!r}"
    if record["own-data"] not in (0, 1):
        return f"'own-data' must be 0 or 1; got {record['own-data']!r}"
    # minority rounding "up" may add up to one image per label
    if record["synthetic-train"] > synthetic_per_client + num_classes:
        return (
            f"synthetic-train={record['synthetic-train']} is more than the {synthetic_per_client} "
            "images asked for (num-synthetic)"
        )
    pairs = (("real-label-counts", "real-train"), ("synthetic-label-counts", "synthetic-train"))
    for key, total in pairs:
        counts = record[key]
        if (
            not isinstance(counts, list)
            or len(counts) != num_classes
            or any(not float(c).is_integer() or c < 0 for c in counts)
        ):
            return f"'{key}' must be {num_classes} integers >= 0; got {counts!r}"
        if sum(counts) != record[total]:
            return f"'{key}' add up to {sum(counts)}, not {total}={record[total]}"
    return None


def metrics_only_problem(reply: Message) -> str | None:
    """A reply that answers with statistics only must hold one MetricRecord and nothing else."""
    content = reply.content
    if set(content.keys()) != {METRICS} or not isinstance(content[METRICS], MetricRecord):
        return f"records {sorted(content.keys())}, expected one MetricRecord {[METRICS]}"
    return None


def imputation_check(synthetic_per_client: int) -> Callable[[Message, int], str | None]:
    """Why an imputation reply cannot count, or ``None`` (see :func:`imputation_problem`)."""

    def problem(reply: Message, node_id: int) -> str | None:
        return metrics_only_problem(reply) or imputation_problem(
            reply.content[METRICS], synthetic_per_client
        )

    return problem


def roster_check(reply: Message, node_id: int) -> str | None:
    """Why a roster reply cannot count, or ``None``: one MetricRecord holding the node's
    partition id, an integer >= 0."""
    problem = metrics_only_problem(reply) or metrics_problem(
        reply.content[METRICS], REPLY_METRICS[ROSTER]
    )
    if problem is not None:
        return problem
    partition_id = reply.content[METRICS][PARTITION_ID]
    if isinstance(partition_id, list) or not float(partition_id).is_integer() or partition_id < 0:
        return f"'{PARTITION_ID}' must be an integer >= 0; got {partition_id!r}"
    return None


# The length each list of a privacy reply must have (closest distances and quantiles: at
# most this many; an empty list when nothing could be measured).
_PRIVACY_LISTS = {
    "histogram-train": len(BIN_EDGES) - 1,
    "histogram-heldout": len(BIN_EDGES) - 1,
    "histogram-reference": len(BIN_EDGES) - 1,
    "histogram-ratio": len(RATIO_BIN_EDGES) - 1,
    "histogram-ratio-reference": len(RATIO_BIN_EDGES) - 1,
}
_PRIVACY_SHORT_LISTS = {
    "closest-train-distances": CLOSEST,
    "closest-heldout-distances": CLOSEST,
    "closest-train-distances-reference": CLOSEST,
    "ratio-quantiles": len(QUANTILES),
    "ratio-quantiles-reference": len(QUANTILES),
}


def privacy_problem(record: MetricRecord) -> str | None:
    """A ``query.privacy`` reply: the keys of :class:`~fedaug_flwr.protocol.PrivacyAnswer`,
    finite numbers, histograms of their fixed length, short lists no longer than the
    audit makes them, counts that fit, AUCs in [0, 1]. Nothing image-sized can pass."""
    keys = set(record)
    missing = sorted(set(PrivacyAnswer.REQUIRED) - keys)
    unexpected = sorted(keys - set(PrivacyAnswer.REQUIRED) - set(PrivacyAnswer.OPTIONAL))
    if missing or unexpected:
        return f"metrics missing {missing} / unexpected {unexpected}"
    problem = metrics_problem(record, keys)
    if problem is not None:
        return problem
    for key in (PARTITION_ID, *PrivacyAnswer.COUNTS, "members", "non-members"):
        value = record[key]
        if isinstance(value, list) or not float(value).is_integer() or value < 0:
            return f"'{key}' must be an integer >= 0; got {value!r}"
    for key, length in _PRIVACY_LISTS.items():
        if not isinstance(record[key], list) or len(record[key]) != length:
            return f"'{key}' must be a list of {length} counts"
    for key, most in _PRIVACY_SHORT_LISTS.items():
        if not isinstance(record[key], list) or len(record[key]) > most:
            return f"'{key}' must be a list of at most {most} numbers"
    if record["flagged-images"] > record["synthetic-images"]:
        return "more flagged images than synthetic images"
    for key in PrivacyAnswer.OPTIONAL:
        if key.startswith("auc-") and key in record and not 0.0 <= record[key] <= 1.0:
            return f"'{key}' must lie in [0, 1]; got {record[key]!r}"
    return None


def privacy_check(reply: Message, node_id: int) -> str | None:
    """Why a privacy reply cannot count, or ``None`` (see :func:`privacy_problem`)."""
    return metrics_only_problem(reply) or privacy_problem(reply.content[METRICS])


def partition_count_problem(clients: Mapping[int, Mapping[str, object]]) -> str | None:
    """SuperNodes drawing Dirichlet partitions must agree on ``num-partitions``: with
    different counts their partitions are cut differently and overlap."""
    by_count: dict[int, list[int]] = {}
    for client in clients.values():
        if not client["own-data"]:
            by_count.setdefault(int(client[NUM_PARTITIONS]), []).append(int(client["node-id"]))
    if len(by_count) <= 1:
        return None
    groups = "; ".join(
        f"num-partitions={count} on node(s) {sorted(nodes)}"
        for count, nodes in sorted(by_count.items())
    )
    return (
        f"SuperNodes disagree on num-partitions ({groups}): their Dirichlet partitions "
        "would overlap; give every SuperNode the same num-partitions"
    )


def screen(
    replies: Iterable[Message],
    problem: Callable[[Message, int], str | None],
    node_of: Callable[[Message], int],
) -> tuple[list[Message], list[dict]]:
    """The replies that pass ``problem`` and one ``{"node-id", "reason"}`` per reply that
    does not. Error replies are left out of both (``reply_failures`` records them)."""
    good, rejected = [], []
    for reply in replies:
        if reply.has_error():
            continue
        node_id = node_of(reply)
        reason = problem(reply, node_id)
        if reason is None:
            good.append(reply)
        else:
            rejected.append({"node-id": node_id, "reason": f"rejected reply: {reason}"})
    return good, rejected
