"""What every benchmark shares: the machine's description, child processes whose
whole process tree is watched for memory, medians, tables and JSON results.

Each measured thing (a Flower simulation, the plain loop) runs in its own
child process, so one cannot warm the caches, thread pools or memory of the
next, and so the peak memory of each can be read from its process tree alone.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedaug_flwr.results import write_json
from fedaug_flwr.run_record import cpu_model

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
FULL_MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"
GIB = 1024**3


def default_data_dir() -> str:
    """Full MNIST for ``dataset='mnist'``: $FEDAUG_DATA_DIR, else the project's shared copy."""
    return os.environ.get("FEDAUG_DATA_DIR", str(FULL_MNIST_DIR))


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def gpu_names() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine_info() -> dict:
    """What the numbers were measured on, and how busy it was when the benchmark started."""
    import flwr
    import ray
    import torch

    return {
        "cpu": cpu_model(),
        "logical-cpus": os.cpu_count(),
        "memory-gib": round(psutil.virtual_memory().total / GIB, 1),
        "gpus": gpu_names(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch-default-threads": torch.get_num_threads(),
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "load-average-1-5-15-min-at-start": load_average(),
        "started-at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


# ----------------------------------------------------------------------------- memory


@dataclass
class TreeMemory:
    """Peak memory of a process and all its descendants, sampled in a thread.

    ``peak_rss`` sums resident memory (pages shared between processes, such as
    torch's libraries, count once per process: an upper bound); ``peak_pss``
    shares each page among the processes that map it (what the tree really
    uses). PSS needs /proc/<pid>/smaps_rollup; where it cannot be read it
    stays None. The report's ``cpu-s`` is the CPU time (user + system) the
    tree's processes used, as last seen by the sampler: unlike wall time, it
    hardly depends on what else the machine runs; ``at-peak-rss-gib`` lists
    the processes at the sample with the highest RSS sum.
    """

    root_pid: int
    interval_s: float = 0.5
    peak_rss: int = 0
    peak_pss: int | None = None
    peak_processes: int = 0
    peak_breakdown: list[tuple[str, int, int | None]] = field(default_factory=list)
    _cpu_by_pid: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss, pss, pss_known = 0, 0, True
        breakdown = []
        for process in processes:
            try:
                process_rss = process.memory_info().rss
                times = process.cpu_times()
                self._cpu_by_pid[process.pid] = times.user + times.system
                process_pss = process.memory_full_info().pss if pss_known else None
                breakdown.append((process_label(process), process_rss, process_pss))
            except (psutil.Error, AttributeError):
                pss_known = False
                continue
            rss += process_rss
            pss += process_pss or 0
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.peak_breakdown = breakdown
        if pss_known:
            self.peak_pss = max(self.peak_pss or 0, pss)
        self.peak_processes = max(self.peak_processes, len(processes))

    def report(self) -> dict:
        return {
            "peak-rss-sum-gib": round(self.peak_rss / GIB, 3),
            "peak-pss-sum-gib": None if self.peak_pss is None else round(self.peak_pss / GIB, 3),
            "peak-processes": self.peak_processes,
            "cpu-s": round(sum(self._cpu_by_pid.values()), 1),
            "at-peak-rss-gib": [
                {
                    "process": label,
                    "rss": round(rss / GIB, 3),
                    "pss": None if pss is None else round(pss / GIB, 3),
                }
                for label, rss, pss in sorted(self.peak_breakdown, key=lambda row: -row[1])
            ],
        }


def process_label(process: psutil.Process) -> str:
    """A short name: Ray's actors by role, Python programs by module or script."""
    try:
        command = process.cmdline()
    except psutil.Error:
        return process.name()
    if not command:
        return process.name()
    if command[0].startswith("ray::"):
        return command[0]
    for i, part in enumerate(command[:-1]):
        if part == "-m":
            return command[i + 1]
    for part in command[1:]:
        if not part.startswith("-"):
            return Path(part).name
    return Path(command[0]).name


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    wall_s: float
    memory: dict
    output_tail: str
    timed_out: bool = False  # stopped at ``timeout_s``, not ended by itself


def run_child(
    module: str,
    args: Sequence[str],
    timeout_s: float | None = None,
    echo: bool = False,
    cwd: Path = REPO_ROOT,
    log_path: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    grace_s: float = 5.0,
) -> ChildResult:
    """``python -m module args`` in ``cwd`` (a source tree), watching its process tree's memory.

    Its output (stdout and stderr) goes line by line to ``log_path`` when given (the
    whole log; the result keeps the last 60 lines) and to ``on_line`` as it arrives.

    ``cwd`` comes first on the child's PYTHONPATH, so it runs that tree's code;
    the caller's own PYTHONPATH entries follow (where dependencies may have been
    unpacked instead of installed, as on a borrowed GPU machine). The child gets
    its own process group, which is killed afterwards, so nothing it started
    (Ray) outlives it: SIGTERM first, SIGKILL what is left after ``grace_s``.
    """
    from fedaug_flwr.processes import SIMULATION_ENV, stop_process_tree

    command = [sys.executable, "-m", module, *args]
    # Flower children (run_simulation) and the plain loop share the launcher's
    # scheduling settings, so both sides compete for the CPU on equal terms.
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    env = {**SIMULATION_ENV, **os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), *inherited])}
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    memory = TreeMemory(process.pid).start()
    lines: list[str] = []
    log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115 - closed below
    reader = threading.Thread(
        target=_collect, args=(process, lines, echo, log, on_line), daemon=True
    )
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        lines.append(f"[bench] {module} ran past {timeout_s} s and was stopped")
    finally:
        memory.stop()
        stop_process_tree(process, grace_s=grace_s)
        reader.join(timeout=5.0)
        if log is not None:
            log.close()
    wall = time.perf_counter() - start
    return ChildResult(
        process.returncode if process.returncode is not None else -9,
        round(wall, 3),
        memory.report(),
        "".join(lines[-60:]),
        timed_out,
    )


def _collect(
    process: subprocess.Popen,
    lines: list[str],
    echo: bool,
    log=None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    for line in process.stdout:
        lines.append(line)
        if log is not None and not log.closed:
            log.write(line)
            log.flush()
        if on_line is not None:
            on_line(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


# ----------------------------------------------------------------------------- output


def print_table(title: str, rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    """A plain-text table of ``rows`` (dicts) under ``title``."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def save_results(path: str | Path, data: dict) -> Path:
    path = Path(path)
    write_json(path, data)
    print(f"\n[bench] results written to {path}")
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
