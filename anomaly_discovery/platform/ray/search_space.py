"""The Ray Tune search space of discovery (issue 5 item 2) and how one trial's sample becomes settings.

Learning rate, temperatures, the loss weights that guide discovery (entropy; prototype separation for the
transformer; the supervised weight when a base set exists), the view models' mined neighbours or the transformer's
number of AMGA-guided blocks, the over-clustering factor of K (``k_max`` with ``k="auto"``) and the crop setting of
the views (smallest random-crop area).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ray import tune

from anomaly_discovery.models.discovery.config import DiscoveryConfig


def search_space(base: DiscoveryConfig, has_base_set: bool) -> dict[str, Any]:
    """The Tune search space around ``base`` (keys are read by :func:`trial_overrides`): for the view models the
    prototypes' learning rate, the temperature, the entropy weight, the number of mined neighbours and the crop
    setting of the views; for the transformer also the teacher temperature, the prototype separation and the
    number of AMGA-guided blocks."""
    optimisation = base.optimisation
    if base.model.uses_views:
        space = {
            "consistency_lr": tune.loguniform(optimisation.consistency_lr / 4, optimisation.consistency_lr * 4),
            "temperature": tune.uniform(0.05, 0.2),
            "consistency_entropy_weight": tune.loguniform(0.25, 8.0),
            "neighbours": tune.choice([5, 10, 20]),
            "crop_scale_min": tune.uniform(0.3, 0.8),
        }
    else:
        space = {
            "lr": tune.loguniform(optimisation.lr / 4, optimisation.lr * 2),
            "temperature": tune.uniform(0.05, 0.2),
            "teacher_temperature_end": tune.uniform(0.02, 0.06),
            "entropy_weight": tune.uniform(1.0, 6.0),
            "separation_weight": tune.loguniform(0.01, 0.5),
            "n_guided_blocks": tune.randint(1, base.model.depth + 1),
            "crop_scale_min": tune.uniform(0.3, 0.8),
        }
    if base.classes.k == "auto":
        space["overcluster_factor"] = tune.choice([1.0, 1.5, 2.0])
    if has_base_set:
        space["supervised_weight"] = tune.uniform(0.1, 1.0)
    return space


def trial_overrides(base: DiscoveryConfig, sample: dict[str, Any]) -> dict[str, Any]:
    """DiscoveryConfig fields of one trial's sample (unknown keys are an error naming them)."""
    sample = dict(sample)
    overrides: dict[str, Any] = {}
    if "teacher_temperature_end" in sample:
        end = float(sample.pop("teacher_temperature_end"))
        overrides["teacher_temperature"] = (max(end, base.optimisation.teacher_temperature[0]), end)
    if "crop_scale_min" in sample:
        overrides["augment"] = replace(base.optimisation.augment, scale=(float(sample.pop("crop_scale_min")), 1.0))
    if "overcluster_factor" in sample:
        overrides["k_max"] = max(2, math.ceil(float(sample.pop("overcluster_factor")) * base.classes.k_max))
    for name in ("lr", "consistency_lr", "temperature", "entropy_weight", "consistency_entropy_weight",
                 "separation_weight", "supervised_weight"):
        if name in sample:
            overrides[name] = float(sample.pop(name))
    for name in ("n_guided_blocks", "neighbours"):
        if name in sample:
            overrides[name] = int(sample.pop(name))
    if sample:
        raise ValueError(f"unknown search-space keys {sorted(sample)}")
    return overrides
