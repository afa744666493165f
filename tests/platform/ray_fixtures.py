"""Serve on top of the one session-scoped Ray of ``tests/platform/ray_cluster.py``: the HTTP proxy on a free
loopback port, shut down at the end of the session. The API token reaches the replicas through their
runtime env (``replica_env``), whoever started Ray."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.platform.ray_cluster import ray_session  # noqa: F401 (the shared session fixture)

TOKEN_VARIABLE = "ADISC_TEST_TOKEN"
TOKEN = "test-token-5b1d"
REPLICA_ENV = {"env_vars": {TOKEN_VARIABLE: TOKEN, "OMP_NUM_THREADS": "1"}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port(ray_session) -> Iterator[int]:  # noqa: F811
    """Port of a running Serve HTTP proxy."""
    serve = pytest.importorskip("ray.serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
