import pytest
import torch

from anomaly_discovery.models.discovery.augment import (AugmentConfig, augment_views, gaussian_blur, paired_geometric,
                                                        photometric)


def marked_batch(n=16, size=32):
    """Images, maps and masks that all carry the same 3×3 mark at a different place per sample."""
    images = torch.zeros(n, 3, size, size)
    for i in range(n):
        row, col = 3 + (5 * i) % (size - 8), 4 + (7 * i) % (size - 9)
        images[i, :, row:row + 3, col:col + 3] = 1.0
    return images, images[:, :1].clone(), images[:, :1].clone()


def peaks(tensor):
    flat = tensor[:, 0].flatten(1).argmax(1)
    return torch.stack([flat // tensor.shape[-1], flat % tensor.shape[-1]], 1)


def test_flips_and_rotations_move_image_map_and_mask_pixels_together():
    images, maps, masks = marked_batch()
    config = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = paired_geometric(images, maps, masks, torch.Generator().manual_seed(0), config)
    assert torch.equal(peaks(out[0]), peaks(out[1])) and torch.equal(peaks(out[1]), peaks(out[2]))
    assert torch.allclose(out[0].sum((1, 2, 3)), images.sum((1, 2, 3)), atol=1e-3)
    assert not torch.equal(peaks(out[0]), peaks(images))


def test_random_resized_crop_keeps_the_mark_aligned_across_the_three():
    images, maps, masks = marked_batch()
    config = AugmentConfig(scale=(0.6, 0.9))
    out_images, out_maps, out_masks = paired_geometric(images, maps, masks, torch.Generator().manual_seed(3), config)
    torch.testing.assert_close(out_images[:, :1], out_maps)
    torch.testing.assert_close(out_maps, out_masks)
    assert out_maps.min() >= 0 and out_maps.max() <= 1


def test_photometric_changes_the_image_but_never_the_maps():
    images, maps, masks = marked_batch()
    images = images * 0.5 + 0.25
    out_images, out_maps, out_masks = augment_views(images, maps, masks, torch.Generator().manual_seed(1))
    assert out_images.shape == images.shape
    assert out_images.min() >= 0 and out_images.max() <= 1
    assert torch.equal(out_maps, out_masks)
    jittered = photometric(images, torch.Generator().manual_seed(1))
    assert (jittered - images).abs().max() > 0.01


def test_same_generator_seed_gives_the_same_views():
    images, maps, masks = marked_batch()
    first = augment_views(images, maps, masks, torch.Generator().manual_seed(7))
    second = augment_views(images, maps, masks, torch.Generator().manual_seed(7))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gaussian_blur_preserves_mean_and_spreads_a_point():
    image = torch.zeros(2, 3, 17, 17)
    image[:, :, 8, 8] = 1.0
    blurred = gaussian_blur(image, torch.tensor([0.5, 2.0]))
    assert blurred[1, 0, 8, 8] < blurred[0, 0, 8, 8] < 1.0
    torch.testing.assert_close(blurred.sum((2, 3)), image.sum((2, 3)), atol=1e-4, rtol=1e-4)


def test_paired_geometric_refuses_mismatched_shapes():
    images, maps, masks = marked_batch()
    with pytest.raises(ValueError, match="share batch size"):
        paired_geometric(images, maps[:, :, :16], masks, torch.Generator())


def test_augment_config_validates_its_ranges():
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="hflip"):
        AugmentConfig(hflip=1.5)
