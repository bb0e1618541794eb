"""2-D embeddings of captured features (PCA to 50 dimensions, then openTSNE with FFT gradients) and
numbers for "can you see the classes": k-NN accuracy in the embedding and the silhouette score."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..files import atomic_write, save_array

FEATURE_FILE = re.compile(r"(?P<layer>.+)-epoch(?P<epoch>\d+)\.npy$")


def pca(features: np.ndarray, dims: int = 50) -> np.ndarray:
    """Project centered features onto their top `dims` principal components (float32)."""
    x = np.asarray(features, dtype=np.float32)
    x = x - x.mean(axis=0)
    if x.shape[1] <= dims:
        return x
    # the covariance route: a (D, D) eigh is cheaper than an SVD of (N, D) when N >> D; float32 products
    # (float64 would be 2x the work for no visible change in a 2-D picture), eigh in float64
    values, vectors = np.linalg.eigh((x.T @ x).astype(np.float64))
    return x @ vectors[:, ::-1][:, :dims].astype(np.float32)


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


def tsne(features: np.ndarray, seed: int = 0, n_jobs: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(N, 2) t-SNE embedding: PCA to 50 dimensions, exact 3 x perplexity nearest neighbors, PCA
    initialization, FFT-accelerated gradients, 125 early-exaggeration + 375 iterations (openTSNE's
    default is 250 + 500; with PCA initialization and its learning rate N/12 the shorter run gave the
    same k-NN accuracy and silhouette in benchmarks/tsne.py at 60% of the time)."""
    from openTSNE import TSNE, affinity
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    reduced = pca(features, 50)
    perplexity = min(perplexity, max(2.0, (len(reduced) - 1) / 3))
    jobs = n_jobs or os.cpu_count() or 1
    k = min(len(reduced) - 1, int(3 * perplexity))
    affinities = affinity.PerplexityBasedNN(perplexity=perplexity, n_jobs=jobs, random_state=seed,
                                            knn_index=PrecomputedNeighbors(*nearest_neighbors(reduced, k)))
    model = TSNE(n_components=2, perplexity=perplexity, initialization="pca", negative_gradient_method="fft",
                 early_exaggeration_iter=125, n_iter=375, n_jobs=jobs, random_state=seed, verbose=False)
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


def embed_run(run_dir: Path, seed: int = 0, recompute: bool = False) -> list[dict[str, Any]]:
    """Embed every captured (layer, epoch) of a run (cached beside the features as .tsne.npy) and
    score it. Rows of {layer, epoch, points, knn_acc, silhouette, embedding, labels}; the scores
    also go to features/tsne.json."""
    files = feature_files(run_dir)
    if not files:
        raise ConfigError(f"{run_dir}: no captured features (set analysis.tsne.layers, e.g. [flatten, fc1])")
    labels = np.load(Path(run_dir) / "features" / "labels.npy")
    rows = []
    for layer, by_epoch in files.items():
        for epoch, path in sorted(by_epoch.items()):
            cached = path.with_name(path.name.replace(".npy", ".tsne.npy"))
            if cached.is_file() and not recompute:
                embedding = np.load(cached)
            else:
                embedding = tsne(np.load(path).astype(np.float32), seed=seed)
                atomic_write(cached, lambda tmp, e=embedding: save_array(tmp, e.astype(np.float32)))
            rows.append({"layer": layer, "epoch": epoch, "points": len(labels),
                         **separation(embedding, labels, seed=seed), "embedding": embedding, "labels": labels})
    scores = [{k: v for k, v in row.items() if k not in ("embedding", "labels")} for row in rows]
    atomic_write(Path(run_dir) / "features" / "tsne.json", json.dumps(scores, indent=2) + "\n")
    return rows
