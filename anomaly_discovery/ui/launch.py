"""``adisc ui``: start the review dashboard with ``streamlit run`` (headless, no usage statistics, no file
watcher) on the store and index of a work folder (by default the one ``adisc demo`` wrote). The server runs in a
process group of its own, stopped as a whole on SIGTERM or SIGINT."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anomaly_discovery.platform.service.shutdown import interrupt_on_terminate, stop_process_group
from anomaly_discovery.ui.settings import UISettings

APP = Path(__file__).resolve().parent / "app.py"
DEFAULT_WORKDIR = Path("demo_out")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def streamlit_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless=true",
            "--browser.gatherUsageStats=false", "--server.fileWatcherType=none", "--server.runOnSave=false",
            f"--server.address={host}", f"--server.port={port}", "--client.toolbarMode=minimal"]


def dashboard_environment(settings: UISettings) -> dict[str, str]:
    """This process's environment plus the ``ADISC_UI_*`` variables the app reads its settings from."""
    return {**os.environ, **settings.environment()}


def run_ui(args: Mapping[str, Any] | Any) -> int:
    """Start the dashboard and block until it stops; SIGTERM or SIGINT (Ctrl-C) stops the Streamlit server and
    every process it started (``platform/service/shutdown.py``), then returns 0. Arguments (a mapping or an
    argparse namespace): ``store`` (--store URL), ``index`` (--index PATH), ``workdir`` (--workdir DIR, default
    demo_out/), ``port`` (--port, default a free one), ``host`` (--host, default 127.0.0.1); optionally ``model``
    and ``data`` (the predictor folder for Inspect and the labelled data set for Evaluation, by default ``model/``
    and ``data/`` in the work folder)."""
    values = dict(args if isinstance(args, Mapping) else vars(args))
    settings = UISettings.for_workdir(values.get("workdir") or DEFAULT_WORKDIR, values.get("store"),
                                      values.get("index"), values.get("model"), values.get("data"))
    settings.check()
    host = values.get("host") or "127.0.0.1"
    port = int(values.get("port") or free_port(host))
    command = streamlit_command(host, port)
    print(f"adisc ui: http://{host}:{port} (store {settings.store}, index {settings.index}); Ctrl-C stops\n"
          f"  {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, env=dashboard_environment(settings), start_new_session=True)
    with interrupt_on_terminate():
        try:
            return process.wait()
        except KeyboardInterrupt:
            stop_process_group(process)
            return 0
