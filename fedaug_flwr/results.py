"""Where a run's results go, and writing them so that nothing is ever half-written.

Under ``flwr run`` the ServerApp's working directory is the SuperLink's, so a
relative ``output-dir`` is resolved under :data:`RESULTS_ROOT`
(``~/fedaug-results``), never under the current directory. Files are written
to a temporary name in the same folder and renamed into place; ``summary.json``
is written last, so its presence means the run completed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

RESULTS_ROOT = Path.home() / "fedaug-results"
SUMMARY = "summary.json"
FAILURE = "failure.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def resolve_output_dir(output_dir: str, run_id: int | str, now: datetime | None = None) -> Path:
    """Absolute results folder: as given if absolute, else under ``~/fedaug-results``."""
    if not output_dir:
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        return RESULTS_ROOT / f"{stamp}-run{run_id}"
    path = Path(output_dir).expanduser()
    return path if path.is_absolute() else RESULTS_ROOT / path


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; results are not
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> Path:
    text = json.dumps(_json_safe(data), indent=2, sort_keys=False)
    return write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))


def save_state_dict(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    return write_atomic(path, lambda tmp: torch.save(dict(state_dict), tmp))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a saved model with ``weights_only=True``: no code in the file is run."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_summary(folder: Path) -> dict | None:
    """The summary of a completed run in ``folder``, or None when there is none."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
