"""Fixtures of the export tests: the dashboard tests' review world (two known kinds, two proposals), built once per
session; each test works on its own copy of the store and index, with a review loop on it and, through
``reviewed``, a few reviewer decisions already taken."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from anomaly_discovery.platform.export.snapshot import read_snapshot
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import LoopConfig
from anomaly_discovery.platform.storage.store import Store
from anomaly_discovery.ui.settings import UISettings
from tests.platform.serve_world import DIM
from tests.ui.review_world import build_review_world, copy_world

REVIEWER = "ana"


@pytest.fixture(scope="session")
def review_template(tmp_path_factory) -> Path:
    return build_review_world(tmp_path_factory.mktemp("export-world"))


@pytest.fixture
def world(review_template, tmp_path) -> UISettings:
    return copy_world(review_template, tmp_path / "work")


@pytest.fixture
def loop(world):
    store = Store(world.store)
    review_loop = DiscoveryLoop(store, world.index, DIM, LoopConfig(background_save=False))
    yield review_loop
    review_loop.close()
    store.dispose()


def kind_of(path: str) -> str:
    """The defect kind a review-world image shows (its folder: ``data/<kind>/<kind>_<i>.png``)."""
    return Path(path).parent.name


@dataclass(frozen=True)
class Review:
    """What ``reviewed`` decided: the kind each proposal held, the region moved out of rust, the last decision."""

    confirmed_kind: str
    rejected_kind: str
    dropped_region: int
    last_decision: int


def proposal_kinds(loop: DiscoveryLoop) -> dict[int, str]:
    """Open proposal id → the kind of most of its members (by their images)."""
    regions = read_snapshot(loop.store).regions
    kinds = {}
    for proposal_id, members in regions.dropna(subset=["proposal_id"]).groupby("proposal_id"):
        kinds[int(proposal_id)] = Counter(kind_of(p) for p in members["image_path"]).most_common(1)[0][0]
    return kinds


@pytest.fixture
def reviewed(loop) -> Review:
    """Confirm one proposal as its kind, reject the other, drop one rust region, rename stain to 'blue stain'."""
    (confirm_id, confirm_kind), (reject_id, reject_kind) = sorted(proposal_kinds(loop).items())
    loop.confirm(confirm_id, confirm_kind, reviewer=REVIEWER)
    loop.reject(reject_id, reviewer="bo")
    rust = next(c.id for c in loop.classes.values() if c.name == "rust")
    dropped = int(loop.mirror.members(rust)[0])
    loop.move([dropped], None, reviewer=REVIEWER)
    stain = next(c for c in loop.classes.values() if c.name == "stain")
    last = loop.rename(stain.id, "blue stain", expected_version=stain.version, reviewer="bo")
    return Review(confirm_kind, reject_kind, dropped, last.decision_id)
