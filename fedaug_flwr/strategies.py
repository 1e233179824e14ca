"""FedAvg routed to named ClientApp handlers, keeping what each client reported.

Flower's FedAvg sends plain "train"/"evaluate" messages and keeps only the
aggregated metrics. :class:`RoutedFedAvg` retags its messages (e.g.
"train.cvae"), gives each message its own content (FedAvg shares one
RecordDict between all of them), records per-client metrics and failures per
round (error replies, and clients that did not answer before the round timed
out, e.g. a dead SuperNode), and stops the phase when fewer than
``min_replies`` clients answered a training round. Evaluation rounds never
stop a phase: their failures are recorded and the metrics of those who
answered are kept.

With ``evaluate_on_receipt`` the clients evaluate each global model when the
next round's train message brings it, before training on it, and send those
metrics with their update; only the last model gets evaluate messages of its
own. A round then costs one message per client instead of two, with the same
numbers: round r's federated evaluation is still that of round r's global
model, recorded under round r (it arrives during round r + 1).

Every reply is checked (:mod:`fedaug_flwr.replies`) before it counts: a
malformed or absurd one is that client's failure for the round, recorded with
the reason, and only the good ones reach Flower's own check and the
aggregation. The classifier may be aggregated by Flower's robust rules
(``FedMedian``, ``FedTrimmedAvg``, ``Krum``) instead of the mean: see
:func:`routed_strategy`.

It also times every round (send and train, aggregation, federated and
server-side evaluation), which ``summary.json`` reports and ``bench/`` reads.

With a ``draw_seed`` (the run's seed) each round's draw of nodes, when a round takes
some of them (``fraction-train`` or ``fraction-evaluate`` below 1), depends on the seed,
the phase, the round and the kind of message only (:func:`seeded_draw`). Flower draws
with the process's shared ``random``, which other code draws from too: in a simulation
Flower's heartbeat thread takes a number from it every 17.5 to 22.5 s, so a generator
seeded once at the start drew other nodes depending on timing; and a classifier phase
after 15 CVAE rounds would draw other clients than one with no CVAE before it, which
would unpair the cells with and without synthetic images. Together with nodes listed in
partition order (:class:`~fedaug_flwr.federation.PartitionOrderedGrid`), a seed fixes
which partitions every round trains and evaluates.

After every round it can hand its whole state to a callback (:class:`PhaseProgress`:
the global model, the round logs and metrics so far, the server's random generators),
and it can start from such a state instead of round 1: the run's checkpoint
(:mod:`fedaug_flwr.checkpoint`) is made of them.
"""

from __future__ import annotations

import random
import re
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Result,
)
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from fedaug_flwr import log
from fedaug_flwr.metrics import aggregate_clients
from fedaug_flwr.protocol import (
    EVALUATE_RECEIVED,
    METRICS,
    PARTITION_ID,
    RECEIVED_EVALUATION,
    TRAIN_LOSS,
    VAL_LOSS,
)
from fedaug_flwr.replies import TEST, NodeSizes, ReplyRules, screen
from fedaug_flwr.training import rng_state, seed_for, set_rng_state
from fedaug_flwr.transport import from_array, to_array, weighted_mean


class PhaseError(RuntimeError):
    """A phase could not produce a model (too few clients answered)."""


@dataclass
class RoundLog:
    """What happened in one round of one phase."""

    per_client: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    sent: int = 0


@dataclass
class PhaseProgress:
    """A FedAvg phase after its last completed round: everything it needs to go on from
    the next round as if it had never stopped."""

    completed_round: int
    arrays: ArrayRecord  # the global model after that round
    result: Result  # Flower's per-round metrics so far (received evaluations apart)
    train_log: dict[int, RoundLog]
    evaluate_log: dict[int, RoundLog]
    received_evaluations: dict[int, MetricRecord]  # evaluations that came with updates
    timing: list[dict[str, float]]  # ``timing_table`` rows of the rounds so far
    rng: dict  # the server's random generators (:func:`fedaug_flwr.training.rng_state`)
    # a server optimizer's own state (FedAvgM's momentum, FedAdam's moments), by name
    server_state: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class RoundHooks:
    """How a FedAvg phase meets the run's checkpoint: the progress to go on from (None:
    round 1) and what to call after every round."""

    resume: PhaseProgress | None = None
    after_round: Callable[[PhaseProgress], None] | None = None


def short_reason(reason: str) -> str:
    """The client's own error message out of a reply's reason (often a whole Ray traceback)."""
    match = re.search(r"occurred\. Message: (.+?)'?>?$", reason, re.S)
    if match:
        return match.group(1).strip()
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    # deployment ends with "<class 'pkg.module.SomeError'>:<'message'>"
    pattern = r"<class '(?:[\w.]+\.)?(\w+)'>:<['\"](.*)['\"]>"
    if lines and (match := re.fullmatch(pattern, lines[-1])):
        return f"{match.group(1)}: {match.group(2)}"
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    return (errors or lines or [reason])[-1]


def no_reply_reason(timeout: float | None) -> str:
    limit = "" if timeout is None else f" ({timeout:g} s)"
    return f"no reply within round-timeout{limit}: node down or too slow"


def sender_of(sent: Sequence[Message]) -> Callable[[Message], int]:
    """The node a reply comes from: the destination of the message it answers."""
    destination = {message.metadata.message_id: message.metadata.dst_node_id for message in sent}

    def node_of(reply: Message) -> int:
        return destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    return node_of


def reply_failures(
    replies: list[Message], sent: Sequence[Message], timeout: float | None
) -> list[dict]:
    """One ``{"node-id", "reason"}`` per error reply and per node that never replied.

    An error reply made by the SuperLink itself (e.g. "Node Unavailable" for a
    SuperNode that stopped sending heartbeats) comes from the SuperLink's own
    node id, so each reply is matched to the message it answers.
    """
    node_of = sender_of(sent)
    failures = [
        {"node-id": node_of(reply), "reason": short_reason(reply.error.reason)}
        for reply in replies
        if reply.has_error()
    ]
    answered = {node_of(reply) for reply in replies}
    failures += [
        {"node-id": message.metadata.dst_node_id, "reason": no_reply_reason(timeout)}
        for message in sent
        if message.metadata.dst_node_id not in answered
    ]
    return failures


def metric_dict(record: MetricRecord) -> dict:
    return {key: value for key, value in record.items()}


def _aggregate(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    rows = [metric_dict(content[METRICS]) for content in contents]
    aggregated = aggregate_clients(rows, weighted_by_key)
    for key in (TRAIN_LOSS, VAL_LOSS):  # training-side losses, example-weighted
        if rows and all(key in row for row in rows):
            weights = [float(row[weighted_by_key]) for row in rows]
            values = [float(row[key]) for row in rows]
            aggregated[key] = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(
                weights
            )
    return MetricRecord(aggregated)


def release_arrays(replies: Iterable[Message]) -> None:
    """Drop the model arrays of replies that have been aggregated. Flower's
    ``Strategy.start`` keeps a round's reply list until the next round's replies are in,
    so two rounds of client models would be in memory at once (3.7 MB per client for
    ExquisiteNet: 7.4 GB at 1,000 clients, ``bench.many_clients``); nothing reads them
    after aggregation."""
    for reply in replies:
        if reply.has_content():
            for name in list(reply.content.array_records):
                del reply.content[name]


def in_partition_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by partition id: floating-point sums, hence a run, become repeatable."""

    def key(reply: Message) -> tuple[int, int, int]:
        node_id = reply.metadata.src_node_id
        if not reply.has_error():  # a malformed reply is sorted last, never an error here
            partition = reply.content.metric_records.get(METRICS, {}).get(PARTITION_ID)
            if isinstance(partition, int) and not isinstance(partition, bool):
                return (0, partition, node_id)
        return (1, 0, node_id)

    return sorted(replies, key=key)


@contextmanager
def seeded_draw(seed: int | None, message_type: str, server_round: int) -> Iterator[None]:
    """Flower's draw of a round's nodes (``random.sample`` in ``sample_nodes``), made with
    ``random`` seeded by the run's seed, the message type and the round only; the shared
    generator's state is put back afterwards. ``None``: Flower's draw as it is.

    Flower offers no generator of its own to pass in (``sample_nodes`` uses the module
    ``random``), hence seeding the shared one around the call."""
    if seed is None:
        yield
        return
    state = random.getstate()
    random.seed(seed_for(seed, zlib.crc32(message_type.encode()), server_round))
    try:
        yield
    finally:
        random.setstate(state)


class RoutedFedAvg(FedAvg):
    """FedAvg whose messages go to ``train.<action>`` / ``evaluate.<action>``."""

    aggregation = "fedavg"  # what summary.json records
    strategy = "fedavg"  # the server strategy (``clf-strategy``), recorded beside it

    def __init__(
        self,
        action: str,
        min_replies: int = 1,
        evaluate_on_receipt: bool = False,
        sizes: Mapping[int, NodeSizes] | None = None,
        averaged: Collection[str] = (),
        draw_seed: int | None = None,
        **kwargs,
    ) -> None:
        """``sizes``: what each node (by node id) reported owning at the imputation, which
        bounds the example counts of its replies (``None``: before the imputation).
        ``averaged``: arrays that a server optimizer (FedAvgM, FedAdam) must not step,
        e.g. BatchNorm's running statistics; they take FedAvg's mean. ``draw_seed``: the
        run's seed, which with the round fixes each round's draw of nodes
        (:func:`seeded_draw`)."""
        self.averaged = frozenset(averaged)
        self.draw_seed = draw_seed
        kwargs.setdefault("train_metrics_aggr_fn", _aggregate)
        kwargs.setdefault("evaluate_metrics_aggr_fn", _aggregate)
        super().__init__(**kwargs)
        self.action = action
        self.train_rules = ReplyRules(f"train.{action}", sizes)
        self.evaluate_rules = ReplyRules(f"evaluate.{action}", sizes, counts=TEST)
        self._model: ArrayRecord | None = None  # names, shapes and dtypes of every update
        self._sent_models: dict[int, ArrayRecord] = {}  # the model each round sent
        self.min_replies = min_replies
        # Only sound when the clients that train are those that evaluate: all of them.
        self.evaluate_on_receipt = (
            evaluate_on_receipt and self.fraction_train == 1.0 and self.fraction_evaluate == 1.0
        )
        self.train_log: dict[int, RoundLog] = {}
        self.evaluate_log: dict[int, RoundLog] = {}
        self.round_timeout: float | None = None
        self._num_rounds = 0
        self._received_evaluations: dict[int, MetricRecord] = {}
        self._sent: dict[tuple[str, int], list[Message]] = {}
        self._marks: dict[int, dict[str, float]] = {}
        self._earlier_timing: dict[int, dict[str, float]] = {}  # rounds before a resume

    def parameters(self) -> dict[str, float]:
        """The server strategy's own settings, as ``summary.json`` records them."""
        return {}

    @property
    def federated_evaluation(self) -> str:
        """How the clients evaluate the global models: what ``summary.json`` records."""
        if self.fraction_evaluate == 0.0:
            return "off"
        return "on receipt" if self.evaluate_on_receipt else "evaluate messages"

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        resume: PhaseProgress | None = None,
        after_round: Callable[[PhaseProgress], None] | None = None,
    ) -> Result:
        """FedAvg's ``start``, with the server-side evaluation timed per round.

        Evaluations received with the next round's updates are added to the
        result under the round of the model they evaluated. ``resume``: go on
        after its completed round instead of starting at round 1 (``initial_arrays``
        still fixes the names, shapes and dtypes every update must have);
        ``after_round`` is given the phase's progress after every round.
        """
        self.round_timeout = timeout  # to tell "no reply in time" from other failures
        # Every update must match the initial model's arrays (or the dtypes of the model
        # sent that round: FedAvg turns an int64 counter into float64, as Flower does).
        self._model = initial_arrays
        self._num_rounds = num_rounds
        timed_evaluate_fn = None
        if evaluate_fn is not None:

            def timed_evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                self._mark(server_round, "global-evaluate-start")
                try:
                    return evaluate_fn(server_round, arrays)
                finally:
                    self._mark(server_round, "global-evaluate-end")

        result = self._rounds(
            grid,
            initial_arrays,
            num_rounds,
            timeout,
            train_config or ConfigRecord(),
            evaluate_config or ConfigRecord(),
            timed_evaluate_fn,
            resume,
            after_round,
        )
        if self._received_evaluations:
            by_round = {**result.evaluate_metrics_clientapp, **self._received_evaluations}
            result.evaluate_metrics_clientapp = dict(sorted(by_round.items()))
        return result

    def _rounds(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        timeout: float,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        resume: PhaseProgress | None,
        after_round: Callable[[PhaseProgress], None] | None,
    ) -> Result:
        """The rounds of Flower 1.42's ``Strategy.start``, step for step and with its log
        lines (the launcher's progress reads ``[ROUND r/n]``), from round 1 or from the
        round after ``resume``. Our own because Flower's always starts at round 1 and
        has no hook after a round, which a resumable run needs."""
        log.info("Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        started = time.time()
        if resume is None:
            result, arrays, first_round = Result(), initial_arrays, 1
            if evaluate_fn:  # the starting global model
                res = evaluate_fn(0, initial_arrays)
                log.info("Initial global evaluation results: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[0] = res
        else:
            result, arrays = self._restore(resume), resume.arrays
            first_round = resume.completed_round + 1
            log.info("Resuming after round %d of %d", resume.completed_round, num_rounds)
        for current_round in range(first_round, num_rounds + 1):
            log.info("")
            log.info("[ROUND %s/%s]", current_round, num_rounds)
            train_replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid),
                timeout=timeout,
            )
            agg_arrays, agg_train_metrics = self.aggregate_train(current_round, train_replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_train_metrics is not None:
                log.info("\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
                result.train_metrics_clientapp[current_round] = agg_train_metrics
            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            agg_evaluate_metrics = self.aggregate_evaluate(current_round, evaluate_replies)
            if agg_evaluate_metrics is not None:
                log.info("\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics
            if evaluate_fn:
                log.info("Global evaluation")
                res = evaluate_fn(current_round, arrays)
                log.info("\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
            if after_round is not None:
                after_round(self.progress(current_round, arrays, result))
        log.info("Strategy execution finished in %.2fs", time.time() - started)
        return result

    def progress(self, completed_round: int, arrays: ArrayRecord, result: Result) -> PhaseProgress:
        """The phase's state after ``completed_round`` (see :class:`PhaseProgress`)."""
        return PhaseProgress(
            completed_round=completed_round,
            arrays=arrays,
            result=result,
            train_log=dict(self.train_log),
            evaluate_log=dict(self.evaluate_log),
            received_evaluations=dict(self._received_evaluations),
            timing=self.timing_table(),
            rng=rng_state(),
            server_state=self.server_state(),
        )

    def server_state(self) -> dict[str, np.ndarray]:
        """What the server strategy carries from round to round besides the global model
        (nothing for FedAvg; see FedAvgM and FedAdam below)."""
        return {}

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        """Take up :meth:`server_state`'s arrays after a resume."""

    def _restore(self, resume: PhaseProgress) -> Result:
        """Take up ``resume``'s state: logs, received evaluations, timings, random
        generators."""
        self.train_log = dict(resume.train_log)
        self.evaluate_log = dict(resume.evaluate_log)
        self._received_evaluations = dict(resume.received_evaluations)
        self._earlier_timing = {int(row["round"]): dict(row) for row in resume.timing}
        set_rng_state(resume.rng)
        self.load_server_state(resume.server_state)
        result = resume.result
        result.arrays = resume.arrays
        return result

    def _evaluated_on_receipt(self, server_round: int) -> bool:
        """Round ``server_round``'s model is evaluated by the next round's train messages."""
        return self.evaluate_on_receipt and server_round < self._num_rounds

    def _mark(self, server_round: int, event: str) -> None:
        self._marks.setdefault(server_round, {})[event] = time.perf_counter()

    def round_timing(self, server_round: int) -> dict[str, float]:
        """Seconds spent in each part of one round (round 0: the initial global evaluation).

        ``train`` runs from configuring the messages to having every reply
        (the clients' work plus Flower's transport), ``aggregate`` is FedAvg
        over the replies, ``evaluate`` the federated evaluation round trip
        (with evaluation on receipt, only the last round has one: the others'
        evaluation is part of the next round's ``train``),
        ``global-evaluate`` the server's own evaluation, ``total`` all of it.
        """
        marks = self._marks.get(server_round, {})
        spans = {
            "train": ("train-start", "train-replies"),
            "aggregate": ("train-replies", "train-aggregated"),
            "evaluate": ("evaluate-start", "evaluate-replies"),
            "global-evaluate": ("global-evaluate-start", "global-evaluate-end"),
        }
        timing = {
            name: round(marks[end] - marks[begin], 3)
            for name, (begin, end) in spans.items()
            if begin in marks and end in marks
        }
        if marks:
            timing["total"] = round(max(marks.values()) - min(marks.values()), 3)
        return timing

    def timing_table(self) -> list[dict[str, float]]:
        """``round_timing`` of every round so far, each row with its ``round`` number."""
        rows = {
            **self._earlier_timing,
            **{r: {"round": r, **self.round_timing(r)} for r in self._marks},
        }
        return [rows[r] for r in sorted(rows)]

    def _route(self, messages: Iterable[Message], category: str, server_round: int) -> list:
        routed = []
        for message in messages:
            # FedAvg reuses one RecordDict for every message: give each its own.
            message.content = RecordDict(dict(message.content.items()))
            message.metadata.message_type = f"{category}.{self.action}"
            routed.append(message)
        self._sent[category, server_round] = routed  # to tell who did not answer
        return routed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._mark(server_round, "train-start")
        if self.evaluate_on_receipt:  # ``arrays`` is round (server_round - 1)'s global model
            config[EVALUATE_RECEIVED] = server_round > 1
        self._sent_models[server_round] = arrays
        with seeded_draw(self.draw_seed, f"train.{self.action}", server_round):
            messages = super().configure_train(server_round, arrays, config, grid)
        return self._route(messages, "train", server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._evaluated_on_receipt(server_round):
            return []
        self._mark(server_round, "evaluate-start")
        with seeded_draw(self.draw_seed, f"evaluate.{self.action}", server_round):
            messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._route(messages, "evaluate", server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self._mark(server_round, "train-replies")
        replies = in_partition_order(replies)
        if self.evaluate_on_receipt and server_round > 1:
            self._record_received_evaluations(server_round - 1, replies, server_round)
        this_round = self._sent_models.pop(server_round, None)
        entry, good = self._record(replies, "train", server_round, self._model, this_round)
        self.train_log[server_round] = entry
        try:
            return self._aggregate_updates(server_round, good)
        finally:
            release_arrays(replies)
            self._mark(server_round, "train-aggregated")

    def _aggregate_updates(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model from the checked replies: FedAvg's mean here; the robust
        strategies below use their Flower strategy's own ``aggregate_train``."""
        return self._fedavg(replies)

    def _fedavg(self, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's ``aggregate_train`` with the faster array reader of :mod:`transport`."""
        # FedAvg's own reply check (flwr is pinned to 1.42, where this helper is FedAvg's);
        # the replies were checked one by one before (``_record``), so it cannot fail here.
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        contents = [reply.content for reply in valid_replies]
        weights = [
            next(iter(content.metric_records.values()))[self.weighted_by_key]
            for content in contents
        ]
        records = [next(iter(content.array_records.values())) for content in contents]
        arrays = weighted_mean(records, weights)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def _record_received_evaluations(
        self, evaluated_round: int, replies: list[Message], server_round: int
    ) -> None:
        """Take the clients' evaluations of round ``evaluated_round``'s model out of the
        train replies of ``server_round`` (FedAvg wants one MetricRecord per reply)."""
        sent = self._sent.get(("train", server_round), [])
        entry = RoundLog(sent=len(sent))
        entry.failures = reply_failures(replies, sent, self.round_timeout)
        contents = []
        node_of = sender_of(sent)
        for reply in replies:
            if reply.has_error():
                continue
            evaluation = reply.content.pop(RECEIVED_EVALUATION, None)
            if not isinstance(evaluation, MetricRecord):
                reason = "the train reply lacks its evaluation of the received model"
                entry.failures.append({"node-id": node_of(reply), "reason": reason})
                continue
            problem = self.evaluate_rules.metrics_problem(evaluation, node_of(reply))
            if problem is not None:
                reason = f"rejected evaluation of the received model: {problem}"
                entry.failures.append({"node-id": node_of(reply), "reason": reason})
                continue
            entry.per_client.append(metric_dict(evaluation))
            contents.append(RecordDict({METRICS: evaluation}))
        self._check_enough(entry, "evaluate", evaluated_round)
        self.evaluate_log[evaluated_round] = entry
        if contents:
            aggregated = self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key)
            log.info("evaluation of round %d (received): %s", evaluated_round, aggregated)
            self._received_evaluations[evaluated_round] = aggregated

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        if self._evaluated_on_receipt(server_round):
            return None  # recorded from the next round's train replies
        self._mark(server_round, "evaluate-replies")
        if self.fraction_evaluate == 0.0:
            return None
        replies = in_partition_order(replies)
        self.evaluate_log[server_round], good = self._record(replies, "evaluate", server_round)
        if not good:
            return None
        return super().aggregate_evaluate(server_round, good)

    def _record(
        self,
        replies: list[Message],
        kind: str,
        server_round: int,
        model: ArrayRecord | None = None,
        this_round: ArrayRecord | None = None,
    ) -> tuple[RoundLog, list[Message]]:
        """The round's log, and the replies that passed their check (``model``: the arrays
        every update must match; ``this_round``: the model this round sent, whose dtypes
        are accepted too); too few of them end a training phase."""
        sent = self._sent.pop((kind, server_round), [])
        entry = RoundLog(sent=len(sent))
        entry.failures = reply_failures(replies, sent, self.round_timeout)
        rules = self.train_rules if kind == "train" else self.evaluate_rules

        def problem(reply: Message, node_id: int) -> str | None:
            return rules.problem(reply, node_id, model, this_round)

        good, rejected = screen(replies, problem, sender_of(sent))
        entry.failures += rejected
        entry.per_client = [metric_dict(reply.content[METRICS]) for reply in good]
        self._check_enough(entry, kind, server_round)
        return entry, good

    def _check_enough(self, entry: RoundLog, kind: str, server_round: int) -> None:
        """Log each failure; too few training replies end the phase (no model)."""
        for failure in entry.failures:
            log.warning(
                "%s.%s round %d: node %s failed: %s",
                kind,
                self.action,
                server_round,
                failure["node-id"],
                failure["reason"],
            )
        if len(entry.per_client) < self.min_replies:
            reasons = sorted({f["reason"] for f in entry.failures})
            summary = (
                f"{kind}.{self.action} round {server_round}: only {len(entry.per_client)} of "
                f"{entry.sent} clients answered (need {self.min_replies}); "
                f"client errors: {reasons}"
            )
            if kind == "train":  # no model without enough updates
                raise PhaseError(summary)
            log.warning("%s; evaluation kept for those who answered", summary)


# Robust aggregation of the classifier (``clf-aggregation``). Each class puts RoutedFedAvg
# (routing, reply checks, per-client records, evaluation on receipt) in front of Flower's
# own strategy in the MRO and hands it the checked replies: the aggregation itself is
# Flower's, unchanged. Their metrics are aggregated like FedAvg's (``_aggregate``).


class RoutedFedMedian(RoutedFedAvg, FedMedian):
    """Coordinate-wise median of the updates (Flower's ``FedMedian``)."""

    aggregation = "fedmedian"

    def _aggregate_updates(self, server_round: int, replies: list[Message]):
        return FedMedian.aggregate_train(self, server_round, replies)


class RoutedFedTrimmedAvg(RoutedFedAvg, FedTrimmedAvg):
    """Coordinate-wise mean without the ``beta`` fraction of highest and of lowest values
    (Flower's ``FedTrimmedAvg``; it trims ``int(beta * clients)`` from each end)."""

    aggregation = "fedtrimmedavg"

    def _aggregate_updates(self, server_round: int, replies: list[Message]):
        if replies and int(self.beta * len(replies)) == 0:
            log.warning(
                "clf-trim-fraction=%g trims nothing from %d updates (it trims int(fraction x "
                "updates) from each end): this round is a plain mean",
                self.beta,
                len(replies),
            )
        return FedTrimmedAvg.aggregate_train(self, server_round, replies)


class RoutedKrum(RoutedFedAvg, Krum):
    """The one update closest to its ``n - f - 2`` nearest others (Flower's ``Krum``,
    ``f`` = ``num_malicious_nodes``)."""

    aggregation = "krum"

    def _aggregate_updates(self, server_round: int, replies: list[Message]):
        return Krum.aggregate_train(self, server_round, replies)


AGGREGATIONS: dict[str, type[RoutedFedAvg]] = {
    cls.aggregation: cls for cls in (RoutedFedAvg, RoutedFedMedian, RoutedFedTrimmedAvg, RoutedKrum)
}


# The classifier's server strategy (``clf-strategy``), Flower's built-ins behind the same
# RoutedFedAvg mixin as the robust rules above. ``configure_train`` already goes through the
# Flower class (it follows RoutedFedAvg in the MRO): FedProx writes ``proximal-mu`` into the
# train config, FedAvgM and FedAdam keep the global model their update starts from.


class RoutedFedProx(RoutedFedAvg, FedProx):
    """FedAvg on the server; Flower's ``FedProx`` puts ``proximal_mu`` into every train
    message's config under ``proximal-mu``, the key the client's proximal term reads."""

    strategy = "fedprox"

    def parameters(self) -> dict[str, float]:
        return {"proximal-mu": self.proximal_mu}


def _mean_of_averaged(strategy: RoutedFedAvg, arrays: ArrayRecord | None, replies: list[Message]):
    """``arrays`` (a server optimizer's new model) with its ``averaged`` arrays replaced, in
    place, by FedAvg's mean of the replies. Flower's FedAvgM and FedAdam step every array:
    momentum extrapolates BatchNorm's running variances below zero (measured: within ten
    rounds at momentum 0.9), and the model then evaluates as garbage. In place, because
    FedAvgM keeps the very record it returns as the next round's starting point."""
    if arrays is None or not strategy.averaged:
        return
    mean, _ = strategy._fedavg(replies)
    for name in strategy.averaged & set(arrays.keys()):
        arrays[name] = mean[name]


class RoutedFedAvgM(RoutedFedAvg, FedAvgM):
    """Server momentum (Flower's ``FedAvgM``): ``v <- momentum * v + (w - mean)``,
    ``w <- w - lr * v`` (the first round's ``v`` is ``w - mean`` itself)."""

    strategy = "fedavgm"

    def _aggregate_updates(self, server_round: int, replies: list[Message]):
        arrays, metrics = FedAvgM.aggregate_train(self, server_round, replies)
        _mean_of_averaged(self, arrays, replies)
        return arrays, metrics

    def parameters(self) -> dict[str, float]:
        return {"server-lr": self.server_learning_rate, "server-momentum": self.server_momentum}

    # The momentum goes into the checkpoint; the model its step starts from is the global
    # model a resumed phase starts with (FedAvgM takes it in ``configure_train``).
    def server_state(self) -> dict[str, np.ndarray]:
        momentum = self.momentum_vector or []
        return {f"momentum/{i:04d}": array for i, array in enumerate(momentum)}

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        names = sorted(name for name in state if name.startswith("momentum/"))
        self.momentum_vector = [state[name] for name in names] or None


class RoutedFedAdam(RoutedFedAvg, FedAdam):
    """Server Adam on ``delta = mean - w`` (Flower's ``FedAdam``, Reddi et al.):
    ``m <- b1 m + (1 - b1) delta``, ``v <- b2 v + (1 - b2) delta^2``,
    ``w <- w + eta_t m / (sqrt(v) + tau)`` with Flower's
    ``eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` in round ``t``."""

    strategy = "fedadam"

    def _aggregate_updates(self, server_round: int, replies: list[Message]):
        arrays, metrics = FedAdam.aggregate_train(self, server_round, replies)
        if arrays is None or self._model is None:
            return arrays, metrics
        _mean_of_averaged(self, arrays, replies)
        # numpy turns Flower's float64 step size times a float32 array into float64: the
        # model would travel (and be saved) at twice its size, in a dtype no client trains
        # in. Each floating array goes back to the initial model's own dtype.
        for name, array in arrays.items():
            dtype = np.dtype(self._model[name].dtype)
            if dtype.kind == "f" and np.dtype(array.dtype) != dtype:
                arrays[name] = to_array(from_array(array).astype(dtype))
        return arrays, metrics

    def parameters(self) -> dict[str, float]:
        return {"eta": self.eta, "tau": self.tau, "beta1": self.beta_1, "beta2": self.beta_2}

    # The moments go into the checkpoint (FedAdam takes the model from ``configure_train``).
    def server_state(self) -> dict[str, np.ndarray]:
        moments = {"m": self.m_t or {}, "v": self.v_t or {}}
        return {
            f"{kind}/{name}": array
            for kind, arrays in moments.items()
            for name, array in arrays.items()
        }

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        for kind, attribute in (("m", "m_t"), ("v", "v_t")):
            arrays = {k.split("/", 1)[1]: a for k, a in state.items() if k.startswith(f"{kind}/")}
            setattr(self, attribute, arrays or None)


STRATEGIES: dict[str, type[RoutedFedAvg]] = {
    cls.strategy: cls for cls in (RoutedFedAvg, RoutedFedProx, RoutedFedAvgM, RoutedFedAdam)
}


def routed_strategy(
    aggregation: str,
    action: str,
    trim_fraction: float = 0.2,
    krum_malicious: int = 0,
    strategy: str = "fedavg",
    strategy_parameters: Mapping[str, float] | None = None,
    **kwargs,
) -> RoutedFedAvg:
    """A :class:`RoutedFedAvg` that aggregates the updates by ``aggregation`` (a key of
    :data:`AGGREGATIONS`), with that rule's own parameter, or, for a ``strategy`` other
    than FedAvg (a key of :data:`STRATEGIES`; only with ``aggregation`` "fedavg"), that
    Flower strategy built with ``strategy_parameters`` (its own keyword arguments)."""
    if strategy != "fedavg":
        if aggregation != "fedavg":
            raise ValueError(f"strategy {strategy!r} aggregates by itself, not by {aggregation!r}")
        return STRATEGIES[strategy](action, **kwargs, **dict(strategy_parameters or {}))
    cls = AGGREGATIONS[aggregation]
    if cls is RoutedFedTrimmedAvg:
        kwargs["beta"] = trim_fraction
    elif cls is RoutedKrum:
        kwargs["num_malicious_nodes"] = krum_malicious
    return cls(action, **kwargs)
