"""Opt-in TensorBoard logging of a run (run-config key ``tensorboard = true``).

A run with ``tensorboard = true`` writes TensorBoard event files to
``<output-dir>/tensorboard/``. A sweep gives each run its own output folder
inside the sweep folder, so ``tensorboard --logdir <sweep folder>`` shows
every run side by side, named by its cell and seed; ``tensorboard --logdir
<run folder>`` shows one.

What is logged (tags are ``<phase>/<group>/<metric>``, steps are rounds):

- per round and phase, every number of the round's row as the summary records
  it: the clients' training losses (``cvae/train/train-loss``), the
  aggregated client metrics (``classifier/evaluate/macro-f1``,
  ``...-weighted``) and the global-test metrics
  (``classifier/global-test/accuracy``); lists (per-client rows) are left out;
- per run, the config: as a text table at the start (``config``), and as
  hyper-parameters with the final metrics when the log is closed (the
  HParams tab compares the runs of a sweep).

For the pipeline (to be wired where rounds and the summary are recorded)::

    from fedaug_flwr.tracking import RunLog
    tb = RunLog.for_run(config, output_dir)        # None unless tensorboard = true
    if tb is not None:
        tb.log_config(config.to_run_config())      # once, at the start
        tb.log_round("cvae", server_round, row)    # each round, as it completes
        # ... or, after a phase: tb.log_rounds("classifier", section["rounds"])
        tb.close(final_metrics=summary["final"])   # at the end, also when the run fails

Writing is cheap (buffered, flushed every few seconds and at close) and
happens in the ServerApp's process only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


def flatten_numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"train": {"loss": 1.0}, "round": 3, "per-client": [...]}`` -> ``{"train/loss": 1.0,
    "round": 3.0}``: nested mappings joined with ``/``; only ints and floats (not bools,
    not lists, not None) are kept."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _hparam(value: Any) -> bool | int | float | str:
    """TensorBoard's hyper-parameters are numbers, strings or bools."""
    return value if isinstance(value, bool | int | float | str) else str(value)


class RunLog:
    """TensorBoard event files of one run, in ``folder`` (made if missing)."""

    def __init__(self, folder: Path | str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch's writer needs the tensorboard package
            raise RuntimeError(
                "TensorBoard logging (tensorboard = true) needs the tensorboard package: "
                "pip install tensorboard"
            ) from error
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.folder), flush_secs=10)
        self._config: dict[str, Any] = {}
        self.closed = False

    @classmethod
    def for_run(cls, config: Any, output_dir: Path | str) -> RunLog | None:
        """The run's log in ``<output_dir>/tensorboard`` when its config (an
        :class:`~fedaug_flwr.config.AppConfig`) has ``tensorboard``; else None."""
        if not getattr(config, "tensorboard", False):
            return None
        return cls(Path(output_dir) / TENSORBOARD_DIR)

    def log_config(self, run_config: Mapping[str, Any]) -> None:
        """The run's config as a text table (tag ``config``); kept for :meth:`close`,
        which records it as hyper-parameters."""
        self._config = dict(run_config)
        rows = "\n".join(f"| {key} | `{value!r}` |" for key, value in sorted(run_config.items()))
        self._writer.add_text("config", "| key | value |\n| --- | --- |\n" + rows, 0)

    def log_round(self, phase: str, server_round: int, metrics: Mapping[str, Any]) -> int:
        """Every number in ``metrics`` (nested mappings allowed, e.g. a summary's round
        row) as scalar ``<phase>/<path>`` at step ``server_round``; returns how many.
        A ``round`` key is not logged (it is the step)."""
        written = 0
        for tag, value in flatten_numbers(metrics).items():
            if tag == "round":
                continue
            self._writer.add_scalar(f"{phase}/{tag}", value, server_round)
            written += 1
        return written

    def log_rounds(self, phase: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """:meth:`log_round` for each of a phase's round rows (each with its ``round``)."""
        return sum(self.log_round(phase, int(row["round"]), row) for row in rows)

    def flush(self) -> None:
        self._writer.flush()

    def close(self, final_metrics: Mapping[str, Any] | None = None) -> None:
        """Record the config (see :meth:`log_config`) as hyper-parameters with
        ``final_metrics`` (nested numbers, tags ``final/<path>``), then flush and
        close the files. Safe to call twice."""
        if self.closed:
            return
        try:
            if self._config:
                finals = {
                    f"final/{tag}": value
                    for tag, value in flatten_numbers(final_metrics or {}).items()
                    if math.isfinite(value)
                }
                hparams = {key: _hparam(value) for key, value in self._config.items()}
                # run_name ".": in this run's own folder, not a timestamped subfolder
                self._writer.add_hparams(hparams, finals, run_name=".")
        finally:
            self._writer.close()
            self.closed = True

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
