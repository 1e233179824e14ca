"""A client's local classifier epoch, today's loop against faster variants, side by side.

One process, one torch thread (as in a Ray actor), one client's worth of real digits
(``--images`` of the bundled mnist-5k, 600 = full MNIST over 100 clients). Every
variant trains the same seeded ExquisiteNetV1 for one epoch with the app's own loop
(:func:`fedaug_flwr.training.train`), the variants alternating within each repeat so
that a drift in the machine's speed hits all of them alike. Variants:

- ``today``: the optimiser as the app built it before this benchmark (``foreach``),
  contiguous (NCHW) tensors;
- ``fused``: the optimiser's fused CPU kernel (``fused=True``);
- ``channels-last``: the model's 4-d weights and activations in NHWC;
- ``fused + channels-last``;
- ``compiled``: the fused channels-last model compiled as ``clf-compile`` compiles it
  (:func:`fedaug_flwr.node.compiled`: Inductor, torch's own dropout kernel); the first
  epoch (which compiles) is reported on its own as ``compile-s``;
- ``cuda-graphs``: the fused channels-last model compiled with ``mode="reduce-overhead"``,
  which records the compiled forward and backward passes as CUDA graphs and replays them
  (on a CPU it is Inductor's default compile again; torch.compile takes a mode or
  options, not both, so this variant keeps Inductor's own random kernels).

``--device cuda`` runs every variant on the GPU (the data and the model there, the
clock stopped only after the device has finished); the float64 reference gradient is
always computed on the CPU. On a GPU the float32 gradient error includes what
PyTorch's TF32 defaults for convolutions cost (recorded in ``settings``).

Both optimisers the app offers are measured: Adam, batch 32 (the paper) and SGD with
momentum, batch 10 (its authors' code). Reported per variant: images per second (the
median over the repeats), the speed-up over ``today``, the epoch's mean loss next to
``today``'s, and how exact the variant's forward/backward pass is: the relative
distance of one batch's float32 gradient from the same batch's float64 gradient
(``gradient-error``; ``today`` shows what float32 rounding alone costs). A variant the
app may adopt must compute today's numbers within float tolerance.

``--run-seconds`` turns the speed-ups into a paper-scale run: the classifier's local
epochs' share of it and what compiling once per actor costs there.

    python -m bench.local_epoch --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    median,
    print_table,
    ratio,
    save_results,
)
from fedaug_flwr import node
from fedaug_flwr.data import load_mnist5k
from fedaug_flwr.models import ExquisiteNetV1, classifier_loss
from fedaug_flwr.training import TensorData, seed_for, train


@dataclass(frozen=True)
class Variant:
    name: str
    fused: bool
    channels_last: bool
    compiled: bool = False
    compile_mode: str | None = None  # torch.compile's mode: None is its default

    def compile(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.compile_mode is None:  # what the app runs with clf-compile
            return node.compiled(model, node.COMPILE_BACKEND)
        return torch.compile(model, mode=self.compile_mode)  # type: ignore[return-value]


VARIANTS = (
    Variant("today", fused=False, channels_last=False),
    Variant("fused", fused=True, channels_last=False),
    Variant("channels-last", fused=False, channels_last=True),
    Variant("fused + channels-last", fused=True, channels_last=True),
    Variant("compiled", fused=True, channels_last=True, compiled=True),
    Variant(
        "cuda-graphs", fused=True, channels_last=True, compiled=True, compile_mode="reduce-overhead"
    ),
)
VARIANT_NAMES = [v.name for v in VARIANTS]
OPTIMISERS = {  # name -> (batch size, build(parameters, fused))
    "adam": (32, lambda params, fused: _adam(params, fused)),
    "sgd": (10, lambda params, fused: _sgd(params, fused)),
}


def _adam(params, fused: bool) -> torch.optim.Optimizer:
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.Adam(params, lr=1e-3, **kind)


def _sgd(params, fused: bool) -> torch.optim.Optimizer:
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.SGD(params, lr=0.01, momentum=0.5, **kind)


def client_data(images: int, seed: int, device: torch.device | str = "cpu") -> TensorData:
    """``images`` binarized real digits of the bundled mnist-5k, a seeded choice, on ``device``."""
    pool = load_mnist5k().pool
    chosen = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:images]
    data = TensorData.from_digits(pool)
    return TensorData(data.images[chosen].to(device), data.labels[chosen].to(device))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def channels_last(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last)


def gradient_error(variant: Variant, initial: nn.Module, data: TensorData) -> float:
    """||g32 - g64|| / ||g64|| for one batch of 32, in training mode but without dropout:
    the arithmetic alone (that the compiled model draws the uncompiled masks is
    tests/test_compile.py's). The float64 gradient is computed on the CPU, the float32
    one where ``data`` lies."""
    device = data.images.device
    images, labels = data.images[:32], data.labels[:32]

    def gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        forward = variant.compile(model) if variant.compiled else model
        classifier_loss(forward, images, labels).backward()
        return torch.cat([p.grad.double().cpu().flatten() for p in model.parameters()])

    exact_model = copy.deepcopy(initial).double()
    exact_model.train()
    for module in exact_model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    classifier_loss(exact_model, images.cpu().double(), labels.cpu()).backward()
    exact = torch.cat([p.grad.flatten() for p in exact_model.parameters()])
    model = copy.deepcopy(initial).to(device)
    if variant.channels_last:
        model = channels_last(model)
    rounded = gradient(model, images, labels)
    return float((rounded - exact).norm() / exact.norm())


class Runner:
    """One variant's model and optimiser, built once (as the app reuses them per actor)."""

    def __init__(
        self, variant: Variant, optimiser: str, initial: nn.Module, device: torch.device
    ) -> None:
        self.variant = variant
        self.device = device
        self.batch_size, build = OPTIMISERS[optimiser]
        model = copy.deepcopy(initial).to(device)
        self.model = channels_last(model) if variant.channels_last else model
        self.initial = copy.deepcopy(self.model.state_dict())
        self.build_optimiser = lambda: build(self.model.parameters(), variant.fused)
        self.forward = variant.compile(self.model) if variant.compiled else self.model

    def epoch(self, data: TensorData, seed: int) -> tuple[float, float]:
        """(seconds, mean loss) of one local epoch from the same initial weights."""
        self.model.load_state_dict(self.initial)
        optimiser = self.build_optimiser()
        forward = self.forward

        def loss_fn(_model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
            return classifier_loss(forward, images, labels)

        torch.manual_seed(seed)  # dropout
        start = time.perf_counter()
        loss = train(self.model, data, loss_fn, optimiser, 1, self.batch_size, seed)
        synchronize(self.device)
        return time.perf_counter() - start, loss


def measure(
    optimiser: str,
    images: int,
    repeats: int,
    variants: Sequence[Variant],
    device: torch.device | str = "cpu",
) -> list[dict]:
    device = torch.device(device)
    data = client_data(images, seed=1, device=device)
    with torch.random.fork_rng():
        torch.manual_seed(seed_for(0, 1))
        initial = ExquisiteNetV1()
    runners = [Runner(v, optimiser, initial, device) for v in variants]
    first: dict[str, float] = {}
    for runner in runners:  # a warm-up epoch each (compiles the compiled variant)
        first[runner.variant.name], _ = runner.epoch(data, seed=2)
    seconds: dict[str, list[float]] = {r.variant.name: [] for r in runners}
    losses: dict[str, float] = {}
    for _ in range(repeats):
        for runner in runners:
            elapsed, loss = runner.epoch(data, seed=2)
            seconds[runner.variant.name].append(elapsed)
            losses[runner.variant.name] = loss
    today = median(seconds["today"])
    rows = []
    for runner in runners:
        name = runner.variant.name
        epoch_s = median(seconds[name])
        rows.append(
            {
                "optimiser": optimiser,
                "variant": name,
                "device": device.type,
                "epoch-s": epoch_s,
                "images-per-s": round(images / epoch_s, 1),
                "speed-up": ratio(today, epoch_s),
                "compile-s": round(first[name] - epoch_s, 1) if runner.variant.compiled else None,
                "loss": round(losses[name], 6),
                "loss-today": round(losses["today"], 6),
                "gradient-error": float(f"{gradient_error(runner.variant, initial, data):.2g}"),
            }
        )
    return rows


def whole_run(rows: list[dict], run_seconds: float, share: float, actors: int) -> list[dict]:
    """What each variant would make of a paper-scale run of ``run_seconds`` whose local
    classifier epochs take ``share`` of it, compile time paid once per actor (in parallel)."""
    estimates = []
    for row in rows:
        epochs = run_seconds * share / row["speed-up"]
        total = run_seconds * (1 - share) + epochs + (row["compile-s"] or 0.0)
        estimates.append(
            {
                "optimiser": row["optimiser"],
                "variant": row["variant"],
                "run-s": round(total),
                "speed-up": ratio(run_seconds, total),
                "actors": actors,
            }
        )
    return estimates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.local_epoch", description=__doc__)
    parser.add_argument("--images", type=int, default=600, help="one client's images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--optimisers", nargs="+", default=list(OPTIMISERS))
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANT_NAMES, help="only these (default: all)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--run-seconds", type=float, default=2940.0, help="a paper-scale run")
    parser.add_argument("--share", type=float, default=0.9, help="its local-epoch share")
    parser.add_argument("--output", default=str(RESULTS_DIR / "local_epoch.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.variants and "today" not in args.variants:
        parser.error("--variants must include 'today' (the speed-ups are over it)")
    variants = [
        v
        for v in VARIANTS
        if not (args.no_compile and v.compiled) and (not args.variants or v.name in args.variants)
    ]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    before = load_average()
    rows: list[dict] = []
    for optimiser in args.optimisers:
        rows += measure(optimiser, args.images, args.repeats, variants, device)
    print_table("one local epoch, one thread", rows, list(rows[0]))
    estimates = whole_run(rows, args.run_seconds, args.share, actors=2)
    print_table("a paper-scale run, estimated", estimates, list(estimates[0]))
    results = {
        "benchmark": "local-epoch",
        "machine": machine_info(),
        "load-average-before": before,
        "load-average-after": load_average(),
        "settings": {
            **vars(args),
            "torch-threads": torch.get_num_threads(),
            "cudnn-allow-tf32": torch.backends.cudnn.allow_tf32,
            "cuda-matmul-allow-tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        "variants": rows,
        "paper-scale-run": estimates,
    }
    save_results(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
