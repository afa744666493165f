"""Fixtures of the dashboard tests: the review world (``review_world.py``) is built once per session; each test
reviews its own copy of the store and index."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomaly_discovery.ui.settings import UISettings
from tests.ui.review_world import build_review_world, copy_world

APP = Path(__file__).resolve().parents[2] / "anomaly_discovery" / "ui" / "app.py"


@pytest.fixture(scope="session")
def review_template(tmp_path_factory) -> Path:
    return build_review_world(tmp_path_factory.mktemp("review-world"))


@pytest.fixture
def world(review_template, tmp_path, monkeypatch) -> UISettings:
    """Settings of this test's own copy, also exported as the ``ADISC_UI_*`` variables the app reads."""
    settings = copy_world(review_template, tmp_path / "work")
    for name, value in settings.environment().items():
        monkeypatch.setenv(name, value)
    return settings
