"""Where the service state of one work folder lives: light to import (no torch, Ray or SQL)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServicePaths:
    """The layout ``adisc demo`` publishes and ``adisc serve`` / ``adisc ui`` read by default."""

    workdir: Path

    @property
    def service(self) -> Path:
        return Path(self.workdir) / "service"

    @property
    def store_url(self) -> str:
        return f"sqlite:///{(self.service / 'adisc.db').resolve()}"

    @property
    def index(self) -> Path:
        return self.service / "index" / "regions.faiss"

    @property
    def model(self) -> Path:
        return self.service / "serving_model"
