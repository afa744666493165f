"""``adisc``: the command line of anomaly-discovery. Heavy imports happen inside each verb."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def cmd_generate(args: argparse.Namespace) -> int:
    from .data.synthetic import generate_dataset

    result = generate_dataset(args.out, n_images=args.n, seed=args.seed, image_size=args.size,
                              workers=args.workers, progress=not args.quiet, overwrite=args.overwrite)
    print(result.summary())
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from .platform.jobs.detect import DetectConfig, run_detect

    config = DetectConfig(data=args.data, format=args.format, detector=args.detector, out=args.out,
                          backbone=args.backbone, weights=args.weights, maps=args.maps,
                          object_prior=args.object_prior, image_size=args.image_size, device=args.device,
                          skip_bad=args.skip_bad, split_file=args.split_file, masks=args.masks,
                          prior_prompt=args.prompt, sam_checkpoint=args.sam_checkpoint,
                          grounding_config=args.grounding_config, grounding_checkpoint=args.grounding_checkpoint,
                          text_encoder=args.text_encoder, prn_model=args.prn_model, seed=args.seed,
                          progress=not args.quiet)
    summary = run_detect(config)
    print(summary.describe())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .platform.jobs.evaluate import evaluate_output

    report = evaluate_output(args.output, data=args.data, format=args.format, split_file=args.split_file)
    print(report.describe())
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from .platform.jobs.discover import run_discover_cli

    return run_discover_cli(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from .platform.storage.paths import ServicePaths
    from .platform.service.app import run_serve

    paths = ServicePaths(args.workdir)
    return run_serve({"store": args.store or paths.store_url, "index": str(args.index or paths.index),
                      "model": str(args.model or paths.model), "host": args.host, "port": args.port,
                      "token_env": args.token_env, "replicas": args.replicas})


def cmd_train(args: argparse.Namespace) -> int:
    if args.model == "prn":
        from .platform.ray.train_prn import run_prn_train_cli

        return run_prn_train_cli(args)
    from .platform.ray.train import run_train_cli

    return run_train_cli(args)


def cmd_tune(args: argparse.Namespace) -> int:
    from .platform.ray.tune import run_tune_cli

    return run_tune_cli(args)


def cmd_retrain(args: argparse.Namespace) -> int:
    from .platform.ray.retrain import run_retrain_cli

    return run_retrain_cli(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui.launch import run_ui

    return run_ui(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .platform.jobs.demo import run_demo

    return run_demo(out=args.out, n_images=args.n, seed=args.seed, quick=args.quick,
                    serve=not (args.no_serve or args.quick), port=args.port)


def cmd_export(args: argparse.Namespace) -> int:
    from .platform.export.job import ExportConfig, run_export

    result = run_export(ExportConfig(format=args.format, out=args.out, workdir=args.workdir, store=args.store,
                                     index=args.index, copy=args.copy, overwrite=args.overwrite,
                                     skip_missing=args.skip_missing, progress=not args.quiet))
    print(result.describe())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .platform.export.report import ReportConfig, run_report

    print(run_report(ReportConfig(out=args.out, workdir=args.workdir, store=args.store, index=args.index,
                                  trend=args.trend, overwrite=args.overwrite)))
    return 0


def _add_store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("demo_out"),
                        help="work folder whose service/ state to read (default demo_out/, what `adisc demo` writes)")
    parser.add_argument("--store", default=None, help="SQLAlchemy URL of the store (default: the work folder's)")
    parser.add_argument("--index", type=Path, default=None,
                        help="FAISS index file, its embeddings beside it (default: the work folder's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="dataset folder")
    parser.add_argument("--format", default="auto", choices=["auto", "mvtec", "mtd", "folder", "neu"],
                        help="dataset layout (default: detect it)")
    parser.add_argument("--split-file", type=Path, default=None,
                        help="MTD split file (default: <data>/../mtd_split.json)")
    parser.add_argument("--masks", type=Path, default=None, help="folder-per-class layout: parallel masks folder")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images and mismatched masks (and report their count) instead of stopping")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole parser. The Ray verbs' own arguments (which import torch and Ray) are added only when ``verb``
    is that verb, so ``adisc --help`` and the light verbs start fast."""
    parser = argparse.ArgumentParser(prog="adisc", description=(
        "anomaly-discovery: detect anomalies, localise defect regions, discover and name defect classes, "
        "serve and review them."))
    parser.add_argument("--version", action="version", version=f"adisc {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("generate", help="write a synthetic industrial defect dataset (MVTec AD layout)",
                         description="Write a deterministic synthetic dataset: two products, six defect types, "
                                     "pixel masks, metadata.json, in the MVTec AD layout.")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=400, help="number of images in all (default 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier dataset of this generator in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_generate)

    p = verbs.add_parser("demo", help="run every stage built so far on freshly generated data",
                         description="Generate synthetic data, then run each stage of the loop that exists "
                                     "and print what it did.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="working folder (default demo_out/)")
    p.add_argument("--n", type=int, default=240, help="images to generate (default 240)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smallest settings, no service (for tests)")
    p.add_argument("--no-serve", action="store_true", help="stop after publishing instead of starting the service")
    p.add_argument("--port", type=int, default=8000, help="service port (default 8000)")
    p.set_defaults(handler=cmd_demo)

    p = verbs.add_parser("detect", help="anomaly maps, MEBin regions, object masks and crops for a dataset",
                         description="Run an anomaly detector on a dataset and write, per image, the anomaly "
                                     "map, MEBin mask, object mask, crops and a JSON summary.")
    _add_data_args(p)
    p.add_argument("--detector", default="patchcore", choices=["patchcore", "zero-shot", "prn", "ensemble", "maps"],
                   help="patchcore (default, fast); zero-shot (no normal images); prn (trains on normal images and "
                        "up to 10 labelled defects); ensemble (PatchCore and PRN averaged, PatchCore on "
                        "MobileNetV2 and EfficientNet-Lite0 with the default backbone: the best maps on MTD, at "
                        "PRN's training time); maps (another tool's maps, with --maps)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--backbone", default="mobilenet_v2",
                   help="mobilenet_v2 | efficientnet_lite0/1/2 | tiny | timm:<name> | torchvision:<name>")
    p.add_argument("--weights", type=Path, default=None, help="backbone checkpoint file (timm/torchvision models)")
    p.add_argument("--maps", type=Path, default=None, help="--detector maps: folder of maps another tool wrote")
    p.add_argument("--prn-model", type=Path, default=None,
                   help="--detector prn: a saved detector (`adisc train --model prn` writes OUT/prn.safetensors) "
                        "used instead of fitting one")
    p.add_argument("--object-prior", default="auto", choices=["grounded-sam", "auto", "fallback", "none"])
    p.add_argument("--prompt", default="product", help="Grounded SAM text prompt, e.g. 'magnetic tile'")
    p.add_argument("--sam-checkpoint", type=Path, default=None)
    p.add_argument("--grounding-config", type=Path, default=None)
    p.add_argument("--grounding-checkpoint", type=Path, default=None)
    p.add_argument("--text-encoder", type=Path, default=None, help="local BERT folder for GroundingDINO")
    p.add_argument("--image-size", type=int, default=None,
                   help="detector input side in pixels (default: the detector's own: PatchCore 320, zero-shot and "
                        "PRN 256; the ensemble keeps each member's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_detect)

    p = verbs.add_parser("discover", help="discover novel defect classes in detected regions",
                         description="Train the AMGA discovery model on the regions of a dataset and write "
                                     "assignments (image, regions, class, confidence, outlier score).")
    _add_data_args(p)
    p.add_argument("--detector", default="patchcore", choices=["patchcore", "zero-shot", "prn", "ensemble", "maps"])
    p.add_argument("--detections", type=Path, default=None, help="reuse an `adisc detect` output folder")
    p.add_argument("--k", default="auto", help="number of novel classes, or auto to estimate it")
    p.add_argument("--base", default="none", help="labelled known classes: neu:PATH | synthetic:PATH | none")
    p.add_argument("--config", type=Path, default=None, help="discovery settings file (e.g. Ray Tune's best)")
    p.add_argument("--model", default=None, choices=["learned", "frozen", "transformer"],
                   help="discovery model (default: the settings', learned): learned = AMGA pooling + prototypes "
                        "trained by neighbour consistency on frozen views; frozen = the same views clustered by "
                        "k-means, no training (seconds); transformer = the earlier AMGA transformer")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_discover)

    p = verbs.add_parser("evaluate", help="score an output folder against dataset labels",
                         description="Score an `adisc detect` output (image/pixel AUROC, AUPRO) or an `adisc "
                                     "discover` output (NMI, ARI, F1) against the dataset's labels and masks.")
    p.add_argument("--output", required=True, type=Path, help="an `adisc detect` or `adisc discover` output")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: the one the output names)")
    p.add_argument("--format", default=None, help="dataset layout (default: the one the output names)")
    p.add_argument("--split-file", type=Path, default=None)
    p.set_defaults(handler=cmd_evaluate)

    p = verbs.add_parser("serve", help="start the prediction and review API (Ray Serve)",
                         description="Start the Ray Serve application: /v1/predict, /v1/classes, /v1/proposals, "
                                     "decisions, ingest, /healthz and OpenAPI docs at /docs. Write endpoints need "
                                     "a bearer token read from the environment variable named by --token-env.")
    p.add_argument("--workdir", type=Path, default=Path("demo_out"),
                   help="work folder whose service/ state to serve (default demo_out/, what `adisc demo` writes)")
    p.add_argument("--store", default=None, help="SQLAlchemy URL of the store (default: sqlite in --workdir)")
    p.add_argument("--index", type=Path, default=None, help="FAISS index file (default: in --workdir)")
    p.add_argument("--model", type=Path, default=None, help="serving model folder (default: in --workdir)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-env", default="ADISC_API_TOKEN", help="environment variable holding the API token")
    p.add_argument("--replicas", type=int, default=1)
    p.set_defaults(handler=cmd_serve)

    p = verbs.add_parser("train", help="distributed discovery (or PRN detector) training on a Ray cluster (Ray Train)",
                         description="Run discovery training (or, with --model prn, PRN detector training) as a Ray "
                                     "Train TorchTrainer: DDP workers, checkpoints every epoch, restart from the "
                                     "latest checkpoint when a worker is lost.")
    if verb == "train":
        from .platform.ray.train import add_train_arguments
        from .platform.ray.train_prn import add_prn_arguments

        add_train_arguments(p)
        add_prn_arguments(p)
    p.set_defaults(handler=cmd_train)

    p = verbs.add_parser("tune", help="tune discovery hyper-parameters with Ray Tune (ASHA, label-free ranking)",
                         description="Search discovery settings with Ray Tune over TorchTrainer trials; trials are "
                                     "ranked without the labels of the images being discovered.")
    if verb == "tune":
        from .platform.ray.tune import add_tune_arguments

        add_tune_arguments(p)
    p.set_defaults(handler=cmd_tune)

    p = verbs.add_parser("retrain", help="retrain on reviewed classes on the cluster (new model version)",
                         description="Turn confirmed classes (from the store or a labels file) into labelled "
                                     "classes and fine-tune on the cluster, producing a new model version.")
    if verb == "retrain":
        from .platform.ray.retrain import add_retrain_arguments

        add_retrain_arguments(p)
    p.set_defaults(handler=cmd_retrain)

    p = verbs.add_parser("export", help="export the reviewed classes: folder per class, CSV or COCO JSON",
                         description="Export the store's current, reviewed state (not the model's first guess): "
                                     "folder = one folder per known/confirmed class with masks beside (torchvision "
                                     "ImageFolder, anomalib Folder), proposed/unknown/rejected kept apart; csv = one "
                                     "row per region; coco = COCO JSON with RLE masks. OUT is a folder, written "
                                     "atomically, with export.json naming the model version and newest decision.")
    p.add_argument("--format", required=True, help="folder | csv | coco")
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty, or --overwrite)")
    _add_store_args(p)
    p.add_argument("--copy", action="store_true", help="folder: copy images instead of linking them")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out images whose files are gone or unreadable (listed in export.json) instead of "
                        "stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_export)

    p = verbs.add_parser("report", help="one-page HTML defect report (counts, Pareto, trend, crops per class)",
                         description="Write a self-contained HTML report of the reviewed state: regions per class, "
                                     "the Pareto chart, the trend over arrivals, six representative crops per class, "
                                     "the model version and the date. It opens offline in any browser.")
    p.add_argument("--out", required=True, type=Path, help="HTML file to write")
    _add_store_args(p)
    p.add_argument("--trend", default="batch", help="trend grouping: batch | hour | day (default batch)")
    p.set_defaults(handler=cmd_report)

    p = verbs.add_parser("ui", help="start the review dashboard (Streamlit)",
                         description="Start the Streamlit review dashboard on the store and index of a work "
                                     "folder (default demo_out/, what `adisc demo` writes).")
    p.add_argument("--workdir", type=Path, default=Path("demo_out"))
    p.add_argument("--store", default=None, help="SQLAlchemy URL (default: the work folder's store)")
    p.add_argument("--index", type=Path, default=None, help="FAISS index file (default: the work folder's)")
    p.add_argument("--model", type=Path, default=None, help="serving model folder for the Inspect page")
    p.add_argument("--data", type=Path, default=None, help="labelled data set for the Evaluation page")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.set_defaults(handler=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.errors import DataError

    argv = sys.argv[1:] if argv is None else argv
    verb = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(verb).parse_args(argv)
    try:
        return args.handler(args)
    except (DataError, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"adisc {args.verb}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
