"""Write a synthetic industrial defect dataset in the MVTec AD layout, with a ``metadata.json``.

Layout per product (``NNN`` counts from 000 within each folder)::

    <out>/<product>/train/good/NNN.png
    <out>/<product>/test/good/NNN.png
    <out>/<product>/test/<defect>/NNN.png
    <out>/<product>/ground_truth/<defect>/NNN_mask.png           (0/255)
    <out>/<product>/object_masks/<split>/<label>/NNN_object.png  (object products only, 0/255)
    <out>/metadata.json
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
from tqdm import tqdm

from ..errors import DataError
from ..images import save_image
from ..sample import NORMAL_LABEL, Box, Sample
from .defects import DEFECT_TYPES
from .render import render_image
from .textures import PRODUCT_RENDERERS

GENERATOR_NAME = "anomaly_discovery.data.synthetic"
GENERATOR_VERSION = "1.0"
PRODUCTS: tuple[str, ...] = tuple(PRODUCT_RENDERERS)
LABELS: tuple[str, ...] = (NORMAL_LABEL, *DEFECT_TYPES)
SPLIT_IDS = {"train": 0, "test": 1}
TEST_GOOD_SHARE = 2 / 9
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 2048


@dataclass(frozen=True)
class ImageJob:
    """One image to write: where it goes and the seed key that fixes its pixels.

    The seed key is (seed, product id, label id, split id, index within its folder), so an image does not
    depend on how many others are generated or in which order.
    """

    product: str
    split: str
    label: str
    index: int
    seed: int
    image_size: int

    @property
    def seed_key(self) -> tuple[int, ...]:
        return (self.seed, PRODUCTS.index(self.product), LABELS.index(self.label), SPLIT_IDS[self.split],
                self.index)

    @property
    def image_path(self) -> str:
        return f"{self.product}/{self.split}/{self.label}/{self.index:03d}.png"

    @property
    def mask_path(self) -> str | None:
        if self.label == NORMAL_LABEL:
            return None
        return f"{self.product}/ground_truth/{self.label}/{self.index:03d}_mask.png"

    @property
    def object_mask_path(self) -> str:
        return f"{self.product}/object_masks/{self.split}/{self.label}/{self.index:03d}_object.png"


@dataclass(frozen=True)
class GeneratedImage:
    """One written image as recorded in ``metadata.json`` (paths relative to the dataset folder)."""

    image_path: str
    product: str
    split: str
    label: str
    mask_path: str | None
    object_mask_path: str | None
    boxes: tuple[Box, ...]
    seed_key: tuple[int, ...]

    def to_json(self) -> dict:
        return {**asdict(self), "boxes": [asdict(box) for box in self.boxes], "seed_key": list(self.seed_key)}

    def to_sample(self, root: Path) -> Sample:
        return Sample(image_path=root / self.image_path, label=self.label,
                      mask_path=root / self.mask_path if self.mask_path else None,
                      split=self.split, product=self.product, boxes=self.boxes)


@dataclass(frozen=True)
class GeneratedDataset:
    """What :func:`generate_dataset` wrote. ``counts[product]["test/scratch"]`` is a folder's image count."""

    out_dir: Path
    seed: int
    image_size: int
    products: tuple[str, ...]
    defect_types: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    images: tuple[GeneratedImage, ...]
    metadata_path: Path
    seconds: float

    @property
    def n_images(self) -> int:
        return len(self.images)

    def samples(self) -> list[Sample]:
        return [image.to_sample(self.out_dir) for image in self.images]

    def summary(self) -> str:
        """One line per product: where the images went and how many of each kind."""
        lines = [f"{self.n_images} images of {self.image_size} px in {self.out_dir} "
                 f"({self.seconds:.1f}s, seed {self.seed})"]
        for product, folders in self.counts.items():
            lines.append(f"  {product}: " + ", ".join(f"{folder} {n}" for folder, n in sorted(folders.items())))
        return "\n".join(lines)


def split_counts(n_product: int, normal_fraction: float) -> dict[str, int]:
    """Images per folder for one product: ``normal_fraction`` of them normal, of which ``TEST_GOOD_SHARE``
    (at least one) go to test/good and the rest to train/good; the defects are spread evenly over the types,
    the first types taking the remainder. Raises ``ValueError`` when a folder would be empty."""
    n_normal = max(2, round(n_product * normal_fraction))
    n_test_good = max(1, round(n_normal * TEST_GOOD_SHARE))
    n_defect = n_product - n_normal
    if n_defect < len(DEFECT_TYPES):
        raise ValueError(f"{n_product} images per product leave {n_defect} defect images for "
                         f"{len(DEFECT_TYPES)} defect types; raise n_images or lower normal_fraction")
    counts = {"train/good": n_normal - n_test_good, "test/good": n_test_good}
    per_type, extra = divmod(n_defect, len(DEFECT_TYPES))
    for position, defect in enumerate(DEFECT_TYPES):
        counts[f"test/{defect}"] = per_type + (position < extra)
    return counts


def plan_jobs(n_images: int, seed: int, image_size: int, products: tuple[str, ...],
              normal_fraction: float) -> tuple[list[ImageJob], dict[str, dict[str, int]]]:
    """Every image to write, product by product, and the per-folder counts."""
    jobs, counts = [], {}
    per_product, extra = divmod(n_images, len(products))
    for position, product in enumerate(products):
        try:
            counts[product] = split_counts(per_product + (position < extra), normal_fraction)
        except ValueError as exc:
            raise ValueError(f"n_images={n_images} is too small for {len(products)} product(s): {exc}") from exc
        for folder, count in counts[product].items():
            split, label = folder.split("/")
            jobs.extend(ImageJob(product, split, label, index, seed, image_size) for index in range(count))
    return jobs, counts


def write_image(job: ImageJob, out_dir: Path) -> GeneratedImage:
    """Render one job and write its image, defect mask and object mask."""
    rendered = render_image(job.product, job.label, job.image_size, job.seed_key)
    save_image(out_dir / job.image_path, rendered.image)
    if rendered.defect_mask is not None:
        save_image(out_dir / job.mask_path, rendered.defect_mask)
    object_path = job.object_mask_path if rendered.object_mask is not None else None
    if object_path is not None:
        save_image(out_dir / object_path, rendered.object_mask)
    box = rendered.defect_box(job.label)
    return GeneratedImage(job.image_path, job.product, job.split, job.label, job.mask_path, object_path,
                          (box,) if box is not None else (), job.seed_key)


def _write_in_worker(args: tuple[ImageJob, Path]) -> GeneratedImage:
    return write_image(*args)


def _validate(n_images: int, seed: int, image_size: int, products: tuple[str, ...], normal_fraction: float,
              workers: int) -> None:
    for name, value in (("n_images", n_images), ("seed", seed), ("image_size", image_size), ("workers", workers)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if seed < 0:
        raise ValueError(f"seed must be ≥ 0, got {seed}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {image_size}")
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    if not products or len(set(products)) != len(products):
        raise ValueError(f"products must be a non-empty list without repeats, got {products!r}")
    unknown = [product for product in products if product not in PRODUCTS]
    if unknown:
        raise ValueError(f"unknown product(s) {unknown}; known products: {', '.join(PRODUCTS)}")
    if not 0.0 < normal_fraction < 1.0:
        raise ValueError(f"normal_fraction must be between 0 and 1, got {normal_fraction}")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder, unless ``overwrite`` and it holds an earlier dataset of this generator."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "output path is a file, not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)
        return
    metadata_path = out_dir / "metadata.json"
    if not overwrite:
        raise DataError(out_dir, "folder is not empty; choose an empty or new folder, or pass overwrite=True")
    try:
        previous = json.loads(metadata_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(out_dir, "will not overwrite: the folder has no readable metadata.json from this "
                                 f"generator ({exc})") from exc
    if previous.get("generator") != GENERATOR_NAME:
        raise DataError(out_dir, "will not overwrite: metadata.json was not written by this generator")
    for product in previous.get("products", []):
        if product in PRODUCTS:
            shutil.rmtree(out_dir / product, ignore_errors=True)
    metadata_path.unlink()


def generate_dataset(out_dir: str | Path, n_images: int, seed: int = 0, image_size: int = 256,
                     products: tuple[str, ...] = ("metal_plate", "bottle"), normal_fraction: float = 0.45,
                     workers: int = 1, progress: bool = True, overwrite: bool = False) -> GeneratedDataset:
    """Generate ``n_images`` images in total, shared evenly over ``products``.

    Per product, ``normal_fraction`` (default 0.45) of the images are normal: about 7/9 of them in
    train/good, 2/9 in test/good (so 35% and 10% of the product by default). The remaining defect
    images (55% by default) are spread evenly over the six defect types in test/<defect>, each with its
    mask in ground_truth/<defect>. Every image has one defect at most; on the bottle it lies inside the
    bottle's silhouette, written to object_masks/. Each image has its own seed key, so the same arguments
    give byte-identical files whatever ``workers`` is, and an image does not change with ``n_images``.
    """
    products = tuple(products)
    _validate(n_images, seed, image_size, products, normal_fraction, workers)
    out_dir = Path(out_dir)
    jobs, counts = plan_jobs(n_images, seed, image_size, products, normal_fraction)
    _prepare_out_dir(out_dir, overwrite)
    started = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="generate", unit="img", disable=not progress)
    if workers == 1:
        images = []
        for job in jobs:
            images.append(write_image(job, out_dir))
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=cv2.setNumThreads,
                                 initargs=(1,)) as pool:
            images = []
            for image in pool.map(_write_in_worker, [(job, out_dir) for job in jobs], chunksize=8):
                images.append(image)
                bar.update()
    bar.close()
    metadata = {
        "generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "layout": "mvtec", "seed": seed,
        "image_size": image_size, "n_images": len(images), "normal_fraction": normal_fraction,
        "products": list(products), "defect_types": list(DEFECT_TYPES), "counts": counts,
        "images": [image.to_json() for image in images],
    }
    metadata_path = out_dir / "metadata.json"
    metadata_path.write_text(json.dumps(metadata, indent=1) + "\n")
    return GeneratedDataset(out_dir, seed, image_size, products, DEFECT_TYPES, counts, tuple(images),
                            metadata_path, time.perf_counter() - started)
