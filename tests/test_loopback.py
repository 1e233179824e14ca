"""A simulation's Ray listens on loopback only, with the environment the launcher gives flwr.

By default Ray binds the machine's network address and every interface; the
launcher's ``flwr_env`` selects a single-machine Ray that binds 127.0.0.1.
(Deployments are checked in test_deployment.py.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedaug_flwr.launch import APP_DIR, flwr_env
from tests.sockets import descendants, is_loopback, listening_addresses

pytestmark = pytest.mark.simulation

RAY_THEN_WAIT = """
import sys, ray
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
print("ready", flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def test_ray_started_with_the_launchers_environment_listens_on_loopback_only(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", RAY_THEN_WAIT],
        env=flwr_env(tmp_path),
        cwd=APP_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        addresses = listening_addresses([process.pid, *descendants(process.pid)])
    finally:
        process.communicate("\n", timeout=120)
    assert addresses, "Ray should be listening somewhere"
    assert [a for a, _ in addresses if not is_loopback(a)] == []
