import io
import pickle

import numpy as np
import pytest
from PIL import Image

from anomaly_discovery.data.errors import ImageReadError
from anomaly_discovery.data.images import UploadRejected, decode_upload, load_image, load_mask, save_image
from tests.conftest import write_png


def test_load_image_gives_rgb_from_gray(tmp_path, rng):
    gray = rng.integers(0, 256, (12, 20), dtype=np.uint8)
    rgb = load_image(write_png(tmp_path / "g.png", gray))
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 1], gray)


def test_load_image_gray_mode_from_rgb(tmp_path, rng):
    rgb = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    gray = load_image(write_png(tmp_path / "c.png", rgb), mode="L")
    assert gray.shape == (8, 9)


def test_load_image_scales_16_bit_to_8_bit(tmp_path):
    wide = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    path = tmp_path / "w.png"
    Image.fromarray(wide).save(path)
    out = load_image(path, mode="L")
    assert out.dtype == np.uint8
    assert out[0, 0] == 0 and out[0, 1] == 255 and out[1, 0] == 128 and out[1, 1] == 1


def test_load_mask_thresholds_at_128(tmp_path):
    mask = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    out = load_mask(write_png(tmp_path / "m.png", mask))
    assert out.tolist() == [[False, False, True, True]]


def test_load_mask_refuses_size_different_from_image(tmp_path):
    path = write_png(tmp_path / "m.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageReadError, match="m.png.*differs"):
        load_mask(path, expected_shape=(10, 12))


def test_zero_byte_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.png.*0 bytes"):
        load_image(path)


def test_truncated_file_is_refused_with_its_name(tmp_path, rng):
    good = write_png(tmp_path / "full.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_image(cut)


def test_non_image_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image at all")
    with pytest.raises(ImageReadError, match="notes.png.*not a readable image"):
        load_image(path)


def test_save_image_writes_masks_as_0_255(tmp_path):
    path = tmp_path / "sub" / "mask.png"
    save_image(path, np.array([[True, False]]))
    assert np.asarray(Image.open(path)).tolist() == [[255, 0]]


def _encoded(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def test_decode_upload_gives_rgb_and_the_extension():
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    array, extension = decode_upload(_encoded(gray, "PNG"), "a.png", max_pixels=100)
    assert extension == "png" and array.shape == (6, 8, 3) and (array[..., 1] == gray).all()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"plain text, not pixels", "not_image"),
    (_encoded(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8), "PNG")[:-30], "corrupt"),
    (_encoded(np.zeros((20, 20), np.uint8), "PNG"), "too_large"),
    (_encoded(np.zeros((4, 4), np.uint8), "GIF"), "format"),
], ids=["empty", "text", "truncated", "over-the-pixel-limit", "gif"])
def test_decode_upload_refuses_bad_bytes_naming_the_file(data, reason):
    with pytest.raises(UploadRejected, match="upload.bin") as refused:
        decode_upload(data, "upload.bin", max_pixels=100)
    assert refused.value.reason == reason


def test_a_read_error_survives_pickling_with_its_path_and_reason(tmp_path):
    """Ray sends a worker's exception to the driver pickled: it must arrive as the same error, not a TypeError."""
    missing = tmp_path / "gone.png"
    with pytest.raises(ImageReadError) as raised:
        load_image(missing)
    again = pickle.loads(pickle.dumps(raised.value))
    assert type(again) is ImageReadError and again.path == missing and again.reason == raised.value.reason
    assert str(again) == str(raised.value)
