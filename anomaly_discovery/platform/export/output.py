"""Where an export or report is written: refused when it would clobber something, and never seen half-written.

An export is built in a hidden sibling folder (``.<name>.partial-<random>``) and moved to its place with one
``rename`` when complete, so a crash, a full disk or Ctrl-C leaves the output folder as it was (the partial
folder is removed; only a killed process leaves it behind, hidden and named as partial). A folder that exists and
is not empty is refused unless ``overwrite``; it is then replaced by the new export (moved aside, the new one
moved in, the old one deleted). A report file goes through a temporary file and ``os.replace`` the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ExportError(ValueError):
    """Bad export or report input, in one line naming the thing at fault (``adisc`` prints it and exits 1)."""


def _writable_parent(path: Path) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the folder {parent} for {path}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {parent}: permission denied (choose another --out)")
    return parent


def check_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a folder that holds anything unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty: choose an empty or new folder, or pass --overwrite to replace it")


def check_file(path: Path, overwrite: bool) -> None:
    """Refuse an output file that is a folder, or that exists unless ``overwrite``."""
    if path.is_dir():
        raise ExportError(f"{path} is a folder: give a file name such as {path / 'report.html'}")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists: choose another --out, or pass --overwrite to replace it")


@contextmanager
def staged_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out``; when the block succeeds it becomes ``out`` (see the module
    docstring); when it fails it is removed and ``out`` is untouched."""
    out = Path(out).absolute()
    check_folder(out, overwrite)
    parent = _writable_parent(out)
    staging = parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        yield staging
        check_folder(out, overwrite)
        old = parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}" if out.exists() else None
        if old is not None:
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_file(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in its folder and ``os.replace``; an existing file is
    refused unless ``overwrite``."""
    path = Path(path).absolute()
    check_file(path, overwrite)
    parent = _writable_parent(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path
