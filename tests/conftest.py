"""Shared fixtures: tiny real files written per test, the path of ../shared/datasets, and the discovery world
(``adisc demo --quick``, built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.discovery_world import DiscoveryWorld, build_discovery_world

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/datasets, or skip the test when it is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/datasets on development machines)")
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="session")
def discovery_world(tmp_path_factory) -> DiscoveryWorld:
    """``adisc demo --quick``'s work folder: a real discovery serving model, store and index (read only)."""
    return build_discovery_world(tmp_path_factory.mktemp("discovery-world"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
