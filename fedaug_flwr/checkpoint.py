"""Resuming an interrupted run: ``checkpoint.pt`` in its results folder.

The server writes it, atomically, after every completed round of a FedAvg phase
(CVAE, classifier) and after every step the rest of the run builds on (the CVAE,
the server's pretraining, generator quality, the classifier). It holds what the
rest of the run needs:

- the steps done, each with what it added to the summary (sections, timings, files)
  and its model, by the file it saved in the folder (``cvae.pt``, ``pretrained.pt``,
  ``classifier.pt``) and that file's SHA-256, never a second copy;
- the phase in progress (:class:`~fedaug_flwr.strategies.PhaseProgress`): its global
  model after the last completed round (the only weights in the file), its round logs
  and metrics, the per-round timings and the state of the server's random generators;
- the run config it belongs to.

The same run started again on the same folder (the same command) resumes
(:meth:`RunRecord.open <fedaug_flwr.run_record.RunRecord.open>`): done steps are
taken from the checkpoint, the phase in progress goes on at its next round. Clients
need nothing from it: all they compute is derived from (config, round, partition),
except their synthetic images, which the imputation, redone on every resume, makes
again from the same CVAE and seeds, identically. A checkpoint of another config is
refused (:class:`CheckpointError`, naming the keys).

It is not a result: the run deletes it once ``summary.json`` is written (a rerun of a
completed folder starts afresh, as before), and campaigns publish only
``summary.json`` and ``clients.csv``. A failed run keeps it, to be resumed once the
cause is gone. The file is read with ``weights_only=True``: nothing in it is run;
everything but the model is one JSON text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import MetricRecord
from flwr.serverapp.strategy import Result

from fedaug_flwr.config import default_run_config
from fedaug_flwr.models import weights_digest
from fedaug_flwr.results import load_state_dict, save_torch
from fedaug_flwr.strategies import PhaseProgress, RoundLog
from fedaug_flwr.transport import to_record, to_state_dict

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Keys that may differ between the checkpoint's config and the run resuming it.
# output-dir: where, not what; sim-message-index: how fast messages are handed out
_NOT_COMPARED = {"output-dir", "sim-message-index"}


class CheckpointError(RuntimeError):
    """A checkpoint that this run cannot resume from (another config, a damaged file...)."""


@dataclass
class Checkpoint:
    """What a run has done so far (see the module docstring)."""

    folder: Path
    config: dict[str, object]  # AppConfig.to_run_config() of the run
    started: float  # when the run first started (time.time())
    elapsed: float = 0.0  # seconds the run has worked, over all its attempts
    steps: dict[str, dict] = field(default_factory=dict)  # done steps, in order
    phase: str | None = None  # the FedAvg phase in progress
    phase_seconds: float = 0.0  # seconds spent in it so far
    progress: PhaseProgress | None = None
    resumed: list[dict] = field(default_factory=list)  # one entry per resume

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT

    def where(self) -> str:
        """Where the run stands, in words (for logs and the summary)."""
        if self.progress is not None:
            return f"{self.phase} round {self.progress.completed_round}"
        return f"after {list(self.steps)[-1]}" if self.steps else "at the start"

    def save(self) -> Path:
        state = {
            "format": FORMAT,
            "config": self.config,
            "started": self.started,
            "elapsed": self.elapsed,
            "steps": self.steps,
            "phase": self.phase,
            "phase-seconds": self.phase_seconds,
            "progress": None if self.progress is None else _progress_data(self.progress),
            "resumed": self.resumed,
        }
        data = {
            "format": FORMAT,
            "state": json.dumps(state),  # Python's float repr: every number comes back exact
            "weights": None if self.progress is None else dict(to_state_dict(self.progress.arrays)),
            "server-state": None
            if self.progress is None
            else {k: torch.from_numpy(np.array(v)) for k, v in self.progress.server_state.items()},
        }
        return save_torch(self.path, data)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------ reading it back

    @classmethod
    def load(cls, folder: Path, config: dict[str, object]) -> Checkpoint | None:
        """The checkpoint in ``folder`` if there is one; :class:`CheckpointError` if it
        belongs to another config or cannot be read."""
        path = Path(folder) / CHECKPOINT
        if not path.exists():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            state = json.loads(data["state"])
        except Exception as error:  # noqa: BLE001 - any damage: say so, never resume from it
            raise CheckpointError(
                f"{path} cannot be read ({type(error).__name__}: {error}); delete it to run "
                "from the start"
            ) from error
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{path} has format {state.get('format')}, not {FORMAT}")
        differences = config_differences(state["config"], config)
        if differences:
            raise CheckpointError(
                f"{path} belongs to a run with another config ({'; '.join(differences)}): "
                "run with that config to resume it, or choose another output-dir (or delete "
                "the folder) to start afresh"
            )
        progress = None
        if state["progress"] is not None:
            progress = _progress_from(state["progress"], data["weights"])
            server_state = data.get("server-state") or {}
            progress.server_state = {k: v.numpy() for k, v in server_state.items()}
        return cls(
            folder=Path(folder),
            config=state["config"],
            started=state["started"],
            elapsed=state["elapsed"],
            steps=state["steps"],
            phase=state["phase"],
            phase_seconds=state["phase-seconds"],
            progress=progress,
            resumed=state["resumed"],
        )

    def model(self, step: str) -> dict[str, torch.Tensor]:
        """The model a done step saved, from its file, checked against its digest."""
        kept = self.steps[step]["model"]
        path = self.folder / kept["file"]
        try:
            weights = load_state_dict(path)
        except (OSError, RuntimeError) as error:
            raise CheckpointError(
                f"cannot resume: {path}, the model of the finished step '{step}', cannot be "
                f"read ({error}); delete {self.path} to run from the start"
            ) from error
        if weights_digest(weights) != kept["sha256"]:
            raise CheckpointError(
                f"cannot resume: {path} is not the model the step '{step}' saved (another "
                f"SHA-256); delete {self.path} to run from the start"
            )
        return weights


def check_folder(folder: Path, config: dict[str, object]) -> str | None:
    """Where the run in ``folder`` would resume (``None``: there is no checkpoint);
    :class:`CheckpointError` when its checkpoint cannot serve ``config``."""
    checkpoint = Checkpoint.load(folder, config)
    return None if checkpoint is None else checkpoint.where()


def config_differences(stored: dict[str, object], wanted: dict[str, object]) -> list[str]:
    """``key: checkpoint X, this run Y`` for every key that differs (output-dir aside).

    A key the checkpoint does not have was added to the app after it was written; a new
    key's default keeps the app's behaviour as it was, so the checkpointed run ran with
    that default, and a run that resumes with it is the same run."""
    defaults = default_run_config()
    stored = {**{k: v for k, v in defaults.items() if k in wanted}, **stored}
    keys = sorted((set(stored) | set(wanted)) - _NOT_COMPARED)
    return [
        f"{key}: checkpoint {stored.get(key)!r}, this run {wanted.get(key)!r}"
        for key in keys
        if stored.get(key) != wanted.get(key)
    ]


def _metrics(by_round: dict[int, MetricRecord]) -> dict[str, dict]:
    return {str(r): dict(record.items()) for r, record in by_round.items()}


def _metrics_from(data: dict[str, dict]) -> dict[int, MetricRecord]:
    return {int(r): MetricRecord(values) for r, values in data.items()}


def _progress_data(progress: PhaseProgress) -> dict:
    result = progress.result
    return {
        "completed-round": progress.completed_round,
        "train-metrics": _metrics(result.train_metrics_clientapp),
        "evaluate-metrics": _metrics(result.evaluate_metrics_clientapp),
        "server-metrics": _metrics(result.evaluate_metrics_serverapp),
        "train-log": {str(r): asdict(entry) for r, entry in progress.train_log.items()},
        "evaluate-log": {str(r): asdict(entry) for r, entry in progress.evaluate_log.items()},
        "received-evaluations": _metrics(progress.received_evaluations),
        "timing": progress.timing,
        "rng": progress.rng,
    }


def _progress_from(data: dict, weights: dict[str, torch.Tensor]) -> PhaseProgress:
    result = Result(
        train_metrics_clientapp=_metrics_from(data["train-metrics"]),
        evaluate_metrics_clientapp=_metrics_from(data["evaluate-metrics"]),
        evaluate_metrics_serverapp=_metrics_from(data["server-metrics"]),
    )
    return PhaseProgress(
        completed_round=data["completed-round"],
        arrays=to_record(weights),
        result=result,
        train_log={int(r): RoundLog(**entry) for r, entry in data["train-log"].items()},
        evaluate_log={int(r): RoundLog(**entry) for r, entry in data["evaluate-log"].items()},
        received_evaluations=_metrics_from(data["received-evaluations"]),
        timing=data["timing"],
        rng=data["rng"],
    )
