"""The review endpoints of the API (issue 6 item 5) as a router ``serve.create_app`` includes: classes,
proposals, the reviewer's decisions (confirm, reject, rename, merge, split, move, undo). Every route reads or
acts through the replica's :class:`DiscoveryLoop`; the write routes take the bearer-token dependency the app
passes in. Stale versions answer 409 and unknown ids 404 through the app's exception handlers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from fastapi import APIRouter, params

from anomaly_discovery.platform.review.actions import LIVE
from anomaly_discovery.platform.service.core import ServiceCore
from anomaly_discovery.platform.service.io import bad_request
from anomaly_discovery.platform.service.schemas import (ClassDecision, ClassOut, DecisionOut, MoveRequest,
                                                        ProposalDecision, ProposalOut)
from anomaly_discovery.platform.storage.models import ProposalStatus


def decided(result) -> DecisionOut:
    """A loop ActionResult as the API's decision body."""
    return DecisionOut(decision_id=result.decision_id, action=result.action, class_ids=result.class_ids,
                       n_regions=result.n_regions, seconds=result.seconds)


def needs(value, what: str, action: str):
    """``value``, or a 422 naming what ``action`` is missing."""
    if value is None:
        raise bad_request(422, f"action {action!r} needs {what}")
    return value


def review_router(core: ServiceCore, write: Sequence[params.Depends]) -> APIRouter:
    """The review routes bound to ``core``; ``write`` guards the ones that change anything."""
    router = APIRouter()

    @router.get("/v1/classes", response_model=list[ClassOut])
    def list_classes(all: bool = False) -> list[ClassOut]:
        core.maybe_sync()
        loop = core.loop
        sizes, images = loop.class_sizes(), loop.image_counts()
        return [ClassOut(id=c.id, name=c.name, status=c.status.value, version=c.version, size=sizes.get(c.id, 0),
                         images=images.get(c.id, 0), parent_id=c.parent_id, merged_into_id=c.merged_into_id)
                for c in sorted(loop.classes.values(), key=lambda c: c.id) if all or c.status in LIVE]

    @router.get("/v1/proposals", response_model=list[ProposalOut])
    def list_proposals(status: Literal["open", "confirmed", "rejected", "superseded", "all"] = "open"
                       ) -> list[ProposalOut]:
        core.maybe_sync()
        statuses = list(ProposalStatus) if status == "all" else [ProposalStatus(status)]
        classes = core.loop.classes
        return [ProposalOut(id=p.id, class_id=p.class_id, name=classes[p.class_id].name if p.class_id in classes
                            else "", status=p.status.value, version=p.version, size=p.size, cohesion=p.cohesion,
                            representative_region_ids=p.representative_region_ids)
                for p in core.loop.list_proposals(statuses)]

    @router.post("/v1/proposals/{proposal_id}/decision", response_model=DecisionOut, dependencies=write)
    def decide_proposal(proposal_id: int, body: ProposalDecision) -> DecisionOut:
        loop = core.loop
        if body.action == "confirm":
            return decided(loop.confirm(proposal_id, needs(body.name, "a 'name'", body.action),
                                        expected_version=body.expected_version, reviewer=body.reviewer))
        if body.action == "reject":
            return decided(loop.reject(proposal_id, expected_version=body.expected_version, reviewer=body.reviewer))
        return decided(loop.merge_proposal(proposal_id, needs(body.target_class_id, "a 'target_class_id'", body.action),
                                           expected_version=body.expected_version, target_version=body.target_version,
                                           reviewer=body.reviewer))

    @router.post("/v1/classes/{class_id}/decision", response_model=DecisionOut, dependencies=write)
    def decide_class(class_id: int, body: ClassDecision) -> DecisionOut:
        loop, version = core.loop, body.expected_version
        if body.action == "rename":
            return decided(loop.rename(class_id, needs(body.name, "a 'name'", body.action), expected_version=version,
                                       reviewer=body.reviewer))
        if body.action == "split":
            return decided(loop.split(class_id, needs(body.k, "'k' (parts, >= 2)", body.action),
                                      expected_version=version, reviewer=body.reviewer))
        return decided(loop.merge(class_id, needs(body.target_class_id, "a 'target_class_id'", body.action),
                                  expected_version=version, target_version=body.target_version,
                                  reviewer=body.reviewer))

    @router.post("/v1/regions/move", response_model=DecisionOut, dependencies=write)
    def move_regions(body: MoveRequest) -> DecisionOut:
        return decided(core.loop.move(body.region_ids, body.class_id, expected_version=body.expected_version,
                                      reviewer=body.reviewer))

    @router.post("/v1/undo", response_model=DecisionOut, dependencies=write)
    def undo(reviewer: str = "api") -> DecisionOut:
        return decided(core.loop.undo(reviewer=reviewer))

    return router
