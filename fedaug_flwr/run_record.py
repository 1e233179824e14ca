"""A run's record: its results folder, the time of each phase, ``summary.json`` and
``failure.json``.

The phases hand their sections to the record (:meth:`RunRecord.add`); the
summary lists them in the order of :data:`SECTIONS`, whatever the order they
came in. ``summary.json`` is written last and atomically, so a folder with it
holds a completed run; a run that fails writes ``failure.json`` (the error, the
traceback, the timings so far) instead, never a summary. A write that fails
mid-run (a full disk) fails the run the same way; where not even ``failure.json``
can be written, the error goes to the log and stderr.

The record also keeps the run's checkpoint (:mod:`fedaug_flwr.checkpoint`): the
steps the pipeline marks (:meth:`RunRecord.step`) and the rounds of its FedAvg
phases (:meth:`RunRecord.rounds`) are written to it as they end, and a run started
on a folder with a checkpoint of the same config (:meth:`RunRecord.resume`) takes
them from there.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TypeVar

import torch

from fedaug_flwr import __version__, log
from fedaug_flwr.checkpoint import Checkpoint
from fedaug_flwr.config import AppConfig
from fedaug_flwr.models import weights_digest
from fedaug_flwr.presets import matching_preset
from fedaug_flwr.results import (
    FAILURE,
    SUMMARY,
    ensure_writable,
    resolve_output_dir,
    save_state_dict,
    write_json,
)
from fedaug_flwr.strategies import PhaseProgress, RoundHooks
from fedaug_flwr.training import rng_state, set_rng_state

T = TypeVar("T")

# The sections of summary.json, in their order there (after the run's config).
SECTIONS = (
    "data",  # the data source and sizes, the clients that took part
    "artifacts",  # the files beside summary.json, by name
    "cvae",  # phase 1: per-round CVAE losses (or why it was skipped)
    "pretraining",  # finetune variant: the server's pretraining and the pretrained model
    "generator-quality",  # train on synthetic, test on real, reference, fidelity
    "privacy",  # memorization audit and membership attacks on the clients (or why not)
    "imputation",  # phase 2: what the clients generated, and failures
    "classifier",  # phase 3: per-round metrics of the federated classifier
    "clients",  # per client: data sizes, label counts, final test metrics
    "final",  # the final model's metrics over clients and on the global test set
    "ray-cluster",  # simulation on Ray: its nodes, resources and where the clients ran
)


@dataclass
class RunRecord:
    """Everything a run records, turned into ``summary.json`` at the end."""

    config: AppConfig
    run_id: int
    output_dir: Path
    started: float = field(default_factory=time.time)
    timing: dict[str, float] = field(default_factory=dict)
    sections: dict[str, object] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None  # set by :meth:`resume`
    attempt_started: float = field(default_factory=time.time)  # this attempt, if resumed
    earlier_s: float = 0.0  # seconds the earlier attempts of a resumed run worked
    _carried: dict[str, float] = field(default_factory=dict)  # a resumed phase's seconds
    _phase_started: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(cls, config: AppConfig, run_id: int) -> RunRecord:
        """The record of a new run, with its results folder made and emptied of old results."""
        output_dir = ensure_writable(resolve_output_dir(config.output_dir, run_id))
        for stale in (SUMMARY, FAILURE):  # the folder must describe this run only
            (output_dir / stale).unlink(missing_ok=True)
        log.info("[fedaug] run %s writes its results to %s", run_id, output_dir)
        return cls(config, run_id, output_dir)

    def timed(self, phase: str, work: Callable[[], T]) -> T:
        """``work()``, logged and timed as ``phase`` (``timing-s`` in the summary)."""
        start = self._phase_started[phase] = time.perf_counter()
        log.info("[fedaug] phase '%s' starts", phase)
        try:
            return work()
        finally:
            earlier = self._carried.pop(phase, 0.0)  # before an interruption
            self.timing[phase] = round(time.perf_counter() - start + earlier, 3)
            log.info("[fedaug] phase '%s' took %.1f s", phase, self.timing[phase])

    # ------------------------------------------------------------ the checkpoint

    def resume(self) -> None:
        """Take up the checkpoint in the results folder, if there is one, else start one.

        :class:`~fedaug_flwr.checkpoint.CheckpointError` when it belongs to another
        config or is damaged."""
        config = self.config.to_run_config()
        loaded = Checkpoint.load(self.output_dir, config)
        if loaded is None:
            self.checkpoint = Checkpoint(self.output_dir, config, self.started)
            return
        log.info("[fedaug] resuming run from its checkpoint (%s)", loaded.where())
        loaded.resumed.append(
            {"at": _iso(time.time()), "from": loaded.where(), "run-id": self.run_id}
        )
        self.checkpoint, self.started, self.earlier_s = loaded, loaded.started, loaded.elapsed
        if loaded.phase is not None:
            self._carried[loaded.phase] = loaded.phase_seconds

    def step(
        self, name: str, kind: type[T], work: Callable[[], T], model_file: str | None = None
    ) -> T:
        """``work()``, once per run: a step the rest of the run builds on (e.g. the CVAE).

        Its value (a :class:`~fedaug_flwr.phases.Trained` or a
        :class:`~fedaug_flwr.server_work.ServerWork`: a section, files, a model) and
        what it added to the record go into the checkpoint, the model by its file
        ``model_file`` in the results folder. When the checkpoint has the step done
        already, all that is put back instead, with the random generators as the
        step left them."""
        checkpoint = self.checkpoint
        done = None if checkpoint is None else checkpoint.steps.get(name)
        if done is not None:
            self.sections.update(done["sections"])
            self.timing.update(done["timing"])
            self.artifacts.update(done["artifacts"])
            set_rng_state(done["rng"])
            kept = dict(done["value"])
            if "files" in kept:
                kept["files"] = {key: self.output_dir / file for key, file in kept["files"].items()}
            if model_file is not None:
                kept["weights"] = checkpoint.model(name)
            return kind(**kept)
        before = (dict(self.sections), dict(self.timing), dict(self.artifacts))
        value = work()
        if checkpoint is None:
            return value
        kept = {"section": value.section}
        if hasattr(value, "files"):
            kept["files"] = {key: Path(path).name for key, path in value.files.items()}
        entry = {
            "value": kept,
            # what the step added to the record
            "sections": _added(self.sections, before[0]),
            "timing": _added(self.timing, before[1]),
            "artifacts": _added(self.artifacts, before[2]),
            "rng": rng_state(),
        }
        if model_file is not None:
            entry["model"] = {"file": model_file, "sha256": weights_digest(value.weights)}
        checkpoint.steps[name] = entry
        checkpoint.phase, checkpoint.progress = None, None
        self._save_checkpoint()
        return value

    def rounds(self, phase: str) -> RoundHooks:
        """The checkpoint's hooks for the FedAvg rounds of ``phase`` (also the name it is
        timed under): where to go on from, and what to do after every round."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            return RoundHooks()

        def after_round(progress: PhaseProgress) -> None:
            checkpoint.phase, checkpoint.progress = phase, progress
            started = self._phase_started.get(phase, time.perf_counter())
            checkpoint.phase_seconds = time.perf_counter() - started + self._carried.get(phase, 0)
            self._save_checkpoint()

        resume = checkpoint.progress if checkpoint.phase == phase else None
        return RoundHooks(resume, after_round)

    def resumes_from(self) -> str | None:
        """Where a run started again on this folder would resume (None: from the start)."""
        if self.checkpoint is None or not self.checkpoint.path.exists():
            return None
        return self.checkpoint.where()

    def _save_checkpoint(self) -> None:
        self.checkpoint.elapsed = self.elapsed()
        self.checkpoint.save()

    def elapsed(self) -> float:
        """Seconds this run has worked, over all its attempts."""
        return self.earlier_s + time.time() - self.attempt_started

    def add(self, name: str, section: object) -> None:
        """A section of the summary (one of :data:`SECTIONS`), given once."""
        if name not in SECTIONS or name == "artifacts" or name in self.sections:
            raise ValueError(f"summary section {name!r} is unknown or given twice")
        self.sections[name] = section

    def keep(self, files: dict[str, Path]) -> None:
        """Files a phase wrote into the results folder, listed under ``artifacts``."""
        self.artifacts.update({name: path.name for name, path in files.items()})

    def save_weights(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """A model's weights as ``<name>.pt`` in the results folder."""
        self.keep({name: save_state_dict(self.output_dir / f"{name}.pt", weights)})

    def summary(self) -> dict:
        sections = {**self.sections, "artifacts": self.artifacts}
        return {
            "status": "completed",
            "run-id": self.run_id,
            "fedaug-flwr-version": __version__,
            "machine": describe_machine(),
            "started-at": _iso(self.started),
            "finished-at": _iso(time.time()),
            "output-dir": str(self.output_dir),
            "config": self.config.to_run_config(),
            "study-preset": matching_preset(self.config.to_run_config()),
            **{name: sections[name] for name in SECTIONS if name in sections},
            "timing-s": {**self.timing, "total": round(self.elapsed(), 3)},
            **(
                {"resumed": self.checkpoint.resumed}
                if self.checkpoint and self.checkpoint.resumed
                else {}
            ),
        }

    def write_summary(self) -> Path:
        """``summary.json``: the run completed. Returns the results folder."""
        write_json(self.output_dir / SUMMARY, self.summary())
        if self.checkpoint is not None:  # not a result; the summary holds all it did
            self.checkpoint.remove()
        log.info("[fedaug] run completed; results in %s", self.output_dir)
        return self.output_dir

    def write_failure(self, error: BaseException) -> None:
        """``failure.json``: what went wrong (call it while handling ``error``).

        Where it cannot be written (a full disk), the error and why are logged and
        printed to stderr instead; ``error`` stays the run's error."""
        resumes = self.resumes_from()
        where = "" if resumes is None else f"; started again, it resumes from {resumes}"
        try:
            self._write_failure(error)
        except OSError as problem:
            message = (
                f"[fedaug] RUN FAILED: {type(error).__name__}: {error}; and {FAILURE} could "
                f"not be written in {self.output_dir} either ({problem}){where}"
            )
            log.error(message)
            print(message, file=sys.stderr, flush=True)
            return
        log.error("[fedaug] RUN FAILED: %s (details in %s)", error, self.output_dir / FAILURE)

    def _write_failure(self, error: BaseException) -> None:
        write_json(
            self.output_dir / FAILURE,
            {
                # Ctrl-C reaches us as KeyboardInterrupt; after a SIGKILL nothing is written,
                # and a folder without summary.json is an incomplete run either way.
                "status": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                "run-id": self.run_id,
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
                "config": self.config.to_run_config(),
                "timing-s": self.timing,
                # where a run started again on this folder resumes (see checkpoint.py)
                "resumes-from": self.resumes_from(),
            },
        )


def _added(now: dict, before: dict) -> dict:
    """The entries of ``now`` that are new or changed since ``before``."""
    return {key: value for key, value in now.items() if key not in before or before[key] != value}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")


def describe_machine() -> dict[str, str | int | None]:
    """The machine that wrote the summary: its CPU model and cores, Python, torch and Flower.
    A seed fixes a run's numbers bit for bit only on the same kind of CPU (with the same
    torch and thread count): float rounding in torch's kernels differs between CPU models."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": version("flwr"),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
