"""A multi-node Ray cluster on this machine, for tests: ``ray start`` processes, stopped by id.

Each node is a ``ray start --block`` process in a session of its own (its
process group holds the node's GCS, raylet, agents and monitors). Every process
of the cluster, the Ray workers its raylets start included, carries
``MARKER=<the cluster's temporary folder>`` in its environment, so stopping
finds them all, wherever they put themselves, and nothing else. ``ray stop``
is never used: it stops every Ray on the machine.

Nodes have the loopback address 127.0.0.2 (Ray turns 127.0.0.1 into the
machine's network address for multi-node clusters; other loopback addresses
are kept). A multi-node Ray still listens on every interface: the ports are
random and the cluster lives for one test module. Ray's temporary folder (and
with it the ``ray_current_cluster`` file that a plain ``ray.init()`` attaches
to) is the cluster's own folder, never ``/tmp/ray``: other Rays on the machine
do not see this cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedaug_flwr.launch import SIMULATION_ENV, _live_pids, bin_path, free_port

MARKER = "FEDAUG_TEST_RAY_CLUSTER"
NODE_IP = "127.0.0.2"
START_TIMEOUT_S = 120.0


def processes_with_marker(value: str) -> list[int]:
    """Live processes (but this one) started with ``MARKER=value``."""
    entry = f"{MARKER}={value}".encode()
    found = []
    for pid in _live_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry in environ:
            found.append(pid)
    return found


@dataclass
class LocalRayCluster:
    """``nodes`` Ray nodes of ``cpus_per_node`` CPUs each (and no GPU)."""

    nodes: int = 2
    cpus_per_node: int = 1
    port: int = field(default_factory=free_port)
    folder: Path | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{NODE_IP}:{self.port}"

    def env(self) -> dict[str, str]:
        env = {**SIMULATION_ENV, **os.environ}
        env.pop("RAY_ADDRESS", None)
        env.update(
            {
                MARKER: str(self.folder),
                "RAY_TMPDIR": str(self.folder),  # Ray's default temporary folder: ours
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
            }
        )
        return env

    def _node_args(self) -> list[str]:
        ports = (
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        )
        args = ["--node-ip-address", NODE_IP, "--num-cpus", str(self.cpus_per_node)]
        args += ["--num-gpus", "0", "--object-store-memory", str(100 * 1024**2)]
        args += ["--min-worker-port", "0", "--max-worker-port", "0"]
        for option in ports:  # every port free, none of Ray's fixed defaults
            args += [option, str(free_port())]
        return [*args, "--temp-dir", str(self.folder), "--disable-usage-stats", "--block"]

    def _start_node(self, head: bool) -> subprocess.Popen:
        index = len(self.processes)
        if head:
            role = ["--head", "--port", str(self.port), "--include-dashboard", "false"]
            role += ["--dashboard-port", str(free_port())]
            role += ["--ray-client-server-port", str(free_port())]
        else:
            role = ["--address", self.address]
        log = (self.folder / f"node-{index}.log").open("wb")
        process = subprocess.Popen(
            [bin_path("ray"), "start", *role, *self._node_args()],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        self._wait_for(index, process)
        return process

    def _wait_for(self, index: int, process: subprocess.Popen) -> None:
        log = self.folder / f"node-{index}.log"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Ray runtime started." in text:
                return
            if process.poll() is not None:
                raise RuntimeError(f"ray start (node {index}) exited: {text[-2000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"ray start (node {index}) did not start in {START_TIMEOUT_S:.0f} s")

    def start(self) -> LocalRayCluster:
        # Short: Ray's socket paths under it must fit in 107 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="fa-ray-", dir="/tmp"))
        try:
            for index in range(self.nodes):
                self._start_node(head=index == 0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every node's process group and every marked process, SIGKILL what is
        left after ``grace_s``, reap the ``ray start`` processes, remove the folder."""
        if self.folder is None:
            return
        marker = str(self.folder)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for process in self.processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, sig)  # a session of its own: pid = group
            for pid in processes_with_marker(marker):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while processes_with_marker(marker) and time.monotonic() < deadline:
                for process in self.processes:
                    process.poll()
                time.sleep(0.2)
            if not processes_with_marker(marker):
                break
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5.0)
        shutil.rmtree(self.folder, ignore_errors=True)

    def probe(self, code: str, timeout_s: float = 120.0) -> object:
        """Run ``code`` in a fresh Python attached to the cluster (``ray.init`` via
        RAY_ADDRESS); it must print one JSON value as its last line, returned here."""
        script = "import json, ray\nray.init(logging_level='ERROR')\n" + code
        env = {**self.env(), "RAY_ADDRESS": self.address}
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if result.returncode != 0:
            raise RuntimeError(f"probe failed: {result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
