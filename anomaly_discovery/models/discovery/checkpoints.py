"""Epoch checkpoints of discovery training: ``epoch_NNNN/`` folders holding the weights (safetensors), the
optimizer state (read back with ``weights_only=True``) and a JSON state, written atomically; a missing, corrupt
or foreign file is a :class:`CheckpointError` naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_PREFIX = "epoch_"
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or written with other settings; the message names it."""


def _unwrapped(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(folder: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int) -> Path:
    """Write ``epoch_NNNN/`` (weights as safetensors, optimizer state, JSON state) atomically; prune old ones."""
    folder = Path(folder)
    target = folder / f"{CHECKPOINT_PREFIX}{epoch:04d}"
    partial = folder / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in _unwrapped(model).state_dict().items()}
    save_file(weights, str(partial / MODEL_FILE))
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
    (partial / STATE_FILE).write_text(json.dumps(state | {"epoch": epoch}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path | str | None) -> Optional[Path]:
    """The newest complete ``epoch_NNNN`` folder, or ``None``."""
    if folder is None or not Path(folder).is_dir():
        return None
    complete = [p for p in Path(folder).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(complete, default=None)


def load_weights_file(path: Path, model: nn.Module) -> None:
    """Strictly load a safetensors weights file; a corrupt or foreign file is a CheckpointError naming it."""
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {path} is corrupt or unreadable ({exc})") from exc
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights file {path} does not fit this model ({str(exc).splitlines()[0]})") from exc


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load weights (and optimizer state) from a checkpoint folder; a corrupt or foreign file is a
    CheckpointError naming it. Returns the JSON state."""
    path = Path(path)
    for name in (STATE_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint state {path / STATE_FILE} is not valid JSON ({exc})") from exc
    load_weights_file(path / MODEL_FILE, _unwrapped(model))
    if optimizer is not None:
        try:
            optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"optimizer state {path / OPTIMIZER_FILE} is corrupt or does not fit ({exc})") \
                from exc
    return state


def resume_history(checkpoint_dir: Path | str | None, model: nn.Module, optimizer: torch.optim.Optimizer,
                   fingerprint: dict) -> list[dict]:
    """Resume from the newest checkpoint in ``checkpoint_dir``: load the weights and optimizer state into ``model``
    and ``optimizer`` and return the epochs' history so far ([] when there is none). A checkpoint written with
    another fingerprint (settings or data) is a CheckpointError naming what differs."""
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        return []
    state = load_checkpoint(latest, model, optimizer)
    if state.get("fingerprint") != fingerprint:
        changed = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
        raise CheckpointError(f"checkpoint {latest} was written with other settings or data (differs in: "
                              f"{', '.join(changed)}); use a fresh checkpoint_dir")
    return state["history"]
