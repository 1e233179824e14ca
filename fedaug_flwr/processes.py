"""Starting, watching and stopping Flower's processes.

:class:`SuperLink` and :class:`SuperNode` start ``flower-superlink`` /
``flower-supernode`` from this interpreter's environment (:func:`bin_path`),
each in a process group of its own, with a private ``FLWR_HOME``
(:func:`flwr_env`) and its log in that home. Flower starts its SuperExec, and
with it ``flwr-simulation``, Ray and the ClientApps, in sessions of their own,
out of reach of the group; every one of them inherits ``FLWR_HOME``, so
:func:`processes_with_home` (which reads ``/proc``) finds all of them and their
descendants, and :func:`stop_process_tree` stops the group and all of them:
SIGTERM first, then SIGKILL what is left.

:mod:`fedaug_flwr.launch` (``flwr run`` on a private SuperLink),
:mod:`fedaug_flwr.deploy` (a real deployment on loopback) and
:mod:`fedaug_flwr.faults` (a ClientApp that kills its own SuperNode) use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ their environment

# How the simulation's processes share the CPU (docs/performance.md, measured on a
# 2-core machine shared with other work). Ray starts its client actors at nice 15,
# below every normal process: on a busy machine they got a small fraction of the
# CPU a plain training loop gets. OpenMP threads that spin while they wait made
# the server's two-thread evaluation 7-10x slower whenever the cores were
# oversubscribed; passive waiting keeps it close to one thread's time. Values
# already in the environment win.
SIMULATION_ENV = {"RAY_worker_niceness": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def flwr_env(
    flwr_home: Path, base: Mapping[str, str] | None = None, ray_address: str | None = None
) -> dict[str, str]:
    """Environment for flwr commands: private home, offline, no runtime installs.

    Without ``ray_address`` it keeps a simulation's Ray on this machine and on
    loopback: ``RAY_ADDRESS=local`` makes Flower's ``ray.init()`` start a new
    Ray even when ``ray start`` left a cluster's address in Ray's temporary
    folder (which ``ray.init()`` would otherwise attach to), and as a
    single-machine "local" Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) it
    binds 127.0.0.1 only, not the machine's address and every interface. With
    ``ray_address`` see :func:`ray_cluster_env`. It also sets the simulation's
    thread and priority settings (SIMULATION_ENV) unless the caller's
    environment already does.
    """
    env = {**SIMULATION_ENV, **(os.environ if base is None else base)}
    # Flower's processes start each other by name (flower-superexec, flwr-simulation...).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    if ray_address is None:
        env.update(RAY_ADDRESS="local", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    else:
        env.update(ray_cluster_env(ray_address, env.get("PYTHONPATH", "")))
    return env


RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"


def ray_cluster_env(ray_address: str, pythonpath: str = "") -> dict[str, str]:
    """What the private SuperLink's environment needs to run the simulation on a cluster.

    Flower 1.42 calls ``ray.init()`` in the ``flwr-simulation`` process the
    SuperLink starts (through its SuperExec, which inherit its environment),
    without an address: Ray then attaches to the cluster named by
    ``RAY_ADDRESS``. Multi-node Ray must not be switched off. Client actors on
    other machines unpickle the ClientApp by importing ``client_app`` and
    ``fedaug_flwr``: the job's ``PYTHONPATH`` (Flower passes the driver's
    ``sys.path`` and ``$PYTHONPATH``) gets this checkout first, which must be
    at the same path on every node; the app's copy in the temporary
    ``FLWR_HOME`` exists on this machine only.
    """
    paths = [str(APP_DIR), *(p for p in pythonpath.split(os.pathsep) if p and p != str(APP_DIR))]
    return {
        RAY_ADDRESS_VARIABLE: ray_address,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "PYTHONPATH": os.pathsep.join(paths),
    }


def bin_path(name: str) -> str:
    """A Flower executable from this interpreter's environment (or PATH)."""
    return _find_bin(name) or name


def _find_bin(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)


FLOWER_EXECUTABLES = ("flower-superlink", "flower-supernode", "flwr")


class EnvironmentProblem(RuntimeError):
    """This interpreter lacks what the app needs to start Flower's processes."""


def check_environment(names: Sequence[str] = FLOWER_EXECUTABLES) -> None:
    """Flower's executables must be next to this interpreter (or on PATH), else say what to do."""
    missing = [name for name in names if _find_bin(name) is None]
    if missing:
        raise EnvironmentProblem(
            f"{', '.join(missing)} not found next to {sys.executable} or on PATH: this Python "
            "does not have the app's environment. Run the command with the project's "
            "interpreter (.venv/bin/python -m ..., after `make setup`), or install the app "
            "into this one (pip install -e .)"
        )


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    return json.dumps(str(value))  # a TOML basic string


def to_overrides(values: Mapping[str, object]) -> str:
    """``{"k": 1, "s": "x"}`` -> ``k=1 s="x"`` for ``--run-config`` / ``--node-config``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


# ------------------------------------------------------------ SuperLink and SuperNode


class _FlowerProcess:
    """What SuperLink and SuperNode share: a process in its own group, logging to its home."""

    flwr_home: Path
    process: subprocess.Popen | None
    LOG_NAME = ""

    @property
    def log_path(self) -> Path:
        return self.flwr_home / self.LOG_NAME

    def _spawn(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.flwr_home,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() takes its children too
            )

    def start(self):  # pragma: no cover - each process says how it starts
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process, self.flwr_home)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class SuperLink(_FlowerProcess):
    """A ``flower-superlink`` process started and stopped by us (by process group)."""

    flwr_home: Path
    simulation: bool = True
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    ray_address: str | None = None  # a simulation's Ray cluster (None: a new, local Ray)
    process: subprocess.Popen | None = None
    LOG_NAME = "superlink.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> SuperLink:
        command = [
            bin_path("flower-superlink"),
            *("--host", self.host),
            *("--port", str(self.port)),
            *("--control-api-address", f"{self.host}:{free_port()}"),
            *("--fleet-api-address", f"{self.host}:{free_port()}"),
            *("--database", str(self.flwr_home / "superlink-state.db")),
            "--disable-runtime-dependency-installation",
            *(["--simulation", "--isolation", "subprocess"] if self.simulation else []),
            *self.extra_args,
        ]
        if "--ssl-certfile" not in self.extra_args:
            command.append("--insecure")
        self._spawn(
            command, {**flwr_env(self.flwr_home, ray_address=self.ray_address), **self.extra_env}
        )
        try:
            self._wait_until_up()
        except BaseException:  # a failed or interrupted start leaves nothing running
            self.stop()
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {self.process.returncode}; "
                    f"see {self.log_path}"
                )
            if "Uvicorn running on" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not start in {STARTUP_TIMEOUT_S:.0f} s")


class SuperNodeRefused(RuntimeError):
    """A SuperNode exited before it connected (e.g. its key is not registered)."""


@dataclass
class SuperNode(_FlowerProcess):
    """A ``flower-supernode`` process started and stopped by us (by process group).

    ``port`` is its local Runtime API, where its ClientApp processes connect;
    it binds ``host`` (loopback). TLS towards the SuperLink is on when
    ``root_certificates`` is given, SuperNode authentication when
    ``auth_private_key`` is. Its SuperExec and ClientApps go with it when it stops.
    """

    flwr_home: Path
    superlink_address: str
    node_config: Mapping[str, object]
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    LOG_NAME = "supernode.log"

    def command(self) -> list[str]:
        command = [
            bin_path("flower-supernode"),
            *("--superlink", self.superlink_address),
            *("--host", self.host),
            *("--port", str(self.port)),
            *("--node-config", to_overrides(self.node_config)),
        ]
        if self.root_certificates is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.root_certificates)]
        if self.auth_private_key is not None:
            command += ["--auth-supernode-private-key", str(self.auth_private_key)]
        return command

    def start(self) -> SuperNode:
        self._spawn(self.command(), {**flwr_env(self.flwr_home), **self.extra_env})
        return self

    def wait_until_connected(self, timeout_s: float = STARTUP_TIMEOUT_S) -> int:
        """The node id the SuperLink gave it; :class:`SuperNodeRefused` if it exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if match := re.search(r"SuperNode ID: (\d+)", text):
                return int(match.group(1))
            if self.process.poll() is not None:
                raise SuperNodeRefused(
                    f"flower-supernode exited with code {self.process.returncode} before "
                    f"connecting to {self.superlink_address}: {last_error(text)} "
                    f"(log: {self.log_path})"
                )
            time.sleep(0.3)
        raise RuntimeError(f"flower-supernode did not connect in {timeout_s:.0f} s")


def last_error(log_text: str) -> str:
    """The lines of a Flower log that explain an exit (from its last ERROR on)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log_text)
    start = plain.rfind("ERROR")
    lines = plain[start:].splitlines()[:4] if start >= 0 else plain.splitlines()[-3:]
    return " ".join(line.strip() for line in lines if line.strip())


# ------------------------------------------------------------------ watching, by /proc


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, parent, group, ...); None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # after the name, which may hold spaces


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot); None when it is gone or a zombie."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22: start time in clock ticks since boot


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid``; None when it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])  # field 4: the parent's pid


def command_line(pid: int) -> list[bytes] | None:
    """The arguments ``pid`` was started with; None when they cannot be read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None


def _live_stats() -> Iterator[tuple[int, list[str]]]:
    """Each live process (not a zombie) with its :func:`stat_fields`, read once."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            fields = stat_fields(pid)
            if fields is not None and fields[0] not in ("Z", "X"):
                yield pid, fields


def _live_pids() -> Iterator[int]:
    return (pid for pid, _ in _live_stats())


def group_members(group: int) -> list[int]:
    """Live processes in process group ``group``."""
    return [pid for pid, fields in _live_stats() if int(fields[2]) == group]


def environ_value(pid: int, name: str) -> str | None:
    """The value of ``name`` in the environment ``pid`` was started with (None if unreadable
    or unset)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{name}=".encode()
    for entry in environ:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def flwr_home_of(pid: int) -> str | None:
    """The ``FLWR_HOME`` a process was started with (None if unreadable or unset)."""
    return environ_value(pid, "FLWR_HOME")


def processes_with_home(flwr_home: Path | str) -> list[int]:
    """Every live process (but this one) started with ``FLWR_HOME=flwr_home``, and every live
    descendant of one.

    Each SuperLink, SuperNode and launch gets a private home, and every process
    Flower and Ray start below it inherits it, whatever process group or
    session they put themselves in: this finds all of one run's processes.
    Descendants count too because Ray's agents (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``) write their process title over their environment,
    where ``/proc`` no longer shows the home they inherited.
    """
    home = str(flwr_home)
    parents = {pid: int(fields[1]) for pid, fields in _live_stats() if pid != os.getpid()}
    found = {pid for pid in parents if flwr_home_of(pid) == home}
    return sorted(found | descendants(found, parents))


def descendants(roots: set[int], parents: Mapping[int, int | None]) -> set[int]:
    """The pids of ``parents`` (pid -> its parent) that descend from one of ``roots``."""
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found - roots


# ------------------------------------------------------------------------- stopping


def stop_processes(
    group: int, leader_alive: Callable[[], bool], ours: Callable[[], list[int]], grace_s: float
) -> None:
    """SIGTERM process group ``group`` (while its leader is ours and alive) and every pid
    ``ours()`` names, wait up to ``grace_s`` for them to go, then SIGKILL what is left.

    Only processes of ours are signalled: ``leader_alive`` must say False once the
    leader is gone (its pid, and so the group id, may then be reused). A process
    ``ours()`` named once is stopped too even when ``ours()`` no longer names it.
    """
    seen: dict[int, int] = {}  # pid -> start time: each process ours() ever named

    def ours_and_seen() -> list[int]:
        # A process named once stays ours while it lives (same pid and start time): one whose
        # parent died first is reparented, and ours() may no longer find it by its parent.
        for pid in ours():
            if pid not in seen and (ticks := start_ticks(pid)) is not None:
                seen[pid] = ticks
        return sorted(pid for pid, ticks in seen.items() if start_ticks(pid) == ticks)

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if leader_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        for pid in ours_and_seen():  # also those outside the group, and leftovers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            leader_alive()  # a leader of ours is reaped as soon as it exits
            if not ours_and_seen():
                break
            time.sleep(0.2)
        if not ours_and_seen():
            break


def stop_process_tree(
    process: subprocess.Popen, flwr_home: Path | str | None = None, grace_s: float = 10.0
) -> None:
    """Stop a process we started (with ``start_new_session``), its process group and
    everything carrying its ``FLWR_HOME`` (None: the group only).

    SIGTERM first (Flower's processes shut down cleanly), SIGKILL what is left
    after ``grace_s``; the leader is reaped.
    """

    def alive() -> bool:
        return process.poll() is None

    def ours() -> list[int]:
        # Once the leader is reaped its pid may be reused: then only FLWR_HOME tells ours.
        group = group_members(process.pid) if alive() else []
        home = processes_with_home(flwr_home) if flwr_home is not None else []
        return sorted({*home, *group})

    stop_processes(process.pid, alive, ours, grace_s)  # its pid is its group id
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5.0)
