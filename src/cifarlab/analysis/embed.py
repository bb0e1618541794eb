"""2-D embeddings of captured features (PCA to 50 dimensions, then openTSNE: Barnes-Hut gradients below
10,000 points, FFT above) and numbers for "can you see the classes": k-NN accuracy in the embedding and
the silhouette score."""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .. import processes
from ..errors import ConfigError
from ..files import atomic_write, save_array

log = logging.getLogger(__name__)  # cifarlab.analysis.*: the analysis phase's progress lines

FEATURE_FILE = re.compile(r"(?P<layer>.+)-epoch(?P<epoch>\d+)\.npy$")


def pca(features: np.ndarray, dims: int = 50) -> np.ndarray:
    """Project centered features onto their top `dims` principal components (float32)."""
    from scipy.linalg import eigh

    x = np.asarray(features, dtype=np.float32)
    x = x - x.mean(axis=0)
    n, d = x.shape
    dims = min(dims, n)
    if d <= dims:
        return x
    # the smaller square product (float32, eigh in float64), and only its top `dims` eigenpairs (scipy's
    # subset driver): 1,000 x 2048 flatten features took 4.7 s with a full (2048, 2048) eigh, 0.1 s so
    top = [min(n, d) - dims, min(n, d) - 1]
    if n < d:  # the Gram matrix: x = U S V^T, so x V = U S, from the (N, N) eigenpairs
        values, vectors = eigh((x @ x.T).astype(np.float64), subset_by_index=top)
        return (vectors[:, ::-1] * np.sqrt(np.clip(values[::-1], 0, None))).astype(np.float32)
    values, vectors = eigh((x.T @ x).astype(np.float64), subset_by_index=top)
    return x @ vectors[:, ::-1].astype(np.float32)


def nearest_neighbors(x: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbors (indices, euclidean distances), self excluded: blocks of squared
    distances from one matrix product each, then top-k. After PCA to 50 dimensions this is faster
    than building an approximate index at the sizes t-SNE is used for here (up to ~10^5 points)."""
    import torch

    points = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    norms = (points * points).sum(1)
    indices, distances = [], []
    for start in range(0, len(points), block):
        rows = points[start:start + block]
        d2 = norms[start:start + block, None] - 2 * rows @ points.T + norms[None, :]
        d2[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = float("inf")  # not itself
        found, index = torch.topk(d2, k, dim=1, largest=False)
        indices.append(index)
        distances.append(found.clamp_min(0).sqrt())
    return torch.cat(indices).numpy(), torch.cat(distances).double().numpy()


BARNES_HUT_BELOW = 10_000  # points; openTSNE's own rule: FFT's fixed cost per step dominates below
STOP_CHECK_EVERY = 25  # iterations between a concurrent t-SNE's looks at its stop event
POINTS_PER_THREAD = 5_000  # gradient threads: one per this many points (more only pay in their overhead)


def tsne_plan(points: int, n_jobs: int = 0) -> dict[str, Any]:
    """How a t-SNE of `points` points runs: gradient method and threads sized to the input."""
    cores = n_jobs or processes.cores()
    return {"method": "bh" if points < BARNES_HUT_BELOW else "fft",
            "threads": max(1, min(cores, points // POINTS_PER_THREAD))}


def tsne(features: np.ndarray, seed: int = 0, n_jobs: int = 0, perplexity: float = 30.0,
         stop: Optional[threading.Event] = None) -> np.ndarray:
    """(N, 2) t-SNE embedding: PCA to 50 dimensions, exact 3 x perplexity nearest neighbors, PCA
    initialization, 125 early-exaggeration + 375 iterations (openTSNE's default is 250 + 500; with PCA
    initialization and its learning rate N/12 the shorter run gave the same k-NN accuracy and silhouette
    in benchmarks/tsne.py at 60% of the time), gradients and threads as `tsne_plan` sizes them to N.
    `n_jobs`: at most this many threads (0: the cores). `stop`: once set, the optimization ends within
    STOP_CHECK_EVERY iterations (the embedding is then unfinished)."""
    from openTSNE import TSNE, affinity
    from openTSNE.nearest_neighbors import PrecomputedNeighbors
    from threadpoolctl import threadpool_limits

    plan = tsne_plan(len(features), n_jobs)
    # BLAS (the PCA's products and eigh) on the plan's threads too: at these sizes OpenBLAS' spare threads
    # only spin, and on a busy machine they made a 0.1 s eigh of 1,000 points take 1-16 s
    with threadpool_limits(plan["threads"], user_api="blas"):
        reduced = pca(features, 50)
        perplexity = min(perplexity, max(2.0, (len(reduced) - 1) / 3))
        k = min(len(reduced) - 1, int(3 * perplexity))
        affinities = affinity.PerplexityBasedNN(perplexity=perplexity, n_jobs=plan["threads"], random_state=seed,
                                                knn_index=PrecomputedNeighbors(*nearest_neighbors(reduced, k)))
        model = TSNE(n_components=2, perplexity=perplexity, initialization="pca",
                     negative_gradient_method=plan["method"], early_exaggeration_iter=125, n_iter=375,
                     n_jobs=plan["threads"], random_state=seed, verbose=False,
                     **({} if stop is None else {"callbacks": lambda *_: stop.is_set(),
                                                  "callbacks_every_iters": STOP_CHECK_EVERY}))
        return np.asarray(model.fit(reduced.astype(np.float64), affinities=affinities))


def separation(embedding: np.ndarray, labels: np.ndarray, k: int = 10, seed: int = 0,
               silhouette_samples: int = 5000) -> dict[str, float]:
    """k-NN accuracy (leave-one-out majority vote of the k nearest points) and the silhouette score
    (on at most `silhouette_samples` points) of a labeled embedding."""
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels)
    k = min(k, len(labels) - 1)
    neighbors = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding, return_distance=False)[:, 1:]
    votes = labels[neighbors]
    counts = np.zeros((len(labels), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (np.arange(len(labels))[:, None], votes), 1)
    knn = float((counts.argmax(axis=1) == labels).mean())
    sample = min(silhouette_samples, len(labels))
    silhouette = float(silhouette_score(embedding, labels, sample_size=sample, random_state=seed)) \
        if len(np.unique(labels)) > 1 else float("nan")
    return {"knn_acc": knn, "silhouette": silhouette}


def feature_files(run_dir: Path) -> dict[str, dict[int, Path]]:
    """{layer: {epoch: path}} of the features a run captured during training."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted((Path(run_dir) / "features").glob("*-epoch*.npy")):
        match = FEATURE_FILE.match(path.name)
        if match and not path.name.endswith(".tsne.npy"):
            found.setdefault(match["layer"], {})[int(match["epoch"])] = path
    return found


def concurrent_tsne(jobs: list[tuple[int, Path]], points: int, seed: int) -> Iterator[tuple[int, np.ndarray, float]]:
    """(index, embedding, seconds) of the t-SNE of each job's features file (`points` rows each), in the
    jobs' order, computed as many at a time as the cores hold their threads (tsne_plan): openTSNE's loops
    release the GIL, so two 1,000-point embeddings on two cores take about 1.1x one. The threads write
    nothing (the caller does). When the caller's thread is interrupted (a signal's exception), the
    embeddings under way are stopped and waited for before the exception goes on: a process must not exit
    while a thread runs native code."""
    from threadpoolctl import threadpool_limits

    threads = tsne_plan(points)["threads"]
    stop = threading.Event()

    def work(job: tuple[int, Path]) -> tuple[int, np.ndarray, float]:
        began = time.perf_counter()
        embedding = tsne(np.load(job[1]).astype(np.float32), seed=seed, n_jobs=threads, stop=stop)
        return job[0], embedding, time.perf_counter() - began

    pool = ThreadPoolExecutor(max(1, processes.cores() // threads))
    try:
        with threadpool_limits(threads, user_api="blas"):  # once for all: the limit is process-wide
            yield from pool.map(work, jobs)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def embed_run(run_dir: Path, seed: int = 0, recompute: bool = False) -> list[dict[str, Any]]:
    """Embed every captured (layer, epoch) of a run (cached beside the features as .tsne.npy; several at
    once, concurrent_tsne) and score it, logging a line as each is done. Rows of {layer, epoch, points,
    method, cached, seconds, knn_acc, silhouette, embedding, labels} in (layer, epoch) order; all but the
    arrays also go to features/tsne.json."""
    files = feature_files(run_dir)
    if not files:
        raise ConfigError(f"{run_dir}: no captured features (set analysis.tsne.layers, e.g. [flatten, fc1])")
    labels = np.load(Path(run_dir) / "features" / "labels.npy")
    pairs = [(layer, epoch, path) for layer, by_epoch in files.items() for epoch, path in sorted(by_epoch.items())]
    cache = [path.with_name(path.name.replace(".npy", ".tsne.npy")) for _, _, path in pairs]
    reused = {index for index, cached in enumerate(cache) if cached.is_file() and not recompute}
    computed = concurrent_tsne([(i, pairs[i][2]) for i in range(len(pairs)) if i not in reused], len(labels), seed)
    found: dict[int, dict[str, Any]] = {}
    for number, (index, embedding, seconds) in enumerate(
            itertools.chain(((i, np.load(cache[i]), 0.0) for i in sorted(reused)), computed), start=1):
        started = time.perf_counter()
        layer, epoch, _ = pairs[index]
        if index not in reused:
            atomic_write(cache[index], lambda tmp, e=embedding: save_array(tmp, e.astype(np.float32)))
        row = {"layer": layer, "epoch": epoch, "points": len(labels), "method": tsne_plan(len(labels))["method"],
               "cached": index in reused, **separation(embedding, labels, seed=seed)}
        row["seconds"] = round(seconds + time.perf_counter() - started, 3)
        log.info("t-SNE %d/%d: %s epoch %d, %d points%s: %.1f s (k-NN accuracy %.1f%%)", number, len(pairs), layer,
                 epoch, len(labels), " (cached)" if index in reused else "", row["seconds"], 100 * row["knn_acc"])
        found[index] = {**row, "embedding": embedding, "labels": labels}
    rows = [found[index] for index in range(len(pairs))]
    scores = [{k: v for k, v in row.items() if k not in ("embedding", "labels")} for row in rows]
    atomic_write(Path(run_dir) / "features" / "tsne.json", json.dumps(scores, indent=2) + "\n")
    return rows
