from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_discovery.models.features.backbones import (OFFLINE_BACKBONES, WeightsError, build_backbone, check_images,
                                                         for_inference, images_to_tensor)

INPUT_SIZE = 64


def _forward(extractor, size=INPUT_SIZE):
    with torch.inference_mode():
        return extractor(torch.zeros(1, 3, size, size))


def _build_offline(name):
    try:
        return build_backbone(name)
    except WeightsError as exc:  # the weights package of an optional backbone is not installed here
        if "not installed" in str(exc) or "not found" in str(exc):
            pytest.skip(f"{name} weights are not installed: {exc}")
        raise


def _assert_same_weights(extractor: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    state = extractor.state_dict()
    matched = [key for key in state if key.split(".", 1)[-1] in saved or key in saved]
    assert len(matched) >= 0.9 * len(state)
    for key in matched:
        source = saved[key] if key in saved else saved[key.split(".", 1)[-1]]
        assert torch.equal(state[key], source), key


@pytest.mark.parametrize("name", OFFLINE_BACKBONES)
def test_offline_backbone_gives_documented_feature_shapes(name):
    extractor = _build_offline(name)
    outputs = _forward(extractor)
    assert len(outputs) == len(extractor.channels) == len(extractor.strides)
    for output, channels, stride in zip(outputs, extractor.channels, extractor.strides):
        assert tuple(output.shape) == (1, channels, INPUT_SIZE // stride, INPUT_SIZE // stride)
    assert list(extractor.strides) == sorted(extractor.strides)
    assert not extractor.training


def test_mobilenet_v2_default_taps_are_strides_8_and_16():
    extractor = _build_offline("mobilenet_v2")
    assert extractor.strides == (8, 16)
    assert extractor.channels == (32, 96)


def test_tiny_backbone_is_seeded_and_taps_requested_layers():
    first, again, second = build_backbone("tiny"), build_backbone("tiny"), build_backbone("tiny", layers=[0, 3])
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert second.strides == (2, 16)
    assert [o.shape[1] for o in _forward(second)] == list(second.channels)


def test_timm_resnet18_loads_user_checkpoint(tmp_path: Path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_timm.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    extractor = build_backbone("timm:resnet18", weights=path)
    _assert_same_weights(extractor, source.state_dict())
    assert extractor.strides == (8, 16)
    assert [o.shape[1] for o in _forward(extractor)] == [128, 256]


def test_torchvision_resnet18_loads_user_checkpoint(tmp_path: Path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    source = resnet18(weights=None)
    path = tmp_path / "resnet18_tv.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    torch.manual_seed(4)
    extractor = build_backbone("torchvision:resnet18", weights=path)
    _assert_same_weights(extractor, source.state_dict())
    assert extractor.channels == (128, 256) and extractor.strides == (8, 16)


def test_safetensors_checkpoint_loads(tmp_path: Path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    torch.manual_seed(5)
    source = resnet18(weights=None)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    extractor = build_backbone("torchvision:resnet18", weights=path)
    _assert_same_weights(extractor, source.state_dict())


def test_missing_weights_file_names_file_and_architecture(tmp_path: Path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(WeightsError, match=r"nowhere/resnet18\.pth.*timm resnet18"):
        build_backbone("timm:resnet18", weights=missing)


def test_mismatched_weights_file_names_file_and_architecture(tmp_path: Path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"resnet18\.pth.*does not fit torchvision resnet34"):
        build_backbone("torchvision:resnet34", weights=path)
    with pytest.raises(WeightsError, match=r"resnet18\.pth.*does not fit torchvision mobilenet_v2"):
        build_backbone("mobilenet_v2", weights=path)


def test_unreadable_weights_file_is_a_weights_error(tmp_path: Path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"garbage\.pth.*timm resnet18"):
        build_backbone("timm:resnet18", weights=path)


def test_user_model_without_weights_is_refused():
    with pytest.raises(WeightsError, match="needs a weights file"):
        build_backbone("timm:resnet18")


def test_unknown_backbone_name_is_refused():
    with pytest.raises(ValueError, match="'resnet9000'"):
        build_backbone("resnet9000")


def test_images_to_tensor_resizes_gray_and_rgb_to_normalised_batch():
    gray = np.full((30, 50), 255, np.uint8)
    rgb = np.zeros((70, 40, 3), np.uint8)
    batch = images_to_tensor([gray, rgb], 32)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch[0, 0], torch.full((32, 32), (1 - 0.485) / 0.229), atol=1e-4)
    assert torch.allclose(batch[1, 2], torch.full((32, 32), -0.406 / 0.225), atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3, 4, 5), np.uint8), r"image 1 has shape \(2, 3, 4, 5\)"),
    (np.zeros((8, 8, 4), np.uint8), r"image 1 has shape \(8, 8, 4\)"),
    (np.zeros((8, 8), np.float32), r"image 1 has dtype float32"),
    ([[1, 2]], r"image 1 is a list"),
])
def test_check_images_names_the_bad_image(bad, message):
    with pytest.raises(ValueError, match=message):
        check_images([np.zeros((8, 8), np.uint8), bad])


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_for_inference_keeps_the_outputs(name):
    plain = build_backbone(name)
    fast = for_inference(build_backbone(name))
    batch = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = plain(batch)
        got = fast(batch.contiguous(memory_format=torch.channels_last))
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_for_inference_folds_every_batch_norm_of_mobilenet_v2():
    fast = for_inference(build_backbone("mobilenet_v2"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())


def test_cpu_batch_runs_a_few_images_per_pass_with_the_whole_batchs_outputs(monkeypatch):
    extractor = for_inference(build_backbone("mobilenet_v2"))
    batch = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    passes = []
    extract = extractor.extract
    monkeypatch.setattr(extractor, "extract", lambda x: passes.append(len(x)) or extract(x))
    with torch.inference_mode():
        extractor.cpu_batch_pixels = None
        whole = extractor(batch)
        extractor.cpu_batch_pixels = 3 * 64 * 64 + 100  # three images per pass
        split = extractor(batch)
    assert passes == [7, 3, 3, 1]
    for a, b in zip(whole, split):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_cpu_batch_runs_whole_in_training_mode(monkeypatch):
    extractor = build_backbone("tiny", layers=(1, 2)).train()  # batch norms use the batch's statistics
    extractor.cpu_batch_pixels = 32 * 32
    passes = []
    extract = extractor.extract
    monkeypatch.setattr(extractor, "extract", lambda x: passes.append(len(x)) or extract(x))
    extractor(torch.randn(4, 3, 32, 32))
    extractor.eval()(torch.randn(4, 3, 32, 32))
    assert passes == [4, 1, 1, 1, 1]
