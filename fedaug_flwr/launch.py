"""Run the app through ``flwr run`` against a SuperLink this process owns.

``flwr run .`` on its own starts a background SuperLink on fixed ports that
outlives the command, keeps the environment it was first started with
(runtime dependency installation included) and is shared by every user of the
machine. This module instead starts a private ``flower-superlink`` (simulation
mode, loopback, free ports, a temporary ``FLWR_HOME``, no runtime installs),
runs the app with ``flwr run --stream``, reads the run's final status (``flwr
run`` exits 0 even when the run failed) and stops every process of the run:
the SuperLink's process group and every process that carries its private
``FLWR_HOME`` (Flower starts its SuperExec, and with it ``flwr-simulation``
and Ray, in a session of its own, out of reach of the group).

Before anything starts it checks that this interpreter has the app's
environment (Flower's executables) and, when ``output-dir`` is set, that the
results folder is writable and not in use by another run (a lock file holding
the owner's pid). SIGTERM ends a launch like Ctrl-C: the run is stopped first.

Command line (``make run`` uses it)::

    python -m fedaug_flwr.launch --num-supernodes 10 --run-config "num-synthetic=500"

The same process classes (:class:`SuperLink`, :class:`SuperNode`) run a real
deployment in :mod:`fedaug_flwr.deploy`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.progress import Progress
from fedaug_flwr.results import OutputFolderError, ensure_writable, folder_lock, resolve_output_dir

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedaug-local"
STARTUP_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


# ------------------------------------------------------------------ an existing Ray cluster

RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"


def resolve_ray_address(explicit: str | None = None) -> str | None:
    """The Ray cluster a simulation attaches to: ``explicit`` (``--ray-address``), else
    ``$RAY_ADDRESS``; None (a new Ray on this machine) when neither is set or it is
    ``local``, Ray's own word for that."""
    address = (explicit or os.environ.get(RAY_ADDRESS_VARIABLE) or "").strip()
    return None if address in ("", "local") else address


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


def federation_config(
    num_supernodes: int,
    num_cpus: int = 1,
    num_gpus: float = 0.0,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
    ray_num_gpus: int | None = None,
) -> dict[str, object]:
    """``flwr run --federation-config`` of a simulation.

    ``num_cpus`` / ``num_gpus`` are each client actor's share. ``ray_num_cpus`` /
    ``ray_num_gpus`` size the Ray that Flower starts on this machine (Flower's
    ``init-args-num-cpus`` / ``-num-gpus``, passed to ``ray.init``; unset: all of
    it). On an existing cluster (``ray_address``) the nodes' own resources count
    and ``ray.init`` refuses them (ValueError here, before anything starts).
    """
    federation: dict[str, object] = {
        "num-supernodes": num_supernodes,
        "client-resources-num-cpus": num_cpus,
        "client-resources-num-gpus": float(num_gpus),
    }
    sizes = {"init-args-num-cpus": ray_num_cpus, "init-args-num-gpus": ray_num_gpus}
    sizes = {key: int(value) for key, value in sizes.items() if value is not None}
    if sizes and ray_address is not None:
        raise ValueError(
            "the size of the Ray on this machine (ray_num_cpus / ray_num_gpus) cannot be set "
            f"for a run on the Ray cluster at {ray_address}: its nodes' resources count"
        )
    return {**federation, **sizes}


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


def write_connection(
    flwr_home: Path,
    address: str,
    name: str = CONNECTION,
    root_certificates: Path | None = None,
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection, the default."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


@dataclass
class SuperLink:
    """A ``flower-superlink`` process started and stopped by us (by process group)."""

    flwr_home: Path
    simulation: bool = True
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    ray_address: str | None = None  # a simulation's Ray cluster (None: a new, local Ray)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.flwr_home / "superlink.log"

    def start(self) -> SuperLink:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        command = [
            bin_path("flower-superlink"),
            "--host", self.host,
            "--port", str(self.port),
            "--control-api-address", f"{self.host}:{free_port()}",
            "--fleet-api-address", f"{self.host}:{free_port()}",
            "--database", str(self.flwr_home / "superlink-state.db"),
            "--disable-runtime-dependency-installation",
            *(["--simulation", "--isolation", "subprocess"] if self.simulation else []),
            *self.extra_args,
        ]  # fmt: skip
        if "--ssl-certfile" not in self.extra_args:
            command.append("--insecure")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            cwd=self.flwr_home,
            env={**flwr_env(self.flwr_home, ray_address=self.ray_address), **self.extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() takes its children too
        )
        log.close()
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

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process, self.flwr_home)

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SuperNodeRefused(RuntimeError):
    """A SuperNode exited before it connected (e.g. its key is not registered)."""


@dataclass
class SuperNode:
    """A ``flower-supernode`` process started and stopped by us (by process group).

    ``port`` is its local Runtime API, where its ClientApp processes connect;
    it binds ``host`` (loopback). TLS towards the SuperLink is on when
    ``root_certificates`` is given, SuperNode authentication when
    ``auth_private_key`` is.
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

    @property
    def log_path(self) -> Path:
        return self.flwr_home / "supernode.log"

    def command(self) -> list[str]:
        command = [
            bin_path("flower-supernode"),
            "--superlink", self.superlink_address,
            "--host", self.host,
            "--port", str(self.port),
            "--node-config", to_overrides(self.node_config),
        ]  # fmt: skip
        if self.root_certificates is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.root_certificates)]
        if self.auth_private_key is not None:
            command += ["--auth-supernode-private-key", str(self.auth_private_key)]
        return command

    def start(self) -> SuperNode:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.flwr_home,
            env={**flwr_env(self.flwr_home), **self.extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: its SuperExec and ClientApps go with it
        )
        log.close()
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

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process, self.flwr_home)

    def __enter__(self) -> SuperNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def last_error(log_text: str) -> str:
    """The lines of a Flower log that explain an exit (from its last ERROR on)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log_text)
    start = plain.rfind("ERROR")
    lines = plain[start:].splitlines()[:4] if start >= 0 else plain.splitlines()[-3:]
    return " ".join(line.strip() for line in lines if line.strip())


def stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left."""
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            # children (simulation, Ray) may outlive the leader for a moment
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
        break


# --------------------------------------------------------------- our processes, by /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields 3.. (the name may hold spaces)


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot); None when it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22: start time in clock ticks since boot


def _live_pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            fields = _stat_fields(pid)
            if fields is not None and fields[0] not in ("Z", "X"):
                yield pid


def group_members(group: int) -> list[int]:
    """Live processes in process group ``group``."""
    return [pid for pid in _live_pids() if int((_stat_fields(pid) or ["", "", "0"])[2]) == group]


def flwr_home_of(pid: int) -> str | None:
    """The ``FLWR_HOME`` a process was started with (None if unreadable or unset)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"FLWR_HOME="):
            return entry[len(b"FLWR_HOME=") :].decode(errors="replace")
    return None


def processes_with_home(flwr_home: Path | str) -> list[int]:
    """Every live process (but this one) started with ``FLWR_HOME=flwr_home``.

    Each SuperLink, SuperNode and launch gets a private home, and every process
    Flower and Ray start below it inherits it, whatever process group or
    session they put themselves in: this finds all of one run's processes.
    """
    home = str(flwr_home)
    return [pid for pid in _live_pids() if pid != os.getpid() and flwr_home_of(pid) == home]


def stop_process_tree(
    process: subprocess.Popen, flwr_home: Path | str, grace_s: float = 10.0
) -> None:
    """Stop a process we started, its process group and everything carrying its FLWR_HOME.

    SIGTERM first (Flower's processes shut down cleanly), SIGKILL what is left
    after ``grace_s``; the leader is reaped.
    """

    def ours() -> list[int]:
        # Once the leader is reaped its pid may be reused: then only FLWR_HOME tells ours.
        group = group_members(process.pid) if process.poll() is None else []
        return sorted({*processes_with_home(flwr_home), *group})

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)  # started with start_new_session: pid = group id
        for pid in ours():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()  # reap the leader as soon as it exits
            if not ours():
                break
            time.sleep(0.2)
        if not ours():
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5.0)


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
    """``{"k": 1, "s": "x"}`` -> ``k=1 s="x"`` for ``--run-config``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


_OVERRIDE = re.compile(r"[\w.-]+\s*=\s*(?:'[^']*'|\"[^\"]*\"|\S+)")


def parse_overrides(texts: Sequence[str]) -> dict[str, object]:
    """Parse ``--run-config`` values as flwr does: ``k=v k2='s'`` strings, or ``.toml`` files.

    A ``.toml`` file's values (nested tables flattened to dotted keys, as flwr
    does) are read with tomllib and passed on as overrides; later arguments
    win. Any text that is not ``key=value`` is refused by name, never dropped.
    """
    values: dict[str, object] = {}
    for text in texts:
        if text.strip().endswith(".toml"):
            values.update(_read_toml_overrides(Path(text.strip()).expanduser()))
            continue
        leftover = _OVERRIDE.sub(" ", text).split()
        if leftover:
            raise ConfigError(
                f"cannot parse --run-config {text!r}: {' '.join(leftover)!r} is not key=value "
                "(write key=value pairs, e.g. \"num-synthetic=100 imputation='uniform'\", "
                "or give a .toml file)"
            )
        try:
            values.update(tomllib.loads("\n".join(_OVERRIDE.findall(text))))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"cannot parse --run-config {text!r}: {error}") from error
    return values


def _read_toml_overrides(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read --run-config file {str(path)!r}: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--run-config file {str(path)!r} is not valid TOML: {error}") from error
    return _flatten(table)


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextlib.contextmanager
def output_dir_held(run_config: Mapping[str, object], purpose: str) -> Iterator[Path | None]:
    """Check and lock the run's ``output-dir`` (when set) for the length of the run.

    :class:`~fedaug_flwr.results.OutputFolderError` when it cannot be written
    or another run or sweep holds it. The ServerApp of a local SuperLink
    writes there (under the same user), so this is checked before it starts.
    """
    output_dir = str(run_config.get("output-dir", "") or "")
    if not output_dir:  # the ServerApp makes a new, timestamped folder
        yield None
        return
    folder = resolve_output_dir(output_dir, "")
    with folder_lock(folder, purpose):
        ensure_writable(folder)
        yield folder


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str
    details: str
    output_dir: str

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"

    def report(self) -> int:
        """Tell the user how the run ended (stderr when it failed); the exit code to return."""
        if not self.ok:
            print(
                f"\nfedaug-flwr: run {self.run_id or '(none)'} did not complete: "
                f"{self.status} {self.details}",
                file=sys.stderr,
            )
            return 1
        print(f"\nfedaug-flwr: run {self.run_id} completed; results in {self.output_dir}")
        return 0


def flwr_run(
    flwr_home: Path,
    run_config: Mapping[str, object],
    federation_config: Mapping[str, object],
    app_dir: Path = APP_DIR,
    connection: str = CONNECTION,
    stream=None,
    timeout_s: float | None = None,
) -> RunOutcome:
    """``flwr run --stream`` the app, echo its log, and return the run's final status.

    Under each of Flower's ``[ROUND r/n]`` lines it prints a progress line: the
    phase, round r of n and an estimate of the time left in the phase
    (:mod:`fedaug_flwr.progress`)."""
    stream = sys.stdout if stream is None else stream
    env = flwr_env(flwr_home)
    command = [bin_path("flwr"), "run", str(app_dir), connection, "--stream"]
    if run_config:
        command += ["--run-config", to_overrides(run_config)]
    if federation_config:
        command += ["--federation-config", to_overrides(federation_config)]
    process = subprocess.Popen(
        command, env=env, cwd=flwr_home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1,
    )  # fmt: skip
    run_id, output_dir, timed_out = "", "", False
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    lines = _lines_of(process)
    progress = Progress()
    try:
        while True:
            wait_s = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait_s <= 0:  # a real deadline: a silent, hung run is stopped too
                timed_out = True
                abandon(process, env, connection, run_id)
                break
            try:
                line = lines.get(timeout=wait_s)
            except queue.Empty:
                continue
            if line is None:
                break
            stream.write(line)
            if note := progress.feed(line):
                stream.write(note + "\n")
            stream.flush()
            if match := re.search(r"Successfully started run (\d+)", line):
                run_id = match.group(1)
            if match := re.search(r"fedaug-flwr: results of run \d+ are in (.+)$", line):
                output_dir = match.group(1).strip()
    except KeyboardInterrupt:
        abandon(process, env, connection, run_id)
        raise
    process.wait()
    timeout_note = f"(timed out after {timeout_s:.0f} s)" if timed_out else ""
    if not run_id:
        status = "timed-out" if timed_out else "not-started"
        details = f"flwr run exited with {process.returncode} {timeout_note}".strip()
        return RunOutcome("", status, details, "")
    status, details = run_status(env, connection, run_id)
    return RunOutcome(run_id, status, f"{details} {timeout_note}".strip(), output_dir)


def _lines_of(process: subprocess.Popen) -> queue.Queue[str | None]:
    """The process's output lines, read by a thread (None at the end), so waits can time out."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        try:
            for line in process.stdout:
                lines.put(line)
        finally:
            lines.put(None)

    threading.Thread(target=read, name="flwr-run-output", daemon=True).start()
    return lines


def abandon(process: subprocess.Popen, env: Mapping[str, str], connection: str, run_id: str):
    """Stop following a run, and stop the run itself: it would go on in the SuperLink."""
    process.kill()
    process.wait()
    if run_id:
        stop_run(env, connection, run_id)


def stop_run(env: Mapping[str, str], connection: str, run_id: str) -> None:
    """``flwr stop``: the SuperLink ends the run (a stopped run writes no summary)."""
    subprocess.run(
        [bin_path("flwr"), "stop", run_id, connection],
        env=dict(env), capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def run_status(env: Mapping[str, str], connection: str, run_id: str) -> tuple[str, str]:
    listing = subprocess.run(
        [bin_path("flwr"), "list", connection, "--run-id", run_id, "--format", "json"],
        env=dict(env), capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        run = json.loads(listing.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", listing.stdout + listing.stderr


def simulate(
    run_config: Mapping[str, object],
    num_supernodes: int = 10,
    num_cpus: int = 1,
    num_gpus: float = 0.0,
    flwr_home: Path | None = None,
    stream=None,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
    ray_num_gpus: int | None = None,
) -> RunOutcome:
    """One simulated run of the app on a private SuperLink; every process of it is stopped
    afterwards (also when interrupted) and its temporary home removed.

    ``ray_address`` (default ``$RAY_ADDRESS``) runs the client actors on that Ray
    cluster (``docs/scale-out.md``); the cluster itself is left as it was.
    """
    AppConfig.from_run_config(run_config)  # fail before starting anything
    check_environment()
    address = resolve_ray_address(ray_address)
    federation = federation_config(
        num_supernodes, num_cpus, num_gpus, address, ray_num_cpus, ray_num_gpus
    )
    owned = flwr_home is None
    with contextlib.ExitStack() as held:
        held.enter_context(output_dir_held(run_config, "a simulation (fedaug_flwr.launch)"))
        home = Path(tempfile.mkdtemp(prefix="fedaug-flwr-home-")) if owned else flwr_home
        if owned:
            held.callback(shutil.rmtree, home, ignore_errors=True)
        with SuperLink(home, ray_address=address) as superlink:
            write_connection(home, superlink.address)
            return flwr_run(home, run_config, federation, stream=stream)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray-address`` (the launcher's and the sweeps' command lines)."""
    parser.add_argument(
        "--ray-address", metavar="HOST:PORT",
        help="run the client actors on this Ray cluster (started with `ray start`; see "
        "docs/scale-out.md); default: $RAY_ADDRESS, else a new Ray on this machine",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedaug_flwr.launch",
        description="Run fedaug-flwr as a Flower simulation on a private, temporary SuperLink.",
    )
    parser.add_argument("--num-supernodes", type=int, default=10, help="simulated clients")
    parser.add_argument("--num-cpus", type=int, default=1, help="CPU cores per client actor")
    parser.add_argument(
        "--num-gpus", type=float, default=0.0, help="GPU share per client, e.g. 0.25"
    )
    parser.add_argument(
        "--run-config", action="append", default=[], metavar="'k=v k2=v2' | FILE.toml",
        help="run-config overrides, as for flwr run: key=value pairs or a .toml file "
        "(repeatable; later ones win)",
    )  # fmt: skip
    add_ray_arguments(parser)
    parser.add_argument(
        "--ray-num-cpus", type=int, metavar="N",
        help="CPUs of the Ray started on this machine (default: all); not with a cluster",
    )  # fmt: skip
    parser.add_argument(
        "--ray-num-gpus", type=int, metavar="N",
        help="GPUs of the Ray started on this machine (default: all); not with a cluster",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.num_supernodes < 1 or args.num_cpus < 1 or args.num_gpus < 0:
        parser.error("--num-supernodes and --num-cpus must be >= 1, --num-gpus >= 0")
    if (args.ray_num_cpus is not None and args.ray_num_cpus < 1) or (
        args.ray_num_gpus is not None and args.ray_num_gpus < 0
    ):
        parser.error("--ray-num-cpus must be >= 1, --ray-num-gpus >= 0")
    address = resolve_ray_address(args.ray_address)
    try:
        overrides = parse_overrides(args.run_config)
        AppConfig.from_run_config(overrides)
        federation_config(1, ray_address=address, ray_num_cpus=args.ray_num_cpus,
                          ray_num_gpus=args.ray_num_gpus)  # fmt: skip
    except (ConfigError, ValueError) as error:
        parser.error(str(error))
    try:
        with signals_interrupt():
            outcome = simulate(
                overrides, args.num_supernodes, args.num_cpus, args.num_gpus,
                ray_address=address, ray_num_cpus=args.ray_num_cpus,
                ray_num_gpus=args.ray_num_gpus,
            )  # fmt: skip
    except (EnvironmentProblem, OutputFolderError) as error:
        parser.error(str(error))
    except KeyboardInterrupt:  # simulate() has stopped every process of the run already
        print("\nfedaug-flwr: interrupted; the simulation was stopped", file=sys.stderr)
        return 130
    return outcome.report()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While in it, SIGTERM (and SIGINT, which a shell's background job ignores) raise
    KeyboardInterrupt, so what the command started is stopped before it exits; a second
    signal is ignored so that it cannot cut the stopping short. Handlers are restored after."""
    names = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in names}

    def interrupt(signum: int, frame: object) -> None:
        for other in names:
            signal.signal(other, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in names:
        signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
