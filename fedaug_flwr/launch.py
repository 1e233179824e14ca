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
the owner's pid), and whether it holds an interrupted run to resume (its
checkpoint, :mod:`fedaug_flwr.checkpoint`: the same command resumes it; one of
another config is refused). SIGTERM ends a launch like Ctrl-C: the run is
stopped first.

Command line (``make run`` uses it)::

    python -m fedaug_flwr.launch --num-supernodes 10 --run-config "num-synthetic=500"

The processes themselves (:class:`~fedaug_flwr.processes.SuperLink`, the
``/proc`` readers, the stopper) live in :mod:`fedaug_flwr.processes`; their
names are re-exported here for the scripts and tests that import them from
this module.
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
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedaug_flwr.checkpoint import CheckpointError, check_folder
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.processes import (  # noqa: F401 - also re-exported (see the docstring)
    APP_DIR,
    FLOWER_EXECUTABLES,
    RAY_ADDRESS_VARIABLE,
    SIMULATION_ENV,
    STARTUP_TIMEOUT_S,
    EnvironmentProblem,
    SuperLink,
    SuperNode,
    SuperNodeRefused,
    _live_pids,
    bin_path,
    check_environment,
    flwr_env,
    flwr_home_of,
    free_port,
    group_members,
    last_error,
    processes_with_home,
    ray_cluster_env,
    start_ticks,
    stop_process_tree,
    to_overrides,
    toml_value,
)
from fedaug_flwr.progress import Progress
from fedaug_flwr.results import OutputFolderError, ensure_writable, folder_lock, resolve_output_dir

CONNECTION = "fedaug-local"


# ------------------------------------------------------------------ an existing Ray cluster


def resolve_ray_address(explicit: str | None = None) -> str | None:
    """The Ray cluster a simulation attaches to: ``explicit`` (``--ray-address``), else
    ``$RAY_ADDRESS``; None (a new Ray on this machine) when neither is set or it is
    ``local``, Ray's own word for that."""
    address = (explicit or os.environ.get(RAY_ADDRESS_VARIABLE) or "").strip()
    return None if address in ("", "local") else address


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
        command,
        env=env,
        cwd=flwr_home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
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
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def run_status(env: Mapping[str, str], connection: str, run_id: str) -> tuple[str, str]:
    listing = subprocess.run(
        [bin_path("flwr"), "list", connection, "--run-id", run_id, "--format", "json"],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
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
        folder = held.enter_context(
            output_dir_held(run_config, "a simulation (fedaug_flwr.launch)")
        )
        if folder is not None:
            where = check_folder(folder, AppConfig.from_run_config(run_config).to_run_config())
            if where is not None:
                print(
                    f"fedaug-flwr: {folder} holds an interrupted run of this config; "
                    f"it resumes from its checkpoint ({where})",
                    file=sys.stdout if stream is None else stream,
                    flush=True,
                )
        home = Path(tempfile.mkdtemp(prefix="fedaug-flwr-home-")) if owned else flwr_home
        if owned:
            held.callback(shutil.rmtree, home, ignore_errors=True)
        with SuperLink(home, ray_address=address) as superlink:
            write_connection(home, superlink.address)
            return flwr_run(home, run_config, federation, stream=stream)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray-address`` (the launcher's and the sweeps' command lines)."""
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the client actors on this Ray cluster (started with `ray start`; see "
        "docs/scale-out.md); default: $RAY_ADDRESS, else a new Ray on this machine",
    )


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
        "--run-config",
        action="append",
        default=[],
        metavar="'k=v k2=v2' | FILE.toml",
        help="run-config overrides, as for flwr run: key=value pairs or a .toml file "
        "(repeatable; later ones win)",
    )
    add_ray_arguments(parser)
    parser.add_argument(
        "--ray-num-cpus",
        type=int,
        metavar="N",
        help="CPUs of the Ray started on this machine (default: all); not with a cluster",
    )
    parser.add_argument(
        "--ray-num-gpus",
        type=int,
        metavar="N",
        help="GPUs of the Ray started on this machine (default: all); not with a cluster",
    )
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
        federation_config(
            1, ray_address=address, ray_num_cpus=args.ray_num_cpus, ray_num_gpus=args.ray_num_gpus
        )
    except (ConfigError, ValueError) as error:
        parser.error(str(error))
    try:
        with signals_interrupt():
            outcome = simulate(
                overrides,
                args.num_supernodes,
                args.num_cpus,
                args.num_gpus,
                ray_address=address,
                ray_num_cpus=args.ray_num_cpus,
                ray_num_gpus=args.ray_num_gpus,
            )
    except (EnvironmentProblem, OutputFolderError, CheckpointError) as error:
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
