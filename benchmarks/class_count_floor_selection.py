"""K by prediction strength, or the consensus where it stops at k = 2, judged on new NEU-DET and generated draws.

Usage: python benchmarks/class_count_floor_selection.py [--neu ../shared/datasets/neu-det] [--threads 1] [--tag NAME]

Why. The product estimates K by prediction strength (``ClassSettings.k_method``, picked by
``discovery_selection.py``'s part ``class_count_flow``). Its value is the reproducibility of the worst cluster, so a
single kind that overlaps another keeps every k above 2 below the level: on that part's rows it stopped at the floor,
k = 2, on 14 of 70 class sets, 7 of which held more than 3 classes, and MTD's estimates are 2 and 3 (true 5 and 6).
``prediction_strength_or_consensus`` (``class_count``) keeps prediction strength's K above the floor and takes the
consensus (the median of the sphere-reference gap statistic, the kNN graph's eigengap and prediction strength)
where prediction strength stops at it. The idea came from reading ``class_count_flow``'s selection and fresh rows
(there, combining the two parts' final estimates this way: 58 of 70 within ±1 against prediction strength's 54,
50 against 45 on its fresh draws), so neither set can judge it: this script draws new ones.

Protocol. K estimated as the product does (``view_discovery.choose_k_and_weights``: a first estimate on the
equally weighted views, the view weights chosen at it, K again), by ``class_count_flow``'s code
(``class_count_flow_rows``: every task whole and in random subsets of 3, 4 and 5 classes, two each), by prediction
strength, the new criterion and the consensus (reported). Selection sets: ``class_count_flow``'s tasks (NEU-DET
seeds 0 to 2, 50 images per class, zero-shot maps; generated bottle and metal plate, seed 0, PatchCore maps; their
long-tailed draws), recomputed on today's views. New draws, never read before this run: NEU-DET seeds
``NEW_NEU_SEEDS``, generated data of seed ``NEW_GENERATED_SEED``, and long-tailed draws of both with those seeds
(70 estimates). MTD is not read.

Rule, written at 13:15 UTC on 7 December 2026, before any estimate of the new criterion or of the new draws was
made: ``prediction_strength_or_consensus`` becomes the default ``k_method`` if, on the new draws, it has more
estimates within ±1 of the true count than prediction strength, and on the selection sets at least as many.
Otherwise prediction strength stays.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anomaly_discovery.data.synthetic import generate_dataset
from anomaly_discovery.models.discovery.views import ViewExtractor, view_vectors
from discovery_selection import (GENERATED, NEU_SEEDS, ROOT, class_count_flow_rows, generated_task, long_tailed,
                                 neu_task, normal_projection, task_features, whole_neu_task, within_one)
from machine_info import cpu_model
from results_file import add_output_arguments, results_path, write_results

RESULT_KEYS = ("benchmark", "machine", "protocol", "rule", "criteria", "selection_rows", "selection_within_one",
               "new_rows", "new_within_one", "adopted", "seconds")
CRITERIA = ("prediction_strength", "prediction_strength_or_consensus", "consensus")
CANDIDATE, INCUMBENT = "prediction_strength_or_consensus", "prediction_strength"
NEW_NEU_SEEDS = (6, 7, 8)
NEW_GENERATED_SEED = 2


def draws(neu: Path, cache: Path, folder: Path, whole_neu: dict, neu_seeds: tuple,
          generated_seed: int) -> tuple[list[dict], list[dict]]:
    """(balanced, long-tailed) tasks: NEU-DET draws of ``neu_seeds`` and the generated products of
    ``generated_seed``, then long-tailed draws of both, as ``discovery_selection.py`` builds its tasks (10:1 from
    150 images of all NEU-DET, 5:1 from 44 generated)."""
    generate_dataset(folder, n_images=960, seed=generated_seed, products=GENERATED, progress=False)
    prefix = f"seed{generated_seed}-" if generated_seed else ""
    generated = [generated_task(folder, product, cache, prefix) for product in GENERATED]
    balanced = [neu_task(neu, seed, cache) for seed in neu_seeds] + generated
    tailed = [long_tailed(whole_neu, 10.0, seed, 150) for seed in neu_seeds]
    return balanced, tailed + [long_tailed(task, 5.0, generated_seed, 44) for task in generated]


def estimate_rows(groups: tuple[list[dict], list[dict]], extractor: ViewExtractor) -> list[dict]:
    """``class_count_flow_rows`` over the balanced and the long-tailed tasks, the class subsets of each group drawn
    from seed 0 (as ``class_count_flow`` draws them)."""
    rows = []
    for group in groups:
        rng = np.random.default_rng(0)
        rows += [row for task in group for row in class_count_flow_rows(
            task, view_vectors(task_features(task, extractor), normal_projection(task, extractor)), rng, CRITERIA)]
    return rows


def adopted(selection: dict[str, int], new: dict[str, int]) -> bool:
    """The rule: more within ±1 than the incumbent on the new draws, and no fewer on the selection sets."""
    return new[CANDIDATE] > new[INCUMBENT] and selection[CANDIDATE] >= selection[INCUMBENT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neu", type=Path, default=ROOT.parent / "shared" / "datasets" / "neu-det")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/adisc-discovery-maps"))
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or results_path("class_count_floor_selection", args.tag)
    started = time.perf_counter()
    extractor = ViewExtractor("mobilenet_v2")
    whole_neu = whole_neu_task(args.neu, args.cache)
    with tempfile.TemporaryDirectory() as folder:
        selection = estimate_rows(draws(args.neu, args.cache, Path(folder) / "selection", whole_neu, NEU_SEEDS, 0),
                                  extractor)
        new = estimate_rows(draws(args.neu, args.cache, Path(folder) / "new", whole_neu, NEW_NEU_SEEDS,
                                  NEW_GENERATED_SEED), extractor)
    results = {"benchmark": "class_count_floor_selection",
               "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads},
               "protocol": {"selection": f"NEU-DET seeds {', '.join(map(str, NEU_SEEDS))} (50 images per class, "
                                         "zero-shot maps), generated bottle and metal plate of seed 0 (960 images, "
                                         "PatchCore maps), long-tailed draws of both; whole and class subsets",
                            "new": f"NEU-DET seeds {', '.join(map(str, NEW_NEU_SEEDS))}, generated seed "
                                   f"{NEW_GENERATED_SEED}, long-tailed draws of both with those seeds",
                            "estimate": "view_discovery.choose_k_and_weights, k in [2, 10]", "mtd_read": False},
               "rule": __doc__.split("Rule, written at ")[1].split("\n\n")[0].replace("\n", " "),
               "criteria": list(CRITERIA), "selection_rows": selection, "selection_within_one": within_one(selection),
               "new_rows": new, "new_within_one": within_one(new),
               "adopted": adopted(within_one(selection), within_one(new)),
               "seconds": round(time.perf_counter() - started, 1)}
    write_results("class_count_floor_selection", results, RESULT_KEYS, out=out, indent=1)
    print(f"selection {results['selection_within_one']}, new {results['new_within_one']}, "
          f"adopted: {results['adopted']}; wrote {out}")


if __name__ == "__main__":
    main()
