"""Choosing the object prior (methods.md §2, step 1): Grounded SAM when its four files are configured and exist,
else the statistical fallback, with a sentence saying which and why."""

from __future__ import annotations

import logging
from pathlib import Path

from .base import NoObjectPrior, ObjectPrior
from .statistical import StatisticalObjectPrior, StatisticalPriorConfig

logger = logging.getLogger(__name__)
OBJECT_PRIOR_KINDS = ("grounded-sam", "auto", "none", "fallback")


def _grounded_sam_problem(paths: dict[str, str | Path | None]) -> str | None:
    """Why Grounded SAM cannot be used with these paths (None when all are configured and exist)."""
    for setting, path in paths.items():
        if path is None or str(path) == "":
            return f"{setting} is not configured"
        if not Path(path).exists():
            return f"{setting} {path} does not exist"
    return None


def build_object_prior(kind: str = "auto", *, sam_checkpoint: str | Path | None = None,
                       grounding_config: str | Path | None = None,
                       grounding_checkpoint: str | Path | None = None,
                       text_encoder_path: str | Path | None = None,
                       fallback_config: StatisticalPriorConfig | None = None,
                       **grounded_sam_options) -> tuple[ObjectPrior, str]:
    """The object prior for ``kind`` and a sentence saying which was used and why.

    ``auto`` uses Grounded SAM when all four paths are configured and exist, else the statistical fallback.
    ``grounded_sam_options`` (prompt, thresholds, ``sam_model_type``, device, ...) go to
    :class:`~.grounded_sam.GroundedSAMPrior`.
    """
    if kind not in OBJECT_PRIOR_KINDS:
        raise ValueError(f"unknown object prior {kind!r}: use one of {', '.join(OBJECT_PRIOR_KINDS)}")
    if kind == "none":
        return NoObjectPrior(), "object prior 'none': every pixel counts as product"
    if kind == "fallback":
        return StatisticalObjectPrior(fallback_config), "object prior 'fallback': statistical (no weights)"
    paths = {"sam_checkpoint": sam_checkpoint, "grounding_config": grounding_config,
             "grounding_checkpoint": grounding_checkpoint, "text_encoder_path": text_encoder_path}
    problem = _grounded_sam_problem(paths)
    if problem is not None:
        if kind == "grounded-sam":
            raise ValueError(f"object prior 'grounded-sam' cannot run: {problem}")
        reason = f"object prior 'auto': statistical fallback, because {problem}"
        logger.info(reason)
        return StatisticalObjectPrior(fallback_config), reason
    from .grounded_sam import GroundedSAMPrior  # heavy (transformers, groundingdino): imported only when used

    prior = GroundedSAMPrior(sam_checkpoint, grounding_config=grounding_config,
                             grounding_checkpoint=grounding_checkpoint, text_encoder_path=text_encoder_path,
                             **grounded_sam_options)
    return prior, f"object prior '{kind}': Grounded SAM (prompt {prior.prompt!r}, SAM {prior.sam_model_type})"
