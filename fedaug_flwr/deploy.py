"""Bring a real Flower deployment up and down on this machine (loopback only).

One ``flower-superlink`` and N ``flower-supernode`` processes, each in its own
process group with its own ``FLWR_HOME`` inside a state folder, everything
bound to 127.0.0.1. The ``flwr`` CLI gets a home of its own there too, so
``~/.flwr`` is never read or written. ``deployment.json`` in the state folder
records every process (pid and start time), so ``down`` works from another
shell and never signals a process that merely reuses a recorded pid.

    python -m fedaug_flwr.deploy up --num-supernodes 3 --secure
    python -m fedaug_flwr.deploy run --run-config "cvae-rounds=2 clf-rounds=2"
    python -m fedaug_flwr.deploy status
    python -m fedaug_flwr.deploy down

``--secure`` makes a private CA and a SuperLink certificate for loopback
(TLS), one key pair per SuperNode, and starts the SuperLink with
``--enable-supernode-auth`` after registering those keys, so no other
SuperNode can join. Each SuperNode reads its own data (``--data-path``, one
per node) or, without it, Dirichlet partition ``i`` of the run's dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.credentials import make_node_keys, make_tls_files
from fedaug_flwr.data import DataError, load_node_data
from fedaug_flwr.launch import (
    APP_DIR,
    RunOutcome,
    SuperLink,
    SuperNode,
    bin_path,
    flwr_env,
    flwr_run,
    parse_overrides,
    write_connection,
)

CONNECTION = "fedaug-deploy"
STATE_FILE = "deployment.json"
LOOPBACK = "127.0.0.1"
DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_SUPERNODE_PORT = 9094  # node i listens on DEFAULT_SUPERNODE_PORT + i
STOP_GRACE_S = 15.0
# What `up` creates in the state folder; `up` clears exactly these, nothing else.
_OWNED = ("superlink", "supernodes", "flwr-cli", "tls", "keys", STATE_FILE)


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
    secure: bool = False
    torch_threads: int = 0  # 0: default_torch_threads
    data_sizes: tuple[int | None, ...] = ()  # images per data path, filled in by checked()

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
        return Plan(self.num_supernodes, tuple(absolute), self.superlink_port, self.supernode_port,
                    self.secure, threads, tuple(sizes))  # fmt: skip

    def node_config(self, index: int) -> dict[str, object]:
        if self.data_paths and self.data_paths[index]:
            return {"partition-id": index, "data-path": self.data_paths[index]}
        return {"partition-id": index, "num-partitions": self.num_supernodes}


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
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
        """The live processes of its group that are ours (FLWR_HOME under its home)."""
        return [pid for pid in group_members(self.pid) if flwr_home_of(pid) == self.flwr_home]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields 3.. (the name may hold spaces)


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22: start time in clock ticks since boot


def group_members(group: int) -> list[int]:
    """Live processes in process group ``group``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == group:
                members.append(int(entry.name))
    return members


def flwr_home_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"FLWR_HOME="):
            return entry[len(b"FLWR_HOME=") :].decode(errors="replace")
    return None


def stop_recorded(record: ProcessRecord, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM the process group we started (it may shut down cleanly), then SIGKILL the rest.

    Only processes of ours are signalled: the recorded leader (same pid and
    start time) or, once it is gone, members of its group that carry its
    FLWR_HOME. Returns False when nothing of ours was left to stop.
    """
    group = record.pid  # started with start_new_session: its pid is its group id
    if not record.alive() and not record.members():
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            if record.alive():
                os.killpg(group, sig)
            else:  # leader gone: signal our leftovers one by one
                for pid in record.members():
                    os.kill(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait_s
        while record.members() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not record.members():
            return True
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
        self.state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
        self.superlink: SuperLink | None = None
        self.supernodes: list[SuperNode] = []

    @property
    def cli_home(self) -> Path:
        return self.state_dir / "flwr-cli"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    def state(self) -> State | None:
        return State.load(self.state_dir)

    def running(self) -> list[ProcessRecord]:
        state = self.state()
        return [record for record in state.processes if record.alive()] if state else []

    # -- up

    def up(self, plan: Plan, node_env: Mapping[int, Mapping[str, str]] | None = None) -> State:
        """Start everything; on any failure stop what was started and re-raise."""
        if self.running():
            raise DeploymentError(
                f"a deployment is already up in {self.state_dir}; run `down` first"
            )
        plan = plan.checked()
        self.remove_files()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        threads = {
            "OMP_NUM_THREADS": str(plan.torch_threads),
            "MKL_NUM_THREADS": str(plan.torch_threads),
        }
        state = State(asdict(plan), f"{LOOPBACK}:{plan.superlink_port}", str(self.cli_home))
        try:
            tls = make_tls_files(self.tls_dir) if plan.secure else None
            superlink_args = [*tls.superlink_args(), "--enable-supernode-auth"] if tls else []
            self.superlink = SuperLink(
                self.state_dir / "superlink", simulation=False, host=LOOPBACK,
                port=plan.superlink_port, extra_args=superlink_args, extra_env=threads,
            )  # fmt: skip
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
                self.cli_home, state.superlink_address, CONNECTION,
                root_certificates=tls.ca_certificate if tls else None,
            )  # fmt: skip
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
            env=flwr_env(self.cli_home), capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        try:
            return int(json.loads(result.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DeploymentError(
                f"flwr supernode register {public_key} failed (exit {result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}"
            ) from None

    def remove_files(self) -> None:
        """Delete what `up` created in the state folder (logs, homes, keys), nothing else."""
        for name in _OWNED:
            path = self.state_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

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
        return flwr_run(
            Path(state.flwr_home), run_config, {}, APP_DIR, CONNECTION, stream, timeout_s
        )

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
            "flwr-home": state.flwr_home,
            "connection": CONNECTION,
            "node-ids": state.node_ids,
            "processes": [
                {"role": r.role, "pid": r.pid, "running": r.alive(), "log": r.log}
                for r in state.processes
            ],
        }


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedaug_flwr.deploy",
        description="A real Flower deployment of fedaug-flwr on this machine (loopback only).",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=default_state_dir(),
        help="folder for pids, logs, Flower homes, certificates (default: %(default)s)",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a SuperLink and SuperNodes")
    up.add_argument("--num-supernodes", type=int, default=3, help="default: %(default)s")
    up.add_argument(
        "--data-path", action="append", default=[], metavar="PATH",
        help="a SuperNode's own data (.npz or IDX folder), once per SuperNode in order "
        "('' for one that should use Dirichlet partition i); without it node i uses "
        "Dirichlet partition i of the run's dataset",
    )  # fmt: skip
    up.add_argument("--superlink-port", type=int, default=DEFAULT_SUPERLINK_PORT)
    up.add_argument(
        "--supernode-port", type=int, default=DEFAULT_SUPERNODE_PORT,
        help="SuperNode i's local Runtime API port is this + i (default: %(default)s)",
    )  # fmt: skip
    up.add_argument(
        "--secure", action="store_true",
        help="TLS with a private CA, and SuperNode authentication with registered keys",
    )  # fmt: skip
    up.add_argument(
        "--torch-threads", type=int, default=0,
        help="CPU threads per ClientApp/ServerApp process (0: cores / (SuperNodes + 1))",
    )  # fmt: skip
    run = commands.add_parser("run", help="flwr run the app on the deployment")
    run.add_argument(
        "--run-config", action="append", default=[], metavar="'k=v k2=v2'",
        help="run-config overrides, as for flwr run (repeatable)",
    )  # fmt: skip
    commands.add_parser("status", help="show the deployment's processes")
    down = commands.add_parser("down", help="stop every process of the deployment")
    down.add_argument("--clean", action="store_true", help="also delete the state folder and logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    deployment = LocalDeployment(args.state_dir)
    try:
        if args.command == "up":
            plan = Plan(
                args.num_supernodes, tuple(args.data_path), args.superlink_port,
                args.supernode_port, args.secure, args.torch_threads,
            )  # fmt: skip
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
            print(
                f"fedaug-flwr: stopped {', '.join(stopped) or 'nothing (no process was running)'}"
            )
            if args.clean:
                deployment.remove_files()
    except (DeploymentError, ConfigError) as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print("\nfedaug-flwr: interrupted; what this command started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
