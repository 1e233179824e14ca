"""Results folders: writable before training, one owner at a time, and a summary counts only
when the launch that wrote it ended normally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple

import pytest

from fedaug_flwr import results
from fedaug_flwr.results import (
    LOCK,
    SUMMARY,
    OutputFolderError,
    ensure_writable,
    folder_lock,
    read_summary,
    write_json,
    write_launch_state,
)


def test_ensure_writable_creates_the_folder_and_leaves_nothing_in_it(tmp_path):
    folder = ensure_writable(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_folder_that_cannot_be_written_is_reported_by_name(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputFolderError, match=r"results folder .*a-file/out is not writable"):
        ensure_writable(tmp_path / "a-file" / "out")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputFolderError, match=r"read-only is not writable"):
            ensure_writable(locked)


def test_a_full_disk_is_reported_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(results.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 2**20))
    with pytest.raises(OutputFolderError, match=r"has 1.0 MiB free, fewer than the 64 MiB"):
        ensure_writable(tmp_path)


HOLD = """
import sys, time
from pathlib import Path
from fedaug_flwr.results import folder_lock
with folder_lock(Path(sys.argv[1]), "a test sweep"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_folder_held_by_a_live_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputFolderError, match=rf"in use by a test sweep \(pid {holder.pid} "):
            with folder_lock(tmp_path, "a second sweep"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # its owner is dead: the lock file it left is taken over
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == holder.pid
    with folder_lock(tmp_path, "a second sweep"):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (tmp_path / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "purpose": "old sweep"}))
    with folder_lock(tmp_path, "new sweep"):
        owner = json.loads((tmp_path / LOCK).read_text())
        assert owner["pid"] == os.getpid() and owner["purpose"] == "new sweep"


def test_a_summary_counts_only_when_its_launch_ended_normally(tmp_path):
    write_json(tmp_path / SUMMARY, {"status": "completed"})
    assert read_summary(tmp_path) == {"status": "completed"}  # no launch record: older folders
    for status in ("running", "interrupted", "finished:stopped", "failed"):
        write_launch_state(tmp_path, status)
        assert read_summary(tmp_path) is None, status
    (tmp_path / results.RUN_STATE).write_text("{")
    assert read_summary(tmp_path) is None
    write_launch_state(tmp_path, "finished:completed", **{"run-id": "7"})
    assert read_summary(tmp_path) == {"status": "completed"}
