"""``run_ui`` / ``adisc ui``: its settings, the ``streamlit run`` flags, a clear error for a missing store, and a
real ``adisc ui`` process whose whole tree ends on SIGTERM and on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.ui.launch import APP, free_port, run_ui, streamlit_command
from anomaly_discovery.ui.settings import UISettings
from tests.processes import alive, command_line, descendants, port_open, wait_until


def test_streamlit_runs_headless_without_usage_stats_or_file_watcher_on_the_given_address():
    command = streamlit_command("127.0.0.1", 8765)
    assert command[1:5] == ["-m", "streamlit", "run", str(APP)]
    for flag in ("--server.headless=true", "--browser.gatherUsageStats=false", "--server.fileWatcherType=none",
                 "--server.address=127.0.0.1", "--server.port=8765"):
        assert flag in command


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_settings_default_to_the_service_state_the_demo_publishes_and_travel_through_the_environment(tmp_path):
    settings = UISettings.for_workdir(tmp_path)
    paths = ServicePaths(tmp_path.resolve())
    assert (settings.store, settings.index, settings.model) == (paths.store_url, paths.index, paths.model)
    assert settings.data == tmp_path.resolve() / "data"
    assert UISettings.from_environment(settings.environment()) == settings


def test_settings_without_a_workdir_say_how_to_start_the_dashboard():
    with pytest.raises(ValueError, match="adisc ui"):
        UISettings.from_environment({})


def test_run_ui_refuses_a_workdir_without_a_store_before_starting_anything(tmp_path):
    with pytest.raises(FileNotFoundError, match="no store at .*adisc demo"):
        run_ui({"workdir": str(tmp_path), "port": 1})
    assert not list(tmp_path.rglob("adisc.db"))


def test_run_ui_refuses_a_missing_index(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="no index at"):
        run_ui({"workdir": str(world.workdir), "index": str(tmp_path / "none.npz")})


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_adisc_ui_stops_its_whole_process_tree_on_a_signal(world, tmp_path, stop):
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "anomaly_discovery.cli", "ui", "--workdir",
                                    str(world.workdir), "--port", str(port)], stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        assert wait_until(lambda: port_open(port) or process.poll() is not None, 90), log.read_text()
        assert process.poll() is None, log.read_text()
        tree = descendants(process.pid)
        assert tree, "the dashboard runs in a child process"
        os.kill(process.pid, stop)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert wait_until(lambda: not any(alive(pid) for pid in tree), 10), \
            [command_line(pid) for pid in tree if alive(pid)]
        assert not port_open(port), f"port {port} still accepts connections"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
