"""A run's record: its results folder, the time of each phase, ``summary.json`` and
``failure.json``.

The phases hand their sections to the record (:meth:`RunRecord.add`); the
summary lists them in the order of :data:`SECTIONS`, whatever the order they
came in. ``summary.json`` is written last and atomically, so a folder with it
holds a completed run; a run that fails writes ``failure.json`` (the error, the
traceback, the timings so far) instead, never a summary.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import torch

from fedaug_flwr import __version__, log
from fedaug_flwr.config import AppConfig
from fedaug_flwr.presets import matching_preset
from fedaug_flwr.results import (
    FAILURE,
    SUMMARY,
    ensure_writable,
    resolve_output_dir,
    save_state_dict,
    write_json,
)

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
        start = time.perf_counter()
        log.info("[fedaug] phase '%s' starts", phase)
        try:
            return work()
        finally:
            self.timing[phase] = round(time.perf_counter() - start, 3)
            log.info("[fedaug] phase '%s' took %.1f s", phase, self.timing[phase])

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
            "started-at": _iso(self.started),
            "finished-at": _iso(time.time()),
            "output-dir": str(self.output_dir),
            "config": self.config.to_run_config(),
            "study-preset": matching_preset(self.config.to_run_config()),
            **{name: sections[name] for name in SECTIONS if name in sections},
            "timing-s": {**self.timing, "total": round(time.time() - self.started, 3)},
        }

    def write_summary(self) -> Path:
        """``summary.json``: the run completed. Returns the results folder."""
        write_json(self.output_dir / SUMMARY, self.summary())
        log.info("[fedaug] run completed; results in %s", self.output_dir)
        return self.output_dir

    def write_failure(self, error: BaseException) -> None:
        """``failure.json``: what went wrong (call it while handling ``error``)."""
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
            },
        )
        log.error("[fedaug] RUN FAILED: %s (details in %s)", error, self.output_dir / FAILURE)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")
