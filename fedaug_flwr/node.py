"""A client node's work, independent of Flower messages: its data, its synthetic
images, and each task (train CVAE, impute, train / evaluate the classifier).

With ``cvae-dp = "sample"`` the CVAE's local epochs run DP-SGD
(:func:`fedaug_flwr.dp.train_private`) and the reply adds the client's cumulative
epsilon; :func:`audit_privacy` measures what the global CVAE reveals about the
client's training images (statistics only).

Everything is derived from (config, node config, seed), so a restarted node
computes the same split; only the synthetic images, which depend on the
global CVAE, are kept between messages (in the caller's ``context.state``).

A node's data comes from its node config (``flower-supernode --node-config``):

- ``partition-id=<i> data-path='<file or folder>'``: the node's own digits (see
  :data:`fedaug_flwr.data.NODE_DATA_FORMATS`), split 80/10/10 (val-fraction,
  test-fraction) with the run seed; ``i`` is then the node's number in the
  results (and part of its seeds);
- ``partition-id=<i> num-partitions=<n>``: Dirichlet partition ``i`` of the
  run's dataset, as in simulation.

Every SuperNode of a federation needs its own partition id.

A simulation actor serves hundreds of messages per round, so per-message
costs that do not change the result are paid once per process: the data and
partition (cached in ``data`` and ``partition``) and the model objects
(:func:`reusable_model`), whose every weight and buffer is overwritten by
``load_state_dict`` before use. With ``clf-compile`` the classifier's local epochs run a
``torch.compile``d forward of its own channels-last model, compiled once per process
(:func:`compiled`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedaug_flwr import dp, privacy
from fedaug_flwr.data import NUM_CLASSES, Digits, label_counts, load_node_data, load_source
from fedaug_flwr.imputation import generate, synthetic_labels
from fedaug_flwr.models import CVAE, ExquisiteNetV1, classifier_loss, cvae_loss
from fedaug_flwr.partition import ClientSplit, PartitionError, client_split, split_train_val_test
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.training import (
    TensorData,
    evaluate_classifier,
    evaluate_loss,
    frozen_parameters,
    proximal_penalty,
    seed_for,
    train,
)

StateDict = Mapping[str, torch.Tensor]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


NODE_CONFIG_KEYS = {
    "partition-id": "an integer >= 0, different on every SuperNode",
    "num-partitions": "an integer >= 1 (needed without data-path)",
    "data-path": "the node's own data: an .npz file or an IDX folder (absolute path)",
}


class NodeConfigError(ValueError):
    """A SuperNode's node config is missing a key, has an unknown one, or a bad value."""


@dataclass(frozen=True)
class NodeConfig:
    """What a SuperNode was told about its data, checked."""

    partition_id: int
    num_partitions: int
    data_path: str = ""

    @property
    def own_data(self) -> bool:
        return bool(self.data_path)


def parse_node_config(node_config: Mapping[str, object]) -> NodeConfig:
    """Check a node config and say what is allowed when it is wrong."""
    allowed = "; ".join(f"{key}: {rule}" for key, rule in NODE_CONFIG_KEYS.items())
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise NodeConfigError(f"unknown node-config key(s) {unknown}; allowed: {allowed}")
    for key in ("partition-id", "num-partitions"):
        value = node_config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise NodeConfigError(
                f"node-config '{key}' must be {NODE_CONFIG_KEYS[key]}; "
                f"got {value!r} ({type(value).__name__})"
            )
    data_path = node_config.get("data-path", "")
    if not isinstance(data_path, str):
        raise NodeConfigError(
            "node-config 'data-path' must be a quoted path string, e.g. "
            f"data-path='/data/site.npz'; got {data_path!r} ({type(data_path).__name__})"
        )
    partition_id = node_config.get("partition-id")
    num_partitions = node_config.get("num-partitions")
    if data_path and num_partitions is None:
        num_partitions = 1  # not used with the node's own data
    if partition_id is None or num_partitions is None:
        raise NodeConfigError(
            "node config needs partition-id and either num-partitions (a Dirichlet partition) "
            "or data-path (the node's own data), e.g. flower-supernode --node-config "
            '"partition-id=0 num-partitions=3" or "partition-id=0 data-path=\'/data/site.npz\'"; '
            f"got {dict(node_config)}"
        )
    if num_partitions < 1:
        raise NodeConfigError(f"node-config 'num-partitions' must be >= 1; got {num_partitions}")
    if partition_id < 0 or (not data_path and partition_id >= num_partitions):
        raise NodeConfigError(
            f"node-config 'partition-id' must lie in 0..num-partitions-1 "
            f"(0..{num_partitions - 1}); got {partition_id}"
        )
    return NodeConfig(partition_id, num_partitions, data_path)


_MODELS: dict[tuple, nn.Module] = {}


def reusable_model(
    build: Callable[..., nn.Module], weights: StateDict, run_on: torch.device, *args: int
) -> nn.Module:
    """``build(*args)`` on ``run_on`` holding ``weights``; built once per process, then reused.

    Building ExquisiteNetV1 costs ~12 ms of CPU (random initialisation that
    ``load_state_dict`` overwrites at once), twice per client and round. The
    load is strict, so every parameter and buffer comes from ``weights``; the
    random draws the building made came before each task seeds torch, so
    results do not change. Handlers in one process run one at a time.
    """
    key = (build, str(run_on), *args)
    model = _MODELS.get(key)
    if model is None:
        model = _MODELS[key] = build(*args).to(run_on)
    model.load_state_dict(weights)
    return model


def detached_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as tensors of its own (the model object is reused), each
    contiguous: a channels-last model's (``clf-compile``) 4-d weights come back in the
    ordinary layout, as every other model's do."""
    return {
        name: tensor.detach().clone(memory_format=torch.contiguous_format)
        for name, tensor in model.state_dict().items()
    }


# torch.compile's backend for the classifier's local epochs (``clf-compile``): Inductor, the
# variant bench.local_epoch measured. Tests put a cheap one here (Dynamo's "eager") to check
# the wiring without minutes of C++ compilation.
COMPILE_BACKEND = "inductor"


def channels_last_classifier() -> ExquisiteNetV1:
    """ExquisiteNetV1 with its 4-d weights in NHWC order, the layout Inductor's kernels
    were measured fastest with (``load_state_dict`` copies into it, keeping the layout)."""
    return ExquisiteNetV1().to(memory_format=torch.channels_last)


@cache
def compiled(model: nn.Module, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(model)``, once per model object and backend: the process's one
    training model (:func:`reusable_model`) gets one compiled forward, which its later
    messages reuse (weights are loaded into the same parameters, which the compiled graph
    takes as inputs). Only training calls it: a model in eval mode would compile anew.

    The batch size is symbolic from the first call on (``maybe_mark_dynamic``), so a
    process compiles a few graphs, one per range of batch sizes that the backend's guards
    tell apart (2-15 and 16 up with Dynamo's eager backend; 2-20 and 21 up seen with
    Inductor), all in its first messages, whatever sizes a round's last batches have;
    later rounds and clients compile nothing (tests/test_compile.py counts them over two
    rounds; loading weights with ``assign=True``, which swaps in NCHW tensors, would
    recompile in round 2). Left to Dynamo, the first batch size would get a graph of its
    own until a second size turned up, so which graph ran a batch, and its rounding,
    would depend on the clients a process happened to serve first.

    ``fallback_random``: Inductor leaves dropout to torch's own kernel, which draws the
    mask from torch's generator as the uncompiled model does; its own random kernels would
    draw other masks. So a compiled run is deterministic for a seed and draws the same
    dropout masks as an uncompiled one; its numbers differ by float rounding only."""
    options = {"fallback_random": True} if backend == "inductor" else None
    compiled_model = torch.compile(model, backend=backend, options=options)

    def forward(images: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(images, 0)
        return compiled_model(images)

    return forward


@cache
def _own_data(path: str, binarized: bool) -> Digits:
    return load_node_data(path, binarized)


# Salts of the reshuffled split (client-split-refresh = every-round): the split a client
# trains on in a round, and the one it evaluates a round's global model on, are drawn apart,
# as the study's code builds a new, reshuffled client dataset for each.
TRAIN_SPLIT, EVALUATE_SPLIT = 8, 9


def reshuffle_key(task: TaskConfig, server_round: int, purpose: int) -> tuple[int, int] | None:
    """What the split of this message is drawn from: ``None`` for the client's fixed split."""
    if task.app.client_split_refresh == "once":
        return None
    return (server_round, purpose)


def own_split(
    task: TaskConfig,
    digits: Digits,
    partition_id: int,
    where: str,
    reshuffle: tuple[int, int] | None = None,
) -> ClientSplit:
    """A node's own data cut into train / val / test with the run seed."""
    app = task.app
    if len(digits) < app.min_partition_size:
        raise PartitionError(
            f"{where} holds {len(digits)} images, fewer than min-partition-size="
            f"{app.min_partition_size}: too small to split into train/val/test"
        )
    rng = np.random.default_rng([app.seed, partition_id, *(reshuffle or ())])
    train_index, val_index, test_index = split_train_val_test(
        len(digits), app.val_fraction, app.test_fraction, rng
    )
    return ClientSplit(
        partition_id=partition_id,
        train=digits.subset(train_index),
        val=digits.subset(val_index),
        test=digits.subset(test_index),
    )


def load_split(
    task: TaskConfig,
    node_config: Mapping[str, object],
    reshuffle: tuple[int, int] | None = None,
) -> ClientSplit:
    """This node's real train / val / test data, from its own files or a Dirichlet partition.

    ``reshuffle`` (from :func:`reshuffle_key`) draws the 80/10/10 split anew for one
    round and purpose; ``None`` gives the client's fixed split.
    """
    config = parse_node_config(node_config)
    if config.own_data:
        path = str(Path(config.data_path).expanduser().resolve())
        digits = _own_data(path, task.app.binarized)
        return own_split(task, digits, config.partition_id, f"data-path {path!r}", reshuffle)
    app = task.app
    return client_split(
        load_source(task.data_source, task.data_location, app.binarized).pool,
        partition_id=config.partition_id,
        num_partitions=config.num_partitions,
        beta=app.dirichlet_beta,
        seed=app.seed,
        min_partition_size=app.min_partition_size,
        val_fraction=app.val_fraction,
        test_fraction=app.test_fraction,
        max_draws=app.partition_max_draws,
        reshuffle=reshuffle,
    )


def split_for(
    task: TaskConfig, node_config: Mapping[str, object], server_round: int, purpose: int
) -> ClientSplit:
    """This node's split for a message of ``server_round``: drawn anew per round and
    ``purpose`` with ``client-split-refresh`` every-round, else the client's fixed split."""
    return load_split(task, node_config, reshuffle_key(task, server_round, purpose))


def fedavg_weight(task: TaskConfig, split: ClientSplit, synthetic: int = 0) -> int:
    """This client's weight in FedAvg (``fedavg-weights``): all its real images (the
    study's code weights by a client's whole real partition, never its synthetic
    images), or the images it trained on, real and synthetic."""
    if task.app.fedavg_weights == "real":
        return len(split.train) + len(split.val) + len(split.test)
    return len(split.train) + synthetic


def cvae_weight(task: TaskConfig, split: ClientSplit) -> int:
    """This client's weight in the CVAE's FedAvg: 1 for every client under client-level DP
    (Flower's noise is calibrated to a uniform mean of the clipped updates), else
    :func:`fedavg_weight`."""
    return 1 if task.app.cvae_dp == "client" else fedavg_weight(task, split)


@dataclass(frozen=True)
class ImputationReport:
    real_label_counts: list[int]
    synthetic_label_counts: list[int]
    synthetic: Digits


def impute(
    task: TaskConfig,
    split: ClientSplit,
    generator_weights: StateDict,
    server_round: int | None = None,
) -> ImputationReport:
    """Generate this client's k synthetic images with the global CVAE, in batches.

    ``server_round``: the classifier round these images are for when they are made
    anew every round (``synthetic-refresh``); ``None`` for the one imputation.
    """
    app = task.app
    real_counts = split.train.label_counts()
    anew = () if server_round is None else (server_round,)
    rng = np.random.default_rng([app.seed, split.partition_id, 1, *anew])
    labels = synthetic_labels(
        app.imputation, app.synthetic_per_client, real_counts, rng, app.minority_rounding
    )
    run_on = device()
    cvae = reusable_model(CVAE, generator_weights, run_on, app.cvae_latent_dim)
    images = generate(
        cvae,
        labels,
        seed=seed_for(app.seed, split.partition_id, 2, *anew),
        batch_size=app.generation_batch_size,
        device=run_on,
        binarize=app.synthetic_binarize,
    )
    synthetic = synthetic_images(task, images, labels)
    return ImputationReport(real_counts, label_counts(labels), synthetic)


def synthetic_images(task: TaskConfig, images: np.ndarray, labels: np.ndarray) -> Digits:
    """A node's synthetic images as :class:`Digits`, e.g. rebuilt from the arrays kept in
    ``context.state``: binary or grey levels as the run config says (``binarize``), which
    is what they were generated as (``synthetic-binarize`` is "off" exactly when the real
    images are grey), so nothing but the arrays needs keeping."""
    return Digits(np.asarray(images), np.asarray(labels), grey=not task.app.binarized)


def adam(
    model: nn.Module, lr: float, weight_decay: float = 0.0, fused: bool = False
) -> torch.optim.Adam:
    """Adam over all parameters at once (``foreach``): on CPU the same numbers as
    torch's default per-parameter loop, bit for bit, for ~10% less time per
    ExquisiteNet step (on CUDA it is torch's default anyway). ``fused``: torch's fused
    kernel instead, whose steps differ from ``foreach`` in the last bit."""
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **kernel)


def classifier_optimizer(task: TaskConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The classifier's local optimizer (``clf-optimizer``): Adam, as the paper writes, or
    SGD with momentum, as its authors' code ran (no weight decay there unless set)."""
    app = task.app
    if app.clf_optimizer == "sgd":
        # torch's fused kernel: the same numbers as the ``foreach`` loop, bit for bit,
        # in less time per step (bench.local_epoch, docs/performance.md)
        return torch.optim.SGD(
            model.parameters(),
            lr=app.clf_lr,
            momentum=app.clf_momentum,
            weight_decay=app.clf_weight_decay,
            fused=True,
        )
    # with clf-compile, the compiled variant as measured: fused Adam (its last-bit
    # differences from foreach Adam are within what compiling changes anyway)
    return adam(model, lr=app.clf_lr, weight_decay=app.clf_weight_decay, fused=app.clf_compile)


def train_cvae(
    task: TaskConfig, split: ClientSplit, weights: StateDict, server_round: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Local CVAE epochs on the real training split; returns weights and losses."""
    app = task.app
    run_on = device()
    model = reusable_model(CVAE, weights, run_on, app.cvae_latent_dim)
    torch.manual_seed(seed_for(app.seed, server_round, split.partition_id, 3))

    def loss_fn(m, x, y):
        return cvae_loss(m, x, y, app.cvae_kl_weight, app.cvae_recon_loss)

    data = TensorData.from_digits(split.train, device=run_on)
    seed = seed_for(app.seed, server_round, split.partition_id, 4)
    extra: dict[str, float] = {}
    if app.cvae_dp == "sample":
        noise = sample_dp_noise(task, len(data))  # raises before any step if over budget
        model.train()  # Opacus checks the mode; the reused object may come from an evaluation
        steps_before = (
            (server_round - 1)
            * app.cvae_local_epochs
            * dp.steps_per_epoch(len(data), app.cvae_batch_size)
        )  # the DP-SGD steps of this client's earlier rounds (same size, same noise)
        result = dp.train_private(
            model,
            data,
            loss_fn,
            adam(model, lr=app.cvae_lr),
            epochs=app.cvae_local_epochs,
            batch_size=app.cvae_batch_size,
            seed=seed,
            noise_multiplier=noise,
            max_grad_norm=app.cvae_dp_clip,
            delta=app.cvae_dp_delta,
            prior_steps=max(steps_before, 0),
        )
        train_loss, extra = result.loss, result.metrics()
    else:
        train_loss = train(
            model,
            data,
            loss_fn,
            adam(model, lr=app.cvae_lr),
            epochs=app.cvae_local_epochs,
            batch_size=app.cvae_batch_size,
            seed=seed,
        )
    val_loss = evaluate_loss(
        model, TensorData.from_digits(split.val, device=run_on), loss_fn, app.eval_batch_size
    )
    return detached_copy(model), {"train-loss": train_loss, "val-loss": val_loss, **extra}


def sample_dp_noise(task: TaskConfig, num_images: int) -> float:
    """This client's DP-SGD noise multiplier (``cvae-dp-noise``, or with 0 the smallest that
    keeps ``cvae-dp-epsilon`` over all CVAE rounds); :class:`~fedaug_flwr.dp.PrivacyBudgetError`
    if the given noise would spend more than the budget over all rounds. Only this client
    knows its number of images, so the check runs here, before its first step."""
    app = task.app
    plan = {
        "delta": app.cvae_dp_delta,
        "num_images": num_images,
        "batch_size": app.cvae_batch_size,
        "local_epochs": app.cvae_local_epochs,
        "rounds": app.cvae_rounds,
    }
    if app.cvae_dp_noise == 0:
        return dp.sample_noise_for_budget(target_epsilon=app.cvae_dp_epsilon, **plan)
    if app.cvae_dp_epsilon > 0:
        dp.check_sample_budget(
            target_epsilon=app.cvae_dp_epsilon, noise_multiplier=app.cvae_dp_noise, **plan
        )
    return app.cvae_dp_noise


def heldout_split(split: ClientSplit) -> Digits:
    """The images the CVAE never trained on: the client's validation and test splits (the
    CVAE trains on the training split only; the validation split gives its val-loss, the
    test split the classifier's scores; neither changes the CVAE's weights)."""
    return Digits(
        np.concatenate([split.val.images, split.test.images]),
        np.concatenate([split.val.labels, split.test.labels]),
        split.val.grey,
    )


def audit_privacy(
    task: TaskConfig, split: ClientSplit, generator_weights: StateDict
) -> tuple[dict, dict]:
    """The memorization audit and the membership attacks of :mod:`fedaug_flwr.privacy` on
    this client: as many synthetic images as it has training images, in its training
    label mix, against its training images and its held-out ones (:func:`heldout_split`).
    Returns the audit and the attacks' results (statistics only)."""
    app = task.app
    train_set, heldout = split.train, heldout_split(split)
    counts = privacy.audit_label_counts(train_set.labels, heldout.labels, len(train_set))
    labels = np.repeat(np.arange(NUM_CLASSES), counts)
    run_on = device()
    cvae = reusable_model(CVAE, generator_weights, run_on, app.cvae_latent_dim)
    seed = seed_for(app.seed, split.partition_id, 20) % 2**31  # the attack multiplies it
    synthetic = generate(
        cvae,
        labels,
        seed=seed,
        batch_size=app.generation_batch_size,
        device=run_on,
        binarize=app.synthetic_binarize,
    )
    audit = privacy.memorization_audit(
        synthetic, labels, train_set.images, train_set.labels, heldout.images, heldout.labels
    )
    attacks = privacy.membership_inference(
        cvae,
        (train_set.images, train_set.labels),
        (heldout.images, heldout.labels),
        recon=app.cvae_recon_loss,
        kl_weight=app.cvae_kl_weight,
        binarize=app.synthetic_binarize,
        seed=seed + 1,
    )
    return audit, attacks


def train_classifier(
    task: TaskConfig,
    training_set: TensorData,
    weights: StateDict,
    server_round: int,
    partition_id: int,
    epochs: int,
) -> tuple[dict[str, torch.Tensor], float]:
    """Local ExquisiteNet epochs on (real + synthetic) training data.

    With ``proximal-mu`` > 0 (FedProx) the loss gains ``(mu / 2) ||w - w_received||^2``,
    the received weights kept frozen as they were loaded; the returned loss is the data
    loss alone. ``task`` is the message's config: its ``proximal-mu`` is the value Flower's
    FedProx put there (:data:`~fedaug_flwr.protocol.PROXIMAL_MU`).
    """
    app = task.app
    run_on = training_set.labels.device
    if app.clf_compile:
        # its own model object (channels-last), so evaluation keeps the plain NCHW one
        model = reusable_model(channels_last_classifier, weights, run_on)
        forward = compiled(model, COMPILE_BACKEND)
    else:
        model = forward = reusable_model(ExquisiteNetV1, weights, run_on)

    def loss_fn(_model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # train() switches modes and steps on ``model``; only the forward pass is compiled
        return classifier_loss(forward, images, labels)

    torch.manual_seed(seed_for(app.seed, server_round, partition_id, 5))
    optimizer = classifier_optimizer(task, model)
    penalty = None
    if app.proximal_mu > 0:
        penalty = proximal_penalty(frozen_parameters(model), app.proximal_mu)
    loss = train(
        model,
        training_set,
        loss_fn,
        optimizer,
        epochs=epochs,
        batch_size=app.clf_batch_size,
        seed=seed_for(app.seed, server_round, partition_id, 6),
        penalty=penalty,
    )
    return detached_copy(model), loss


def evaluate_on_test(task: TaskConfig, split: ClientSplit, weights: StateDict) -> dict[str, float]:
    """The classifier's loss, accuracy and macro-F1 on this client's REAL test split.

    Never compiled (``clf-compile`` is for training): a compiled model in eval mode would
    compile a second graph, for one pass over a few dozen test images per message."""
    run_on = device()
    model = reusable_model(ExquisiteNetV1, weights, run_on)
    return evaluate_classifier(
        model, TensorData.from_digits(split.test, device=run_on), task.app.eval_batch_size
    )
