"""Round r of n and the time left in the phase, from a run's streamed log.

The launcher echoes Flower's log as it arrives (``flwr run --stream``). Two
kinds of lines mark progress: the app's ``[fedaug] phase '<name>' starts``
(:meth:`fedaug_flwr.run_record.RunRecord.timed`) and Flower's ``[ROUND r/n]``,
logged when a strategy begins round r of n. From round 2 on, round r's line
means r - 1 rounds are done, so the phase's mean round time so far times the
rounds not done yet (n - r + 1, this one included) estimates the time left in
the phase. The first round is left out of the mean once a later one is done:
it also starts the client actors. A phase that trains on the server without
rounds (pretraining) logs ``[fedaug] <phase> epoch e/n`` after each epoch instead:
the same estimate, from the epochs' mean time since the first one ended.
:class:`Progress` turns those lines into one compact line per round or epoch; the
launcher prints it under Flower's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PREFIX = "fedaug-flwr progress:"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PHASE = re.compile(r"\[fedaug\] phase '([^']+)' starts")
_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
_EPOCH = re.compile(r"\[fedaug\] \S+ epoch (\d+)/(\d+)")


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


@dataclass
class Progress:
    """Feed it every log line; it answers a progress line at each round or server
    epoch, else None."""

    clock: Callable[[], float] = time.monotonic
    phase: str = "rounds"  # until the app names one
    _round_starts: list[float] = field(default_factory=list, repr=False)
    _last_round: tuple[int, int] | None = field(default=None, repr=False)
    _epoch_ends: list[float] = field(default_factory=list, repr=False)
    _last_epoch: tuple[int, int] | None = field(default=None, repr=False)

    def feed(self, line: str) -> str | None:
        plain = _ANSI.sub("", line)
        if match := _PHASE.search(plain):
            self.phase, self._round_starts, self._last_round = match.group(1), [], None
            self._epoch_ends, self._last_epoch = [], None
            return None
        if match := _EPOCH.search(plain):
            return self._epoch_done(int(match.group(1)), int(match.group(2)))
        match = _ROUND.search(plain)
        if match is None:
            return None
        current, total = int(match.group(1)), int(match.group(2))
        if self._last_round == (current, total):
            return None  # the same line again (a second log handler prints every line twice)
        self._last_round = (current, total)
        if current == 1:
            self._round_starts = []  # a new strategy: count from here
        self._round_starts.append(self.clock())
        head = f"{PREFIX} {self.phase} round {current}/{total}"
        if len(self._round_starts) < 2:  # nothing measured yet (or joined mid-phase)
            return head
        starts = self._round_starts
        done = len(starts) - 1
        elapsed = starts[-1] - starts[0]
        # The first round also starts the actors (and imports torch in them): once a
        # later round is done, it is left out of the mean.
        mean = elapsed / done if done == 1 else (starts[-1] - starts[1]) / (done - 1)
        left = mean * (total - current + 1)
        return (
            f"{head}; {done} done in {duration(elapsed)} ({duration(mean)} a round), "
            f"about {duration(left)} left in this phase"
        )

    def _epoch_done(self, epoch: int, total: int) -> str | None:
        if self._last_epoch == (epoch, total):
            return None  # the same line again
        self._last_epoch = (epoch, total)
        if epoch == 1:
            self._epoch_ends = []
        self._epoch_ends.append(self.clock())
        head = f"{PREFIX} {self.phase} epoch {epoch}/{total} done"
        if len(self._epoch_ends) < 2:  # the first epoch's start is not in the log
            return head
        ends = self._epoch_ends
        mean = (ends[-1] - ends[0]) / (len(ends) - 1)
        return (
            f"{head} ({duration(mean)} an epoch), about {duration(mean * (total - epoch))} "
            "left in this phase"
        )
