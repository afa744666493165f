import pytest
import torch

from anomaly_discovery.models.discovery.prototypes import (PrototypeHead, ProjectionHead, mask_base_columns,
                                                           select_best_head)


@pytest.fixture
def features():
    torch.manual_seed(0)
    return torch.randn(5, 16)


def test_projection_head_maps_to_bottleneck_with_three_linear_layers(features):
    head = ProjectionHead(16, hidden_dim=32, bottleneck_dim=8, n_layers=3)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert head(features).shape == (5, 8)
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())


def test_projection_head_with_one_layer_is_a_single_linear_map(features):
    head = ProjectionHead(16, bottleneck_dim=4, n_layers=1)
    assert len(head.mlp) == 1 and head(features).shape == (5, 4)


def test_projection_head_rejects_zero_layers():
    with pytest.raises(ValueError, match="n_layers"):
        ProjectionHead(16, n_layers=0)


def test_prototype_head_returns_cosine_logits_per_head(features):
    head = PrototypeHead(16, n_classes=6, n_heads=3)
    logits = head(features)
    assert logits.shape == (3, 5, 6)
    assert logits.abs().max() <= 1.0 + 1e-6
    expected = torch.nn.functional.normalize(features, dim=-1) @ head.prototypes()[1].T
    assert torch.allclose(logits[1], expected, atol=1e-6)


def test_prototypes_are_unit_norm_even_after_weights_are_scaled():
    head = PrototypeHead(8, n_classes=4, n_heads=2)
    with torch.no_grad():
        head.weight.mul_(7.0)
    assert torch.allclose(head.prototypes().norm(dim=-1), torch.ones(2, 4), atol=1e-6)


def test_prototype_logits_do_not_depend_on_feature_scale(features):
    head = PrototypeHead(16, n_classes=4)
    assert torch.allclose(head(features), head(10 * features), atol=1e-6)


def test_gradients_reach_prototypes_and_features(features):
    head = PrototypeHead(16, n_classes=4, n_heads=2)
    inputs = features.clone().requires_grad_(True)
    head(inputs).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0


def test_probabilities_apply_the_temperature_to_the_best_head(features):
    head = PrototypeHead(16, n_classes=4, n_heads=2, temperature=0.1)
    head.select_best_head([3.0, 1.0])
    probs = head.probabilities(features)
    assert torch.allclose(probs, torch.softmax(head(features)[1] / 0.1, dim=-1), atol=1e-6)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(5), atol=1e-6)


def test_prototype_head_rejects_wrong_feature_width():
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        PrototypeHead(16, n_classes=4)(torch.randn(3, 8))


def test_select_best_head_picks_lowest_loss_and_ignores_nan():
    assert select_best_head([0.7, float("nan"), 0.2, 0.5]) == 2


def test_selected_head_is_saved_in_state_dict():
    head = PrototypeHead(8, n_classes=3, n_heads=4)
    head.select_best_head(torch.tensor([4.0, 3.0, 2.0, 5.0]))
    restored = PrototypeHead(8, n_classes=3, n_heads=4)
    restored.load_state_dict(head.state_dict())
    assert int(restored.best_head) == 2


def test_select_best_head_requires_one_loss_per_head():
    with pytest.raises(ValueError, match="one value per head"):
        PrototypeHead(8, n_classes=3, n_heads=4).select_best_head([1.0, 2.0])


def test_mask_base_columns_zeroes_base_and_renormalises():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    masked = mask_base_columns(probs, n_base=2)
    assert torch.allclose(masked, torch.tensor([[0.0, 0.0, 0.75, 0.25]]))
