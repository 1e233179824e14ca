"""Bring a real Flower deployment up and down on this machine (loopback only).

One ``flower-superlink`` and N ``flower-supernode`` processes, each in its own
process group with its own ``FLWR_HOME`` inside a state folder, everything
bound to 127.0.0.1. The ``flwr`` CLI gets a home of its own there too, so
``~/.flwr`` is never read or written. ``deployment.json`` in the state folder
records every process (pid and start time), so ``down`` works from another
shell and never signals a process that merely reuses a recorded pid.

    python -m fedaug_flwr.deploy up --num-supernodes 3
    python -m fedaug_flwr.deploy run --run-config "cvae-rounds=2 clf-rounds=2"
    python -m fedaug_flwr.deploy status
    python -m fedaug_flwr.deploy down

Secure by default: ``up`` makes a private CA and a SuperLink certificate for
loopback (TLS), one key pair per SuperNode, and starts the SuperLink with
``--enable-supernode-auth`` after registering those keys, so no other
SuperNode can join. ``--insecure`` (no TLS, no authentication) must be asked
for, and is warned about on every start; ``run`` and ``status`` say which
mode is up. The CA's private key is not kept unless ``--keep-ca-key``.

The state folder is private (0700), must belong to the user and is never a
symbolic link; a folder that holds anything but what ``up`` made there is
refused, never cleaned. Each SuperNode reads its own data (``--data-path``, one
per node) or, without it, Dirichlet partition ``i`` of the run's dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.credentials import make_node_keys, make_tls_files, private_folder
from fedaug_flwr.data import DataError, load_node_data
from fedaug_flwr.launch import (
    RunOutcome,
    flwr_run,
    output_dir_held,
    parse_overrides,
    signals_interrupt,
    write_connection,
)
from fedaug_flwr.processes import (
    APP_DIR,
    EnvironmentProblem,
    SuperLink,
    SuperNode,
    bin_path,
    check_environment,
    flwr_env,
    group_members,  # noqa: F401 - re-exported: tests and scripts find processes with it
    processes_with_home,
    start_ticks,
    stop_processes,
)
from fedaug_flwr.results import OutputFolderError

CONNECTION = "fedaug-deploy"
STATE_FILE = "deployment.json"
LOOPBACK = "127.0.0.1"
DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_SUPERNODE_PORT = 9094  # node i listens on DEFAULT_SUPERNODE_PORT + i
STOP_GRACE_S = 15.0
# `up` marks the state folders it makes; a folder holding anything else is refused.
MARKER = ".fedaug-deploy"
# What `up` creates in the state folder; `up` clears exactly these, nothing else.
_OWNED = ("superlink", "supernodes", "flwr-cli", "tls", "keys", STATE_FILE, f".{STATE_FILE}.tmp")
SECURE_MODE = "secure: TLS + SuperNode authentication"
INSECURE_MODE = "INSECURE: no TLS, no SuperNode authentication"


class DeploymentError(RuntimeError):
    """The deployment cannot be brought up, used or brought down as asked."""


def default_state_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"fedaug-deploy-{os.getuid()}"


def default_torch_threads(num_supernodes: int) -> int:
    """Share the cores: SuperNodes run their ClientApps at the same time on this machine."""
    return max(1, (os.cpu_count() or 1) // (num_supernodes + 1))


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """What to bring up, checked before any process starts."""

    num_supernodes: int = 3
    data_paths: tuple[str, ...] = ()
    superlink_port: int = DEFAULT_SUPERLINK_PORT
    supernode_port: int = DEFAULT_SUPERNODE_PORT
    secure: bool = True  # TLS + SuperNode authentication; False only when asked for
    torch_threads: int = 0  # 0: default_torch_threads
    data_sizes: tuple[int | None, ...] = ()  # images per data path, filled in by checked()
    keep_ca_key: bool = False  # leave the CA's private key in <state>/tls/ca.key (0600)

    def checked(self) -> Plan:
        """This plan with data paths made absolute, or :class:`DeploymentError` saying why not."""
        if not isinstance(self.num_supernodes, int) or self.num_supernodes < 1:
            raise DeploymentError(
                f"--num-supernodes must be an integer >= 1; got {self.num_supernodes!r}"
            )
        if self.data_paths and len(self.data_paths) != self.num_supernodes:
            raise DeploymentError(
                f"--data-path must be given once per SuperNode ({self.num_supernodes}) or not at "
                f"all (Dirichlet partitions); got {len(self.data_paths)}"
            )
        ports = [self.superlink_port] + [
            self.supernode_port + i for i in range(self.num_supernodes)
        ]
        for name, port in (
            ("--superlink-port", self.superlink_port),
            ("--supernode-port", self.supernode_port),
        ):
            if not isinstance(port, int) or not 1024 <= port:
                raise DeploymentError(
                    f"{name} must be an integer port in 1024..65535; got {port!r}"
                )
        if max(ports) > 65535:
            raise DeploymentError(
                f"ports {min(ports)}..{max(ports)} run past 65535: "
                "lower --superlink-port / --supernode-port"
            )
        if len(set(ports)) != len(ports):
            raise DeploymentError(
                f"--superlink-port {self.superlink_port} collides with the SuperNode ports "
                f"{self.supernode_port}..{self.supernode_port + self.num_supernodes - 1}"
            )
        busy = [port for port in ports if not port_is_free(port)]
        if busy:
            raise DeploymentError(f"port(s) {busy} on {LOOPBACK} are in use; choose others")
        if self.torch_threads < 0:
            raise DeploymentError(
                f"--torch-threads must be >= 1 (0: automatic); got {self.torch_threads}"
            )
        absolute, sizes = [], []
        for path in self.data_paths:
            if not path:  # this node uses a Dirichlet partition
                absolute.append("")
                sizes.append(None)
                continue
            try:
                sizes.append(len(load_node_data(path)))  # fail now, not in the middle of a run
            except DataError as error:
                raise DeploymentError(str(error)) from error
            absolute.append(str(Path(path).expanduser().resolve()))
        threads = self.torch_threads or default_torch_threads(self.num_supernodes)
        return dataclasses.replace(
            self, data_paths=tuple(absolute), torch_threads=threads, data_sizes=tuple(sizes)
        )

    def node_config(self, index: int) -> dict[str, object]:
        if self.data_paths and self.data_paths[index]:
            return {"partition-id": index, "data-path": self.data_paths[index]}
        return {"partition-id": index, "num-partitions": self.num_supernodes}


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` of loopback (connections in TIME-WAIT do not count:
    Flower's servers bind with SO_REUSEADDR, and so does this check)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class ProcessRecord:
    """A process we started: its pid (= its process group) and when it started."""

    role: str
    pid: int
    start_ticks: int
    log: str
    flwr_home: str  # every process of the group inherits FLWR_HOME: how we recognise them

    @classmethod
    def of(cls, role: str, process: subprocess.Popen, log: Path, home: Path) -> ProcessRecord:
        ticks = start_ticks(process.pid)
        if ticks is None:
            raise DeploymentError(f"{role} exited at once; see {log}")
        return cls(role, process.pid, ticks, str(log), str(home))

    def alive(self) -> bool:
        """Still our process (same pid AND same start time), and not a zombie."""
        return start_ticks(self.pid) == self.start_ticks

    def members(self) -> list[int]:
        """The live processes that are ours: those carrying its FLWR_HOME, in its group or not
        (Flower's SuperExec and what it starts run in a session of their own)."""
        return processes_with_home(self.flwr_home)


def stop_recorded(record: ProcessRecord, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM the process group we started (it may shut down cleanly), then SIGKILL the rest.

    Only processes of ours are signalled: the recorded leader (same pid and
    start time) or, once it is gone, members of its group that carry its
    FLWR_HOME. Returns False when nothing of ours was left to stop.
    """
    if not record.alive() and not record.members():
        return False
    # started with start_new_session: its pid is its group id
    stop_processes(record.pid, record.alive, record.members, grace_s)
    return True


# ----------------------------------------------------------------------- deployment


@dataclass
class State:
    """``deployment.json``: enough to use and stop the deployment from any shell."""

    plan: dict
    superlink_address: str
    flwr_home: str  # the flwr CLI's home (its config.toml names the connection)
    processes: list[ProcessRecord] = field(default_factory=list)
    node_ids: list[int] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        text = json.dumps(asdict(self), indent=2)
        tmp = folder / f".{STATE_FILE}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, folder / STATE_FILE)

    @classmethod
    def load(cls, folder: Path) -> State | None:
        path = folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            data["processes"] = [ProcessRecord(**record) for record in data["processes"]]
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DeploymentError(
                f"{path} is not a deployment record ({error}); remove it"
            ) from error


class LocalDeployment:
    """A SuperLink and SuperNodes on loopback, described by a state folder."""

    def __init__(self, state_dir: Path | None = None) -> None:
        # absolute, but a symbolic link is not followed: it is refused (check_state_dir)
        self.state_dir = Path(os.path.abspath(Path(state_dir or default_state_dir()).expanduser()))
        self.superlink: SuperLink | None = None
        self.supernodes: list[SuperNode] = []

    @property
    def cli_home(self) -> Path:
        return self.state_dir / "flwr-cli"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    def state(self) -> State | None:
        self.check_owner()
        return State.load(self.state_dir)

    # -- the state folder

    def check_owner(self) -> None:
        """The state folder, if it exists, must be a real folder of this user's."""
        try:
            info = os.lstat(self.state_dir)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode):
            raise DeploymentError(
                f"state folder {self.state_dir} is a symbolic link; give a real folder "
                "(--state-dir)"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise DeploymentError(f"state folder {self.state_dir} exists and is not a folder")
        if info.st_uid != os.getuid():
            raise DeploymentError(
                f"state folder {self.state_dir} belongs to uid {info.st_uid}, not to you "
                f"(uid {os.getuid()}); someone else made it: use another --state-dir"
            )

    def check_state_dir(self) -> None:
        """Refuse a state folder that is not ours, or that holds anything `up` did not make."""
        self.check_owner()
        if not self.state_dir.exists():
            return
        entries = set(os.listdir(self.state_dir))
        others = sorted(entries - {MARKER, *_OWNED})
        if others or (entries and MARKER not in entries):
            shown = ", ".join(others[:5] or sorted(entries)[:5])
            raise DeploymentError(
                f"state folder {self.state_dir} holds files that `deploy up` did not make "
                f"({shown}{', ...' if len(others or entries) > 5 else ''}); give an empty or "
                "new folder (--state-dir). Nothing was deleted"
            )

    def make_state_dir(self) -> None:
        """Create the state folder (0700, marked as ours); an existing one is made private."""
        private_folder(self.state_dir)
        (self.state_dir / MARKER).touch()

    def running(self) -> list[ProcessRecord]:
        state = self.state()
        return [record for record in state.processes if record.alive()] if state else []

    # -- up

    def up(
        self,
        plan: Plan,
        node_env: Mapping[int, Mapping[str, str]] | None = None,
        warn: TextIO | None = None,
    ) -> State:
        """Start everything; on any failure stop what was started and re-raise.

        Nothing is created before the environment, the state folder and the
        plan are checked. An insecure plan is warned about on ``warn`` (stderr).
        """
        try:
            check_environment()
        except EnvironmentProblem as error:
            raise DeploymentError(str(error)) from error
        self.check_state_dir()
        if self.running():
            raise DeploymentError(
                f"a deployment is already up in {self.state_dir}; run `down` first"
            )
        plan = plan.checked()
        if not plan.secure:
            print(insecure_warning(plan), file=warn or sys.stderr)
        self.remove_files()
        self.make_state_dir()
        threads = {
            "OMP_NUM_THREADS": str(plan.torch_threads),
            "MKL_NUM_THREADS": str(plan.torch_threads),
        }
        state = State(asdict(plan), f"{LOOPBACK}:{plan.superlink_port}", str(self.cli_home))
        try:
            tls = (
                make_tls_files(self.tls_dir, keep_ca_key=plan.keep_ca_key) if plan.secure else None
            )
            superlink_args = [*tls.superlink_args(), "--enable-supernode-auth"] if tls else []
            self.superlink = SuperLink(
                self.state_dir / "superlink",
                simulation=False,
                host=LOOPBACK,
                port=plan.superlink_port,
                extra_args=superlink_args,
                extra_env=threads,
            )
            self.superlink.start()
            state.processes.append(
                ProcessRecord.of(
                    "superlink",
                    self.superlink.process,
                    self.superlink.log_path,
                    self.superlink.flwr_home,
                )
            )
            state.save(self.state_dir)
            write_connection(
                self.cli_home,
                state.superlink_address,
                CONNECTION,
                root_certificates=tls.ca_certificate if tls else None,
            )
            for index in range(plan.num_supernodes):
                keys = (
                    make_node_keys(self.state_dir / "keys", f"supernode-{index}") if tls else None
                )
                if keys is not None:
                    self.register_node_key(keys.public_key)
                supernode = SuperNode(
                    self.state_dir / "supernodes" / str(index),
                    state.superlink_address,
                    plan.node_config(index),
                    host=LOOPBACK,
                    port=plan.supernode_port + index,
                    root_certificates=tls.ca_certificate if tls else None,
                    auth_private_key=keys.private_key if keys else None,
                    extra_env={**threads, **dict((node_env or {}).get(index, {}))},
                )
                supernode.start()
                self.supernodes.append(supernode)
                state.processes.append(
                    ProcessRecord.of(
                        f"supernode-{index}",
                        supernode.process,
                        supernode.log_path,
                        supernode.flwr_home,
                    )
                )
                state.save(self.state_dir)
            state.node_ids = [supernode.wait_until_connected() for supernode in self.supernodes]
            state.save(self.state_dir)
        except BaseException:
            self.down()
            raise
        return state

    def register_node_key(self, public_key: Path) -> int:
        """``flwr supernode register``: only registered keys may join an auth-enabled SuperLink."""
        command = [bin_path("flwr"), "supernode", "register", str(public_key), CONNECTION]
        result = subprocess.run(
            [*command, "--format", "json"],
            env=flwr_env(self.cli_home),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        try:
            return int(json.loads(result.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DeploymentError(
                f"flwr supernode register {public_key} failed (exit {result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}"
            ) from None

    def remove_files(self, folder_too: bool = False) -> None:
        """Delete what `up` created in the state folder (logs, homes, keys), nothing else;
        with ``folder_too`` also the folder itself when that leaves it empty."""
        if not self.state_dir.exists():
            return
        self.check_state_dir()
        for name in _OWNED:
            path = self.state_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if folder_too:
            (self.state_dir / MARKER).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.state_dir.rmdir()

    # -- run

    def run(
        self, run_config: Mapping[str, object], stream=None, timeout_s: float | None = None
    ) -> RunOutcome:
        """``flwr run`` the app against this deployment and return its final status."""
        config = AppConfig.from_run_config(run_config)  # reject bad input before anything is sent
        state = self.state()
        if state is None or not self.running():
            raise DeploymentError(f"no deployment is up in {self.state_dir}; run `up` first")
        for path, size in zip(state.plan["data_paths"], state.plan["data_sizes"], strict=True):
            if size is not None and size < config.min_partition_size:
                raise DeploymentError(
                    f"data-path {path!r} holds {size} images, fewer than min-partition-size="
                    f"{config.min_partition_size}: too small to split into train/val/test"
                )
        dead = [record.role for record in state.processes if not record.alive()]
        if "superlink" in dead:
            raise DeploymentError(
                f"the SuperLink of {self.state_dir} is not running; `down` then `up`"
            )
        if dead:
            print(f"fedaug-flwr: warning: {', '.join(dead)} not running", file=sys.stderr)
        secure = bool(state.plan.get("secure"))
        print(
            f"fedaug-flwr: deployment in {self.state_dir} is {mode_of(secure)}",
            file=sys.stderr if not secure else (stream or sys.stdout),
        )
        try:
            with output_dir_held(run_config, f"a deployed run ({self.state_dir})"):
                return flwr_run(
                    Path(state.flwr_home), run_config, {}, APP_DIR, CONNECTION, stream, timeout_s
                )
        except OutputFolderError as error:
            raise DeploymentError(str(error)) from error

    # -- down

    def down(self) -> list[str]:
        """Stop every recorded process (SuperNodes first); returns the roles stopped."""
        stopped = []
        state = self.state()
        records = list(reversed(state.processes)) if state else []
        for record in records:
            if stop_recorded(record):
                stopped.append(record.role)
        # Reap the ones this process started itself (no zombies left behind).
        for process in [self.superlink, *self.supernodes]:
            if process is not None and process.process is not None:
                process.stop()
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        return stopped

    def status(self) -> dict:
        state = self.state()
        if state is None:
            return {"state-dir": str(self.state_dir), "up": False}
        return {
            "state-dir": str(self.state_dir),
            "up": any(record.alive() for record in state.processes),
            "superlink": state.superlink_address,
            "secure": state.plan["secure"],
            "mode": mode_of(bool(state.plan["secure"])),
            "flwr-home": state.flwr_home,
            "connection": CONNECTION,
            "node-ids": state.node_ids,
            "processes": [
                {"role": r.role, "pid": r.pid, "running": r.alive(), "log": r.log}
                for r in state.processes
            ],
        }


def mode_of(secure: bool) -> str:
    return SECURE_MODE if secure else INSECURE_MODE


def insecure_warning(plan: Plan) -> str:
    return (
        f"fedaug-flwr: WARNING: starting an {INSECURE_MODE} deployment (--insecure). Any "
        f"process on this machine can join it as a SuperNode on {LOOPBACK}:"
        f"{plan.superlink_port}, receive the models and send back its own; traffic is not "
        "encrypted. Leave out --insecure for TLS and SuperNode authentication."
    )


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedaug_flwr.deploy",
        description="A real Flower deployment of fedaug-flwr on this machine (loopback only).",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="folder for pids, logs, Flower homes, certificates (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a SuperLink and SuperNodes")
    up.add_argument("--num-supernodes", type=int, default=3, help="default: %(default)s")
    up.add_argument(
        "--data-path",
        action="append",
        default=[],
        metavar="PATH",
        help="a SuperNode's own data (.npz or IDX folder), once per SuperNode in order "
        "('' for one that should use Dirichlet partition i); without it node i uses "
        "Dirichlet partition i of the run's dataset",
    )
    up.add_argument("--superlink-port", type=int, default=DEFAULT_SUPERLINK_PORT)
    up.add_argument(
        "--supernode-port",
        type=int,
        default=DEFAULT_SUPERNODE_PORT,
        help="SuperNode i's local Runtime API port is this + i (default: %(default)s)",
    )
    mode = up.add_mutually_exclusive_group()
    mode.add_argument(
        "--secure",
        dest="insecure",
        action="store_false",
        help="TLS with a private CA, and SuperNode authentication with registered keys "
        "(the default)",
    )
    mode.add_argument(
        "--insecure",
        dest="insecure",
        action="store_true",
        help="no TLS and no SuperNode authentication: any local process can join (warned "
        "about on every start)",
    )
    up.set_defaults(insecure=False)
    up.add_argument(
        "--keep-ca-key",
        action="store_true",
        help="keep the private CA's key in <state-dir>/tls/ca.key (mode 0600); by default it "
        "is discarded once the SuperLink certificate is signed",
    )
    up.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="CPU threads per ClientApp/ServerApp process (0: cores / (SuperNodes + 1))",
    )
    run = commands.add_parser("run", help="flwr run the app on the deployment")
    run.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'k=v k2=v2'",
        help="run-config overrides, as for flwr run (repeatable)",
    )
    commands.add_parser("status", help="show the deployment's processes")
    down = commands.add_parser("down", help="stop every process of the deployment")
    down.add_argument("--clean", action="store_true", help="also delete the state folder and logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    deployment = LocalDeployment(args.state_dir)
    try:
        with signals_interrupt():  # SIGTERM, like Ctrl-C, stops what this command started
            return _command(args, deployment)
    except (DeploymentError, ConfigError) as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print("\nfedaug-flwr: interrupted; what this command started was stopped", file=sys.stderr)
        return 130


def _command(args: argparse.Namespace, deployment: LocalDeployment) -> int:
    """Carry out one sub-command; the exit status."""
    if args.command == "up":
        plan = Plan(
            args.num_supernodes,
            tuple(args.data_path),
            args.superlink_port,
            args.supernode_port,
            not args.insecure,
            args.torch_threads,
            keep_ca_key=args.keep_ca_key,
        )
        state = deployment.up(plan)
        print(json.dumps(deployment.status(), indent=2))
        print(
            f"\nfedaug-flwr: {len(state.node_ids)} SuperNodes connected to "
            f"{state.superlink_address}. Next: python -m fedaug_flwr.deploy "
            f"--state-dir {deployment.state_dir} run --run-config '...'"
        )
    elif args.command == "run":
        overrides = parse_overrides(args.run_config)
        if deployment.run(overrides).report() != 0:
            return 1
    elif args.command == "status":
        print(json.dumps(deployment.status(), indent=2))
    elif args.command == "down":
        stopped = deployment.down()
        print(f"fedaug-flwr: stopped {', '.join(stopped) or 'nothing (no process was running)'}")
        if args.clean:
            deployment.remove_files(folder_too=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
