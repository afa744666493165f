"""Where the dashboard finds its store, index, predictor and labelled data: ``adisc ui``'s arguments, defaulting to
the work folder ``adisc demo`` fills, passed to the Streamlit process as ``ADISC_UI_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from anomaly_discovery.platform.storage.paths import ServicePaths

ENVIRONMENT = {"store": "ADISC_UI_STORE", "index": "ADISC_UI_INDEX", "workdir": "ADISC_UI_WORKDIR",
               "model": "ADISC_UI_MODEL", "data": "ADISC_UI_DATA"}


@dataclass(frozen=True)
class UISettings:
    """``store``: SQLAlchemy URL; ``index``: the index file (embeddings beside it); ``workdir``: where job status,
    the active-loop curve and (by default) the model and labelled data live; ``model``: predictor folder used when
    the store's active model names none; ``data``: labelled data set for the Evaluation page."""

    store: str
    index: Path
    workdir: Path
    model: Path
    data: Path

    @classmethod
    def for_workdir(cls, workdir: str | Path, store: str | None = None, index: str | Path | None = None,
                    model: str | Path | None = None, data: str | Path | None = None) -> UISettings:
        """Defaults inside ``workdir``: the service state ``adisc demo`` publishes there (``ServicePaths``) and
        the labelled data set it generated in ``data/``."""
        workdir = Path(workdir).resolve()
        paths = ServicePaths(workdir)
        return cls(store or paths.store_url, Path(index or paths.index), workdir, Path(model or paths.model),
                   Path(data or workdir / "data"))

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] = os.environ) -> UISettings:
        if not environment.get(ENVIRONMENT["workdir"]):
            raise ValueError(f"{ENVIRONMENT['workdir']} is unset: start the dashboard with `adisc ui`")
        return cls.for_workdir(*(environment.get(ENVIRONMENT[k]) or None
                                 for k in ("workdir", "store", "index", "model", "data")))

    def environment(self) -> dict[str, str]:
        values = {"store": self.store, "index": self.index, "workdir": self.workdir, "model": self.model,
                  "data": self.data}
        return {ENVIRONMENT[k]: str(v) for k, v in values.items()}

    def check(self) -> None:
        """Refuse settings that point at nothing (a missing SQLite file or index), naming the path."""
        if self.store.startswith("sqlite:///"):
            database = Path(self.store.removeprefix("sqlite:///"))
            if not database.is_file():
                raise FileNotFoundError(f"no store at {database}: run `adisc demo` first or pass --store")
        if not self.index.is_file() and not any(self.index.parent.glob(f"{self.index.name}.*embeddings.f32")):
            raise FileNotFoundError(f"no index at {self.index}: run `adisc demo` first or pass --index")
