"""Typed configuration objects at the edges (CLI, YAML/JSON files), validated where they are built."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or file that is not valid; the message names it."""


def _check_fields(cls: type, values: dict[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"known: {', '.join(sorted(known))}")


def config_from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``, refusing unknown keys (nested dataclasses are built too). A class
    with its own ``from_dict`` (one that also reads older layouts of its files) builds itself."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    if hasattr(cls, "from_dict"):
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    _check_fields(cls, values, source)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        inner = f.type if isinstance(f.type, type) else None
        if inner is not None and dataclasses.is_dataclass(inner) and isinstance(value, dict):
            value = config_from_dict(inner, value, f"{source}.{f.name}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a YAML or JSON file into dataclass ``cls``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    return config_from_dict(cls, values or {}, str(path))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (paths as strings)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
