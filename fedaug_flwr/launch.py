"""Run the app through ``flwr run`` against a SuperLink this process owns.

``flwr run .`` on its own starts a background SuperLink on fixed ports that
outlives the command, keeps the environment it was first started with
(runtime dependency installation included) and is shared by every user of the
machine. This module instead starts a private ``flower-superlink`` (simulation
mode, loopback, free ports, a temporary ``FLWR_HOME``, no runtime installs),
runs the app with ``flwr run --stream``, reads the run's final status (``flwr
run`` exits 0 even when the run failed) and stops the SuperLink by its process
group.

Command line (``make run`` uses it)::

    python -m fedaug_flwr.launch --num-supernodes 10 --run-config "num-synthetic=500"

The same process classes (:class:`SuperLink`, :class:`SuperNode`) run a real
deployment in :mod:`fedaug_flwr.deploy`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedaug_flwr.config import AppConfig, ConfigError

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


def flwr_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for flwr commands: private home, offline, no runtime installs.

    It also keeps a simulation's Ray on loopback: by default Ray listens on the
    machine's network address and on all interfaces; as a single-machine
    "local" Ray (what this variable selects) it binds 127.0.0.1 only. And it
    sets the simulation's thread and priority settings (SIMULATION_ENV) unless
    the caller's environment already does.
    """
    env = {**SIMULATION_ENV, **(os.environ if base is None else base)}
    # Flower's processes start each other by name (flower-superexec, flwr-simulation...).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    return env


def bin_path(name: str) -> str:
    """A Flower executable from this interpreter's environment (or PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


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
            env={**flwr_env(self.flwr_home), **self.extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() takes its children too
        )
        log.close()
        self._wait_until_up()
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
        self.stop()
        raise RuntimeError(f"flower-superlink did not start in {STARTUP_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        stop_process_group(self.process)

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
        if self.process is None or self.process.poll() is not None:
            return
        stop_process_group(self.process)

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


def parse_overrides(texts: Sequence[str]) -> dict[str, object]:
    """Parse ``--run-config`` strings (``k=v k2='s'``) as flwr does, via TOML."""
    values: dict[str, object] = {}
    for text in texts:
        lines = "\n".join(re.findall(r"[\w.-]+\s*=\s*(?:'[^']*'|\"[^\"]*\"|\S+)", text))
        try:
            values.update(tomllib.loads(lines))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"cannot parse --run-config {text!r}: {error}") from error
    return values


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
    """``flwr run --stream`` the app, echo its log, and return the run's final status."""
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
    run_id, output_dir = "", ""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        for line in process.stdout:
            stream.write(line)
            stream.flush()
            if match := re.search(r"Successfully started run (\d+)", line):
                run_id = match.group(1)
            if match := re.search(r"fedaug-flwr: results of run \d+ are in (.+)$", line):
                output_dir = match.group(1).strip()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"flwr run took longer than {timeout_s:.0f} s")
    except KeyboardInterrupt:
        abandon(process, env, connection, run_id)
        raise
    except TimeoutError:
        abandon(process, env, connection, run_id)
    process.wait()
    if not run_id:
        return RunOutcome("", "not-started", f"flwr run exited with {process.returncode}", "")
    status, details = run_status(env, connection, run_id)
    return RunOutcome(run_id, status, details, output_dir)


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
) -> RunOutcome:
    """One simulated run of the app on a private SuperLink, cleaned up afterwards."""
    AppConfig.from_run_config(run_config)  # fail before starting anything
    owned = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fedaug-flwr-home-")) if owned else flwr_home
    try:
        with SuperLink(home) as superlink:
            write_connection(home, superlink.address)
            federation = {
                "num-supernodes": num_supernodes,
                "client-resources-num-cpus": num_cpus,
                "client-resources-num-gpus": float(num_gpus),
            }
            return flwr_run(home, run_config, federation, stream=stream)
    finally:
        if owned:
            shutil.rmtree(home, ignore_errors=True)


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
        "--run-config", action="append", default=[], metavar="'k=v k2=v2'",
        help="run-config overrides, as for flwr run (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.num_supernodes < 1 or args.num_cpus < 1 or args.num_gpus < 0:
        parser.error("--num-supernodes and --num-cpus must be >= 1, --num-gpus >= 0")
    try:
        overrides = parse_overrides(args.run_config)
        AppConfig.from_run_config(overrides)
    except ConfigError as error:
        parser.error(str(error))
    try:
        outcome = simulate(overrides, args.num_supernodes, args.num_cpus, args.num_gpus)
    except KeyboardInterrupt:  # simulate() has stopped its SuperLink already
        print("\nfedaug-flwr: interrupted; the simulation was stopped", file=sys.stderr)
        return 130
    return outcome.report()


if __name__ == "__main__":
    sys.exit(main())
