"""How a benchmark script writes its results file: exactly the top-level keys it declares, atomically.

Each script declares the keys it writes in a module constant ``RESULT_KEYS`` and hands its payload to
:func:`write_results`, which refuses a payload with other keys (naming the missing and the unexpected ones) and
writes ``benchmarks/results/<name>.json`` through a temporary file in the same folder and ``os.replace``, so a
crash never leaves half a file. ``--tag NAME`` (:func:`add_output_arguments`) keeps an older or a variant run
apart: it writes ``benchmarks/results/<name>.<NAME>.json`` and leaves ``<name>.json`` alone. ``--out FILE``
writes anywhere else (a smoke run outside the committed results). ``tests/test_benchmark_results.py`` checks
every committed results file, tagged ones included, against its script's ``RESULT_KEYS``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def results_path(name: str, tag: str | None = None) -> Path:
    """``results/<name>.json``, or ``results/<name>.<tag>.json`` for a tagged run."""
    if tag is not None and not TAG.match(tag):
        raise ValueError(f"--tag must be letters, digits, '-' or '_' (starting with a letter or digit), got {tag!r}")
    return RESULTS / (f"{name}.{tag}.json" if tag else f"{name}.json")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tag NAME`` (write ``results/<name>.<NAME>.json``) and ``--out FILE`` (write elsewhere)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tag", default=None,
                       help="keep this run apart: write benchmarks/results/<name>.<TAG>.json instead of <name>.json")
    group.add_argument("--out", type=Path, default=None, help="write the results to this file instead")


def check_keys(payload: Mapping, keys: Iterable[str], name: str) -> None:
    """``ValueError`` unless ``payload``'s top-level keys are exactly ``keys``."""
    declared, given = set(keys), set(payload)
    if declared != given:
        raise ValueError(f"{name}: results must have exactly the keys of RESULT_KEYS; missing "
                         f"{sorted(declared - given)}, not declared {sorted(given - declared)}")


def plain(value):
    """JSON for numpy scalars and arrays (``.item()`` / ``.tolist()``); anything else is refused as json does."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_results(name: str, payload: Mapping, keys: Iterable[str], tag: str | None = None,
                  out: Path | None = None, indent: int = 2) -> Path:
    """Write ``payload`` (top-level keys exactly ``keys``) to ``out``, else to :func:`results_path`; atomic."""
    check_keys(payload, keys, name)
    path = Path(out) if out is not None else results_path(name, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(json.dumps(payload, indent=indent, default=plain) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path
