"""``run_ui`` / ``adisc ui``: its settings, the ``streamlit run`` flags, and a clear error for a missing store."""

from __future__ import annotations

import socket

import pytest

from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.ui.launch import APP, free_port, run_ui, streamlit_command
from anomaly_discovery.ui.settings import UISettings


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
