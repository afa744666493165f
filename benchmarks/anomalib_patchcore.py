"""anomalib's PatchCore on a list of images, offline, for the side-by-side timing in ``mtd_detection.py``.

Runs in a separate virtualenv that has ``anomalib`` (it is not a project dependency), e.g.
    /tmp/anomalib-venv/bin/python benchmarks/anomalib_patchcore.py --manifest M.json --maps-dir DIR
``M.json`` holds ``{"train": [paths], "test": [paths]}``. Prints one JSON object (timings, image scores,
settings) on its last stdout line and writes each test image's anomaly map, at the image's own size, to
``DIR/<index>.npy``; the caller computes the metrics with the project's own functions.

Backbone: anomalib's ``PatchcoreModel`` accepts a torch module (it taps nodes with torchvision FX), so it
gets torchvision's MobileNetV2 with the same offline ImageNet file and the same taps (``features.6``,
``features.13``) as the project's detector, at the same input size (``--image-size``, default anomalib's
256 px); anomalib's own defaults otherwise (bilinear resize, 3×3 average pooling, plain channel concatenation,
9 neighbours for the score reweighting, σ = 4 blur); the coreset ratio is ``--coreset-ratio`` (anomalib's
default 0.1; ``mtd_detection.py`` passes the project's). Timed like ours: fit = feature extraction + coreset;
predict = resize/normalise + ``PatchcoreModel.forward`` + resizing each map to its image's size (images are
decoded before the clocks start).

Coreset: anomalib's ``KCenterGreedy`` takes one full pass over all N patch features per selected point, so
on a CPU it is out of reach for MTD (N ≈ 780 k patches, tens of thousands of points); its cost is measured on
``--probe-iterations`` steps and extrapolated. ``--coreset indices --coreset-indices FILE.npy`` (what ``mtd_detection.py`` uses)
keeps the patch positions that the project's detector picked on the same images (same grid, same order),
taken from anomalib's own features; ``--coreset adisc`` runs the project's greedy k-center on anomalib's
features; ``--coreset anomalib`` runs anomalib's sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LAYERS = ("features.6", "features.13")


def load_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def mobilenet_v2(weights: Path) -> torch.nn.Module:
    from torchvision.models import mobilenet_v2 as build

    model = build()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def preprocess(images: list[np.ndarray], transform) -> torch.Tensor:
    """Each image through anomalib's pre-processing transform (resize + ImageNet normalisation), stacked."""
    tensors = [torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0) for image in images]
    return torch.stack([transform(tensor) for tensor in tensors])


def embed(model, images: list[np.ndarray], transform, batch_size: int) -> None:
    """anomalib's training pass: every batch's patch embeddings go to ``model.embedding_store``."""
    model.train()
    for start in range(0, len(images), batch_size):
        model(preprocess(images[start:start + batch_size], transform))


def anomalib_coreset_seconds_per_step(embedding: torch.Tensor, ratio: float, steps: int) -> tuple[float, int, float]:
    """(seconds per greedy step, coreset size, projection seconds) of anomalib's KCenterGreedy."""
    from anomalib.models.components import KCenterGreedy

    sampler = KCenterGreedy(embedding=embedding, sampling_ratio=ratio)
    start = time.perf_counter()
    sampler.model.fit(embedding)
    sampler.features = sampler.model.transform(embedding)
    projection_s = time.perf_counter() - start
    sampler.reset_distances()
    index = torch.tensor(0)
    start = time.perf_counter()
    for _ in range(steps):
        sampler.update_distances(index)
        index = sampler.get_new_idx()
        sampler.min_distances.scatter_(0, index.unsqueeze(0).unsqueeze(1), 0.0)
    return (time.perf_counter() - start) / steps, sampler.coreset_size, projection_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--maps-dir", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True, help="torchvision MobileNetV2 ImageNet file")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="project root, for --coreset adisc")
    parser.add_argument("--coreset", choices=("indices", "adisc", "anomalib"), default="adisc")
    parser.add_argument("--coreset-indices", type=Path, default=None, help=".npy of bank positions (--coreset indices)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--coreset-projection-dim", type=int, default=128,
                        help="for --coreset adisc; 0 = no projection")
    parser.add_argument("--probe-iterations", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256, help="square input side (anomalib's default 256)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import anomalib
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    manifest = json.loads(args.manifest.read_text())
    train = [load_rgb(p) for p in manifest["train"]]
    test = [load_rgb(p) for p in manifest["test"]]
    transform = Patchcore.configure_pre_processor((args.image_size, args.image_size)).transform
    model = PatchcoreModel(layers=list(LAYERS), backbone=mobilenet_v2(args.weights), pre_trained=False)

    start = time.perf_counter()
    embed(model, train, transform, args.batch_size)
    embedding = torch.vstack(model.embedding_store)
    extract_s = time.perf_counter() - start
    notes = []
    if args.coreset == "anomalib":
        start = time.perf_counter()
        model.subsample_embedding(args.coreset_ratio)
        coreset_s, estimate = time.perf_counter() - start, None
    else:
        per_step, anomalib_size, projection_s = anomalib_coreset_seconds_per_step(
            embedding, args.coreset_ratio, args.probe_iterations)
        estimate = projection_s + per_step * anomalib_size
        notes.append(f"anomalib's KCenterGreedy measured at {per_step:.3f} s/step over {args.probe_iterations} "
                     f"steps (+{projection_s:.1f} s projection): est. {estimate / 3600:.1f} h for {anomalib_size} "
                     "points here, so it was not run")
        start = time.perf_counter()
        if args.coreset == "indices":
            if args.coreset_indices is None:
                parser.error("--coreset indices needs --coreset-indices FILE.npy")
            chosen = torch.from_numpy(np.load(args.coreset_indices)).long()
            if chosen.numel() == 0 or int(chosen.min()) < 0 or int(chosen.max()) >= len(embedding):
                parser.error(f"{args.coreset_indices}: positions must lie in [0, {len(embedding)})")
            notes.append("memory bank: anomalib's own features at the patch positions the project's PatchCore "
                         "picked by greedy k-center on the same images (coreset time is in the project's fit)")
        else:
            sys.path.insert(0, str(args.repo))
            from anomaly_discovery.models.features.coreset import coreset_size, greedy_coreset_indices

            chosen = greedy_coreset_indices(embedding, coreset_size(len(embedding), args.coreset_ratio),
                                            args.coreset_projection_dim or None, args.seed)
            notes.append("memory bank: the project's greedy k-center run on anomalib's features")
        model.memory_bank = embedding[chosen].contiguous()
        model.embedding_store.clear()
        coreset_s = time.perf_counter() - start

    model.eval()
    start = time.perf_counter()
    scores, maps = [], []
    with torch.no_grad():
        for first in range(0, len(test), args.batch_size):
            chunk = test[first:first + args.batch_size]
            output = model(preprocess(chunk, transform))
            scores.extend(float(s) for s in output.pred_score.reshape(-1))
            for image, anomaly_map in zip(chunk, output.anomaly_map):
                resized = F.interpolate(anomaly_map.reshape(1, 1, *anomaly_map.shape[-2:]), size=image.shape[:2],
                                        mode="bilinear", align_corners=False)
                maps.append(resized[0, 0].numpy().astype(np.float32))
    predict_s = time.perf_counter() - start

    args.maps_dir.mkdir(parents=True, exist_ok=True)
    for index, anomaly_map in enumerate(maps):
        np.save(args.maps_dir / f"{index}.npy", anomaly_map)
    print(json.dumps({
        "anomalib_version": anomalib.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "n_train": len(train), "n_test": len(test), "memory_bank": list(model.memory_bank.shape),
        "feature_extraction_seconds": round(extract_s, 2), "coreset_seconds": round(coreset_s, 2),
        "fit_seconds": None if args.coreset == "indices" else round(extract_s + coreset_s, 2),
        "anomalib_coreset_estimated_seconds": None if estimate is None else round(estimate, 1),
        "predict_seconds": round(predict_s, 2), "images_per_s": round(len(test) / predict_s, 3),
        "scores": scores,
        "settings": {"backbone": "torchvision mobilenet_v2 (offline ImageNet file) via anomalib's FX extractor",
                     "layers": list(LAYERS), "image_size": args.image_size,
                     "coreset_ratio": round(len(model.memory_bank) / len(embedding), 4),
                     "coreset": args.coreset, "num_neighbors": model.num_neighbors, "batch_size": args.batch_size},
        "notes": notes,
    }))


if __name__ == "__main__":
    main()
