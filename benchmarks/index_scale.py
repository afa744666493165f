"""FAISS prototype-index scale (issue 6 item 6): add, query, incremental add/remove and save/load times of
``PrototypeIndex`` at 10k / 100k / 1M 256-d vectors, flat (exact) vs approximate (IVF), with a plain numpy
brute-force search as the peer at the sizes in ``--numpy-sizes``.

Usage: python benchmarks/index_scale.py [--sizes 10000 100000 1000000] [--dim 256] [--queries 1000] [--k 10]
       [--threads 1]
Data: a mixture of 1000 Gaussian clusters on the unit sphere (embedding-like). Recall of the IVF index is
measured against the flat index's exact neighbours. The approximate rows force IVF at every size
(``approximate_above = n - 1``); by default ``PrototypeIndex`` switches at 50k. Prints a table and writes
benchmarks/results/index_scale.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from anomaly_discovery.platform.storage.index import IndexConfig, PrototypeIndex
from machine_info import cpu_model
from results_file import add_output_arguments, write_results

RESULT_KEYS = ("benchmark", "machine", "dim", "n_queries", "k", "n_clusters", "peak_rss_mb", "notes", "results")
N_CLUSTERS = 1000
BATCH = 250


def embedding_like(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """``n`` unit-norm vectors: a random cluster centre plus isotropic noise (signal-to-noise about 1)."""
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        labels = rng.integers(0, len(centres), stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        vectors[start:stop] = centres[labels] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def timed(function) -> tuple[object, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def numpy_search(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force cosine top-k of unit vectors: a matrix product and a partial sort, in query batches."""
    ids = []
    for start in range(0, len(queries), BATCH):
        similarities = queries[start:start + BATCH] @ base.T
        top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarities, top, axis=1), axis=1)
        ids.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(ids)


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Fraction of the exact top-k neighbours that ``found`` also returns."""
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def measure_index(kind: str, base: np.ndarray, queries: np.ndarray, extra: np.ndarray, k: int,
                  exact: np.ndarray | None, nprobe: int, workdir: Path) -> tuple[dict, np.ndarray]:
    n = len(base)
    config = IndexConfig(approximate_above=n - 1 if kind == "ivf" else n + len(extra) + 1, nprobe=nprobe)
    index = PrototypeIndex(base.shape[1], config=config)
    ids = np.arange(n, dtype=np.int64)
    _, add_s = timed(lambda: index.add(ids, base))
    assert index.index_type() == kind
    (_, found), query_s = timed(lambda: index.search(queries, k))
    single = [timed(lambda q=q: index.search(q[None], k))[1] for q in queries[:100]]
    add_one = [timed(lambda i=i: index.add([n + i], extra[i:i + 1]))[1] for i in range(len(extra))]
    remove_ids = np.arange(0, n, max(1, n // 100))[:100]
    _, remove_s = timed(lambda: index.remove(remove_ids))
    path = workdir / f"{kind}-{n}.faiss"
    _, save_s = timed(lambda: index.save(path, "bench"))
    _, load_s = timed(lambda: PrototypeIndex.load(path))
    path.unlink()
    path.with_name(path.name + ".json").unlink()
    row = {
        "n": n, "index": kind, "add_s": add_s, "query_batch_s": query_s,
        "query_us_per_vector": query_s / len(queries) * 1e6, "single_query_ms": float(np.median(single)) * 1e3,
        "add_one_ms": float(np.median(add_one)) * 1e3, "remove_100_ms": remove_s * 1e3,
        "save_s": save_s, "load_s": load_s,
        "recall_at_1": recall(found, exact, 1) if exact is not None else 1.0,
        "recall_at_k": recall(found, exact, k) if exact is not None else 1.0,
    }
    if kind == "ivf":
        row.update({key: index.describe()[key] for key in ("n_lists", "nprobe")})
    return row, found


def measure_numpy(base: np.ndarray, queries: np.ndarray, k: int, exact: np.ndarray) -> dict:
    raw = base * 1.5
    normalised, add_s = timed(lambda: raw / np.linalg.norm(raw, axis=1, keepdims=True))
    found, query_s = timed(lambda: numpy_search(normalised, queries, k))
    single = [timed(lambda q=q: numpy_search(normalised, q[None], k))[1] for q in queries[:100]]
    return {"n": len(base), "index": "numpy", "add_s": add_s, "query_batch_s": query_s,
            "query_us_per_vector": query_s / len(queries) * 1e6, "single_query_ms": float(np.median(single)) * 1e3,
            "recall_at_1": recall(found, exact, 1), "recall_at_k": recall(found, exact, k)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--numpy-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=IndexConfig().nprobe)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((N_CLUSTERS, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    queries = embedding_like(args.queries, args.dim, rng, centres)
    extra = embedding_like(20, args.dim, rng, centres)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in args.sizes:
            base = embedding_like(n, args.dim, rng, centres)
            flat_row, exact = measure_index("flat", base, queries, extra, args.k, None, args.nprobe, Path(workdir))
            rows.append(flat_row)
            gc.collect()
            rows.append(measure_index("ivf", base, queries, extra, args.k, exact, args.nprobe, Path(workdir))[0])
            gc.collect()
            if n in args.numpy_sizes:
                rows.append(measure_numpy(base, queries, args.k, exact))
            del base
            gc.collect()
            print(f"done n={n}", flush=True)

    header = (f"{'n':>9} {'index':>6} {'add s':>8} {'query µs/q':>11} {'1 query ms':>11} {'add 1 ms':>9} "
              f"{'rm 100 ms':>10} {'save s':>7} {'load s':>7} {'R@1':>6} {f'R@{args.k}':>6}")
    print(f"{args.dim}-d, {args.queries} queries, k={args.k}, {args.threads} FAISS thread(s)")
    print(header)
    for row in rows:
        def cell(key: str, width: int, fmt: str) -> str:
            return f"{row[key]:>{width}{fmt}}" if key in row else f"{'-':>{width}}"
        print(f"{row['n']:>9} {row['index']:>6} {cell('add_s', 8, '.3f')} {cell('query_us_per_vector', 11, '.1f')} "
              f"{cell('single_query_ms', 11, '.3f')} {cell('add_one_ms', 9, '.3f')} {cell('remove_100_ms', 10, '.2f')} "
              f"{cell('save_s', 7, '.2f')} {cell('load_s', 7, '.2f')} {cell('recall_at_1', 6, '.3f')} "
              f"{cell('recall_at_k', 6, '.3f')}")

    result = {
        "benchmark": "index_scale",
        "machine": {
            "processor": cpu_model(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "faiss": faiss.__version__, "numpy": np.__version__,
            "faiss_threads": args.threads, "gpus": faiss.get_num_gpus(),
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "dim": args.dim, "n_queries": args.queries, "k": args.k, "n_clusters": N_CLUSTERS,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "notes": "ivf rows force the approximate index at every size; PrototypeIndex switches at 50k by default. "
                 "Recall is against the flat index's exact neighbours. numpy rows: normalise (add) and a "
                 "matrix product + argpartition (query), single thread only if OMP/BLAS threads are 1.",
        "results": [{key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()}
                    for row in rows],
    }
    written = write_results("index_scale", result, RESULT_KEYS, args.tag, args.out)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
