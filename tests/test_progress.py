"""The launcher's progress lines, from a recorded ``flwr run --stream`` log of a real run
(3 CVAE rounds, 2 classifier rounds; Flower's colours kept)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from fedaug_flwr import launch
from fedaug_flwr.progress import PREFIX, Progress, duration

ROOT = Path(__file__).resolve().parent.parent
RECORDED = Path(__file__).parent / "logs" / "flwr-run-stream.log"
# When each [ROUND r/n] line of the recording arrives (seconds): the first CVAE round
# also starts the actors.
ROUND_TIMES = [100.0, 147.0, 148.0, 160.0, 169.0]


def replay(lines: list[str], times: list[float]) -> list[str]:
    clock = iter(times)
    progress = Progress(clock=lambda: next(clock))
    return [note for line in lines if (note := progress.feed(line))]


def test_a_recorded_run_gives_one_line_per_round_with_the_phase_and_its_eta():
    lines = RECORDED.read_text().splitlines(keepends=True)
    assert replay(lines, ROUND_TIMES) == [
        f"{PREFIX} cvae round 1/3",
        f"{PREFIX} cvae round 2/3; 1 done in 47 s (47 s a round), "
        "about 1 min 34 s left in this phase",
        # round 1 (actor start-up) no longer counts: 1 s a round
        f"{PREFIX} cvae round 3/3; 2 done in 48 s (1 s a round), about 1 s left in this phase",
        f"{PREFIX} classifier round 1/2",
        f"{PREFIX} classifier round 2/2; 1 done in 9 s (9 s a round), about 9 s left in this phase",
    ]


def test_the_eta_is_the_mean_round_so_far_times_the_rounds_left():
    lines = ["[fedaug] phase 'cvae' starts\n"] + [f"INFO : [ROUND {r}/15]\n" for r in (1, 2, 3, 4)]
    notes = replay(lines, [0.0, 60.0, 70.0, 80.0])
    assert notes[-1] == (
        f"{PREFIX} cvae round 4/15; 3 done in 1 min 20 s (10 s a round), "
        "about 2 min 00 s left in this phase"
    )


def test_server_epochs_give_the_time_left_from_their_mean_time():
    """Pretraining runs on the server without rounds: its epoch lines are the progress."""
    epoch = "INFO :      [fedaug] pretraining epoch {}/15: train loss 0.1039, real-test acc 0.5\n"
    lines = [
        "[fedaug] phase 'cvae' starts\n",
        "INFO : [ROUND 1/15]\n",
        "[fedaug] phase 'pretraining' starts\n",
        epoch.format(1),
        epoch.format(2),
        epoch.format(2),  # printed twice: counts once
        epoch.format(3),
    ]
    assert replay(lines, [0.0, 500.0, 650.0, 800.0]) == [
        f"{PREFIX} cvae round 1/15",
        f"{PREFIX} pretraining epoch 1/15 done",
        f"{PREFIX} pretraining epoch 2/15 done (2 min 30 s an epoch), about 32 min 30 s left "
        "in this phase",
        f"{PREFIX} pretraining epoch 3/15 done (2 min 30 s an epoch), about 30 min 00 s left "
        "in this phase",
    ]


def test_rounds_without_a_phase_line_and_other_lines():
    progress = Progress(clock=lambda: 0.0)
    assert progress.feed("(ClientAppActor pid=7) training\n") is None
    assert progress.feed("[fedaug] phase 'data' took 0.8 s\n") is None
    assert progress.feed("INFO :      [ROUND 2/5]\n") == f"{PREFIX} rounds round 2/5"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (59.6, "1 min 00 s"), (125, "2 min 05 s"), (3725, "1 h 02 min")],
)
def test_durations(seconds, text):
    assert duration(seconds) == text


def test_the_launcher_prints_the_progress_under_flowers_lines(tmp_path, monkeypatch):
    fake = tmp_path / "flwr"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  run) echo "Successfully started run 5"; cat "{RECORDED}" ;;\n'
        '  list) echo \'{"runs": [{"status": "finished:completed", "status-details": ""}]}\' ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(launch, "bin_path", lambda name: str(fake))
    out = io.StringIO()
    outcome = launch.flwr_run(tmp_path, {}, {}, stream=out)
    assert outcome.ok and outcome.output_dir == "/tmp/run"
    lines = out.getvalue().splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith(PREFIX)]
    assert len(notes) == 5
    assert all("[ROUND" in lines[i - 1] for i in notes)
    assert lines[notes[0]] == f"{PREFIX} cvae round 1/3"


def test_a_round_line_printed_twice_counts_once():
    # a second handler on the root logger prints each of Flower's lines twice, in its format
    lines = ["[fedaug] phase 'cvae' starts\n"]
    for r in (1, 2, 3):
        lines += [f"INFO :      [ROUND {r}/15]\n", f"11/30/2026 06:00:09:INFO:[ROUND {r}/15]\n"]
    notes = replay(lines, [0.0, 50.0, 60.0])
    assert notes == [
        f"{PREFIX} cvae round 1/15",
        f"{PREFIX} cvae round 2/15; 1 done in 50 s (50 s a round), about 11 min 40 s left in "
        "this phase",
        f"{PREFIX} cvae round 3/15; 2 done in 1 min 00 s (10 s a round), about 2 min 10 s left "
        "in this phase",
    ]


def test_importing_the_app_leaves_the_root_logger_alone():
    """Opacus configures the root logger when imported; the app undoes that, so Flower's
    log lines (which propagate to the root) are printed once, not twice."""
    code = (
        "import logging, fedaug_flwr.node, fedaug_flwr.privacy_server, client_app, server_app; "
        "print(len(logging.getLogger().handlers))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "0"
