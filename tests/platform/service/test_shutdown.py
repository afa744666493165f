"""A real ``adisc serve`` process (its own local Ray: GCS, raylet, workers, the Serve proxy holding the port) ends
with its whole process tree on SIGTERM, as a process manager or container runtime stops it, and on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.platform.ray_fixtures import free_port
from tests.platform.serve_world import build_world
from tests.processes import alive, command_line, descendants, port_open, wait_until

START_TIMEOUT_S = 240


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_adisc_serve_stops_its_whole_process_tree_on_a_signal(tmp_path, stop):
    world = build_world(tmp_path / "world")
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "anomaly_discovery.cli", "serve", "--store", world.store_url, "--index",
               str(world.index_path), "--model", str(world.model_dir), "--port", str(port)]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"})
    try:
        assert wait_until(lambda: healthy(port) or process.poll() is not None, START_TIMEOUT_S, 1.0), log.read_text()
        assert process.poll() is None, log.read_text()
        tree = descendants(process.pid)
        assert any("ProxyActor" in command_line(pid) for pid in tree), "the Serve proxy runs below adisc serve"
        os.kill(process.pid, stop)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert wait_until(lambda: not any(alive(pid) for pid in tree), 30), \
            [command_line(pid) for pid in tree if alive(pid)]
        assert not port_open(port), f"port {port} still accepts connections"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
