"""Anomaly generation for PRN training (methods §3 step 8), numpy only.

- **Simulated** anomalies (DRAEM-style, the "unseen appearance" variants): a Perlin-noise mask (scales
  2^0 … 2^5, thresholded at 0.5) filled with a procedurally generated texture, blended with β ~ U(0, 0.8).
  DTD is not available offline, so the textures are built here (sinusoids, fractal noise, checkers,
  stripes, speckle) and then colour-jittered.
- **Extended** anomalies (the "seen appearance" variants): a real defect is cropped with its mask,
  augmented (flip, rotation, brightness, contrast, scale) and its masked pixels pasted into the foreground
  of a normal image, re-placed until the pasted mask lies inside the foreground.

All functions take uint8 H×W×3 images, boolean masks and a ``numpy.random.Generator``; they never change
their inputs.
"""

from __future__ import annotations

import cv2
import numpy as np

PERLIN_THRESHOLD = 0.5
PERLIN_MAX_EXPONENT = 5
MAX_BETA = 0.8
TEXTURE_KINDS = ("sinusoid", "fractal", "checker", "stripes", "speckle")


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise with ``res`` = (cells along y, cells along x), scaled by √2 to ≈[-1, 1].

    Random unit gradients sit on the (res+1)² lattice corners; each pixel blends the dot products of its
    cell's four corner gradients with its offsets, weighted by the quintic fade 6t⁵ − 15t⁴ + 10t³.
    """
    height, width = shape
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(res[0] + 1, res[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    gy = np.arange(height) * (res[0] / height)
    gx = np.arange(width) * (res[1] / width)
    iy, ix = gy.astype(int)[:, None], gx.astype(int)[None, :]
    fy, fx = (gy - np.floor(gy))[:, None], (gx - np.floor(gx))[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[iy + dy, ix + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    wy, wx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return (np.sqrt(2.0) * (top * (1 - wy) + bottom * wy)).astype(np.float32)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = PERLIN_THRESHOLD,
                max_tries: int = 100) -> np.ndarray:
    """A non-empty boolean mask: Perlin noise with scales 2^a × 2^b (a, b ∈ 0…5) above ``threshold``.

    Noise fields that stay below the threshold everywhere are redrawn (at most ``max_tries`` times).
    """
    for _ in range(max_tries):
        res = tuple(int(2 ** e) for e in rng.integers(0, PERLIN_MAX_EXPONENT + 1, size=2))
        mask = perlin_noise(shape, res, rng) > threshold
        if mask.any():
            return mask
    raise RuntimeError(f"no Perlin mask of shape {shape} reached threshold {threshold} in {max_tries} tries")


def _texture_field(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A scalar field in [0, 1] of the given texture kind."""
    height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "sinusoid":
        field = np.zeros(shape, np.float32)
        for _ in range(rng.integers(1, 5)):
            theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.02, 0.4), rng.uniform(0, 2 * np.pi)
            field += np.sin(freq * (x * np.cos(theta) + y * np.sin(theta)) + phase)
    elif kind == "fractal":
        field = sum(perlin_noise(shape, (2 ** o, 2 ** o), rng) / 2 ** (o - 1) for o in range(1, 6))
    elif kind == "checker":
        cell = rng.integers(2, max(3, min(shape) // 4))
        field = ((y // cell + x // cell) % 2).astype(np.float32)
    elif kind == "stripes":
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, max(4.0, min(shape) / 4))
        field = ((x * np.cos(theta) + y * np.sin(theta)) % period < period / 2).astype(np.float32)
    elif kind == "speckle":
        sigma = float(rng.uniform(0.5, 3.0))
        field = cv2.GaussianBlur(rng.random(shape, dtype=np.float32), (0, 0), sigma)
    else:
        raise ValueError(f"unknown texture kind {kind!r}: use one of {', '.join(TEXTURE_KINDS)}")
    low, high = float(field.min()), float(field.max())
    return (field - low) / (high - low) if high > low else np.zeros(shape, np.float32)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """An H×W×3 uint8 texture: a random field mapped between two random colours, then a random gamma."""
    kind = kind or TEXTURE_KINDS[rng.integers(len(TEXTURE_KINDS))]
    field = _texture_field(kind, shape, rng) ** rng.uniform(0.5, 2.0)
    low, high = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    texture = low + field[..., None] * (high - low)
    return np.clip(texture, 0, 255).round().astype(np.uint8)


def simulate_anomaly(image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None,
                     max_beta: float = MAX_BETA, min_beta: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM-style anomaly: I' = (1 − M)·I + M·(β·I + (1 − β)·T), M a Perlin mask inside the foreground,
    β ~ U(``min_beta``, ``max_beta``) (a larger β keeps more of the image: a fainter anomaly).

    Returns the anomalous image and M. The mask is redrawn until it overlaps the foreground.
    """
    if not 0.0 <= min_beta <= max_beta < 1.0:
        raise ValueError(f"need 0 <= min_beta <= max_beta < 1, got min_beta={min_beta}, max_beta={max_beta}")
    shape = image.shape[:2]
    if foreground is not None and not foreground.any():
        raise ValueError("foreground mask is empty: nowhere to place a simulated anomaly")
    while True:
        mask = perlin_mask(shape, rng)
        if foreground is not None:
            mask &= foreground
        if mask.any():
            break
    texture = procedural_texture(shape, rng).astype(np.float32)
    beta = rng.uniform(min_beta, max_beta)
    blended = beta * image.astype(np.float32) + (1.0 - beta) * texture
    out = image.copy()
    out[mask] = np.clip(blended[mask], 0, 255).round().astype(np.uint8)
    return out, mask


def _crop_to_mask(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("real anomaly mask is empty: nothing to extend")
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return image[window], mask[window]


def augment_defect(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                   max_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Crop a real defect to its mask's bounding box, then random flips, a rotation by k·90°, a scale in
    [0.5, 1.5] (clamped to ``max_size``), brightness ±40 and contrast ×[0.7, 1.3] on the defect pixels."""
    crop, crop_mask = _crop_to_mask(image, mask)
    if rng.random() < 0.5:
        crop, crop_mask = crop[:, ::-1], crop_mask[:, ::-1]
    if rng.random() < 0.5:
        crop, crop_mask = crop[::-1], crop_mask[::-1]
    turns = int(rng.integers(4))
    crop, crop_mask = np.rot90(crop, turns), np.rot90(crop_mask, turns)
    scale = rng.uniform(0.5, 1.5)
    if max_size is not None:
        scale = min(scale, max_size[0] / crop.shape[0], max_size[1] / crop.shape[1])
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    crop = cv2.resize(np.ascontiguousarray(crop), size, interpolation=cv2.INTER_LINEAR)
    crop_mask = cv2.resize(np.ascontiguousarray(crop_mask, dtype=np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    if not crop_mask.any():
        crop_mask[crop_mask.shape[0] // 2, crop_mask.shape[1] // 2] = True
    mean = crop[crop_mask].astype(np.float32).mean(axis=0)
    adjusted = (crop.astype(np.float32) - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-40, 40)
    return np.clip(adjusted, 0, 255).round().astype(np.uint8).reshape(crop.shape), crop_mask


def paste_defect(target: np.ndarray, crop: np.ndarray, crop_mask: np.ndarray, rng: np.random.Generator,
                 foreground: np.ndarray | None = None, max_tries: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Paste the masked pixels of ``crop`` into ``target`` inside ``foreground`` (default: everywhere).

    Positions are drawn around random foreground pixels and re-drawn while any pasted pixel falls outside
    the foreground; after ``max_tries`` the best position is used and the mask clipped to the foreground,
    so the returned mask always lies inside it. Returns the new image and the pasted mask.
    """
    height, width = target.shape[:2]
    h, w = crop_mask.shape
    if h > height or w > width:
        raise ValueError(f"defect crop {crop_mask.shape} is larger than the target image {target.shape[:2]}")
    foreground = np.ones((height, width), bool) if foreground is None else foreground
    fg_y, fg_x = np.nonzero(foreground)
    if fg_y.size == 0:
        raise ValueError("foreground mask is empty: nowhere to paste an extended anomaly")
    best, best_inside = (0, 0), -1
    for _ in range(max_tries):
        pick = rng.integers(fg_y.size)
        top = int(np.clip(fg_y[pick] - h // 2, 0, height - h))
        left = int(np.clip(fg_x[pick] - w // 2, 0, width - w))
        inside = int(foreground[top:top + h, left:left + w][crop_mask].sum())
        if inside > best_inside:
            best, best_inside = (top, left), inside
        if inside == crop_mask.sum():
            break
    top, left = best
    mask = np.zeros((height, width), bool)
    mask[top:top + h, left:left + w] = crop_mask
    mask &= foreground
    out = target.copy()
    window = out[top:top + h, left:left + w]
    local = mask[top:top + h, left:left + w]
    window[local] = crop[local]
    return out, mask


def extend_anomaly(target: np.ndarray, defect_image: np.ndarray, defect_mask: np.ndarray,
                   rng: np.random.Generator, foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An extended anomaly: augment a real defect and paste it into ``target``'s foreground."""
    crop, crop_mask = augment_defect(defect_image, defect_mask, rng, max_size=target.shape[:2])
    return paste_defect(target, crop, crop_mask, rng, foreground)
