import math

import pytest
import torch

from anomaly_discovery.models.discovery.losses import (UNLABELLED, DiscoveryLossWeights,
                                                       adaptive_pseudo_label_distillation, cross_entropy_base,
                                                       cross_view_distillation, hard_label_ratio_schedule,
                                                       harden_confident_targets, info_nce_loss,
                                                       mean_entropy_regulariser, novel_teacher_targets,
                                                       prototype_separation_loss, supcon_loss,
                                                       teacher_temperature_schedule, total_discovery_loss)


def orthogonal_views(batch: int, dim: int = 8) -> torch.Tensor:
    """Two identical views of ``batch`` mutually orthogonal unit vectors, concatenated (2B, dim)."""
    basis = torch.eye(dim)[:batch]
    return torch.cat([basis, basis])


@pytest.fixture
def batch():
    """4 crops × 2 views: two base crops (classes 0, 1) and two novel crops; 3 heads, 2 base + 3 novel columns."""
    torch.manual_seed(0)
    return {
        "projections": torch.randn(8, 6, requires_grad=True),
        "logits": torch.randn(3, 8, 5).tanh().requires_grad_(True),
        "labels": torch.tensor([0, 1, UNLABELLED, UNLABELLED]),
        "prototypes": torch.nn.functional.normalize(torch.randn(3, 5, 6), dim=-1).requires_grad_(True),
        "region_scores": torch.tensor([0.9, 0.9, 0.1, 0.7]),
    }


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_info_nce_with_identical_views_of_orthogonal_samples(temperature):
    loss = info_nce_loss(orthogonal_views(3), temperature)
    expected = math.log(1 + 4 * math.exp(-1 / temperature))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_rejects_odd_number_of_rows():
    with pytest.raises(ValueError, match="two concatenated views"):
        info_nce_loss(torch.randn(5, 4))


def test_supcon_with_one_shared_label_on_hand_case():
    temperature = 0.5
    loss = supcon_loss(orthogonal_views(2), torch.tensor([3, 3]), temperature)
    expected = math.log(math.exp(1 / temperature) + 2) - 1 / (3 * temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_supcon_with_distinct_labels_equals_info_nce():
    torch.manual_seed(1)
    z = torch.randn(10, 4)
    assert torch.allclose(supcon_loss(z, torch.arange(5), 0.3), info_nce_loss(z, 0.3), atol=1e-6)


def test_cross_entropy_base_divides_logits_by_temperature():
    logits = torch.tensor([[0.9, 0.1, -0.2], [0.0, 0.5, 0.2]])
    labels = torch.tensor([0, 2])
    expected = -(torch.log_softmax(logits / 0.1, dim=1)[[0, 1], labels]).mean()
    assert cross_entropy_base(logits, labels, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_schedule_reproduces_anomalyncd_staircase():
    values = [teacher_temperature_schedule(epoch, n_epochs=50) for epoch in range(50)]
    staircase = torch.linspace(0.07, 0.04, 10, dtype=torch.float64).repeat_interleave(4).tolist() + [0.04] * 10
    assert values == pytest.approx(staircase, abs=1e-9)


def test_teacher_schedule_scales_to_short_runs():
    values = [teacher_temperature_schedule(epoch, n_epochs=10) for epoch in range(10)]
    assert values[0] == pytest.approx(0.07) and values[-1] == pytest.approx(0.04)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[7] > 0.04 and values[8] == pytest.approx(0.04)


def test_novel_teacher_targets_zero_the_base_columns():
    torch.manual_seed(2)
    targets = novel_teacher_targets(torch.randn(6, 5), n_base=2, teacher_temperature=0.05)
    assert torch.all(targets[:, :2] == 0)
    assert torch.allclose(targets.sum(dim=1), torch.ones(6), atol=1e-6)


def test_pseudo_label_correction_matches_formula_on_hand_example():
    logits = torch.tensor([[5.0, math.log(0.2), math.log(0.8)], [5.0, math.log(0.2), math.log(0.8)]])
    targets = novel_teacher_targets(logits, n_base=1, teacher_temperature=1.0, region_scores=torch.tensor([0.2, 0.8]))
    weight = 0.5 - 0.2
    expected_corrected = torch.tensor([0.0, weight + (1 - weight) * 0.2, (1 - weight) * 0.8])
    assert torch.allclose(targets[0], expected_corrected, atol=1e-6)
    assert torch.allclose(targets[1], torch.tensor([0.0, 0.2, 0.8]), atol=1e-6)


def test_cross_view_distillation_swaps_the_views():
    torch.manual_seed(3)
    student = torch.randn(4, 3)
    teacher = torch.softmax(torch.randn(4, 3), dim=1)
    log_student = torch.log_softmax(student / 0.1, dim=1)
    view1_by_view2 = -(teacher[2:] * log_student[:2]).sum(dim=1)
    view2_by_view1 = -(teacher[:2] * log_student[2:]).sum(dim=1)
    expected = torch.cat([view1_by_view2, view2_by_view1]).mean()
    assert cross_view_distillation(student, teacher, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_view_distillation_sends_no_gradient_to_teacher():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.softmax(torch.randn(4, 3), dim=1).requires_grad_(True)
    cross_view_distillation(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_entropy_regulariser_is_zero_for_uniform_mean_and_log_k_for_collapse():
    balanced = torch.eye(4)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    assert mean_entropy_regulariser(balanced).item() == pytest.approx(0.0, abs=1e-6)
    assert mean_entropy_regulariser(collapsed).item() == pytest.approx(math.log(4), rel=1e-5)


def test_entropy_regulariser_with_a_prior_is_zero_at_the_prior_and_equals_the_uniform_term_for_a_uniform_prior():
    probs = torch.softmax(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert mean_entropy_regulariser(probs, torch.full((4,), 0.25)).item() == pytest.approx(
        mean_entropy_regulariser(probs).item(), abs=1e-6)
    unequal = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mean_entropy_regulariser(unequal, torch.tensor([0.75, 0.25])).item() == pytest.approx(0.0, abs=1e-6)
    assert mean_entropy_regulariser(unequal).item() > 0.1  # the uniform prior pulls these unequal sizes together


def test_entropy_regulariser_refuses_a_prior_that_is_not_a_distribution_over_the_columns():
    probs = torch.full((4, 3), 1 / 3)
    for prior in (torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5, 0.5, 0.5])):
        with pytest.raises(ValueError, match="prior"):
            mean_entropy_regulariser(probs, prior)


def test_separation_loss_is_zero_for_orthogonal_and_one_over_tau_for_identical():
    orthogonal = torch.eye(4)
    identical = torch.ones(4, 4)
    assert prototype_separation_loss(orthogonal, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert prototype_separation_loss(identical, 0.1).item() == pytest.approx(10.0, rel=1e-5)


def test_separation_loss_is_lower_for_orthogonal_than_for_close_prototypes():
    torch.manual_seed(4)
    close = torch.nn.functional.normalize(torch.ones(4, 4) + 0.3 * torch.randn(4, 4), dim=-1)
    assert prototype_separation_loss(torch.eye(4)) < prototype_separation_loss(close)


def test_separation_loss_averages_over_heads():
    stacked = torch.stack([torch.eye(3), torch.ones(3, 3)])
    assert prototype_separation_loss(stacked, 0.1).item() == pytest.approx(5.0, rel=1e-5)


def test_harden_confident_targets_turns_most_confident_rows_one_hot():
    targets = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.5, 0.5]])
    hardened = harden_confident_targets(targets, ratio=0.5)
    assert torch.equal(hardened[0], torch.tensor([1.0, 0.0])) and torch.equal(hardened[2], torch.tensor([0.0, 1.0]))
    assert torch.equal(hardened[[1, 3]], targets[[1, 3]])


def test_adaptive_distillation_with_ratio_zero_is_plain_distillation():
    torch.manual_seed(5)
    student, teacher = torch.randn(6, 4), torch.softmax(torch.randn(6, 4), dim=1)
    assert adaptive_pseudo_label_distillation(student, teacher, 0.0) == cross_view_distillation(student, teacher)


def test_hard_label_ratio_ramps_to_one_over_half_the_epochs():
    assert hard_label_ratio_schedule(0, 200) == pytest.approx(0.2)
    assert hard_label_ratio_schedule(50, 200) == pytest.approx(0.6)
    assert hard_label_ratio_schedule(150, 200) == 1.0


def test_total_loss_combines_parts_with_lambda_mu_nu(batch):
    weights = DiscoveryLossWeights(supervised=0.3, entropy=4.0, separation=0.1)
    parts = total_discovery_loss(n_base=2, teacher_temperature=0.07, weights=weights, **batch)
    expected = (0.3 * (parts["rep_base"] + parts["cls_base"])
                + 0.7 * (parts["rep"] + parts["cls_novel"] + 4.0 * parts["reg_novel"]) + 0.1 * parts["sep"])
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["cluster_per_head"].shape == (3,) and int(parts["n_novel"]) == 2
    assert parts["cluster_per_head"].mean().item() == pytest.approx(
        (parts["cls_novel"] + 4.0 * parts["reg_novel"]).item(), rel=1e-5)


def test_total_loss_gradients_reach_projections_logits_and_prototypes(batch):
    total_discovery_loss(n_base=2, teacher_temperature=0.07, **batch)["total"].backward()
    for name in ("projections", "logits", "prototypes"):
        grad = batch[name].grad
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all(), name


def test_total_loss_without_base_crops_has_no_supervised_part(batch):
    batch["labels"] = torch.full((4,), UNLABELLED)
    parts = total_discovery_loss(n_base=2, teacher_temperature=0.07, **batch)
    assert parts["rep_base"] == 0 and parts["cls_base"] == 0 and parts["cls_novel"] > 0
    assert torch.isfinite(parts["total"])


def test_total_loss_without_novel_crops_has_no_clustering_part(batch):
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    parts = total_discovery_loss(n_base=2, teacher_temperature=0.07, **batch)
    assert parts["cls_novel"] == 0 and parts["reg_novel"] == 0 and parts["cls_base"] > 0
    assert torch.equal(parts["cluster_per_head"], torch.zeros(3)) and int(parts["n_novel"]) == 0


def test_total_loss_runs_with_no_base_classes_at_all(batch):
    batch["labels"] = torch.full((4,), UNLABELLED)
    parts = total_discovery_loss(n_base=0, teacher_temperature=0.07, **batch)
    assert torch.isfinite(parts["total"])


def test_pseudo_label_correction_flag_changes_the_novel_loss(batch):
    with_plc = total_discovery_loss(n_base=2, teacher_temperature=0.07, **batch)
    without_plc = total_discovery_loss(n_base=2, teacher_temperature=0.07, pseudo_label_correction=False, **batch)
    assert with_plc["cls_novel"] != without_plc["cls_novel"]
    assert with_plc["rep"] == without_plc["rep"]


def test_total_loss_rejects_base_label_outside_base_range(batch):
    batch["labels"] = torch.tensor([0, 2, UNLABELLED, UNLABELLED])
    with pytest.raises(ValueError, match="labels must be"):
        total_discovery_loss(n_base=2, teacher_temperature=0.07, **batch)


def test_loss_weights_reject_lambda_above_one():
    with pytest.raises(ValueError, match="supervised"):
        DiscoveryLossWeights(supervised=1.5)
