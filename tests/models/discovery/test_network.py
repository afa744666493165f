import pytest
import timm
import torch
from safetensors.torch import save_file

from anomaly_discovery.models.features.backbones import WeightsError
from anomaly_discovery.models.discovery.network import hybrid_amga, vit_with_amga

VIT = "vit_tiny_patch16_224"
SMALL_VIT = dict(img_size=64, depth=4, embed_dim=64, num_heads=2)
HYBRID = dict(cnn="tiny", embed_dim=48, depth=2, n_heads=2, img_size=64)


@pytest.fixture
def plain_vit():
    torch.manual_seed(0)
    return timm.create_model(VIT, pretrained=False, num_classes=10, **SMALL_VIT).eval()


@pytest.fixture
def vit_checkpoint(plain_vit, tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(plain_vit.state_dict(), path)
    return path


@pytest.fixture
def batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    anomaly = torch.zeros(2, 1, 64, 64)
    anomaly[:, :, 16:40, 8:40] = 1.0
    objects = torch.zeros(2, 1, 64, 64)
    objects[:, :, 8:56, 4:60] = 1.0
    return images, anomaly, objects


def test_checkpoint_without_guidance_matches_plain_timm(plain_vit, vit_checkpoint, batch):
    images, anomaly, objects = batch
    model = vit_with_amga(VIT, weights=vit_checkpoint, n_guided_blocks=3, guidance="none", **SMALL_VIT).eval()
    with torch.no_grad():
        expected = plain_vit.forward_features(images)[:, 0]
        actual = model(images, anomaly, objects)
    assert actual.shape == (2, 64)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_amga_guidance_changes_the_cls_feature(plain_vit, vit_checkpoint, batch):
    images, anomaly, objects = batch
    model = vit_with_amga(VIT, weights=vit_checkpoint, n_guided_blocks=3, guidance="amga", **SMALL_VIT).eval()
    with torch.no_grad():
        unguided = plain_vit.forward_features(images)[:, 0]
        guided = model(images, anomaly, objects)
    assert (guided - unguided).abs().max() > 1e-3


def test_dino_style_prefixed_safetensors_checkpoint_loads(plain_vit, tmp_path, batch):
    path = tmp_path / "dino.safetensors"
    state = {f"module.backbone.{k}": v.contiguous()
             for k, v in plain_vit.state_dict().items() if not k.startswith("head")}
    save_file(state, str(path))
    model = vit_with_amga(VIT, weights=path, guidance="none", n_guided_blocks=4, **SMALL_VIT).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), plain_vit.forward_features(batch[0])[:, 0], atol=1e-5, rtol=1e-5)


def test_mismatched_checkpoint_is_refused_naming_the_file(tmp_path):
    other = timm.create_model(VIT, pretrained=False, **dict(SMALL_VIT, embed_dim=32))
    path = tmp_path / "wrong_width.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match="wrong_width.pth.*wrong shape"):
        vit_with_amga(VIT, weights=path, n_guided_blocks=2, **SMALL_VIT)


def test_checkpoint_of_another_architecture_is_refused_listing_missing_keys(tmp_path):
    path = tmp_path / "cnn.pth"
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), path)
    with pytest.raises(WeightsError, match="cnn.pth.*missing"):
        vit_with_amga(VIT, weights=path, n_guided_blocks=2, **SMALL_VIT)


def test_only_the_last_trainable_blocks_require_grad():
    model = vit_with_amga(VIT, n_guided_blocks=3, trainable_blocks=2, **SMALL_VIT)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(name.startswith(("vit.blocks.2.", "vit.blocks.3.", "guidance.")) for name in trainable)
    assert any(name.startswith("vit.blocks.2.") for name in trainable)


def test_gradients_reach_guidance_through_frozen_guided_blocks(batch):
    images, anomaly, objects = batch
    model = vit_with_amga(VIT, n_guided_blocks=3, trainable_blocks=1, **SMALL_VIT)
    model(images, anomaly, objects).pow(2).sum().backward()
    assert model.guidance.raw_factors.grad is not None
    assert model.vit.blocks[3].attn.qkv.weight.grad is not None
    assert model.vit.blocks[2].attn.qkv.weight.grad is None


def test_vit_runs_at_another_input_size():
    model = vit_with_amga(VIT, n_guided_blocks=2, **SMALL_VIT).eval()
    assert model.patch_grid((96, 48)) == (6, 3)
    with torch.no_grad():
        features = model(torch.randn(1, 3, 96, 48), torch.rand(1, 1, 96, 48))
    assert features.shape == (1, 64)


def test_too_many_guided_blocks_are_rejected():
    with pytest.raises(ValueError, match="n_guided_blocks"):
        vit_with_amga(VIT, n_guided_blocks=5, **SMALL_VIT)


@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
def test_hybrid_runs_at_two_input_sizes_with_the_grid_it_reports(size):
    model = hybrid_amga(**HYBRID).eval()
    images = torch.randn(2, 3, *size)
    tokens, grid = model.embed(images)
    assert model.patch_grid(size) == grid == (size[0] // 16, size[1] // 16)
    assert tokens.shape == (2, 1 + grid[0] * grid[1], 48)
    with torch.no_grad():
        assert model(images, torch.rand(2, 1, *size)).shape == (2, 48)


def test_hybrid_default_uses_the_imagenet_mobilenet_at_stride_16():
    try:
        model = hybrid_amga(depth=1, img_size=64)
    except WeightsError as exc:
        pytest.skip(f"ImageNet MobileNetV2 weights not installed: {exc}")
    assert (model.cnn_name, model.cnn_stride, model.feature_dim) == ("mobilenet_v2", 16, 192)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), torch.rand(1, 1, 64, 64)).shape == (1, 192)


def test_hybrid_with_frozen_cnn_trains_only_the_transformer(batch):
    images, anomaly, objects = batch
    model = hybrid_amga(**HYBRID).train()
    model(images, anomaly, objects).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.cnn_stages.parameters())
    assert model.proj.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None


def test_hybrid_trainable_cnn_stages_get_gradients_and_keep_batchnorm_statistics(batch):
    images, anomaly, _ = batch
    model = hybrid_amga(**HYBRID, trainable_cnn_stages=1).train()
    model(images, anomaly).sum().backward()
    assert model.cnn_stages[-1][0].weight.grad is not None
    assert model.cnn_stages[-2][0].weight.grad is None
    assert not any(module.training for module in model.cnn_stages.modules())


def test_hard_guidance_with_empty_masks_makes_the_feature_ignore_the_image():
    model = hybrid_amga(**HYBRID, guidance="hard").eval()
    empty = torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        first = model(torch.randn(1, 3, 64, 64), empty)
        second = model(torch.randn(1, 3, 64, 64), empty)
    torch.testing.assert_close(first, second)


def test_without_an_anomaly_map_attention_is_unguided(batch):
    images, anomaly, _ = batch
    torch.manual_seed(3)
    guided = hybrid_amga(**HYBRID, guidance="amga").eval()
    unguided = hybrid_amga(**HYBRID, guidance="none").eval()
    unguided.load_state_dict(guided.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(guided(images), unguided(images, anomaly))
        assert (guided(images, anomaly) - guided(images)).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"anomaly_maps": torch.zeros(2, 3, 64, 64)}, "anomaly_maps must be B×1×H×W"),
    ({"anomaly_maps": torch.full((2, 1, 64, 64), 2.0)}, r"anomaly_maps must lie in \[0, 1\]"),
    ({"object_masks": torch.zeros(1, 1, 64, 64)}, "object_masks must be B×1×H×W with B=2"),
])
def test_bad_maps_are_rejected_by_name(kwargs, message):
    model = hybrid_amga(**HYBRID)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3, 64, 64), **kwargs)


def test_unknown_guidance_is_rejected():
    with pytest.raises(ValueError, match="guidance mode 'soft'"):
        hybrid_amga(**HYBRID, guidance="soft")
