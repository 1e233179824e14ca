"""``clf-compile``: the clients' local classifier epochs run a ``torch.compile``d model.

Two things are checked apart, so that the suite never spends minutes compiling C++:

- the wiring, through the real ServerApp and ClientApp in this process, with Dynamo's
  cheapest backend in place of Inductor (``node.COMPILE_BACKEND``): the compiled forward
  is what trains, it is compiled in the first round only, and the run's numbers stay
  within float rounding of the uncompiled run's;
- Inductor's numbers, on a reduced ExquisiteNet (the same layer kinds, one stage
  instead of five: it compiles in seconds with a warm Inductor cache, and in about a
  fifth of the full model's time cold): one batch's float32 gradient against the float64
  one, as ``bench.local_epoch`` measures it on the full model, dropout's masks against
  the uncompiled model's, the graph kept across weight loads, and a batch's numbers
  independent of the batch sizes compiled for before.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from fedaug_flwr import node
from fedaug_flwr.config import AppConfig
from fedaug_flwr.models import ExquisiteNetV1, classifier_loss
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.training import TensorData, evaluate_classifier, seed_for, seeded
from tests.conftest import TINY
from tests.test_performance import SMALL_RUN, run_app_in_process, split_of


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No compiled graph from elsewhere counts here, and none of ours stays behind (one
    torch thread, as in a simulation actor)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    node.compiled.cache_clear()
    counters.clear()
    yield
    torch._dynamo.reset()
    node.compiled.cache_clear()
    torch.set_num_threads(threads)


def nchw_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    return torch.empty(tensor.shape).stride()


def nhwc_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    return torch.empty(tensor.shape, memory_format=torch.channels_last).stride()


def frames_compiled() -> int:
    return counters["frames"]["ok"]


# ----------------------------------------------------------------------- the wiring


def test_compiled_local_epochs_run_through_the_app_and_compile_in_round_one_only(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(node, "COMPILE_BACKEND", "eager")  # Dynamo's graphs, no C++
    compiled_by_round: dict[int, list[int]] = {}
    train_classifier = node.train_classifier

    def counted(task, training_set, weights, server_round, *args, **kwargs):
        result = train_classifier(task, training_set, weights, server_round, *args, **kwargs)
        compiled_by_round.setdefault(server_round, []).append(frames_compiled())
        return result

    monkeypatch.setattr(node, "train_classifier", counted)
    # two classifier rounds; the server's own classifiers (generator quality) and the
    # privacy audit are no part of this
    base = {**SMALL_RUN, "clf-rounds": 2, "quality-samples": 0, "privacy-audit": False}
    compiled_run = run_app_in_process(
        {**base, "clf-compile": True, "output-dir": str(tmp_path / "compiled")}, num_nodes=3
    )
    assert compiled_run["config"]["clf-compile"] is True
    first, second = compiled_by_round[1], compiled_by_round[2]
    assert len(first) == len(second) == 3  # every client trained in both rounds
    # the compiled forward trained (a symbolic batch size: a graph per range of sizes the
    # guards tell apart, two here), and the second round reused them: nothing compiled anew
    assert 1 <= first[-1] <= 3
    assert second == [first[-1]] * 3

    counters.clear()
    plain_run = run_app_in_process({**base, "output-dir": str(tmp_path / "plain")}, num_nodes=3)
    assert frames_compiled() == 0 and plain_run["config"]["clf-compile"] is False
    # the same run but for float rounding: the same seeds, batches and dropout masks, but
    # channels-last kernels (eager ones here, which round worse than Inductor's) and fused
    # Adam. Round 1 shows it; later rounds of this tiny, far from converged training
    # amplify rounding into other predictions, so they are only checked to be finite.
    got, expected = compiled_run["classifier"]["rounds"], plain_run["classifier"]["rounds"]
    assert got[0]["train"]["train-loss"] == pytest.approx(
        expected[0]["train"]["train-loss"], rel=1e-2
    )
    assert got[0]["global-test"]["loss"] == pytest.approx(
        expected[0]["global-test"]["loss"], rel=1e-2
    )
    assert got[0]["global-test"]["accuracy"] == pytest.approx(
        expected[0]["global-test"]["accuracy"], abs=0.02
    )
    assert all(math.isfinite(row["global-test"]["loss"]) for row in got)
    assert math.isfinite(compiled_run["final"]["clients"]["loss"])


def test_compiled_training_sends_back_ordinary_weights_and_evaluates_uncompiled(monkeypatch):
    monkeypatch.setattr(node, "COMPILE_BACKEND", "eager")
    app = AppConfig.from_run_config({**TINY, "clf-compile": True})
    task = TaskConfig(app, "mnist-5k", "")
    split = split_of(task, 2)
    weights = seeded(1, 2, ExquisiteNetV1)
    trained, loss = node.train_classifier(
        task, TensorData.from_digits(split.train), weights, 1, 2, epochs=1
    )
    assert frames_compiled() >= 1 and loss > 0
    # the training model is channels-last; what it sends is not. (Every 4-d weight of
    # ExquisiteNet has one input channel or a 1x1 kernel, so both layouts count as
    # "contiguous": the strides tell them apart.)
    training_model = node.reusable_model(
        node.channels_last_classifier, trained, torch.device("cpu")
    )
    four_d = {n: w for n, w in training_model.state_dict().items() if w.dim() == 4}
    assert all(w.stride() == nhwc_strides(w) for w in four_d.values())
    assert any(nhwc_strides(w) != nchw_strides(w) for w in four_d.values())
    assert list(trained) == list(weights)
    assert all(t.dtype == weights[k].dtype for k, t in trained.items())
    assert all(t.stride() == nchw_strides(t) for t in trained.values())
    # evaluation uses the ordinary model and compiles nothing
    before = frames_compiled()
    metrics = node.evaluate_on_test(task, split, trained)
    assert frames_compiled() == before
    reference = ExquisiteNetV1()
    reference.load_state_dict(trained)
    assert metrics == evaluate_classifier(
        reference, TensorData.from_digits(split.test), app.eval_batch_size
    )


# --------------------------------------------------------------- Inductor's numbers


class ReducedNet(ExquisiteNetV1):
    """ExquisiteNetV1's layer kinds (max-pool, 1x1 and depthwise convolutions, batch-norm,
    ReLU, Hardswish, squeeze-excite, dropout, the head) with one stage instead of five:
    Inductor compiles it in about a fifth of the full model's time."""

    STAGES = (12,)


def reduced_net() -> ReducedNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed_for(0, 1))
        return ReducedNet()


def one_batch() -> tuple[torch.Tensor, torch.Tensor]:
    task = TaskConfig(AppConfig.from_run_config(TINY), "mnist-5k", "")
    data = TensorData.from_digits(split_of(task, 2).train)
    return data.images[:32], data.labels[:32]


def gradient(model: nn.Module, forward, images, labels, dropout: bool) -> torch.Tensor:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout) and not dropout:
            module.eval()
    classifier_loss(forward, images, labels).backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def channels_last_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def test_inductor_gradient_is_as_exact_as_the_uncompiled_one():
    """bench.local_epoch's check (dropout off) on the reduced net: the compiled,
    channels-last float32 gradient lies as close to the float64 one as float32 rounding
    puts today's (both ~1e-6 here). It catches compiled numerics that are wrong (a
    mask, batch statistics, a layout mix-up give errors of percents); the full model's
    layout-specific rounding (channels-last without compiling: 3.9e-3 there, 1e-6 on
    this net) is bench.local_epoch's to measure."""
    images, labels = one_batch()
    initial = reduced_net()
    exact_model = copy.deepcopy(initial).double()
    exact = gradient(exact_model, exact_model, images.double(), labels, dropout=False)
    today_model = copy.deepcopy(initial)
    today = relative(gradient(today_model, today_model, images, labels, dropout=False), exact)
    model = channels_last_copy(initial)
    compiled = node.compiled(model, node.COMPILE_BACKEND)
    error = relative(gradient(model, compiled, images, labels, dropout=False), exact)
    assert node.COMPILE_BACKEND == "inductor" and frames_compiled() == 1
    assert today < 1e-5 and error < 1e-5, (error, today)


def test_inductor_keeps_its_graph_for_new_weights_and_draws_the_uncompiled_dropout_masks():
    """As in an actor: one compiled model, other weights loaded into it in place (the next
    round's, another client's). With dropout on and a seed, the compiled step computes
    the uncompiled model's loss gradient (float rounding apart: the same dropout mask),
    the same numbers again for the same seed, and it compiled once."""
    images, labels = one_batch()
    model = channels_last_copy(reduced_net())
    compiled = node.compiled(model, node.COMPILE_BACKEND)
    for weights_seed in (3, 4):
        weights = seeded(weights_seed, 2, ReducedNet)
        model.load_state_dict(weights)  # as node.reusable_model does
        today_model = ReducedNet()
        today_model.load_state_dict(weights)
        torch.manual_seed(7)
        today = gradient(today_model, today_model, images, labels, dropout=True)
        steps = []
        for _ in range(2):
            model.load_state_dict(weights)  # batch-norm statistics as received
            model.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            steps.append(gradient(model, compiled, images, labels, dropout=True))
        assert torch.equal(steps[0], steps[1])
        assert relative(steps[0], today) < 1e-5
    assert frames_compiled() == 1


def test_inductor_rounds_a_batch_alike_whichever_batches_came_before():
    """A batch's gradient does not depend on the batch sizes a process compiled for
    before (in a simulation, on which clients an actor served first): a run is
    reproducible for its seed."""
    images, labels = one_batch()
    initial = reduced_net()
    gradients = []
    for sizes in ((32, 4), (4, 32)):  # two processes' histories
        torch._dynamo.reset()
        model = channels_last_copy(initial)
        compiled = node.compiled(model, node.COMPILE_BACKEND)
        seen = {}
        for size in sizes:
            model.load_state_dict(initial.state_dict())
            model.zero_grad(set_to_none=True)
            seen[size] = gradient(model, compiled, images[:size], labels[:size], dropout=False)
        gradients.append(seen)
    assert torch.equal(gradients[0][4], gradients[1][4])
    assert torch.equal(gradients[0][32], gradients[1][32])
