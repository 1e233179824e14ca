"""The server's side of privacy: the CVAE's differential privacy, and the summary's
``privacy`` section from the clients' audits.

- :func:`cvae_strategy`: the CVAE's FedAvg as ``cvae-dp`` asks. ``"sample"``: the
  routed FedAvg, whose replies carry each client's epsilon (DP-SGD runs on the
  clients, :func:`fedaug_flwr.node.train_cvae`), and a client's budget error stops
  the run; ``"client"``: Flower's ``DifferentialPrivacyServerSideFixedClipping``
  with Flower's accountant (``flwr[dp]``) around a FedAvg that only routes
  (:class:`ClientLevelDP`), the budget checked before any message is sent.
- :func:`dp_section`: what ``summary.json`` records of it (``cvae.dp``): the
  settings and the epsilon spent after each round.
- :func:`privacy_section`: the clients' answers to ``query.privacy`` (sent by
  :func:`fedaug_flwr.phases.audit_on_clients` after the CVAE phase; statistics only,
  checked by ``replies.privacy_check``) pooled with
  :func:`fedaug_flwr.privacy.aggregate_audits` / ``aggregate_auc`` into the
  ``privacy`` section; :func:`audit_skipped` says when a run cannot be audited.

The wiring, its constraints and what the numbers mean: ``docs/privacy.md``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from fedaug_flwr import dp, log, privacy
from fedaug_flwr.config import AppConfig
from fedaug_flwr.protocol import PARTITION_ID, TRAIN_CVAE, PrivacyAnswer
from fedaug_flwr.replies import CVAE_DP_SAMPLE_METRICS, ReplyRules
from fedaug_flwr.strategies import RoutedFedAvg, in_partition_order, short_reason

HELDOUT_NOTE = (
    "held-out images: each client's validation and test splits (val-fraction + "
    "test-fraction of its data), which the CVAE never trains on; members: its training "
    "split (client-split-refresh='once')"
)
TRUST_NOTE = (
    "the audit's statistics are computed on the clients' real images and are not covered "
    "by any DP guarantee of the CVAE (nor is the train-loss a client reports): a measurement "
    "aid; switch privacy-audit off where the guarantee must hold for everything released"
)


# ------------------------------------------------------------------ DP of the CVAE


class SampleLevelDP(RoutedFedAvg):
    """The CVAE's routed FedAvg under sample-level DP-SGD: replies carry the client's
    epsilon (``dp-*`` metrics), and a client that refuses to train because its budget
    would be exceeded stops the run (a budget is the user's limit, not a client fault)."""

    def __init__(self, action: str, **kwargs) -> None:
        super().__init__(action, **kwargs)
        self.train_rules = ReplyRules(TRAIN_CVAE, metric_keys=CVAE_DP_SAMPLE_METRICS)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for reply in replies:
            if reply.has_error() and dp.PrivacyBudgetError.__name__ in reply.error.reason:
                raise dp.PrivacyBudgetError(
                    f"train.cvae round {server_round}: a client refused to train, before its "
                    f"first DP-SGD step: {short_reason(reply.error.reason)}"
                )
        return super().aggregate_train(server_round, replies)


class _RoutingFedAvg(RoutedFedAvg):
    """RoutedFedAvg's routing and checks with FedAvg's own ``aggregate_train``: the inner
    strategy Flower's accounted DP wrapper requires (it refuses any other aggregation)."""

    aggregate_train = FedAvg.aggregate_train


class ClientLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with its accountant, around a strategy that only
    routes (:class:`_RoutingFedAvg`).

    Flower's wrapper clips and adds the noise; this subclass only does what
    ``RoutedFedAvg.start`` / ``aggregate_train`` would have done around it (Flower's
    ``Strategy.start`` runs instead): check every reply and record it per client
    (``train_log``, ``timing_table``) before Flower clips it, and keep the epsilon Flower's
    accountant reports after each release (``epsilon_log``). Flower's accounted mode
    skips a round's release unless every sampled client answered; the global CVAE then
    stays as it was, and the epsilon too.
    """

    def __init__(self, inner: _RoutingFedAvg, config: AppConfig, num_clients: int) -> None:
        self.noise = client_noise(config)
        budget = config.cvae_dp_epsilon or None
        super().__init__(
            inner,
            noise_multiplier=self.noise,
            clipping_norm=config.cvae_dp_clip,
            num_sampled_clients=num_clients,
            accountant=dp.client_level_accountant(config.cvae_dp_delta, num_clients, budget),
        )
        self.inner = inner
        self.epsilon_log: dict[int, float] = {}

    @property
    def train_log(self):  # what phases._rounds reads of a RoutedFedAvg
        return self.inner.train_log

    @property
    def evaluate_log(self):
        return self.inner.evaluate_log

    def timing_table(self) -> list[dict[str, float]]:
        return self.inner.timing_table()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs):
        # Flower's wrapper runs Flower's own round loop, which cannot start after a
        # completed round; its rounds are not checkpointed (after_round is never called),
        # so an interrupted run has no CVAE progress to resume and redoes this phase whole.
        kwargs.pop("after_round", None)
        if kwargs.pop("resume", None) is not None:
            raise RuntimeError("client-level DP's CVAE rounds cannot resume mid-phase")
        self.inner.round_timeout = kwargs.get("timeout")
        self.inner._model = initial_arrays  # every update must match the model's arrays
        self.inner._num_rounds = num_rounds
        return super().start(grid, initial_arrays, num_rounds=num_rounds, **kwargs)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner = self.inner
        inner._mark(server_round, "train-replies")
        replies = in_partition_order(replies)
        sent = inner._sent_models.pop(server_round, None)
        entry, good = inner._record(replies, "train", server_round, inner._model, sent)
        inner.train_log[server_round] = entry
        try:
            arrays, metrics = super().aggregate_train(server_round, good)
        finally:
            inner._mark(server_round, "train-aggregated")
        if arrays is not None:
            self.epsilon_log[server_round] = float(self.privacy_spent().epsilon)
        return arrays, metrics


def client_noise(config: AppConfig) -> float:
    """The client-level noise multiplier (``cvae-dp-noise``, or with 0 the smallest that
    keeps ``cvae-dp-epsilon``); :class:`~fedaug_flwr.dp.PrivacyBudgetError` if a given
    noise would exceed the budget over all CVAE rounds. Everything it depends on is in the
    run config, so this runs on the server before any message is sent."""
    rounds, delta = config.cvae_rounds, config.cvae_dp_delta
    if config.cvae_dp_noise == 0:
        return dp.client_noise_for_budget(
            target_epsilon=config.cvae_dp_epsilon, delta=delta, rounds=rounds
        )
    if config.cvae_dp_epsilon > 0:
        dp.check_client_budget(
            target_epsilon=config.cvae_dp_epsilon,
            delta=delta,
            noise_multiplier=config.cvae_dp_noise,
            rounds=rounds,
        )
    return config.cvae_dp_noise


def cvae_strategy(config: AppConfig, num_clients: int, **kwargs):
    """The CVAE phase's strategy for ``cvae-dp`` (``kwargs``: RoutedFedAvg's arguments)."""
    if config.cvae_dp == "sample":
        return SampleLevelDP("cvae", **kwargs)
    if config.cvae_dp == "client":
        noise = client_noise(config)  # before building anything: the budget error first
        log.info(
            "[fedaug] client-level DP for the CVAE: noise multiplier %.4g, clipping norm %g, "
            "%d clients in every round",
            noise,
            config.cvae_dp_clip,
            num_clients,
        )
        return ClientLevelDP(_RoutingFedAvg("cvae", **kwargs), config, num_clients)
    return RoutedFedAvg("cvae", **kwargs)


def dp_section(config: AppConfig, strategy) -> dict:
    """``cvae.dp``: the settings and the epsilon spent after each CVAE round."""
    if config.cvae_dp == "off":
        return {"mode": "off"}
    common = {
        "mode": config.cvae_dp,
        "delta": config.cvae_dp_delta,
        "clip": config.cvae_dp_clip,
        "epsilon-budget": config.cvae_dp_epsilon or None,
    }
    if isinstance(strategy, ClientLevelDP):
        rounds = [{"round": r, "epsilon": e} for r, e in sorted(strategy.epsilon_log.items())]
        return {
            **common,
            "unit": "all images of one client (DP-FedAvg, server-side fixed clipping)",
            "accountant": "Flower's RdpAccountant (flwr[dp]), no amplification by sampling",
            "noise-multiplier": strategy.noise,
            "noise-stdv": dp.client_noise_stdv(
                strategy.noise, config.cvae_dp_clip, strategy.num_sampled_clients
            ),
            "clients-per-round": strategy.num_sampled_clients,
            "epsilon-per-round": rounds,
            "epsilon": rounds[-1]["epsilon"] if rounds else 0.0,
        }
    rounds = []
    for server_round in sorted(strategy.train_log):
        clients = strategy.train_log[server_round].per_client
        epsilons = [float(c["dp-epsilon"]) for c in clients]
        rounds.append(
            {
                "round": server_round,
                "epsilon-max": max(epsilons, default=None),
                "epsilon-mean": sum(epsilons) / len(epsilons) if epsilons else None,
                "per-client": [
                    {
                        PARTITION_ID: int(c[PARTITION_ID]),
                        "epsilon": float(c["dp-epsilon"]),
                        "noise-multiplier": float(c["dp-noise"]),
                        "sample-rate": float(c["dp-sample-rate"]),
                        "steps": int(c["dp-steps"]),
                    }
                    for c in clients
                ],
            }
        )
    return {
        **common,
        "unit": "one training image of one client (DP-SGD, Opacus)",
        "accountant": "Opacus' RDP accountant, per client, cumulative over rounds",
        "noise-multiplier": config.cvae_dp_noise or "derived per client from the budget",
        "epsilon-per-round": rounds,
        # the run's guarantee is its worst client's
        "epsilon": rounds[-1]["epsilon-max"] if rounds else 0.0,
    }


# ------------------------------------------------------------------ the audit phase


def audit_skipped(config: AppConfig) -> str | None:
    """Why this run's CVAE cannot be audited, or ``None``."""
    if not config.privacy_audit:
        return "privacy-audit = false"
    if not config.binarized:
        return "the audit's Hamming distances need binarized images (binarize='off' here)"
    if config.client_split_refresh != "once":
        return (
            "client-split-refresh='every-round' trains the CVAE on every image of a client "
            "over its rounds: no held-out image is left to compare with"
        )
    return None


def privacy_section(answers: list[PrivacyAnswer], failures: list[dict]) -> dict:
    """The ``privacy`` section: the clients' audits pooled, each attack's AUC over clients,
    and per client its main numbers."""
    edges = {
        "histogram-bin-edges": [int(e) for e in privacy.BIN_EDGES],
        "ratio-bin-edges": [float(e) for e in privacy.RATIO_BIN_EDGES],
    }
    audits = [{**answer.audit, **edges} for answer in answers]
    attacks = {
        attack: privacy.aggregate_auc([answer.aucs.get(attack) for answer in answers])
        for attack in PrivacyAnswer.ATTACKS
    }
    per_client = [
        {
            PARTITION_ID: answer.partition_id,
            "synthetic-images": answer.audit["synthetic-images"],
            "train-images": answer.audit["train-images"],
            "heldout-images": answer.audit["heldout-images"],
            "flagged-share": answer.audit["flagged-share"],
            "flagged-share-reference": answer.audit["flagged-share-reference"],
            "exact-copies": answer.audit["exact-copies"],
            "closest-train-distances": answer.audit["closest-train-distances"],
            **{f"auc-{attack}": answer.aucs.get(attack) for attack in PrivacyAnswer.ATTACKS},
        }
        for answer in sorted(answers, key=lambda a: a.partition_id)
    ]
    return {
        "held-out": HELDOUT_NOTE,
        "distance": privacy.DISTANCE_NOTE,
        "note": TRUST_NOTE,
        "audit": privacy.aggregate_audits(audits),
        "membership-inference": attacks,
        "per-client": per_client,
        "failures": failures,
    }
