"""Injection points of a distributed runner (Ray Train) into the discovery training loops, which stay plain
PyTorch: without a runner the defaults are the single-process path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch import nn
from torch.utils.data import DataLoader


@dataclass
class TrainHooks:
    """Injection points for a distributed runner (Ray Train): ``wrap_model`` (e.g. prepare_model),
    ``wrap_loader`` (e.g. prepare_data_loader), ``report(epoch, metrics, checkpoint_dir)`` after each epoch's
    checkpoint, and ``save_checkpoints`` (False on non-chief workers). The defaults are the single-process path."""

    wrap_model: Callable[[nn.Module], nn.Module] = lambda model: model
    wrap_loader: Callable[[DataLoader], DataLoader] = lambda loader: loader
    report: Optional[Callable[[int, dict, Optional[Path]], None]] = None
    save_checkpoints: bool = True
