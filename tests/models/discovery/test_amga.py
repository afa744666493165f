import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block

from anomaly_discovery.models.discovery.amga import (HARD_MASK_VALUE, AMGAAttention, AMGABlock, RegionGuidanceFactor,
                                                     hard_guidance_bias, pool_to_patch_grid)

DIM, HEADS, TOKENS = 32, 4, 10


@pytest.fixture
def attention_pair():
    torch.manual_seed(0)
    plain = Attention(DIM, num_heads=HEADS, qkv_bias=True).eval()
    guided = AMGAAttention(DIM, num_heads=HEADS, qkv_bias=True).eval()
    guided.load_state_dict(plain.state_dict())
    return plain, guided


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randn(2, TOKENS, DIM)


def _quadrant_maps():
    """A 4×4 image with 2×2 patches: background, normal object, anomaly on object, half-anomalous object."""
    anomaly = torch.zeros(1, 1, 4, 4)
    objects = torch.zeros(1, 1, 4, 4)
    objects[..., :, 2:] = 1.0
    objects[..., 2:, :] = 1.0
    anomaly[..., 2:, :2] = 1.0
    anomaly[..., 2:, 2:3] = 1.0
    return anomaly, objects


def test_attention_with_zero_bias_equals_timm_attention(attention_pair, tokens):
    plain, guided = attention_pair
    with torch.no_grad():
        expected = plain(tokens)
        actual = guided(tokens, cls_bias=torch.zeros(2, TOKENS))
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_attention_without_bias_is_timm_attention(attention_pair, tokens):
    plain, guided = attention_pair
    with torch.no_grad():
        torch.testing.assert_close(guided(tokens), plain(tokens), atol=1e-6, rtol=1e-5)


def test_bias_changes_only_the_cls_output_row(attention_pair, tokens):
    plain, guided = attention_pair
    bias = torch.randn(2, TOKENS) * 3
    with torch.no_grad():
        expected = plain(tokens)
        actual = guided(tokens, cls_bias=bias)
    torch.testing.assert_close(actual[:, 1:], expected[:, 1:], atol=1e-6, rtol=1e-5)
    assert (actual[:, 0] - expected[:, 0]).abs().max() > 1e-3


def test_hard_guidance_with_empty_mask_makes_cls_attend_only_to_itself(attention_pair, tokens):
    _, guided = attention_pair
    rgf = RegionGuidanceFactor(mode="hard")
    patch_bias = rgf(torch.zeros(2, 1, 9, 9), None, (3, 3))
    bias = torch.cat([torch.zeros(2, 1), patch_bias], dim=1)
    with torch.no_grad():
        out = guided(tokens, cls_bias=bias)
        values = guided.qkv(tokens)[:, 0, 2 * DIM:]
        own_value_only = guided.proj(values)
    torch.testing.assert_close(out[:, 0], own_value_only, atol=1e-5, rtol=1e-5)


def test_hard_bias_is_zero_where_at_least_half_covered():
    coverage = torch.tensor([[0.0, 0.49, 0.5, 1.0]])
    bias = hard_guidance_bias(coverage)
    assert bias.tolist() == [[HARD_MASK_VALUE, HARD_MASK_VALUE, 0.0, 0.0]]


def test_pool_to_patch_grid_averages_each_patch_in_token_order():
    maps = torch.zeros(1, 1, 4, 4)
    maps[..., :2, 2:] = 1.0
    maps[..., 3, 0] = 1.0
    pooled = pool_to_patch_grid(maps, (2, 2))
    assert pooled.shape == (1, 4)
    torch.testing.assert_close(pooled, torch.tensor([[0.0, 1.0, 0.25, 0.0]]))


def test_pool_to_patch_grid_rejects_multichannel_maps():
    with pytest.raises(ValueError, match="B×1×H×W"):
        pool_to_patch_grid(torch.zeros(1, 3, 4, 4), (2, 2))


def test_region_guidance_orders_background_below_object_below_anomaly():
    anomaly, objects = _quadrant_maps()
    bias = RegionGuidanceFactor(mode="amga")(anomaly, objects, (2, 2))[0]
    background, normal_object, anomalous, half_anomalous = bias.tolist()
    assert background < normal_object < half_anomalous < anomalous
    assert normal_object < 0.0 < anomalous


def test_region_guidance_matches_log_of_factors_at_pure_patches():
    rgf = RegionGuidanceFactor(mode="amga", rho_background=0.01, rho_object=0.2, gamma=0.5, eps=1e-4)
    anomaly, objects = _quadrant_maps()
    bias = rgf(anomaly, objects, (2, 2))[0].detach()
    expected = torch.log(torch.tensor([1e-4 + 0.01, 1e-4 + 0.2, 1e-4 + 1.5]))
    torch.testing.assert_close(bias[:3], expected, atol=1e-5, rtol=1e-5)


def test_missing_object_prior_treats_every_patch_as_object():
    anomaly = torch.zeros(1, 1, 4, 4)
    bias = RegionGuidanceFactor(mode="amga", rho_object=0.2)(anomaly, None, (2, 2))
    torch.testing.assert_close(bias, torch.full((1, 4), float(torch.log(torch.tensor(0.2 + 1e-4)))))


def test_none_mode_gives_zero_bias():
    anomaly, objects = _quadrant_maps()
    assert torch.count_nonzero(RegionGuidanceFactor(mode="none")(anomaly, objects, (2, 2))) == 0


def test_learnable_factors_receive_gradients_through_attention(attention_pair, tokens):
    _, guided = attention_pair
    rgf = RegionGuidanceFactor(mode="amga", learnable=True)
    anomaly = torch.rand(2, 1, 9, 9)
    objects = (torch.rand(2, 1, 9, 9) > 0.5).float()
    bias = torch.cat([torch.zeros(2, 1), rgf(anomaly, objects, (3, 3))], dim=1)
    guided(tokens, cls_bias=bias)[:, 0].pow(2).sum().backward()
    assert rgf.raw_factors.grad is not None
    assert torch.all(rgf.raw_factors.grad.abs() > 0)


def test_learned_factors_stay_ordered_after_large_updates():
    rgf = RegionGuidanceFactor(mode="amga")
    with torch.no_grad():
        rgf.raw_factors.copy_(torch.tensor([30.0, 30.0, -30.0]))
        rho_background, rho_object, gamma = rgf.rho_background.item(), rgf.rho_object.item(), rgf.gamma.item()
    assert 0 < rho_background <= rho_object <= 1.0
    assert gamma >= 0.0


def test_fixed_factors_are_not_parameters():
    assert list(RegionGuidanceFactor(mode="amga", learnable=False).parameters()) == []
    assert list(RegionGuidanceFactor(mode="hard", learnable=True).parameters()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "soft"}, "guidance mode 'soft'"),
    ({"rho_object": 1.5}, "rho_object"),
    ({"rho_background": 0.5, "rho_object": 0.1}, "rho_background"),
    ({"gamma": 0.0}, "gamma"),
])
def test_invalid_factor_settings_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RegionGuidanceFactor(**kwargs)


def test_attention_rejects_a_bias_of_the_wrong_shape(attention_pair, tokens):
    with pytest.raises(ValueError, match="cls_bias must be B×N"):
        attention_pair[1](tokens, cls_bias=torch.zeros(2, TOKENS - 1))


def test_block_with_zero_bias_equals_timm_block(tokens):
    torch.manual_seed(2)
    plain = Block(DIM, num_heads=HEADS, qkv_bias=True).eval()
    guided = AMGABlock(DIM, num_heads=HEADS, qkv_bias=True).eval()
    guided.load_state_dict(plain.state_dict())
    assert isinstance(guided.attn, AMGAAttention)
    with torch.no_grad():
        torch.testing.assert_close(guided(tokens, cls_bias=torch.zeros(2, TOKENS)), plain(tokens),
                                   atol=1e-6, rtol=1e-5)


def test_block_refuses_a_non_standard_attention_layer():
    with pytest.raises(ValueError, match="standard Attention"):
        AMGABlock(DIM, num_heads=HEADS, attn_layer="diff")
