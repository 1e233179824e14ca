"""Where a run's results go, and writing them so that nothing is ever half-written.

Under ``flwr run`` the ServerApp's working directory is the SuperLink's, so a
relative ``output-dir`` is resolved under :data:`RESULTS_ROOT`
(``~/fedaug-results``), never under the current directory. Files are written
to a temporary name in the same folder and renamed into place; ``summary.json``
is written last, so its presence means the run completed, unless ``run-state.json``
(written by whoever launched the run, e.g. the sweep runner) says that the
launch did not end normally: a summary written after an interruption does not
count.

:func:`folder_lock` keeps two runs or sweeps out of one folder;
:func:`ensure_writable` checks a results folder before any training.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

RESULTS_ROOT = Path.home() / "fedaug-results"
SUMMARY = "summary.json"
FAILURE = "failure.json"
RUN_STATE = "run-state.json"  # how the launch of the run in this folder ended
COMPLETED = "finished:completed"  # Flower's status of a run that ended normally
LOCK = ".fedaug.lock"
MIN_FREE_BYTES = 64 * 2**20  # models, plots and summary of one run take a few MB
_UMASK = os.umask(0)
os.umask(_UMASK)


def resolve_output_dir(output_dir: str, run_id: int | str, now: datetime | None = None) -> Path:
    """Absolute results folder: as given if absolute, else under ``~/fedaug-results``."""
    if not output_dir:
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        return RESULTS_ROOT / f"{stamp}-run{run_id}"
    path = Path(output_dir).expanduser()
    return path if path.is_absolute() else RESULTS_ROOT / path


class WriteError(OSError):
    """A results file could not be written (a full disk, a folder no longer writable...)."""


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``.

    If anything fails (e.g. ENOSPC half-way), the temporary file is removed and
    ``path`` is left as it was; :class:`WriteError` names the file and the space left.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; results are not
        os.replace(tmp, path)
    except OSError as error:
        raise _write_error(path, error) from error
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def _write_error(path: Path, error: OSError) -> WriteError:
    if isinstance(error, WriteError):
        return error
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    reason = error.strerror or str(error)
    return WriteError(error.errno, f"cannot write {path}: {reason}{free}")


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
    return save_torch(path, dict(state_dict))


def save_torch(path: Path, data: dict) -> Path:
    """``torch.save`` of plain data and tensors (what ``weights_only=True`` loads), atomically."""
    return write_atomic(path, lambda tmp: torch.save(data, tmp))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a saved model with ``weights_only=True``: no code in the file is run."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_summary(folder: Path) -> dict | None:
    """The summary of a completed run in ``folder``, or None when there is none.

    A folder whose ``run-state.json`` records a launch that did not end
    normally (still running, interrupted, failed) holds no completed run, even
    if a ``summary.json`` appeared there after the interruption.
    """
    path = Path(folder) / SUMMARY
    if not path.is_file() or launch_state(folder).get("status", COMPLETED) != COMPLETED:
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def launch_state(folder: Path) -> dict:
    """``run-state.json`` of ``folder``: ``{}`` when no launcher recorded one (older folders).

    An unreadable record counts as a launch that did not end normally.
    """
    path = Path(folder) / RUN_STATE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"status": "unknown"}
    return state if isinstance(state, dict) else {"status": "unknown"}


def write_launch_state(folder: Path, status: str, **details: Any) -> Path:
    """Record how the launch of the run in ``folder`` stands (``running``, a Flower status...)."""
    return write_json(Path(folder) / RUN_STATE, {"status": status, **details})


# ------------------------------------------------------------------ output folders


class OutputFolderError(RuntimeError):
    """A results folder cannot be written, or is in use by another run or sweep."""


def ensure_writable(folder: Path, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Create ``folder`` if needed and prove it takes a file; check the free space.

    Raises :class:`OutputFolderError` naming the folder and the reason, so a run
    fails before any training instead of losing its results at the end.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        try:
            os.write(handle, b"\0" * 4096)
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise OutputFolderError(
            f"results folder {folder} is not writable ({error.strerror or error}); "
            "choose another output-dir",
        ) from error
    if free < min_free_bytes:
        raise OutputFolderError(
            f"results folder {folder} has {free / 2**20:.1f} MiB free, fewer than the "
            f"{min_free_bytes / 2**20:.0f} MiB a run needs; free some space or choose another "
            "output-dir",
        )
    return folder


def _owner_record(handle: int) -> dict:
    """What the lock file says of its owner (pid, host, purpose, since); {} if unreadable."""
    try:
        owner = json.loads(os.pread(handle, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _lock_owner(handle: int) -> str:
    owner = _owner_record(handle)
    if not owner:
        return "another process"
    return (
        f"{owner.get('purpose', 'another process')} (pid {owner.get('pid', '?')} on "
        f"{owner.get('host', '?')}, since {owner.get('since', '?')})"
    )


@contextmanager
def folder_lock(folder: Path, purpose: str) -> Iterator[Path]:
    """Hold ``folder`` for one run or sweep; :class:`OutputFolderError` if another holds it.

    The lock file records the owner's pid. The lock itself is the kernel's
    (``flock``): it ends with the owner's process, so the lock file of a dead
    owner is simply taken over.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputFolderError(f"cannot create folder {folder}: {error}") from error
    path = folder / LOCK
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise OutputFolderError(f"cannot lock folder {folder} ({path}: {error})") from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(handle)
            os.close(handle)
            raise OutputFolderError(
                f"{folder} is in use by {owner}; wait for it to end or stop it, or choose "
                "another folder",
            ) from None
        except OSError as error:  # a file system without locks
            os.close(handle)
            raise OutputFolderError(f"cannot lock folder {folder} ({path}: {error})") from error
        try:
            same_file = os.path.samestat(os.fstat(handle), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(handle)  # the previous owner removed the file meanwhile: lock the new one
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": purpose,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps(owner).encode() + b"\n", 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still holding it: nobody else has it
        os.close(handle)


def lock_holder(folder: Path) -> int | None:
    """The pid of the process that holds ``folder`` (:func:`folder_lock`), or None when
    nobody holds it now (a lock file left by a dead owner counts as free)."""
    path = Path(folder) / LOCK
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # a shared lock is granted only while nobody holds the exclusive one
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _owner_record(handle).get("pid")
        return pid if isinstance(pid, int) else None
    except OSError:
        return None
    finally:
        os.close(handle)  # also releases a shared lock it was granted
    return None
